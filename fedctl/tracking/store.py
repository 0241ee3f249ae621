"""A run's result folder: models, per-round metrics, client tracking records, log, checkpoints.

Layout (the same for simulation and for a job on a server)::

    models/final.safetensors   the last global model
    models/best.safetensors    the global model with the best key metric (when sites report it)
    metrics/global.jsonl       one line per round: aggregated metrics, who answered, duration
    metrics/sites.jsonl        one line per site result: metrics or error
    metrics/tracking.jsonl     what scripts logged (SummaryWriter, fedctl.client.log)
    recipe.json                the job's kind, name and recipe arguments (for reports)
    tb/, mlflow.json, mlruns/  what the TensorBoard and MLflow sinks write (docs/tracking.md)
    cross_site_eval.json       the cross-site evaluation matrix, when the recipe asks for it
    checkpoint/                last completed round (model + workflow state), when enabled
    run.log                    human-readable log, failed sites' tracebacks included
    result.json                status, reason, paths and a summary, written at the end

Rounds are numbered from 1 in every file here (``round`` in the JSONL records, ``best.round``),
as in the live display, ``result.json`` and the admin commands' JSON. Workflow events and the
client API (``FLModel.current_round``) count from 0; :func:`fedctl.jobs.user_round` converts.

Nothing here is ever rewritten in place: JSONL files are appended, models and checkpoints are
written to a temp file and renamed.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import remove_soon, write_json_atomic
from fedctl.codec.tensorfiles import load_file, save_file
from fedctl.jobs import user_round

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from fedctl.tracking.sinks import SinkHub


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        try:
            return jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    return repr(value)


class RunStore:
    """Writes a run's outputs under ``root``; also the event listener that logs the run."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        key_metric: str | None = "accuracy",
        key_metric_mode: str = "max",
        checkpoint: bool = False,
    ) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.metrics_dir = self.root / "metrics"
        self.checkpoint_dir = self.root / "checkpoint"
        for d in (self.models, self.metrics_dir):
            d.mkdir(parents=True, exist_ok=True)
        if key_metric_mode not in ("max", "min"):
            raise ValueError("key_metric_mode must be 'max' or 'min'")
        self.key_metric = key_metric
        self.key_mode = key_metric_mode
        self.checkpoint_enabled = checkpoint
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._files = {
            name: open(self.metrics_dir / f"{name}.jsonl", "a", buffering=1)  # noqa: SIM115
            for name in ("global", "sites", "tracking")
        }
        self._log = open(self.root / "run.log", "a", buffering=1)  # noqa: SIM115
        #: the TensorBoard/MLflow sinks (None until start_tracking)
        self.sinks: SinkHub | None = None
        # tensor bytes of the tasks sent and results received since the last completed round
        self._bytes = {"sent": 0, "received": 0}
        self._closed = False

    # ------------------------------------------------------------------ sinks

    def start_tracking(
        self,
        job_tracking: dict[str, Any] | None,
        *,
        job_id: str,
        name: str,
        kind: str,
        args: dict[str, Any],
        mode: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Write ``recipe.json`` and start the sinks the job and the environment choose (see
        :mod:`fedctl.tracking.sinks`); a sink's problems go to run.log, never to the job."""
        from fedctl.tracking import sinks

        args = jsonable(args)
        write_json_atomic(self.root / "recipe.json", {"kind": kind, "name": name, "args": args})
        choice = sinks.plan(job_tracking, os.environ if environ is None else environ)
        for note in choice.notes:
            self.log(f"tracking: {note}")
        info = sinks.RunInfo(self.root, job_id, name, kind, mode, args)
        hub = sinks.SinkHub(sinks.build(choice), info, self.log)
        where = ", ".join(f"{s.name} ({s.where()})" for s in hub.sinks)
        self.log(f"tracking: metrics/*.jsonl{', ' + where if where else ''}")
        if hub.sinks:
            self.sinks = hub.start()

    def count_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        """Add tensor bytes sent to sites / received from them (reported per round)."""
        with self._lock:
            self._bytes["sent"] += sent
            self._bytes["received"] += received

    # ------------------------------------------------------------------ logging

    def log(self, message: str) -> None:
        """Append a timestamped line to run.log."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            if self._closed:
                return
            for i, line in enumerate(message.rstrip("\n").splitlines() or [""]):
                self._log.write(f"{stamp} {line}\n" if i == 0 else f"    {line}\n")

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._files[name].write(json.dumps(jsonable(record)) + "\n")

    def listener(self, event: dict[str, Any]) -> None:
        """Workflow event → run.log / metrics JSONL."""
        kind = event["event"]
        if kind == "result":
            record = {
                "round": user_round(event.get("round")),
                "site": event["site"],
                "ok": event["ok"],
                "metrics": event.get("metrics") or {},
                "error": event.get("error"),
                "duration": round(event.get("duration") or 0.0, 4),
                "time": event["time"],
            }
            if event.get("phase"):
                record["phase"] = event["phase"]
            self._append("sites", record)
            if self.sinks is not None and event["ok"] and isinstance(event.get("round"), int):
                self._result_to_sinks(event)
            if not event["ok"]:
                where = f"round {event['round'] + 1}" if event.get("round") is not None else ""
                if event.get("phase"):
                    where = f"{where} ({event['phase']})".strip()
                self.log(f"{event['site']} failed {where}: {event['error']}")
                if event.get("traceback"):
                    self.log(event["traceback"])
        elif kind == "round_completed":
            record = {
                "round": user_round(event["round"]),
                "metrics": event.get("metrics") or {},
                "accepted": len(event.get("accepted") or []),
                "failed": sorted(event.get("failed") or {}),
                "missing": event.get("missing") or [],
                "duration": round(event.get("duration") or 0.0, 4),
                "time": event["time"],
            }
            if event.get("sim_time") is not None:  # simulated time (SimEnv speeds)
                record["sim_time"] = round(event["sim_time"], 6)
            with self._lock:
                record["bytes_sent"] = self._bytes["sent"]
                record["bytes_received"] = self._bytes["received"]
                self._bytes = {"sent": 0, "received": 0}
            self.history.append(record)
            self._append("global", record)
            if self.sinks is not None:
                self._round_to_sinks(event["round"], record)
            metrics = " ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
            self.log(
                f"round {event['round'] + 1} completed: {record['accepted']} results "
                f"in {record['duration']:.2f}s {metrics}"
            )
        elif kind in ("warning", "error", "info"):
            self.log(f"{kind}: {event.get('message')}")
        elif kind == "round_started":
            self.log(f"round {event['round'] + 1} started: {len(event['targets'])} sites")
        elif kind == "resumed":
            self.log(f"resumed from checkpoint at round {event['round'] + 1}")
        elif kind == "cross_site_eval":
            self.log(f"cross-site evaluation saved to {event.get('path')}")
            for line in cross_site_lines(event["matrix"], event.get("metric")):
                self.log(line)

    def trained_sites(self) -> set[str] | None:
        """Sites with at least one accepted training result in this run, from ``sites.jsonl`` (so
        a run resumed from a checkpoint counts its earlier rounds too); None when no result was
        recorded at all (this store is not the run's listener: unknown)."""
        with self._lock:
            self._files["sites"].flush()
            lines = [ln for ln in (self.metrics_dir / "sites.jsonl").read_text().splitlines() if ln]
        if not lines:
            return None
        trained = set()
        for line in lines:
            rec = json.loads(line)
            if rec.get("ok") and not rec.get("phase") and rec.get("site"):
                trained.add(rec["site"])
        return trained

    def add_records(self, site: str, records: list[dict[str, Any]]) -> None:
        """Append client tracking records (SummaryWriter, log) tagged with their site."""
        if self.sinks is not None:
            self.sinks.records(site, records)
        for rec in records:
            rec = {**rec, "round": user_round(rec["round"])} if "round" in rec else rec
            self._append("tracking", {"site": site, **rec})

    def _round_to_sinks(self, rnd: int, record: dict[str, Any]) -> None:
        from fedctl.tracking.sinks import GLOBAL, numbers

        assert self.sinks is not None
        values = numbers(record["metrics"])
        values.update(
            {
                "fedctl/round_duration_s": record["duration"],
                "fedctl/sites_accepted": record["accepted"],
                "fedctl/sites_failed": len(record["failed"]),
                "fedctl/sites_missing": len(record["missing"]),
                "fedctl/bytes_sent": record["bytes_sent"],
                "fedctl/bytes_received": record["bytes_received"],
            }
        )
        self.sinks.scalars(GLOBAL, rnd + 1, values, record["time"])

    def _result_to_sinks(self, event: dict[str, Any]) -> None:
        from fedctl.tracking.sinks import numbers

        assert self.sinks is not None
        phase = event.get("phase")
        if phase not in (None, "evaluate"):
            return  # cross-site evaluation: its matrix is in cross_site_eval.json
        prefix = "eval_" if phase == "evaluate" else ""
        values = {f"{prefix}{k}": v for k, v in numbers(event.get("metrics")).items()}
        if phase is None:
            values["fedctl/result_duration_s"] = float(event.get("duration") or 0.0)
        self.sinks.scalars(str(event["site"]), event["round"] + 1, values, event["time"])

    # ------------------------------------------------------------------ models

    def save_model(
        self, name: str, params: dict[str, torch.Tensor], meta: dict[str, str] | None = None
    ) -> Path:
        """Write ``models/<name>.safetensors`` atomically."""
        return save_file(params, self.models / f"{name}.safetensors", meta)

    def model_path(self, name: str) -> Path | None:
        path = self.models / f"{name}.safetensors"
        return path if path.exists() else None

    def round_completed(
        self,
        rnd: int,
        model_in: dict[str, torch.Tensor],
        model_out: dict[str, torch.Tensor],
        metrics: dict[str, float],
        state: dict[str, Any],
        out_metrics: dict[str, float] | None = None,
    ) -> None:
        """Keep the best model (the one the round's metrics describe) and checkpoint.

        ``metrics`` come from training results and describe the model the sites received
        (``model_in``), as in the usual "validate the global model, then train" client loop;
        ``out_metrics`` (federated and server-side evaluation) describe ``model_out``.
        """
        key = self.key_metric
        for values, model in ((metrics, model_in), (out_metrics or {}, model_out)):
            if not key or key not in values or not math.isfinite(values[key]):
                continue
            value = values[key]
            better = self.best is None or (
                value > self.best["value"] if self.key_mode == "max" else value < self.best["value"]
            )
            if better:
                shown = user_round(rnd)
                self.save_model("best", model, {"round": str(shown), key: repr(value)})
                self.best = {"round": shown, "metric": key, "value": value}
            break
        if self.checkpoint_enabled:
            self.save_checkpoint(rnd + 1, model_out, state)

    def extra_outputs(self) -> dict[str, Any]:
        """What a workflow added to the run: the cross-site matrix's path, the privacy spent."""
        out: dict[str, Any] = {}
        path = self.root / "cross_site_eval.json"
        if path.exists():
            out["cross_site_eval"] = str(path)
        privacy = self.root / "privacy.json"
        if privacy.exists():
            out["privacy"] = json.loads(privacy.read_text())
        return out

    def save_json(self, name: str, data: Any) -> Path:
        """Write ``<root>/<name>`` atomically as JSON (e.g. the cross-site matrix)."""
        path = self.root / name
        write_json_atomic(path, jsonable(data))
        return path

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self, next_round: int, params: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> None:
        """Model first, then the small JSON that names it: a crash leaves the previous one."""
        import torch

        self.checkpoint_dir.mkdir(exist_ok=True)
        tensors = {f"p:{k}": v for k, v in params.items()}
        values: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"s:{k}"] = v
            elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                for sub, t in v.items():
                    tensors[f"d:{k}/{sub}"] = t
            else:
                values[k] = v
        name = f"round-{next_round}.safetensors"
        save_file(tensors, self.checkpoint_dir / name)
        info = {
            "next_round": next_round,
            "model": name,
            "state": values,
            "best": self.best,
            "history": self.history,
        }
        write_json_atomic(self.checkpoint_dir / "checkpoint.json", jsonable(info))
        for old in self.checkpoint_dir.glob("round-*.safetensors"):
            if old.name != name:
                remove_soon(old)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint as ``{"params", "next_round", "state"}``, or None."""
        info_path = self.checkpoint_dir / "checkpoint.json"
        if not info_path.exists():
            return None
        info = json.loads(info_path.read_text())
        tensors, _ = load_file(self.checkpoint_dir / info["model"])
        params = {k[2:]: v for k, v in tensors.items() if k.startswith("p:")}
        state: dict[str, Any] = dict(info.get("state") or {})
        for k, v in tensors.items():
            if k.startswith("s:"):
                state[k[2:]] = v
            elif k.startswith("d:"):
                outer, _, inner = k[2:].partition("/")
                state.setdefault(outer, {})[inner] = v
        self.best = info.get("best")
        self.history = list(info.get("history") or [])
        return {"params": params, "next_round": int(info["next_round"]), "state": state}

    def close(self, status: str | None = None) -> None:
        """Let the sinks write what is queued (closing their runs with the final ``status``;
        None: the run goes on later, e.g. after a server restart), then close the files."""
        if self._closed:
            return
        if self.sinks is not None:
            self.sinks.close(status)
        with self._lock:
            self._closed = True
            for fh in self._files.values():
                fh.close()
            self._log.close()


def model_label(matrix: dict[str, Any], model: str) -> str:
    """A row of the cross-site table: the model's owner, marked if it never trained."""
    untrained = model in (matrix.get("never_trained") or [])
    return f"{model} (never trained)" if untrained else model


def cross_site_lines(matrix: dict[str, Any], metric: str | None) -> list[str]:
    """The cross-site matrix as aligned text lines: one row per model, one column per site."""
    sites = list(matrix.get("sites") or [])
    results = matrix.get("results") or {}
    rows = [["model \\ data", *sites]]
    for model in matrix.get("models") or []:
        row = [model_label(matrix, model)]
        for site in sites:
            value = (results.get(model) or {}).get(site, {}).get(metric) if metric else None
            row.append(f"{value:.4g}" if isinstance(value, int | float) else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
