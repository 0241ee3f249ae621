"""Recipes (declarative jobs) and the environments they run in.

``from fedctl.recipe import FedAvgRecipe, SimEnv`` is all a recipe file needs.
"""

from fedctl.recipe.base import REGISTRY, Recipe, load_job
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.recipe.fedavgm import FedAvgMRecipe
from fedctl.recipe.fednova import FedNovaRecipe
from fedctl.recipe.fedopt import FedAdagradRecipe, FedAdamRecipe, FedYogiRecipe
from fedctl.recipe.fedprox import FedProxRecipe
from fedctl.recipe.loader import load_recipe
from fedctl.recipe.personalization import FedBNRecipe, PartialSharingRecipe
from fedctl.recipe.run import Run
from fedctl.recipe.scaffold import ScaffoldRecipe
from fedctl.runtime.envs import PocEnv, ProdEnv
from fedctl.sim.env import SimEnv

__all__ = [
    "REGISTRY",
    "FedAdagradRecipe",
    "FedAdamRecipe",
    "FedAvgMRecipe",
    "FedAvgRecipe",
    "FedBNRecipe",
    "FedNovaRecipe",
    "FedProxRecipe",
    "FedYogiRecipe",
    "PartialSharingRecipe",
    "PocEnv",
    "ProdEnv",
    "Recipe",
    "Run",
    "ScaffoldRecipe",
    "SimEnv",
    "load_job",
    "load_recipe",
]
