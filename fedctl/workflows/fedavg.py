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
sample_clients:  sites per round: None (all), a fraction in (0, 1] or a count; seeded by the
                 run's seed and the round (see :mod:`fedctl.sampling`).
aggregator:      None/"mean" (weighted mean) or a robust aggregator spec, e.g. "median" or
                 ``{"name": "krum", "f": 1}`` (see :mod:`fedctl.aggregators.select`).
federated_eval:  after each round, send the new global model to (sampled) sites as an
                 ``evaluate`` task; their metrics, weighted by ``meta["NUM_SAMPLES"]``, join the
                 round's metrics as ``eval_<name>``.
eval_every:      evaluate (federated and server-side) every k rounds, and after the last.
server_eval:     a function ``(params, current_round) -> {name: number}`` run on the server
                 with the new global model; its metrics join the round's as ``server_<name>``.
cross_site_eval: after the last round, evaluate the global model and every site's own model
                 on every site (:mod:`fedctl.workflows.cross_site`).
central_dp:      DP-FedAvg settings (:mod:`fedctl.privacy.dp`): every update clipped and counted
                 equally, Gaussian noise on the sum, ε tracked per round (``dp_epsilon``) and
                 a ``target_epsilon`` that ends the job before the budget would be exceeded.
secure_aggregation: True or settings (:mod:`fedctl.workflows.secure`): the server learns only
                 the sum of the updates, masked by the sites; with central_dp the sites add
                 the noise (distributed DP).
homomorphic_encryption: True or ``{"keys": [...]}`` (:mod:`fedctl.workflows.he`): those
                 parameters travel and are summed as CKKS ciphertexts; the server never holds
                 them in plain.

Subclasses (FedProx, FedOpt, …) override the small hooks: :meth:`task_meta_for`,
:meth:`task_params_for`, :meth:`weight_of`, :meth:`add_result`, :meth:`server_update`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import TooFewResults
from fedctl.aggregators.select import (
    aggregator_label,
    make_aggregator,
    min_results,
    parse_aggregator,
)
from fedctl.aggregators.weighted import MetricsMean, check_finite, check_update
from fedctl.codec.model import (
    NUM_STEPS_KEY,
    TASK_TRAIN,
    TaskResult,
    scalar_metrics,
)
from fedctl.privacy.dp import CentralDP, DPAggregator, DPRounds
from fedctl.sampling import check_sample_spec, sample_sites
from fedctl.workflows.base import (
    GatherOutcome,
    NotEnoughResults,
    RoundPolicy,
    Workflow,
    WorkflowContext,
    round_model,
)
from fedctl.workflows.evaluation import Evaluation
from fedctl.workflows.he import HERounds, HomomorphicEncryption
from fedctl.workflows.he import check_compatible as check_he_compatible
from fedctl.workflows.secure import SecureAggregation, SecureRound, check_compatible

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.base import Aggregator

log = logging.getLogger("fedctl.workflow")

AUTO_FLOAT64_MAX_ELEMENTS = 32 * 1024 * 1024


def resolve_precision(precision: str, params: dict[str, torch.Tensor]) -> str:
    """Turn "auto" into float64 or float32 by model size."""
    if precision != "auto":
        return precision
    n = sum(t.numel() for t in params.values())
    return "float64" if n <= AUTO_FLOAT64_MAX_ELEMENTS else "float32"


class FedAvg(Evaluation, Workflow):
    """Federated averaging; see the module docstring for the parameters."""

    #: whether the workflow's aggregation is a mean of updates the sites can mask
    supports_secure_aggregation = True

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        round_timeout: float | None = 3600.0,
        wait_after_min: float | None = None,
        precision: str = "auto",
        task_meta: dict[str, Any] | None = None,
        sample_clients: int | float | None = None,
        aggregator: str | dict[str, Any] | None = None,
        federated_eval: bool = False,
        eval_every: int = 1,
        server_eval: Callable[..., dict[str, float]] | None = None,
        cross_site_eval: bool = False,
        central_dp: dict[str, Any] | None = None,
        secure_aggregation: bool | dict[str, Any] | None = None,
        homomorphic_encryption: bool | dict[str, Any] | None = None,
    ) -> None:
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.policy = RoundPolicy(min_clients, round_timeout, wait_after_min)
        self.precision = precision
        self.task_meta = dict(task_meta or {})
        check_sample_spec(sample_clients, min_clients)
        self.sample_clients = sample_clients
        self.aggregator = aggregator
        self.min_results = min_results(aggregator)  # validates the spec
        if min_clients < self.min_results:
            raise ValueError(
                f"aggregator {aggregator_label(aggregator)} needs at least {self.min_results} "
                f"results per round, but min_clients is {min_clients}"
            )
        self.federated_eval = federated_eval
        self.eval_every = max(1, int(eval_every))
        self.server_eval = server_eval
        self.cross_site_eval = cross_site_eval
        dp = CentralDP.from_spec(central_dp)
        if dp is not None and parse_aggregator(aggregator)[0] != "mean":
            raise ValueError("central_dp sums clipped updates: it cannot use a robust aggregator")
        #: central DP across rounds (None when off)
        self.dp = DPRounds(dp) if dp is not None else None
        #: secure aggregation's settings (None when off)
        self.secure = SecureAggregation.from_spec(secure_aggregation)
        if self.secure is not None:
            if not self.supports_secure_aggregation:
                raise ValueError(f"{type(self).__name__} cannot run with secure_aggregation")
            if dp is not None and dp.adaptive:
                raise ValueError(
                    "adaptive clipping needs every update's norm: it does not go with "
                    "secure_aggregation (give central_dp a fixed clip)"
                )
            check_compatible(
                self.secure,
                aggregator_name=parse_aggregator(aggregator)[0],
                result_in=False,
                cross_site_eval=cross_site_eval,
            )
        #: homomorphic encryption's settings (None when off)
        self.he = HomomorphicEncryption.from_spec(homomorphic_encryption)
        if self.he is not None and not self.aggregates_plain_mean():
            raise ValueError(
                f"{type(self).__name__} changes the aggregate on the server: it cannot run "
                "with homomorphic_encryption (use FedAvg or FedProx)"
            )
        check_he_compatible(
            self.he,
            aggregator_name=parse_aggregator(aggregator)[0],
            central_dp=dp is not None,
            secure_aggregation=self.secure is not None,
            server_filters=False,
            server_eval=server_eval is not None,
            cross_site_eval=cross_site_eval,
        )
        self._he_rounds: HERounds | None = None
        #: the sites available in the current round (SCAFFOLD's N)
        self.round_sites: list[str] = []
        self._warned: set[tuple[str, str]] = set()

    def warn_once(self, ctx: WorkflowContext, topic: str, site: str, message: str) -> None:
        """Log and show ``message`` the first time ``site`` gives cause on ``topic``."""
        if (topic, site) in self._warned:
            return
        self._warned.add((topic, site))
        log.warning(message)
        ctx.emit("warning", message=message)

    @classmethod
    def aggregates_plain_mean(cls) -> bool:
        """Whether the new global model is the round's weighted mean of what sites sent (no
        server-side change a ciphertext could not take: FedAvg, FedProx)."""
        return all(
            getattr(cls, name) is getattr(FedAvg, name)
            for name in ("server_update", "add_result", "task_params_for", "weight_of")
        )

    # ------------------------------------------------------------------ hooks for subclasses

    def select_targets(self, ctx: WorkflowContext, sites: Sequence[str], rnd: int) -> list[str]:
        """The sites that train in round ``rnd``: all, or a seeded sample (``sample_clients``)."""
        return sample_sites(sites, self.sample_clients, self.min_clients, ctx.seed, rnd)

    def base_meta(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        """``FLModel.meta`` common to every task of the job (training and evaluation)."""
        return dict(self.task_meta)

    def task_meta_for(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        """``FLModel.meta`` of the round's training task."""
        return self.base_meta(ctx, rnd)

    def task_params_for(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int
    ) -> dict[str, torch.Tensor]:
        """What the round's training task carries (the global model; SCAFFOLD adds ``c``)."""
        return model

    def weight_of(self, ctx: WorkflowContext, result: TaskResult) -> float:
        """Aggregation weight of a result: its NUM_STEPS_CURRENT_ROUND, else 1 (warned once);
        with central DP, 1 for every site (what DP bounds is one site's influence)."""
        assert result.model is not None
        if self.dp is not None:
            return 1.0
        meta = result.model.meta or {}
        if NUM_STEPS_KEY in meta:
            value = meta[NUM_STEPS_KEY]
            return float(value) if isinstance(value, int | float) else value
        self.warn_once(
            ctx,
            "weight",
            result.site,
            f"{result.site} sent no meta['{NUM_STEPS_KEY}']; its update is weighted 1 "
            "(warned once per site)",
        )
        return 1.0

    def new_aggregator(self, global_params: dict[str, torch.Tensor]) -> Aggregator:
        """The round's aggregator: the weighted mean, or the robust one ``aggregator`` names."""
        precision = resolve_precision(self.precision, global_params)
        return make_aggregator(self.aggregator, global_params, precision)

    def add_result(
        self,
        ctx: WorkflowContext,
        agg: Aggregator,
        global_params: dict[str, torch.Tensor],
        result: TaskResult,
        weight: float,
    ) -> None:
        """Fold one accepted result into the aggregator (raise UpdateRejected to refuse it)."""
        assert result.model is not None and result.model.params is not None
        check_update(global_params, result.model.params, weight, result.model.params_type)
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
        model, start, state = self.resume(ctx, initial)
        del initial  # the first round's model is replaced after it: hold no second reference
        if start:
            self.load_state(state)
        check_compatible(
            self.secure,
            aggregator_name=parse_aggregator(self.aggregator)[0],
            result_in=bool(ctx.filters.at("result_in")),
            cross_site_eval=self.cross_site_eval,
        )
        if self.he is not None:
            check_he_compatible(
                self.he,
                aggregator_name=parse_aggregator(self.aggregator)[0],
                central_dp=self.dp is not None,
                secure_aggregation=self.secure is not None,
                server_filters=bool(ctx.filters.at("result_in") or ctx.filters.at("aggregate_out")),
                server_eval=self.server_eval is not None,
                cross_site_eval=self.cross_site_eval,
            )
            self._he_rounds = HERounds(self.he, ctx)
            self._he_rounds.prepare(model)
        ctx.emit(
            "run_started",
            num_rounds=self.num_rounds,
            start_round=start,
            min_clients=self.min_clients,
        )
        for rnd in range(start, self.num_rounds):
            ctx.check_abort()
            sites = ctx.comm.wait_for_sites(self.min_clients, self.policy.timeout)
            self.round_sites = list(sites)
            targets = self.select_targets(ctx, sites, rnd)
            if self.dp is not None:
                stop = self.dp.over_budget(rnd, len(targets), len(sites))
                if stop is not None:
                    ctx.emit("warning", message=stop)
                    log.warning("%s", stop)
                    break
            ctx.emit("round_started", round=rnd, targets=targets)
            new_model, metrics, outcome = self.train_round(ctx, model, rnd, targets)
            out_metrics = self.evaluate_round(ctx, new_model, rnd, sites)
            ctx.emit(
                "round_completed",
                round=rnd,
                metrics={**metrics, **out_metrics},
                accepted=outcome.accepted,
                failed=outcome.failed,
                missing=outcome.missing,
                duration=outcome.duration,
            )
            if ctx.store is not None:
                ctx.store.round_completed(
                    rnd, model, new_model, metrics, self.state_dict(), out_metrics=out_metrics
                )
            model = new_model
        if ctx.store is not None:
            ctx.store.save_model("final", model)
        if self.cross_site_eval:
            from fedctl.workflows.cross_site import cross_site_evaluate

            cross_site_evaluate(
                ctx,
                model,
                ctx.comm.wait_for_sites(1, self.policy.timeout),
                timeout=self.policy.timeout,
                meta=self.base_meta(ctx, self.num_rounds - 1),
                total_rounds=self.num_rounds,
            )
        return model

    def train_round(
        self,
        ctx: WorkflowContext,
        model: dict[str, torch.Tensor],
        rnd: int,
        targets: list[str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], GatherOutcome]:
        """One round: broadcast, aggregate as results arrive, update the global model."""
        if self.secure is not None:
            return self.secure_round(ctx, model, rnd, targets)
        if self._he_rounds is not None:
            return self.he_round(ctx, self._he_rounds, model, rnd, targets)
        params = self.task_params_for(ctx, model, rnd)
        task = ctx.new_task(
            TASK_TRAIN, round_model(params, rnd, self.num_rounds, self.task_meta_for(ctx, rnd))
        )
        if self.dp is not None:
            dp_ctx = ctx.filter_context("central_dp", round_=rnd)
            agg: Aggregator = self.dp.aggregator(model, len(targets), dp_ctx)
        else:
            agg = self.new_aggregator(model)
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            weight = self.weight_of(ctx, result)
            self.add_result(ctx, agg, model, result, weight)
            assert result.model is not None
            metrics.add(scalar_metrics(result.model.metrics), weight)

        outcome = ctx.gather(ctx.broadcast(task, targets), self.policy, on_result, round_=rnd)
        try:
            aggregate = agg.result()
        except TooFewResults as exc:
            raise NotEnoughResults(f"round {rnd + 1}: {exc}") from None
        new_model = self.server_update(ctx, model, aggregate, rnd)
        check_finite(new_model, f"round {rnd + 1}: the new global model")
        out = metrics.result()
        if self.dp is not None:
            assert isinstance(agg, DPAggregator)
            out.update(self.dp.round_done(agg, rnd, len(self.round_sites)))
            if ctx.store is not None:
                summary = self.dp.summary(len(targets), len(self.round_sites))
                ctx.store.save_json("privacy.json", summary)
        return new_model, out, outcome

    def secure_round(
        self,
        ctx: WorkflowContext,
        model: dict[str, torch.Tensor],
        rnd: int,
        targets: list[str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], GatherOutcome]:
        """A round under secure aggregation (:mod:`fedctl.workflows.secure`)."""
        assert self.secure is not None
        secure = SecureRound(self.secure, ctx, self.policy, rnd, self.dp, self.min_clients)
        aggregate, out = secure.run(
            model,
            self.task_params_for(ctx, model, rnd),
            self.task_meta_for(ctx, rnd),
            targets,
            self.num_rounds,
        )
        new_model = self.server_update(ctx, model, aggregate, rnd)
        check_finite(new_model, f"round {rnd + 1}: the new global model")
        if self.dp is not None:
            out.update(self.dp.account(rnd, len(targets), len(self.round_sites)))
            if ctx.store is not None:
                summary = self.dp.summary(len(targets), len(self.round_sites))
                summary["mechanism"] = "DP-FedAvg (distributed noise under secure aggregation)"
                summary["noise_per_site"] = secure.spec_for(model).noise_std
                ctx.store.save_json("privacy.json", summary)
        return new_model, out, secure.outcome

    def he_round(
        self,
        ctx: WorkflowContext,
        he: HERounds,
        model: dict[str, torch.Tensor],
        rnd: int,
        targets: list[str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], GatherOutcome]:
        """A round under homomorphic encryption (:mod:`fedctl.workflows.he`)."""
        meta = {**self.task_meta_for(ctx, rnd), **he.task_meta()}
        task = ctx.new_task(TASK_TRAIN, round_model(model, rnd, self.num_rounds, meta))
        task.result_bytes = he.result_bytes(model)
        agg = he.aggregator(model, resolve_precision(self.precision, model))
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            assert result.model is not None and result.model.params is not None
            weight = self.weight_of(ctx, result)
            he.check_result(result.model.meta, weight)
            agg.add(result.model.params, weight, result.model.params_type)
            metrics.add(scalar_metrics(result.model.metrics), weight)

        outcome = ctx.gather(ctx.broadcast(task, targets), self.policy, on_result, round_=rnd)
        return he.new_global(agg), metrics.result(), outcome

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Workflow state beyond the model that a resumed run needs (JSON and tensors)."""
        return self.dp.state_dict() if self.dp is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.dp is not None:
            self.dp.load_state(state)
