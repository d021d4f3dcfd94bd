"""Method options given on the command line as repeatable ``--option KEY=VALUE``.

Each value is parsed by the type of the config field it sets (the method configs'
dataclass annotations), strictly: a boolean is one of true/false/yes/no/1/0 (any case),
``none``/``null`` only where the field may be None. A key must belong to at least one of the
compared methods (an unknown key gets a "did you mean"); a key that has its own flag
(``lam`` -> ``--lam``) is refused with the flag to use. With several methods, an option goes
to every method that has that field.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any, Iterable, Mapping

from fvdiffusion.errors import OptionError


TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off")


def split_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> {key: raw value}; a repeated key is an error."""
    raw: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--option expects KEY=VALUE, got {item!r}")
        if key in raw:
            raise OptionError(f"--option {key} is given twice")
        raw[key] = value
    return raw


def _field_types(methods: Iterable[str]) -> dict[str, dict[str, str]]:
    """{field: {method: annotation}} over the methods' config classes."""
    import fvdiffusion as fv

    table: dict[str, dict[str, str]] = {}
    for method in methods:
        if method not in fv.METHODS:
            known = ", ".join(sorted(fv.METHODS))
            close = difflib.get_close_matches(method, list(fv.METHODS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"invalid method={method!r}{hint}: expected one of {known}")
        for f in fields(fv.METHODS[method].config_class):
            table.setdefault(f.name, {})[method] = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return table


def parse_value(key: str, text: str, annotation: str) -> Any:
    """``text`` as the type named by ``annotation`` ("bool", "int | None", "float", "str", ...)."""
    parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "str")
    value = text.strip()
    if optional and value.lower() in ("none", "null"):
        return None
    if base == "bool":
        low = value.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise OptionError(f"--option {key}={text!r}: expected a boolean (true/false, yes/no, 1/0)")
    if base == "int":
        try:
            return int(value)
        except ValueError:
            raise OptionError(f"--option {key}={text!r}: expected an integer") from None
    if base == "float":
        try:
            number = float(value)
        except ValueError:
            raise OptionError(f"--option {key}={text!r}: expected a number") from None
        if math.isnan(number):
            raise OptionError(f"--option {key}={text!r}: expected a number, not NaN")
        return number
    return text


def parse_options(pairs: Iterable[str], methods: Iterable[str], flags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse ``--option`` pairs for the compared ``methods``; ``flags`` maps config fields to their own flags."""
    methods = tuple(methods)
    raw = split_pairs(pairs)
    if not raw:
        return {}
    table = _field_types(methods)
    flags = dict(flags or {})
    parsed: dict[str, Any] = {}
    for key, text in raw.items():
        if key in flags:
            raise OptionError(f"--option {key}=...: {key} has its own flag, use {flags[key]} {text or 'VALUE'}")
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            names = "/".join(methods)
            raise OptionError(f"--option {key}: not an option of {names}{hint} "
                              f"(options: {', '.join(sorted(k for k in table if k not in flags))})")
        annotations = list(dict.fromkeys(table[key].values()))
        errors = []
        for annotation in annotations:  # the same field name should have one type; try each if not
            try:
                parsed[key] = parse_value(key, text, annotation)
                break
            except OptionError as exc:
                errors.append(exc)
        else:
            raise errors[0]
    return parsed


def options_for(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that ``method`` has (with several compared methods, each takes its own)."""
    import fvdiffusion as fv

    if not options:
        return {}
    names = fv.METHODS[method].config_class.field_names()
    return {k: v for k, v in options.items() if k in names}
