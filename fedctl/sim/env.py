"""``SimEnv``: run a recipe on one machine (or a Ray cluster) with N virtual sites."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import UsageError

if TYPE_CHECKING:
    from fedctl.privacy.policy import PrivacyPolicy
    from fedctl.tracking.run import Run
    from fedctl.workflows.clock import SpeedModel


#: a training site holds about this many copies of the model at once (its model, its gradients,
#: the result it sends); the driver about three (the global model, the running sum, a result)
SITE_MODEL_COPIES = 3
DRIVER_MODEL_COPIES = 3
#: what a worker process costs besides models (Python, torch)
WORKER_BASE_BYTES = 200 * 2**20
#: the share of the available memory a run plans to use
MEMORY_SHARE = 0.8


def fit_workers(workers: int, model_bytes: int, available: int) -> int:
    """At most ``workers`` (at least one) workers whose estimated peak memory, with the driver's,
    fits in ``MEMORY_SHARE`` of ``available`` bytes."""
    budget = available * MEMORY_SHARE - DRIVER_MODEL_COPIES * model_bytes
    per_worker = SITE_MODEL_COPIES * model_bytes + WORKER_BASE_BYTES
    return max(1, min(workers, int(budget // per_worker)))


#: a model at least this large trains one site per LARGE_MODEL_CPUS CPUs, on their threads
LARGE_MODEL_BYTES = 256 * 2**20
LARGE_MODEL_CPUS = 4


def large_model_workers(workers: int, model_bytes: int, cpus: int) -> int:
    """At most ``workers``; for a model of ``LARGE_MODEL_BYTES`` or more, one worker per
    ``LARGE_MODEL_CPUS`` CPUs (at least one).

    A large model's matrix products keep several threads busy, so a site that has the CPUs'
    threads trains nearly as fast as sites side by side on one thread each, while every site
    training at once adds about ``SITE_MODEL_COPIES`` copies of the model to the run's memory
    (docs/simulation.md, "Memory", has the figures)."""
    if model_bytes < LARGE_MODEL_BYTES:
        return workers
    return max(1, min(workers, cpus // LARGE_MODEL_CPUS))


#: the simulator's worker pools (``SimEnv.backend``)
BACKENDS = ("auto", "process", "ray", "local")


@dataclass
class SimEnv:
    """Simulation environment.

    ``num_clients`` virtual sites (``site-1`` … ``site-N``) run on a pool of ``workers`` processes
    (default min(num_clients, CPUs); fewer for a model of 256 MiB or more, which trains one site
    per 4 CPUs on their threads (:func:`large_model_workers`), and fewer when the model is too
    large for that many to train at once in the memory available (:func:`fit_workers`)).
    ``resident`` keeps each site's script alive across rounds; by default it is on when there
    are no more sites than workers (see docs/simulation.md).
    ``backend`` chooses the pool: ``"process"`` (worker processes forked on this machine, no
    Ray), ``"ray"`` (Ray actors: a Ray started on 127.0.0.1, or the cluster at ``ray_address``),
    ``"local"`` (everything in this process, one worker, for debugging) or ``"auto"`` (the
    default: Ray when ``ray_address`` or ``gpus`` is given, this process is already connected to
    Ray or the machine does not run Linux, else processes).
    ``gpus`` is the number of GPUs shared by the pool's workers. ``site_privacy`` gives sites
    their own privacy policy, as ``local/privacy.yaml`` does on a real site: a mapping of site
    name to the policy (a mapping, or the path of a YAML file); see docs/privacy.md.
    ``speeds`` gives sites simulated speeds, latency and dropout driving a virtual clock
    (``fedctl.workflows.clock``): results are then taken in simulated-time order and each
    round's ``sim_time`` is recorded; see docs/algorithms.md.
    """

    num_clients: int = 2
    workers: int | None = None
    gpus: float | None = None
    ray_address: str | None = None
    seed: int = 0
    workspace: str | os.PathLike[str] = "fedctl-runs"
    resident: bool | None = None
    backend: str = "auto"
    display: str = "auto"
    checkpoint: bool = False
    sites: list[str] | None = None
    site_privacy: dict[str, Any] | None = None
    speeds: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.sites is not None:
            if not self.sites or len(set(self.sites)) != len(self.sites):
                raise UsageError("sites must be a non-empty list of distinct names")
            self.num_clients = len(self.sites)
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int):
            raise UsageError(f"num_clients must be an integer, got {self.num_clients!r}")
        if self.num_clients < 1:
            raise UsageError(f"num_clients must be at least 1, got {self.num_clients}")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise UsageError(f"workers must be a positive integer, got {self.workers!r}")
        if self.gpus is not None and self.gpus < 0:
            raise UsageError(f"gpus must be ≥ 0, got {self.gpus}")
        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.ray_address and self.backend in ("process", "local"):
            raise UsageError(f"ray_address needs backend='ray' (or 'auto'), not {self.backend!r}")
        if self.gpus and self.backend in ("process", "local"):
            raise UsageError(f"gpus needs backend='ray' (or 'auto'), not {self.backend!r}")
        if self.display not in ("auto", "rich", "plain", "none"):
            raise UsageError("display must be auto, rich, plain or none")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"seed must be an integer, got {self.seed!r}")
        self.speed_model()  # validated now, like the policies
        self.policies()  # validated now: a bad policy is a one-line error before anything runs

    def policies(self) -> dict[str, PrivacyPolicy]:
        """Each site's privacy policy (sites not named have none)."""
        from fedctl.privacy.policy import PrivacyPolicy, load_policy

        out: dict[str, PrivacyPolicy] = {}
        names = set(self.site_names())
        for site, policy in (self.site_privacy or {}).items():
            if site not in names:
                raise UsageError(f"site_privacy names {site!r}, which is not a site of this run")
            if isinstance(policy, str | os.PathLike):
                out[site] = load_policy(policy)
            else:
                out[site] = PrivacyPolicy.from_data(policy, f"site_privacy[{site!r}]")
        return out

    def speed_model(self) -> SpeedModel:
        """The validated speed model (without ``speeds``: every site equally fast, no dropout,
        so asynchronous workflows still take results in a reproducible order)."""
        from fedctl.workflows.clock import SpeedModel

        return SpeedModel.from_spec(self.speeds or {}, self.site_names())

    def site_names(self) -> list[str]:
        """The virtual sites' names."""
        return (
            list(self.sites) if self.sites else [f"site-{i + 1}" for i in range(self.num_clients)]
        )

    def resolved_backend(self) -> str:
        """The pool this run uses: ``"auto"`` resolved (see the class doc)."""
        if self.backend != "auto":
            return self.backend
        ray = sys.modules.get("ray")  # not imported: not connected (and not worth importing)
        joined = ray is not None and getattr(ray, "is_initialized", lambda: False)()
        # the process backend forks and passes sockets the Linux way (tested there only)
        linux = sys.platform.startswith("linux")
        return "ray" if self.ray_address or self.gpus or joined or not linux else "process"

    def resolved_workers(self) -> int:
        """How many worker processes the pool gets."""
        if self.backend == "local":
            return 1
        if self.workers is not None:
            return self.workers
        from fedctl.sim.pool import available_cpus

        return max(1, min(self.num_clients, available_cpus()))

    def run(self, recipe: Any) -> Run:
        """Simulate ``recipe`` (what ``recipe.run(env)`` calls)."""
        from fedctl.sim.runner import simulate

        return simulate(recipe, self)

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace)
