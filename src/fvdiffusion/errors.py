"""Every exception and warning the library raises on purpose, in one leaf module.

It imports nothing but the standard library (never torch), so that the ``fvd`` command's
error boundary (:mod:`fvdiffusion.cli.errors`) and ``fvd --help`` can name these classes
without loading the numerical stack. The modules that raise them import them from here;
some also re-export them where public code names them there (e.g.
``fvdiffusion.integrations.diffusers.UnsupportedPipelineError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def exception_line(exc: BaseException) -> str:
    """``Type: message`` on one line (the first line of the message, " ..." if there were more)."""
    lines = str(exc).strip().splitlines()
    more = " ..." if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0] if lines else ''}{more}"


# --- the engine: configs, denoisers, rewards ----------------------------------------------------

class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the value."""


class RewardError(RuntimeError):
    """The reward raised or returned something the engine cannot use."""


class DenoiserError(ValueError):
    """The denoiser raised, returned the wrong shape, or returned NaN/inf; the message names the step."""


class ShardFailedError(RuntimeError):
    """A rank of a population spread over processes failed; every rank raises the same one line
    (the failing rank, the step, the error), or a collective timed out."""


class NonFiniteRewardWarning(RuntimeWarning):
    """Some rewards of a run were NaN/±inf; those particles got zero weight. Issued once per run."""


class AllParticlesDeadWarning(NonFiniteRewardWarning):
    """At one or more steps every particle had potential −inf; weights were reset to uniform there."""


class NonFiniteDenoiserWarning(RuntimeWarning):
    """With nonfinite_denoiser="kill", some denoiser outputs were NaN/±inf and those particles were
    killed (reborn as copies of survivors). Issued once per run, with the counts."""


# --- optional extras and model rewards (rewards.model_rewards) ----------------------------------

class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


class MissingWeightsError(OSError):
    """Model weights are neither on disk nor downloadable from here."""


class HubUnreachableError(MissingWeightsError):
    """A hub id is not in the local Hugging Face cache and the hub may not be contacted (HF_HUB_OFFLINE,
    no network, or download=False); raised before any request. The message names the argument to pass
    a local path to."""


class RewardUnavailableError(NotImplementedError):
    """A reward this library no longer provides; the message says why and what to use instead."""


class ConversionError(ValueError):
    """``fvd convert`` refused a file: not a plain state dict of tensors (e.g. a pickle that would run
    code), or not the model's keys and shapes. The message names the file."""


# --- integrations.diffusers ------------------------------------------------------------------

class UnsupportedPipelineError(TypeError):
    """The pipeline is not one align() can drive (no UNet / VP scheduler, or an unknown layout)."""


class SchedulerReplacedWarning(UserWarning):
    """align() took the pipeline's scheduler's timesteps but not its stepping (the engine steps with
    DDIM(η)): the scheduler is not DDIM/DDPM, or uses x̂0 clipping / thresholding the engine does not
    apply. Names the scheduler and why; issued once per align() call."""


class DuplicateImagesWarning(UserWarning):
    """Some images align() returned are exact copies of another (selection cloned particles and nothing
    made the copies differ); ``AlignResult.duplicates`` counts them. Issued once per align() call."""


class UnverifiedWeightsWarning(UserWarning):
    """A weights file loaded without a model card recording its SHA-256: only the structural checks ran."""


class CallbackChangesIgnoredWarning(UserWarning):
    """A ``callback_on_step_end`` returned (or made in place) changes to the latents: align() does not
    apply them, since the engine selects the population itself. Issued once per align() call."""


# --- shipped weights and data (zoo) ----------------------------------------------------------

class WeightsMissingError(FileNotFoundError):
    """A zoo weights file does not exist."""


class WeightsError(ValueError):
    """A zoo weights file exists but cannot be used (corrupted, hash mismatch, wrong kind, config, keys, shapes
    or values)."""


class DataMissingError(FileNotFoundError):
    """The MNIST source files are not where the loader looks for them."""


class DataCorruptError(ValueError):
    """The MNIST source files are present but do not hold what they should."""


# --- durable results files and training (durable, train) -------------------------------------

class CorruptRecordsError(ValueError):
    """A record file holds an invalid line that is not a torn last line (message names file and line)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, corrupt, or not written by fvd train)."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or inf (the message names the step)."""


class GroupJoinError(ConfigError):
    """The process group torchrun's variables describe could not be joined (a peer missing, a wrong address)."""


class LaunchTerminated(KeyboardInterrupt):
    """SIGTERM reached a launcher waiting for its workers: they are ended as on Ctrl-C."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at a step boundary, after writing a checkpoint there."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: stopped at step {step} and wrote {checkpoint}; "
                         "run the same command with --resume to continue")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


# --- the text-to-image runner (bench.t2i) ----------------------------------------------------

class RunnerError(ValueError):
    """A user mistake in the runner's input; reported as one line, no traceback."""


class PromptFileError(RunnerError):
    """The prompt file cannot be read as prompts (encoding, CSV quoting); the message names the file."""


class RunFileError(RunnerError):
    """A file of an earlier run in OUT (run.json, metrics.jsonl) is corrupt; the message names the file."""


# --- the fvd command (cli) -------------------------------------------------------------------

class CliError(Exception):
    """A user error found by the CLI itself; the message is the line after ``error:``."""


class OptionError(ValueError):
    """An ``--option`` that cannot be used; the message names the key."""
