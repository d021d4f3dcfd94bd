"""The one resumable training loop every recipe runs (DDPM, classifiers, feature net).

A recipe builds its model, optimizer and generator, then hands :class:`ResumableRun` a
``train_step(step) -> loss`` (one optimisation step: draws, forward, backward, update) and a
learning-rate schedule. The run owns everything that makes a resumed run continue
bit-for-bit like an uninterrupted one:

* **Checkpoints only at step boundaries.** SIGINT (Ctrl-C) and SIGTERM only set a flag; the
  loop notices it before the next step, writes a checkpoint, and raises
  :class:`TrainingInterrupted`. A second signal aborts at once without a checkpoint (the
  one on disk is the last step-boundary one, written atomically).
* **The training log follows the checkpoint.** ``train_log.jsonl`` is a durable record file
  (:mod:`fvdiffusion.durable`); on resume, windows logged after the checkpoint's step are
  dropped, and the open window's running sum is restored from the checkpoint, so the log of
  a resumed run equals that of an uninterrupted one.
* **A non-finite loss stops the run** with :class:`TrainingDiverged` naming the step; no
  checkpoint or log line is written from a diverged state.

It also holds the small validators the recipe configs share.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fvdiffusion.errors import CheckpointError, TrainingDiverged, TrainingInterrupted
from fvdiffusion.train.checkpoint import (
    LossWindow, device_label, has_checkpoint, load_checkpoint, open_log, restore_optimizer,
    save_checkpoint,
)


# --- config validation shared by the recipe configs ----------------------------------------

def check_int(owner: str, name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    """``value`` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        if high is None and low == 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{owner}.{name} must be an int {bound}, got {value!r}")


def check_float(owner: str, name: str, value: Any, low: float, *, strict: bool = False,
                below: float | None = None) -> None:
    """``value`` is a finite real number, > ``low`` (``strict``) or >= ``low``, and < ``below``."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if strict else value >= low) and (below is None or value < below))
    if not ok:
        rel = ">" if strict else ">="
        bound = f"{rel} {low}" + (f" and < {below}" if below is not None else "")
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


SEED_MAX = 2**63 - 1


# --- signals -----------------------------------------------------------------------------

class _StopOnSignal:
    """While active, the first SIGINT/SIGTERM only records its name; a second one aborts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a checkpoint")
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# --- the run -----------------------------------------------------------------------------

class ResumableRun:
    """One training run in ``run_dir``: start or resume, loop, checkpoint.

    ``meta`` must hold the run's ``kind``; a resumed checkpoint must have the same kind and
    pass ``check(saved_meta)`` (the recipe's own compatibility test, raising ValueError).
    """

    def __init__(self, run_dir: Path, device: torch.device, meta: dict[str, Any], model: nn.Module,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, ema: nn.Module | None = None,
                 progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.device = device
        self.meta = dict(meta)
        self.model, self.optimizer, self.generator, self.ema = model, optimizer, generator, ema
        self.progress = progress
        self.step = 0
        self.last_loss: float | None = None
        self.window = LossWindow(device)
        self._elapsed_before = 0.0
        self._start = time.monotonic()
        self.log = None

    @property
    def elapsed_s(self) -> float:
        return self._elapsed_before + time.monotonic() - self._start

    def start(self, resume: bool, check: Callable[[dict[str, Any]], None] | None = None,
              command: str | None = None) -> None:
        """Load the checkpoint when resuming (refuse to overwrite one otherwise); open the log."""
        if not resume and has_checkpoint(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a checkpoint: pass --resume to continue it, "
                             "or choose another --out")
        if resume and has_checkpoint(self.run_dir):
            ckpt = load_checkpoint(self.run_dir)
            if ckpt.meta.get("kind") != self.meta["kind"]:
                raise ValueError(f"resume: {self.run_dir} holds a {ckpt.meta.get('kind')!r} checkpoint, "
                                 f"not a {self.meta['kind']!r} one")
            if check is not None:
                check(ckpt.meta)
            path = self.run_dir / "checkpoint.safetensors"
            try:
                self.model.load_state_dict(ckpt.model)
                if self.ema is not None:
                    if ckpt.ema is None:
                        raise RuntimeError("no EMA weights")
                    self.ema.load_state_dict(ckpt.ema)
                restore_optimizer(self.optimizer, ckpt.optimizer_state)
                self.generator.set_state(ckpt.rng_state)
            except (RuntimeError, KeyError, ValueError) as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path}: does not fit this run's model ({detail})") from None
            self.step = ckpt.step
            self._elapsed_before = float(ckpt.meta.get("elapsed_s", 0.0))
            self.last_loss = ckpt.meta.get("loss")
            self.window.restore(ckpt.meta.get("loss_window"))
            if ckpt.meta.get("command"):
                self.meta["command"] = ckpt.meta["command"]
        if command:
            self.meta["command"] = command
        self.log = open_log(self.run_dir)
        # windows logged after the checkpoint's step are redone by this run: drop them now
        self.log.keep_where(lambda row: isinstance(row.get("step"), int) and row["step"] <= self.step)
        self._start = time.monotonic()

    def checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint for the current step (only ever called at a step boundary)."""
        self._check_finite()
        info = {**self.meta, "elapsed_s": round(self.elapsed_s, 1), "device": device_label(self.device),
                "loss": self.last_loss, "loss_window": self.window.state(), **(extra or {})}
        return save_checkpoint(self.run_dir, self.step, info, self.model, self.optimizer, self.generator,
                               ema=self.ema)

    def run(self, total_steps: int, train_step: Callable[[int], Tensor], lr_at: Callable[[int], float], *,
            log_every: int, checkpoint_every: int, desc: str, max_minutes: float | None = None) -> None:
        """Step until ``total_steps`` (or ``max_minutes``); checkpoint every ``checkpoint_every`` steps."""
        if self.log is None:
            raise RuntimeError("ResumableRun.start() must be called before run()")
        bar = tqdm(total=total_steps, initial=self.step, desc=desc, disable=not self.progress, dynamic_ncols=True)
        loop_start = time.monotonic()
        self.model.train()
        try:
            with _StopOnSignal() as stop:
                while self.step < total_steps:
                    if stop.signal is not None:
                        break
                    if max_minutes is not None and time.monotonic() - loop_start > 60 * max_minutes:
                        break
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr_at(self.step)
                    loss = train_step(self.step)
                    self.step += 1
                    bar.update(1)
                    self.window.add(loss)
                    if self.step % log_every == 0 or self.step == total_steps:
                        self._check_finite()
                        self.last_loss = self.window.report(self.log, bar, self.step, self.elapsed_s)
                    if self.step % checkpoint_every == 0:
                        self.checkpoint()
                if stop.signal is not None:  # at a step boundary: everything up to self.step is done
                    raise TrainingInterrupted(stop.signal, self.step, self.checkpoint())
        finally:
            bar.close()

    def _check_finite(self) -> None:
        bad = self.window.first_non_finite(self.step)
        if bad is not None:
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(
                f"training loss is not finite at step {bad} (lr {lr:g}); stopped without writing a checkpoint "
                f"past it (the last one in {self.run_dir} is kept)")
