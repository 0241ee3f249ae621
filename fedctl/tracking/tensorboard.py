"""The TensorBoard sink: event files under ``<run>/tb/``, one TensorBoard run per scope.

``tb/global`` holds the server's metrics per round, ``tb/<site>`` each site's result metrics
and what its script recorded, so ``tensorboard --logdir <run>/tb`` draws the global curve and
every site's side by side (same tag, one colour per run). Written with the ``tensorboard``
package's record framing and protocol buffers (``pip install 'fedctl[tensorboard]'``), on the
sinks' thread: no writer thread and no open file per site. Records are collected per scope and
appended to each scope's one event file when the sinks flush (every few seconds, and at the
end), so 1,000 sites cost one open and one write each per flush, not one per record.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

from fedctl._fs import safe_name
from fedctl.tracking.sinks import GLOBAL, Histogram, RunInfo, Sink

#: records held in memory beyond this many bytes are written out before the next flush
MAX_PENDING = 8 * 1024 * 1024


class _Records:
    """What a record writer writes to, kept in memory until the sink flushes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.nbytes = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.nbytes += len(data)

    def flush(self) -> None:
        """Nothing to do: the sink writes the parts out."""

    def close(self) -> None:
        """Nothing to do: the sink writes the parts out."""


class TensorBoardSink(Sink):
    """Event files per scope; see the module docstring."""

    name = "tensorboard"

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self.root: Path | None = None
        #: every scope's event file, written yet or not
        self._paths: dict[str, Path] = {}
        #: records not written yet, by scope (with their framing), and their total size
        self._pending: dict[str, tuple[Any, _Records]] = {}
        self._pending_bytes = 0
        #: scopes whose folder has been made
        self._made: set[str] = set()
        self._seq = itertools.count()
        self._host = safe_name(socket.gethostname())
        self._pb: Any = None

    def where(self) -> str:
        return "tb/"

    def open(self, info: RunInfo) -> None:
        # imported here, once: fails now if the extra is not installed, and costs nothing later
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._pb = (event_pb2.Event, summary_pb2.Summary, RecordWriter)
        self.root = info.root / "tb"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, scope: str) -> Path:
        """The TensorBoard run folder of ``scope``."""
        assert self.root is not None
        return self.root / (GLOBAL if scope == GLOBAL else safe_name(scope) or "_")

    def _summary(self, scope: str, value: Any, step: int, wall_time: float) -> None:
        event_cls, summary_cls, _ = self._pb
        self._add(
            scope, event_cls(wall_time=wall_time, step=step, summary=summary_cls(value=[value]))
        )

    def _add(self, scope: str, event: Any) -> None:
        """Frame ``event`` for ``scope``'s event file (a new file starts with its version)."""
        event_cls, _, record_writer = self._pb
        entry = self._pending.get(scope)
        before = entry[1].nbytes if entry is not None else 0  # a new one: its version too
        if entry is None:
            records = _Records()
            entry = self._pending[scope] = (record_writer(records), records)
            if scope not in self._paths:
                name = f"events.out.tfevents.{int(time.time()):010d}.{self._host}.{os.getpid()}"
                self._paths[scope] = self.folder(scope) / f"{name}.{next(self._seq):06d}"
                version = event_cls(wall_time=time.time(), step=0, file_version="brain.Event:2")
                entry[0].write(version.SerializeToString())
        writer, records = entry
        writer.write(event.SerializeToString())
        self._pending_bytes += records.nbytes - before
        if self._pending_bytes >= self.max_pending:
            self.flush()

    def scalars(self, scope: str, step: int, values: dict[str, float], wall_time: float) -> None:
        summary_cls = self._pb[1]
        for tag, value in values.items():
            self._summary(scope, summary_cls.Value(tag=tag, simple_value=value), step, wall_time)

    def text(self, scope: str, tag: str, text: str, step: int, wall_time: float) -> None:
        from tensorboard.compat.proto import types_pb2
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8", "replace")],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
        )
        value = Summary.Value(tag=tag, metadata=meta, tensor=tensor)
        self._summary(scope, value, step, wall_time)

    def histogram(self, scope: str, tag: str, hist: Histogram, step: int, wall_time: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        proto = HistogramProto(
            min=hist.min,
            max=hist.max,
            num=hist.num,
            sum=hist.sum,
            sum_squares=hist.sum_squares,
            bucket_limit=hist.bucket_limits,
            bucket=hist.bucket_counts,
        )
        self._summary(scope, Summary.Value(tag=tag, histo=proto), step, wall_time)

    def flush(self) -> None:
        """Append each scope's new records to its event file (created with its folder)."""
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        for scope, (_, records) in pending.items():
            path = self._paths[scope]
            if scope not in self._made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(scope)
            with open(path, "ab") as fh:
                fh.write(b"".join(records.parts))

    def close(self, status: str | None) -> None:
        self.flush()
