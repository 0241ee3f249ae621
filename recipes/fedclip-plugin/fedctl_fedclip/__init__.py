"""fedctl-fedclip: an example fedctl plugin.

FedClip is federated averaging in which every site's update (the change it made to the global
model) is scaled down to an L2 norm of at most ``clip_norm`` before the weighted mean, so that
no single site can move the model by more than ``clip_norm`` in a round (the clipping step of
DP-FedAvg, McMahan et al., ICLR 2018, without the noise).

The plugin is three small parts, one per extension point of fedctl:

* :class:`ClippedMean` (``aggregator.py``), an aggregator following fedctl's ``Aggregator``
  protocol;
* :class:`FedClip` (``workflow.py``), a workflow: fedctl's ``FedAvg`` with that aggregator;
* :class:`FedClipRecipe` (``recipe.py``), the recipe kind ``fedclip`` that builds it, registered
  by the entry point in ``pyproject.toml``.

The entry point imports this package for ``fedctl recipe list`` too, so it stays light: the
workflow and the aggregator (and torch) are imported when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedctl_fedclip.recipe import FedClipRecipe

_LAZY = {"ClippedMean": "fedctl_fedclip.aggregator", "FedClip": "fedctl_fedclip.workflow"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedctl_fedclip' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["ClippedMean", "FedClip", "FedClipRecipe"]
