"""``build_model``: a model built without its random initialisation, for a script that loads the
received global model into it anyway.

A per-round script builds its model every round, and for a large model the random
initialisation is most of that cost (about 0.3 s for 100M parameters on this project's 2-core
machine, per site and round) only to be overwritten by ``load_state_dict``. ``build_model`` runs
the factory with ``torch.nn.init``'s in-place initialisers skipped, for parameters and on the
calling thread only, and then guards the result: every parameter an initialiser skipped must be
filled by ``model.load_state_dict`` before the model's ``forward`` or ``state_dict`` may run, so
a skipped parameter can never reach training or ``send`` with whatever memory held before.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from fedctl.errors import ClientAPIError

if TYPE_CHECKING:  # torch is imported when a model is built: ``import fedctl.client`` stays light
    import torch
    from torch import nn

M = TypeVar("M", bound="nn.Module")

#: ``torch.nn.init``'s in-place initialisers: each fills its tensor argument and returns it
_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)

_local = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
#: (module, attribute name, original function) of every binding patched while a build runs
_patched: list[tuple[object, str, Callable[..., Any]]] = []


def _skipping(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, except for a parameter on a thread inside ``build_model``: that one is
    recorded and left as it is (a plain tensor is initialised as usual: it may be a temporary
    that state outside the state_dict is computed from)."""
    from torch import nn

    @functools.wraps(original)
    def initialiser(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        builds: list[list[weakref.ref[nn.Parameter]]] = getattr(_local, "builds", [])
        if not builds or not isinstance(tensor, nn.Parameter) or tensor.is_meta:
            return original(tensor, *args, **kwargs)
        for skipped in builds:  # a build inside another's factory: the outer model guards it too
            skipped.append(weakref.ref(tensor))
        return tensor

    return initialiser


def _bindings() -> list[tuple[object, str, Callable[..., Any]]]:
    """Where the initialisers are bound: ``torch.nn.init`` itself, and the torch.nn modules that
    import them by name (``nn.MultiheadAttention``'s and the transformer layers' modules)."""
    from torch import nn

    originals: dict[str, Callable[..., Any]] = {
        name: f for name in _INITIALISERS if (f := getattr(nn.init, name, None))
    }
    found: list[tuple[object, str, Callable[..., Any]]] = [
        (nn.init, name, f) for name, f in originals.items()
    ]
    layers = [m for n, m in list(sys.modules.items()) if n.startswith("torch.nn.modules.")]
    for module in layers:
        for name, fn in originals.items():
            if getattr(module, name, None) is fn:
                found.append((module, name, fn))
    return found


@contextmanager
def _initialisers_skipped(skipped: list[weakref.ref[nn.Parameter]]) -> Iterator[None]:
    """Skip ``torch.nn.init``'s initialisers of parameters on this thread (other threads are
    unaffected), recording the parameters they were given in ``skipped``."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _patched[:] = _bindings()
            for module, name, original in _patched:
                setattr(module, name, _skipping(original))
        _patch_users += 1
    builds = _local.__dict__.setdefault("builds", [])
    builds.append(skipped)
    try:
        yield
    finally:
        builds.pop()
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for module, name, original in _patched:
                    setattr(module, name, original)
                _patched.clear()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def build_model(factory: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """``factory(*args, **kwargs)``, built without ``torch.nn.init``'s random initialisation.

    Load the received weights into it before using it::

        model = flare.build_model(Net)            # instead of: model = Net()
        while flare.is_running():
            model.load_state_dict(flare.receive().params)

    The parameters an initialiser skipped hold arbitrary memory until ``load_state_dict`` fills
    them; until then ``forward`` and ``state_dict`` raise ``ClientAPIError``. Everything else is
    built as usual: parameters set another way (``torch.randn``), buffers, and plain tensors
    given to an initialiser. A factory that keeps a skipped parameter where ``load_state_dict``
    cannot reach it (unregistered, or left out of the state_dict) is refused.
    """
    from torch import nn

    skipped: list[weakref.ref[nn.Parameter]] = []
    with _initialisers_skipped(skipped):
        model = factory(*args, **kwargs)
    if not isinstance(model, nn.Module):
        raise ClientAPIError(
            f"build_model(): the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    # a parameter the factory dropped (one tied to another's weight, say) is gone: it is harmless
    alive = [t for t in (ref() for ref in skipped) if t is not None and t.numel()]
    if alive:
        _guard(model, {_storage(t) for t in alive})
    return model


def _guard(model: nn.Module, skipped: set[int]) -> None:
    """Make ``model`` refuse ``forward``/``state_dict`` until ``load_state_dict`` filled every
    storage in ``skipped``."""
    names: dict[int, list[str]] = {}
    _local.inspecting = True  # a model built inside this one's factory must not refuse this
    try:
        loadable = set(model.state_dict(keep_vars=True))
    finally:
        _local.inspecting = False
    for name, t in model.named_parameters(remove_duplicate=False):
        if t.numel() and _storage(t) in skipped:
            names.setdefault(_storage(t), []).append(name)
    for storage in skipped:
        if storage not in names:
            raise ClientAPIError(
                "build_model(): torch.nn.init filled a parameter the model does not register, "
                "so loading weights could never set it; build this model the usual way"
            )
        if not any(n in loadable for n in names[storage]):
            raise ClientAPIError(
                f"build_model(): torch.nn.init filled '{names[storage][0]}', which is not in "
                "the model's state_dict, so loading weights could never set it; build this "
                "model the usual way"
            )
    pending = {storage: sorted(n for n in ns if n in loadable) for storage, ns in names.items()}
    guards: list[Any] = []

    def refuse(*_: Any, **__: Any) -> None:
        if pending and not getattr(_local, "inspecting", False):
            first = min(n for ns in pending.values() for n in ns)
            raise ClientAPIError(
                f"build_model(): '{first}' has no value yet; load the received weights first "
                "(model.load_state_dict(flare.receive().params))"
            )

    def loaded(module: nn.Module, incompatible: Any) -> None:
        missing = set(incompatible.missing_keys)
        for storage, ns in list(pending.items()):
            if any(n not in missing for n in ns):
                del pending[storage]
        if not pending:  # the guards are done with (this hook stays: torch is iterating them)
            for handle in guards:
                handle.remove()

    guards.append(model.register_forward_pre_hook(refuse))
    guards.append(model.register_state_dict_pre_hook(refuse))
    model.register_load_state_dict_post_hook(loaded)
