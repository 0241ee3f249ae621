"""Recipes (declarative jobs) and the environments they run in.

``from fedctl.recipe import FedAvgRecipe, SimEnv`` is all a recipe file needs. The environments
live with their executors (``fedctl.sim``, ``fedctl.runtime``), which depend on recipes, not the
other way round: they are re-exported here for users, lazily, so importing a recipe never
imports Ray or gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedctl.recipe.asynchronous import FedAsyncRecipe, FedBuffRecipe
from fedctl.recipe.base import ExecEnv, Recipe
from fedctl.recipe.cyclic import CyclicRecipe
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.recipe.fedavgm import FedAvgMRecipe
from fedctl.recipe.fednova import FedNovaRecipe
from fedctl.recipe.fedopt import FedAdagradRecipe, FedAdamRecipe, FedYogiRecipe
from fedctl.recipe.fedprox import FedProxRecipe
from fedctl.recipe.flower import FlowerRecipe
from fedctl.recipe.jobfolder import REGISTRY, load_job
from fedctl.recipe.loader import load_recipe
from fedctl.recipe.personalization import FedBNRecipe, PartialSharingRecipe
from fedctl.recipe.scaffold import ScaffoldRecipe
from fedctl.recipe.swarm import SwarmRecipe
from fedctl.tracking.run import Run

#: environments re-exported for users, by the module that defines them (imported on first use;
#: a static import would make recipes depend on their executors, see docs/architecture.md)
_ENVIRONMENTS = {
    "SimEnv": "fedctl.sim.env",
    "PocEnv": "fedctl.runtime.envs",
    "ProdEnv": "fedctl.runtime.envs",
}


def __getattr__(name: str) -> Any:
    module = _ENVIRONMENTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedctl.recipe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "REGISTRY",
    "CyclicRecipe",
    "ExecEnv",
    "FedAdagradRecipe",
    "FedAdamRecipe",
    "FedAsyncRecipe",
    "FedAvgMRecipe",
    "FedAvgRecipe",
    "FedBNRecipe",
    "FedBuffRecipe",
    "FedNovaRecipe",
    "FedProxRecipe",
    "FedYogiRecipe",
    "FlowerRecipe",
    "PartialSharingRecipe",
    "PocEnv",
    "ProdEnv",
    "Recipe",
    "Run",
    "ScaffoldRecipe",
    "SimEnv",
    "SwarmRecipe",
    "load_job",
    "load_recipe",
]
