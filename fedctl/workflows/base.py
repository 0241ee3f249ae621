"""What every server-side workflow is written against: ``Communicator`` and ``WorkflowContext``.

A workflow never knows whether its sites are Ray workers or gRPC peers. It asks the communicator
for the available sites, broadcasts a :class:`~fedctl.codec.model.Task` to some of them, and
consumes results as they arrive through :func:`gather`, which applies the round policy
(minimum responses, deadline, how long to wait for stragglers once the minimum is in).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import FLModel, ParamsType, Task, TaskResult
from fedctl.codec.tensorfiles import payload_nbytes
from fedctl.constants import RESULT_FACTOR
from fedctl.errors import FedctlError, RunFailed
from fedctl.privacy.filters import FilterChain, FilterContext

if TYPE_CHECKING:
    import torch

    from fedctl.workflows.clock import VirtualClock

log = logging.getLogger("fedctl.workflow")


class ResultStream(ABC):
    """Results of one broadcast, delivered as they arrive."""

    targets: tuple[str, ...]
    #: each target's virtual finish time (simulation with a speed model; empty otherwise)
    finish: Mapping[str, float] = MappingProxyType({})

    @abstractmethod
    def next(self, timeout: float | None) -> TaskResult | None:
        """The next result, or None if none arrived within ``timeout`` seconds (or all are in)."""

    @property
    @abstractmethod
    def pending(self) -> set[str]:
        """Targets that have not answered yet."""

    @property
    def done(self) -> bool:
        return not self.pending

    @abstractmethod
    def cancel(self) -> None:
        """Stop waiting: results that still arrive are dropped as late."""


class Communicator(ABC):
    """How a workflow reaches sites; the simulator and the real runtime each provide one."""

    @abstractmethod
    def sites(self) -> list[str]:
        """Names of the sites available to this job now, sorted."""

    @abstractmethod
    def broadcast(self, task: Task, targets: Sequence[str]) -> ResultStream:
        """Send ``task`` to each target; results come back through the returned stream.

        The task's params are treated as immutable from here on: a communicator may replace the
        tensors in that dict with equal read-only views (e.g. of shared memory), and workflows
        must never modify broadcast tensors in place (they build new ones each round).
        """

    def send(self, task: Task, target: str) -> ResultStream:
        """Send ``task`` to one site."""
        return self.broadcast(task, [target])

    def wait_for_sites(self, count: int, timeout: float | None) -> list[str]:
        """Block until at least ``count`` sites are available (or fail with the reason)."""
        sites = self.sites()
        if len(sites) < count:
            raise RunFailed(f"the job needs {count} sites but only {len(sites)} are available")
        return sites


class JobAborted(FedctlError):
    """The job was aborted by a user; the workflow stops at the next opportunity."""


class NotEnoughResults(RunFailed):
    """A round closed with fewer successful results than its minimum."""


@dataclass
class RoundPolicy:
    """When a round closes.

    The round waits for every target until ``timeout`` seconds have passed; once
    ``min_responses`` results are in it waits at most ``wait_after_min`` more seconds (None: until
    the deadline). It fails as soon as enough results can no longer arrive.
    """

    min_responses: int
    timeout: float | None = 3600.0
    wait_after_min: float | None = None


@dataclass
class GatherOutcome:
    """Who answered a round, who failed and why, who was still missing when it closed."""

    accepted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    duration: float = 0.0
    #: why the round closed: "complete", "deadline", "straggler wait" or "unreachable"
    closed: str = "complete"


Listener = Callable[[dict[str, Any]], None]


class WorkflowContext:
    """Everything a workflow may use besides the communicator: events, outputs, abort, seed.

    ``store`` is the run's output store (models, metrics, checkpoints); it is provided by the
    environment (simulator or server) and may be None in unit tests. ``filters`` are the job's
    privacy filters; the server-side ones run here, the same in every mode: ``result_in`` on
    every result before the workflow sees it, ``aggregate_out`` on every model it broadcasts.
    ``secret_randomness`` (real servers) makes the noise of filters and of central DP
    unpredictable; otherwise (simulation) it is derived from ``seed``, reproducibly.
    ``he_public`` is the public CKKS context jobs with ``homomorphic_encryption`` aggregate with.
    """

    def __init__(
        self,
        comm: Communicator,
        *,
        job_id: str = "job",
        seed: int = 0,
        store: Any = None,
        listeners: Sequence[Listener] = (),
        abort: threading.Event | None = None,
        filters: FilterChain | None = None,
        secret_randomness: bool = False,
        he_public: bytes | None = None,
    ) -> None:
        self.comm = comm
        self.job_id = job_id
        self.seed = seed
        self.store = store
        self.listeners = list(listeners)
        self.abort = abort or threading.Event()
        self.filters = filters if filters is not None else FilterChain()
        self.secret_randomness = secret_randomness
        #: the project's public HE context, serialized (None: this server has none)
        self.he_public = he_public
        self._task_seq = 0
        #: tasks sent, by id (filters need the model a result's task carried), the last
        #: ``sent_window`` of them (workflows with more tasks in flight raise it)
        self._sent: dict[str, Task] = {}
        self.sent_window = 4
        #: simulated time (``SimEnv(speeds=...)``): results are taken in virtual-time order and
        #: round events carry ``sim_time``; None in POC and production (the wall clock)
        self.clock: VirtualClock | None = getattr(comm, "clock", None)

    def filter_context(
        self, point: str, *, site: str | None = None, round_: int | None = None, base: Any = None
    ) -> FilterContext:
        """The context a filter (or central DP's noise) runs with here."""
        seed = None if self.secret_randomness else self.seed
        return FilterContext(point, site=site, round=round_, base=base, seed=seed)

    def broadcast(self, task: Task, targets: Sequence[str]) -> ResultStream:
        """Send ``task`` to ``targets`` through the ``aggregate_out`` filters (the one way
        workflows send models)."""
        reference = task  # what results are against: the model before any compression
        if task.model.params is not None and self.filters.at("aggregate_out"):
            fctx = self.filter_context("aggregate_out", round_=task.model.current_round)
            fctx.task = task.name
            model = self.filters.apply("aggregate_out", task.model, fctx)
            model = dataclasses.replace(model, params=dict(model.params or {}))  # computed once
            task = dataclasses.replace(task, model=model)
            reference = task
            if fctx.unencoded is not None:
                reference = dataclasses.replace(task, model=fctx.unencoded)
                if task.result_bytes is None:  # results are measured against the model itself
                    unencoded = payload_nbytes(fctx.unencoded.params)
                    task = dataclasses.replace(task, result_bytes=RESULT_FACTOR * unencoded)
            self._notes(fctx, None, task.model.current_round)
        if self.filters.at("result_in"):  # the last few tasks' models, for their results
            self._sent[task.task_id] = reference
            while len(self._sent) > self.sent_window:
                self._sent.pop(next(iter(self._sent)))
        if self.store is not None:  # the round's bytes moved: the model once per target
            size = payload_nbytes(task.model.params) + payload_nbytes(task.model.optimizer_params)
            self.store.count_bytes(sent=size * len(targets))
        return self.comm.broadcast(task, targets)

    def _notes(self, fctx: FilterContext, site: str | None, round_: int | None) -> None:
        """Say which filters ran (for the run log and the server's audit trail)."""
        self.emit(
            "filtered",
            point=fctx.point,
            site=site,
            round=round_,
            filters=self.filters.names(fctx.point),
            notes=fctx.notes,
        )

    def emit(self, event: str, **data: Any) -> None:
        """Tell listeners (live display, job status, run log) what happened."""
        record = {"event": event, "time": time.time(), **data}
        if self.clock is not None and event == "round_completed":
            record.setdefault("sim_time", self.clock.now)
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:  # a broken display must not break the job
                log.exception("event listener failed on %s", event)

    def new_task(self, name: str, model: Any) -> Task:
        """A task with a fresh id for this job."""
        self._task_seq += 1
        return Task(name, model, task_id=f"{self.job_id}:{self._task_seq}", job_id=self.job_id)

    def check_abort(self) -> None:
        """Raise JobAborted if someone aborted the job."""
        if self.abort.is_set():
            raise JobAborted("job aborted")

    def gather(
        self,
        stream: ResultStream,
        policy: RoundPolicy,
        on_result: Callable[[TaskResult], None],
        *,
        round_: int | None = None,
        phase: str | None = None,
    ) -> GatherOutcome:
        """Feed results to ``on_result`` as they arrive until the policy closes the round.

        ``on_result`` may raise :class:`~fedctl.aggregators.UpdateRejected` (or any
        FedctlError) to reject a result: that site counts as failed, with the reason.
        Raises NotEnoughResults with every failure's reason when the minimum is not reached.
        ``phase`` names what the results are for when it is not training (``"evaluate"``,
        ``"submit_model"``); it goes into each ``result`` event and into the shortfall message.
        """
        start = time.monotonic()
        deadline = start + policy.timeout if policy.timeout is not None else None
        outcome = GatherOutcome()
        min_at: float | None = None
        try:
            while not stream.done:
                self.check_abort()
                now = time.monotonic()
                limits = []
                if deadline is not None:
                    limits.append(deadline)
                if min_at is not None and policy.wait_after_min is not None:
                    limits.append(min_at + policy.wait_after_min)
                if limits and now >= min(limits):
                    outcome.closed = "deadline" if min_at is None else "straggler wait"
                    break
                wait = min([*(t - now for t in limits), 0.5])
                result = stream.next(timeout=max(wait, 0.0))
                if result is None:
                    continue
                if self.clock is not None:  # a synchronous round ends with its last result
                    self.clock.advance_to(stream.finish.get(result.site))
                self._take(result, on_result, outcome, round_, phase)
                # drop it now, not at the next wait: a large result is a model-sized mapping
                del result
                if min_at is None and len(outcome.accepted) >= policy.min_responses:
                    min_at = time.monotonic()
                if len(outcome.accepted) + len(stream.pending) < policy.min_responses:
                    outcome.closed = "unreachable"
                    break
        finally:
            outcome.missing = sorted(stream.pending)
            if outcome.missing:
                stream.cancel()
            outcome.duration = time.monotonic() - start
        if len(outcome.accepted) < policy.min_responses:
            raise NotEnoughResults(_shortfall(outcome, policy, round_, phase))
        return outcome

    def _take(
        self,
        result: TaskResult,
        on_result: Callable[[TaskResult], None],
        outcome: GatherOutcome,
        round_: int | None,
        phase: str | None = None,
    ) -> None:
        error = result.error
        if error is None and result.model is None:
            error = "sent no model"
        if self.store is not None and result.model is not None:
            m = result.model
            self.store.count_bytes(
                received=payload_nbytes(m.params) + payload_nbytes(m.optimizer_params)
            )
        if error is None and self.filters.at("result_in"):
            try:
                result = self._filter_result(result, round_)
            except (FedctlError, OSError) as exc:
                error = f"update rejected by a filter: {exc}"
        if error is None:
            try:
                on_result(result)
            except (FedctlError, OSError) as exc:  # OSError: a large result's file went bad
                error = f"update rejected: {exc}"
        if self.store is not None and result.records:
            self.store.add_records(result.site, result.records)
        metrics = result.model.metrics if result.model is not None else None
        if error is None:
            outcome.accepted.append(result.site)
        else:
            outcome.failed[result.site] = error
        self.emit(
            "result",
            round=round_,
            site=result.site,
            ok=error is None,
            error=error,
            traceback=result.traceback,
            metrics=metrics,
            duration=result.duration,
            phase=phase,
        )

    def _filter_result(self, result: TaskResult, round_: int | None) -> TaskResult:
        """A result through the ``result_in`` filters (its update is against the model its
        task carried)."""
        assert result.model is not None
        fctx = self.filter_context(
            "result_in", site=result.site, round_=round_, base=_base_for(self, result)
        )
        model = self.filters.apply("result_in", result.model, fctx)
        self._notes(fctx, result.site, round_)
        return dataclasses.replace(result, model=model)


def _base_for(ctx: WorkflowContext, result: TaskResult) -> Any:
    task = ctx._sent.get(result.task_id)
    return task.model.params if task is not None else None


def _shortfall(
    outcome: GatherOutcome, policy: RoundPolicy, round_: int | None, phase: str | None = None
) -> str:
    where = f"round {round_ + 1}" if round_ is not None else "task"
    if phase:
        where = f"{where} ({phase})"
    parts = [f"{site}: {why}" for site, why in sorted(outcome.failed.items())]
    if outcome.missing:
        who = ", ".join(outcome.missing)
        if outcome.closed == "unreachable":
            parts.append(f"not waiting for {who}: the minimum can no longer be reached")
        else:
            parts.append(f"no answer within the deadline from {who}")
    detail = "; ".join(parts) if parts else "no sites answered"
    return (
        f"{where}: only {len(outcome.accepted)} of the {policy.min_responses} required results "
        f"({detail})"
    )


class KeyView(Mapping[str, Any]):
    """A read-only view of the entries of ``base`` whose names pass ``keep``, optionally
    renamed; values are fetched from ``base`` only when asked for (results of large models may
    load their tensors lazily, and a view keeps it that way)."""

    def __init__(
        self,
        base: Mapping[str, Any],
        keep: Callable[[str], bool],
        rename: Callable[[str], str] | None = None,
    ) -> None:
        self._base = base
        self._names = {(rename(k) if rename else k): k for k in base if keep(k)}

    def __getitem__(self, name: str) -> Any:
        return self._base[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def round_model(params: Any, rnd: int, num_rounds: int, meta: dict[str, Any] | None) -> FLModel:
    """What a task of round ``rnd`` (of ``num_rounds``) carries to a site: full weights."""
    return FLModel(
        params_type=ParamsType.FULL,
        params=params,
        current_round=rnd,
        total_rounds=num_rounds,
        start_round=0,
        meta=meta,
    )


class Workflow(ABC):
    """A server-side algorithm: runs rounds through a context, returns the final parameters."""

    @abstractmethod
    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run the whole job; raise RunFailed (with the reason) when it cannot complete."""

    def resume(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
        """The model and round to start from: the run's last checkpoint (announced with a
        ``resumed`` event) or ``initial`` and 0; with the workflow state the checkpoint kept."""
        resumed = ctx.store.load_checkpoint() if ctx.store is not None else None
        if resumed is None:
            return initial, 0, {}
        ctx.emit("resumed", round=resumed["next_round"])
        return resumed["params"], resumed["next_round"], resumed.get("state", {})
