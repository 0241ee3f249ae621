"""What a virtual site's runtime does around its script besides the job's filters: homomorphic
encryption of its result, secure aggregation's masked input and system tasks, and swarm
learning's sealed models and system tasks (a mixin of :class:`~fedctl.sim.worker.ScriptHost`:
the same steps a real site's job runner takes, on in-memory models)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.client.channel import SiteInfo, derive_seed
from fedctl.codec.model import FLModel, Task, TaskResult
from fedctl.errors import FedctlError
from fedctl.privacy.he import model as he_model
from fedctl.privacy.secagg import keys as secagg_keys
from fedctl.workflows import swarm_site

if TYPE_CHECKING:
    from fedctl.sim.worker import WorkerCore


class HostSteps:
    """Privacy steps of one virtual site (the attributes are ScriptHost's)."""

    worker: WorkerCore
    site: str
    site_dir: Path
    info: SiteInfo
    base: Any
    he_keys: list[str] | None
    secagg_task: dict[str, Any] | None
    #: the swarm protocol entry of the current training task (None: not a swarm round)
    swarm_task: dict[str, Any] | None = None

    def he_seal(self, model: FLModel) -> FLModel:
        """The script's (filtered) result with the job's parameters encrypted."""
        keys, self.he_keys = self.he_keys, None
        assert keys is not None
        return he_model.seal_result(model, keys, self.base, self.worker.he_context())

    def secagg(self) -> Any:
        """This site's side of secure aggregation (its state lives in the site's folder)."""
        from fedctl.privacy.secagg.site import SimulatedIdentity, SiteSecAgg

        config = self.worker.config
        return SiteSecAgg(SimulatedIdentity(self.site, config.seed), self.site_dir, config.seed)

    def secure_input(self, model: FLModel) -> FLModel:
        """The script's (filtered) result → the masked input of secure aggregation."""
        import torch

        assert self.secagg_task is not None
        config, rnd = self.worker.config, model.current_round
        seed = derive_seed(config.seed, self.info.site_index, rnd, "secagg_noise")
        generator = torch.Generator().manual_seed(seed)
        task, self.secagg_task = self.secagg_task, None
        out, notes = self.secagg().masked_result(model, task, self.base, generator)
        if notes.get("clipped"):
            print(
                f"fedctl: secure aggregation clamped {notes['clipped']} coordinates of the "
                "update to the clip (secure_aggregation.clip)",
                file=sys.stderr,
            )
        return out

    def swarm(self) -> swarm_site.SwarmSite:
        """This site's side of swarm learning (its key and kept models in its folder)."""
        from fedctl.privacy.secagg.site import SimulatedIdentity

        config = self.worker.config
        identity = SimulatedIdentity(self.site, config.seed)
        return swarm_site.SwarmSite(identity, self.site_dir, config.job_id)

    def swarm_open(self, model: FLModel) -> FLModel:
        """A swarm round's training task: the model sealed for this site, opened (the script
        sees a plain task, without the protocol's entry)."""
        from dataclasses import replace

        spec = (model.meta or {})[swarm_site.META]
        self.worker.make_site_dir(self.site_dir)
        params = self.swarm().open_model(model.params or {}, spec)
        self.swarm_task = spec
        return replace(model, params=params, meta=swarm_site.strip(model.meta))

    def swarm_seal(self, model: FLModel) -> FLModel:
        """The script's (filtered) result sealed for the round's aggregator."""
        from dataclasses import replace

        spec, self.swarm_task = self.swarm_task, None
        assert spec is not None and model.params is not None
        return replace(model, params=self.swarm().seal_result(model.params, spec))

    def answer_system_task(self, task: Task) -> tuple[TaskResult, dict[str, Any] | None]:
        """A secure-aggregation or swarm task, answered by the site's runtime (no script
        runs): the result, and the params it sends back (swarm's sealed models)."""
        started = time.monotonic()
        result = TaskResult(self.site, task.task_id)
        params = None
        what = "secure aggregation" if task.name == secagg_keys.TASK else "swarm"
        try:
            self.worker.make_site_dir(self.site_dir)
            if task.name == secagg_keys.TASK:
                meta = self.secagg().handle(task.model.meta)
            else:
                spec = (task.model.meta or {}).get(swarm_site.META)
                if not isinstance(spec, dict):
                    raise FedctlError("the task carries no swarm step")
                reply, params = self.swarm().handle(spec, task.model.params)
                meta = {swarm_site.META: reply}
            result.model = FLModel(
                params_type=None, current_round=task.model.current_round, meta=meta
            )
        except FedctlError as exc:
            result.error = f"{what}: {exc}"
            params = None
        result.duration = time.monotonic() - started
        return result, params
