"""Fuzzing every input boundary: only fedctl's own errors come out, nothing hangs, memory stays
bounded.

Each target gets random bytes or text *and* structured hostile inputs built from the real
format (a valid length prefix and JSON header with wrong dtypes, huge or zero dimensions,
overlapping offsets; message headers built from each dataclass's fields and then broken; job
specs and project files that are nearly valid YAML, or use anchors). Any exception that is not
the target's fedctl error (a ``ValueError``, ``RecursionError``, torch's ``RuntimeError``,
``struct.error``, ``MemoryError``...) fails the test; so does an example slower than the
profile's deadline, and one whose Python allocations (``tracemalloc``) outgrow a few times its
input plus a constant.

Budgets are Hypothesis profiles chosen by ``FEDCTL_FUZZ``: ``ci`` (the default: a fixed seed,
about 100 examples a target, the file in well under a minute) and ``long`` (``make fuzz``:
thousands of random examples a target, a generous deadline, failures saved in .hypothesis/).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedctl.codec import frames, jsondata, protocol, tensorfiles, tensors
from fedctl.codec.frames import FrameError, FrameSocket
from fedctl.codec.messages import ITEMS, NAME, TEXT, Shape
from fedctl.errors import CodecError, ConfigError, FedctlError, RecipeError

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", max_examples=100, deadline=10_000, derandomize=True, database=None,
    suppress_health_check=_SLOW,
)  # fmt: skip
settings.register_profile("long", max_examples=4000, deadline=20000, suppress_health_check=_SLOW)
PROFILE = os.environ.get("FEDCTL_FUZZ", "ci")
FUZZ = settings.get_profile(PROFILE)
#: for targets whose examples are slow (files, YAML, a self-sharing structure of a million
#: nodes): a fraction of the budget
FUZZ_SLOW = settings(FUZZ, max_examples=max(20, FUZZ.max_examples // 4))
FUZZ_FEW = settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 15))

#: Python allocations an example may make beyond its input: parsed JSON, tensors, messages
MEMORY_CONSTANT = 8 * 1024 * 1024
#: ...and per byte of input (a JSON value costs tens of bytes of Python objects per character)
MEMORY_FACTOR = 64

T = TypeVar("T")


@contextmanager
def bounded_memory(input_size: int) -> Iterator[None]:
    """Fail if the block's peak Python allocation exceeds the bound for ``input_size``."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    limit = MEMORY_FACTOR * input_size + MEMORY_CONSTANT
    assert peak <= limit, f"peak {peak} bytes for {input_size} bytes of input (limit {limit})"


def outcome(
    errors: type[FedctlError] | tuple[type[FedctlError], ...], fn: Callable[[], T]
) -> T | None:
    """``fn()``, or None if it raised one of ``errors``; any other exception propagates."""
    try:
        return fn()
    except errors as exc:
        text = str(exc)
        assert text and "\n" not in text, f"not a one-line error: {text!r}"
        return None


# =========================================================================== shared strategies

HUGE_INTS = st.sampled_from(
    [2**31, 2**32, 2**47, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**400,
     -1, -(2**63), -(2**64)]
)  # fmt: skip
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324])
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=12),
    HUGE_INTS,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)


def nested(depth: int, leaf: Any = 0, as_dict: bool = False) -> Any:
    """A value nested ``depth`` levels deep (lists or single-key objects)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


deep_values = st.builds(nested, st.integers(20, 250), json_scalars, st.booleans())
long_strings = st.sampled_from(["x" * (NAME + 1), "y" * (TEXT + 1), "z" * 70000])
hostile_values = st.one_of(
    json_values, HUGE_INTS, ODD_FLOATS, deep_values, long_strings,
    st.just(["a"] * (ITEMS + 1)), st.just({str(i): i for i in range(ITEMS + 1)}),
    st.sampled_from(["\ud800", "a\x00b", "../../etc/passwd", "/abs", "", " ", "\u202e"]),
).map(copy.deepcopy)  # fresh objects: generators mutate what they draw  # fmt: skip


#: hostile values small enough for files parsed by the (pure Python) YAML loader
yaml_hostile = st.one_of(
    json_values, HUGE_INTS, ODD_FLOATS,
    st.builds(nested, st.integers(20, 100), json_scalars, st.booleans()),
    st.sampled_from(["\ud800", "a\x00b", "../../etc/passwd", "/abs", "", " ", "x" * 5000]),
)  # fmt: skip


def dumps_hostile(value: Any) -> bytes:
    """JSON text of any value (NaN and infinity written as JavaScript does, surrogates kept)."""
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


# =========================================================================== tensor codec

DTYPES = list(tensors._DTYPES)


@st.composite
def tensor_payloads(draw: st.DrawFn) -> bytes:
    """A framed tensor payload: a consistent layout, then (usually) broken in a few places."""
    header: dict[str, Any] = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * tensors.itemsize(dtype)
        name = draw(st.text(min_size=1, max_size=6))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3) | json_values
        )
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "extra", "zero"]))
        entries = [n for n in names if isinstance(header.get(n), dict)]
        target = draw(st.sampled_from(entries)) if entries else None
        if action == "extra" or target is None:
            header[draw(st.text(max_size=6))] = draw(hostile_values)
            continue
        entry = header[target]
        if action == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | st.text(max_size=8) | hostile_values)
        elif action == "shape":
            dims = st.integers(0, 4) | HUGE_INTS | st.booleans() | st.floats() | st.text(max_size=2)
            entry["shape"] = draw(st.lists(dims, max_size=18) | hostile_values)
        elif action == "zero":  # a zero dimension beside huge ones: an empty tensor
            entry["shape"] = [0, *draw(st.lists(HUGE_INTS, min_size=1, max_size=4))]
        elif action == "offsets":
            other = header[draw(st.sampled_from(entries))].get("data_offsets")
            entry["data_offsets"] = draw(
                st.just(other)  # overlapping another tensor
                | st.lists(st.integers(0, offset + 8) | HUGE_INTS, max_size=3)
                | hostile_values
            )
        else:
            header[target] = draw(hostile_values)
    if draw(st.integers(0, 9)) == 0:
        raw = dumps_hostile(draw(deep_values))
    else:
        raw = dumps_hostile(header)
    raw += b" " * draw(st.integers(0, 7))
    hlen = len(raw)
    if draw(st.integers(0, 5)) == 0:
        hlen = draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, hlen - 1, hlen + 1, 2**63]))
    data = draw(st.binary(min_size=offset, max_size=offset))
    cut = draw(st.sampled_from([0, 0, 0, -1, 1, -offset]))
    data = data[: len(data) + cut] if cut < 0 else data + b"\x00" * cut
    return struct.pack("<Q", max(0, hlen)) + raw + data


payloads = st.one_of(
    tensor_payloads(),
    st.binary(max_size=64),
    st.binary(max_size=8).map(lambda b: struct.pack("<Q", len(b)) + b),
)
#: the payload limit the fuzzed decoders get (so a valid layout may still be refused as too big)
MAX = 64 * 1024


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (to compare NaNs and 0-dimensional tensors too)."""
    return t.reshape(-1).contiguous().view(torch.uint8)


def _check_decoded(got: tuple[dict[str, torch.Tensor], dict[str, str]] | None, data: bytes) -> None:
    if got is None:
        return
    header = tensors.parse_header(data, MAX)
    tensors_, metadata = got
    assert metadata == header.metadata
    assert {e.name for e in header.entries} == set(tensors_)
    for e in header.entries:
        t = tensors_[e.name]
        assert tuple(t.shape) == e.shape and t.numel() * t.element_size() == e.nbytes


@FUZZ
@given(data=payloads)
def test_tensor_decode_and_parse_header(data: bytes) -> None:
    with bounded_memory(len(data)):
        outcome(CodecError, lambda: tensors.parse_header(data, MAX))
        got = outcome(CodecError, lambda: tensors.decode(data, MAX))
        got_view = outcome(CodecError, lambda: tensors.decode(bytearray(data), MAX))
    _check_decoded(got, data)
    assert (got is None) == (got_view is None)


@FUZZ
@given(data=payloads, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_tensor_stream_decoder_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    got: dict[str, torch.Tensor] = {}
    decoder = tensors.StreamDecoder(got.__setitem__, max_bytes=MAX)

    def feed_all() -> bool:
        for a, b in itertools.pairwise(bounds):
            decoder.feed(data[a:b])
        decoder.finish()
        return True

    with bounded_memory(len(data)):
        streamed = outcome(CodecError, feed_all)
    whole = outcome(CodecError, lambda: tensors.decode(data, MAX))
    # the stream and the whole-payload decoder agree on what is valid, and on the tensors
    assert (streamed is None) == (whole is None)
    if whole is not None:
        assert decoder.metadata == whole[1] and set(got) == set(whole[0])
        for name, t in got.items():
            assert torch.equal(_raw(t), _raw(whole[0][name]))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fedctl-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@FUZZ_SLOW
@given(data=payloads)
def test_tensor_files_load_and_lazy(data: bytes, scratch: Path) -> None:
    path = scratch / "model.safetensors"
    path.write_bytes(data)
    with bounded_memory(len(data)):
        loaded = outcome(CodecError, lambda: tensorfiles.load_file(path, MAX))
        lazy = outcome(CodecError, lambda: tensorfiles.LazyTensorFile(path, MAX))
        lazily = {n: lazy[n] for n in lazy} if lazy is not None else None
    _check_decoded(loaded, data)
    assert (loaded is None) == (lazily is None)
    if loaded is not None and lazily is not None:
        for name, t in lazily.items():
            assert torch.equal(_raw(t), _raw(loaded[0][name]))
    del loaded, lazy, lazily


def test_tensor_file_that_is_missing_or_a_folder_is_a_codec_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(CodecError, match=str(path)):
            tensorfiles.load_file(path)
        with pytest.raises(CodecError, match=str(path)):
            tensorfiles.LazyTensorFile(path)


def test_stream_decoder_does_not_allocate_what_a_header_only_declares() -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}})
    data = struct.pack("<Q", len(header)) + header.encode()
    decoder = tensors.StreamDecoder(lambda n, t: None, max_bytes=2**31)
    with bounded_memory(len(data)):  # a gibibyte declared, a hundred bytes sent
        decoder.feed(data)
        decoder.feed(b"\x00" * 1000)
    with pytest.raises(CodecError, match="ended before"):
        decoder.finish()


# =========================================================================== frames and messages


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    """A frame: random bytes, or a real prefix with a hostile header and payload."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=64))
    header = draw(
        st.fixed_dictionaries(
            {"t": st.text(max_size=8) | json_scalars}, optional={"x": hostile_values}
        )
        | hostile_values
    )
    raw = dumps_hostile(header)
    magic = draw(st.sampled_from([frames.MAGIC, frames.MAGIC, b"FD", b"\x00\x00"]))
    version = draw(st.sampled_from([frames.VERSION, frames.VERSION, 0, 255]))
    hlen = len(raw) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
    prefix = frames.PREFIX.pack(magic, version, draw(st.integers(0, 255)), hlen)
    return prefix + raw + draw(st.binary(max_size=32))


@FUZZ
@given(data=frame_bytes())
def test_frames_decode(data: bytes) -> None:
    with bounded_memory(len(data)):
        got = outcome(FrameError, lambda: frames.decode(data))
        outcome(FrameError, lambda: frames.decode(memoryview(data), {"hello"}))
    if got is not None:
        assert isinstance(got[0], dict) and isinstance(got[0]["t"], str)


def _valid(tp: Any) -> st.SearchStrategy[Any]:
    """Values a field of type ``tp`` accepts (as messages.py reads the type)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*[st.none() if o is type(None) else _valid(o) for o in get_args(tp)])
    if tp is str:
        return st.text(max_size=8)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**63) + 1, 2**63 - 1)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if origin is list:
        return st.lists(_valid(get_args(tp)[0]), max_size=3)
    if origin is dict:
        key, value = get_args(tp)
        values = json_values.filter(_is_json) if value is Any else _valid(value)
        return st.dictionaries(_valid(key), values, max_size=3)
    assert isinstance(tp, type) and issubclass(tp, Shape), tp
    hints = typing.get_type_hints(tp, include_extras=True)
    return st.fixed_dictionaries({f.name: _valid(hints[f.name]) for f in dataclasses.fields(tp)})  # type: ignore[arg-type]


def _is_json(value: Any) -> bool:
    try:
        jsondata.check_json(value, "v")
    except CodecError:
        return False
    return True


KINDS = protocol.kinds()


@st.composite
def message_headers(draw: st.DrawFn) -> tuple[type[protocol.Message], Any]:
    """A message kind and a header for it: valid, then (usually) broken in a few places."""
    cls = draw(st.sampled_from(KINDS))
    hints = typing.get_type_hints(cls, include_extras=True)
    header: dict[Any, Any] = {"t": cls.KIND}
    for f in dataclasses.fields(cls):
        header[f.name] = draw(_valid(hints[f.name]))
    keys = [k for k in header if k != "t"]
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "extra", "t", "nest", "whole"]))
        key = draw(st.sampled_from(keys)) if keys else "t"
        if action == "replace":
            header[key] = draw(hostile_values)
        elif action == "drop":
            header.pop(key, None)
        elif action == "extra":
            header[draw(st.text(max_size=6) | st.integers() | HUGE_INTS)] = draw(json_values)
        elif action == "t":
            header["t"] = draw(st.sampled_from([k.KIND for k in KINDS]) | hostile_values)
        elif action == "nest":  # a valid value buried in a nested field
            header[key] = nested(draw(st.integers(1, 40)), header.get(key), draw(st.booleans()))
        else:
            return cls, draw(hostile_values)
    return cls, header


@FUZZ
@given(case=message_headers())
def test_protocol_parse_and_decode_every_kind(case: tuple[type[protocol.Message], Any]) -> None:
    cls, header = case
    with bounded_memory(len(dumps_hostile(header)) if _dumpable(header) else 1 << 16):
        msg = outcome(FrameError, lambda: protocol.parse(header, cls))
        outcome(FrameError, lambda: protocol.parse(header, *protocol.kinds(cls.CONVERSATION)))
    if msg is not None:
        assert isinstance(msg, cls)
        assert protocol.parse(msg.to_header(), cls) == msg  # what was accepted goes round
    try:
        frame = frames.encode(header)  # type: ignore[arg-type]
    except (ValueError, TypeError, FrameError, RecursionError):
        return  # not sendable (NaN, a non-JSON key, too big): the sender refuses it
    decoded = outcome(FrameError, lambda: protocol.decode(frame, cls))
    assert (decoded is None) == (msg is None) or not _is_json(header)


def _dumpable(value: Any) -> bool:
    try:
        dumps_hostile(value)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


@FUZZ
@given(chunks=st.lists(frame_bytes() | st.binary(max_size=16), max_size=6), prefixed=st.booleans())
def test_frame_socket_recv_over_a_socketpair(chunks: list[bytes], prefixed: bool) -> None:
    data = b"".join(struct.pack("<I", len(c)) + c if prefixed else c for c in chunks)
    writer, reader = socket.socketpair()
    reader.settimeout(10)  # a recv that waits for bytes that never come fails the test

    def send() -> None:
        try:
            writer.sendall(data)
        except OSError:
            pass  # the reader gave up on a bad frame and closed its end
        finally:
            writer.close()

    sender = threading.Thread(target=send)
    sender.start()
    sock = FrameSocket(reader)
    try:
        with bounded_memory(len(data)):
            for _ in range(len(chunks) + 1):
                got = outcome(FrameError, sock.recv)
                if got is None:
                    break
    finally:
        sock.close()
        sender.join()


# --------------------------------------------------------------------------- admin requests


@pytest.fixture(scope="module")
def admin_api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The server's admin dispatch over a real (empty) job store, no network."""
    from fedctl.provision import poc_project, provision
    from fedctl.provision.kit import load_kit
    from fedctl.runtime.adminapi import AdminApi
    from fedctl.runtime.authz import Authorizer
    from fedctl.runtime.scheduler import Scheduler
    from fedctl.runtime.serverstate import ServerConfig, ServerState

    root = tmp_path_factory.mktemp("fuzz-admin")
    res = provision(poc_project(["site-1"]), root / "ws")
    state = ServerState(load_kit(res.kit_dir("localhost")), root / "server", ServerConfig())
    api = AdminApi(state, Scheduler(state), Authorizer(state))
    return api


ADMIN_OPS = st.sampled_from(["list", "sites", "status", "events", "abort"]) | st.text(max_size=6)


@FUZZ_SLOW
@given(
    header=st.fixed_dictionaries(
        {"t": st.just("admin"), "op": ADMIN_OPS},
        optional={"job": st.none() | st.text(max_size=12) | hostile_values,
                  "after": st.integers(-(2**63) + 1, 2**63 - 1) | hostile_values},
    ),
    role=st.sampled_from(["project_admin", "org_admin", "lead", "member"]),
)  # fmt: skip
def test_admin_requests_through_the_admin_dispatch(header: dict, role: str, admin_api: Any) -> None:
    from fedctl.provision.identity import Identity

    ident = Identity(name=f"{role}@poc.local", org="poc", type="admin", role=role)
    req = outcome(FrameError, lambda: protocol.parse(header, protocol.AdminRequest))
    if req is None:
        return
    reply = outcome(FedctlError, lambda: admin_api._admin(ident, req))
    if reply is not None:
        protocol.encode(protocol.Reply(jsondata.check_json(reply, "reply")))


# =========================================================================== JSON


@st.composite
def json_texts(draw: st.DrawFn) -> bytes | str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return draw(
            st.text(
                alphabet=st.sampled_from('[]{}",:0123456789.eE+-tfnulNaIiy\\ \ud800'), max_size=64
            )
        )
    if kind == 2:  # deep nesting, long numbers, constants, escapes
        n = draw(st.integers(1, 5000))
        return draw(
            st.sampled_from(
                ["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n, "1" * n, "-" + "9" * n,
                 f"1e{n}", f"1.{'0' * n}1", "NaN", "-Infinity", '"\\ud800"', '{"\\ud800": 1}',
                 '{"a": 1, "a": 2}', "\ufeff{}", "0" * n + "1"]
            )
        )  # fmt: skip
    return dumps_hostile(draw(hostile_values))


@FUZZ
@given(text=json_texts())
def test_json_loads(text: bytes | str) -> None:
    with bounded_memory(len(text)):
        value = outcome(CodecError, lambda: jsondata.loads(text, "fuzz"))
    if value is not None:
        assert jsondata.check_json(value, "again") is value
        assert json.loads(jsondata.dumps(value)) == value


class _Odd:
    pass


class _HugeInt(int):
    """An int of 5001 digits whose repr works (Hypothesis reprs every example, and ``repr`` of
    a plain int that long raises ValueError)."""

    def __repr__(self) -> str:
        return f"_HugeInt({'-' if self < 0 else ''}10**5000)"


HUGER = [_HugeInt(10**5000), _HugeInt(-(10**5000))]


python_leaves = st.one_of(
    json_scalars, ODD_FLOATS, long_strings,
    st.sampled_from([*HUGER, b"bytes", frozenset(), complex(1, 2), _Odd(), "\udcff"]),
)  # fmt: skip
python_values = st.recursive(
    python_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.sets(st.integers(), max_size=3)
    | st.dictionaries(
        st.text(max_size=4) | st.integers() | st.sampled_from([*HUGER, None, (1, 2), 1.5]),
        inner, max_size=4,
    ),
    max_leaves=16,
)  # fmt: skip


@FUZZ
@given(value=python_values)
def test_check_json_on_python_values(value: Any) -> None:
    outcome(CodecError, lambda: jsondata.check_json(value, "fuzz"))


@FUZZ_FEW
@given(width=st.integers(2, 64), depth=st.integers(1, 40), cycle=st.booleans())
def test_check_json_refuses_self_sharing_structures_fast(
    width: int, depth: int, cycle: bool
) -> None:
    value: Any = [0]
    for _ in range(depth):
        value = [value] * width
    if cycle:
        value.append(value)
    start = time.monotonic()
    result = outcome(CodecError, lambda: jsondata.check_json(value, "shared"))
    assert time.monotonic() - start < 5
    assert result is None or width**depth <= 10**6


# =========================================================================== YAML files

YAML_CHARS = st.sampled_from([*"abc:-[]{}&*!|>'\"#%@`,?\n \t0123456789.~", "\x00", "\ud7ff"])
YAML_SNIPPETS = st.sampled_from(
    ["a: &x [1, 2]\nb: *x\n", "a: !!python/object:os.system x\n", "a: !!binary Zm9v\n",
     "a: !!set {x, y}\n", "? [1, 2]\n: x\n", "a: 1\na: 2\n", "a: 2024-13-45\n",
     "a: " + "9" * 5000 + "\n", "a: 0x" + "f" * 400 + "\n", "a: .nan\n", "a: !!float 1e999\n",
     "[" * 200 + "]" * 200 + "\n", "- " * 100 + "x\n", "---\na: 1\n---\nb: 2\n", "\ufeffa: 1\n",
     "a: !!timestamp x\n", "a: !custom 1\n", "%YAML 1.1\n---\na: 1\n", "a: '\\ud800'\n"]
)  # fmt: skip


def yaml_texts(document: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Random YAML-ish text, known hostile snippets, or a (mutated) document dumped as YAML
    (a value that appears twice gets an anchor and an alias)."""

    def dump(doc: Any) -> str:
        try:
            return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
        except (yaml.YAMLError, ValueError, TypeError, RecursionError):
            return "a: 1\n"

    return st.one_of(
        st.text(alphabet=YAML_CHARS, max_size=80),
        YAML_SNIPPETS,
        st.tuples(YAML_SNIPPETS, document.map(dump)).map("".join),
        document.map(dump),
    )


def mutate_document(base: dict[str, Any], paths: list[tuple[str, ...]]) -> st.SearchStrategy[Any]:
    """``base`` with a few values (at ``paths``) replaced, removed or shared."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        doc = json.loads(json.dumps(base))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            parent = doc
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                continue
            action = draw(st.sampled_from(["replace", "replace", "drop", "extra", "share"]))
            if action == "replace":
                parent[path[-1]] = draw(yaml_hostile)
            elif action == "drop":
                parent.pop(path[-1], None)
            elif action == "extra":
                parent[draw(st.text(max_size=6))] = draw(json_values)
            else:  # the same object twice: safe_dump writes an anchor and an alias
                shared = [1, 2]
                parent[path[-1]] = shared
                doc["zz"] = shared
        return doc

    return build()


# --------------------------------------------------------------------------- job specs


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real job folder (exported from a small FedAvg recipe) whose spec the tests rewrite."""
    from fedctl.recipe import FedAvgRecipe

    base = tmp_path_factory.mktemp("fuzz-recipe")
    (base / "client.py").write_text("print('hello')\n")
    recipe = FedAvgRecipe(
        name="fuzz", min_clients=1, num_rounds=1, model={"w": torch.zeros(2)},
        train_script="client.py", base_dir=base,
    )  # fmt: skip
    return recipe.export(tmp_path_factory.mktemp("fuzz-job") / "job")


def _spec_paths(spec: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [(k,) for k in spec]
    paths += [("args", k) for k in spec["args"]]
    paths += [("files", k) for k in spec["files"]]
    return paths


@FUZZ_SLOW
@given(data=st.data())
def test_job_specs(data: st.DataObject, job_dir: Path) -> None:
    from fedctl.recipe.jobfolder import JOB_SPEC, load_job, read_job_spec

    spec_path = job_dir / JOB_SPEC
    original = spec_path.read_text()  # restored after every example
    base = yaml.safe_load(original)
    text = data.draw(yaml_texts(mutate_document(base, _spec_paths(base))))
    try:
        spec_path.write_text(text, errors="surrogatepass")
        with bounded_memory(len(text)):
            outcome(RecipeError, lambda: read_job_spec(job_dir))
            outcome(RecipeError, lambda: read_job_spec(job_dir, verify=False, need_model=False))
            outcome(RecipeError, lambda: load_job(job_dir))
    finally:
        spec_path.write_text(original)


# --------------------------------------------------------------------------- project.yml


@FUZZ_SLOW
@given(data=st.data())
def test_project_files(data: st.DataObject, scratch: Path) -> None:
    from fedctl.provision import poc_project
    from fedctl.provision.project import load_project

    base = poc_project(2).to_dict()
    paths: list[tuple[str, ...]] = [(k,) for k in base] + [("server", k) for k in base["server"]]
    text = data.draw(yaml_texts(mutate_document(base, paths)))
    path = scratch / "project.yml"
    path.write_text(text, errors="surrogatepass")
    with bounded_memory(len(text)):
        project = outcome(ConfigError, lambda: load_project(path))
    if project is not None:  # what validates can be written and read back
        path.write_text(project.to_yaml())
        assert load_project(path) == project
