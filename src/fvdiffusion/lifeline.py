"""Worker processes that end with the process that started them, and leave Ctrl-C to it.

A spawned worker outlives its parent by default: SIGKILL (or SIGTERM, which skips Python's exit
handlers) of ``fvd sample --nproc K`` would leave K orphans holding a CPU or a GPU each. A worker
asks the kernel for SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``) and also watches
its parent id (other systems, and the moment before the request took effect).

Ctrl-C in a terminal reaches the whole foreground process group. The launcher alone should
answer it (one line; it then ends the workers), so SIGINT is blocked while the workers are
spawned (they inherit the mask through fork and exec, before any of their imports run) and
ignored by them afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Iterator

from fvdiffusion.errors import LaunchTerminated

PR_SET_PDEATHSIG = 1
WATCH_S = 0.5


def bind_to_parent(parent_pid: int) -> None:
    """Called first thing in a worker: die when ``parent_pid`` does; never answer SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still ends the worker
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="fvd-parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_S)
    os._exit(1)  # reparented: the launcher is gone, nobody will read this worker's result


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while workers are spawned; a Ctrl-C meanwhile is delivered after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the launcher waits, SIGTERM raises :class:`~fvdiffusion.errors.LaunchTerminated` (so the workers are ended and
    the command prints its one line) instead of killing it past its cleanup. Only in the main
    thread, and only where SIGTERM still has its default action (a caller's handler is kept)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise LaunchTerminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
