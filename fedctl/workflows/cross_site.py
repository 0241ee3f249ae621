"""Cross-site evaluation: every site's own model and the global model, evaluated on every site.

After the last round (when a recipe sets ``cross_site_eval=True``):

1. every site gets a ``submit_model`` task and answers with its own final local model
   (``flare.is_submit_model()``; see :func:`fedctl.client.keep_local_model`);
2. the global model and each submitted model go, one at a time, to every site as an
   ``evaluate`` task (``meta["evaluation"] == "cross_site"``, ``meta["model_owner"]`` names whose
   model it is); each site answers with metrics computed on its own data.

The matrix (model × site × metric) is written to ``cross_site_eval.json`` in the run folder and
shown as a table. Sites that never had a training update accepted (they failed or missed every
round) are listed under ``never_trained``, and their rows are marked: the model such a site
submits is not one it trained.

Submitted models are saved as ``models/local-<site>.safetensors`` and read back one at a time,
so the server holds one extra model at a time, not N. Sites that fail a task are listed under
``errors``; the job fails only when no site could evaluate the global model.
It costs N + 1 evaluations per site: meant for tens of sites, not thousands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import UpdateRejected, check_update
from fedctl.codec.keys import EVAL_KIND_KEY, MODEL_OWNER_KEY
from fedctl.codec.model import (
    TASK_EVALUATE,
    TASK_SUBMIT_MODEL,
    FLModel,
    ParamsType,
    TaskResult,
    scalar_metrics,
)
from fedctl.errors import RunFailed
from fedctl.workflows.base import RoundPolicy, WorkflowContext

if TYPE_CHECKING:
    import torch

GLOBAL = "global"
RESULT_FILE = "cross_site_eval.json"


def _collect(
    ctx: WorkflowContext,
    task_name: str,
    model: FLModel,
    sites: list[str],
    timeout: float | None,
    on_result: Any,
) -> dict[str, str]:
    """Broadcast one task to ``sites`` and feed results to ``on_result``; return the failures."""
    task = ctx.new_task(task_name, model)
    phase = "submit_model" if task_name == TASK_SUBMIT_MODEL else "cross_site"
    outcome = ctx.gather(
        ctx.broadcast(task, sites), RoundPolicy(0, timeout), on_result, phase=phase
    )
    errors = dict(outcome.failed)
    for site in outcome.missing:
        errors[site] = "no answer within the deadline"
    return errors


def pick_metric(results: dict[str, dict[str, dict[str, float]]]) -> str | None:
    """The metric shown in the table: ``accuracy`` if reported, else the first name seen."""
    names = sorted({m for per_site in results.values() for r in per_site.values() for m in r})
    if not names:
        return None
    return "accuracy" if "accuracy" in names else names[0]


def cross_site_evaluate(
    ctx: WorkflowContext,
    global_params: dict[str, torch.Tensor],
    sites: list[str],
    *,
    timeout: float | None,
    meta: dict[str, Any] | None = None,
    total_rounds: int | None = None,
) -> dict[str, Any]:
    """Run both phases (see the module docstring); returns the matrix that was saved."""
    from fedctl.codec.tensorfiles import load_file

    meta = dict(meta or {})
    store = ctx.store
    ctx.emit("info", message=f"cross-site evaluation on {len(sites)} sites")
    submitted: dict[str, Any] = {}  # site → saved path (with a store) or params

    def on_submit(result: TaskResult) -> None:
        assert result.model is not None
        params = result.model.params
        if not params:
            raise UpdateRejected("submit_model answered without params")
        check_update(global_params, params, 1.0)
        if store is not None:
            submitted[result.site] = store.save_model(f"local-{result.site}", params)
        else:
            submitted[result.site] = {k: v.clone() for k, v in params.items()}

    request = FLModel(
        params_type=ParamsType.FULL,
        current_round=total_rounds,
        total_rounds=total_rounds,
        meta=meta,
    )
    submit_errors = _collect(ctx, TASK_SUBMIT_MODEL, request, sites, timeout, on_submit)

    models = [GLOBAL, *[s for s in sites if s in submitted]]
    results: dict[str, dict[str, dict[str, float]]] = {}
    eval_errors: dict[str, dict[str, str]] = {}
    for owner in models:
        if owner == GLOBAL:
            params = global_params
        else:
            saved = submitted[owner]
            params = load_file(saved)[0] if not isinstance(saved, dict) else saved
        row: dict[str, dict[str, float]] = {}

        def on_eval(result: TaskResult, row: dict[str, dict[str, float]] = row) -> None:
            assert result.model is not None
            row[result.site] = scalar_metrics(result.model.metrics)

        task_model = FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=total_rounds,
            total_rounds=total_rounds,
            meta={**meta, EVAL_KIND_KEY: "cross_site", MODEL_OWNER_KEY: owner},
        )
        errors = _collect(ctx, TASK_EVALUATE, task_model, sites, timeout, on_eval)
        results[owner] = row
        if errors:
            eval_errors[owner] = errors
        del params, task_model

    metric = pick_metric(results)
    trained = store.trained_sites() if hasattr(store, "trained_sites") else None  # None: unknown
    never_trained = [s for s in models[1:] if trained is not None and s not in trained]
    matrix = {
        "sites": list(sites),
        "models": models,
        "never_trained": never_trained,
        "metrics": sorted({m for r in results.values() for v in r.values() for m in v}),
        "results": results,
        "errors": {"submit_model": submit_errors, "evaluate": eval_errors},
    }
    path = None
    if store is not None and hasattr(store, "save_json"):
        path = str(store.save_json(RESULT_FILE, matrix))
    ctx.emit("cross_site_eval", matrix=matrix, metric=metric, path=path)
    if never_trained:
        ctx.emit(
            "warning",
            message=f"cross-site evaluation: {', '.join(never_trained)} never had a training "
            "update accepted; the model it submitted is not one it trained (marked in the table)",
        )
    if submit_errors or eval_errors:
        failed = sorted(set(submit_errors) | {s for e in eval_errors.values() for s in e})
        ctx.emit(
            "warning",
            message=f"cross-site evaluation incomplete: {', '.join(failed)} failed a task "
            f"(details under 'errors' in {RESULT_FILE})",
        )
    if not results.get(GLOBAL):
        detail = "; ".join(f"{s}: {e}" for s, e in sorted(eval_errors.get(GLOBAL, {}).items()))
        raise RunFailed(
            f"cross-site evaluation: no site evaluated the global model ({detail or 'no sites'})"
        )
    return matrix
