"""Tracking, reports and Lightning on the real runtime: a POC server and two site agents as
processes (issue 17). The job process writes TensorBoard and MLflow into the job's result
folder; `fedctl job download` brings it back and `fedctl report` reads it like a simulation's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import free_port

from fedctl.cli.main import main
from fedctl.recipe import PocEnv, SimEnv, load_recipe
from fedctl.runtime import poc
from fedctl.tracking.report import SECTIONS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def poc_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("poc-tracking") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2"], port=free_port())
    poc.start(ws, site="site-1")
    poc.start(ws, site="site-2")
    yield ws
    poc.stop(ws)


def test_a_poc_job_is_tracked_downloaded_and_reported(poc_ws, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(RECIPES / "evaluation").recipe.with_overrides(
        num_rounds=2,
        central_dp={"noise_multiplier": 0.3, "clip": 5.0},
        tracking={"mlflow": {"tracking_uri": "mlruns", "experiment": "poc"}},
    )
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "results"))
    assert run.ok, run.reason
    base = ["--poc-workspace", str(poc_ws)]
    dl = tmp_path / "dl"
    assert main(["job", "download", run.job_id, "-o", str(dl), *base]) == 0
    assert (dl / "job.json").is_file() and (dl / "recipe.json").is_file()

    # TensorBoard: the server's metrics and each site's, per round
    for folder in ("global", "site-1", "site-2"):
        acc = EventAccumulator(str(dl / "tb" / folder))
        acc.Reload()
        tag = "dp_epsilon" if folder == "global" else "train_accuracy"
        assert [e.step for e in acc.Scalars(tag)][-1] == 2, folder
    # MLflow: a parent run with the recipe's arguments, a child per site
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a folder only then
    client = MlflowClient(tracking_uri=(dl / "mlruns").as_uri())
    exp = client.get_experiment_by_name("poc")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"evaluation", "site-1", "site-2"}
    assert runs["evaluation"].data.params["central_dp.noise_multiplier"] == "0.3"
    assert runs["evaluation"].data.tags["fedctl.mode"] == "server"
    assert all(r.info.status == "FINISHED" for r in runs.values())

    capsys.readouterr()
    assert main(["report", str(dl), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out = doc.get("result", doc) if "ok" in doc else doc
    assert out["sections"] == [sid for sid, _ in SECTIONS]
    html = (dl / "report.html").read_text()
    for label in (
        "train_accuracy",
        "eval_accuracy per site",
        "sites per round",
        "bytes moved",
        "cross-site accuracy",
        "ε (epsilon) over rounds",
    ):
        assert f'aria-label="{label}"' in html, label
    recipe_section = re.search(r'<section id="recipe">(.*?)</section>', html, re.S).group(1)
    assert "central_dp" in recipe_section and "fedavg" in recipe_section
    assert "2 of 2" in html and "FINISHED" in html


def test_the_lightning_recipe_in_poc_gives_the_simulators_model(poc_ws, tmp_path) -> None:
    recipe = load_recipe(RECIPES / "lightning").recipe.with_overrides(num_rounds=2)
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    sim = recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    a, b = run.load_final(), sim.load_final()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.final_metrics == sim.final_metrics
    records = (run.result_dir / "metrics" / "tracking.jsonl").read_text()
    assert '"site": "site-2"' in records and '"tag": "train_loss"' in records
