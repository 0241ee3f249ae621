"""Server optimizers: treat the round's average change as a gradient and take an optimizer step.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization" (ICLR 2021), Algorithm 2; server momentum from Hsu, Qi, Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification" (2019).

With ``x`` the global model and ``a`` the round's aggregate, the pseudo-gradient is
``Δ = a - x`` (the direction the sites moved) and, elementwise::

    sgdm     v = μ·v + Δ                                     x ← x + η·v
    adagrad  m = β1·m + (1-β1)·Δ;  v = v + Δ²                x ← x + η·m / (√v + τ)
    adam     m = β1·m + (1-β1)·Δ;  v = β2·v + (1-β2)·Δ²      x ← x + η·m / (√v + τ)
    yogi     m = β1·m + (1-β1)·Δ;  v = v - (1-β2)·Δ²·sign(v - Δ²)
                                                             x ← x + η·m / (√v + τ)

``m`` starts at 0 and ``v`` at ``τ²`` (the paper's ``v₋₁ ≥ τ²``); there is no bias correction,
as in the paper. With ``sgdm``, ``η = 1`` and ``μ = 0`` the step returns the aggregate (FedAvg).

Integer tensors and batch-norm running statistics (``running_mean``, ``running_var``,
``num_batches_tracked``) are not optimised: they take the aggregate as it is.
The functions below are pure (they return new tensors); :class:`ServerOptimizer` keeps the
state between rounds and never modifies a tensor it was given (broadcast params are read-only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.codec.keys import is_statistic

if TYPE_CHECKING:
    import torch

KINDS = ("sgdm", "adagrad", "adam", "yogi")
Tensor = Any  # torch.Tensor, without importing torch at module level


def optimised(name: str, t: Tensor) -> bool:
    """Whether a server step applies to this entry (floating-point and not a running statistic)."""
    return t.is_floating_point() and not is_statistic(name)


def sgdm_step(x: Tensor, delta: Tensor, v: Tensor, lr: float, momentum: float) -> tuple:
    """Server SGD with momentum: returns ``(x_new, v_new)``."""
    v_new = momentum * v + delta
    return x + lr * v_new, v_new


def adaptive_step(
    kind: str,
    x: Tensor,
    delta: Tensor,
    m: Tensor,
    v: Tensor,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple:
    """FedAdagrad, FedAdam or FedYogi (``kind``): returns ``(x_new, m_new, v_new)``; they differ
    only in the second moment (``beta2`` is unused by adagrad)."""
    m_new = beta1 * m + (1 - beta1) * delta
    if kind == "adagrad":
        v_new = v + delta * delta
    elif kind == "adam":
        v_new = beta2 * v + (1 - beta2) * delta * delta
    else:  # yogi
        d2 = delta * delta
        v_new = v - (1 - beta2) * d2 * (v - d2).sign()
    return x + eta * m_new / (v_new.sqrt() + tau), m_new, v_new


def scaled_step(
    global_params: Mapping[str, Tensor], aggregate: Mapping[str, Tensor], lr: float
) -> dict[str, Tensor]:
    """``x + lr·(a - x)`` (in float64) on the optimised entries; the others take the aggregate.

    A stateless server step (SCAFFOLD's η_g, FedNova's rescaling); the inputs are left untouched.
    """
    out = {}
    for name, g in global_params.items():
        a = aggregate[name]
        if optimised(name, g):
            out[name] = (g.double() + lr * (a.double() - g.double())).to(g.dtype)
        else:
            out[name] = a
    return out


class ServerOptimizer:
    """One of :data:`KINDS` applied to whole models round after round (state kept here)."""

    def __init__(
        self,
        kind: str,
        lr: float = 1.0,
        *,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"server optimizer must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    def step(
        self, global_params: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global model; the inputs are left untouched."""
        import torch

        out: dict[str, torch.Tensor] = {}
        for name, x in global_params.items():
            a = aggregate.get(name, x)
            if not optimised(name, x):
                out[name] = a
                continue
            x64, delta = x.double(), a.double() - x.double()
            v = self.v.get(name)
            if self.kind == "sgdm":
                v = torch.zeros_like(x64) if v is None else v.double()
                new, v = sgdm_step(x64, delta, v, self.lr, self.momentum)
            else:
                m = self.m.get(name)
                m = torch.zeros_like(x64) if m is None else m.double()
                v = torch.full_like(x64, self.tau**2) if v is None else v.double()
                new, m, v = adaptive_step(
                    self.kind, x64, delta, m, v, self.lr, self.beta1, self.beta2, self.tau
                )
                self.m[name] = m.to(x.dtype)
            self.v[name] = v.to(x.dtype)
            out[name] = new.to(x.dtype)
        self.steps += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume (tensors and a step count)."""
        state: dict[str, Any] = {"steps": self.steps}
        if self.m:
            state["m"] = dict(self.m)
        if self.v:
            state["v"] = dict(self.v)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = int(state.get("steps", 0))
        self.m = dict(state.get("m") or {})
        self.v = dict(state.get("v") or {})
