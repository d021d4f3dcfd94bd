"""Append-only JSONL result files: every finished cell is written at once, reruns skip it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


class ResultLog:
    """Rows keyed by ``key_fields``; a rerun with the same file resumes where it stopped."""

    def __init__(self, path: Path, key_fields: Iterable[str]) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.rows: list[dict[str, Any]] = []
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial last line: drop it, that cell reruns
                if number != len(lines):
                    raise ValueError(f"{self.path}: line {number} is not valid JSON") from None
        self._done = {self.key(r) for r in self.rows}

    def key(self, row: dict[str, Any]) -> tuple:
        return tuple(row.get(f) for f in self.key_fields)

    def done(self, **key: Any) -> bool:
        return tuple(key.get(f) for f in self.key_fields) in self._done

    def find(self, **key: Any) -> dict[str, Any]:
        """The latest row with this key."""
        wanted = tuple(key.get(f) for f in self.key_fields)
        for row in reversed(self.rows):
            if self.key(row) == wanted:
                return row
        raise KeyError(f"no row with {key}")

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows.append(row)
        self._done.add(self.key(row))

    def keep_only(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the file with just ``rows`` (drops cells whose config went stale)."""
        keep = {self.key(r) for r in rows}
        self.rows = [r for r in self.rows if self.key(r) in keep]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(self.path)
