"""Append-only JSONL record files that survive a crash at any moment.

One implementation for every resumable writer in the project: the benchmark runners
(``fvd toy``, ``fvd suite``, ``fvd bench mnist``, ``fvd t2i``) and the training logs.

* Every record is one JSON object on one line, written with a single ``write`` of the
  whole line, then ``flush`` and ``os.fsync``: once :meth:`RecordLog.append` returns, the
  record is on disk.
* A crash mid-write can only leave a torn *last* line (no trailing newline, or not valid
  JSON). Opening the file cuts that line off the file itself, not only from memory, so the
  next append starts on a clean line and the record it held is recomputed, once.
* An invalid line anywhere else is not a crash artefact: opening the file fails with a
  one-line :class:`CorruptRecordsError` naming the file and the line, and nothing is changed.
* Records are keyed by a fingerprint of their inputs (``key_fields``); a rerun asks
  :meth:`RecordLog.done` before computing a cell. :meth:`RecordLog.keep_only` rewrites the
  file atomically (temporary file, fsync, replace) to drop records whose inputs went stale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from fvdiffusion.errors import CorruptRecordsError
from fvdiffusion.jsonsafe import finite_or_none, strict_json_dumps


def _canonical(value: Any) -> Any:
    """A hashable form of a key value that is the same before and after a JSON round trip."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def fsync_file(path: Path) -> None:
    """Make a file's written bytes durable (before it is renamed into place)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file atomically: temporary file beside it, fsync, replace, fsync the folder.

    A failed write (a full disk, a file-size limit, an interrupt) leaves neither a temporary nor a
    0-byte file, and the error names ``path`` (the OS's own names nothing for a failed write)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise naming(path, exc) from None
        raise
    fsync_dir(path.parent)


def naming(path: Path, exc: OSError) -> OSError:
    """``exc`` with ``path`` as its file name when it has none ("[Errno 28] No space left" names nothing)."""
    if exc.filename is not None and not str(exc.filename).endswith(".tmp"):
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path)) if exc.errno else \
        OSError(f"{path}: {exc}")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the data itself is synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of ``path`` and the byte offset where its valid content ends.

    The offset is smaller than the file size exactly when the last line is torn. Raises
    :class:`CorruptRecordsError` for an invalid line that is not the last one.
    """
    path = Path(path)
    raw = path.read_bytes() if path.exists() else b""
    records: list[dict[str, Any]] = []
    pos, number = 0, 0
    while pos < len(raw):
        number += 1
        newline = raw.find(b"\n", pos)
        if newline < 0:
            return records, pos  # no trailing newline: a torn last line, the content ends before it
        line = raw[pos:newline]
        if line.strip():
            record = _parse(line)
            if record is None:
                if not raw[newline + 1:].strip():
                    return records, pos  # an invalid last line is torn too
                raise CorruptRecordsError(f"{path}: line {number} is not a valid JSON record "
                                          "(only a torn last line is repaired; fix or remove this line)")
            records.append(record)
        pos = newline + 1
    return records, pos


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


class RecordLog:
    """Records keyed by ``key_fields``; a rerun with the same file resumes where it stopped."""

    def __init__(self, path: Path, key_fields: Iterable[str]) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.rows, end = read_records(self.path)
        self.repaired_bytes = 0
        if self.path.exists() and end < self.path.stat().st_size:
            self.repaired_bytes = self.path.stat().st_size - end
            with self.path.open("r+b") as fh:  # cut the torn line off the file itself
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        self._done = {self.key(r) for r in self.rows}

    def key(self, row: dict[str, Any]) -> tuple:
        return tuple(_canonical(row.get(f)) for f in self.key_fields)

    def done(self, **key: Any) -> bool:
        return self.key(key) in self._done

    def find(self, **key: Any) -> dict[str, Any]:
        """The latest row with this key."""
        wanted = self.key(key)
        for row in reversed(self.rows):
            if self.key(row) == wanted:
                return row
        raise KeyError(f"no row with {key}")

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one whole line and make it durable (flush + fsync) before returning."""
        row = finite_or_none(row)  # strict JSON: a NaN metric is stored (and read back) as null
        data = (strict_json_dumps(row) + "\n").encode("utf-8")
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        before = 0 if created else self.path.stat().st_size
        try:
            with self.path.open("ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:  # a full disk: no torn line, no 0-byte file left behind
            self._restore(before, created)
            if isinstance(exc, OSError):
                raise naming(self.path, exc) from None
            raise
        if created:
            fsync_dir(self.path.parent)
        self.rows.append(row)
        self._done.add(self.key(row))

    def _restore(self, size: int, created: bool) -> None:
        try:
            if created:
                self.path.unlink()
            else:
                with self.path.open("r+b") as fh:
                    fh.truncate(size)
        except OSError:
            pass  # a torn last line is still cut off when the file is next opened

    def keep_only(self, rows: Iterable[dict[str, Any]]) -> None:
        """Atomically rewrite the file with just the records whose key is among ``rows``' keys."""
        keep = {self.key(r) for r in rows}
        self.keep_where(lambda row: self.key(row) in keep)

    def keep_where(self, predicate) -> None:
        """Atomically rewrite the file with just the records for which ``predicate(row)`` holds."""
        kept = [r for r in self.rows if predicate(r)]
        if len(kept) == len(self.rows):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, "".join(strict_json_dumps(r) + "\n" for r in kept).encode("utf-8"))
        self.rows = kept
        self._done = {self.key(r) for r in kept}
