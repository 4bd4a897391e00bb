"""Durations and times as a user writes them (--precopy-interval, --cutover, ...)."""

from __future__ import annotations

import datetime
import re

from .errors import BadInput

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '1.5m', '60m', '2h', '500ms' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise BadInput(f"not a duration: {text!r} (examples: 30s, 60m, 1h)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_when(text: str) -> float | None:
    """'now' -> None (at once); an ISO 8601 time -> its epoch seconds (naive means local)."""
    if text == "now":
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"--cutover {text!r} is not 'now' or an ISO 8601 time") from None
    return when.timestamp()
