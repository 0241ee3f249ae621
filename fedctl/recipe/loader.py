"""Finding the ``recipe`` in a recipe file, folder or job folder, with clear one-line errors.

The recipe's folder is put first on ``sys.path`` while its file runs, so ``from model import Net``
next to it works; modules of the same name loaded from elsewhere are hidden meanwhile and the
folder's own modules are dropped afterwards, so two recipes with a ``model.py`` each never see
each other's.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fedctl.errors import FedctlError, RecipeError

if TYPE_CHECKING:
    import torch

    from fedctl.recipe.base import Recipe

RECIPE_FILE = "recipe.py"


def _top_level_names(folder: Path) -> set[str]:
    names = set()
    for p in folder.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
    return names


def _module_in(module: ModuleType, folder: Path) -> bool:
    path = getattr(module, "__file__", None)
    if not path:
        return False
    try:
        return folder in Path(path).resolve().parents
    except OSError:
        return False


@contextmanager
def isolated_imports(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Make ``folder``'s modules importable, shadowing same-named ones, for the duration."""
    folder = Path(folder).resolve()
    names = _top_level_names(folder)
    hidden = {
        n: m
        for n, m in list(sys.modules.items())
        if n.split(".")[0] in names and not _module_in(m, folder)
    }
    for n in hidden:
        del sys.modules[n]
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        try:
            sys.path.remove(str(folder))
        except ValueError:
            pass
        for n, m in list(sys.modules.items()):
            if n not in before and _module_in(m, folder):
                del sys.modules[n]
        for n, m in hidden.items():
            sys.modules.setdefault(n, m)


@dataclass
class LoadedRecipe:
    """A recipe and what else its file defined that the CLI uses (an ``env`` default)."""

    recipe: Recipe
    path: Path
    env: Any = None


def resolve_recipe_path(target: str | os.PathLike[str]) -> Path:
    """The recipe file for a path that is a file, a folder with recipe.py, or a job folder."""
    from fedctl.recipe.base import JOB_SPEC

    path = Path(target)
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
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
    from fedctl.recipe.base import JOB_SPEC, Recipe, load_job

    path = resolve_recipe_path(target).resolve()
    if path.name == JOB_SPEC:
        return LoadedRecipe(load_job(path.parent), path)
    namespace: dict[str, Any] = {"__name__": "fedctl_recipe", "__file__": str(path)}
    try:
        source = path.read_text()
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read: {exc}") from None
    with isolated_imports(path.parent):
        try:
            exec(code, namespace)
        except FedctlError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        except Exception as exc:
            raise RecipeError(f"{path}{_where(exc, path)}: {type(exc).__name__}: {exc}") from None
    if "recipe" not in namespace:
        raise RecipeError(f"{path} defines no module-level `recipe`")
    recipe = namespace["recipe"]
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"{path}: `recipe` is a {type(recipe).__name__}, expected a fedctl Recipe "
            "(e.g. FedAvgRecipe)"
        )
    return LoadedRecipe(recipe, path, namespace.get("env"))


def _where(exc: BaseException, path: Path) -> str:
    """':<line>' of the deepest frame of ``exc`` inside ``path``."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return f":{line}" if line else ""


def find_initial_params(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """Initial weights for a standalone client run: the recipe next to the script, or the
    job folder the script sits in; None when there is neither."""
    from fedctl.recipe.base import JOB_SPEC, load_job

    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file():
        return load_recipe(folder).recipe.initial_params()
    for candidate in (folder, folder.parent):
        if (candidate / JOB_SPEC).is_file():
            return load_job(candidate, verify=False).initial_params()
    return None
