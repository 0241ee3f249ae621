"""Central (user-level) differential privacy: DP-FedAvg with a real accountant.

DP-FedAvg (McMahan et al., ICLR 2018): every site's update is clipped to L2 norm ``C``, the
clipped updates are summed, Gaussian noise of standard deviation ``z·C`` is added to the sum,
and the sum is divided by the expected number of sites per round ``m`` (a fixed denominator,
so one site's presence changes the aggregate by at most ``C/m``). With adaptive clipping
(Andrew et al., NeurIPS 2021), ``C`` follows the ``target_quantile`` of the update norms: each
round the fraction of updates within ``C`` is counted with Gaussian noise (``count_stddev``)
and ``C ← C·exp(−clip_lr·(fraction − target_quantile))``; the noise on the updates is raised so
that the two releases together cost exactly what noise multiplier ``z`` alone would.

The privacy loss of the rounds so far is computed with Google's ``dp-accounting`` (the
optional ``fedctl[dp]`` extra): each round is the Gaussian mechanism with noise multiplier
``z`` on a Poisson sample of rate ``q = m / N`` sites (``q = 1`` when every site takes part;
fedctl samples a fixed count, for which Poisson accounting is the usual approximation),
composed over rounds, by RDP (default) or PLD. The guarantee is about one *site's* whole
contribution (user-level), against whoever sees the models (sites, observers, the final
model); the server itself is trusted with the individual updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import ParamsType
from fedctl.errors import FedctlError, UsageError

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.filters import FilterContext

ACCOUNTANTS = ("rdp", "pld")


class DPError(UsageError):
    """A central DP configuration that cannot work (one line says why)."""


class MissingExtra(FedctlError):
    """An optional extra is needed: ``pip install 'fedctl[dp]'``."""

    exit_code = 2


def _positive(name: str, value: Any, *, zero: bool = False, upper: float = math.inf) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if zero else value > 0) and value <= upper
    if not ok:
        bound = "≥ 0" if zero else "> 0"
        rng = f"{bound}" + (f" and ≤ {upper}" if upper < math.inf else "")
        raise DPError(f"central_dp.{name} must be a number {rng}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CentralDP:
    """The ``central_dp`` argument of a recipe (see the module docstring)."""

    noise_multiplier: float
    clip: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None
    accountant: str = "rdp"

    @classmethod
    def from_spec(cls, spec: Any) -> CentralDP | None:
        """Validate a recipe's ``central_dp`` (a mapping, or None for off)."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise DPError("central_dp must be a mapping, e.g. {'noise_multiplier': 1.0, 'clip': 1}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise DPError(f"central_dp has no setting {unknown[0]!r} (it has {', '.join(known)})")
        for required in ("noise_multiplier", "clip"):
            if required not in spec:
                raise DPError(f"central_dp needs {required!r}")
        dp = cls(**spec)
        _positive("noise_multiplier", dp.noise_multiplier, zero=True)
        _positive("clip", dp.clip)
        _positive("delta", dp.delta, upper=0.5)
        if dp.target_epsilon is not None:
            _positive("target_epsilon", dp.target_epsilon)
        if not isinstance(dp.adaptive, bool):
            raise DPError(f"central_dp.adaptive must be true or false, got {dp.adaptive!r}")
        _positive("target_quantile", dp.target_quantile, upper=1.0)
        _positive("clip_lr", dp.clip_lr)
        if dp.count_stddev is not None:
            _positive("count_stddev", dp.count_stddev)
        if dp.accountant not in ACCOUNTANTS:
            raise DPError(
                f"central_dp.accountant must be one of {ACCOUNTANTS}, got {dp.accountant!r}"
            )
        return dp

    def spec(self) -> dict[str, Any]:
        return asdict(self)

    def count_noise(self, expected: int) -> float:
        """Standard deviation of the noise on the clipped count (adaptive clipping)."""
        return self.count_stddev if self.count_stddev is not None else expected / 20.0

    def update_noise_multiplier(self, expected: int) -> float:
        """The noise multiplier on the updates: ``z`` itself, or with adaptive clipping the
        larger one that leaves room for the count's release at the same total cost."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        two_sigma_b = 2 * self.count_noise(expected)
        if two_sigma_b <= z:
            raise DPError(
                f"adaptive clipping with noise_multiplier {z} and {expected} sites per round needs "
                f"count_stddev > {z / 2:g} (got {two_sigma_b / 2:g}): set central_dp.count_stddev"
            )
        return (z**-2 - two_sigma_b**-2) ** -0.5

    def check_delta(self, num_sites: int) -> None:
        """δ must be below 1/N to mean anything for N sites."""
        if self.delta >= 1 / num_sites:
            raise DPError(
                f"central_dp.delta = {self.delta:g} is not below 1/{num_sites} (the number of "
                "sites): a guarantee that weak protects nobody"
            )


def epsilon(dp: CentralDP, rounds: int, sampled: int, population: int) -> float:
    """ε after ``rounds`` rounds of ``sampled`` out of ``population`` sites, at ``dp.delta``."""
    if rounds <= 0:
        return 0.0
    if dp.noise_multiplier == 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError:
        raise MissingExtra(
            "central DP's accountant needs the dp extra: pip install 'fedctl[dp]'"
        ) from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # "failed to converge" notes per order
    q = min(1.0, sampled / population)
    event: Any = dp_accounting.GaussianDpEvent(dp.noise_multiplier)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    event = dp_accounting.SelfComposedDpEvent(event, rounds)
    accountant: Any = rdp.RdpAccountant() if dp.accountant == "rdp" else pld.PLDAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(dp.delta))


class DPAggregator:
    """One round of DP-FedAvg aggregation (clip, sum, noise, fixed denominator).

    Follows the :class:`~fedctl.aggregators.base.Aggregator` protocol; a result's weight is
    ignored (every site counts the same: a site's influence is what DP bounds).
    """

    def __init__(
        self,
        global_params: Mapping[str, torch.Tensor],
        clip: float,
        noise_multiplier: float,
        expected: int,
        ctx: FilterContext,
    ) -> None:
        self.global_params = global_params
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.expected = expected
        self.ctx = ctx
        self._sum: dict[str, torch.Tensor] = {}
        self.count = 0
        self.total_weight = 0.0
        #: how many updates were within the clip norm (adaptive clipping counts them)
        self.within = 0
        self.norms: list[float] = []

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = ParamsType.FULL,
        *,
        validate: bool = True,
    ) -> None:
        """Clip the update to the round's norm and add it to the sum."""
        diff = params_type == ParamsType.DIFF
        g = self.global_params

        def update(k: str) -> torch.Tensor:
            t = params[k].double()
            return t if diff else t - g[k].double()

        floats = [k for k, t in params.items() if t.is_floating_point() and t.numel()]
        norm = math.sqrt(sum(float(update(k).pow(2).sum()) for k in floats))
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        for k in floats:
            u = update(k).mul_(scale)
            acc = self._sum.get(k)
            self._sum[k] = u if acc is None else acc.add_(u)
        self.norms.append(norm)
        self.within += norm <= self.clip
        self.count += 1
        self.total_weight += 1.0

    def result(self) -> dict[str, torch.Tensor]:
        """The global model plus (sum of clipped updates + noise) / expected sites."""
        import torch

        sigma = self.noise_multiplier * self.clip
        out: dict[str, torch.Tensor] = {}
        for name, g in self.global_params.items():
            if not (g.is_floating_point() and g.numel()):
                out[name] = g
                continue
            total = self._sum.pop(name, None)
            if total is None:  # no site sends it (e.g. kept local by exclude_vars): unchanged
                out[name] = g
                continue
            if sigma > 0:
                gen = self.ctx.generator("central_dp", name)
                total.add_(torch.randn(g.shape, generator=gen, dtype=torch.float64), alpha=sigma)
            out[name] = (g.double() + total / self.expected).to(g.dtype)
        return out

    def noisy_fraction_within(self, stddev: float) -> float:
        """The fraction of updates within the clip norm, with Gaussian noise (adaptive clip)."""
        import torch

        noise = float(torch.randn(1, generator=self.ctx.generator("central_dp_count"))) * stddev
        return (self.within + noise) / self.expected


class DPRounds:
    """Central DP across a job's rounds: the aggregator of each round, the clip norm (adaptive
    or not), the privacy spent, and the budget check. A workflow holds one (see FedAvg)."""

    def __init__(self, dp: CentralDP) -> None:
        self.dp = dp
        self.clip = dp.clip
        self.rounds = 0
        self.last_epsilon = 0.0

    def aggregator(
        self, global_params: Mapping[str, torch.Tensor], expected: int, ctx: FilterContext
    ) -> DPAggregator:
        """This round's aggregator (``expected``: the sites sampled for it)."""
        z = self.dp.update_noise_multiplier(expected)
        return DPAggregator(global_params, self.clip, z, expected, ctx)

    def over_budget(self, next_round: int, sampled: int, population: int) -> str | None:
        """Why round ``next_round`` (0-based) must not run: the budget would be exceeded."""
        self.dp.check_delta(population)
        target = self.dp.target_epsilon
        if target is None:
            return None
        eps = epsilon(self.dp, next_round + 1, sampled, population)
        if eps <= target:
            return None
        return (
            f"privacy budget reached: round {next_round + 1} would bring ε to {eps:.3g} "
            f"> target_epsilon {target:g} (δ = {self.dp.delta:g})"
        )

    def round_done(self, agg: DPAggregator, rnd: int, population: int) -> dict[str, float]:
        """Account the round (and move the clip norm, if adaptive); its privacy metrics."""
        used = self.clip
        out = self.account(rnd, agg.expected, population)
        if self.dp.adaptive:
            fraction = agg.noisy_fraction_within(self.dp.count_noise(agg.expected))
            self.clip *= math.exp(-self.dp.clip_lr * (fraction - self.dp.target_quantile))
        return {**out, "dp_clip": used}

    def account(self, rnd: int, expected: int, population: int) -> dict[str, float]:
        """Account round ``rnd`` (``expected`` sites sampled of ``population``) with the
        noise of ``z`` times the clip; its privacy metrics."""
        self.rounds = rnd + 1
        self.last_epsilon = epsilon(self.dp, self.rounds, expected, population)
        return {"dp_epsilon": self.last_epsilon, "dp_clip": self.clip}

    def summary(self, sampled: int, population: int) -> dict[str, Any]:
        """What result.json and ``Run.extra["privacy"]`` report."""
        return {
            "mechanism": "DP-FedAvg (central, user-level)",
            "epsilon": self.last_epsilon,
            "delta": self.dp.delta,
            "rounds": self.rounds,
            "noise_multiplier": self.dp.noise_multiplier,
            "clip": self.clip,
            "adaptive_clip": self.dp.adaptive,
            "sites_per_round": sampled,
            "sites": population,
            "accountant": self.dp.accountant,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"dp_clip": self.clip, "dp_rounds": self.rounds, "dp_epsilon": self.last_epsilon}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.clip = float(state.get("dp_clip", self.clip))
        self.rounds = int(state.get("dp_rounds", self.rounds))
        self.last_epsilon = float(state.get("dp_epsilon", self.last_epsilon))
