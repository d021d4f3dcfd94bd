"""Method options given on the command line as repeatable ``--option KEY=VALUE``."""

from __future__ import annotations

import json
from typing import Any


class OptionError(ValueError):
    """An ``--option`` that is not KEY=VALUE."""


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON (numbers, true/false, null) or else kept as strings."""
    parsed: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed
