"""SCAFFOLD on the client: gradient correction and control-variate bookkeeping.

Three short lines in a training script (see :mod:`fedctl.workflows.scaffold` for the method)::

    received = flare.receive()
    model.load_state_dict(received.params)
    scaffold = flare.Scaffold(model, received, optimizer)
    ...
    loss.backward()
    scaffold.correct()                                      # g ← g - c_i + c
    optimizer.step()
    ...
    flare.send(scaffold.update(flare.FLModel(params=model.state_dict(), meta=...)))

``Scaffold`` reads the server's control variate ``c`` (sent with the model under reserved names,
which ``flare.receive()`` sets aside in ``received.optimizer_params``, so the model loads as
usual), reads this site's ``c_i`` from ``flare.get_state()`` (so it survives rounds even
when the simulator re-runs the script every round), and ``update`` stores the new ``c_i`` and adds
``Δc_i`` to what is sent. The learning rates of the optimizer's parameter groups are read at each
``correct()``, so schedulers are taken into account. Under a recipe other than SCAFFOLD all three
calls do nothing, so one script serves every recipe.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from fedctl.client.dp import refuse_gradient_edits
from fedctl.codec.keys import SCAFFOLD_C_PREFIX, SCAFFOLD_DC_PREFIX, SCAFFOLD_KEY
from fedctl.codec.model import FLModel
from fedctl.errors import ClientAPIError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: site-state key prefix of this site's control variate c_i
STATE_PREFIX = "scaffold.ci:"


class Scaffold:
    """One round of SCAFFOLD on a site; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        received: FLModel,
        optimizer: Any = None,
        *,
        lr: float | None = None,
    ) -> None:
        import torch

        params = received.params if received.params is not None else {}
        # c arrives under reserved params names; flare.receive() sets them aside in
        # optimizer_params (an FLModel built by hand may still have them in params)
        c = {}
        for source in (received.optimizer_params or {}, params):
            for k in [k for k in source if k.startswith(SCAFFOLD_C_PREFIX)]:
                c[k[len(SCAFFOLD_C_PREFIX) :]] = source[k]
                if source is params and isinstance(params, MutableMapping):
                    del params[k]  # so load_state_dict(received.params) works
        self.active = bool((received.meta or {}).get(SCAFFOLD_KEY))
        self.steps = 0
        if not self.active:
            return
        refuse_gradient_edits("SCAFFOLD's gradient correction", model)
        if optimizer is None and lr is None:
            raise ClientAPIError(
                "Scaffold needs the local optimizer (or lr=) to know the step size"
            )
        from fedctl.client.api import get_state

        self.model = model
        self.optimizer = optimizer
        self.lr = lr
        self.state = get_state()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in params]
        if missing:
            raise ClientAPIError(f"Scaffold: the received model has no {missing[0]!r}")
        self.names = [n for n, _ in named]
        self.x = {n: params[n].detach().to(torch.float32, copy=True) for n in self.names}
        self.c = {
            n: c[n].to(torch.float32) if n in c else torch.zeros_like(self.x[n]) for n in self.names
        }
        self.c_i = {}
        for n in self.names:
            saved = self.state.get(STATE_PREFIX + n)
            self.c_i[n] = (
                saved.to(torch.float32) if saved is not None else torch.zeros_like(self.x[n])
            )
        # the correction c - c_i, on each parameter's device and dtype, computed once per round
        self._pairs = [(p, (self.c[n] - self.c_i[n]).to(p.device, p.dtype)) for n, p in named]
        self._lr_sum = dict.fromkeys(self.names, 0.0)
        self._groups: list[list[str]] = []
        if optimizer is not None:
            by_id = {id(p): n for n, p in named}
            self._groups = [
                [by_id[id(p)] for p in g["params"] if id(p) in by_id]
                for g in optimizer.param_groups
            ]

    def correct(self) -> None:
        """Add ``c - c_i`` to every gradient; call after ``loss.backward()``, before ``step()``."""
        if not self.active:
            return
        for p, corr in self._pairs:
            if p.grad is not None:
                p.grad.add_(corr)
        if self.optimizer is not None:
            for group, names in zip(self.optimizer.param_groups, self._groups, strict=True):
                lr = float(group["lr"])
                for n in names:
                    self._lr_sum[n] += lr
        else:
            for n in self.names:
                self._lr_sum[n] += float(self.lr)  # type: ignore[arg-type]
        self.steps += 1

    def update(self, model: FLModel) -> FLModel:
        """Store the new ``c_i`` and return ``model`` with ``Δc_i`` added to its params."""
        import torch

        if not self.active:
            return model
        if self.steps == 0:
            raise ClientAPIError(
                "Scaffold.update() before any correct(): call scaffold.correct() after each "
                "loss.backward()"
            )
        current = dict(self.model.named_parameters())
        dc: dict[str, torch.Tensor] = {}
        for n in self.names:
            lr_sum = self._lr_sum[n]
            if lr_sum <= 0:
                continue
            y = current[n].detach().to("cpu", torch.float32)
            new_ci = self.c_i[n] - self.c[n] + (self.x[n] - y) / lr_sum
            dc[SCAFFOLD_DC_PREFIX + n] = new_ci - self.c_i[n]
            self.state[STATE_PREFIX + n] = new_ci.contiguous()
        model.params = {**(model.params or {}), **dc}
        return model
