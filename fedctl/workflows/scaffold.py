"""SCAFFOLD: control variates that correct client drift.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning" (ICML 2020), option II. The server keeps a control variate ``c`` (an estimate
of the global gradient); each site keeps its own ``c_i`` (of its local gradient). Local steps use
the corrected gradient ``g - c_i + c``, so a site with skewed data stops pulling the model
towards its own optimum. After K local steps with learning rate η_l a site updates
``c_i ← c_i - c + (x - y_i) / (K·η_l)`` and reports ``Δc_i``; the server sets
``x ← x + η_g·mean(y_i - x)`` and ``c ← c + Σ Δc_i / N`` (N = sites available in the round).

Transport: ``c`` travels with the model in the task's params under ``scaffold.c:<name>``, and
``Δc_i`` comes back in the result's params under ``scaffold.dc:<name>``; ``c_i`` stays on the
site in ``flare.get_state()`` (so it survives rounds even when the simulator re-runs the script
every round). The script adds three short lines (see :class:`fedctl.client.Scaffold`)::

    scaffold = flare.Scaffold(model, received, optimizer)   # after receive()
    scaffold.correct()                                       # after loss.backward()
    flare.send(scaffold.update(flare.FLModel(...)))          # adds Δc_i, keeps c_i

Parameters (besides FedAvg's)
-----------------------------
server_lr:  η_g, the global step size on the averaged change (default 1.0).

The model average may use a robust ``aggregator``; ``c`` is always the plain mean. ``c`` is
checkpointed with the round. Local optimizers other than plain SGD work but are outside the
paper's analysis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.server_opt import scaled_step
from fedctl.aggregators.weighted import UpdateRejected, check_update
from fedctl.codec.keys import SCAFFOLD_C_PREFIX, SCAFFOLD_DC_PREFIX, SCAFFOLD_KEY
from fedctl.codec.model import TaskResult
from fedctl.workflows.base import KeyView, WorkflowContext
from fedctl.workflows.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.base import Aggregator


class Scaffold(FedAvg):
    """SCAFFOLD's server side; see the module docstring."""

    #: its control variates are aggregated next to the model
    supports_secure_aggregation = False

    def __init__(
        self, num_rounds: int, min_clients: int, *, server_lr: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(num_rounds, min_clients, **kwargs)
        self.server_lr = float(server_lr)
        #: the server control variate, by parameter name (empty means zero)
        self.c: dict[str, torch.Tensor] = {}
        self._dc_sum: dict[str, torch.Tensor] = {}

    def task_meta_for(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        return {**super().task_meta_for(ctx, rnd), SCAFFOLD_KEY: True}

    def task_params_for(
        self, ctx: WorkflowContext, model: dict[str, torch.Tensor], rnd: int
    ) -> dict[str, torch.Tensor]:
        return {**model, **{SCAFFOLD_C_PREFIX + k: v for k, v in self.c.items()}}

    def new_aggregator(self, global_params: dict[str, torch.Tensor]) -> Aggregator:
        self._dc_sum = {}
        return super().new_aggregator(global_params)

    def add_result(
        self,
        ctx: WorkflowContext,
        agg: Aggregator,
        global_params: dict[str, torch.Tensor],
        result: TaskResult,
        weight: float,
    ) -> None:
        import torch

        assert result.model is not None and result.model.params is not None
        received = result.model.params
        # views, not copies: large results may load their tensors lazily, one at a time
        params = KeyView(received, lambda k: not k.startswith(SCAFFOLD_DC_PREFIX))
        dc = KeyView(
            received,
            lambda k: k.startswith(SCAFFOLD_DC_PREFIX),
            rename=lambda k: k[len(SCAFFOLD_DC_PREFIX) :],
        )
        check_update(global_params, params, weight, result.model.params_type)
        check_update(global_params, dc, 1.0)
        for k, v in dc.items():
            if not v.is_floating_point():
                raise UpdateRejected(f"control-variate change for {k!r} is not floating-point")
        if not dc:
            self.warn_once(
                ctx,
                "scaffold",
                result.site,
                f"{result.site} sent no SCAFFOLD control-variate change (does its script use "
                "flare.Scaffold?); warned once per site",
            )
        agg.add(params, weight, result.model.params_type, validate=False)
        for k, v in dc.items():
            acc = self._dc_sum.get(k)
            self._dc_sum[k] = v.to(torch.float64) if acc is None else acc + v.to(torch.float64)

    def server_update(
        self,
        ctx: WorkflowContext,
        global_params: dict[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        rnd: int,
    ) -> dict[str, torch.Tensor]:
        n = max(1, len(self.round_sites))
        c = dict(self.c)
        for k, total in self._dc_sum.items():
            old = c.get(k)
            new = total / n if old is None else old.double() + total / n
            c[k] = new.to(global_params[k].dtype)
        self.c = c
        self._dc_sum = {}
        if self.server_lr == 1.0:
            return aggregate
        return scaled_step(global_params, aggregate, self.server_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c)} if self.c else {}

    def load_state(self, state: dict[str, Any]) -> None:
        self.c = dict(state.get("c") or {})
