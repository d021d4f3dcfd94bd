"""Start K local processes in one torch.distributed group, run a function in each, collect rank 0's value.

What ``fvd sample --nproc K``, the tests and the scaling benchmark use; ``torchrun`` does the
same job across machines. Each worker sets its torch threads, joins the group (gloo on the
CPU, NCCL with one GPU per rank), runs ``fn(*args)`` and reports back: rank 0 its value, every
rank its failure as one line. The first failure is raised here as
:class:`~fvdiffusion.errors.ShardFailedError`; workers still running after ``grace_s`` are
terminated, so a launch never hangs.

Workers die with this process (SIGKILL included) and leave Ctrl-C to it (:mod:`fvdiffusion.lifeline`);
SIGTERM while it waits ends them as Ctrl-C does. The group is local, so everything it listens on
is bound to the loopback: rank 0's store on 127.0.0.1 and gloo's pairs on the loopback interface.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fvdiffusion import group_env, lifeline
from fvdiffusion.distributed import DEFAULT_TIMEOUT_S, collective_timeout
from fvdiffusion.errors import ConfigError, ShardFailedError, exception_line

BACKENDS = ("gloo", "nccl")
GRACE_S = 30.0  # after the first failure, how long the other workers get to stop on their own (at most the timeout)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Launch:
    """How to start the workers."""

    nproc: int
    backend: str = "gloo"
    threads: int = 1                      # torch threads per worker
    timeout_s: float = DEFAULT_TIMEOUT_S  # the group's collective timeout (FVD_COLLECTIVE_TIMEOUT in the workers)
    every_rank: bool = False              # return every rank's value, not only rank 0's
    grace_s: float = GRACE_S              # after the first failure, the others' time to stop before termination

    def __post_init__(self) -> None:
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise ConfigError(f"invalid nproc={self.nproc!r}: expected an integer >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"invalid backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend == "nccl" and torch.cuda.device_count() < self.nproc:
            raise ConfigError(f"invalid nproc={self.nproc} with NCCL: {torch.cuda.device_count()} GPU(s) visible, "
                              f"one per process needed")
        if not self.timeout_s > 0:
            raise ConfigError(f"invalid timeout_s={self.timeout_s!r}: expected a positive number of seconds")


def launch(fn: Callable[..., Any], args: tuple = (), nproc: int = 2, backend: str = "gloo", threads: int = 1,
           timeout_s: float | None = None, every_rank: bool = False, grace_s: float | None = None) -> Any:
    """Run ``fn(*args)`` on ``nproc`` fresh processes in one group; returns rank 0's return value
    (``every_rank``: the list of every rank's value).

    ``timeout_s`` defaults to FVD_COLLECTIVE_TIMEOUT (else 600 s), ``grace_s`` to the smaller of 30 s
    and the timeout. ``fn`` and ``args`` must be picklable (a module-level function): workers are
    spawned, not forked.
    """
    timeout = collective_timeout() if timeout_s is None else timeout_s
    spec = Launch(nproc=nproc, backend=backend, threads=threads, timeout_s=timeout, every_rank=every_rank,
                  grace_s=min(GRACE_S, timeout) if grace_s is None else grace_s)
    context = torch.multiprocessing.get_context("spawn")
    reports = context.Queue()
    release = context.Event()  # tensors in the reports are shared from the workers' memory: keep them alive
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, spec, port, os.getpid(), fn, args, reports, release),
                               daemon=True)
               for rank in range(spec.nproc)]
    failed = True
    try:
        with lifeline.sigterm_as_interrupt():
            with lifeline.sigint_blocked():  # inherited by the workers, before their imports run
                for worker in workers:
                    worker.start()
            value = _collect(workers, reports, spec)
        failed = False
        return value
    except KeyboardInterrupt:
        # all at once, last rank first: a rank that outlived a peer would log the lost connection
        for worker in reversed(workers):
            if worker.pid is not None and worker.is_alive():
                worker.kill()
        raise
    finally:
        release.set()
        for worker in workers:
            if worker.pid is None:
                continue  # never started
            worker.join(timeout=0.5 if failed else 5)  # after a failure a hung worker is not waited for
            if worker.is_alive():
                worker.terminate()
            worker.join(timeout=5)


def _collect(workers: list, reports: Any, spec: Launch) -> Any:
    values, done, failure, failed_at = [None] * spec.nproc, set(), None, None
    deadline = None
    while len(done) < spec.nproc:
        if failure is not None and time.monotonic() > failed_at + spec.grace_s:
            break
        try:
            kind, rank, payload = reports.get(timeout=0.2)
        except queue_module.Empty:
            dead = [r for r, w in enumerate(workers) if not w.is_alive() and r not in done]
            if dead and failure is None:
                deadline = deadline or time.monotonic() + 2.0  # a report may still be in the pipe
                if time.monotonic() > deadline:
                    failure = (f"rank {dead[0]} of {spec.nproc} exited (code {workers[dead[0]].exitcode}) "
                               f"without a result")
                    failed_at = time.monotonic()
            continue
        done.add(rank)
        if kind == "ok":
            values[rank] = payload
        elif failure is None:
            failure, failed_at = payload, time.monotonic()
    if failure is not None:
        raise ShardFailedError(failure)
    return values if spec.every_rank else values[0]


def _worker(rank: int, spec: Launch, port: int, parent_pid: int, fn: Callable[..., Any], args: tuple,
            reports: Any, release: Any) -> None:
    lifeline.bind_to_parent(parent_pid)
    _thread_lock_for_progress_bars()
    torch.set_num_threads(spec.threads)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(spec.nproc), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
                       "FVD_COLLECTIVE_TIMEOUT": str(spec.timeout_s)})
    # pairs and the NCCL bootstrap on the loopback, unless the user chose an interface
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, _loopback_interface())
    try:
        if spec.backend == "nccl":
            torch.cuda.set_device(rank)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = _loopback_store(rank, spec.nproc, port, timeout)
        torch.distributed.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.nproc,
                                             timeout=timeout)
        value = fn(*args)
        reports.put(("ok", rank, value if rank == 0 or spec.every_rank else None))
        release.wait(timeout=spec.timeout_s)
    except BaseException as exc:  # one line back to the parent, whatever it was
        text = str(exc).strip() if isinstance(exc, ShardFailedError) else \
            f"rank {rank} of {spec.nproc}: {exception_line(exc)}"
        reports.put(("error", rank, text))
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass


def _thread_lock_for_progress_bars() -> None:
    """tqdm would make a multiprocessing lock (a named semaphore) in the worker; a worker killed on
    Ctrl-C never unregisters it, and the resource tracker then warns of a leak. One process draws
    its own bar: a thread lock is enough."""
    import threading

    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _loopback_store(rank: int, world: int, port: int, timeout: datetime.timedelta) -> Any:
    """The group's key-value store; rank 0 serves it from a socket bound to 127.0.0.1 only
    (TCPStore's own server would listen on every interface)."""
    if rank != 0:
        return torch.distributed.TCPStore(LOOPBACK, port, world, is_master=False, timeout=timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(max(128, world))
    return torch.distributed.TCPStore(LOOPBACK, port, world, is_master=True, timeout=timeout,
                                      master_listen_fd=listener.detach())


def _loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    return next((name for name in names if name in ("lo", "lo0")), "lo")


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` becomes this rank's GPU (LOCAL_RANK) in a group, else unchanged."""
    if device == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        env = group_env.read_env()
        return f"cuda:{env.local_rank}" if env is not None and env.local_rank is not None else device
    return device


def join_environment_group(device: str, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); True if joined.

    NCCL when ``device`` is a GPU (one per rank, chosen by LOCAL_RANK), gloo otherwise. Does
    nothing when there is no such environment or a group is already initialised.
    """
    if torch.distributed.is_initialized():
        return False
    env = group_env.read_env()  # every variable checked: one line naming a malformed one
    if env is None:
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(rank_device(device)))
    group_env.join(env, "nccl" if cuda else "gloo", collective_timeout() if timeout_s is None else timeout_s)
    return True


def is_rank_zero() -> bool:
    """True outside a process group and on its rank 0: the process that writes files and prints."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
