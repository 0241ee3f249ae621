"""Running a user's Python file (a recipe, a hook, a client script) with its folder importable.

The folder goes first on ``sys.path`` while the file runs, so ``from model import Net`` next to it
works; modules of the same name loaded from elsewhere are hidden meanwhile, and the folder's own
modules are dropped afterwards, so two recipes with a ``model.py`` each never see each other's.
Imports nothing from fedctl but its errors.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from fedctl.errors import FedctlError, RecipeError


def _top_level_names(folder: Path) -> set[str]:
    names = set()
    for p in folder.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
    return names


def _module_in(module: ModuleType, folder: Path, dirs: dict[str, bool] | None = None) -> bool:
    """Whether ``module``'s file resolves into ``folder``. ``dirs`` keeps the answer for each
    folder a module file is in, so many modules of a few folders (torch's, after a script's first
    optimizer: ~800) cost one ``lstat`` each rather than one per path component."""
    path = getattr(module, "__file__", None)
    if not path:
        return False
    try:
        if dirs is None or os.path.islink(path):
            return folder in Path(path).resolve().parents
        head = os.path.dirname(path)
        inside = dirs.get(head)
        if inside is None:
            where = Path(head or ".").resolve()
            inside = dirs[head] = where == folder or folder in where.parents
        return inside
    except OSError:
        return False


#: folders with an isolated_imports open now, in any thread: how many times, their top names
_open: dict[Path, tuple[int, set[str]]] = {}
_open_lock = threading.Lock()


@contextmanager
def isolated_imports(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Make ``folder``'s modules importable, shadowing same-named ones, for the duration.

    The shadowed modules come back at the end, but for one whose own folder's isolated_imports
    (in another thread) has ended meanwhile, which dropped its modules, and for one whose name
    a folder still open provides: a job with a ``model.py`` of its own must never import another
    job's (open contexts may end in any order when a simulator replaces a hung worker)."""
    folder = Path(folder).resolve()
    names = _top_level_names(folder)
    with _open_lock:
        # sys.modules.copy(): one step in C, so a script importing in another thread meanwhile
        # (the in-process simulator runs scripts while an asynchronous workflow evaluates)
        # cannot break it
        hidden = {
            n: (m, next((f for f in _open if _module_in(m, f)), None))
            for n, m in sys.modules.copy().items()
            if n.split(".")[0] in names and not _module_in(m, folder)
        }
        _open[folder] = (_open.get(folder, (0, names))[0] + 1, names)
    for n in hidden:
        sys.modules.pop(n, None)
    before = set(sys.modules.copy())
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        try:
            sys.path.remove(str(folder))
        except ValueError:
            pass
        dirs: dict[str, bool] = {}
        for n, m in sys.modules.copy().items():
            if n not in before and _module_in(m, folder, dirs):
                sys.modules.pop(n, None)
        with _open_lock:
            count = _open[folder][0]
            if count == 1:
                del _open[folder]
            else:
                _open[folder] = (count - 1, names)
            provided = {name for f, (_, top) in _open.items() for name in top}
            for n, (m, owner) in hidden.items():
                if owner is None and n.split(".")[0] in provided:
                    continue  # an open folder has its own module of that name
                if owner is None or owner in _open:
                    sys.modules.setdefault(n, m)


def where(exc: BaseException, path: Path) -> str:
    """':<line>' of the deepest frame of ``exc`` inside ``path`` ('' if none)."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return f":{line}" if line else ""


def exec_file(path: Path, module_name: str, what: str = "") -> dict[str, Any]:
    """Run ``path`` as a module named ``module_name`` with its folder importable; its namespace.

    Whatever goes wrong (unreadable, a syntax error, an exception while it runs) is one
    RecipeError line naming the file and line, prefixed by ``what`` when given.
    """
    prefix = f"{what}: " if what else ""
    try:
        code = compile(path.read_text(), str(path), "exec")
    except SyntaxError as exc:
        raise RecipeError(f"{prefix}{path}:{exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{prefix}{path}: cannot read: {exc}") from None
    namespace: dict[str, Any] = {"__name__": module_name, "__file__": str(path)}
    with isolated_imports(path.parent):
        try:
            exec(code, namespace)
        except FedctlError as exc:
            raise RecipeError(f"{prefix}{path}: {exc}") from None
        except Exception as exc:
            raise RecipeError(
                f"{prefix}{path}{where(exc, path)}: {type(exc).__name__}: {exc}"
            ) from None
    return namespace
