"""Personalization: parameters that stay on each site (FedBN, partial sharing / FedPer).

* **FedBN** — Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via
  Local Batch Normalization" (ICLR 2021). Batch-norm layers (weights, biases and running
  statistics) stay local; everything else is averaged. For feature skew: each site keeps the
  normalisation that fits its own scanner, camera or population.
* **Partial sharing (FedPer)** — Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning
  with Personalization Layers" (2019). Glob patterns over state_dict names choose what is
  federated (``shared``) and/or what stays on the site (``local``, e.g. ``["head.*"]``): a shared
  body and a personal head for each site.

The server sends the whole model with ``meta["personalization"]`` describing what stays local;
the script loads it with ``flare.personalize(model, received)``, which puts the site's own values
of the local parameters back (kept in ``flare.get_state()``, so they survive rounds in every
simulator mode), and sends ``pz.shared()``, which keeps the local values and returns only the
federated ones. The server drops local parameters if a script sends them anyway (warned once per
site). Local parameters keep their initial values in the global model that is saved.

Parameters (besides FedAvg's)
-----------------------------
fedbn:   keep batch-norm layers local (default False).
shared:  glob patterns of the parameters that are federated (None: all that are not local).
local:   glob patterns of parameters that stay on each site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import UpdateRejected
from fedctl.codec.keys import PERSONAL_KEY, bn_prefixes_from_names, stays_local
from fedctl.codec.model import TaskResult
from fedctl.errors import RunFailed
from fedctl.workflows.base import KeyView, WorkflowContext
from fedctl.workflows.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.base import Aggregator


class Personalized(FedAvg):
    """FedAvg over the shared parameters only; see the module docstring."""

    #: sites keep personal parts the server aggregates separately
    supports_secure_aggregation = False

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        fedbn: bool = False,
        shared: list[str] | None = None,
        local: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_rounds, min_clients, **kwargs)
        if not fedbn and shared is None and not local:
            raise ValueError("personalization needs fedbn=True, shared patterns or local patterns")
        self.spec = {
            "fedbn": bool(fedbn),
            "shared": list(shared) if shared is not None else None,
            "local": list(local or []),
        }
        self._local: set[str] | None = None

    def base_meta(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        return {**super().base_meta(ctx, rnd), PERSONAL_KEY: self.spec}

    def local_keys(self, global_params: dict[str, torch.Tensor]) -> set[str]:
        """The global model's entries that stay on the sites."""
        if self._local is None:
            bn = bn_prefixes_from_names(set(global_params))
            self._local = {k for k in global_params if stays_local(k, self.spec, bn)}
            if len(self._local) == len(global_params):
                raise RunFailed("personalization keeps every parameter local: nothing to federate")
        return self._local

    def resume(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
        # a spec that leaves nothing to federate fails before round 1 (here, not in an override
        # of run(), whose frame would hold the initial model for the whole run)
        self.local_keys(initial)
        return super().resume(ctx, initial)

    def add_result(
        self,
        ctx: WorkflowContext,
        agg: Aggregator,
        global_params: dict[str, torch.Tensor],
        result: TaskResult,
        weight: float,
    ) -> None:
        assert result.model is not None and result.model.params is not None
        local = self.local_keys(global_params)
        params = KeyView(result.model.params, lambda k: k not in local)  # lazy: no copies
        dropped = len(result.model.params) - len(params)
        if dropped:
            self.warn_once(
                ctx,
                "local",
                result.site,
                f"{result.site} sent {dropped} local parameter(s) (they stay on the site and are "
                "not averaged; use pz.shared() from flare.personalize); warned once per site",
            )
        if not params:
            raise UpdateRejected("the update holds no shared parameters")
        result.model.params = params
        super().add_result(ctx, agg, global_params, result, weight)
