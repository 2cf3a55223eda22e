"""Durations in configuration files: a number of seconds, or a string such as ``250ms``, ``5s``, ``2m``, ``1h``.

``Duration`` is a float of seconds after validation, so code reading the settings never parses units; range
constraints (``Field(gt=0, le=3600)``) apply to the seconds. Units: ``ms``, ``s``, ``m``, ``h``, ``d``; one unit
per value (``1m30s`` is refused: write ``90s``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)\s*$"
_DURATION = re.compile(_PATTERN)


def parse_duration(value: Any) -> Any:
    """``"250ms"`` -> 0.25; numbers (and numeric strings) pass through as seconds; anything else is left to
    pydantic's float validation, so its error names the field and the value found."""
    if isinstance(value, str):
        text = value.strip()
        match = _DURATION.match(text)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a duration: write seconds as a number, or a number with one unit "
                "(ms, s, m, h, d), e.g. 250ms, 5s, 2m"
            ) from None
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "description": "seconds"},
                {"type": "string", "pattern": _PATTERN.replace("\\s*", ""), "examples": ["250ms", "5s", "2m"]},
            ]
        }
    ),
]
