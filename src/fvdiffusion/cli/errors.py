"""The one error path of the ``fvd`` command.

Every command is wrapped in :func:`handles_errors`, and every input check below ends in
:func:`fail`: a failure the user can fix is **one line** ``error: ...`` on stderr that names
the flag or the file, exit code 2, and no traceback. The checks run before anything is
loaded or computed (``--device``, ``--threads``, ``--out``, sizes, non-finite numbers);
what only the library can see (a corrupt file, a bad config value, a reward that raises)
arrives as a typed exception and is turned into the same one line at the boundary.

Set ``FVD_DEBUG=1`` to get the traceback of a reported error instead.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import typer

from fvdiffusion.errors import (
    CliError, MissingExtraError, RewardError, RewardUnavailableError, ShardFailedError, UnsupportedPipelineError,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> NoReturn:
    """Report ``message`` as the one line ``error: ...`` and exit 2."""
    raise CliError(message)


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _print_error(message: str) -> None:
    typer.secho(f"error: {one_line(message)}", err=True, fg=typer.colors.RED)


# --- the exceptions that are the user's to fix ------------------------------------------------

# The library's error types (all in the torch-free leaf fvdiffusion.errors) that are not
# ValueError or OSError; those are expected failures already: ConfigError, WeightsError,
# CheckpointError, DenoiserError, RunnerError, CorruptRecordsError, ...
_LIBRARY_ERRORS: tuple[type[Exception], ...] = (
    RewardError,                # RuntimeError: a reward raised
    UnsupportedPipelineError,   # TypeError: a pipeline align() cannot drive
    MissingExtraError,          # ImportError: names the extra to install
    RewardUnavailableError,     # NotImplementedError: a removed reward, names what to use instead
    ShardFailedError,           # RuntimeError: a rank of a population over processes failed (one line)
)

# Third-party error types, looked up only in modules that are already imported: an exception
# cannot come from a module that was never loaded, and the error boundary imports none of them.
_THIRD_PARTY_ERRORS: tuple[tuple[str, str], ...] = (
    ("safetensors", "SafetensorError"),   # a bare Exception
)


def _library_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = list(_LIBRARY_ERRORS)
    for module, name in _THIRD_PARTY_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return tuple(found)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom, type) and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def describe(exc: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    message = _message(exc)
    return None if message is None else one_line(message)


def _message(exc: BaseException) -> str | None:
    if isinstance(exc, CliError):
        return str(exc)
    if _is_out_of_memory(exc):
        first = one_line(str(exc))[:300]
        return f"out of memory ({first}); lower --particles or set a smaller --batch-size"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc) or type(exc).__name__
    if isinstance(exc, (ValueError, *_library_errors())):
        text = one_line(str(exc))
        if type(exc).__module__.startswith("safetensors"):
            return f"corrupt safetensors file: {text}"
        return text or type(exc).__name__
    return None


def handles_errors(command: F) -> F:
    """Decorate a command: expected failures become ``error: ...`` (exit 2), never a traceback.

    KeyboardInterrupt (Ctrl-C, or SIGTERM where a command maps it) ends with one line and
    exit 130; a training run that stopped at a step boundary says how to resume. In a process
    group (torchrun), Ctrl-C reaches every rank: rank 0 alone prints the line, and an error that
    an interrupt caused (a peer gone mid-collective) is read as the interrupt.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            _interrupted_line(exc)
            _leave(EXIT_INTERRUPTED)
        except Exception as exc:
            interrupt = _interrupt_in_chain(exc)
            if interrupt is not None:
                _interrupted_line(interrupt)
                _leave(EXIT_INTERRUPTED)
            message = describe(exc)
            if message is None or os.environ.get("FVD_DEBUG"):
                raise
            _print_error(message)
            _leave(EXIT_USAGE)

    wrapper.__fvd_handles_errors__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _leave(code: int) -> NoReturn:
    """End a failed or interrupted command with ``code``.

    A process still in a process group (torchrun) ends at once, skipping interpreter teardown:
    stopped mid-collective, gloo's threads still wait on the peers, and destroying the group
    then makes C++ call std::terminate ("terminate called without an active exception", exit
    -6 instead of ``code``). Rank 0 hosts the store, so it leaves last. Everything this command
    wrote is closed by now; stdio is flushed.
    """
    if _in_process_group():
        from fvdiffusion.distributed import leave_group

        leave_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code) from None


def _in_process_group() -> bool:
    distributed = sys.modules.get("torch.distributed")  # never import torch just to ask
    try:
        return bool(distributed is not None and distributed.is_available() and distributed.is_initialized())
    except Exception:
        return False


def _interrupt_in_chain(exc: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _interrupted_line(exc: KeyboardInterrupt) -> None:
    if _environment_rank() == 0:
        typer.secho(f"interrupted: {one_line(str(exc)) or 'stopped by the user'}", err=True)


def _environment_rank() -> int:
    """This process's rank under torchrun (RANK with WORLD_SIZE > 1), else 0; unreadable: 0 (speak)."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# --- input checks, run before anything is loaded -----------------------------------------------

def check_device(device: str, flag: str = "--device", allow_auto: bool = False) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` that this machine has (``auto`` if allowed); returns it."""
    import torch

    if allow_auto and device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        fail(f"{flag} {device}: unknown device (use cpu, cuda, cuda:N or mps" + (", or auto)" if allow_auto else ")"))
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"{flag} {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            fail(f"{flag} {device}: MPS is not available on this machine")
        return device
    fail(f"{flag} {device}: not a device to compute on (use cpu, cuda, cuda:N or mps)")


# Every command sets torch's CPU threads explicitly: one per process unless --threads says
# otherwise. torch's own choice (one per core) made one MNIST UNet call 6-26x slower than a
# single thread on a loaded 2-core machine, and the networks and populations here are small
# enough that extra intra-op threads rarely pay for their synchronisation.
DEFAULT_THREADS = 1
THREADS_HELP = ("torch CPU threads per process, an integer >= 1 (default 1: torch's own choice, one per core, "
                "can be many times slower on a shared or busy CPU; raise it on an idle many-core machine).")


def threads_option(help: str = THREADS_HELP) -> Any:
    """The ``--threads`` option of every command: an integer >= 1, default :data:`DEFAULT_THREADS`."""
    return typer.Option(DEFAULT_THREADS, "--threads", help=help)


THREADS_PER_CORE = 4  # more threads than this per usable core only adds contention


def max_threads() -> tuple[int, int]:
    """(the most --threads accepted, the CPU cores this process may run on)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return THREADS_PER_CORE * max(1, cores), max(1, cores)


def set_threads(threads: int = DEFAULT_THREADS, flag: str = "--threads") -> None:
    """Validate ``--threads`` (an integer from 1 to :func:`max_threads`) and set torch's CPU threads to it."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        fail(f"{flag} must be an integer >= 1, got {threads}")
    limit, cores = max_threads()
    if threads > limit:  # OpenMP creating 100000 threads ends the process with a segmentation fault
        fail(f"{flag} must be at most {limit} ({THREADS_PER_CORE} x the {cores} CPU core(s) this process may use), "
             f"got {threads}")
    import torch

    torch.set_num_threads(threads)


def check_out(path: Path, flag: str = "--out", kind: str = "dir") -> Path:
    """Fail now, before any compute, if ``path`` could not be written later.

    ``kind="dir"``: a directory that exists or can be created and written into.
    ``kind="file"``: a file whose directory exists or can be created, and that is not a directory.
    Nothing is created here.
    """
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        fail(f"{flag} {path}: exists and is not a directory")
    if kind == "file" and path.is_dir():
        fail(f"{flag} {path}: is a directory, expected a file name")
    # the nearest existing ancestor must be a writable directory (mkdir fails under a file)
    probe = path if (kind == "dir" and path.exists()) else path.parent
    probe = probe if str(probe) else Path(".")
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            fail(f"{flag} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{flag} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: {probe} is not writable")
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        fail(f"{flag} {path}: the file is not writable")
    return path


def check_finite(flag: str, value: float | None, allow_inf: bool = False) -> None:
    """A float flag must be a number (never NaN), and finite unless ``allow_inf``."""
    if value is None:
        return
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        fail(f"{flag} must be a finite number, got {value}")


def check_range(flag: str, value: int | None, low: int, high: int | None = None, why: str = "") -> None:
    """An integer flag in [low, high]."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        fail(f"{flag} must be {bound}, got {value}" + (f" ({why})" if why else ""))


def available_memory(device: str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable and the cgroup limit)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            limits.append(max(int(raw) - used, 0))
    except (OSError, ValueError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return sys.maxsize
    return min(limits)


def check_fits(flag: str, count: int, bytes_each: int, device: str = "cpu", what: str = "particle") -> None:
    """Refuse a size whose working set (``count`` x a conservative ``bytes_each``) exceeds free memory."""
    need = count * bytes_each
    have = available_memory(device)
    if need > have:
        fail(f"{flag} {count}: needs about {_human(need)} ({_human(bytes_each)} per {what}), "
             f"more than the {_human(have)} free on {device}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("fvdiffusion")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            text = "unknown"
        typer.echo(f"fvd (fvdiffusion) {text}")
        raise typer.Exit(0)
