"""One population over several processes (DESIGN §8), on torch.distributed.

Rank r of a process group holds the contiguous block of particle slots [lo, hi) and runs the
denoiser and the reward on it. The per-particle scalars (rewards, weights, roots, a kernel's
aux values) are small, so every rank keeps all N of them: a reward evaluation all-gathers the
N new values, after which the potentials, the selection and the lineage are the same pure
functions of the same numbers on every rank (the decisions come from a generator keyed by the
shared seed, :mod:`fvdiffusion.noise`). Only the particle tensors (x̂0 and ε̂) of the parents
that are cloned into another rank's block move, once per (parent, receiving rank), with
point-to-point sends: a selection costs N scalars plus the cross-rank clones, never N particles.
After the last step the samples are all-gathered once, and the final selection runs on the
assembled population identically on every rank.

Faults: a rank that raises publishes one line (its rank, the step, the error) in the process
group's store; every other rank sees it while it waits in its next collective or at its next
step, and raises :class:`~fvdiffusion.errors.ShardFailedError` with the same line. A rank that
dies without a word is caught by the collective timeout (``timeout_s``, default
:data:`DEFAULT_TIMEOUT_S`, or ``FVD_COLLECTIVE_TIMEOUT`` seconds in the environment).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.errors import ConfigError, ShardFailedError, exception_line
from fvdiffusion.population import SCALAR_FIELDS, ParticleState

DEFAULT_TIMEOUT_S = 600.0    # longest wait in one collective before a silent rank counts as dead
FAILURE_ACK_S = 10.0         # how long the rank hosting the store waits for the others to read a failure
LEAVE_GRACE_S = 3.0          # how long the rank hosting the store waits for the others to leave first
SPIN_S = 0.0002              # wait without sleeping this long first
POLL_S = 0.0005              # then sleep this long between completion checks
STORE_POLL_S = 0.01          # how often a waiting rank reads the store for a published failure
FINGERPRINT_SLOTS = 64       # digests all-gathered by the call check: a fixed size, so any two calls pair up

_runs = 0  # sampling runs started in this process: every rank starts the same runs in the same order


def process_group() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, or None when there is none."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def block_starts(n: int, world: int, chunk: int) -> tuple[int, ...]:
    """Slot boundaries of the ranks' blocks: whole noise chunks, as even as possible, the larger blocks last.

    Whole chunks, so that a chunk's rows go through the networks in the same micro-batches
    whatever the layout (a network's output for a row can depend on its batch in the last bits).
    """
    chunks = -(-n // chunk)
    return tuple(min(n, (r * chunks // world) * chunk) for r in range(world + 1))


@dataclass
class CommStats:
    """What one rank sent: the all-gathered scalars and the particles moved by selections."""

    selections: int = 0
    particle_rows_sent: int = 0
    particle_bytes_sent: int = 0
    scalar_bytes_sent: int = 0
    final_bytes_sent: int = 0  # the samples, all-gathered once after the last step


@dataclass
class ExchangePlan:
    """The moves of one selection, as every rank derives them from the same N ancestors.

    ``source[i]`` indexes the rows of ``cat([local rows, received rows])`` that local slot i
    copies; ``received[i]`` is True where slot i's parent lives on another rank. ``sends`` maps
    a rank to the local rows it gets (sorted, each parent once), ``receive_counts`` a rank to
    the rows that come from it, in the same order. ``crosses``: whether any rank takes a parent
    from another one (all ranks agree, so they all call the all-to-all or none does).
    """

    source: Tensor
    received: Tensor
    sends: dict[int, Tensor]
    receive_counts: dict[int, int]
    crosses: bool


@dataclass
class Shard:
    """This rank's block of a population of ``n`` and the collectives that keep the ranks in step."""

    rank: int
    world: int
    n: int
    chunk: int                    # the noise chunk: blocks are whole chunks
    device: torch.device          # where the population lives
    comm_device: torch.device     # where collectives run (CPU for gloo, the rank's GPU for NCCL)
    timeout_s: float = DEFAULT_TIMEOUT_S
    run_id: int = 0
    store: Any = None
    where: str = "before the first step"  # updated by the driver, named in failure messages
    stats: CommStats = field(default_factory=CommStats)
    _last_store_poll: float = 0.0

    def __post_init__(self) -> None:
        self.starts = block_starts(self.n, self.world, self.chunk)
        self.lo, self.hi = self.starts[self.rank], self.starts[self.rank + 1]
        self._bounds = torch.tensor(self.starts[1:-1], dtype=torch.long)

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    def local(self, values: Tensor) -> Tensor:
        """This rank's rows of a population-wide [N, ...] tensor."""
        return values[self.lo : self.hi]

    def owners(self, slots: Tensor) -> Tensor:
        """The rank holding each slot (slots on the CPU)."""
        return torch.bucketize(slots, self._bounds, right=True)

    # --- collectives -------------------------------------------------------------------
    def all_gather_rows(self, local: Tensor, final: bool = False) -> Tensor:
        """The population-wide [N, ...] tensor from every rank's [n_local, ...] block.

        ``final``: the one gather of the samples after the loop (counted apart from the scalars).
        """
        widest = max(b - a for a, b in zip(self.starts, self.starts[1:]))
        padded = local.detach().to(self.comm_device).contiguous()
        if padded.shape[0] < widest:
            padded = torch.cat([padded, padded.new_zeros((widest - padded.shape[0], *padded.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        sent = local.numel() * local.element_size()
        if final:
            self.stats.final_bytes_sent += sent
        else:
            self.stats.scalar_bytes_sent += sent
        self._wait(torch.distributed.all_gather(parts, padded, async_op=True), "all-gather")
        rows = [part[: b - a] for part, a, b in zip(parts, self.starts, self.starts[1:])]
        return torch.cat(rows).to(local.device)

    def agree(self, fields: dict[str, Any], caller: str = "fvdiffusion.sample()") -> None:
        """Refuse, on every rank alike, a run that the ranks describe differently: a mismatched call
        would pair collectives of different sizes (a hang) or, worse, mix the ranks' different
        conditions into one population without a word. ``fields``: name -> value (a tensor by its bytes)."""
        names = list(fields)
        digests = [_digest(names)] + [_digest(fields[name]) for name in names]
        if len(digests) > FINGERPRINT_SLOTS:  # fold the tail into the last slot
            digests = digests[: FINGERPRINT_SLOTS - 1] + [_digest(digests[FINGERPRINT_SLOTS - 1 :])]
        mine = torch.zeros(FINGERPRINT_SLOTS, dtype=torch.int64, device=self.comm_device)
        mine[: len(digests)] = torch.tensor(digests, dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._wait(torch.distributed.all_gather(parts, mine, async_op=True), "call check")
        rows = [part.cpu().tolist() for part in parts]
        others = [r for r in range(1, self.world) if rows[r] != rows[0]]
        if not others:
            return
        differ: list[str] = []
        if any(row[0] != rows[0][0] for row in rows):
            differ.append("method and its options")
        else:
            slots = names[: FINGERPRINT_SLOTS - 2] + (["remaining options"] if len(names) > FINGERPRINT_SLOTS - 1
                                                      else names[FINGERPRINT_SLOTS - 2 :])
            differ += [name for i, name in enumerate(slots, start=1) if any(row[i] != rows[0][i] for row in rows)]
        which = ", ".join(map(str, others))
        raise ConfigError(f"rank{'s' if len(others) > 1 else ''} {which} of {self.world} called {caller} with a "
                          f"different {', '.join(differ)} than rank 0: one population is spread over the ranks, so "
                          f"every rank must make the same call; for per-rank prompts or settings pass sharded=False")

    def sum_ints(self, values: list[int]) -> list[int]:
        """Each value summed over the ranks."""
        total = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        self._wait(torch.distributed.all_reduce(total, async_op=True), "all-reduce")
        return [int(v) for v in total.cpu().tolist()]

    def plan(self, ancestors: Tensor) -> ExchangePlan:
        """The exchange for a selection; a parent is sent once per receiving rank however many
        slots there clone it. No sizes are exchanged: every rank computes every rank's moves."""
        anc = ancestors.detach().to("cpu", torch.long)
        owner = self.owners(anc)
        local_anc, local_owner = anc[self.lo : self.hi], owner[self.lo : self.hi]
        source = torch.empty(self.n_local, dtype=torch.long)
        mine = local_owner == self.rank
        source[mine] = local_anc[mine] - self.lo
        offset, receive_counts = self.n_local, {}
        for s in range(self.world):
            wanted = local_owner == s
            if s == self.rank or not bool(wanted.any()):
                continue
            parents, inverse = torch.unique(local_anc[wanted], return_inverse=True)
            source[wanted] = offset + inverse
            receive_counts[s] = parents.numel()
            offset += parents.numel()
        sends, crosses = {}, False
        for d in range(self.world):
            block = slice(self.starts[d], self.starts[d + 1])
            foreign = owner[block] != d
            crosses |= bool(foreign.any())
            wanted = owner[block] == self.rank
            if d != self.rank and bool(wanted.any()):
                sends[d] = torch.unique(anc[block][wanted]) - self.lo  # sorted, as the receiver expects
        return ExchangePlan(source=source, received=~mine, sends=sends, receive_counts=receive_counts,
                            crosses=crosses)

    def exchange(self, tensors: list[Tensor], ancestors: Tensor) -> tuple[list[Tensor], ExchangePlan]:
        """Each local slot i gets row ``ancestors[lo + i]`` of every tensor, wherever that row lives.

        One all-to-all with uneven splits carries the parents each rank needs from each other
        rank (the tensors packed side by side per row); ranks with nothing to swap send 0 rows.
        """
        plan = self.plan(ancestors)
        self.stats.selections += 1
        if not plan.crosses:
            return [t[plan.source.to(t.device)] for t in tensors], plan
        widths = [math.prod(t.shape[1:]) for t in tensors]
        dtype, device = tensors[0].dtype, tensors[0].device
        send_rows = [plan.sends[r].numel() if r in plan.sends else 0 for r in range(self.world)]
        recv_rows = [plan.receive_counts.get(r, 0) for r in range(self.world)]
        payloads = [torch.cat([t.index_select(0, rows.to(device)).reshape(rows.numel(), -1) for t in tensors], dim=1)
                    for _, rows in sorted(plan.sends.items())]
        outgoing = torch.cat(payloads) if payloads else torch.empty((0, sum(widths)), dtype=dtype, device=device)
        outgoing = outgoing.to(self.comm_device, dtype).contiguous()
        incoming = torch.empty((sum(recv_rows), sum(widths)), dtype=dtype, device=self.comm_device)
        self.stats.particle_rows_sent += sum(send_rows)
        self.stats.particle_bytes_sent += outgoing.numel() * outgoing.element_size()
        self._wait(torch.distributed.all_to_all_single(incoming, outgoing, output_split_sizes=recv_rows,
                                                       input_split_sizes=send_rows, async_op=True),
                   "particle exchange")
        received = incoming.to(device)
        out, column = [], 0
        for t, width in zip(tensors, widths):
            rows = torch.cat([t, received[:, column : column + width].reshape(-1, *t.shape[1:]).to(t.dtype)])
            out.append(rows[plan.source.to(t.device)])
            column += width
        return out, plan

    def select_particles(self, state: ParticleState, ancestors: Tensor, alpha_bar: float) -> ParticleState:
        """The population after a selection: slot i holds a copy of particle ``ancestors[i]``.

        The per-particle scalars (all N on every rank) are gathered in place; of the particle
        tensors only x̂0, ε̂ and the transition's history cross ranks. A clone received
        from another rank gets x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂; a clone within the rank copies its
        parent's x_t exactly.
        """
        keys = list(state.history)  # a multistep transition's memory travels with its particle
        (x0_hat, eps_hat, *kept), plan = self.exchange([state.x0_hat, state.eps_hat,
                                                        *(state.history[k] for k in keys)], ancestors)
        x = state.x[torch.where(plan.received, 0, plan.source).to(state.x.device)]
        if bool(plan.received.any()):
            rebuilt = math.sqrt(alpha_bar) * x0_hat + math.sqrt(1 - alpha_bar) * eps_hat
            received = plan.received.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
            x = torch.where(received, rebuilt, x)
        idx = ancestors.long()
        scalars = {name: _take(getattr(state, name), idx) for name in SCALAR_FIELDS}
        return ParticleState(x=x, x0_hat=x0_hat, eps_hat=eps_hat, **scalars,
                             aux={k: _take(v, idx) for k, v in state.aux.items()}, scalars=dict(state.scalars),
                             history=dict(zip(keys, kept)))

    # --- faults ------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"fvdiffusion/run{self.run_id}/{name}"

    def poll(self) -> None:
        """Raise the failure another rank published, if any (one store read, at most every STORE_POLL_S)."""
        if self.store is None:
            return
        now = time.monotonic()
        if now - self._last_store_poll < STORE_POLL_S:
            return
        self._last_store_poll = now
        try:
            published = self.store.check([self._key("error")])
        except Exception as exc:  # the store lives in rank 0's process: it is gone
            raise ShardFailedError(f"rank {self.rank} of {self.world} lost the process group {self.where} "
                                   f"(another rank exited): {exception_line(exc)}") from exc
        if published:
            message = self.store.get(self._key("error")).decode()
            self._acknowledge()
            raise ShardFailedError(message)

    def _acknowledge(self) -> None:
        """Count this rank as having seen the failure; rank 0 (the store's host) waits for all of them."""
        try:
            self.store.add(self._key("seen"), 1)
            deadline = time.monotonic() + FAILURE_ACK_S
            while self.rank == 0 and self.store.add(self._key("seen"), 0) < self.world and time.monotonic() < deadline:
                time.sleep(STORE_POLL_S)
        except Exception:
            pass

    def _wait(self, work: Any, what: str) -> None:
        started = time.monotonic()
        deadline = started + self.timeout_s
        while not work.is_completed():
            self.poll()
            now = time.monotonic()
            if now > deadline:
                raise ShardFailedError(f"rank {self.rank} of {self.world}: {what} {self.where} did not complete "
                                       f"within {self.timeout_s:g} s (a rank died or hangs)")
            if now - started > SPIN_S:  # a fast collective (tens of µs on a GPU) is not slowed by a sleep
                time.sleep(POLL_S)
        try:
            work.wait()
        except Exception as exc:
            self.poll()  # a published failure explains more than the transport's error
            if "timed out" in str(exc).lower():  # the transport's own timer (the same timeout) fired first
                raise ShardFailedError(f"rank {self.rank} of {self.world}: {what} {self.where} did not complete "
                                       f"within {self.timeout_s:g} s (a rank died or hangs)") from exc
            raise ShardFailedError(f"rank {self.rank} of {self.world}: {what} {self.where} failed: "
                                   f"{exception_line(exc)}") from exc

    def fail(self, exc: BaseException) -> ShardFailedError:
        """The one error every rank raises for a fault of this rank: published first, then returned."""
        if isinstance(exc, ShardFailedError):
            return exc
        message = f"rank {self.rank} of {self.world} failed {self.where}: {exception_line(exc)}"
        if self.store is None:
            return ShardFailedError(message)
        try:  # the first rank to publish wins: a fault every rank hits is reported once
            self.store.compare_set(self._key("error"), "", message)
            message = self.store.get(self._key("error")).decode()
        except Exception:
            return ShardFailedError(message)
        self._acknowledge()
        return ShardFailedError(message)


def default_chunk(n: int) -> int:
    """The noise chunk when none is set: 16 chunks (so up to 16 processes), at most 256 slots each.

    A micro-batch never crosses a chunk, so small chunks mean small model calls: one-row
    calls made the MNIST UNet 1.7x slower per row than 64-row ones on the CPU, 4-row calls
    1.13x, 16-row calls 1.05x. Set ``noise_chunk`` for more processes than 16.

    It depends on N only, so the same run on any number of processes draws the same noise.
    """
    return max(1, min(256, n // 16))


def shard_for(n: int, chunk: int, device: torch.device, timeout_s: float | None = None) -> Shard | None:
    """The shard of this process when a process group is initialised, else None."""
    global _runs
    group = process_group()
    if group is None:
        return None
    rank, world = group
    if n < world:
        raise ConfigError(f"invalid n_particles={n}: a population over {world} processes needs at least one "
                          f"particle per process")
    if -(-n // chunk) < world:
        raise ConfigError(f"invalid noise_chunk={chunk}: {n} particles make {-(-n // chunk)} chunk(s), fewer than "
                          f"the {world} processes (each holds whole chunks); use noise_chunk <= {n // world}")
    backend = str(torch.distributed.get_backend())
    if backend == "nccl":
        if device.type != "cuda":
            raise ConfigError(f"the process group uses NCCL but the population is on {device}: put the "
                              f"denoiser on this rank's GPU, or use the gloo backend on the CPU")
        comm_device = device
    else:
        comm_device = torch.device("cpu")
    _runs += 1
    return Shard(rank=rank, world=world, n=n, chunk=chunk, device=device, comm_device=comm_device,
                 timeout_s=collective_timeout() if timeout_s is None else timeout_s, run_id=_runs,
                 store=_default_store())


def collective_timeout() -> float:
    """Seconds one collective may wait: FVD_COLLECTIVE_TIMEOUT from the environment, else the default."""
    raw = os.environ.get("FVD_COLLECTIVE_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"invalid FVD_COLLECTIVE_TIMEOUT={raw!r}: expected a positive number of seconds")
    return value


def agree_call(fields: dict[str, Any], caller: str, device: torch.device) -> None:
    """The call check of :meth:`Shard.agree` before any population exists (``align()`` checks its own
    arguments, generator state included, before it draws anything); a no-op without a process group."""
    group = process_group()
    if group is None:
        return
    rank, world = group
    comm_device = device if str(torch.distributed.get_backend()) == "nccl" else torch.device("cpu")
    checker = Shard(rank=rank, world=world, n=world, chunk=1, device=device, comm_device=comm_device,
                    timeout_s=collective_timeout(), where="before the first step")
    checker.agree(fields, caller)


def _digest(value: Any) -> int:
    """A 32-bit digest of a call argument: a tensor by its dtype, shape and bytes, anything else by its repr."""
    if isinstance(value, Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool and flat.numel() else flat.to(torch.uint8)
        return zlib.crc32(bytes(raw.numpy()), zlib.crc32(f"{value.dtype} {tuple(value.shape)}".encode()))
    if isinstance(value, (list, tuple)):
        return zlib.crc32(repr([_digest(v) for v in value]).encode())
    if isinstance(value, dict):
        return zlib.crc32(repr([(k, _digest(v)) for k, v in value.items()]).encode())
    text = repr(value)
    if " at 0x" in text:  # an object's default repr holds its address, which differs between processes
        text = type(value).__qualname__
    return zlib.crc32(text.encode())


def leave_group(grace_s: float = LEAVE_GRACE_S) -> None:
    """Count this rank out of the group before its process ends; rank 0, which hosts the store,
    waits (at most ``grace_s``) for the others first.

    Ctrl-C reaches every rank at nearly the same moment: had rank 0 gone first, a peer still
    reading the store for a published failure would log c10d's native stack to the terminal.
    """
    group = process_group()
    store = _default_store()
    if group is None or store is None:
        return
    rank, world = group
    key = "fvdiffusion/left"
    try:
        if rank != 0:
            store.add(key, 1)
            return
        deadline = time.monotonic() + grace_s
        while store.add(key, 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(STORE_POLL_S)
    except Exception:  # the store is gone already: nothing to wait for
        pass


def _default_store() -> Any:
    """The key-value store the process group was set up with (None if torch does not expose it)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def _take(values: Tensor, idx: Tensor) -> Tensor:
    return values[idx.to(values.device)]
