"""Evaluation of a FedAvg-family workflow's global model: federated (an ``evaluate`` task to the
sites, their metrics weighted by ``NUM_SAMPLES``) and on the server (``server_eval``), every
``eval_every`` rounds and after the last. A mixin of :class:`~fedctl.workflows.fedavg.FedAvg`.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import MetricsMean
from fedctl.codec.keys import EVAL_KIND_KEY, NUM_SAMPLES_KEY
from fedctl.codec.model import TASK_EVALUATE, FLModel, ParamsType, TaskResult, scalar_metrics
from fedctl.constants import MAX_WEIGHT
from fedctl.errors import RunFailed
from fedctl.sampling import sample_sites
from fedctl.workflows.base import RoundPolicy, WorkflowContext

if TYPE_CHECKING:
    import torch


class Evaluation:
    """The evaluation steps of a round (the attributes are FedAvg's)."""

    num_rounds: int
    federated_eval: bool
    eval_every: int
    server_eval: Callable[..., dict[str, float]] | None
    sample_clients: int | float | None
    policy: RoundPolicy

    def base_meta(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        raise NotImplementedError

    def warn_once(self, ctx: WorkflowContext, topic: str, site: str, message: str) -> None:
        raise NotImplementedError

    def eval_due(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with an evaluation (every ``eval_every`` and the last)."""
        if not (self.federated_eval or self.server_eval is not None):
            return False
        return (rnd + 1) % self.eval_every == 0 or rnd == self.num_rounds - 1

    def evaluate_round(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int, sites: list[str]
    ) -> dict[str, float]:
        """Metrics of the round's new global model: ``eval_*`` from sites, ``server_*``."""
        if not self.eval_due(rnd):
            return {}
        out: dict[str, float] = {}
        if self.federated_eval:
            targets = sample_sites(sites, self.sample_clients, 1, ctx.seed, rnd, "evaluate")
            metrics = self.federated_evaluate(ctx, model, rnd, targets)
            out.update({f"eval_{k}": v for k, v in metrics.items()})
        if self.server_eval is not None:
            out.update({f"server_{k}": v for k, v in self.run_server_eval(ctx, model, rnd).items()})
        return out

    def federated_evaluate(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int, targets: list[str]
    ) -> dict[str, float]:
        """Send ``model`` to ``targets`` as an evaluate task; their metrics' weighted mean."""
        task = ctx.new_task(
            TASK_EVALUATE,
            FLModel(
                params_type=ParamsType.FULL,
                params=model,
                current_round=rnd,
                total_rounds=self.num_rounds,
                meta={**self.base_meta(ctx, rnd), EVAL_KIND_KEY: "federated"},
            ),
        )
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            assert result.model is not None
            metrics.add(scalar_metrics(result.model.metrics), self.samples_of(ctx, result))

        policy = RoundPolicy(1, self.policy.timeout, self.policy.wait_after_min)
        ctx.emit("evaluation_started", round=rnd, targets=targets)
        ctx.gather(ctx.broadcast(task, targets), policy, on_result, round_=rnd, phase="evaluate")
        return metrics.result()

    def samples_of(self, ctx: WorkflowContext, result: TaskResult) -> float:
        """Weight of an evaluation result: its ``meta["NUM_SAMPLES"]``, else 1 (warned once)."""
        assert result.model is not None
        value = (result.model.meta or {}).get(NUM_SAMPLES_KEY)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0 <= value <= MAX_WEIGHT
        ):
            return float(value)
        self.warn_once(
            ctx,
            "samples",
            result.site,
            f"{result.site} sent evaluation metrics without a valid meta['{NUM_SAMPLES_KEY}']; "
            "they are weighted 1 (warned once per site)",
        )
        return 1.0

    def run_server_eval(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int
    ) -> dict[str, float]:
        """Call ``server_eval`` on the new global model; a failure fails the job with its reason."""
        assert self.server_eval is not None
        try:
            result = self.server_eval(*_eval_args(self.server_eval, model, rnd))
        except Exception as exc:
            ctx.emit("error", message=f"server evaluation failed:\n{traceback.format_exc()}")
            raise RunFailed(
                f"round {rnd + 1}: server evaluation failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(result, dict):
            raise RunFailed(
                f"round {rnd + 1}: server evaluation must return a dict of metrics, "
                f"got {type(result).__name__}"
            )
        return scalar_metrics(result)


def _eval_args(fn: Callable[..., Any], model: dict[str, torch.Tensor], rnd: int) -> tuple[Any, ...]:
    """``(model, rnd)``, or ``(model,)`` for a function that takes one argument."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return (model, rnd)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    return (model,) if len(positional) == 1 and not varargs else (model, rnd)
