"""JSON data in and out of fedctl, with hard limits (one validator for every boundary).

Everything fedctl reads as JSON (frame headers, model headers, meta and metrics, job specs,
state files) goes through :func:`loads`, and every JSON value fedctl builds from user input goes
through :func:`check_json`. Both enforce the same limits (``fedctl.constants``): nesting depth,
size, integers within 64 bits, no NaN or infinity (JSON has none), string keys, and bounded
strings. The walk is iterative and linear in the input; nothing is evaluated or unpickled, and
the only error that comes out is :class:`~fedctl.errors.CodecError` with one line saying what
and where.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fedctl.constants import MAX_INT, MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_JSON_NODES, MAX_STRING
from fedctl.errors import CodecError

#: the longest integer literal that can be within MAX_INT (sign and 19 digits)
_MAX_INT_DIGITS = len(str(MAX_INT)) + 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def loads(
    data: bytes | str,
    what: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    max_nodes: int = MAX_JSON_NODES,
) -> Any:
    """Parse ``data`` as JSON within the limits, or raise one CodecError line naming ``what``."""
    if len(data) > max_bytes:
        raise CodecError(f"{what}: {len(data)} bytes of JSON exceeds the limit {max_bytes}")
    try:
        value = json.loads(data, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise CodecError(f"{what}: JSON nested deeper than {max_depth}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CodecError(f"{what} is not valid JSON ({_short(exc)})") from None
    return check_json(value, what, None, max_depth=max_depth, max_nodes=max_nodes)


def dumps(value: Any) -> str:
    """Compact JSON text of data that passed :func:`check_json`."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def check_json(
    value: Any,
    what: str,
    max_bytes: int | None = MAX_JSON_BYTES,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_nodes: int = MAX_JSON_NODES,
) -> Any:
    """Return ``value`` if it is plain JSON data within the limits (tuples count as lists).

    ``max_bytes`` also bounds its encoded size (None: not measured, e.g. just parsed).
    """
    # A node count bound: a structure that shares itself (``a = [a0] * 8`` nested 25 times is
    # 8**25 nodes in a few bytes of Python) is refused in bounded time instead of hanging.
    nodes = 0
    stack: list[tuple[Any, int, str]] = [(value, 0, what)]
    while stack:
        v, depth, path = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise CodecError(f"{what}: more than {max_nodes} JSON values")
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -MAX_INT <= v <= MAX_INT:
                raise CodecError(f"{path}: integer out of the 64-bit range")
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise CodecError(f"{path}: {v} is not a JSON number (NaN and infinity are not)")
            continue
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise CodecError(f"{path}: string of {len(v)} characters exceeds {MAX_STRING}")
            if not v.isascii():
                try:
                    v.encode()
                except UnicodeEncodeError:
                    raise CodecError(f"{path}: string is not valid Unicode text") from None
            continue
        if depth >= max_depth:
            raise CodecError(f"{what}: nested deeper than {max_depth} at {path}")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise CodecError(f"{what}: key {k!r} at {path} is not a string")
                stack.append((item, depth + 1, f"{path}.{k}"))
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                stack.append((item, depth + 1, f"{path}[{i}]"))
        else:
            raise CodecError(f"{what}: {path} holds a {type(v).__name__}, which is not JSON data")
    if max_bytes is not None:
        size = len(dumps(value))
        if size > max_bytes:
            raise CodecError(f"{what}: {size} bytes of JSON exceeds the limit {max_bytes}")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"
