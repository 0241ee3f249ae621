"""Your own algorithm as a plugin (docs/plugins.md): recipe kinds from installed packages.

The example plugin ``recipes/fedclip-plugin`` (installed by ``make install``) provides the kind
``fedclip``; ``recipes/fedclip`` uses it. It runs in the simulator and on a POC (server, two site
agents and job processes, all finding the plugin by its entry point), and both give the same
model. A kind that is neither built in nor installed is refused by the simulator and by the
server with the same message, and a recipe class defined next to a job is refused before
anything is written. The POC part also runs the admin commands with ``--json`` on a live server
and checks their envelopes (tests/test_cli_contract.py checks them without a server).
"""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port
from test_cli_contract import check_envelope

from fedctl.cli.main import main
from fedctl.errors import RecipeError
from fedctl.recipe import FedAvgRecipe, SimEnv, load_recipe, registry
from fedctl.recipe.jobfolder import JOB_SPEC
from fedctl.runtime import poc

REPO = Path(__file__).resolve().parent.parent
FEDCLIP = REPO / "recipes" / "fedclip"


@pytest.fixture(scope="module")
def fedclip():
    """The plugin's recipe class; the plugin must be installed (``make install`` does it)."""
    try:
        cls = registry.lookup("fedclip")
    except RecipeError as exc:
        pytest.fail(f"{exc}; run `make install` (it installs recipes/fedclip-plugin)")
    return cls


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- the registry


def test_the_plugin_kind_comes_from_its_entry_point(fedclip, capsys) -> None:
    from fedctl_fedclip import FedClipRecipe

    assert fedclip is FedClipRecipe and registry.REGISTRY["fedclip"] is FedClipRecipe
    plugin = registry.PLUGINS["fedclip"]
    assert plugin.distribution == "fedctl-fedclip"
    assert plugin.target == "fedctl_fedclip:FedClipRecipe"
    assert "fedavg" not in registry.PLUGINS  # fedctl's own kinds are not plugins
    code, out, _ = _run(["recipe", "show", "fedclip", "--json"], capsys)
    entry = check_envelope(out, code, "recipe show")["result"]
    assert entry["kind"] == "fedclip" and entry["plugin"]["distribution"] == "fedctl-fedclip"
    assert "clip_norm" in [p["name"] for p in entry["parameters"]]
    code, out, _ = _run(["recipe", "list"], capsys)
    assert code == 0 and "(plugin fedctl-fedclip)" in out


def test_a_recipe_class_defined_next_to_the_job_is_refused(tmp_path, capsys) -> None:
    """What a server would refuse is refused before anything is written, with its message."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "client.py").write_text("print('hi')\n")
    (folder / "recipe.py").write_text(
        "import torch\nfrom fedctl.recipe import FedAvgRecipe\n"
        "class MyRecipe(FedAvgRecipe):\n    kind = 'mine'\n"
        "recipe = MyRecipe('mine', 1, 1, torch.nn.Linear(2, 1), 'client.py')\n"
    )
    runs = tmp_path / "runs"
    argv = ["simulate", str(folder), "--backend", "local", "--workspace", str(runs)]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err == f"error: {registry.unknown_kind('mine')}\n"
    assert err == (
        "error: unknown recipe kind 'mine': it is not built into fedctl and no installed plugin "
        "provides it (see docs/plugins.md)\n"
    )
    assert not runs.exists()  # nothing half-written
    assert "mine" not in registry.REGISTRY
    # a subclass that keeps a built-in kind would silently run the built-in class on a server
    (folder / "recipe.py").write_text(
        "import torch\nfrom fedctl.recipe import FedAvgRecipe\n"
        "class Tweaked(FedAvgRecipe):\n    pass\n"
        "recipe = Tweaked('mine', 1, 1, torch.nn.Linear(2, 1), 'client.py')\n"
    )
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "Tweaked (from fedctl_recipe) is not a recipe kind" in err
    assert "a server would run FedAvgRecipe instead" in err and "docs/plugins.md" in err
    assert not runs.exists()
    with pytest.raises(RecipeError, match="is not a recipe kind"):
        load_recipe(folder).recipe.export(tmp_path / "job")
    assert not (tmp_path / "job").exists()


def _fake_plugins(monkeypatch, *entries: tuple[str, str]) -> None:
    eps = [EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in entries]
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    monkeypatch.setattr(registry, "PLUGINS", dict(registry.PLUGINS))
    monkeypatch.setattr(registry, "BROKEN", {})
    monkeypatch.setattr(registry, "_all_loaded", False)
    monkeypatch.setattr(
        registry, "_entry_points", lambda name=None: [e for e in eps if name in (None, e.name)]
    )


def test_broken_plugins_are_named_and_do_not_break_the_rest(monkeypatch) -> None:
    _fake_plugins(
        monkeypatch,
        ("gone", "no_such_module_here:Recipe"),
        ("notrecipe", "fedctl.errors:FedctlError"),
        ("wrongname", "fedctl.recipe:FedProxRecipe"),
        ("fedavg", "fedctl.recipe:FedProxRecipe"),
    )
    with pytest.raises(RecipeError, match=r"recipe kind 'gone': plugin .* failed to load: "):
        registry.lookup("gone")
    with pytest.raises(RecipeError, match="is not a fedctl Recipe class"):
        registry.lookup("notrecipe")
    with pytest.raises(RecipeError, match="defines kind 'fedprox'; the entry point must be named"):
        registry.lookup("wrongname")
    assert registry.lookup("fedavg") is FedAvgRecipe  # a plugin cannot replace a built-in kind
    problems = registry.load_plugins()
    assert set(problems) == {"gone", "notrecipe", "wrongname", "fedavg"}
    assert "built into fedctl; ignored" in problems["fedavg"]
    with pytest.raises(RecipeError, match=r"unknown recipe kind 'other': it is not built into"):
        registry.lookup("other")


def test_server_code_is_a_loud_warning_in_simulation(toy_dir, tmp_path, capsys) -> None:
    """A production server refuses jobs with server_eval unless started with
    --allow-server-code; the simulator runs them and says so with the server's message."""
    (toy_dir / "evaluate.py").write_text("def evaluate(params, rnd):\n    return {'n': 1.0}\n")
    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=1, server_eval="evaluate.py:evaluate"
    )
    run = recipe.run(SimEnv(backend="local", display="plain", workspace=tmp_path))
    assert run.ok, run.reason
    refusal = registry.server_code_refusal(recipe)
    assert refusal == (
        "this server does not run code from jobs (server_eval='evaluate.py:evaluate'); an "
        "operator can allow it with `fedctl server start --allow-server-code`"
    )
    expected = f"a production server refuses this job: {refusal}"
    assert run.extra["warnings"] == [expected]
    assert f"warning: {expected}" in " ".join(capsys.readouterr().err.split())
    assert expected in (run.result_dir / "run.log").read_text()


# ---------------------------------------------------------------------------- the aggregator


def test_clipped_mean_clips_each_update_then_averages() -> None:
    from fedctl_fedclip import ClippedMean

    global_params = {"w": torch.zeros(2), "steps": torch.tensor(7)}
    agg = ClippedMean(global_params, clip_norm=1.0)
    agg.add({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}, 1.0)  # FULL, norm 5
    agg.add({"w": torch.tensor([0.3, 0.4])}, 3.0, "DIFF")  # norm 0.5: kept as it is
    out = agg.result()
    expected = (torch.tensor([0.6, 0.8]) * 1 + torch.tensor([0.3, 0.4]) * 3) / 4
    assert torch.allclose(out["w"], expected) and out["w"].dtype == torch.float32
    assert int(out["steps"]) == 7 and agg.clipped == 1 and agg.count == 2


# ---------------------------------------------------------------------------- simulation


def test_the_plugin_recipe_simulates(fedclip, tmp_path, capsys) -> None:
    argv = ["simulate", str(FEDCLIP), "--backend", "local", "--clients", "2", "--rounds", "1"]
    code, out, _ = _run([*argv, "--workspace", str(tmp_path), "--json"], capsys)
    run = check_envelope(out, code, "simulate")["result"]
    assert code == 0 and run["status"] == "FINISHED" and run["rounds_completed"] == 1
    spec = yaml.safe_load((Path(run["result_dir"]) / "job" / JOB_SPEC).read_text())
    assert spec["kind"] == "fedclip" and spec["args"]["clip_norm"] == 0.5
    # one round moves the model by at most clip_norm (a mean of clipped changes)
    recipe = load_recipe(FEDCLIP).recipe
    initial = recipe.initial_params()
    from fedctl.codec.tensorfiles import load_file

    final = load_file(run["final_model"])[0]
    step = torch.sqrt(sum(((final[k] - initial[k]).double() ** 2).sum() for k in initial))
    assert 0 < float(step) <= 0.5 + 1e-6


# ---------------------------------------------------------------------------- POC


@pytest.fixture(scope="module")
def poc_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("poc-plugin") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2"], port=free_port())
    poc.start(ws)
    yield ws
    poc.stop(ws)  # exactly the processes it started, by PID and start time


def test_the_plugin_recipe_runs_on_a_poc_as_in_simulation(
    fedclip, poc_ws, tmp_path, capsys
) -> None:
    base = ["--poc-workspace", str(poc_ws)]
    argv = ["submit", "job", str(FEDCLIP), "--target", "poc", *base]
    code, out, _ = _run([*argv, "--results", str(tmp_path / "r"), "--json"], capsys)
    run = check_envelope(out, code, "submit job")["result"]
    assert code == 0 and run["status"] == "FINISHED", run["reason"]
    assert [m["round"] for m in run["metrics"]] == [1, 2, 3, 4]
    sim = load_recipe(FEDCLIP).recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    from fedctl.codec.tensorfiles import load_file

    a, b = load_file(run["final_model"])[0], sim.load_final()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same job, the same model
    job_id = run["job_id"]

    # the admin commands' envelopes on a live server
    code, out, _ = _run(["job", "status", job_id, *base, "--json"], capsys)
    status = check_envelope(out, code, "job status")["result"]
    assert code == 0 and status["status"] == "FINISHED" and status["kind"] == "fedclip"
    assert status["job_id"] == job_id and status["round"] == status["num_rounds"] == 4
    code, out, _ = _run(["job", "list", *base, "--json"], capsys)
    assert job_id in [j["job_id"] for j in check_envelope(out, code, "job list")["result"]]
    code, out, _ = _run(["job", "logs", job_id, "--follow", *base, "--json"], capsys)
    logs = check_envelope(out, code, "job logs")["result"]
    assert code == 0 and logs["status"] == "FINISHED" and logs["job_id"] == job_id
    assert any("round 4 completed" in line for line in logs["lines"])
    dl = ["job", "download", job_id, "-o", str(tmp_path / "dl"), *base, "--json"]
    code, out, _ = _run(dl, capsys)
    files = check_envelope(out, code, "job download")["result"]["files"]
    assert code == 0 and "models/final.safetensors" in files
    code, out, _ = _run(["sites", *base, "--json"], capsys)
    assert code == 0 and len(check_envelope(out, code, "sites")["result"]) == 2
    code, out, _ = _run(["poc", "status", "--workspace", str(poc_ws), "--json"], capsys)
    assert code == 0 and check_envelope(out, code, "poc status")["result"]["sites"]
    code, out, _ = _run(["poc", "start", "--workspace", str(poc_ws), "--json"], capsys)
    assert code == 0 and check_envelope(out, code, "poc start")["result"]["started"] == []
    audit = Path(poc.load_info(poc_ws)["server"]) / "workspace" / "audit.jsonl"
    code, out, _ = _run(["audit", "verify", str(audit), "--json"], capsys)
    assert code == 0 and check_envelope(out, code, "audit verify")["result"]["ok"] is True
    rounds = [
        json.loads(line).get("round")
        for line in audit.read_text().splitlines()
        if json.loads(line).get("job") == job_id and "model_" in json.dumps(json.loads(line))
    ]
    assert rounds and min(r for r in rounds if r is not None) == 1  # audit rounds are 1-based


def test_a_kind_nobody_provides_gets_the_same_message_everywhere(
    fedclip, poc_ws, tmp_path, capsys
) -> None:
    job = load_recipe(FEDCLIP).recipe.export(tmp_path / "job")
    spec_path = job / JOB_SPEC
    spec_path.write_text(spec_path.read_text().replace("kind: fedclip", "kind: fedclipx"))
    message = registry.unknown_kind("fedclipx")
    code, _, err = _run(["simulate", str(job), "--backend", "local"], capsys)
    assert code == 2 and err == f"error: {message}\n"
    code, _, err = _run(["submit", "job", str(job), "--poc-workspace", str(poc_ws)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err  # the server's answer


def test_a_failed_job_fails_submit_and_logs_follow(poc_ws, toy_dir, tmp_path, capsys) -> None:
    base = ["--poc-workspace", str(poc_ws)]
    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=1, train_args="--fail-sites site-1,site-2"
    )
    job = recipe.export(tmp_path / "job")
    argv = ["submit", "job", str(job), *base, "--results", str(tmp_path / "r"), "--json"]
    code, out, err = _run(argv, capsys)
    doc = check_envelope(out, code, "submit job")
    assert code == 1 and doc["result"]["status"] == "FAILED"
    job_id = doc["result"]["job_id"]
    assert doc["error"]["message"].startswith(f"job {job_id} FAILED: ")
    assert err.startswith(f"error: job {job_id} FAILED: ")
    code, out, err = _run(["job", "logs", job_id, "--follow", *base], capsys)
    assert code == 1 and "RuntimeError: boom at site-" in out
    assert err.startswith(f"error: job {job_id} FAILED")
    code, out, _ = _run(["job", "abort", job_id, *base, "--json"], capsys)
    aborted = check_envelope(out, code, "job abort")
    assert code == 1 and "already FAILED" in aborted["error"]["message"]
    code, out, _ = _run(["submit", "job", str(job), *base, "--detach", "--json"], capsys)
    detached = check_envelope(out, code, "submit job")["result"]
    assert code == 0 and detached["status"] == "SUBMITTED" and detached["job_id"] != job_id
