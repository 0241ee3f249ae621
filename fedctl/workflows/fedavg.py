"""FedAvg: federated averaging of client updates, weighted by local steps.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017). Each round the global model goes to the selected sites; each trains locally and
sends back its weights (FULL) or the change to them (DIFF) with
``meta["NUM_STEPS_CURRENT_ROUND"]``; the new global model is the weighted mean.

Parameters
----------
num_rounds:      rounds to run.
min_clients:     results a round needs; fewer by the deadline fails the job with the reasons.
round_timeout:   seconds a round may take (None: no deadline — not recommended).
wait_after_min:  once ``min_clients`` results are in, wait at most this much longer for the
                 rest (None: wait for all sampled sites until the deadline).
precision:       accumulator precision, "float64", "float32" or "auto" (float64 up to 32M
                 elements, float32 above, to keep server memory near 2× the model).
task_meta:       JSON values sent to every site in ``FLModel.meta`` (e.g. hyper-parameters).

Subclasses (FedProx, FedOpt, …) override the small hooks: :meth:`task_meta_for`,
:meth:`weight_of`, :meth:`add_result`, :meth:`server_update`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import MetricsMean, WeightedAggregator, check_update
from fedctl.codec.model import (
    NUM_STEPS_KEY,
    TASK_TRAIN,
    FLModel,
    ParamsType,
    TaskResult,
    scalar_metrics,
)
from fedctl.workflows.base import GatherOutcome, RoundPolicy, Workflow, WorkflowContext

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.workflow")

AUTO_FLOAT64_MAX_ELEMENTS = 32 * 1024 * 1024


def resolve_precision(precision: str, params: dict[str, torch.Tensor]) -> str:
    """Turn "auto" into float64 or float32 by model size."""
    if precision != "auto":
        return precision
    n = sum(t.numel() for t in params.values())
    return "float64" if n <= AUTO_FLOAT64_MAX_ELEMENTS else "float32"


class FedAvg(Workflow):
    """Federated averaging; see the module docstring for the parameters."""

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        round_timeout: float | None = 3600.0,
        wait_after_min: float | None = None,
        precision: str = "auto",
        task_meta: dict[str, Any] | None = None,
    ) -> None:
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.policy = RoundPolicy(min_clients, round_timeout, wait_after_min)
        self.precision = precision
        self.task_meta = dict(task_meta or {})
        self._warned_weight: set[str] = set()

    # ------------------------------------------------------------------ hooks for subclasses

    def select_targets(self, ctx: WorkflowContext, sites: Sequence[str], rnd: int) -> list[str]:
        """The sites that train in round ``rnd`` (all available ones by default)."""
        return list(sites)

    def task_meta_for(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        """``FLModel.meta`` of the round's training task."""
        return dict(self.task_meta)

    def weight_of(self, ctx: WorkflowContext, result: TaskResult) -> float:
        """Aggregation weight of a result: its NUM_STEPS_CURRENT_ROUND, else 1 (warned once)."""
        assert result.model is not None
        meta = result.model.meta or {}
        if NUM_STEPS_KEY in meta:
            value = meta[NUM_STEPS_KEY]
            return float(value) if isinstance(value, int | float) else value
        if result.site not in self._warned_weight:
            self._warned_weight.add(result.site)
            message = (
                f"{result.site} sent no meta['{NUM_STEPS_KEY}']; its update is weighted 1 "
                "(warned once per site)"
            )
            log.warning(message)
            ctx.emit("warning", message=message)
        return 1.0

    def new_aggregator(self, global_params: dict[str, torch.Tensor]) -> Any:
        """The round's aggregator (weighted mean here; robust ones later)."""
        return WeightedAggregator(global_params, resolve_precision(self.precision, global_params))

    def add_result(
        self,
        ctx: WorkflowContext,
        agg: Any,
        global_params: dict[str, torch.Tensor],
        result: TaskResult,
        weight: float,
    ) -> None:
        """Fold one accepted result into the aggregator (raise UpdateRejected to refuse it)."""
        assert result.model is not None and result.model.params is not None
        check_update(global_params, result.model.params, weight)
        agg.add(result.model.params, weight, result.model.params_type, validate=False)

    def server_update(
        self,
        ctx: WorkflowContext,
        global_params: dict[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        rnd: int,
    ) -> dict[str, torch.Tensor]:
        """The next global model from the round's aggregate (plain FedAvg: the aggregate)."""
        return aggregate

    # ------------------------------------------------------------------ the loop

    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run the rounds from ``initial`` (or from a checkpoint); return the final model."""
        model, start = initial, 0
        if ctx.store is not None:
            resumed = ctx.store.load_checkpoint()
            if resumed is not None:
                model, start = resumed["params"], resumed["next_round"]
                self.load_state(resumed.get("state", {}))
                ctx.emit("resumed", round=start)
        ctx.emit(
            "run_started",
            num_rounds=self.num_rounds,
            start_round=start,
            min_clients=self.min_clients,
        )
        for rnd in range(start, self.num_rounds):
            ctx.check_abort()
            sites = ctx.comm.wait_for_sites(self.min_clients, self.policy.timeout)
            targets = self.select_targets(ctx, sites, rnd)
            ctx.emit("round_started", round=rnd, targets=targets)
            new_model, metrics, outcome = self.train_round(ctx, model, rnd, targets)
            ctx.emit(
                "round_completed",
                round=rnd,
                metrics=metrics,
                accepted=outcome.accepted,
                failed=outcome.failed,
                missing=outcome.missing,
                duration=outcome.duration,
            )
            if ctx.store is not None:
                ctx.store.round_completed(rnd, model, new_model, metrics, self.state_dict())
            model = new_model
        if ctx.store is not None:
            ctx.store.save_model("final", model)
        return model

    def train_round(
        self,
        ctx: WorkflowContext,
        model: dict[str, torch.Tensor],
        rnd: int,
        targets: list[str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], GatherOutcome]:
        """One round: broadcast, aggregate as results arrive, update the global model."""
        task = ctx.new_task(
            TASK_TRAIN,
            FLModel(
                params_type=ParamsType.FULL,
                params=model,
                current_round=rnd,
                total_rounds=self.num_rounds,
                start_round=0,
                meta=self.task_meta_for(ctx, rnd),
            ),
        )
        agg = self.new_aggregator(model)
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            weight = self.weight_of(ctx, result)
            self.add_result(ctx, agg, model, result, weight)
            assert result.model is not None
            metrics.add(scalar_metrics(result.model.metrics), weight)

        outcome = ctx.gather(ctx.comm.broadcast(task, targets), self.policy, on_result, round_=rnd)
        new_model = self.server_update(ctx, model, agg.result(), rnd)
        return new_model, metrics.result(), outcome

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Workflow state beyond the model that a resumed run needs (JSON and tensors)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
