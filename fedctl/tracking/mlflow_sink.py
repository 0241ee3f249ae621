"""The MLflow sink: one parent run per job, a child run per site (``pip install 'fedctl[mlflow]'``).

The parent run is named after the job and holds the recipe's arguments as params and the
server's metrics per round (step = round, counted from 1); each site's child run (tagged
``mlflow.parentRunId``) holds its result metrics and the scalars its script recorded. Text
records and histograms stay in TensorBoard and the JSONL files. The tracking URI is the job's
(``tracking={"mlflow": {"tracking_uri": ...}}``: an http(s) server or a folder inside the run
folder), else ``MLFLOW_TRACKING_URI``, else ``<run>/mlruns``; the experiment is the job's, else
``MLFLOW_EXPERIMENT_NAME``, else the job's name.

The run ids are kept in ``<run>/mlflow.json``: a job that resumes after its server restarted
goes on writing the same runs. Metrics are sent in batches (``log_batch``) by the sinks' thread.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from fedctl._fs import write_json_atomic
from fedctl.tracking.sinks import GLOBAL, RunInfo, Sink

#: MLflow's own limits (mlflow.utils.validation)
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
#: run status by fedctl's final status
STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "ABORTED": "KILLED"}
STATE_FILE = "mlflow.json"


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow metric or param key (letters, digits, ``_ - . /`` and spaces; no
    empty, ``.`` or ``..`` path parts; at most 250 characters)."""
    clean = re.sub(r"[^/\w.\- ]", "_", name)
    parts = ["_" if p in (".", "..") else p for p in clean.split("/") if p]
    return ("/".join(parts) or "_")[:MAX_KEY]


def flat_params(args: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Recipe arguments as MLflow params: nested dicts as ``a.b`` keys, every value as JSON
    text (strings as they are), cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for k, v in args.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        out[mlflow_key(key)] = text[:MAX_PARAM_VALUE]
    return out


def resolve_uri(job_uri: str | None, root: Path) -> str:
    """The tracking URI: the job's (a relative folder is inside ``root``), else
    ``MLFLOW_TRACKING_URI``, else ``root/mlruns``."""
    if job_uri:
        if job_uri.startswith(("http://", "https://")):
            return job_uri
        return (root / job_uri).resolve().as_uri()
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return (root / "mlruns").resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


class MlflowSink(Sink):
    """See the module docstring."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        self.job_uri = tracking_uri
        self.experiment = experiment
        self.uri = ""
        self.client: Any = None
        self.info: RunInfo | None = None
        self.state: dict[str, Any] = {}
        self._pending: dict[str, list[Any]] = {}
        self._count = 0

    def where(self) -> str:
        if self.uri:
            return self.uri
        if self.job_uri:
            return self.job_uri if "://" in self.job_uri else f"{self.job_uri}/ in the run folder"
        return os.environ.get("MLFLOW_TRACKING_URI") or "mlruns/ in the run folder"

    def open(self, info: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.info = info
        self.uri = resolve_uri(self.job_uri, info.root)
        if _is_file_store(self.uri):
            # MLflow 3 refuses its file store unless asked; a folder is what was asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        path = info.root / STATE_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("tracking_uri") == self.uri and saved.get("parent"):
                self.state = saved  # a resumed job: the same runs go on
                return
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or info.name
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(
            exp_id,
            run_name=info.name,
            tags={
                "fedctl.job_id": info.job_id,
                "fedctl.kind": info.kind,
                "fedctl.mode": info.mode,
            },
        )
        self.state = {
            "tracking_uri": self.uri,
            "experiment_id": exp_id,
            "experiment": name,
            "parent": run.info.run_id,
            "sites": {},
        }
        self._save()
        params = [Param(k, v) for k, v in flat_params(info.args).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=params[i : i + PARAMS_PER_BATCH])

    def _save(self) -> None:
        assert self.info is not None
        write_json_atomic(self.info.root / STATE_FILE, self.state)

    def run_id(self, scope: str) -> str:
        """The MLflow run of ``scope``: the parent for GLOBAL, else the site's (made when first
        used)."""
        if scope == GLOBAL:
            return str(self.state["parent"])
        sites = self.state["sites"]
        if scope not in sites:
            run = self.client.create_run(
                self.state["experiment_id"],
                run_name=scope,
                tags={
                    "mlflow.parentRunId": self.state["parent"],
                    "fedctl.site": scope,
                    "fedctl.job_id": self.info.job_id if self.info else "",
                },
            )
            sites[scope] = run.info.run_id
            self._save()
        return str(sites[scope])

    def scalars(self, scope: str, step: int, values: dict[str, float], wall_time: float) -> None:
        from mlflow.entities import Metric

        run = self.run_id(scope)
        stamp = int(wall_time * 1000)
        batch = self._pending.setdefault(run, [])
        batch += [Metric(mlflow_key(k), v, stamp, step) for k, v in values.items()]
        self._count += len(values)
        if self._count >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        pending, self._pending, self._count = self._pending, {}, 0
        for run, metrics in pending.items():
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                self.client.log_batch(run, metrics=metrics[i : i + METRICS_PER_BATCH])

    def close(self, status: str | None) -> None:
        self.flush()
        if status is None or not self.state:
            return  # not over: a resumed job process goes on with these runs
        state = STATUS.get(status, "FAILED")
        end = int(time.time() * 1000)
        for run in [*self.state["sites"].values(), self.state["parent"]]:
            self.client.set_terminated(run, state, end)
