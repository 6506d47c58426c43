"""JSON text byte-identical to Helm's ``toPrettyJson`` (Go's ``json.MarshalIndent(v, "", "  ")``).

Why: the recipe ConfigMap is rendered twice, by ``kubetune render`` and by the Helm chart, and the two must
be equal. Helm reads values YAML into Go types (every number a float64) and prints them the Go way, so this
module prints Python values the same way: ``1.0`` and ``1`` both as ``1``, ``1e-05`` as ``0.00001``,
``<``, ``>`` and ``&`` escaped as ``\\u003c`` … (Go escapes HTML by default), keys sorted by code point.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
            "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_number(value: float | int) -> str:
    """Go's float64 encoding: shortest round-trip digits, 'f' notation unless < 1e-6 or >= 1e21."""
    f = float(value)
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"{value!r} cannot be written as JSON")
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        # Python's repr has the shortest digits and a two-digit exponent, like Go; Go then trims 'e-07' to 'e-7'.
        return repr(f).replace("e-0", "e-")
    text = format(Decimal(repr(f)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _string(text: str) -> str:
    out = []
    for ch in text:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dumps(value: Any, indent: str = "") -> str:
    """``value`` as Go's MarshalIndent prints it with a two-space indent."""
    inner = indent + "  "
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return go_number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{_string(str(k))}: {dumps(value[k], inner)}" for k in sorted(value, key=str)]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(f"{inner}{dumps(v, inner)}" for v in value) + "\n" + indent + "]"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
