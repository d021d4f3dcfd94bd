"""The process group torchrun (or ``accelerate launch``) describes in the environment: read,
checked one variable at a time, and joined with failures as one line.

torch's own ``env://`` rendezvous reads ``int(os.environ["RANK"])`` and friends and, on a wrong
value, raises "invalid literal for int()" or a ``DistNetworkError`` traceback; a missing peer
waits out the whole timeout without a word. Here every variable is checked first and its name is
in the message, and a rendezvous that fails or times out is one :class:`GroupJoinError` line
naming the address, the rank and the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

from fvdiffusion.errors import ConfigError, GroupJoinError

@dataclass(frozen=True)
class TorchrunEnv:
    """The variables torchrun sets for each worker, checked."""

    rank: int
    world_size: int
    local_rank: int | None
    master_addr: str
    master_port: int


def _integer(name: str, low: int, high: int | None = None, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {name} is not: start the "
                          f"processes with torchrun (or unset WORLD_SIZE)")
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ConfigError(f"invalid {name}={raw!r} in the environment: expected {bound}")
    return value


def world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset), checked."""
    return _integer("WORLD_SIZE", 1, default="1")


def read_env() -> TorchrunEnv | None:
    """The checked torchrun variables, or None outside a multi-process launch (WORLD_SIZE unset or 1)."""
    world = world_size()
    if world <= 1:
        return None
    rank = _integer("RANK", 0, world - 1)
    local = _integer("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else None
    port = _integer("MASTER_PORT", 1, 65535)
    addr = os.environ.get("MASTER_ADDR")
    if addr is None:
        _integer("MASTER_ADDR", 0)  # raises the "is set but MASTER_ADDR is not" line
    if not addr.strip():
        raise ConfigError(f"invalid MASTER_ADDR={addr!r} in the environment: expected the host of rank 0")
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ConfigError(f"invalid MASTER_ADDR={os.environ['MASTER_ADDR']!r} in the environment: "
                          f"{getattr(exc, 'strerror', None) or exc} (the host of rank 0)") from None
    return TorchrunEnv(rank, world, local, addr, port)


def join(env: TorchrunEnv, backend: str, timeout_s: float) -> None:
    """``init_process_group`` from ``env``; a rendezvous that fails or times out is one line.

    torch's ``env://`` rendezvous, not a ``tcp://`` one: under torchrun the workers may join the
    agent's store (TORCHELASTIC_USE_AGENT_STORE) instead of hosting one on rank 0."""
    import torch

    try:
        with _native_stderr_held():
            torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                                 timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError, ValueError) as exc:  # DistError and its network/store kinds are RuntimeErrors
        reason = " ".join(str(exc).split())[:300]
        raise GroupJoinError(f"could not join the process group at MASTER_ADDR={env.master_addr} "
                             f"MASTER_PORT={env.master_port} as RANK={env.rank} of WORLD_SIZE={env.world_size} "
                             f"within the timeout, {timeout_s:g} s (FVD_COLLECTIVE_TIMEOUT; a peer missing or a wrong "
                             f"address?): {reason}") from None



@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
    """Hold what C++ writes to file descriptor 2 while joining: c10d logs every failed connection
    try with its native stack. On a failure our one line replaces it; on success it is replayed."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        text = held.read()
        if text:
            sys.stderr.write(text.decode(errors="replace"))
