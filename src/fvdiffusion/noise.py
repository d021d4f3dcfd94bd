"""Randomness keyed by particle slots, so that a result does not depend on where a particle lives.

One process draws a run's noise from one generator, in call order (the default, and what every
stored result was made with). A population split over processes cannot: rank r does not know
how many numbers the ranks before it would have drawn. With ``noise_chunk = C`` the slots are cut
into fixed chunks of C; the noise of chunk c at the run's d-th draw comes from a generator seeded
with a hash of (seed, d, c). Any split of the slots over processes then gives the same numbers as
one process with the same C: a rank draws every chunk its block touches and keeps its rows.

Decisions every rank must agree on (the selection's uniforms for all N particles) come from a
generator keyed by (seed, d, SELECTION): each rank draws the same O(N) numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SELECTION = -1              # the chunk key of the population-wide decisions
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(seed: int, draw: int, chunk: int) -> int:
    """A 63-bit generator seed for (seed, draw, chunk); distinct keys give unrelated streams."""
    state = _splitmix64(seed & _MASK64)
    state = _splitmix64(state ^ (draw & _MASK64))
    state = _splitmix64(state ^ (chunk & _MASK64))
    return state >> 1


@dataclass
class ChunkedNoise:
    """The keyed noise of one run, for the slots [lo, hi) of a population of n."""

    seed: int
    chunk: int
    n: int
    lo: int
    hi: int
    device: torch.device
    draws: int = 0  # draws so far: every rank makes the same calls in the same order
    _generator: torch.Generator | None = field(default=None, repr=False)

    def _next_draw(self) -> int:
        self.draws += 1
        return self.draws - 1

    def _seeded(self, draw: int, chunk: int) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(stream_seed(self.seed, draw, chunk))

    def particles(self, tail: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """Gaussian noise of shape [hi − lo, *tail]: the local rows of this draw's population noise."""
        draw = self._next_draw()
        pieces = []
        for c in range(self.lo // self.chunk, -(-self.hi // self.chunk)):
            start, stop = c * self.chunk, min(self.n, (c + 1) * self.chunk)
            block = torch.randn((stop - start, *tail), generator=self._seeded(draw, c), dtype=dtype,
                                device=self.device)
            pieces.append(block[max(self.lo, start) - start : min(self.hi, stop) - start])
        if not pieces:
            return torch.empty((0, *tail), dtype=dtype, device=self.device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def decisions(self) -> torch.Generator:
        """A generator for this draw's population-wide decisions (the same on every rank)."""
        return torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self._next_draw(), SELECTION))
