"""Run-time checks on device tensors, made at once or at the end of the run.

Reading a CUDA tensor on the host (``bool(t)``, ``float(t)``, ``.cpu()``) waits for the
device to finish everything queued. A check inside the step loop would stall the GPU once
per step, so on an accelerator the engine *defers* its checks: each one is queued as a
0-dim flag, and :meth:`HostChecks.resolve` reads them all in one transfer after the loop,
raising the first failure in the order the checks were made (its message still names the
step where it happened). On the CPU reading is free and checks are made at once (eager).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

_FORCED_MODE: list[bool] = []  # a stack of eager flags set by force_eager(); empty = by device


@contextlib.contextmanager
def force_eager(eager: bool) -> Iterator[None]:
    """Within the block every run checks eagerly (True) or defers its checks (False), whatever its device.

    For tests and profiling: ``force_eager(False)`` on the CPU runs the accelerator's code path.
    """
    _FORCED_MODE.append(eager)
    try:
        yield
    finally:
        _FORCED_MODE.pop()


def eager_for(device: torch.device) -> bool:
    """Whether a run on ``device`` checks at once: on the CPU yes, on accelerators no (unless forced)."""
    if _FORCED_MODE:
        return _FORCED_MODE[-1]
    return device.type == "cpu"


@dataclass
class HostChecks:
    """A queue of failure flags with the errors they stand for."""

    eager: bool
    _pending: list[tuple[Tensor, Callable[[], Exception]]] = field(default_factory=list)

    def require(self, failed: Tensor, error: Callable[[], Exception]) -> None:
        """Raise ``error()`` if the 0-dim bool ``failed`` is True: now (eager) or at :meth:`resolve`."""
        if self.eager:
            if bool(failed):
                raise error()
        else:
            self._pending.append((failed.reshape(()), error))

    def resolve(self) -> None:
        """Read every queued flag in one transfer and raise the first failure, if any."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([flag.to(pending[0][0].device) for flag, _ in pending]).cpu().tolist()
        for flag, (_, error) in zip(flags, pending):
            if flag:
                raise error()
