"""Finding the ``recipe`` in a recipe file, folder or job folder, with clear one-line errors.

A recipe file runs with its folder importable (see :mod:`fedctl._imports`), so ``from model
import Net`` next to it works and two recipes with a ``model.py`` each never see each other's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._imports import exec_file
from fedctl.errors import NotFound, RecipeError
from fedctl.recipe.base import Recipe
from fedctl.recipe.jobfolder import JOB_SPEC, load_job

if TYPE_CHECKING:
    import torch

RECIPE_FILE = "recipe.py"


@dataclass
class LoadedRecipe:
    """A recipe and what else its file defined that the CLI uses (an ``env`` default)."""

    recipe: Recipe
    path: Path
    env: Any = None


def resolve_recipe_path(target: str | os.PathLike[str]) -> Path:
    """The recipe file for a path that is a file, a folder with recipe.py, or a job folder.

    A path that does not exist is :class:`NotFound` (exit 4); one that exists but holds no
    recipe is a :class:`RecipeError` (exit 2)."""
    path = Path(target)
    if not path.exists():
        raise NotFound(f"recipe not found: {path} (no such file or folder)")
    if path.is_dir():
        if (path / JOB_SPEC).is_file():
            return path / JOB_SPEC
        if not (path / RECIPE_FILE).is_file():
            raise RecipeError(f"{path}: no {RECIPE_FILE} (or {JOB_SPEC}) in this folder")
        return path / RECIPE_FILE
    if path.name == JOB_SPEC:
        return path
    if path.suffix != ".py":
        raise RecipeError(f"{path}: a recipe is a .py file or a folder holding {RECIPE_FILE}")
    return path


def load_recipe(target: str | os.PathLike[str]) -> LoadedRecipe:
    """Load the module-level ``recipe`` of a recipe file/folder, or a job folder's recipe."""
    path = resolve_recipe_path(target).resolve()
    if path.name == JOB_SPEC:
        return LoadedRecipe(load_job(path.parent), path)
    namespace = exec_file(path, "fedctl_recipe")
    if "recipe" not in namespace:
        raise RecipeError(f"{path} defines no module-level `recipe`")
    recipe = namespace["recipe"]
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"{path}: `recipe` is a {type(recipe).__name__}, expected a fedctl Recipe "
            "(e.g. FedAvgRecipe)"
        )
    return LoadedRecipe(recipe, path, namespace.get("env"))


def find_initial_params(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """Initial weights for a standalone client run: the recipe next to the script, or the
    job folder the script sits in; None when there is neither."""
    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file():
        return load_recipe(folder).recipe.initial_params()
    for candidate in (folder, folder.parent):
        if (candidate / JOB_SPEC).is_file():
            return load_job(candidate, verify=False).initial_params()
    return None
