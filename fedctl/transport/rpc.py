"""The fedctl gRPC service: one service, raw-bytes methods carrying frames.

No protobuf or generated code: every request and response is one :mod:`~fedctl.codec.frames`
frame holding a :mod:`~fedctl.codec.protocol` message, passed through gRPC as bytes. Methods:

    Session      stream ↔ stream   a site's control channel (tasks, results, acks, heartbeats)
    Fetch        unary → stream    a site downloads a blob (job bundle, a task's model)
    Push         stream → unary    a site uploads a blob (its result)
    Admin        unary → unary     admin requests (list, status, abort, sites, events, …)
    AdminUpload  stream → unary    submit a job bundle
    AdminStream  unary → stream    download a job's results, follow logs and events

Large payloads always move as files in chunks of ``frames.CHUNK`` bytes, never as one message:
gRPC's message limit does not apply, and memory per transfer is one chunk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import BackgroundSHA256, open_new
from fedctl.codec import frames, protocol
from fedctl.codec.protocol import Chunk, End, Message

if TYPE_CHECKING:
    import grpc

SERVICE = "fedctl.v1.Fed"
METHODS = ("Session", "Fetch", "Push", "Admin", "AdminUpload", "AdminStream")

#: gRPC options shared by both ends: frames up to MAX_FRAME, keepalive pings so a dead peer is
#: noticed, no limit on pings without data (our streams are long-lived and often idle).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", frames.MAX_FRAME + 1024),
    ("grpc.max_receive_message_length", frames.MAX_FRAME + 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


def method(name: str) -> str:
    """Full gRPC method path."""
    return f"/{SERVICE}/{name}"


def generic_handler(impl: Any) -> grpc.GenericRpcHandler:
    """Route the service's methods to ``impl``'s methods of the same names."""
    import grpc

    kinds: dict[str, Callable[..., Any]] = {
        "Session": grpc.stream_stream_rpc_method_handler,
        "Fetch": grpc.unary_stream_rpc_method_handler,
        "Push": grpc.stream_unary_rpc_method_handler,
        "Admin": grpc.unary_unary_rpc_method_handler,
        "AdminUpload": grpc.stream_unary_rpc_method_handler,
        "AdminStream": grpc.unary_stream_rpc_method_handler,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: kinds[name](getattr(impl, name)) for name in METHODS}
    )


class Stubs:
    """Callables for every method on a channel (bytes in, bytes out)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Session = channel.stream_stream(method("Session"))
        self.Fetch = channel.unary_stream(method("Fetch"))
        self.Push = channel.stream_unary(method("Push"))
        self.Admin = channel.unary_unary(method("Admin"))
        self.AdminUpload = channel.stream_unary(method("AdminUpload"))
        self.AdminStream = channel.unary_stream(method("AdminStream"))


def file_frames(
    path: str | os.PathLike[str],
    first: Message | dict[str, Any] | None = None,
    sha256: str | None = None,
) -> Iterator[bytes]:
    """Frames for a file: an optional header frame, then ``chunk`` frames, then ``end``.

    The end frame carries the file's SHA-256: ``sha256`` when the caller already knows it (it was
    computed when the file was written), else computed while sending. The receiver always hashes
    what it gets and compares.
    """
    if isinstance(first, Message):
        yield protocol.encode(first)
    elif first is not None:  # a raw header (what a test of a misbehaving peer sends)
        yield frames.encode(first)
    h = hashlib.sha256() if sha256 is None else None
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(frames.CHUNK):
            if h is not None:
                h.update(block)
            size += len(block)
            yield protocol.encode(Chunk(), block)
    digest = h.hexdigest() if h is not None else sha256
    assert digest is not None
    yield protocol.encode(End(size, digest))


def receive_file(
    messages: Iterator[bytes],
    dest: str | os.PathLike[str],
    *,
    max_bytes: int,
    expect_size: int | None = None,
    expect_sha256: str | None = None,
    reuse: bool = False,
) -> tuple[int, str]:
    """Write ``chunk`` frames to ``dest`` (atomically) until ``end``; returns (size, sha256).

    Refuses more than ``max_bytes`` as soon as it is exceeded, and a size or hash that differ
    from the ``end`` frame or from what was announced. A failure leaves no file behind.
    ``reuse`` overwrites a spare of ``dest``'s folder if it keeps any
    (:func:`fedctl._fs.open_new`): only for a file that is retired once read, never one that
    another process maps and keeps.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_new(dest, reuse=reuse)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, BackgroundSHA256() as h:
            for raw in messages:
                msg, payload = protocol.decode_chunk(raw)
                if isinstance(msg, Chunk):
                    size += len(payload)
                    if size > max_bytes:
                        raise frames.FrameError(f"transfer exceeds the limit of {max_bytes} bytes")
                    h.update(payload)
                    out.write(payload)
                    continue
                digest = h.hexdigest()
                if msg.size != size or msg.sha256 != digest:
                    raise frames.FrameError(
                        "transfer ended with a size or hash that does not match"
                    )
                if expect_size is not None and size != expect_size:
                    raise frames.FrameError(
                        f"transfer is {size} bytes, {expect_size} were announced"
                    )
                if expect_sha256 is not None and digest != expect_sha256:
                    raise frames.FrameError("transfer does not match the announced SHA-256")
                out.flush()
                os.ftruncate(out.fileno(), size)  # a longer spare's tail goes
                break
            else:
                raise frames.FrameError("transfer ended before its end frame")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size, digest
