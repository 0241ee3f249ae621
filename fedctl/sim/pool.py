"""The simulator's pool of worker processes and the Communicator that drives it.

Workers are processes forked by a zygote (``backend="process"``, :mod:`fedctl.sim.procs`), Ray
actors (``backend="ray"``) or one in-process thread (``backend="local"``, for debugging with
breakpoints). Virtual sites are multiplexed onto workers: each broadcast queues
one work item per target, idle workers take batches of items, and completed batches are
turned into results as they arrive. Dispatch is pull-based (it happens inside
``ResultStream.next``), so there is no scheduler thread to go wrong.

Batches amortise the per-call cost of Ray (≈ 0.6 ms) over many small sites; their size is
capped by model bytes so that at most ~16 MiB of results wait in the object store per worker.
For small models a worker also has its next batch queued while it runs one (:data:`DEPTH`), so
it does not wait while the driver takes in and aggregates the batch it just finished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedctl.codec.model import Task, TaskResult
from fedctl.errors import RunFailed, UsageError
from fedctl.sim.transport import LocalTransport, RayTransport
from fedctl.sim.worker import WorkerConfig, WorkerCore, WorkItem
from fedctl.workflows.base import Communicator, ResultStream
from fedctl.workflows.clock import DROPPED, VirtualClock

BATCH_BYTES = 16 * 1024 * 1024
MAX_BATCH = 32
#: batches a worker has at once (the one it runs, and the next) when a model is small enough
#: that a finished batch's results and a running one stay within BATCH_BYTES; larger models
#: keep one, so a result is never held while the next site trains (memory of large models)
DEPTH = 2
START_TIMEOUT = 300.0


class WorkerDied(Exception):
    """A worker process ended while running a batch."""


def available_cpus() -> int:
    """CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Pool(ABC):
    """W workers that each run one batch at a time."""

    size: int
    transport: Any

    @abstractmethod
    def submit(self, w: int, items: list[WorkItem], model_id: str, box: list[Any]) -> Any:
        """Start a batch on worker ``w``; returns a token."""

    @abstractmethod
    def wait(self, tokens: list[Any], timeout: float) -> list[Any]:
        """Tokens among ``tokens`` that completed within ``timeout`` (at least one if any)."""

    @abstractmethod
    def result(self, token: Any) -> list[tuple[TaskResult, Any]]:
        """The batch's results; raises WorkerDied if the worker process ended."""

    @abstractmethod
    def restart(self, w: int) -> None:
        """Replace worker ``w`` (killing it if it still runs)."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker."""


def _daemon_executor() -> tuple[queue.Queue[Any], threading.Thread]:
    """A single daemon thread running submitted calls (a hung script never blocks exit)."""
    jobs: queue.Queue[Any] = queue.Queue()

    def loop() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    thread = threading.Thread(target=loop, name="fedctl-sim-local", daemon=True)
    thread.start()
    return jobs, thread


class LocalPool(Pool):
    """One worker in this process (a daemon thread), for debugging and fast tests."""

    def __init__(self, config: WorkerConfig) -> None:
        self.size = 1
        self.transport = LocalTransport()
        self.config = config
        self.core = WorkerCore(config, self.transport)
        self.jobs, self.thread = _daemon_executor()
        #: closes of cores replaced by restart(), run by their threads once these are free
        self._retired: list[concurrent.futures.Future[Any]] = []

    def _call(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.jobs.put((fn, args, fut))
        return fut

    def submit(self, w: int, items: list[WorkItem], model_id: str, box: list[Any]) -> Any:
        return self._call(self.core.run_batch, items, model_id, box)

    def wait(self, tokens: list[Any], timeout: float) -> list[Any]:
        done, _ = concurrent.futures.wait(
            tokens, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(done)

    def result(self, token: Any) -> list[tuple[TaskResult, Any]]:
        return token.result()

    def restart(self, w: int) -> None:
        # A thread cannot be killed: a hung script keeps its thread; start a fresh one. Batches
        # still queued for the old thread are cancelled: they must not run after all.
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[2].cancel()
        # the old core is closed by its own thread once its batch is over (its job folder's
        # modules and importability go with it), however long that takes; the working folder
        # is the new core's by then
        self._retired.append(self._call(self.core.close, False))
        self.jobs.put(None)
        self.core = WorkerCore(self.config, self.transport)
        self.jobs, self.thread = _daemon_executor()

    def close(self) -> None:
        deadline = time.monotonic() + 30
        for fut in [self._call(self.core.close), *self._retired]:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pass  # a hung script holds its thread; a daemon, it dies with the process
        self.jobs.put(None)


class RayPool(Pool):
    """W Ray actors, each a worker process."""

    def __init__(self, config: WorkerConfig, size: int, gpus: float | None) -> None:
        import ray

        from fedctl.sim.ray_worker import SimWorkerActor

        self.size = size
        self.transport = RayTransport()
        self.config = config
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
        if gpus:
            options["num_gpus"] = gpus / size
        self._actor_cls = ray.remote(**options)(SimWorkerActor)
        self.actors: list[Any] = [None] * size
        #: the Ray node each worker runs on
        self.nodes: list[str] = [""] * size
        for w in range(size):
            self.actors[w] = self._new_actor(w)
        self._ready(range(size))

    def _new_actor(self, w: int) -> Any:
        """Worker ``w``, placed round-robin over the cluster's live nodes (Ray puts zero-CPU
        actors on one node otherwise, even with its SPREAD strategy; a soft affinity fell back
        to the head node in one run of three here). A worker restarted after its node died goes
        to a node alive then."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        if len(nodes) < 2:
            return self._actor_cls.remote(self.config)
        where = NodeAffinitySchedulingStrategy(nodes[w % len(nodes)], soft=False)
        return self._actor_cls.options(scheduling_strategy=where).remote(self.config)

    def _ready(self, which: Sequence[int]) -> None:
        import ray

        refs = [self.actors[w].ready.remote() for w in which]
        try:
            for w, (_, node) in zip(which, ray.get(refs, timeout=START_TIMEOUT), strict=True):
                self.nodes[w] = node
        except ray.exceptions.GetTimeoutError:
            raise RunFailed(
                f"simulator workers did not start within {START_TIMEOUT:.0f}s"
            ) from None
        except ray.exceptions.RayError as exc:
            raise RunFailed(f"a simulator worker failed to start: {_ray_cause(exc)}") from None

    def submit(self, w: int, items: list[WorkItem], model_id: str, box: list[Any]) -> Any:
        return self.actors[w].run_batch.remote(items, model_id, box)

    def wait(self, tokens: list[Any], timeout: float) -> list[Any]:
        import ray

        done, _ = ray.wait(tokens, num_returns=1, timeout=timeout, fetch_local=False)
        if done:
            more, _ = ray.wait(tokens, num_returns=len(tokens), timeout=0, fetch_local=False)
            done = more or done
        return done

    def result(self, token: Any) -> list[tuple[TaskResult, Any]]:
        import ray

        try:
            return ray.get(token)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            raise WorkerDied(_ray_cause(exc)) from None

    def restart(self, w: int) -> None:
        import ray

        try:
            ray.kill(self.actors[w], no_restart=True)
        except Exception:  # already dead
            pass
        self.actors[w] = self._new_actor(w)
        self._ready([w])

    def close(self) -> None:
        import ray

        stops = []
        for actor in self.actors:
            try:
                stops.append(actor.shutdown.remote())
            except Exception:
                pass
        try:
            ray.get(stops, timeout=30)
        except Exception:
            pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass


def _ray_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    useful = [line for line in text if line.strip()]
    return useful[-1][:300] if useful else type(exc).__name__


@dataclass
class _Batch:
    worker: int
    stream: SimStream
    items: list[WorkItem]
    token: Any


@dataclass
class SimStream(ResultStream):
    """Results of one broadcast in the simulator."""

    comm: SimCommunicator
    task: Task
    targets: tuple[str, ...]
    handle: Any
    model_id: str
    model_bytes: int
    queued: collections.deque[str] = field(default_factory=collections.deque)
    pinned: dict[int, collections.deque[str]] = field(default_factory=dict)
    _pending: set[str] = field(default_factory=set)
    buffer: collections.deque[TaskResult] = field(default_factory=collections.deque)
    cancelled: bool = False
    finish: dict[str, float] = field(default_factory=dict)

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def next(self, timeout: float | None) -> TaskResult | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            if self.buffer:
                result = self.buffer.popleft()
                self._pending.discard(result.site)
                return result
            if not self._pending or self.cancelled:
                return None
            self.comm._dispatch()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.comm._poll(remaining)
            if self.buffer:
                continue
            if time.monotonic() >= deadline:
                return None

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.buffer.clear()
        self.queued.clear()
        self.pinned.clear()
        self._pending.clear()
        self.comm._cancel(self)

    def deliver(self, result: TaskResult) -> None:
        """Queue a result for ``next`` (the site stays pending until it is read)."""
        self.buffer.append(result)

    def take_batch(self, w: int) -> list[str]:
        """Sites for worker ``w``: its pinned ones, else a share of the common queue."""
        own = self.pinned.get(w)
        source = own if own else self.queued
        if not source:
            return []
        per_worker = (
            math.ceil(len(source) / (2 * self.comm.pool.size))
            if source is self.queued
            else len(source)
        )
        cap = max(1, min(MAX_BATCH, BATCH_BYTES // max(self.model_bytes, 1)))
        n = max(1, min(per_worker, cap))
        return [source.popleft() for _ in range(min(n, len(source)))]


class SimCommunicator(Communicator):
    """Communicator over a worker pool; sites are virtual, named ``site-1`` … ``site-N``."""

    def __init__(
        self,
        pool: Pool,
        sites: Sequence[str],
        resident: bool,
        all_sites: Sequence[str] | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        self.pool = pool
        #: the run's simulated time (``SimEnv(speeds=...)``), None: no speed model
        self.clock = clock
        self._sites = list(sites)
        # a site's index is its place among all the run's sites, also when some refused the job
        self.index = {s: i for i, s in enumerate(all_sites if all_sites is not None else sites)}
        self.resident = resident
        self.streams: list[SimStream] = []
        #: each worker's batches, in the order it runs them (at most DEPTH)
        self.busy: dict[int, list[_Batch]] = {}
        self._seq = 0

    def sites(self) -> list[str]:
        return list(self._sites)

    def broadcast(self, task: Task, targets: Sequence[str]) -> SimStream:
        unknown = [t for t in targets if t not in self.index]
        if unknown:
            raise UsageError(f"unknown site {unknown[0]!r}")
        params = task.model.params
        handle = None
        if params is not None:
            handle = self.pool.transport.share(params)
            if getattr(self.pool.transport, "shares_memory", False) and isinstance(params, dict):
                # Keep one copy of the global model, not two: the caller's dict now refers to
                # the shared-memory copy (same values; workflows never modify broadcast params in
                # place, see WorkerCore._global).
                params.update(self.pool.transport.get(handle))
        nbytes = sum(t.numel() * t.element_size() for t in (params or {}).values())
        self._seq += 1
        # Workers get the params through ``handle`` (once per round); the task they are sent
        # must not carry them too, or every batch call would serialise the whole model.
        wire = replace(task, model=replace(task.model, params=None))
        stream = SimStream(
            self,
            wire,
            tuple(targets),
            handle,
            f"{task.task_id}#{self._seq}",
            nbytes,
            _pending=set(targets),
        )
        for site in targets:
            if self.clock is not None:
                stream.finish[site], lost = self.clock.schedule(site)
                if lost:  # the site never runs it; the workflow learns so at its finish time
                    stream.deliver(TaskResult(site, task.task_id, error=DROPPED))
                    continue
            if self.resident:
                w = self.index[site] % self.pool.size
                stream.pinned.setdefault(w, collections.deque()).append(site)
            else:
                stream.queued.append(site)
        self.streams = [s for s in self.streams if s._pending and not s.cancelled]
        self.streams.append(stream)
        return stream

    def _dispatch(self) -> None:
        for w in range(self.pool.size):
            while self._dispatch_one(w):
                pass

    def _dispatch_one(self, w: int) -> bool:
        """Give worker ``w`` one more batch if it has room (False: it has none, or no site is
        left for it)."""
        queued = self.busy.get(w, [])
        if queued:  # a next batch only of the same stream, and only for small models
            stream = queued[-1].stream
            depth = DEPTH if stream.model_bytes * DEPTH <= BATCH_BYTES else 1
            if len(queued) >= depth or stream.cancelled:
                return False
            candidates = [stream]
        else:
            candidates = [s for s in self.streams if not s.cancelled]
        for stream in candidates:
            sites = stream.take_batch(w)
            if sites:
                task = stream.task
                items = [WorkItem(s, self.index[s], task, task.site_meta.get(s)) for s in sites]
                token = self.pool.submit(w, items, stream.model_id, [stream.handle])
                self.busy.setdefault(w, []).append(_Batch(w, stream, items, token))
                return True
        return False

    def _poll(self, timeout: float) -> None:
        if not self.busy:
            time.sleep(min(timeout, 0.01))
            return
        # a worker runs its batches in order: the first one's token says when it is done
        running = {id(b[0].token): b[0] for b in self.busy.values()}
        done = self.pool.wait([b.token for b in running.values()], timeout)
        finished = []
        for token in done:
            batch = running[id(token)]
            queued = self.busy[batch.worker]
            queued.pop(0)
            if not queued:
                del self.busy[batch.worker]
            finished.append((batch, self._collect(batch)))
        if done:
            self._dispatch()  # keep workers busy while their results are taken in and aggregated
        for batch, results in finished:
            for result, handle in results:
                if batch.stream.cancelled:
                    continue  # late: dropped, its object freed with the handle
                if handle is not None and result.model is not None:
                    try:
                        result.model.params = self.pool.transport.get(handle)
                    except (ValueError, RuntimeError, OSError) as exc:  # that site's failure
                        result = replace(
                            result, model=None, error=f"its result is unreadable: {exc}"
                        )
                batch.stream.deliver(result)

    def _collect(self, batch: _Batch) -> list[tuple[TaskResult, Any]]:
        """A finished batch's results; if its worker died, every batch it had fails (the
        worker is replaced) and no results come."""
        try:
            return self.pool.result(batch.token)
        except WorkerDied as exc:
            lost = [batch, *self.busy.pop(batch.worker, [])]
            self.pool.restart(batch.worker)
            for each in lost:
                for item in each.items:
                    if not each.stream.cancelled:
                        each.stream.deliver(
                            TaskResult(
                                item.site, item.task.task_id, error=f"worker process died: {exc}"
                            )
                        )
            return []

    def _cancel(self, stream: SimStream) -> None:
        """Workers still running (or holding) the stream's sites are replaced: their results
        are late."""
        for w, queued in list(self.busy.items()):
            if any(b.stream is stream for b in queued):
                done = len(queued) == 1 and self.pool.wait([queued[0].token], 0)
                del self.busy[w]
                if not done:
                    self.pool.restart(w)
        self.streams = [s for s in self.streams if s is not stream]

    def close(self) -> None:
        """Stop the pool."""
        for stream in list(self.streams):
            stream.cancel()
        self.pool.close()
