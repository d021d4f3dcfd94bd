"""Strict JSON for every file the project writes for people and other programs to read.

``json.dumps`` writes NaN and Infinity as bare ``NaN`` / ``Infinity``, which is not JSON:
strict parsers (jq, JavaScript, most languages) reject the whole file. Here a non-finite
float becomes ``null`` and ``allow_nan=False`` guarantees nothing else slips through.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return finite_or_none(item())
    return value


def strict_json_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite floats as null and never emits NaN/Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
