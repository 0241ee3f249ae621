"""Personalization on the client: parameters that stay on this site (FedBN, partial sharing).

Two lines in a training script::

    pz = flare.personalize(model, received)   # instead of model.load_state_dict(received.params)
    ...
    flare.send(flare.FLModel(params=pz.shared(), meta=...))

``personalize`` loads the global model, then puts back this site's own values of the parameters
that stay local (kept in ``flare.get_state()``, so they survive rounds in every simulator mode;
in the first round they start from the global values). ``shared()`` saves the local values and
returns the federated ones. What stays local comes from the task (``meta["personalization"]``,
set by the FedBN and partial-sharing recipes); batch-norm layers are recognised by type. Under
any other recipe ``personalize`` is a plain ``load_state_dict`` and ``shared()`` the full state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.codec.keys import PERSONAL_KEY, stays_local
from fedctl.codec.model import FLModel

if TYPE_CHECKING:
    import torch
    from torch import nn

#: site-state key prefix of the local parameters
STATE_PREFIX = "personal:"


class Personalization:
    """What :func:`personalize` returns: which entries are local, and how to send the rest."""

    def __init__(self, model: nn.Module, local: set[str], state: Any) -> None:
        self.model = model
        self.local = local
        self.state = state

    def shared(self) -> dict[str, torch.Tensor]:
        """Keep the local entries in the site state; return the model's federated entries."""
        sd = self.model.state_dict()
        if self.state is not None:
            for k in self.local:
                self.state[STATE_PREFIX + k] = sd[k].detach().to("cpu", copy=True)
        return {k: v for k, v in sd.items() if k not in self.local}


def local_names(model: nn.Module, spec: dict[str, Any] | None) -> set[str]:
    """The model's state_dict entries that stay on the site under ``spec``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if not spec:
        return set()
    bn = {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    return {k for k in model.state_dict() if stays_local(k, spec, bn)}


def personalize(model: nn.Module, received: FLModel) -> Personalization:
    """Load the global model into ``model``, then this site's own local entries (if saved)."""
    from fedctl.client.api import get_state

    spec = (received.meta or {}).get(PERSONAL_KEY)
    params = dict(received.params or {})
    local = local_names(model, spec)
    state = get_state() if spec else None
    if state is not None:
        for k in local:
            saved = state.get(STATE_PREFIX + k)
            if saved is not None:
                params[k] = saved
    model.load_state_dict(params)
    return Personalization(model, local, state)
