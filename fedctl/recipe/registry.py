"""Recipe kinds: the ones built into fedctl and the ones installed plugins provide.

A job folder names its recipe *kind*; the simulator, servers and sites look the kind up here and
nowhere else, so all of them run the same class for it:

* **built in**: every :class:`~fedctl.recipe.base.Recipe` subclass defined in fedctl's own
  modules (registered when its class is defined);
* **plugins**: entry points of the group ``fedctl.recipes`` of installed distributions, named by
  the kind, whose value is the recipe class (``fedclip = "fedctl_fedclip:FedClipRecipe"``). A
  plugin is imported the first time its kind is looked up (:func:`lookup`), or with all the
  others for the catalog (:func:`load_plugins`); it brings its workflow and aggregator with it
  (docs/plugins.md).

A Recipe subclass defined anywhere else (inside a ``recipe.py``, say) is not a kind: a job
carries only its kind and arguments, never code, so a server could not run it. Exporting,
simulating or submitting a recipe of such a class fails (:func:`check_recipe`) with the message a
server gives for a kind it does not know (:func:`unknown_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.errors import RecipeError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from fedctl.recipe.base import Recipe

ENTRY_POINT_GROUP = "fedctl.recipes"
PLUGINS_DOC = "docs/plugins.md"

#: kind → recipe class: fedctl's own kinds, and the plugins' kinds loaded so far
REGISTRY: dict[str, type[Recipe]] = {}


@dataclass(frozen=True)
class Plugin:
    """Where a plugin kind comes from."""

    kind: str
    distribution: str
    version: str
    target: str  # the entry point's value, "module:Class"

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.target})"


#: kind → the plugin that provides it (kinds in REGISTRY that are not built in)
PLUGINS: dict[str, Plugin] = {}
#: kind → why the plugin that claims it could not be used (or was ignored)
BROKEN: dict[str, str] = {}
_all_loaded = False


def is_builtin_module(module: str) -> bool:
    return module == "fedctl" or module.startswith("fedctl.")


def register_builtin(cls: type[Recipe]) -> None:
    """Called for every Recipe subclass when it is defined: fedctl's own kinds register."""
    if cls.kind and is_builtin_module(cls.__module__):
        REGISTRY[cls.kind] = cls


def unknown_kind(kind: Any) -> str:
    """The one message for a kind that is neither built in nor provided by a plugin."""
    return (
        f"unknown recipe kind {kind!r}: it is not built into fedctl and no installed plugin "
        f"provides it (see {PLUGINS_DOC})"
    )


def _entry_points(name: str | None = None) -> list[EntryPoint]:
    from importlib.metadata import entry_points

    found = entry_points(group=ENTRY_POINT_GROUP)
    return sorted(
        (ep for ep in found if name is None or ep.name == name),
        key=lambda ep: (ep.name, ep.value),
    )


def _describe(ep: EntryPoint) -> Plugin:
    dist = getattr(ep, "dist", None)
    name = str(dist.metadata["Name"]) if dist is not None else "?"
    version = str(dist.version) if dist is not None else "?"
    return Plugin(ep.name, name, version, ep.value)


def _load_kind(kind: str, eps: list[EntryPoint]) -> None:
    """Load the plugin(s) that claim ``kind``; record why when it cannot be used."""
    from fedctl.recipe.base import Recipe

    if kind in BROKEN or not eps:
        return
    if kind in REGISTRY:
        if kind not in PLUGINS:  # a plugin cannot replace a kind of fedctl's own
            who = ", ".join(str(_describe(ep)) for ep in eps)
            BROKEN[kind] = f"plugin {who} claims kind {kind!r}, which is built into fedctl; ignored"
        return
    if len({ep.value for ep in eps}) > 1:
        who = ", ".join(str(_describe(ep)) for ep in eps)
        BROKEN[kind] = f"recipe kind {kind!r} is claimed by more than one plugin: {who}"
        return
    ep = eps[0]
    plugin = _describe(ep)
    try:
        cls = ep.load()
    except Exception as exc:
        BROKEN[kind] = (
            f"recipe kind {kind!r}: plugin {plugin} failed to load: {type(exc).__name__}: {exc}"
        )
        return
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        BROKEN[kind] = f"recipe kind {kind!r}: plugin {plugin} is not a fedctl Recipe class"
        return
    if cls.kind != kind:
        BROKEN[kind] = (
            f"recipe kind {kind!r}: plugin {plugin} defines kind {cls.kind!r}; the entry point "
            "must be named after the kind"
        )
        return
    REGISTRY[kind] = cls
    PLUGINS[kind] = plugin


def lookup(kind: Any) -> type[Recipe]:
    """The recipe class of ``kind`` (built in, or from an installed plugin), or RecipeError."""
    if not isinstance(kind, str) or not kind:
        raise RecipeError(unknown_kind(kind))
    cls = REGISTRY.get(kind)
    if cls is None and kind not in BROKEN:
        _load_kind(kind, _entry_points(kind))
        cls = REGISTRY.get(kind)
    if cls is None:
        raise RecipeError(BROKEN.get(kind) or unknown_kind(kind))
    return cls


def load_plugins() -> dict[str, str]:
    """Load every installed plugin (for the catalog); returns the problems, by kind."""
    global _all_loaded
    if not _all_loaded:
        by_kind: dict[str, list[EntryPoint]] = {}
        for ep in _entry_points():
            by_kind.setdefault(ep.name, []).append(ep)
        for kind, eps in by_kind.items():
            _load_kind(kind, eps)
        _all_loaded = True
    return dict(BROKEN)


def check_recipe(recipe: Recipe) -> None:
    """Refuse a recipe a server could not run as it is: its kind is unknown, or its class is not
    the class its kind names (a subclass defined next to the job: its code would not travel)."""
    cls = lookup(recipe.kind)
    mine = type(recipe)
    if mine is not cls:
        raise RecipeError(
            f"{mine.__name__} (from {mine.__module__}) is not a recipe kind: a job carries only "
            f"its kind ({recipe.kind!r}) and arguments, so a server would run "
            f"{cls.__name__} instead; to run your own class, make it a plugin (see {PLUGINS_DOC})"
        )


def server_code_refusal(recipe: Any) -> str | None:
    """Why a server started without ``--allow-server-code`` refuses this job (None: it does not).

    The server refuses with exactly this message; the simulator, which runs everything on the
    user's machine, warns with it."""
    describe = getattr(recipe, "server_code", None)
    what = describe() if callable(describe) else None
    if what is None:
        code = getattr(recipe, "server_eval", None)
        if not code:
            return None
        what = f"server_eval={code!r}"
    return (
        f"this server does not run code from jobs ({what}); "
        "an operator can allow it with `fedctl server start --allow-server-code`"
    )
