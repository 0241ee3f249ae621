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
    # A node count bound, counted as values are queued: a structure that shares itself
    # (``a = [a0] * 8`` nested 25 times is 8**25 nodes in a few bytes of Python) is refused in
    # bounded time and memory instead of hanging. Paths are kept as (parent, key) links and
    # spelled out only for an error: building each value's path as a string costs the length of
    # its ancestors' keys per value, quadratic memory for long keys above a long list.
    nodes = 1
    stack: list[tuple[Any, int, _Path]] = [(value, 0, what)]
    while stack:
        v, depth, path = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -MAX_INT <= v <= MAX_INT:
                raise CodecError(f"{_spell(path)}: integer out of the 64-bit range")
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise CodecError(
                    f"{_spell(path)}: {v} is not a JSON number (NaN and infinity are not)"
                )
            continue
        if isinstance(v, str):
            _check_string(v, path)
            continue
        if not isinstance(v, dict | list | tuple):
            raise CodecError(
                f"{what}: {_spell(path)} holds a {type(v).__name__}, which is not JSON data"
            )
        if depth >= max_depth:
            raise CodecError(f"{what}: nested deeper than {max_depth} at {_spell(path)}")
        nodes += len(v)
        if nodes > max_nodes:
            raise CodecError(f"{what}: more than {max_nodes} JSON values")
        if isinstance(v, dict):
            for k, item in v.items():
                # keys are strings like any other: bounded and valid text (a lone surrogate
                # cannot name a file or a database row); a non-string key is named by its type
                # only, as its repr may itself fail (an int of more than 4300 digits)
                if not isinstance(k, str):
                    raise CodecError(
                        f"{what}: a {type(k).__name__} key at {_spell(path)} is not a string"
                    )
                _check_string(k, (path, k))
                stack.append((item, depth + 1, (path, k)))
        else:
            for i, item in enumerate(v):
                stack.append((item, depth + 1, (path, i)))
    if max_bytes is not None:
        size = len(dumps(value))
        if size > max_bytes:
            raise CodecError(f"{what}: {size} bytes of JSON exceeds the limit {max_bytes}")
    return value


#: where a value is: the name of the whole, or (parent, key or index)
_Path = str | tuple[Any, str | int]
#: keys longer than this are cut in error messages
_KEY_SHOWN = 40


def _spell(path: _Path) -> str:
    """``what.key[3].other`` for a path link (long keys cut, so the error stays one line)."""
    parts: list[str] = []
    while isinstance(path, tuple):
        path, key = path
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            shown = key[:_KEY_SHOWN]
            if not shown.isprintable():  # a newline, a control or a lone surrogate: escaped
                shown = shown.encode("unicode_escape").decode("ascii")
            parts.append("." + shown + ("…" if len(key) > _KEY_SHOWN else ""))
    parts.append(path)
    return "".join(reversed(parts))


def _check_string(v: str, path: _Path) -> None:
    if len(v) > MAX_STRING:
        raise CodecError(f"{_spell(path)}: string of {len(v)} characters exceeds {MAX_STRING}")
    if not v.isascii():
        try:
            v.encode()
        except UnicodeEncodeError:
            raise CodecError(f"{_spell(path)}: string is not valid Unicode text") from None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"
