"""The Ray actor that hosts a :class:`~fedctl.sim.worker.WorkerCore` (imported only with Ray)."""

from __future__ import annotations

import os
from typing import Any

from fedctl.constants import SCRIPT_ENV_DEFAULTS
from fedctl.sim.transport import RayTransport
from fedctl.sim.worker import WorkerConfig, WorkerCore, WorkItem


class SimWorkerActor:
    """One simulator worker process."""

    def __init__(self, config: WorkerConfig) -> None:
        # What the process backend's zygote gives its workers (huge pages for large tensors),
        # unless this Ray node's environment says otherwise. torch reads it once, at its first
        # allocation: a Ray worker has not imported torch before its actor is made.
        for key, value in SCRIPT_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.core = WorkerCore(config, RayTransport())

    def ready(self) -> tuple[int, str]:
        """The worker's PID and Ray node, once it has started."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def run_batch(self, items: list[WorkItem], model_id: str, box: list[Any]) -> list[Any]:
        """Run a batch of work items (see WorkerCore.run_batch)."""
        return self.core.run_batch(items, model_id, box)

    def shutdown(self) -> None:
        """Stop resident scripts before the actor is killed."""
        self.core.close()
