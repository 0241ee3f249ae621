"""``Run``: what ``recipe.run(env)`` returns, in every mode: real status, paths, metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import RunFailed
from fedctl.jobs import FINISHED

if TYPE_CHECKING:
    import torch

    from fedctl.tracking.store import RunStore


@dataclass
class Run:
    """The outcome of a job run: status (FINISHED, FAILED, ABORTED) with the reason, where the
    results are, the final and best model files, and the per-round global metrics."""

    job_id: str
    name: str
    mode: str
    status: str
    result_dir: Path
    reason: str | None = None
    final_model: Path | None = None
    best_model: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rounds_completed: int = 0
    num_rounds: int = 0
    duration: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the job finished successfully."""
        return self.status == FINISHED

    @property
    def final_metrics(self) -> dict[str, float]:
        """Global metrics of the last completed round ({} if none)."""
        return dict(self.metrics[-1]["metrics"]) if self.metrics else {}

    def load_final(self) -> dict[str, torch.Tensor]:
        """The final global model as a state_dict."""
        from fedctl.codec.tensorfiles import load_file

        if self.final_model is None:
            raise RunFailed(f"run {self.job_id} has no final model ({self.status}: {self.reason})")
        return load_file(self.final_model)[0]

    def raise_for_status(self) -> Run:
        """Raise RunFailed with the reason unless the run finished."""
        if not self.ok:
            raise RunFailed(f"{self.name} {self.status.lower()}: {self.reason}")
        return self

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (what ``--json`` prints and result.json holds)."""
        return {
            "job_id": self.job_id,
            "name": self.name,
            "mode": self.mode,
            "status": self.status,
            "reason": self.reason,
            "result_dir": str(self.result_dir),
            "final_model": str(self.final_model) if self.final_model else None,
            "best_model": str(self.best_model) if self.best_model else None,
            "rounds_completed": self.rounds_completed,
            "num_rounds": self.num_rounds,
            "duration": round(self.duration, 3),
            "final_metrics": self.final_metrics,
            "metrics": self.metrics,
            **self.extra,
        }

    @classmethod
    def from_result_dir(cls, result_dir: str | Path) -> Run:
        """Re-read a finished run from its ``result.json``."""
        path = Path(result_dir) / "result.json"
        data = json.loads(path.read_text())
        return cls(
            job_id=data["job_id"],
            name=data["name"],
            mode=data["mode"],
            status=data["status"],
            reason=data.get("reason"),
            result_dir=Path(data["result_dir"]),
            final_model=Path(data["final_model"]) if data.get("final_model") else None,
            best_model=Path(data["best_model"]) if data.get("best_model") else None,
            metrics=data.get("metrics") or [],
            rounds_completed=data.get("rounds_completed", 0),
            num_rounds=data.get("num_rounds", 0),
            duration=data.get("duration", 0.0),
        )

    def __repr__(self) -> str:
        return (
            f"Run({self.name!r}, {self.status}, rounds {self.rounds_completed}/{self.num_rounds}, "
            f"result_dir={str(self.result_dir)!r})"
        )


def finish_run(
    store: RunStore,
    *,
    job_id: str,
    name: str,
    mode: str,
    status: str,
    reason: str | None,
    num_rounds: int,
    duration: float,
    extra: dict[str, Any],
) -> Run:
    """Describe a run from its RunStore, log its outcome, close the store, write result.json."""
    from fedctl._fs import write_json_atomic
    from fedctl.tracking.store import jsonable

    run = Run(
        job_id=job_id,
        name=name,
        mode=mode,
        status=status,
        reason=reason,
        result_dir=store.root,
        final_model=store.model_path("final") if status == FINISHED else None,
        best_model=store.model_path("best"),
        metrics=list(store.history),
        rounds_completed=len(store.history),
        num_rounds=num_rounds,
        duration=duration,
        extra={**extra, "best": store.best, **store.extra_outputs()},
    )
    store.log(status + (f": {reason}" if reason else ""))
    store.close(status)
    write_json_atomic(store.root / "result.json", jsonable(run.to_json()))
    return run
