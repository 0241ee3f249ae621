"""Simulated time: per-site speeds, latency and dropout driving a virtual clock.

In simulation, sites run as fast as the pool runs them, so "how long" means nothing there. With
``SimEnv(speeds=...)`` each task a site is given also gets a *virtual* duration from a seeded
model, and workflows see results in virtual-time order: an asynchronous run is then reproducible
from its seed, and a bench can report simulated wall-clock time to a target accuracy, not only
rounds (docs/algorithms.md). POC and production have no virtual clock: there the order is the
order of arrival and time is the wall clock.

The model (every key optional)::

    speeds = {
        "spread": 10.0,        # site factors log-uniform in [1, spread], seeded per site
        "factors": {"site-1": 1.0, "site-2": 4.0},  # explicit factors (override spread)
        "task_time": 1.0,      # virtual seconds a task takes at factor 1
        "jitter": 0.1,         # per-task lognormal sigma on top of the factor
        "latency": 0.05,       # virtual seconds each way, added to every task
        "dropout": 0.02,       # probability a task is lost (the site does not run it)
    }

A task's duration is ``task_time × factor × jitter + 2 × latency``; its draws depend only on the
seed, the site and how many tasks the site was given before, never on which worker ran what.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedctl.errors import UsageError

KEYS = ("spread", "factors", "task_time", "jitter", "latency", "dropout")
#: what a lost task's result says
DROPPED = "dropped (simulated dropout)"


def _number(value: Any, what: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"speeds: {what} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise UsageError(f"speeds: {what} must be in [{low}, {high}], got {value!r}")
    return v


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class SpeedModel:
    """Validated speed model (see the module docstring)."""

    spread: float = 1.0
    factors: Mapping[str, float] = field(default_factory=dict)
    task_time: float = 1.0
    jitter: float = 0.0
    latency: float = 0.0
    dropout: float = 0.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], sites: Sequence[str]) -> SpeedModel:
        """The model of ``SimEnv(speeds=spec)``; a one-line UsageError names what is wrong."""
        if not isinstance(spec, Mapping):
            raise UsageError(f"speeds must be a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise UsageError(f"speeds: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
        factors = spec.get("factors") or {}
        if not isinstance(factors, Mapping):
            raise UsageError("speeds: factors must map site names to numbers")
        names = set(sites)
        for site, value in factors.items():
            if site not in names:
                raise UsageError(f"speeds: factors names {site!r}, which is not a site of this run")
            if _number(value, f"factors[{site!r}]", low=0.0) <= 0:
                raise UsageError(f"speeds: factors[{site!r}] must be positive")
        return cls(
            spread=_number(spec.get("spread", 1.0), "spread", low=1.0, high=1e6),
            factors={k: float(v) for k, v in factors.items()},
            task_time=_number(spec.get("task_time", 1.0), "task_time", low=1e-9),
            jitter=_number(spec.get("jitter", 0.0), "jitter", low=0.0, high=5.0),
            latency=_number(spec.get("latency", 0.0), "latency", low=0.0),
            dropout=_number(spec.get("dropout", 0.0), "dropout", low=0.0, high=0.99),
        )


class VirtualClock:
    """The simulated time of a run, and each task's virtual duration and fate."""

    def __init__(self, model: SpeedModel, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.now = 0.0
        self._given: dict[str, int] = {}

    def factor(self, site: str) -> float:
        """The site's slowness (1: fastest)."""
        if site in self.model.factors:
            return self.model.factors[site]
        if self.model.spread == 1.0:
            return 1.0
        return float(self.model.spread ** _rng(self.seed, "speed", site).random())

    def schedule(self, site: str) -> tuple[float, bool]:
        """A new task for ``site`` starting now: (its virtual finish time, whether it is lost)."""
        k = self._given.get(site, 0)
        self._given[site] = k + 1
        m = self.model
        rng = _rng(self.seed, "task", site, k)
        jitter = math.exp(rng.gauss(0.0, m.jitter)) if m.jitter else 1.0
        lost = rng.random() < m.dropout if m.dropout else False
        duration = m.task_time * self.factor(site) * jitter + 2 * m.latency
        return self.now + duration, lost

    def advance_to(self, t: float | None) -> None:
        """Move the clock forward to ``t`` (never back)."""
        if t is not None and t > self.now:
            self.now = t
