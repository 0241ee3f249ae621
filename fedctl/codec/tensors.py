"""Safe tensor framing: a safetensors-compatible layout that never executes anything.

Layout (identical to the safetensors file format, so files interoperate with that library)::

    u64 little-endian N | N bytes of JSON header | raw tensor bytes

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the raw bytes) plus an optional ``"__metadata__"`` of string pairs.

Everything read is validated *before* memory is allocated for it: header size, JSON shape, dtype
names from a fixed table, offsets inside the payload, no overlaps or holes, element counts that
match the byte spans, and a caller-supplied cap on the total size. Decoding is zero-copy when the
caller hands over a writable buffer. ``iter_encode`` and ``StreamDecoder`` move tensors in bounded
chunks so a model of any size crosses a transport without a second full copy. Files in this
layout are :mod:`fedctl.codec.tensorfiles`.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.codec import jsondata
from fedctl.errors import CodecError

if TYPE_CHECKING:
    import torch

#: Hard ceiling on a header; a model with a million tensors stays far below it.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Default ceiling on a whole payload (header + data). Callers pass their own for big models.
DEFAULT_MAX_BYTES = 64 * 1024**3
MAX_NAME_LEN = 1024
MAX_DIMS = 16
#: elements in one tensor (counting a zero dimension as one): 2**48, far above any real tensor
MAX_ELEMENTS = 2**48
METADATA_KEY = "__metadata__"

# dtype name -> (torch attribute name, item size in bytes)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


def dtype_name(dtype: torch.dtype) -> str:
    """The framing's name for a torch dtype; complex and quantized dtypes are refused."""
    import torch

    for name, (attr, _) in _DTYPES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise CodecError(f"dtype {dtype} cannot be framed (supported: {', '.join(_DTYPES)})")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a framing dtype name; unknown names are a CodecError."""
    import torch

    entry = _DTYPES.get(name)
    if entry is None or not hasattr(torch, entry[0]):
        raise CodecError(f"unknown dtype {name!r} in tensor header")
    return getattr(torch, entry[0])


def itemsize(name: str) -> int:
    """Bytes per element of a framing dtype name."""
    entry = _DTYPES.get(name)
    if entry is None:
        raise CodecError(f"unknown dtype {name!r} in tensor header")
    return entry[1]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: entries in payload order, string metadata, sizes."""

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    header_len: int  # bytes of JSON (after the 8-byte length prefix)
    data_len: int

    @property
    def total_len(self) -> int:
        return 8 + self.header_len + self.data_len


def _as_bytes_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's data (copying only if it is not contiguous)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer


def build_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The length-prefixed header bytes for ``tensors`` and the order their data follows in."""
    import torch

    header: dict[str, Any] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CodecError("tensor metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    ordered: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise CodecError(f"tensor name {name!r} must be a non-empty string of ≤ {MAX_NAME_LEN}")
        if name == METADATA_KEY:
            raise CodecError(f"tensor name {METADATA_KEY!r} is reserved")
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        dname = dtype_name(t.dtype)
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": dname,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        ordered.append((name, t))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw, ordered


def iter_encode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    chunk_size: int = 4 * 1024 * 1024,
) -> Iterator[memoryview | bytes]:
    """Yield the framed payload in pieces of at most ``chunk_size`` bytes (header first).

    Tensor data is yielded as views of the tensors' own memory: nothing the size of the model
    is allocated. The tensors must not be modified until the iterator is exhausted.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    head, ordered = build_header(tensors, metadata)
    for i in range(0, len(head), chunk_size):
        yield head[i : i + chunk_size]
    for _, t in ordered:
        view = _as_bytes_view(t)
        for i in range(0, len(view), chunk_size):
            yield view[i : i + chunk_size]


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The whole framed payload as one bytes object (for small payloads and files)."""
    head, ordered = build_header(tensors, metadata)
    total = len(head) + sum(t.numel() * t.element_size() for _, t in ordered)
    buf = bytearray(total)
    buf[: len(head)] = head
    pos = len(head)
    for _, t in ordered:
        view = _as_bytes_view(t)
        buf[pos : pos + len(view)] = view
        pos += len(view)
    return bytes(buf)


def parse_header(
    prefix: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES
) -> Header:
    """Validate the header at the start of ``prefix`` (which must hold at least all of it).

    Raises CodecError naming the first problem. ``max_bytes`` caps the whole payload and is
    checked before anything is allocated for the data.
    """
    if len(prefix) < 8:
        raise CodecError("tensor payload shorter than its 8-byte header length")
    (hlen,) = struct.unpack("<Q", bytes(prefix[:8]))
    if hlen > MAX_HEADER_BYTES or hlen > max_bytes:
        raise CodecError(f"tensor header of {hlen} bytes exceeds the limit")
    if len(prefix) < 8 + hlen:
        raise CodecError(f"tensor payload truncated inside its {hlen}-byte header")
    # bounded depth, 64-bit integers, no NaN: a hostile header is a CodecError, never a crash
    doc = jsondata.loads(
        bytes(prefix[8 : 8 + hlen]),
        "tensor header",
        max_bytes=MAX_HEADER_BYTES,
        max_nodes=MAX_HEADER_BYTES // 4,  # a header's values are at least 4 bytes apart
    )
    if not isinstance(doc, dict):
        raise CodecError("tensor header must be a JSON object")
    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for name, spec in doc.items():
        if name == METADATA_KEY:
            if not isinstance(spec, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in spec.items()
            ):
                raise CodecError("tensor header __metadata__ must map strings to strings")
            metadata = spec
            continue
        entries.append(_parse_entry(name, spec))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            kind = "overlaps the previous tensor" if e.begin < pos else "leaves a gap"
            raise CodecError(f"tensor {e.name!r}: data_offsets {kind}")
        pos = e.end
    if 8 + hlen + pos > max_bytes:
        raise CodecError(f"tensor payload of {8 + hlen + pos} bytes exceeds the limit {max_bytes}")
    return Header(tuple(entries), metadata, hlen, pos)


def _parse_entry(name: str, spec: Any) -> TensorEntry:
    if not name or len(name) > MAX_NAME_LEN:
        raise CodecError(f"tensor name of length {len(name)} is not allowed")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CodecError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str):
        raise CodecError(f"tensor {name!r}: dtype must be a string")
    size = itemsize(dtype)
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CodecError(f"tensor {name!r}: shape must be a list of ≤{MAX_DIMS} non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise CodecError(f"tensor {name!r}: data_offsets must be [begin, end] with begin ≤ end")
    # Python integers, before anything is allocated: a zero dimension beside huge ones makes an
    # empty tensor whose element count still overflows torch, so bound the non-zero product too
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CodecError(f"tensor {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    expected = math.prod(shape) * size
    if offsets[1] - offsets[0] != expected:
        raise CodecError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} "
            f"(expected {expected})"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def tensor_from_bytes(
    buf: bytearray | memoryview | bytes, entry: TensorEntry, offset: int, copy: bool
) -> torch.Tensor:
    import torch

    dt = torch_dtype(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dt)
    start = offset + entry.begin
    if copy:
        data = bytearray(memoryview(buf)[start : start + entry.nbytes])
        t = torch.frombuffer(data, dtype=torch.uint8)
    else:
        with warnings.catch_warnings():
            # frombuffer warns on read-only buffers; callers that pass one asked for views.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=torch.uint8, count=entry.nbytes, offset=start)
    return t.view(dt).reshape(entry.shape)


def decode(
    buf: bytes | bytearray | memoryview,
    max_bytes: int = DEFAULT_MAX_BYTES,
    copy: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode a whole framed payload into ``(tensors, metadata)``.

    By default tensors are views into ``buf`` when it is writable (zero-copy) and copies when it
    is immutable ``bytes`` (so the result is always safely writable).
    """
    header = parse_header(buf, max_bytes)
    if len(buf) != header.total_len:
        raise CodecError(
            f"tensor payload is {len(buf)} bytes but its header describes {header.total_len}"
        )
    if copy is None:
        copy = isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly)
    base = 8 + header.header_len
    tensors = {e.name: tensor_from_bytes(buf, e, base, copy) for e in header.entries}
    return tensors, header.metadata


class StreamDecoder:
    """Incremental decoder for a payload arriving in chunks of any size.

    Feed bytes with :meth:`feed`; each tensor is handed to ``on_tensor(name, tensor)`` as soon as
    its last byte arrives, so a consumer (e.g. a running aggregate) can use and drop it: memory
    stays at one tensor plus the chunk, whatever the model size. The header is validated (and the
    declared total checked against ``max_bytes``) before any tensor memory is allocated.
    """

    def __init__(
        self,
        on_tensor: Callable[[str, torch.Tensor], None],
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._on_tensor = on_tensor
        self._max = max_bytes
        self._head = bytearray()
        self.header: Header | None = None
        self._hlen = 0
        self._idx = 0  # next entry to fill
        self._cur: bytearray | None = None
        self._cur_len = 0  # bytes of the tensor being filled
        self._received = 0

    @property
    def done(self) -> bool:
        return self.header is not None and self._idx >= len(self.header.entries)

    @property
    def metadata(self) -> dict[str, str]:
        if self.header is None:
            raise CodecError("tensor stream ended before its header")
        return self.header.metadata

    def feed(self, chunk: bytes | memoryview) -> None:
        """Consume the next piece of the payload."""
        view = memoryview(chunk).cast("B")
        self._received += len(view)
        if self._received > self._max:
            raise CodecError(f"tensor stream exceeds the limit of {self._max} bytes")
        while self.header is None and len(view):
            if len(self._head) < 8:  # the header's length first
                take = min(len(view), 8 - len(self._head))
                self._head += view[:take]
                view = view[take:]
                if len(self._head) < 8:
                    break
                (self._hlen,) = struct.unpack("<Q", self._head)
                if self._hlen > MAX_HEADER_BYTES or self._hlen > self._max:
                    raise CodecError(f"tensor header of {self._hlen} bytes exceeds the limit")
            take = min(len(view), 8 + self._hlen - len(self._head))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == 8 + self._hlen:  # also when the header is (wrongly) empty
                self.header = parse_header(self._head, self._max)
                self._head = bytearray()
                self._start_next()
        while len(view):
            if self._cur is None:
                raise CodecError("tensor stream has bytes past the end of its payload")
            take = min(len(view), self._cur_len - len(self._cur))
            self._cur += view[:take]
            view = view[take:]
            if len(self._cur) == self._cur_len:
                self._deliver(self._cur)
                self._start_next()

    def _start_next(self) -> None:
        """Start the buffer of the next non-empty tensor, delivering empty ones on the way.

        The buffer grows as the tensor's bytes arrive rather than being allocated at the size
        the header declares: a few hostile bytes declaring a huge tensor cost nothing.
        """
        assert self.header is not None
        self._cur = None
        while self._idx < len(self.header.entries):
            entry = self.header.entries[self._idx]
            if entry.nbytes:
                self._cur = bytearray()
                self._cur_len = entry.nbytes
                return
            self._deliver(bytearray())

    def _deliver(self, data: bytearray) -> None:
        assert self.header is not None
        entry = self.header.entries[self._idx]
        tensor = tensor_from_bytes(data, entry, -entry.begin, copy=False)
        self._idx += 1
        self._on_tensor(entry.name, tensor)

    def finish(self) -> None:
        """Assert the payload is complete; a truncated stream is a CodecError."""
        if not self.done:
            raise CodecError("tensor stream ended before its payload was complete")
