"""Typed messages over frames: the machinery behind :mod:`fedctl.codec.protocol`.

A message kind is a frozen dataclass registered with :func:`kind` under its conversation and
its ``t``; its fields are its shape. :func:`parse` checks a received header against the kinds a
receiver expects (unknown or extra fields, wrong types, strings or lists over their limits,
integers outside 64 bits, JSON nested too deep: one :class:`~fedctl.codec.frames.FrameError`
line) and returns the validated object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin, overload

from fedctl.codec import frames
from fedctl.codec.frames import FrameError, FrameSocket
from fedctl.codec.jsondata import check_json
from fedctl.constants import MAX_INT
from fedctl.errors import CodecError

#: a name, id, kind, status or path: at most this long
NAME = 4096
#: an error, a reason, a traceback: at most this long
TEXT = 65536
#: items in a list field (site lists, log lines, records)
ITEMS = 10_000

Name = Annotated[str, NAME]
Text = Annotated[str, TEXT]
#: a JSON object (validated for depth, keys, numbers; its own fields checked by its user)
Obj = dict[str, Any]


class Shape:
    """A typed JSON object of the protocol (a message, or a part nested in one)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON data (optional fields that are None included)."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


class Message(Shape):
    """Base of every message kind: ``KIND`` is its ``t``, ``DIRECTION`` who sends it."""

    KIND: ClassVar[str]
    CONVERSATION: ClassVar[str]
    DIRECTION: ClassVar[str]

    def to_header(self) -> dict[str, Any]:
        """The frame header: ``t`` and the fields."""
        return {"t": self.KIND, **self.to_dict()}


def _plain(value: Any) -> Any:
    if isinstance(value, Shape):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Numbered(Message):
    """A session message that is numbered and acknowledged (delivered exactly once); ``seq``
    is set by the sending link, never by the code that builds the message."""

    seq: int = field(default=0, kw_only=True)


_REGISTRY: dict[tuple[str, str], type[Message]] = {}
M = TypeVar("M", bound=Message)
S = TypeVar("S", bound=Shape)


def kind(name: str, conversation: str, direction: str) -> Any:
    """Class decorator: register a message kind of a conversation."""

    def wrap(cls: type[M]) -> type[M]:
        cls.KIND, cls.CONVERSATION, cls.DIRECTION = name, conversation, direction
        key = (conversation, name)
        if key in _REGISTRY:
            raise RuntimeError(f"message kind {name!r} of {conversation} defined twice")
        _REGISTRY[key] = cls
        return cls

    return wrap


def kinds(conversation: str | None = None) -> list[type[Message]]:
    """Every registered message kind (of one conversation), for docs and tests."""
    return [c for (conv, _), c in _REGISTRY.items() if conversation in (None, conv)]


def encode(msg: Message, payload: bytes | memoryview = b"") -> bytes:
    """One frame carrying ``msg`` (and a payload, for chunk and log frames)."""
    return frames.encode(msg.to_header(), payload)


# Receivers name the kinds they accept; the overloads give them the union of those types.
A = TypeVar("A", bound=Message)
B = TypeVar("B", bound=Message)
C = TypeVar("C", bound=Message)


@overload
def decode(data: bytes | memoryview, a: type[A], /) -> tuple[A, bytes]: ...
@overload
def decode(data: bytes | memoryview, a: type[A], b: type[B], /) -> tuple[A | B, bytes]: ...
@overload
def decode(
    data: bytes | memoryview, a: type[A], b: type[B], c: type[C], /
) -> tuple[A | B | C, bytes]: ...
@overload
def decode(data: bytes | memoryview, *expected: type[Message]) -> tuple[Message, bytes]: ...
def decode(data: bytes | memoryview, *expected: type[Message]) -> tuple[Message, bytes]:
    """(message, payload) of one frame, which must hold one of the ``expected`` kinds."""
    header, payload = frames.decode(data)
    return parse(header, *expected), payload


def send(sock: FrameSocket, msg: Message, payload: bytes = b"") -> None:
    """Send ``msg`` on a local socket."""
    sock.send(msg.to_header(), payload)


@overload
def recv(sock: FrameSocket, a: type[A], /) -> A | None: ...
@overload
def recv(sock: FrameSocket, a: type[A], b: type[B], /) -> A | B | None: ...
@overload
def recv(sock: FrameSocket, a: type[A], b: type[B], c: type[C], /) -> A | B | C | None: ...
@overload
def recv(sock: FrameSocket, *expected: type[Message]) -> Message | None: ...
def recv(sock: FrameSocket, *expected: type[Message]) -> Message | None:
    """The next message on a local socket, one of ``expected``; None when the peer closed."""
    got = sock.recv()
    return None if got is None else parse(got[0], *expected)


@overload
def parse(header: dict[str, Any], a: type[A], /) -> A: ...
@overload
def parse(header: dict[str, Any], a: type[A], b: type[B], /) -> A | B: ...
@overload
def parse(header: dict[str, Any], a: type[A], b: type[B], c: type[C], /) -> A | B | C: ...
@overload
def parse(header: dict[str, Any], *expected: type[Message]) -> Message: ...
def parse(header: dict[str, Any], *expected: type[Message]) -> Message:
    """A decoded header as one of the ``expected`` kinds (all of one conversation), validated.

    The header is first checked as JSON data (string keys, 64-bit integers, finite numbers,
    bounded depth and strings), so a header built in Python holds no more than one that came
    off the wire, and nothing below meets a huge integer, a NaN or a non-string key.
    """
    if not isinstance(header, dict):
        raise FrameError(f"a message header must be an object, got {type(header).__name__}")
    try:
        check_json(header, "message header", None)
    except CodecError as exc:
        raise FrameError(str(exc)) from None
    t = header.get("t")
    cls = next((c for c in expected if t == c.KIND), None)
    if cls is None:
        names = ", ".join(sorted(c.KIND for c in expected))
        raise FrameError(f"unexpected message type {_shown(t)} (expected {names})")
    try:
        return _build(cls, header, cls.KIND, top=True)
    except FrameError:
        raise
    except CodecError as exc:  # a JSON field over the limits
        raise FrameError(str(exc)) from None


def _shown(value: Any) -> str:
    """A short one-line rendering of a value taken from a header, for an error message."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 64 else repr(value[:64]) + "…"
    return "none" if value is None else f"a {type(value).__name__}"


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return hints


def _build(cls: type[S], data: Any, where: str, *, top: bool = False) -> S:
    if not isinstance(data, dict):
        raise FrameError(f"{where}: expected an object")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = set(data) - set(names) - ({"t"} if top else set())
    if extra:
        raise FrameError(f"{where}: unknown field {_shown(sorted(extra)[0])}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, f in names.items():
        if name not in data:
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if has_default and not (name == "seq" and issubclass(cls, Numbered)):
                continue
            raise FrameError(f"{where}: field {name!r} missing")
        values[name] = _check(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


def _check(tp: Any, value: Any, where: str) -> Any:
    limit = None
    if get_origin(tp) is Annotated:
        tp, limit = get_args(tp)[0], get_args(tp)[1]
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check(inner, value, where)
    if tp is Any:
        return check_json(value, where, None)
    if tp is str:
        if not isinstance(value, str):
            raise FrameError(f"{where}: expected a string")
        if len(value) > (limit or NAME):
            raise FrameError(f"{where}: longer than {limit or NAME} characters")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FrameError(f"{where}: expected true or false")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_INT:
            raise FrameError(f"{where}: expected a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FrameError(f"{where}: expected a number")
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise FrameError(f"{where}: expected a list")
        if len(value) > ITEMS:
            raise FrameError(f"{where}: more than {ITEMS} items")
        (item,) = get_args(tp)
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FrameError(f"{where}: expected an object")
        key_t, val_t = get_args(tp)
        if val_t is Any:
            return check_json(value, where, None)  # the frame bounds its size
        if len(value) > ITEMS:
            raise FrameError(f"{where}: more than {ITEMS} entries")
        return {_check(key_t, k, where): _check(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Shape):
        return _build(tp, value, where)
    raise TypeError(f"protocol field type {tp!r} at {where} is not supported")  # a bug here
