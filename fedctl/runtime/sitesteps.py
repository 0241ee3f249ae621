"""What a site's runtime does to model files around its script: the job's and the site's
privacy filters, homomorphic encryption (decrypt the task's model, encrypt the result) and
secure aggregation's masking. Each step rewrites the file in place, one tensor at a time
where the step allows, and returns the new header and the file's SHA-256.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import remove_soon, retire
from fedctl.codec.model import model_tensors, split_model
from fedctl.codec.tensorfiles import lazy_model, save_file_hashed
from fedctl.constants import MAX_BLOB_BYTES
from fedctl.privacy.filters import FilterChain, FilterContext
from fedctl.privacy.he import model as he_model

if TYPE_CHECKING:
    from fedctl.codec.protocol import SiteTask
    from fedctl.runtime.agent import SiteAgent

log = logging.getLogger("fedctl.agent")


class ModelFileSteps:
    """The model-file steps of :class:`~fedctl.runtime.sitejob.SiteJob` (a mixin: it uses the
    job's agent, id, folder and filters)."""

    agent: SiteAgent
    job_id: str
    root: Path
    filters: FilterChain
    cancelled: set[str]
    _he: Any

    def _secagg(self) -> Any:
        """This site's side of secure aggregation (state in the job's folder, owner-only)."""
        from fedctl.privacy.secagg.site import SiteSecAgg
        from fedctl.runtime.identity import KitIdentity

        return SiteSecAgg(KitIdentity(self.agent.kit), self.root / "secagg", seed=None)

    def _filter_file(
        self, path: Path, header: dict[str, Any], point: str, task: SiteTask, base: Path | None
    ) -> tuple[dict[str, Any], str, list[str]]:
        """Run ``point``'s filters on the model file ``path`` (rewritten in place, one tensor
        at a time); returns the new header, the file's SHA-256 and the filters' names."""
        model = lazy_model(header, path, MAX_BLOB_BYTES)
        base_params = lazy_model(task.header, base, MAX_BLOB_BYTES).params if base else None
        ctx = FilterContext(
            point,
            site=self.agent.kit.name,
            round=task.header.get("current_round"),
            base=base_params,
            seed=None,  # secret randomness on a real site
            task=task.name,
            state_dir=self.root,  # what filters keep across rounds (top-k's residual)
        )
        out = self.filters.apply(point, model, ctx)
        new_header, sha = self._rewrite(path, out, ".filtered")
        names = self.filters.names(point)
        log.info(
            "job %s task %s: %s filters %s %s", self.job_id, task.task_id, point, names, ctx.notes
        )
        return new_header, sha, names

    def _mask_file(
        self,
        path: Path,
        header: dict[str, Any],
        secagg_task: dict[str, Any],
        task_header: dict[str, Any],
        base: Path | None,
    ) -> tuple[dict[str, Any], str]:
        """Replace the result file ``path`` by the masked input of secure aggregation; returns
        the new header and the file's SHA-256."""
        model = lazy_model(header, path, MAX_BLOB_BYTES)
        base_params = lazy_model(task_header, base, MAX_BLOB_BYTES).params if base else None
        masked, notes = self._secagg().masked_result(model, secagg_task, base_params)
        new_header, sha = self._rewrite(path, masked, ".masked")
        if notes.get("clipped"):
            log.warning(
                "job %s: secure aggregation clamped %d coordinates of the update to the clip",
                self.job_id,
                notes["clipped"],
            )
        return new_header, sha

    def _he_context(self) -> Any:
        """The project's secret HE context from this site's kit (loaded once per job)."""
        if self._he is None:
            from fedctl.privacy.he import HEError, load_context

            path = self.agent.kit.he_context_path
            if path is None or not path.is_file():
                raise HEError(
                    "the job uses homomorphic_encryption, but this site's kit has no HE context "
                    "(provision the project with a homomorphic_encryption: section)"
                )
            self._he = load_context(path.read_bytes(), need_secret=True, source=str(path))
        return self._he

    def _he_open_file(self, path: Path, header: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Decrypt an encrypted task model in place (before filters and the script see it);
        returns the header and whether it was encrypted (a plain model passes unchanged)."""
        model = lazy_model(header, path, MAX_BLOB_BYTES)
        if not he_model.is_encrypted(model.params):
            return header, False
        assert model.params is not None
        plain = he_model.open_params(model.params, self._he_context())
        return self._rewrite(path, replace(model, params=plain), ".plain")[0], True

    @staticmethod
    def _he_strip_file(path: Path, header: dict[str, Any]) -> dict[str, Any]:
        """Drop a result's parameters (removing its file): an HE job's task that came
        encrypted and asks for no encryption sends metrics only, never a plain model."""
        out = he_model.without_params(lazy_model(header, path, MAX_BLOB_BYTES))
        new = split_model(replace(out, params=None, optimizer_params=None))[0]
        new["has_params"] = new["has_optimizer_params"] = False
        path.unlink(missing_ok=True)
        return new

    def _he_seal_file(
        self,
        path: Path,
        header: dict[str, Any],
        keys: list[str],
        task_header: dict[str, Any],
        base: Path | None,
    ) -> tuple[dict[str, Any], str]:
        """Replace the result file ``path`` by its encrypted form; returns the new header and
        the file's SHA-256."""
        model = lazy_model(header, path, MAX_BLOB_BYTES)
        base_params = lazy_model(task_header, base, MAX_BLOB_BYTES).params if base else None
        sealed = he_model.seal_result(model, keys, base_params, self._he_context())
        return self._rewrite(path, sealed, ".sealed")

    @staticmethod
    def _rewrite(path: Path, model: Any, suffix: str) -> tuple[dict[str, Any], str]:
        """Write ``model`` over the file ``path`` (through a temporary file and a rename)."""
        header = split_model(replace(model, params=None, optimizer_params=None))[0]
        header["has_params"] = model.params is not None
        header["has_optimizer_params"] = model.optimizer_params is not None
        tmp = path.with_name(path.name + suffix)
        _, sha = save_file_hashed(model_tensors(model), tmp, durable=False)
        os.replace(tmp, path)
        return header, sha

    # ------------------------------------------------------------------------- swarm learning

    def _swarm(self) -> Any:
        """This site's side of swarm learning (its key from its kit; state in the job's folder)."""
        from fedctl.runtime.identity import KitIdentity
        from fedctl.workflows.swarm_site import SwarmSite

        return SwarmSite(KitIdentity(self.agent.kit), self.root / "swarm", self.job_id)

    def _swarm_open_file(
        self, path: Path, header: dict[str, Any], spec: dict[str, Any]
    ) -> dict[str, Any]:
        """Open the model sealed for this site in place (before filters and the script)."""
        from fedctl.workflows import swarm_site

        model = lazy_model(header, path, MAX_BLOB_BYTES)
        params = self._swarm().open_model(model.params or {}, spec)
        meta = swarm_site.strip(model.meta)
        return self._rewrite(path, replace(model, params=params, meta=meta), ".opened")[0]

    def _swarm_seal_file(
        self, path: Path, header: dict[str, Any], spec: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        """Replace the result file ``path`` by the update sealed for the round's aggregator."""
        model = lazy_model(header, path, MAX_BLOB_BYTES)
        assert model.params is not None
        sealed = self._swarm().seal_result(dict(model.params), spec)
        return self._rewrite(path, replace(model, params=sealed), ".sealed")

    def _answer_swarm(self, task: SiteTask) -> None:
        """A swarm system task (keys, aggregate, reseal, final): answered here, no script."""
        from fedctl._fs import safe_name
        from fedctl.workflows import swarm_site

        meta = task.header.get("meta")
        spec = meta.get(swarm_site.META) if isinstance(meta, dict) else None
        if not isinstance(spec, dict):
            raise swarm_site.E2EError("the task carries no swarm step")
        if task.blob is not None:
            path = self.root / "blobs" / f"task.{safe_name(task.task_id)}.safetensors"
            self.agent.fetch(self.job_id, task.blob, path, MAX_BLOB_BYTES)
            try:
                params = dict(lazy_model(task.header, path, MAX_BLOB_BYTES).params or {})
                reply, out = self._swarm().handle(spec, params)
            finally:
                remove_soon(path)
        else:
            reply, out = self._swarm().handle(spec, None)
        self._answer_system(task, "swarm", spec.get("kind"), {swarm_site.META: reply}, out)

    def _answer_system(
        self,
        task: SiteTask,
        what: str,
        step: Any,
        meta: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> None:
        """Send the answer to a system task (secure aggregation's, swarm's), recorded in the
        site's audit trail as ``what`` with its ``step``; ``params`` travel as a result file."""
        from fedctl._fs import safe_name
        from fedctl.codec.model import FLModel
        from fedctl.codec.protocol import SiteResult

        rnd = task.header.get("current_round")
        self.agent.audit.record(
            what, None, job=self.job_id, task=task.task_id, round=rnd, step=str(step)[:40]
        )
        model = FLModel(params_type=None, params=params or None, current_round=rnd, meta=meta)
        blob = None
        if params:
            result = self.root / "blobs" / f"result.{safe_name(task.task_id)}.safetensors"
            result.parent.mkdir(parents=True, exist_ok=True)
            header, sha = self._rewrite(result, model, ".new")
            blob = self.agent.push(self.job_id, task.task_id, result, sha)
            retire(result)
        else:
            header = split_model(model)[0]
        if task.task_id not in self.cancelled:
            self.agent.send(
                SiteResult(job=self.job_id, task_id=task.task_id, header=header, blob=blob)
            )
