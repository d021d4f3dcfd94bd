"""Training checkpoints: one safetensors file plus a readable JSON mirror, no pickle.

``checkpoint.safetensors`` holds every tensor (model, EMA, optimizer moments, RNG state)
under a prefix and the run metadata as JSON in its header; ``checkpoint.json`` repeats the
metadata for people. Only the latest checkpoint is kept (a run directory stays small), and
it is written to a temporary file, fsynced and replaced atomically, so an interrupted save
never leaves a broken file. A file that is broken anyway (disk damage, a copy cut short)
loads as a one-line :class:`CheckpointError` naming it. ``train_log.jsonl`` is a durable
record file (:mod:`fvdiffusion.durable`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from fvdiffusion.durable import RecordLog, read_records, write_atomically
from fvdiffusion.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    meta: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer_state: dict[int, dict[str, Tensor]]
    rng_state: Tensor


def save_checkpoint(
    run_dir: Path,
    step: int,
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: nn.Module | None = None,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    tensors.update(_prefixed("model.", model.state_dict()))
    if ema is not None:
        tensors.update(_prefixed("ema.", ema.state_dict()))
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    tensors["rng.state"] = generator.get_state()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    full_meta = {**meta, "step": step}
    path = run_dir / CHECKPOINT_FILE
    # in memory first, then the one atomic writer: a full disk names the file and leaves the last
    # good checkpoint in place (no partial .tmp)
    write_atomically(path, save(tensors, metadata={"meta": json.dumps(full_meta)}))
    write_atomically(run_dir / META_FILE, (json.dumps(full_meta, indent=2) + "\n").encode("utf-8"))
    return path


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_FILE).is_file()


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # SafetensorError, a bad JSON header, a short read ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail}); "
                              "delete it to start over, or restore it from a backup") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{path}: checkpoint header has no valid step (not written by fvd train?)")
    if "rng.state" not in tensors:
        raise CheckpointError(f"{path}: checkpoint has no generator state (not written by fvd train?)")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or inf values (a corrupt or diverged checkpoint)")
    optimizer_state: dict[int, dict[str, Tensor]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
    except ValueError:
        raise CheckpointError(f"{path}: bad optimizer tensor name {key!r} (not written by fvd train?)") from None
    ema = _unprefixed("ema.", tensors)
    return Checkpoint(
        step=int(meta["step"]),
        meta=meta,
        model=_unprefixed("model.", tensors),
        ema=ema or None,
        optimizer_state=optimizer_state,
        rng_state=tensors["rng.state"],
    )


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Tensor]]) -> None:
    """Load saved moments; hyper-parameters stay those of the (re-built) optimizer."""
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def open_log(run_dir: Path) -> RecordLog:
    """``train_log.jsonl``: one durable JSON line per logging window, keyed by step."""
    return RecordLog(run_dir / LOG_FILE, ("step",))


class LossWindow:
    """Mean training loss over one logging window, kept on the device: one sync per window.

    The per-step losses of the window are kept too (as device tensors), so a non-finite loss
    is traced back to the step that produced it when the window is closed.
    """

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)
        self.count = 0
        self._losses: list[Tensor] = []

    def add(self, loss: Tensor) -> None:
        self.total += loss.detach()
        self.count += 1
        self._losses.append(loss.detach())

    def first_non_finite(self, step: int) -> int | None:
        """The step (``step`` being the last one added) of the first non-finite loss, or None."""
        if bool(torch.isfinite(self.total)):
            return None
        bad = (~torch.isfinite(torch.stack(self._losses))).nonzero()
        return step - len(self._losses) + 1 + int(bad[0]) if len(bad) else step

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of an open window (a resumed run logs the same means)."""
        return {"total": self.total.item(), "count": self.count}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.total.fill_(float(state["total"]))
            self.count = int(state["count"])

    def report(self, log: RecordLog, bar: Any, step: int, elapsed_s: float) -> float:
        """Close the window: show the mean on the progress bar, append it to the log, return it."""
        mean = self.total.item() / self.count
        self.total.zero_()
        self.count = 0
        self._losses.clear()
        bar.set_postfix(loss=f"{mean:.4f}")
        log.append({"step": step, "loss": round(mean, 6), "elapsed_s": round(elapsed_s, 1)})
        return mean


def last_logged_loss(run_dir: Path) -> float | None:
    """The loss of the last logging window in ``train_log.jsonl`` (None if there is none)."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        return None
    rows, _ = read_records(path)
    return rows[-1].get("loss") if rows else None


def device_label(dev: torch.device) -> str:
    """What the model card reports as the training hardware."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
