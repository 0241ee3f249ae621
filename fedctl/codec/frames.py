"""Frames: the unit every fedctl message travels in (gRPC messages and local sockets alike).

    b"FC" | version (1 byte) | reserved (1 byte) | header length (u32 LE) | JSON header | payload

The header is a JSON object with a ``t`` (message type) field; the payload is raw bytes (a chunk
of a file, usually nothing). Decoding checks the magic, version, sizes and JSON shape before it
allocates anything, and never executes or unpickles anything. A frame that fails these checks
raises :class:`FrameError`; the receiver closes that stream and keeps serving others.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any

from fedctl.codec import jsondata
from fedctl.errors import CodecError

MAGIC = b"FC"
VERSION = 1
PREFIX = struct.Struct("<2sBBI")
MAX_HEADER = 1024 * 1024
#: payload chunks are at most this big; a frame is at most CHUNK + MAX_HEADER + prefix
CHUNK = 4 * 1024 * 1024
MAX_FRAME = CHUNK + MAX_HEADER + PREFIX.size


class FrameError(CodecError):
    """A malformed, oversized or unexpected frame."""


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """One frame as bytes."""
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"frame header of {len(raw)} bytes exceeds {MAX_HEADER}")
    if len(payload) > CHUNK:
        raise FrameError(f"frame payload of {len(payload)} bytes exceeds {CHUNK}")
    return b"".join((PREFIX.pack(MAGIC, VERSION, 0, len(raw)), raw, payload))


def decode(
    data: bytes | memoryview, expect: set[str] | None = None
) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of one frame; ``expect`` limits the accepted message types."""
    header, start = _split(data, expect)
    return header, bytes(data[start:])


def decode_view(
    data: bytes | memoryview, expect: set[str] | None = None
) -> tuple[dict[str, Any], memoryview]:
    """:func:`decode` with the payload as a read-only view of ``data`` (no copy)."""
    header, start = _split(data, expect)
    return header, memoryview(data).toreadonly()[start:]


def _split(data: bytes | memoryview, expect: set[str] | None) -> tuple[dict[str, Any], int]:
    """The checked header of one frame and where its payload starts."""
    if len(data) < PREFIX.size:
        raise FrameError("frame shorter than its prefix")
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    magic, version, _, hlen = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("not a fedctl frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if hlen > MAX_HEADER or PREFIX.size + hlen > len(data):
        raise FrameError("frame header length is out of bounds")
    try:
        header = jsondata.loads(bytes(data[PREFIX.size : PREFIX.size + hlen]), "frame header")
    except CodecError as exc:
        raise FrameError(str(exc)) from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise FrameError("frame header must be an object with a string 't'")
    if expect is not None and header["t"] not in expect:
        raise FrameError(f"unexpected message type {header['t']!r}")
    return header, PREFIX.size + hlen


class FrameSocket:
    """Frames over a stream socket (local IPC): each frame is prefixed by its u32 length.

    ``send`` is thread-safe; ``recv`` is meant for one reading thread.
    """

    _LEN = struct.Struct("<I")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frame = encode(header, payload)
        with self._send_lock:
            self.sock.sendall(self._LEN.pack(len(frame)) + frame)

    def _recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                if buf:
                    raise FrameError("connection closed in the middle of a frame")
                return None
            buf += chunk
        return bytes(buf)

    def recv(self, expect: set[str] | None = None) -> tuple[dict[str, Any], bytes] | None:
        """The next frame, or None when the peer closed the connection cleanly."""
        head = self._recv_exact(self._LEN.size)
        if head is None:
            return None
        (n,) = self._LEN.unpack(head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        data = self._recv_exact(n)
        if data is None:
            raise FrameError("connection closed in the middle of a frame")
        return decode(data, expect)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
