"""Secure aggregation rounds: the server learns the sum of the sites' updates, never one.

A round with ``secure_aggregation`` is five exchanges with the round's sites instead of one
(:mod:`fedctl.privacy.secagg` has the protocol; the sites' runtime answers the system tasks,
the training script sees only its usual training task):

1. *keys*: each site makes two key pairs and signs the public keys (with its identity key:
   its startup kit's in POC and production, a key derived from the run's seed in simulation);
2. *shares*: each site splits its secrets into shares sealed for its peers;
3. *train*: the script trains as usual; its site masks the update (quantized, see
   :mod:`fedctl.privacy.secagg.vector`) and sends only that, with the script's metrics;
4. *consistency*: the survivors sign who survived (stops a server that lies about dropouts);
5. *unmask*: the survivors reveal what removes the masks of the sum, and only of the sum.

Sites that drop out after step 2 are recovered (their masks are removed with their shares)
as long as at least ``threshold`` sites of each share group remain. The new global model is
the old one plus the mean update (weighted by ``NUM_STEPS_CURRENT_ROUND / max_weight`` when
``max_weight`` is set, otherwise every site weighs the same), equal to FedAvg's within the
quantization error (:meth:`SecureAggregation.error_bound`).

With ``central_dp`` too, the noise is added by the sites (*distributed DP*): each clips its
update to L2 norm ``clip`` and adds Gaussian noise of standard deviation ``z·clip/√min_clients``
per coordinate, so the sum of any ``min_clients`` or more survivors carries at least the
``z·clip`` of central DP, without a server trusted with the updates; the accountant is the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import TASK_TRAIN, FLModel, ParamsType, TaskResult, scalar_metrics
from fedctl.errors import FedctlError
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.keys import CERT, CERTS, INPUT, MASKED, META, START, TASK
from fedctl.workflows.base import GatherOutcome, NotEnoughResults, RoundPolicy, WorkflowContext

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.dp import DPRounds
    from fedctl.privacy.secagg.vector import InputSpec

#: the longest certificate a site may send with its keys
MAX_CERT_CHARS = 16_384


@dataclass(frozen=True)
class SecureAggregation:
    """The ``secure_aggregation`` argument of a recipe (True: every default).

    ``clip``: each coordinate of an update is clamped to ``[-clip, clip]`` (with central DP:
    the update's L2 norm is clipped to central_dp's clip instead). ``bits``: bits per value
    (q); the error of the mean is at most ``clip / (2**bits - 1)`` per coordinate when every
    site weighs the same. ``max_weight``: weigh sites by ``NUM_STEPS_CURRENT_ROUND`` up to
    this (None: the same weight for all). ``threshold``: shares needed to unmask (default a
    majority of a share group). ``neighbours``: SecAgg+ (an even number; None: everyone masks
    against everyone). ``consistency_check``: the round that stops a server lying about who
    survived. ``stochastic_rounding``: unbiased rounding (secret randomness on real sites).
    """

    clip: float = 8.0
    bits: int = 32
    max_weight: float | None = None
    threshold: int | None = None
    neighbours: int | None = None
    consistency_check: bool = True
    stochastic_rounding: bool = False

    @classmethod
    def from_spec(cls, spec: Any) -> SecureAggregation | None:
        """Validate a recipe's ``secure_aggregation`` (None/False: off; True: defaults)."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, Mapping):
            raise SecAggConfigError(
                "secure_aggregation must be true or a mapping, e.g. {'clip': 8.0, 'bits': 32}"
            )
        known = list(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise SecAggConfigError(
                f"secure_aggregation has no setting {unknown[0]!r} (it has {', '.join(known)})"
            )
        from fedctl.privacy.secagg.protocol import SecAggConfig
        from fedctl.privacy.secagg.quantize import MAX_BITS

        sa = cls(**spec)
        for name in ("clip", "max_weight"):
            value = getattr(sa, name)
            if value is None and name == "max_weight":
                continue
            if not (_real(value) and value > 0):
                raise SecAggConfigError(
                    f"secure_aggregation.{name} must be a number > 0, got {value!r}"
                )
        if not (_int(sa.bits) and 1 <= sa.bits <= MAX_BITS):
            raise SecAggConfigError(
                f"secure_aggregation.bits must be an integer in 1..{MAX_BITS}, got {sa.bits!r}"
            )
        for name in ("consistency_check", "stochastic_rounding"):
            if not isinstance(getattr(sa, name), bool):
                raise SecAggConfigError(f"secure_aggregation.{name} must be true or false")
        # threshold and neighbours: checked by the protocol's own parameters
        SecAggConfig("check", 2, 1.0, sa.bits, sa.threshold, sa.neighbours)
        return sa

    def spec(self) -> dict[str, Any]:
        return asdict(self)

    def error_bound(self) -> float:
        """The most a coordinate of the mean update can be off by quantization when every
        site weighs the same and every coordinate is within the clip (rounding to nearest:
        each of the n values is off by at most half a step of ``2·clip / (2**bits - 1)``, the
        mean of n of them by as much)."""
        return self.clip / ((1 << self.bits) - 1)


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SecureRound:
    """One round of secure aggregation for a FedAvg-family workflow (see the module doc)."""

    def __init__(
        self,
        sa: SecureAggregation,
        ctx: WorkflowContext,
        policy: RoundPolicy,
        rnd: int,
        dp: DPRounds | None = None,
        min_clients: int = 1,
    ) -> None:
        self.sa = sa
        self.ctx = ctx
        self.policy = policy
        self.rnd = rnd
        self.dp = dp
        self.min_clients = min_clients
        self.outcome = GatherOutcome()

    def spec_for(self, model: Mapping[str, torch.Tensor]) -> InputSpec:
        """The input spec of this round (distributed DP's noise with central_dp)."""
        from fedctl.privacy.secagg.vector import InputSpec

        if self.dp is None:
            return InputSpec.for_model(model, self.sa.clip, max_weight=self.sa.max_weight)
        clip = self.dp.clip
        noise = self.dp.dp.noise_multiplier * clip / math.sqrt(self.min_clients)
        return InputSpec.for_model(model, clip, l2=True, noise_std=noise)

    # ------------------------------------------------------------------ the exchanges

    def _exchange(
        self,
        phase: str,
        meta: dict[str, Any],
        targets: list[str],
        take: Any,
        site_meta: dict[str, dict[str, Any]] | None = None,
        params: Any = None,
        name: str = TASK,
        total_rounds: int | None = None,
    ) -> GatherOutcome:
        """Send one task to ``targets``, feed each answer to ``take``; failures are kept."""
        task = self.ctx.new_task(
            name,
            FLModel(
                params_type=ParamsType.FULL if params is not None else None,
                params=params,
                current_round=self.rnd,
                total_rounds=total_rounds,
                start_round=0 if params is not None else None,
                meta=meta,
            ),
        )
        if site_meta:
            task.site_meta = site_meta
        policy = RoundPolicy(
            max(self.policy.min_responses, 1), self.policy.timeout, self.policy.wait_after_min
        )
        outcome = self.ctx.gather(
            self.ctx.broadcast(task, targets), policy, take, round_=self.rnd, phase=phase
        )
        for site, why in outcome.failed.items():
            self.outcome.failed.setdefault(site, f"{phase}: {why}")
        for site in outcome.missing:
            self.outcome.failed.setdefault(site, f"{phase}: no answer within the deadline")
        self.outcome.duration += outcome.duration
        return outcome

    @staticmethod
    def _message(result: TaskResult) -> dict[str, Any]:
        assert result.model is not None
        msg = (result.model.meta or {}).get(META)
        if not isinstance(msg, Mapping):
            raise SecAggError("the answer carries no secure-aggregation message")
        if msg.get("party") != result.site:
            raise SecAggError(f"the answer speaks for {msg.get('party')!r:.60}, not its sender")
        return dict(msg)

    def run(
        self,
        model: Mapping[str, torch.Tensor],
        task_params: dict[str, torch.Tensor],
        task_meta: dict[str, Any],
        targets: list[str],
        total_rounds: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The round: the new global model and the round's metrics (unweighted means of the
        scripts' metrics); ``self.outcome`` says who took part."""
        import torch

        from fedctl.aggregators.weighted import MetricsMean
        from fedctl.privacy.secagg.protocol import SecAggConfig
        from fedctl.privacy.secagg.server import SecAggServer

        spec = self.spec_for(model)
        config = SecAggConfig(
            f"{self.ctx.job_id}:round-{self.rnd + 1}",
            spec.length,
            1.0,  # pack_weighted's values are within [-1, 1]
            self.sa.bits,
            self.sa.threshold,
            self.sa.neighbours,
            self.sa.stochastic_rounding,
            self.sa.consistency_check,
        )
        server = SecAggServer(config)
        certs: dict[str, str] = {}
        metrics = MetricsMean()

        def advertised(result: TaskResult) -> None:
            msg = self._message(result)
            cert = (result.model.meta or {}).get(CERT) if result.model else None
            if cert is not None and not (isinstance(cert, str) and len(cert) <= MAX_CERT_CHARS):
                raise SecAggError("the certificate sent with the keys is malformed")
            server.receive_advertisement(msg)
            if cert is not None:
                certs[result.site] = cert

        def shared(result: TaskResult) -> None:
            server.receive_shares(self._message(result))

        def masked(result: TaskResult) -> None:
            msg = self._message(result)
            assert result.model is not None
            params = result.model.params or {}
            if set(params) != {MASKED}:
                raise SecAggError("a masked input carries exactly one tensor")
            server.receive_masked_input({**msg, "masked": torch.as_tensor(params[MASKED])})
            metrics.add(scalar_metrics(result.model.metrics), 1.0)

        def confirmed(result: TaskResult) -> None:
            server.receive_confirmation(self._message(result))

        def unmasked(result: TaskResult) -> None:
            server.receive_unmask(self._message(result))

        try:
            start = {"kind": START, "session": config.session, "config": config.public()}
            self._exchange("secagg keys", {META: start}, targets, advertised)
            request = server.share_keys_request()
            relay = {p: certs[p] for p in server.roster if p in certs}
            self._exchange("secagg shares", {META: request, CERTS: relay}, server.roster, shared)
            requests = server.masked_input_requests()
            outcome = self._exchange(
                "",
                {**task_meta, INPUT: spec.public()},
                sorted(requests),
                masked,
                site_meta={s: {META: r} for s, r in requests.items()},
                params=task_params,
                name=TASK_TRAIN,
                total_rounds=total_rounds,
            )
            if self.sa.consistency_check:
                request = server.consistency_request()
                self._exchange("secagg consistency", {META: request}, server.survivors, confirmed)
            request = server.unmask_request()
            self._exchange("secagg unmask", {META: request}, server.survivors, unmasked)
            total = server.result()
        except SecAggError as exc:
            raise NotEnoughResults(f"round {self.rnd + 1}: secure aggregation: {exc}") from None
        self.outcome.accepted = list(server.survivors)
        self.outcome.missing = [s for s in outcome.missing if s not in self.outcome.failed]
        for site in self.outcome.accepted:
            self.outcome.failed.pop(site, None)
        shapes = {k: model[k].shape for k in spec.keys}
        expected = len(targets) if self.dp is not None else None
        try:
            mean, _ = spec.mean_update(total, shapes, expected)
        except SecAggError as exc:
            raise NotEnoughResults(f"round {self.rnd + 1}: secure aggregation: {exc}") from None
        new = {
            k: (g.to(torch.float64) + mean[k]).to(g.dtype) if k in mean else g
            for k, g in model.items()
        }
        return new, metrics.result()


def check_compatible(
    sa: SecureAggregation | None, *, aggregator_name: str, result_in: bool, cross_site_eval: bool
) -> None:
    """Refuse settings that would see single sites' updates or cannot use a sum."""
    if sa is None:
        return
    if aggregator_name != "mean":
        raise FedctlError(
            "secure_aggregation gives the server only the sum of the updates: it takes no "
            "robust aggregator"
        )
    if result_in:
        raise FedctlError(
            "secure_aggregation hides each update from the server: result_in filters cannot "
            "run on it (run them on the sites, at result_out)"
        )
    if cross_site_eval:
        raise FedctlError(
            "secure_aggregation and cross_site_eval do not go together: cross-site evaluation "
            "collects every site's own model"
        )
