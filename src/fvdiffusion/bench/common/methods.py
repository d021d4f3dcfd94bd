"""A benchmark row: a label, the registered method it runs, and the options it passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
