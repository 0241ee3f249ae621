"""Tensor framing and FLModel messages: round trips, interop, and hostile input."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from fedctl.codec import tensorfiles as tf
from fedctl.codec import tensors as tc
from fedctl.codec.model import FLModel, ParamsType, join_model, split_model
from fedctl.errors import CodecError


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.weight": torch.randn(3, 4, generator=g),
        "layer.0.bias": torch.randn(4, generator=g).half(),
        "encoder.blocks.1.attn.q_proj.weight": torch.randn(2, 2, generator=g).bfloat16(),
        "counts": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 5),
        "u8": torch.arange(5, dtype=torch.uint8),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_all_dtypes() -> None:
    src = _sample()
    out, meta = tc.decode(tc.encode(src, {"note": "x"}))
    _assert_same(src, out)
    assert meta == {"note": "x"}


def test_decode_of_bytes_gives_writable_copies_and_of_bytearray_views() -> None:
    src = {"w": torch.ones(4)}
    out, _ = tc.decode(tc.encode(src))
    out["w"].add_(1)  # must not raise or touch anything shared
    buf = bytearray(tc.encode(src))
    view, _ = tc.decode(buf)
    view["w"].fill_(7)
    again, _ = tc.decode(buf)
    assert torch.equal(again["w"], torch.full((4,), 7.0))


def test_non_contiguous_tensor_is_framed_by_value() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    out, _ = tc.decode(tc.encode({"t": t}))
    assert torch.equal(out["t"], t)


def test_large_tensor_streamed_in_random_chunks() -> None:
    big = torch.randn(3_000_000)  # 12 MB
    src = {"big": big, **_sample()}
    data = b"".join(bytes(p) for p in tc.iter_encode(src, chunk_size=1 << 20))
    assert data == tc.encode(src)
    got: dict[str, torch.Tensor] = {}
    dec = tc.StreamDecoder(lambda n, t: got.__setitem__(n, t))
    rng = random.Random(1)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 8, 100, 4096, 1 << 20])
        dec.feed(data[pos : pos + step])
        pos += step
    dec.finish()
    _assert_same(src, got)


def test_stream_decoder_hands_over_tensors_one_by_one() -> None:
    src = {"a": torch.ones(10), "b": torch.zeros(10)}
    seen: list[str] = []
    dec = tc.StreamDecoder(lambda n, t: seen.append(n))
    data = tc.encode(src)
    dec.feed(data[: len(data) - 40])  # all of a, not all of b
    assert seen == ["a"]
    dec.feed(data[len(data) - 40 :])
    assert seen == ["a", "b"]


def test_interop_with_safetensors_library(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    src = _sample()
    src.pop("empty")  # both sides handle empties, but keep the comparison simple
    tf.save_file(src, tmp_path / "ours.safetensors", {"k": "v"})
    _assert_same(src, load_file(tmp_path / "ours.safetensors"))
    save_file(src, tmp_path / "theirs.safetensors", {"k": "v"})
    theirs, meta = tf.load_file(tmp_path / "theirs.safetensors")
    _assert_same(src, theirs)
    assert meta == {"k": "v"}


def _frame(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x02", "shorter than its 8-byte header"),
        (struct.pack("<Q", 2**40) + b"{}", "exceeds the limit"),
        (struct.pack("<Q", 50) + b"{}", "truncated inside"),
        (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
        (_frame([1, 2]), "must be a JSON object"),  # type: ignore[arg-type]
        (_frame({"w": {"dtype": "F32", "shape": [2]}}), "exactly dtype, shape, data_offsets"),
        (_frame({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}), "unknown dtype"),
        (_frame({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "shape must"),
        (
            _frame({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "expected 8",
        ),
        (
            _frame(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (_frame({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
        (_frame({"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
        (
            _frame({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
            "describes",
        ),
    ],
)
def test_hostile_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        tc.decode(payload)


def test_size_limit_checked_before_allocation() -> None:
    header = {"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}
    dec = tc.StreamDecoder(lambda n, t: None, max_bytes=1 << 20)
    with pytest.raises(CodecError, match="exceeds the limit"):
        dec.feed(_frame(header))  # 4 GiB declared: refused from the header alone


def test_stream_rejects_trailing_bytes_and_truncation() -> None:
    data = tc.encode({"w": torch.ones(2)})
    dec = tc.StreamDecoder(lambda n, t: None)
    with pytest.raises(CodecError, match="past the end"):
        dec.feed(data + b"x")
    dec = tc.StreamDecoder(lambda n, t: None)
    dec.feed(data[:-1])
    with pytest.raises(CodecError, match="ended before"):
        dec.finish()


def test_encode_refuses_non_tensors_and_reserved_names() -> None:
    with pytest.raises(CodecError, match="expected a torch.Tensor"):
        tc.encode({"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="reserved"):
        tc.encode({"__metadata__": torch.ones(1)})
    with pytest.raises(CodecError, match="cannot be framed"):
        tc.encode({"c": torch.ones(2, dtype=torch.complex64)})


def test_file_write_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    tf.save_file({"w": torch.ones(3)}, path)

    def broken(*a, **k):
        yield b"partial"
        raise OSError("disk full")

    monkeypatch.setattr(tf, "iter_encode", broken)
    with pytest.raises(OSError, match="disk full"):
        tf.save_file({"w": torch.zeros(3)}, path)
    out, _ = tf.load_file(path)
    assert torch.equal(out["w"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp left


def test_flmodel_round_trip_through_the_framing() -> None:
    model = FLModel(
        params_type="diff",
        params=_sample(),
        optimizer_params={"momentum": torch.ones(2)},
        metrics={"accuracy": torch.tensor(0.5), "n": 3},
        current_round=2,
        total_rounds=5,
        meta={"NUM_STEPS_CURRENT_ROUND": 10, "nested": {"a": [1, 2]}},
    )
    header, tensors = split_model(model)
    header = json.loads(json.dumps(header))
    decoded, _ = tc.decode(tc.encode(tensors))
    back = join_model(header, decoded)
    assert back.params_type is ParamsType.DIFF
    _assert_same(model.params, back.params)  # type: ignore[arg-type]
    _assert_same(model.optimizer_params, back.optimizer_params)  # type: ignore[arg-type]
    assert back.metrics == {"accuracy": 0.5, "n": 3}
    assert back.meta == model.meta and back.current_round == 2


def test_join_model_rejects_bad_headers() -> None:
    header, tensors = split_model(FLModel(params={"w": torch.ones(1)}))
    with pytest.raises(CodecError, match="missing or unknown"):
        join_model({**header, "__class__": "os.system"}, tensors)
    with pytest.raises(CodecError, match="current_round must be an integer"):
        join_model({**header, "current_round": "1"}, tensors)
    with pytest.raises(CodecError, match="unexpected tensor"):
        join_model(header, {"x:w": torch.ones(1)})
    with pytest.raises(CodecError, match="params_type must be FULL or DIFF"):
        FLModel(params_type="HALF")


def test_lazy_tensor_file_reads_on_access_and_can_delete_itself(tmp_path) -> None:
    import gc

    path = tmp_path / "m.safetensors"
    src = {
        "p:a": torch.arange(6.0).reshape(2, 3),
        "p:b": torch.ones(2, dtype=torch.int64),
        "o:m": torch.zeros(1),
    }
    tf.save_file(src, path)
    lazy = tf.LazyTensorFile(path, delete=True)
    assert len(lazy) == 3 and set(lazy) == set(src)
    first, second = lazy["p:a"], lazy["p:a"]
    assert torch.equal(first, src["p:a"]) and first.data_ptr() != second.data_ptr()  # not kept
    params = lazy.view({"a": "p:a", "b": "p:b"})
    del lazy
    gc.collect()
    assert path.exists()  # the view still needs the file
    assert torch.equal(dict(params)["b"], src["p:b"])
    del params, first, second
    gc.collect()
    assert not path.exists()


def test_lazy_tensor_file_maps_large_tensors_copy_on_write(tmp_path, monkeypatch) -> None:
    """Large tensors are views of a private mapping: same values as a read, wherever they sit
    in the file (odd offsets included), a write never reaches the file, and they outlive it."""
    import gc

    path = tmp_path / "m.safetensors"
    src = {
        "a": torch.arange(3, dtype=torch.int8),  # 3 bytes: what follows starts unaligned
        "b": torch.linspace(-1, 1, 1000),
        "c": torch.randn(7, 5).to(torch.bfloat16),
        "d": torch.arange(9, dtype=torch.float64),
        "e": torch.zeros(0),
    }
    tf.save_file(src, path)
    read = tf.load_file(path)[0]
    monkeypatch.setattr(tf, "LAZY_MAP_BYTES", 1)  # map every tensor, however small
    lazy = tf.LazyTensorFile(path, delete=True)
    mapped = {n: lazy[n] for n in lazy}
    for name, t in src.items():
        assert mapped[name].dtype == t.dtype and torch.equal(mapped[name], read[name]), name
    mapped["b"].add_(5.0)  # the script's (or a filter's) own copy
    assert torch.equal(lazy["b"], src["b"]) and torch.equal(tf.load_file(path)[0]["b"], src["b"])
    del lazy
    gc.collect()
    assert path.exists()  # the tensors still map it
    assert torch.equal(mapped["d"], src["d"]) and torch.equal(mapped["b"], src["b"] + 5.0)
    del mapped
    gc.collect()
    assert not path.exists()  # removed with its last reader and its last mapping


def test_lazy_tensor_file_checks_its_header_against_the_file(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    tf.save_file({"w": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(CodecError, match="header describes"):
        tf.LazyTensorFile(path)
    path.write_bytes(data)
    with pytest.raises(CodecError, match="exceeds the limit"):
        tf.LazyTensorFile(path, max_bytes=100)


# ---------------------------------------------------------------- found by tests/test_fuzz.py


def test_stream_decoder_memory_follows_what_arrives_not_what_the_header_declares() -> None:
    import tracemalloc

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}})
    data = struct.pack("<Q", len(header)) + header.encode()
    dec = tc.StreamDecoder(lambda n, t: None, max_bytes=2**31)
    tracemalloc.start()
    try:
        dec.feed(data)  # a gibibyte declared, a hundred bytes sent
        dec.feed(b"\x00" * 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(CodecError, match="ended before"):
        dec.finish()


def test_missing_or_unreadable_tensor_files_are_codec_errors(tmp_path) -> None:
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(CodecError, match="no such tensor file|cannot read"):
            tf.load_file(path)
        with pytest.raises(CodecError, match="no such tensor file|cannot read"):
            tf.LazyTensorFile(path)


def test_check_json_keys_are_checked_like_strings() -> None:
    from fedctl.codec.jsondata import check_json
    from fedctl.constants import MAX_STRING

    with pytest.raises(CodecError, match="a int key at v is not a string"):
        check_json({10**5000: 1}, "v")  # its repr alone would raise ValueError
    with pytest.raises(CodecError, match="not valid Unicode"):
        check_json({"ok": {"\ud800": 1}}, "v")
    with pytest.raises(CodecError, match=f"exceeds {MAX_STRING}"):
        check_json({"k" * (MAX_STRING + 1): 1}, "v")


def test_json_paths_cost_nothing_until_an_error_names_one() -> None:
    """Long keys above a long list once cost len(path) bytes per value (quadratic memory:
    a 56 KB document took 100 MB); errors still name the path, long keys cut."""
    import tracemalloc

    from fedctl.codec.jsondata import loads

    doc: object = [0] * 2000
    for _ in range(5):
        doc = {"k" * 10_000: doc}
    text = json.dumps(doc)
    tracemalloc.start()
    try:
        loads(text, "doc")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    with pytest.raises(CodecError) as err:
        loads(text.replace("[0,", "[1e999,"), "doc")
    assert str(err.value).startswith("doc." + "k" * 40 + "…." + "k" * 40 + "…")
    assert str(err.value).count("…") == 5 and "[0]: inf is not a JSON number" in str(err.value)


def test_json_errors_stay_one_line_whatever_the_keys() -> None:
    """Found by tests/test_fuzz.py: a newline in a key put a newline in the error."""
    from fedctl.codec.jsondata import loads

    with pytest.raises(CodecError) as err:
        loads('{"a\\nb": {"\\u0000\u00e9": [1e999]}}', "doc")
    assert str(err.value) == (
        "doc.a\\nb.\\x00\\xe9[0]: inf is not a JSON number (NaN and infinity are not)"
    )
    with pytest.raises(CodecError) as err:
        loads('{"\\ud800\\n": 1}', "doc")
    assert str(err.value) == "doc.\\ud800\\n: string is not valid Unicode text"
