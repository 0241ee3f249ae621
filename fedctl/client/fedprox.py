"""FedProx on the client: the proximal term a script adds to its loss.

``loss = loss + flare.proximal_term(model, received)`` adds ``(mu/2)·‖w - w_global‖²`` over the
model's trainable parameters, with ``mu`` from the task (``FLModel.meta["fedprox_mu"]``, set by
a FedProx recipe). Under any other recipe the term is 0, so one script serves both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.client.dp import refuse_gradient_edits
from fedctl.codec.keys import FEDPROX_MU_KEY
from fedctl.codec.model import FLModel
from fedctl.errors import ClientAPIError

if TYPE_CHECKING:
    import torch
    from torch import nn

# (model, received params, pairs of (parameter, global value on its device)) of the last call:
# the global values are moved to the parameters' device once per round, not once per step.
_cache: list[Any] = [None, None, []]


def _pairs(model: nn.Module, params: Mapping[str, torch.Tensor]) -> list[tuple[Any, Any]]:
    if _cache[0] is model and _cache[1] is params:
        return _cache[2]
    pairs = []
    for name, p in model.named_parameters():
        g = params.get(name)
        if p.requires_grad and g is not None:
            if g.shape != p.shape:
                raise ClientAPIError(
                    f"proximal_term: global {name!r} has shape {tuple(g.shape)}, "
                    f"the model's has {tuple(p.shape)}"
                )
            pairs.append((p, g.detach().to(device=p.device, dtype=p.dtype)))
    _cache[:] = [model, params, pairs]
    return pairs


def proximal_term(
    model: nn.Module,
    received: FLModel | Mapping[str, torch.Tensor],
    mu: float | None = None,
) -> torch.Tensor:
    """``(mu/2)·Σ‖w - w_global‖²`` over ``model``'s trainable parameters (a 0-d tensor).

    ``received`` is the FLModel from ``flare.receive()`` (its params are the global model and
    its meta carries mu) or the global params themselves (then pass ``mu``). Returns 0 when
    ``mu`` is 0 or the task does not ask for FedProx.
    """
    import torch

    if isinstance(received, FLModel):
        params = received.params or {}
        if mu is None:
            mu = (received.meta or {}).get(FEDPROX_MU_KEY, 0.0)
    else:
        params = received
        if mu is None:
            raise ClientAPIError("proximal_term: pass mu= when giving the global params directly")
    if not isinstance(mu, int | float) or isinstance(mu, bool) or mu < 0:
        raise ClientAPIError(f"proximal_term: mu must be a number ≥ 0, got {mu!r}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else None
    if mu == 0:
        return torch.zeros((), device=device)
    refuse_gradient_edits("FedProx's proximal term", model)
    pairs = _pairs(model, params)
    if not pairs:
        return torch.zeros((), device=device)
    total = torch.stack([(p - g).pow(2).sum() for p, g in pairs]).sum()
    return total * (float(mu) / 2)
