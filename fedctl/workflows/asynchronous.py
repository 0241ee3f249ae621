"""Asynchronous aggregation: FedAsync and FedBuff. No round barrier; a site that returns gets
new work at once.

* **FedAsync** (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019): every accepted
  update makes a new global model, ``x ← (1 − αₜ)·x + αₜ·y`` with ``αₜ = α·s(t − τ)``, where
  ``y`` is the site's model, ``τ`` the version it trained from and ``t`` the current version.
* **FedBuff** (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
  AISTATS 2022): updates ``Δᵢ = yᵢ − x_τᵢ`` go into a buffer; after ``buffer_size`` (K) of them,
  ``x ← x + η·Σ wᵢ·s(t − τᵢ)·Δᵢ / Σ wᵢ`` (``wᵢ``: NUM_STEPS_CURRENT_ROUND, as FedAvg weighs;
  η: ``server_lr``). With K = all sites, equal speeds and η = 1 every update is fresh and this
  is FedAvg's weighted mean, computed the same way.

Staleness functions ``s`` (Xie et al.): ``constant`` 1; ``polynomial`` ``(t − τ + 1)^−a``
(FedBuff's ``1/√(1 + staleness)`` is a = 0.5); ``hinge`` 1 up to ``b``, then
``1 / (a·(t − τ − b) + 1)``. An update staler than ``max_staleness`` versions is dropped (logged).

``num_rounds`` counts new global models (versions). ``concurrency`` sites train at once (all by
default); a site that answers goes to the back of the idle queue and the front one gets the
current model. In simulation the order of results is that of a virtual clock
(:mod:`fedctl.workflows.clock`), so a run is reproducible from its seed; in POC and production it
is the order of arrival. A site that fails three times in a row gets no more work.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import (
    MetricsMean,
    UpdateRejected,
    WeightedAggregator,
    check_update,
    check_weight,
)
from fedctl.codec.model import (
    NUM_STEPS_KEY,
    TASK_TRAIN,
    ParamsType,
    TaskResult,
    scalar_metrics,
)
from fedctl.errors import RunFailed
from fedctl.sampling import round_rng
from fedctl.workflows.base import (
    GatherOutcome,
    ResultStream,
    Workflow,
    WorkflowContext,
    round_model,
)
from fedctl.workflows.clock import DROPPED
from fedctl.workflows.evaluation import Evaluation
from fedctl.workflows.fedavg import resolve_precision

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.workflow")

MODES = ("fedasync", "fedbuff")
STALENESS = ("constant", "polynomial", "hinge")
#: the meta key that tells a site which global version its task carries
VERSION_KEY = "async_version"
#: consecutive failures after which a site gets no more work
MAX_FAILURES = 3


def staleness_weight(kind: str, staleness: int, a: float = 0.5, b: float = 4.0) -> float:
    """``s(t − τ)`` of Xie et al. (2019) for an update ``staleness`` versions old."""
    if staleness < 0:
        raise ValueError(f"staleness must be ≥ 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"staleness must be one of {', '.join(STALENESS)}, got {kind!r}")


@dataclass
class _Flight:
    """A task a site is working on."""

    site: str
    stream: ResultStream
    version: int
    sent: float


class _Stale(UpdateRejected):
    """An update older than ``max_staleness``: dropped, not the site's failure."""


class AsyncAggregation(Evaluation, Workflow):
    """FedAsync or FedBuff; see the module docstring for the parameters (``server_eval`` and
    ``eval_every`` as FedAvg's: the server evaluates every ``eval_every``-th new model)."""

    federated_eval = False  # an evaluation task to every site would be a round barrier
    sample_clients = None

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        mode: str = "fedbuff",
        concurrency: int | None = None,
        buffer_size: int | None = None,
        alpha: float = 0.6,
        server_lr: float = 1.0,
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        max_staleness: int | None = None,
        round_timeout: float | None = 3600.0,
        task_meta: dict[str, Any] | None = None,
        server_eval: Callable[..., dict[str, float]] | None = None,
        eval_every: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be 'fedasync' or 'fedbuff', got {mode!r}")
        staleness_weight(staleness, 0, staleness_a, staleness_b)  # the kind is known
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.mode = mode
        self.concurrency = concurrency
        self.buffer_size = 1 if mode == "fedasync" else (buffer_size or min_clients)
        self.alpha = alpha
        self.server_lr = server_lr
        self.staleness = staleness
        self.staleness_a = staleness_a
        self.staleness_b = staleness_b
        self.max_staleness = max_staleness
        self.timeout = round_timeout
        self.task_meta = dict(task_meta or {})
        self.server_eval = server_eval
        self.eval_every = eval_every

    # ------------------------------------------------------------------------- the loop

    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run until ``num_rounds`` new global models were made; return the last one."""
        model, version, _ = self.resume(ctx, initial)
        del initial  # replaced by the first update: hold no second reference (see FedAvg.run)
        ctx.emit(
            "run_started",
            num_rounds=self.num_rounds,
            start_round=version,
            min_clients=self.min_clients,
        )
        order = sorted(ctx.comm.wait_for_sites(self.min_clients, self.timeout))
        round_rng(ctx.seed, version, "async").shuffle(order)
        width = min(self.concurrency or len(order), len(order))
        ctx.sent_window = max(ctx.sent_window, 2 * width)
        self.idle: collections.deque[str] = collections.deque(order)
        self.flights: dict[str, _Flight] = {}
        self.arrived: dict[str, TaskResult] = {}
        self.failures: dict[str, int] = {}
        self.retired: dict[str, str] = {}
        self.bases: dict[int, dict[str, torch.Tensor]] = {version: model}
        precision = resolve_precision("auto", model)
        try:
            while version < self.num_rounds:
                started = time.monotonic()
                agg = WeightedAggregator(model, precision)
                metrics = MetricsMean()
                outcome = GatherOutcome()
                self._fill(ctx, model, version, width)
                ctx.emit("round_started", round=version, targets=sorted(self.flights))
                while agg.count < self.buffer_size:
                    ctx.check_abort()
                    if not self.flights:
                        raise RunFailed(
                            f"round {version + 1}: no site left to train "
                            f"({'; '.join(f'{s}: {r}' for s, r in self.retired.items())})"
                        )
                    flight, result = self._next(ctx)
                    if ctx.clock is not None:
                        ctx.clock.advance_to(flight.stream.finish.get(flight.site))

                    add = functools.partial(self._add, ctx, agg, metrics, flight, version)
                    taken = len(outcome.accepted)
                    ctx._take(result, add, outcome, version)
                    error = None if len(outcome.accepted) > taken else outcome.failed[flight.site]
                    self._settle(ctx, flight.site, error, version)
                    # a full buffer: the site gets the new model, just below; results due at
                    # the same simulated moment all come in before anyone gets new work
                    if agg.count < self.buffer_size and not self._simultaneous(ctx):
                        self._fill(ctx, model, version, width)
                    # kept, these would hold this version's model (through the aggregator and
                    # the task) until the next version's first result is in
                    del add, flight, result
                new_model = self._finish(agg, model)
                out_metrics = self.evaluate_round(ctx, new_model, version, [])
                ctx.emit(
                    "round_completed",
                    round=version,
                    metrics={**metrics.result(), **out_metrics},
                    accepted=outcome.accepted,
                    failed=outcome.failed,
                    missing=[],
                    duration=time.monotonic() - started,
                )
                if ctx.store is not None:
                    ctx.store.round_completed(
                        version, model, new_model, metrics.result(), {}, out_metrics=out_metrics
                    )
                model, version = new_model, version + 1
                self.bases[version] = model
                live = {f.version for f in self.flights.values()} | {version}
                self.bases = {v: m for v, m in self.bases.items() if v in live}
        finally:
            for stream in {id(f.stream): f.stream for f in self.flights.values()}.values():
                stream.cancel()
        if ctx.store is not None:
            ctx.store.save_model("final", model)
        return model

    def _fill(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], version: int, width: int
    ) -> None:
        """Give the current model to idle sites until ``width`` are training (one broadcast)."""
        chosen: list[str] = []
        while self.idle and len(self.flights) + len(chosen) < width:
            chosen.append(self.idle.popleft())
        if not chosen:
            return
        meta = {**self.task_meta, VERSION_KEY: version}
        task = ctx.new_task(TASK_TRAIN, round_model(model, version, self.num_rounds, meta))
        stream = ctx.broadcast(task, chosen)
        now = time.monotonic()
        for site in chosen:
            self.flights[site] = _Flight(site, stream, version, now)

    def _next(self, ctx: WorkflowContext) -> tuple[_Flight, TaskResult]:
        """The next result to take: the earliest in simulated time (a virtual clock), else the
        first to arrive; a site past its deadline yields a failure."""
        while True:
            ctx.check_abort()
            if ctx.clock is not None:
                flight = min(
                    self.flights.values(),
                    key=lambda f: (f.stream.finish.get(f.site, 0.0), f.site),
                )
                if flight.site in self.arrived:
                    return self._take_out(flight)
                late = self._late(flight)
                if late is not None:
                    return late
                self._pull(flight.stream, 0.5)
                continue
            if self.arrived:
                return self._take_out(self.flights[next(iter(self.arrived))])
            for flight in list(self.flights.values()):
                late = self._late(flight)
                if late is not None:
                    return late
            streams = {id(f.stream): f.stream for f in self.flights.values()}
            for stream in streams.values():
                self._pull(stream, 0.0)
            if not self.arrived:
                first = min(self.flights.values(), key=lambda f: f.sent)
                self._pull(first.stream, 0.05)

    def _simultaneous(self, ctx: WorkflowContext) -> bool:
        """Whether another result is due at the current simulated time."""
        if ctx.clock is None:
            return False
        now = ctx.clock.now
        return any(f.stream.finish.get(f.site) == now for f in self.flights.values())

    def _take_out(self, flight: _Flight) -> tuple[_Flight, TaskResult]:
        del self.flights[flight.site]
        return flight, self.arrived.pop(flight.site)

    def _late(self, flight: _Flight) -> tuple[_Flight, TaskResult] | None:
        """A failure for a site past its deadline (its stream cancelled if nobody else waits)."""
        if self.timeout is None or time.monotonic() < flight.sent + self.timeout:
            return None
        del self.flights[flight.site]
        if not any(f.stream is flight.stream for f in self.flights.values()):
            flight.stream.cancel()
        why = f"no answer within the deadline ({self.timeout:g} s)"
        return flight, TaskResult(flight.site, "", error=why)

    def _pull(self, stream: ResultStream, timeout: float) -> None:
        """Read one result from ``stream`` into ``arrived`` (a late one is dropped)."""
        result = stream.next(timeout)
        if result is None:
            return
        flight = self.flights.get(result.site)
        if flight is not None and flight.stream is stream:
            self.arrived[result.site] = result

    def _settle(self, ctx: WorkflowContext, site: str, error: str | None, version: int) -> None:
        """Put a site that answered back in the idle queue, unless it keeps failing (a stale
        update or a simulated dropout is not the site's fault)."""
        if error is None or error == DROPPED or error.startswith("update rejected: stale"):
            self.failures.pop(site, None)
            self.idle.append(site)
            return
        n = self.failures[site] = self.failures.get(site, 0) + 1
        if n >= MAX_FAILURES:
            self.retired[site] = error
            message = (
                f"round {version + 1}: {site} failed {n} times in a row ({error}); "
                "no more work for it"
            )
            log.warning("%s", message)
            ctx.emit("warning", message=message)
            return
        self.idle.append(site)

    # ------------------------------------------------------------------------- aggregation

    def _add(
        self,
        ctx: WorkflowContext,
        agg: WeightedAggregator,
        metrics: MetricsMean,
        flight: _Flight,
        version: int,
        result: TaskResult,
    ) -> None:
        """Fold one result in (FedBuff's buffer, or FedAsync's mix)."""
        assert result.model is not None
        stale = version - flight.version
        if self.max_staleness is not None and stale > self.max_staleness:
            message = (
                f"round {version + 1}: {flight.site}'s update is stale by {stale} versions "
                f"(max_staleness {self.max_staleness}); dropped"
            )
            log.warning("%s", message)
            ctx.emit("warning", message=message)
            raise _Stale(f"stale by {stale} versions (max_staleness {self.max_staleness})")
        params, kind = result.model.params, result.model.params_type
        if params is None:
            raise UpdateRejected("sent no parameters")
        base = self.bases[flight.version]
        check_update(base, params, 1.0, kind)
        s = staleness_weight(self.staleness, stale, self.staleness_a, self.staleness_b)
        weight = 1.0 if self.mode == "fedasync" else self._weight(result)
        if self.mode == "fedasync":
            weight_in = self.alpha * s  # x ← (1 − α s)·x + α s·y
            agg.add_zero_diff(1.0 - weight_in)
        else:
            weight_in = weight * s
            agg.add_zero_diff(weight * (1.0 - s))
        if self.mode == "fedasync":  # the site's model y itself (x_τ + Δ for a DIFF)
            full = params if kind != ParamsType.DIFF else _plus(base, params)
            agg.add(full, weight_in, ParamsType.FULL, validate=False)
        elif flight.version == version and kind != ParamsType.DIFF:
            agg.add(params, weight_in, kind, validate=False)
        else:  # against an older model: its change Δ = y − x_τ, added to the current model
            agg.add(_delta(base, params, kind), weight_in, ParamsType.DIFF, validate=False)
        metrics.add(scalar_metrics(result.model.metrics), weight)

    def _weight(self, result: TaskResult) -> float:
        assert result.model is not None
        value = (result.model.meta or {}).get(NUM_STEPS_KEY, 1)
        return check_weight(value, f"meta['{NUM_STEPS_KEY}']")

    def _finish(
        self, agg: WeightedAggregator, model: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new global model from the buffer (FedBuff's server step η when it is not 1)."""
        new = agg.result()
        if self.mode == "fedasync" or self.server_lr == 1.0:
            return new
        out = {}
        for k, x in model.items():
            if not x.is_floating_point():
                out[k] = new[k]
                continue
            step = new[k].double() - x.double()
            out[k] = x.double().add_(step, alpha=self.server_lr).to(x.dtype)
        return out


def _plus(base: dict[str, torch.Tensor], diff: Any) -> dict[str, torch.Tensor]:
    """``x_τ + Δ``: a DIFF result as the model it describes."""
    return {k: (base[k].double() + d.double()).to(base[k].dtype) for k, d in diff.items()}


def _delta(
    base: dict[str, torch.Tensor], params: Any, kind: ParamsType | None
) -> dict[str, torch.Tensor]:
    """``y − x_τ`` (a DIFF is that already), in float64 for floating parameters."""
    if kind == ParamsType.DIFF:
        return dict(params)
    out = {}
    for k, y in params.items():
        b = base[k]
        out[k] = y.double() - b.double() if b.is_floating_point() else y - b
    return out
