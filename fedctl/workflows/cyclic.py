"""Cyclic weight transfer: one model visits the sites in turn; the server never aggregates.

Chang et al., "Distributed deep learning networks among institutions for medical imaging"
(JAMIA 2018). Each round (a *cycle*) the model goes to every live site in order, fixed (sorted
names) or shuffled per cycle from the run's seed; each site trains what the previous one sent
and the next site receives its weights. A site that fails or does not answer by the deadline is
skipped, with the reason in the job's log and the round's outcome, and the next one gets the
model the failed site was given. A cycle needs ``min_clients`` successful visits.

Parameters
----------
num_rounds:    cycles to run.
min_clients:   sites a cycle waits for at its start, and successful visits it needs.
order:         "fixed" (sorted site names) or "random" (a seeded shuffle per cycle).
round_timeout: seconds one visit may take (None: no deadline — not recommended).
task_meta:     JSON values sent to every site in ``FLModel.meta``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import MetricsMean, WeightedAggregator, check_update
from fedctl.codec.model import TASK_TRAIN, TaskResult, scalar_metrics
from fedctl.sampling import round_rng
from fedctl.workflows.base import (
    NotEnoughResults,
    RoundPolicy,
    Workflow,
    WorkflowContext,
    round_model,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.workflow")

ORDERS = ("fixed", "random")
#: the meta key that tells a site its place in the cycle (0-based) and the cycle's length
POSITION_KEY = "cyclic_position"


class Cyclic(Workflow):
    """Cyclic weight transfer; see the module docstring for the parameters."""

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        order: str = "fixed",
        round_timeout: float | None = 3600.0,
        task_meta: dict[str, Any] | None = None,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"cyclic order must be 'fixed' or 'random', got {order!r}")
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.order = order
        self.timeout = round_timeout
        self.task_meta = dict(task_meta or {})

    def visit_order(self, ctx: WorkflowContext, sites: list[str], rnd: int) -> list[str]:
        """The cycle's order: sorted names, or a shuffle seeded by the run's seed and the round."""
        ordered = sorted(sites)
        if self.order == "random":
            round_rng(ctx.seed, rnd, "cyclic").shuffle(ordered)
        return ordered

    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run the cycles from ``initial`` (or from a checkpoint); return the last site's model."""
        model, start, _ = self.resume(ctx, initial)
        del initial  # replaced by the first site's model: hold no second reference
        ctx.emit(
            "run_started",
            num_rounds=self.num_rounds,
            start_round=start,
            min_clients=self.min_clients,
        )
        for rnd in range(start, self.num_rounds):
            ctx.check_abort()
            sites = self.visit_order(
                ctx, ctx.comm.wait_for_sites(self.min_clients, self.timeout), rnd
            )
            ctx.emit("round_started", round=rnd, targets=sites)
            new_model, metrics, accepted, failed, duration = self.cycle(ctx, model, rnd, sites)
            ctx.emit(
                "round_completed",
                round=rnd,
                metrics=metrics,
                accepted=accepted,
                failed=failed,
                missing=[],
                duration=duration,
            )
            if ctx.store is not None:
                ctx.store.round_completed(rnd, model, new_model, metrics, {})
            model = new_model
        if ctx.store is not None:
            ctx.store.save_model("final", model)
        return model

    def cycle(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int, sites: list[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str], dict[str, str], float]:
        """One cycle: the model visits ``sites`` in turn; returns the last model, the visits'
        mean metrics (weighted by their NUM_STEPS_CURRENT_ROUND), who trained, who was skipped
        and why, and the cycle's duration."""
        metrics = MetricsMean()
        accepted: list[str] = []
        failed: dict[str, str] = {}
        duration = 0.0
        for position, site in enumerate(sites):
            ctx.check_abort()
            meta = {**self.task_meta, POSITION_KEY: [position, len(sites)]}
            task = ctx.new_task(TASK_TRAIN, round_model(model, rnd, self.num_rounds, meta))
            trained: list[dict[str, torch.Tensor]] = []

            def on_result(
                result: TaskResult,
                given: dict[str, torch.Tensor] = model,
                out: list[dict[str, torch.Tensor]] = trained,
            ) -> None:
                assert result.model is not None and result.model.params is not None
                check_update(given, result.model.params, 1.0, result.model.params_type)
                # FULL weights as they are; a DIFF added to the model the site was given
                one = WeightedAggregator(given, "float64")
                one.add(result.model.params, 1.0, result.model.params_type, validate=False)
                out.append(one.result())
                steps = (result.model.meta or {}).get("NUM_STEPS_CURRENT_ROUND", 1)
                weight = float(steps) if isinstance(steps, int | float) else 1.0
                metrics.add(scalar_metrics(result.model.metrics), weight)

            policy = RoundPolicy(1, self.timeout, None)
            try:
                outcome = ctx.gather(ctx.broadcast(task, [site]), policy, on_result, round_=rnd)
            except NotEnoughResults as exc:
                reason = str(exc)
                failed[site] = reason
                message = f"round {rnd + 1}: {site} skipped in the cycle ({reason})"
                log.warning("%s", message)
                ctx.emit("warning", message=message)
                continue
            duration += outcome.duration
            accepted.append(site)
            model = trained[-1]
        if len(accepted) < self.min_clients:
            raise NotEnoughResults(
                f"round {rnd + 1}: only {len(accepted)} of the {self.min_clients} required "
                f"sites trained in the cycle ({'; '.join(f'{s}: {r}' for s, r in failed.items())})"
            )
        return model, metrics.result(), accepted, failed, duration
