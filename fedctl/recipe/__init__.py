"""Recipes (declarative jobs) and the environments they run in.

``from fedctl.recipe import FedAvgRecipe, SimEnv`` is all a recipe file needs.
"""

from fedctl.recipe.base import REGISTRY, Recipe, load_job
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.recipe.loader import load_recipe
from fedctl.recipe.run import Run
from fedctl.sim.env import SimEnv

__all__ = ["REGISTRY", "FedAvgRecipe", "Recipe", "Run", "SimEnv", "load_job", "load_recipe"]
