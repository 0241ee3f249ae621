"""Sample-level differential privacy on the site: DP-SGD through Opacus (the ``fedctl[dp]`` extra).

One line wraps a training script's model, optimizer and data loader::

    private = flare.make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    model, optimizer, loader = private          # use these three from here on
    while flare.is_running():
        received = flare.receive()
        model.load_state_dict(received.params)  # the global model's plain names work
        ...                                     # the training loop, unchanged
        flare.send(flare.FLModel(params=model.state_dict(), metrics=private.metrics(), ...))

Opacus clips every sample's gradient to ``max_grad_norm``, adds Gaussian noise of standard
deviation ``noise_multiplier · max_grad_norm`` to each batch's sum and samples batches by
Poisson sampling; its accountant composes the steps into the site's (ε, δ). The guarantee is
about one *sample* of this site's data, against everyone who sees what the site sends (the
server included), over every round the site trained in: the accountant's history is kept in
``flare.get_state()`` at every optimizer step, so ε keeps accumulating when the simulator runs
the script once per round, and after a site restart in POC and production.

``private.model`` is Opacus's ``GradSampleModule``; its ``state_dict()`` and
``load_state_dict()`` use the wrapped model's own names (Opacus would prefix them with
``_module.``), so the global model loads and the update is sent under the names the server
knows. ``private.metrics()`` gives ``{"dp_site_epsilon": ε}`` for the metrics of ``send``.

DP-SGD combines with any server-side algorithm (FedAvg, FedAvgM, FedAdam…, central DP), not
with client helpers that edit gradients after ``backward()``: Opacus replaces every gradient in
``step()``, so ``flare.proximal_term`` (FedProx) and ``flare.Scaffold`` refuse a private model.

Randomness (the noise, and which samples each batch takes) comes from torch's global generator
in simulation, which fedctl seeds from the run's seed before every task: a simulation is
reproducible, and its noise protects nothing. On real sites (POC, production) and in standalone
runs it comes from a generator seeded from the operating system's secret randomness.

Importing ``fedctl.client`` does not import Opacus; :func:`make_private` does.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedctl.errors import ClientAPIError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedctl.client.state import SiteState

#: the metric a script sends with the site's ε (``private.metrics()``)
EPSILON_METRIC = "dp_site_epsilon"
#: the site-state key of the accountant's history
STATE_KEY = "fedctl.dp_sgd.history"
#: Opacus's accountants whose history composes across rounds (``gdp`` only keeps the last step)
ACCOUNTANTS = ("rdp", "prv")
#: the prefix Opacus's GradSampleModule puts before the wrapped model's names
WRAPPED = "_module."


def is_private(model: Any) -> bool:
    """True for a model :func:`make_private` returned (an Opacus wrapper)."""
    return type(model).__module__.split(".")[0] == "opacus"


def refuse_gradient_edits(what: str, model: Any) -> None:
    """A helper that changes gradients after ``backward()`` cannot work under DP-SGD: Opacus's
    optimizer replaces every gradient with the clipped per-sample sum plus noise in ``step()``,
    so the change would be dropped without a word. Say so instead."""
    if is_private(model):
        raise ClientAPIError(
            f"{what} does not work with DP-SGD (make_private): Opacus replaces every gradient "
            "by its clipped per-sample sum plus noise, so the change would be lost; use FedAvg "
            "or a server-side algorithm with DP-SGD"
        )


def _number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    """``value`` as a float in (low, high), or one line saying what is wrong."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low < value < high:
        rng = f"> {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        raise ClientAPIError(f"make_private: {name} must be a number {rng}, got {value!r}")
    return float(value)


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ClientAPIError(
            "make_private needs Opacus, which fedctl's dp extra installs: pip install 'fedctl[dp]'"
        ) from None
    return opacus


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Opacus's RDP accountant takes about half a second per ε and several seconds to find a noise
# multiplier for a target ε. Both are pure functions of their arguments, cached per process: in a
# simulation, sites that share a worker process and a history are accounted once.


@functools.lru_cache(maxsize=1024)
def _epsilon(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _noise_for(
    target_epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str
) -> float:
    """Opacus's smallest noise multiplier that keeps ε within the target after ``epochs``."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # the search tries noise levels whose best Rényi order is the largest one tried
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    epochs=epochs,
                    accountant=accountant,
                )
            )
    except ValueError as exc:
        raise ClientAPIError(
            f"make_private: no noise multiplier reaches target_epsilon {target_epsilon:g} at "
            f"delta {delta:g} over {epochs} epochs ({_one_line(exc)})"
        ) from None


class PrivateTraining:
    """A site's model, optimizer and data loader made private by :func:`make_private`.

    Iterating gives ``(model, optimizer, data_loader)``. ``noise_multiplier`` is the one in
    use (computed from ``target_epsilon`` when that was given), ``sample_rate`` the Poisson
    sampling rate of a batch, ``steps`` the optimizer steps this site took so far, over all rounds.
    """

    def __init__(
        self,
        engine: Any,
        model: nn.Module,
        optimizer: Any,
        data_loader: DataLoader[Any],
        *,
        accountant: str,
        delta: float,
        sample_rate: float,
        state: SiteState,
    ) -> None:
        self.engine = engine
        self.accountant = accountant
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.delta = delta
        self.sample_rate = sample_rate
        self.state = state

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.optimizer, self.data_loader))

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @property
    def max_grad_norm(self) -> float:
        return float(self.optimizer.max_grad_norm)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.engine.accountant.history)

    def history(self) -> list[list[float]]:
        """The accountant's history as plain data: ``[noise multiplier, sample rate, steps]``."""
        return [[float(z), float(q), int(s)] for z, q, s in self.engine.accountant.history]

    def epsilon(self, delta: float | None = None) -> float:
        """The site's ε so far (every step of every round), at ``delta`` (default: the one
        given to :func:`make_private`); 0 before the first step."""
        d = self.delta if delta is None else _number("delta", delta, low=0.0, high=1.0)
        history = tuple((z, q, int(s)) for z, q, s in self.history() if s > 0)
        if not history:
            return 0.0
        return _epsilon(self.accountant, history, d)

    def metrics(self) -> dict[str, float]:
        """``{"dp_site_epsilon": ε}``, for the metrics a script sends."""
        return {EPSILON_METRIC: self.epsilon()}

    def _save(self) -> None:
        self.state[STATE_KEY] = self.history()


def _restore(state: SiteState) -> list[tuple[float, float, int]]:
    """The accountant history kept in the site's state (empty on the site's first round)."""
    saved = state.get(STATE_KEY)
    if saved is None:
        return []
    ok = isinstance(saved, list)
    out: list[tuple[float, float, int]] = []
    for entry in saved if ok else []:
        if not (isinstance(entry, list) and len(entry) == 3):
            ok = False
            break
        z, q, s = entry
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (z, q))
        if not (numbers and isinstance(s, int) and z >= 0 and 0 < q <= 1 and s >= 0):
            ok = False
            break
        out.append((float(z), float(q), s))
    if not ok:
        raise ClientAPIError(
            f"make_private: the site state's {STATE_KEY!r} is not an accountant history "
            "([noise multiplier, sample rate, steps] entries); the site's ε cannot be continued"
        )
    return out


def _plain_names(model: nn.Module) -> None:
    """Make a GradSampleModule's state_dict use the wrapped model's names, both ways."""

    def strip(module: Any, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        inner = prefix + WRAPPED
        if not any(k.startswith(inner) for k in state_dict):
            return
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            state_dict[prefix + k[len(inner) :] if k.startswith(inner) else k] = v
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            renamed = {}
            for k, v in meta.items():
                if k == inner[:-1]:
                    k = prefix[:-1]
                elif k.startswith(inner):
                    k = prefix + k[len(inner) :]
                renamed[k] = v
            meta.clear()
            meta.update(renamed)

    def add(module: Any, state_dict: Any, prefix: str, *_: Any) -> None:
        inner = prefix + WRAPPED
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + k[len(prefix) :]] = state_dict.pop(k)

    model.register_state_dict_post_hook(strip)
    model.register_load_state_dict_pre_hook(add)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
) -> PrivateTraining:
    """Train with DP-SGD from here on: returns the private model, optimizer and data loader.

    Give either ``noise_multiplier`` (σ: the noise's standard deviation over ``max_grad_norm``)
    or ``target_epsilon`` with ``epochs``, the total number of epochs this site will train over
    the whole job (rounds it takes part in × local epochs per round); Opacus then picks the
    smallest σ that keeps ε within ``target_epsilon`` at ``delta`` after that many epochs.
    ``delta`` must be below 1/(the number of samples). ``accountant`` is Opacus's ``rdp``
    (default) or ``prv``. Call after ``flare.init()``; see the module docstring.
    """
    from fedctl.client.api import _channel

    ch = _channel("make_private")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ClientAPIError("make_private: give either noise_multiplier or target_epsilon")
    if noise_multiplier is not None:
        if epochs is not None:
            raise ClientAPIError(
                "make_private: epochs goes with target_epsilon, not with noise_multiplier"
            )
        noise_multiplier = _number("noise_multiplier", noise_multiplier, low=0.0)
    else:
        target_epsilon = _number("target_epsilon", target_epsilon, low=0.0)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ClientAPIError(
                "make_private: target_epsilon needs epochs, the total number of epochs this site "
                f"trains over the whole job (an integer ≥ 1), got {epochs!r}"
            )
    max_grad_norm = _number("max_grad_norm", max_grad_norm, low=0.0)
    delta = _number("delta", delta, low=0.0, high=1.0)
    if accountant not in ACCOUNTANTS:
        raise ClientAPIError(
            f"make_private: accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}"
        )
    opacus = _opacus()
    import torch
    from torch.utils.data import DataLoader

    if not isinstance(model, torch.nn.Module):
        raise ClientAPIError(
            f"make_private: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ClientAPIError(
            "make_private: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if not isinstance(data_loader, DataLoader):
        raise ClientAPIError(
            "make_private: data_loader must be a torch DataLoader, got "
            f"{type(data_loader).__name__}"
        )
    try:
        size = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ClientAPIError(
            "make_private: the data loader's dataset has no length (DP-SGD samples from a "
            "dataset of known size, not an iterable one)"
        ) from None
    if size == 0:
        raise ClientAPIError("make_private: the data loader's dataset is empty")
    if delta >= 1 / size:
        raise ClientAPIError(
            f"make_private: delta = {delta:g} is not below 1/{size} (the number of samples): "
            "a guarantee that weak protects nobody"
        )
    state = ch.state
    history = _restore(state)

    simulation = ch.info.mode == "simulation"
    generator = None
    if not simulation:  # a real site's noise must not be predictable from the job's seed
        import secrets

        generator = torch.Generator().manual_seed(secrets.randbits(63))
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode is off on every engine (once per round per site in
        # a per-round simulation): docs/privacy.md says where fedctl's randomness comes from
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = opacus.PrivacyEngine(accountant=accountant)
        if target_epsilon is not None:
            # what Opacus's make_private_with_epsilon does, with the search cached
            assert epochs is not None
            noise_multiplier = _noise_for(
                target_epsilon, delta, 1 / len(data_loader), epochs, accountant
            )
        try:
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=data_loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                noise_generator=generator,
            )
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ClientAPIError(f"make_private: Opacus refused: {_one_line(exc)}") from None
    # torch says this of every backward pass through Opacus's hooks when the inputs need no
    # gradient (the usual case); it is about hooks on module inputs, which DP-SGD does not use
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
    private_model, private_optimizer, private_loader = made
    if generator is not None:
        private_loader.batch_sampler.generator = generator
    engine.accountant.history = history
    _plain_names(private_model)
    private = PrivateTraining(
        engine,
        private_model,
        private_optimizer,
        private_loader,
        accountant=accountant,
        delta=delta,
        sample_rate=1 / len(private_loader),
        state=state,
    )
    account = private_optimizer.step_hook

    def step_hook(opt: Any) -> None:
        account(opt)
        private._save()  # every step: what the site's state holds is never behind

    private_optimizer.attach_step_hook(step_hook)
    return private
