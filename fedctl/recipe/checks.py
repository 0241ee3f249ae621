"""Argument checks shared by the recipe classes: each returns the value or raises one
RecipeError line naming the argument and what it must be."""

from __future__ import annotations

import math
from typing import Any

from fedctl.errors import RecipeError


def size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise RecipeError("name must be a non-empty string of at most 64 characters")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise RecipeError(f"name {name!r} may contain only letters, digits, '-', '_' and '.'")


def check_int(what: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def check_bool(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{what} must be true or false, got {value!r}")
    return value


def check_number(
    what: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a float if it is a number within the bounds, else a RecipeError."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        bounds = [
            f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<", lt), ("<=", le)) if b is not None
        ]
        where = f" ({' and '.join(bounds)})" if bounds else ""
        raise RecipeError(f"{what} must be a number{where}, got {value!r}")
    return float(value)


def check_str(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RecipeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def check_opt_pos(what: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise RecipeError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def check_opt_nonneg(what: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise RecipeError(f"{what} must be a number of seconds ≥ 0 or None, got {value!r}")
    return float(value)
