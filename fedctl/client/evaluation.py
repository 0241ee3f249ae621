"""Keeping this site's own model for cross-site evaluation (``submit_model`` tasks).

In the simulator's per-round mode a script starts afresh each round, so the model it trained
last is gone when a ``submit_model`` task arrives. Two lines keep it in the site state::

    flare.keep_local_model(model)                         # after local training
    ...
    if flare.is_submit_model():
        flare.send(flare.FLModel(params=flare.local_model()))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.errors import ClientAPIError

if TYPE_CHECKING:
    import torch

#: site-state key prefix of the kept model
STATE_PREFIX = "local_model:"


def keep_local_model(model: Any) -> None:
    """Save ``model`` (an ``nn.Module`` or a state_dict) as this site's own model."""
    from fedctl.client.api import get_state

    sd = model.state_dict() if hasattr(model, "state_dict") else model
    if not isinstance(sd, dict):
        raise ClientAPIError("keep_local_model() takes an nn.Module or a state_dict")
    state = get_state()
    for k in [k for k in state if k.startswith(STATE_PREFIX)]:
        del state[k]
    for k, v in sd.items():
        state[STATE_PREFIX + k] = v.detach().to("cpu", copy=True)


def local_model() -> dict[str, torch.Tensor] | None:
    """The model saved by :func:`keep_local_model` (None if there is none yet)."""
    from fedctl.client.api import get_state

    state = get_state()
    sd = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return sd or None
