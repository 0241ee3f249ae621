"""FedAvg rounds under homomorphic encryption: the server sums ciphertexts it cannot read.

With ``homomorphic_encryption`` the chosen parameters (all floating ones by default) leave each
site encrypted with the project's CKKS key as ``w · x`` (:mod:`fedctl.privacy.he.model`); the
server adds them as ciphertexts with its public context (:class:`~fedctl.aggregators.he.HEMean`)
and the new global model holds the encrypted sum Σ w·x with its description, divisor Σ w. Sites
decrypt the next round's model before the script sees it, so the script trains on the weighted
mean exactly as under FedAvg (within CKKS's error, :attr:`HEParams.error_bound`). The server,
its checkpoints and ``final.safetensors`` hold only ciphertexts for those parameters:
``fedctl he decrypt`` (with a site's kit, or the run's context in simulation) reads them.

Only a plain weighted mean can be computed on ciphertexts: robust aggregators, central DP,
server-side filters and evaluation, cross-site evaluation and secure aggregation are refused,
as is any workflow that changes the aggregate on the server (FedOpt, FedAvgM, SCAFFOLD, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import UpdateRejected
from fedctl.errors import FedctlError, RunFailed

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import HEContext
    from fedctl.workflows.base import WorkflowContext

#: slack on top of the ciphertexts' bound for a result's plain parts and framing
RESULT_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class HomomorphicEncryption:
    """The ``homomorphic_encryption`` argument of a recipe: True (every floating parameter)
    or ``{"keys": [names]}``. The CKKS parameters are the project's (``project.yml``); in
    simulation fedctl makes a context with the defaults for each run."""

    keys: tuple[str, ...] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> HomomorphicEncryption | None:
        """Validate a recipe's ``homomorphic_encryption`` (None/False: off)."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, Mapping) or set(spec) - {"keys"}:
            raise FedctlError(
                "homomorphic_encryption must be true or {'keys': [parameter names]}, got "
                f"{spec!r}"
            )
        keys = spec.get("keys")
        if keys is None:
            return cls()
        if (
            not isinstance(keys, list | tuple)
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise FedctlError(
                f"homomorphic_encryption.keys must be a non-empty list of names, got {keys!r}"
            )
        return cls(tuple(dict.fromkeys(keys)))

    def spec(self) -> dict[str, Any]:
        """The JSON form (what a recipe exports)."""
        return {"keys": list(self.keys) if self.keys is not None else None}


def check_compatible(
    he: HomomorphicEncryption | None,
    *,
    aggregator_name: str,
    central_dp: bool,
    secure_aggregation: bool,
    server_filters: bool,
    server_eval: bool,
    cross_site_eval: bool,
) -> None:
    """Refuse what needs plain updates or a plain global model on the server."""
    if he is None:
        return
    refusals = [
        (aggregator_name != "mean", "a robust aggregator (it compares plain updates)"),
        (central_dp, "central_dp (its noise and clipping need plain updates)"),
        (secure_aggregation, "secure_aggregation (use one or the other)"),
        (server_filters, "result_in or aggregate_out filters (run them on the sites)"),
        (server_eval, "server_eval (the server holds only ciphertexts)"),
        (cross_site_eval, "cross_site_eval (it collects every site's plain model)"),
    ]
    for refused, what in refusals:
        if refused:
            raise FedctlError(f"homomorphic_encryption does not go with {what}")


class HERounds:
    """The server's side of HE across a job's rounds (used by FedAvg)."""

    def __init__(self, settings: HomomorphicEncryption, ctx: WorkflowContext) -> None:
        from fedctl.privacy.he import HEError, load_context

        if ctx.he_public is None:
            raise RunFailed(
                "the job uses homomorphic_encryption, but this server has no HE context: "
                "provision the project with a homomorphic_encryption: section"
            )
        try:
            self.ctx: HEContext = load_context(ctx.he_public, need_secret=False)
        except HEError as exc:
            raise RunFailed(str(exc)) from None
        self.settings = settings
        self.keys: list[str] | None = None
        self.template: dict[str, Any] | None = None

    def prepare(self, model: Mapping[str, torch.Tensor]) -> None:
        """Fix the encrypted names and their description from the job's first global model
        (plain, or encrypted when the job resumes)."""
        from fedctl.privacy.he import HEError, describe_params, parse_description
        from fedctl.privacy.he.model import extract

        try:
            plain, description = extract(model)
            if description is not None:
                parsed = parse_description(description, self.ctx)
                self.keys = list(parsed.tensors)
                self.template = parsed.with_divisor(1.0).to_dict()
            else:
                keys = list(self.settings.keys) if self.settings.keys is not None else None
                self.template = describe_params(plain, keys, self.ctx)
                self.keys = list(self.template["tensors"])
        except HEError as exc:
            raise RunFailed(f"homomorphic_encryption: {exc}") from None
        if not self.keys:
            raise RunFailed("homomorphic_encryption: the model has no floating parameter")

    def task_meta(self) -> dict[str, Any]:
        """What the training task's meta adds: the names each site encrypts."""
        from fedctl.privacy.he.model import HE_TASK_KEY

        return {HE_TASK_KEY: {"keys": self.keys}}

    def result_bytes(self, model: Mapping[str, torch.Tensor]) -> int:
        """The most bytes an honest site's encrypted result can have."""
        from fedctl.privacy.he.blob import blob_bound
        from fedctl.privacy.he.model import extract

        assert self.template is not None
        plain, _ = extract(model)
        total = RESULT_SLACK_BYTES
        for k, t in plain.items():
            spec = self.template["tensors"].get(k)
            total += blob_bound(self.ctx, spec["count"]) if spec else t.numel() * t.element_size()
        return total

    def aggregator(self, model: Mapping[str, torch.Tensor], precision: str) -> HEMean:
        """The round's aggregator over ``model`` (the global model, plain or encrypted)."""
        from fedctl.aggregators.he import HEMean
        from fedctl.privacy.he.model import extract

        plain, _ = extract(model)
        return HEMean(plain, self.template, self.ctx, precision)

    def check_result(self, meta: Mapping[str, Any] | None, weight: float) -> None:
        """Refuse a result whose own description does not match the round's (other names,
        another key, or a weight other than the server's)."""
        from fedctl.privacy.he import HE_META_KEY, HEError, parse_description

        try:
            desc = parse_description((meta or {}).get(HE_META_KEY), self.ctx)
        except HEError as exc:
            raise UpdateRejected(str(exc)) from None
        if sorted(desc.tensors) != sorted(self.keys or []):
            raise UpdateRejected("the update's encrypted parameters are not the ones the job asked")
        if desc.divisor != weight:
            raise UpdateRejected(
                f"the update was encrypted with weight {desc.divisor}, but its aggregation "
                f"weight is {weight}"
            )

    def new_global(self, agg: HEMean) -> dict[str, Any]:
        """The round's new global model: the aggregate with its description embedded."""
        from fedctl.privacy.he.model import embed

        result = agg.result()
        assert agg.result_description is not None
        return embed(result, agg.result_description)
