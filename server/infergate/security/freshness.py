"""How long an HTTP response may be used, from its ``Cache-Control`` and ``Age`` headers.

Only what a private client of a JWKS URL needs from RFC 9111: the freshness
lifetime is ``max-age`` (§5.2.2.1) less the response's ``Age`` (§5.1); an
unqualified ``no-cache`` or a ``no-store`` means "ask again every time" (0).
``s-maxage`` is for shared caches and is ignored, as is any directive that
does not parse. Several lifetimes: the shortest wins.
"""

from __future__ import annotations

__all__ = ["freshness_seconds"]

_ALWAYS_ASK = frozenset({"no-cache", "no-store"})


def freshness_seconds(cache_control: str | None, age: str | None = None) -> float | None:
    """Seconds the response stays fresh (>= 0), or None when ``cache_control`` says nothing about it."""
    if not cache_control:
        return None
    lifetimes: list[int] = []
    for directive in cache_control.split(","):
        name, has_value, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in _ALWAYS_ASK and not has_value:
            lifetimes.append(0)
        elif name == "max-age":
            seconds = _delta_seconds(value)
            if seconds is not None:
                lifetimes.append(seconds)
    if not lifetimes:
        return None
    return float(max(0, min(lifetimes) - (_delta_seconds(age) or 0)))


def _delta_seconds(text: str | None) -> int | None:
    """A non-negative integer number of seconds (RFC 9111 §1.2.2), quotes tolerated; None otherwise."""
    if text is None:
        return None
    text = text.strip().strip('"')
    return int(text) if text.isascii() and text.isdigit() else None
