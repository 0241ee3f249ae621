"""Metrics sinks: where a run's numbers go besides its JSONL files (TensorBoard, MLflow).

The process that writes a run folder (the simulator's driver, a server's job process) owns the
sinks; sites only stream records. :class:`SinkHub` takes what the :class:`RunStore` sees — the
global metrics of each round with its duration, participation and bytes moved, each site's
result metrics, and what scripts record (``SummaryWriter``, ``flare.log``) — and hands it to the
sinks from one background thread through a bounded queue: training never waits for a sink. A
sink that raises is reported once (``run.log``) and gets nothing more; the job goes on.

Which sinks run (:func:`plan`) is the job's choice (the recipe's ``tracking`` argument) over
the environment's (``FEDCTL_TRACKING``, ``MLFLOW_TRACKING_URI``); docs/tracking.md has the
rules. JSONL is always written, by the RunStore itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedctl.constants import ENV_TRACKING, SINK_CLOSE_TIMEOUT, SINK_QUEUE_ITEMS

log = logging.getLogger("fedctl.tracking")

#: the scope of the server's own metrics (every other scope is a site's name)
GLOBAL = "global"
#: the sinks fedctl has, and the package each needs
SINKS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: the extra that installs each sink's package
EXTRAS = {"tensorboard": "fedctl[tensorboard]", "mlflow": "fedctl[mlflow]"}
#: a tag (metric name) longer than this is refused
MAX_TAG = 256
#: a text record longer than this is cut
MAX_TEXT = 64 * 1024
#: a histogram with more buckets than this is refused
MAX_BUCKETS = 1024
#: seconds between flushes of the sinks while records keep coming
FLUSH_EVERY = 5.0


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows of the run it writes: its folder, job, recipe arguments."""

    root: Path
    job_id: str
    name: str
    kind: str
    mode: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Histogram:
    """A histogram as TensorBoard stores one: ``bucket_counts[i]`` values ≤ ``bucket_limits[i]``
    (and above the previous limit)."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class Sink(ABC):
    """One destination. Every method runs on the hub's thread, never on the training path."""

    name: ClassVar[str]

    @abstractmethod
    def open(self, info: RunInfo) -> None:
        """Prepare to write ``info``'s run (create files, runs, experiments)."""

    @abstractmethod
    def scalars(self, scope: str, step: int, values: dict[str, float], wall_time: float) -> None:
        """Numbers of ``scope`` (GLOBAL or a site) at ``step`` (a round, or a script's step)."""

    def text(  # noqa: B027  (optional: sinks that keep no text do nothing)
        self, scope: str, tag: str, text: str, step: int, wall_time: float
    ) -> None:
        """A text note (sinks that keep none ignore it)."""

    def histogram(  # noqa: B027  (optional, as text)
        self, scope: str, tag: str, hist: Histogram, step: int, wall_time: float
    ) -> None:
        """A histogram (sinks that keep none ignore it)."""

    def flush(self) -> None:  # noqa: B027  (optional: sinks that write at once)
        """Make what was written so far visible."""

    @abstractmethod
    def close(self, status: str | None) -> None:
        """Flush and release; ``status`` is the run's final status (None: the run is not over,
        e.g. a server's job process stopped with its server and resumes later)."""

    def where(self) -> str:
        """Where this sink writes, for the run log."""
        return ""


# ---------------------------------------------------------------------------- choosing sinks


def installed(sink: str) -> bool:
    """Whether the package ``sink`` needs can be imported here."""
    try:
        return importlib.util.find_spec(SINKS[sink]) is not None
    except (ImportError, ValueError):
        return False


def check_job_tracking(spec: Any) -> dict[str, Any] | None:
    """A recipe's ``tracking`` argument, validated (ValueError with one line otherwise).

    ``None`` (the environment decides) or a dict with any of ``"tensorboard": bool`` and
    ``"mlflow": bool | {"tracking_uri": str, "experiment": str}``. A job's ``tracking_uri`` is
    ``http(s)://…`` or a relative folder (inside the run folder): a job never names a path on
    the machine that runs it.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"tracking must be a dict or None, got {type(spec).__name__}")
    unknown = set(spec) - set(SINKS)
    if unknown:
        raise ValueError(
            f"tracking: unknown sink {sorted(unknown)[0]!r} (known: {', '.join(SINKS)})"
        )
    if "tensorboard" in spec and not isinstance(spec["tensorboard"], bool):
        raise ValueError("tracking['tensorboard'] must be true or false")
    ml = spec.get("mlflow")
    if isinstance(ml, dict):
        extra = set(ml) - {"tracking_uri", "experiment"}
        if extra:
            raise ValueError(
                f"tracking['mlflow']: unknown key {sorted(extra)[0]!r} "
                "(known: tracking_uri, experiment)"
            )
        for key in ("tracking_uri", "experiment"):
            value = ml.get(key)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 1000):
                raise ValueError(f"tracking['mlflow']['{key}'] must be a non-empty string")
        uri = ml.get("tracking_uri")
        if uri is not None:
            _check_job_uri(uri)
    elif "mlflow" in spec and not isinstance(ml, bool):
        raise ValueError("tracking['mlflow'] must be true, false or a dict")
    return dict(spec)


def _check_job_uri(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        return
    if "://" in uri or uri.startswith(("file:", "/", "~", "\\")) or "\0" in uri:
        raise ValueError(
            f"tracking['mlflow']['tracking_uri'] {uri!r}: a job names an http(s):// server or a "
            "folder relative to its run folder; set MLFLOW_TRACKING_URI where it runs for "
            "anything else"
        )
    if ".." in Path(uri).parts or ":" in uri:
        raise ValueError(
            f"tracking['mlflow']['tracking_uri'] {uri!r}: a relative folder must stay inside "
            "the run folder"
        )


@dataclass
class Choice:
    """Which sinks a run gets, with the MLflow settings, and what to say about it."""

    tensorboard: bool = False
    mlflow: bool = False
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else <run>/mlruns
    experiment: str | None = None
    notes: list[str] = field(default_factory=list)


def environment_choice(environ: Mapping[str, str]) -> dict[str, bool | str]:
    """``FEDCTL_TRACKING`` as ``{sink: True | False | "auto"}`` (ValueError when invalid).

    Unset or ``auto``: TensorBoard when installed, MLflow when installed and
    ``MLFLOW_TRACKING_URI`` is set. ``none``: neither. Otherwise a comma list of sinks.
    """
    raw = environ.get(ENV_TRACKING, "").strip().lower()
    if raw in ("", "auto"):
        return {"tensorboard": "auto", "mlflow": "auto"}
    if raw in ("none", "jsonl"):
        return {"tensorboard": False, "mlflow": False}
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for n in names:
        if n not in SINKS:
            raise ValueError(
                f"{ENV_TRACKING}={raw!r}: unknown sink {n!r} "
                f"(use auto, none, or a comma list of {', '.join(SINKS)})"
            )
    return {s: s in names for s in SINKS}


def plan(job_tracking: dict[str, Any] | None, environ: Mapping[str, str]) -> Choice:
    """The sinks of a run: the job's explicit choice per sink, else the environment's."""
    choice = Choice()
    try:
        env = environment_choice(environ)
    except ValueError as exc:
        choice.notes.append(f"{exc}; only the JSONL files are written")
        return choice
    job = job_tracking or {}
    for sink in SINKS:
        wanted: bool | str = env[sink]
        if sink in job:
            wanted = job[sink] is not False
        if wanted == "auto":
            wanted = installed(sink) and (
                sink != "mlflow" or bool(environ.get("MLFLOW_TRACKING_URI"))
            )
        elif wanted and not installed(sink):
            choice.notes.append(
                f"{sink} was asked for but is not installed here (pip install '{EXTRAS[sink]}')"
            )
            wanted = False
        setattr(choice, sink, bool(wanted))
    ml = job.get("mlflow")
    if isinstance(ml, dict):
        choice.tracking_uri = ml.get("tracking_uri")
        choice.experiment = ml.get("experiment")
    return choice


def build(choice: Choice) -> list[Sink]:
    """The sink objects for ``choice`` (their packages are imported later, on the hub thread)."""
    sinks: list[Sink] = []
    if choice.tensorboard:
        from fedctl.tracking.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink())
    if choice.mlflow:
        from fedctl.tracking.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(choice.tracking_uri, choice.experiment))
    return sinks


# ---------------------------------------------------------------------------- client records


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _tag(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_TAG else None


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62:
        return value
    return None


def numbers(values: Mapping[str, Any] | None) -> dict[str, float]:
    """The finite numbers of a metrics dict, under valid tags."""
    out: dict[str, float] = {}
    for k, v in (values or {}).items():
        tag, num = _tag(k), _num(v)
        if tag is not None and num is not None:
            out[tag] = num
    return out


def _histogram(value: Any) -> Histogram | None:
    if not isinstance(value, dict):
        return None
    nums = {k: _num(value.get(k)) for k in ("min", "max", "num", "sum", "sum_squares")}
    limits, counts = value.get("bucket_limits"), value.get("bucket_counts")
    if any(v is None for v in nums.values()) or not isinstance(limits, list):
        return None
    if not isinstance(counts, list) or not 0 < len(limits) == len(counts) <= MAX_BUCKETS:
        return None
    lim = [_num(x) for x in limits]
    cnt = [_num(x) for x in counts]
    if any(x is None for x in lim) or any(x is None or x < 0 for x in cnt):
        return None
    lim_f = [float(x) for x in lim if x is not None]
    if any(b < a for a, b in itertools.pairwise(lim_f)):
        return None
    return Histogram(
        min=float(nums["min"] or 0.0),
        max=float(nums["max"] or 0.0),
        num=float(nums["num"] or 0.0),
        sum=float(nums["sum"] or 0.0),
        sum_squares=float(nums["sum_squares"] or 0.0),
        bucket_limits=lim_f,
        bucket_counts=[float(x) for x in cnt if x is not None],
    )


def record_items(site: str, rec: Any) -> list[tuple[Any, ...]] | None:
    """A script's record (from a site: untrusted) as hub items; None when it is not valid.

    A record's step is the script's ``global_step`` when it gave one, else the round (counted
    from 1, as everywhere users see rounds). Null values (NaN, inf) are skipped.
    """
    if not isinstance(rec, dict):
        return None
    kind, tag = rec.get("kind"), _tag(rec.get("tag"))
    if tag is None:
        return None
    step = _int(rec.get("step"))
    if step is None:
        rnd = _int(rec.get("round"))
        step = rnd + 1 if rnd is not None else 0
    wall = _num(rec.get("time")) or time.time()
    value = rec.get("value")
    if kind in ("scalar", "metric"):
        if rec.get("multi"):
            if not isinstance(value, dict):
                return None
            vals = numbers({f"{tag}/{k}": v for k, v in value.items() if isinstance(k, str)})
            return [("scalars", site, step, vals, wall)] if vals else []
        if value is None:
            return []
        num = _num(value)
        return None if num is None else [("scalars", site, step, {tag: num}, wall)]
    if kind == "text":
        if not isinstance(value, str):
            return None
        return [("text", site, tag, value[:MAX_TEXT], step, wall)]
    if kind == "histogram":
        hist = _histogram(value)
        return None if hist is None else [("histogram", site, tag, hist, step, wall)]
    return None


# ---------------------------------------------------------------------------- the hub

_END = ("end",)


class SinkHub:
    """Feeds sinks from one background thread; see the module docstring.

    ``report`` gets one line per problem (a failed sink, dropped records); the RunStore writes
    it to run.log.
    """

    def __init__(
        self,
        sinks: list[Sink],
        info: RunInfo,
        report: Callable[[str], None],
        *,
        max_items: int = SINK_QUEUE_ITEMS,
    ) -> None:
        self.sinks = list(sinks)
        self.info = info
        self._report = report
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(max_items)
        self._active = list(self.sinks)
        self._failed: dict[str, str] = {}
        self.dropped = 0
        self._bad_sites: set[str] = set()
        self._status: str | None = None
        self._thread = threading.Thread(target=self._run, name="fedctl-sinks", daemon=True)
        self._closed = False

    @property
    def failed(self) -> dict[str, str]:
        """Sinks that failed, with the one line that said why."""
        return dict(self._failed)

    def start(self) -> SinkHub:
        self._thread.start()
        return self

    # ------------------------------------------------------------------ feeding (any thread)

    def put(self, item: tuple[Any, ...]) -> None:
        """Queue one item; never blocks (a full queue drops it and counts it)."""
        if self._closed or not self._active:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                self._say(
                    f"tracking: the sinks are {self._queue.maxsize} records behind; records are "
                    "dropped until they catch up (the JSONL files have everything)"
                )

    def scalars(self, scope: str, step: int, values: dict[str, float], wall: float) -> None:
        if values:
            self.put(("scalars", scope, step, values, wall))

    def records(self, site: str, records: list[Any]) -> None:
        """A site's script records (validated here: they come from the site)."""
        bad = 0
        for rec in records:
            items = record_items(site, rec)
            if items is None:
                bad += 1
                continue
            for item in items:
                self.put(item)
        if bad and site not in self._bad_sites:
            self._bad_sites.add(site)
            self._say(
                f"tracking: {bad} record(s) from {site} are not valid metrics, text or "
                "histograms; they are kept in metrics/tracking.jsonl only (said once per site)"
            )

    # ------------------------------------------------------------------ the thread

    def _say(self, line: str) -> None:
        log.warning("%s", line)
        with contextlib.suppress(Exception):  # the run log may be closed after a timeout
            self._report(line)

    def _call(self, sink: Sink, op: str, *args: Any) -> None:
        if sink not in self._active:
            return
        try:
            getattr(sink, op)(*args)
        except Exception as exc:
            self._active.remove(sink)
            why = f"{type(exc).__name__}: {exc}".strip()
            self._failed[sink.name] = why
            self._say(
                f"tracking: the {sink.name} sink failed ({op}) and is off for the rest of this "
                f"run: {why[:500]}"
            )

    def _run(self) -> None:
        for sink in list(self._active):
            self._call(sink, "open", self.info)
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._closed:  # close() gave up waiting (a hung sink): stop once drained
                    break
                item = None
            if item is _END:
                break
            if item is not None:
                for sink in list(self._active):
                    self._call(sink, *item)
            now = time.monotonic()
            if now - last_flush >= FLUSH_EVERY or (item is None and now - last_flush >= 1.0):
                for sink in list(self._active):
                    self._call(sink, "flush")
                last_flush = now
        for sink in list(self._active):
            self._call(sink, "close", self._status)

    def close(self, status: str | None, timeout: float = SINK_CLOSE_TIMEOUT) -> bool:
        """Write what is queued, close the sinks (with the run's final ``status``); False when
        they did not finish within ``timeout`` seconds (what was left is lost, and said so)."""
        if self._closed:
            return True
        self._closed = True
        self._status = status
        if not self._thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        # the end marker must get in even when the queue is full (a hung sink: until deadline)
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(_END, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._say(
                f"tracking: the sinks did not finish within {timeout:.0f} s; what they had not "
                "written yet is lost (the JSONL files have everything)"
            )
            return False
        if self.dropped:
            self._say(f"tracking: {self.dropped} record(s) were dropped while the sinks lagged")
        return True
