"""The TensorBoard sink: event files under ``<run>/tb/``, one TensorBoard run per scope.

``tb/global`` holds the server's metrics per round, ``tb/<site>`` each site's result metrics
and what its script recorded, so ``tensorboard --logdir <run>/tb`` draws the global curve and
every site's side by side (same tag, one colour per run). Written with the ``tensorboard``
package's own record writer and protocol buffers (``pip install 'fedctl[tensorboard]'``),
synchronously on the sinks' thread: no writer thread per site, and at most
:data:`MAX_OPEN` event files open at once (a site whose file was closed appends to it when it
is opened again: one event file per scope and run, however many sites take turns).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedctl._fs import safe_name
from fedctl.tracking.sinks import GLOBAL, Histogram, RunInfo, Sink

#: event files kept open at once (one per scope); the least recently used is closed beyond it
MAX_OPEN = 128


class _EventFile:
    """One ``events.out.tfevents.*`` file: created with its version record, or reopened to
    append (records are self-delimiting, so a file read later holds both parts in order)."""

    def __init__(self, path: Path, new: bool) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        if new:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = RecordWriter(open(path, "wb" if new else "ab"))  # noqa: SIM115
        if new:
            self._write(Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def summary(self, value: Any, step: int, wall_time: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(Event(wall_time=wall_time, step=step, summary=Summary(value=[value])))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardSink(Sink):
    """Event files per scope; see the module docstring."""

    name = "tensorboard"

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        self.max_open = max_open
        self.root: Path | None = None
        self._files: OrderedDict[str, _EventFile] = OrderedDict()
        #: every scope's event file, open or not
        self._paths: dict[str, Path] = {}
        self._seq = itertools.count()
        self._host = safe_name(socket.gethostname())

    def where(self) -> str:
        return "tb/"

    def open(self, info: RunInfo) -> None:
        import tensorboard.compat.proto.summary_pb2  # noqa: F401  (fails now if not installed)

        self.root = info.root / "tb"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, scope: str) -> Path:
        """The TensorBoard run folder of ``scope``."""
        assert self.root is not None
        return self.root / (GLOBAL if scope == GLOBAL else safe_name(scope) or "_")

    def _file(self, scope: str) -> _EventFile:
        fh = self._files.get(scope)
        if fh is not None:
            self._files.move_to_end(scope)
            return fh
        while len(self._files) >= self.max_open:
            _, old = self._files.popitem(last=False)
            old.close()
        path = self._paths.get(scope)
        if path is None:
            name = f"events.out.tfevents.{int(time.time()):010d}.{self._host}.{os.getpid()}"
            path = self._paths[scope] = self.folder(scope) / f"{name}.{next(self._seq):06d}"
            fh = _EventFile(path, new=True)
        else:
            fh = _EventFile(path, new=False)
        self._files[scope] = fh
        return fh

    def scalars(self, scope: str, step: int, values: dict[str, float], wall_time: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        fh = self._file(scope)
        for tag, value in values.items():
            fh.summary(Summary.Value(tag=tag, simple_value=value), step, wall_time)

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
        self._file(scope).summary(value, step, wall_time)

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
        self._file(scope).summary(Summary.Value(tag=tag, histo=proto), step, wall_time)

    def flush(self) -> None:
        for fh in self._files.values():
            fh.flush()

    def close(self, status: str | None) -> None:
        while self._files:
            _, fh = self._files.popitem(last=False)
            fh.close()
