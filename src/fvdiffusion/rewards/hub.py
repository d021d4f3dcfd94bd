"""Local-path-first loading of pretrained reward components (CLIP models, tokenizers, processors).

Every model reward takes either a **local path** or a **Hugging Face hub id** for each
component it loads, and :func:`load_pretrained` resolves it the same way for all of them:

1. An existing file or directory is used as it is (``local_files_only=True``, under
   huggingface_hub's offline mode: never a hub request). A :class:`~pathlib.Path`, or a
   string that can only be a path (``/…``, ``./…``, ``~/…``, more than one ``/``), that does
   not exist is an error naming that path.
2. A hub id (``name`` or ``org/name``) already in the local Hugging Face cache is loaded from
   the cache the same way, with no request either.
3. Otherwise the hub is contacted only when that is allowed: not with ``download=False``, not
   under ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``), and not when a TCP connection
   to the hub (or the configured HTTPS proxy) cannot be opened within
   :data:`PROBE_TIMEOUT_S`. In those cases :class:`HubUnreachableError` is raised at once:
   one line naming the argument to pass a local directory to. huggingface_hub's own
   retries (about 30 s of back-off per file when there is no network) are never entered.

All failures are :class:`MissingWeightsError` (an ``OSError``) with a one-line message.
huggingface_hub is imported only when a hub id has to be resolved.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from fvdiffusion.errors import HubUnreachableError, MissingWeightsError

# How long the reachability probe may take. A host whose name does not resolve fails at once;
# one that silently drops packets costs this long, once per hub id not found in the cache.
PROBE_TIMEOUT_S = 0.5
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def looks_like_path(text: str) -> bool:
    """A string that cannot be a hub id: absolute, explicitly relative, home-relative, or nested."""
    return (text.startswith(("/", "./", "../", "~", "\\")) or text in (".", "..") or text.count("/") > 1
            or "\\" in text or bool(re.match(r"[A-Za-z]:", text)))


def offline_env() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now (read at each call, not only at import)."""
    if any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_address() -> tuple[str, int]:
    """(host, port) a hub request would connect to first: the HTTPS proxy if one applies, else the endpoint."""
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if parsed.hostname:
            return parsed.hostname, parsed.port or 8080
    return host, port


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or its proxy) opens within ``timeout`` seconds.

    The probe runs in a daemon thread so that a name lookup that hangs (the resolver ignores
    socket timeouts) cannot hold the caller longer than ``timeout``.
    """
    host, port = _hub_address()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, name="fvd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline_reason(download: bool) -> str | None:
    """Why the hub may not be contacted now, or None when it may."""
    if not download:
        return "download=False"
    if offline_env():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        host, port = _hub_address()
        return f"no network: {host}:{port} cannot be reached"
    return None


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode, forced for the duration: every hub request it would make raises
    instead. Loads with ``local_files_only=True`` run under it, because transformers does not pass that
    flag everywhere (5.x's tokenizer loader asks the hub for a model's tags even then)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds anything of ``repo_id`` (no request; the cache's
    ``models--org--name`` layout, read without importing huggingface_hub's download code)."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))).is_dir()


def _unreachable(who: str, arg: str, repo_id: str, what: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"{who}: {arg}={repo_id!r} is a hub id that is not in the local Hugging Face cache, and the hub may not "
        f"be contacted ({reason}); pass {arg}= a local directory holding the {what} instead "
        f"(fetch it where there is network, e.g. `hf download {repo_id} --local-dir DIR`)"
    )


def preflight(source: str | os.PathLike[str], *, who: str, arg: str, what: str, download: bool = True) -> None:
    """Raise now, before transformers is even imported, what :func:`load_pretrained` would raise before
    any request: a missing local path, or a hub id not in the cache while the hub may not be contacted.
    (Importing transformers is most of the time an offline failure would otherwise take.)"""
    where = locate(source, who=who, arg=arg)
    if isinstance(where, str) and not _in_hub_cache(where):
        reason = offline_reason(download)
        if reason is not None:
            raise _unreachable(who, arg, where, what, reason)


def locate(source: str | os.PathLike[str], *, who: str, arg: str) -> Path | str:
    """An existing local path (as a Path), or a hub id (as a str); a missing path is an error naming it."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(source, os.PathLike) or looks_like_path(text) or not _HUB_ID.fullmatch(text):
        raise MissingWeightsError(f"{who}: {arg}={text!r}: no such file or directory "
                                  f"(pass {arg}= an existing local path, or a hub id such as 'org/name')")
    return text


def load_pretrained(
    load: Callable[..., Any],
    source: str | os.PathLike[str],
    *,
    who: str,
    arg: str,
    what: str,
    revision: str | None = None,
    download: bool = True,
) -> Any:
    """``load(name, **kwargs)`` (a ``from_pretrained``) from a local path first, the hub only if allowed.

    ``who`` and ``arg`` name the caller and its argument in errors (``CLIPScore``, ``model``);
    ``what`` says what was being loaded. ``revision`` pins a hub id (ignored for a local path).
    """
    where = locate(source, who=who, arg=arg)
    if isinstance(where, Path):
        try:
            with hub_offline():
                return load(str(where), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"{who}: {arg}={str(where)!r}: could not load the {what} from it "
                                      f"(safetensors weights only): {first_line(exc)}") from exc
    kwargs: dict[str, Any] = {} if revision is None else {"revision": revision}
    if _in_hub_cache(where):
        try:
            with hub_offline():
                return load(where, local_files_only=True, **kwargs)
        except OSError:
            pass  # partly cached, or another revision: the hub may still have it
    reason = offline_reason(download)
    if reason is not None:
        raise _unreachable(who, arg, where, what, reason)
    try:
        return load(where, **kwargs)
    except OSError as exc:
        raise MissingWeightsError(f"{who}: {arg}={where!r}: could not load the {what} from the hub "
                                  f"(safetensors weights only): {first_line(exc)}") from exc
