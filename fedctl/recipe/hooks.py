"""Loading a function named declaratively in a recipe (``"evaluate.py:evaluate"``).

Recipes hold no callables (they must export to a job folder as plain data), so a server-side
hook is named by file and function and loaded where the workflow runs. Loading executes that
file: in simulation it is the user's own code on the user's machine; a production server runs
it only for jobs it accepted. The file's folder is importable while the file loads and while
the function runs (``from model import Net`` next to it works), the same way recipe files are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedctl._imports import exec_file, isolated_imports
from fedctl.errors import RecipeError


def load_function(base_dir: Path, ref: str, what: str = "hook") -> Callable[..., Any]:
    """The function ``ref`` (``file.py:name``) of a file in ``base_dir``, wrapped so that it
    runs with the folder importable; one-line RecipeError if it cannot be loaded."""
    file, name = ref.split(":")
    path = (Path(base_dir) / file).resolve()
    namespace = exec_file(path, f"fedctl_hook_{path.stem}", what)
    fn = namespace.get(name)
    if not callable(fn):
        raise RecipeError(f"{what}: {file} defines no function {name!r}")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with isolated_imports(path.parent):
            return fn(*args, **kwargs)

    return call
