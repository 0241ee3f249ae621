"""The simulator end to end (Ray and local backends): results, failures, determinism, state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import hugepages
import pytest
import torch

from fedctl.cli.main import main
from fedctl.errors import RecipeError
from fedctl.recipe import SimEnv, load_recipe

REPO = Path(__file__).resolve().parent.parent


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hello_pt_with_two_clients_from_the_cli(ray_cluster, tmp_path: Path, capsys) -> None:
    code = main(
        [
            "simulate",
            str(REPO / "recipes" / "hello_pt"),
            "--clients",
            "2",
            "--rounds",
            "3",
            "--workspace",
            str(tmp_path),
            "--json",
        ]
    )
    envelope = json.loads(capsys.readouterr().out)
    assert envelope["ok"] is True and envelope["error"] is None
    out = envelope["result"]
    assert code == 0 and out["status"] == "FINISHED" and out["reason"] is None
    acc = [r["metrics"]["accuracy"] for r in out["metrics"]]
    assert len(acc) == 3 and acc[-1] > acc[0]
    run_dir = Path(out["result_dir"])
    for rel in (
        "models/final.safetensors",
        "models/best.safetensors",
        "metrics/global.jsonl",
        "metrics/sites.jsonl",
        "run.log",
        "result.json",
        "job/fedctl-job.yaml",
    ):
        assert (run_dir / rel).is_file(), rel
    assert out["final_model"] == str(run_dir / "models/final.safetensors")
    sites = _lines(run_dir / "metrics/sites.jsonl")
    assert {s["site"] for s in sites} == {"site-1", "site-2"} and all(s["ok"] for s in sites)
    assert "accuracy" in (run_dir / "sites/site-1/client.log").read_text()
    assert out["resident"] is True and out["workers"] == 2


def test_sixty_four_clients_on_two_workers(ray_cluster, toy_recipe, tmp_path: Path) -> None:
    run = toy_recipe.with_overrides(num_rounds=2).run(
        SimEnv(num_clients=64, workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    assert [r["accepted"] for r in run.metrics] == [64, 64]
    assert run.extra["resident"] is False
    assert len(_lines(run.result_dir / "metrics/sites.jsonl")) == 128


@hugepages.needs_thp
def test_ray_workers_back_large_tensors_with_huge_pages(ray_cluster, toy_dir, tmp_path) -> None:
    # as the process backend's workers do (tests/test_sim_process.py)
    (toy_dir / "client.py").write_text(hugepages.CLIENT)
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2, train_args="")
    env = SimEnv(num_clients=2, backend="ray", workspace=tmp_path, display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    logs = [p.read_text() for p in run.result_dir.rglob("client.log")]
    assert hugepages.reported(logs) == ["HUGE_PAGES True"] * 4


def test_failing_client_with_enough_survivors(ray_cluster, toy_recipe, tmp_path, capsys) -> None:
    recipe = toy_recipe.with_overrides(train_args="--fail-sites site-2 --fail-rounds 1")
    run = recipe.run(SimEnv(num_clients=3, workspace=tmp_path, display="plain"))
    assert run.ok and run.rounds_completed == 3
    assert [r["accepted"] for r in run.metrics] == [3, 2, 3]
    assert run.metrics[1]["failed"] == ["site-2"]
    err = capsys.readouterr().err
    assert "site-2 failed in round 2: RuntimeError: boom at site-2 in round 1" in err
    assert 'client.py", line' in err and "raise RuntimeError" in err  # the user's traceback
    log = (run.result_dir / "run.log").read_text()
    assert "Traceback" in log and "boom at site-2" in log


def test_failing_client_without_enough_survivors(ray_cluster, toy_dir, tmp_path, capsys) -> None:
    (toy_dir / "recipe.py").write_text(
        (toy_dir / "recipe.py")
        .read_text()
        .replace("key_metric=None", 'key_metric=None, train_args="--fail-sites site-2"')
    )
    code = main(["simulate", str(toy_dir), "--clients", "2", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"FAILED: round 1: only [01] of the 2 required results", err)
    assert "site-2: RuntimeError: boom at site-2 in round 0" in err
    result = json.loads(next(tmp_path.glob("toy-*/result.json")).read_text())
    assert result["status"] == "FAILED" and "site-2" in result["reason"]
    assert result["final_model"] is None


def test_same_seed_same_model_across_backends_and_modes(ray_cluster, toy_recipe, tmp_path) -> None:
    def final(**kw) -> dict[str, torch.Tensor]:
        run = toy_recipe.run(SimEnv(workspace=tmp_path, display="none", **kw))
        assert run.ok, run.reason
        return run.load_final()

    resident = final(num_clients=4, workers=4, seed=7)
    assert _same(resident, final(num_clients=4, workers=4, seed=7))
    assert _same(resident, final(num_clients=4, workers=2, seed=7))  # per-round mode
    assert _same(resident, final(num_clients=4, backend="local", seed=7))
    assert _same(resident, final(num_clients=4, workers=2, backend="process", seed=7))
    assert _same(resident, final(num_clients=4, workers=4, backend="process", seed=7))
    assert not _same(resident, final(num_clients=4, workers=2, seed=8))


def test_diff_updates_give_the_full_model(ray_cluster, toy_recipe, tmp_path) -> None:
    env = SimEnv(num_clients=3, workspace=tmp_path, display="none")
    full = toy_recipe.run(env).load_final()
    diff = toy_recipe.with_overrides(train_args="--diff").run(env).load_final()
    for k in full:
        assert torch.allclose(full[k], diff[k], atol=1e-6)


def test_site_state_survives_rounds_in_per_round_mode(ray_cluster, toy_recipe, tmp_path) -> None:
    run = toy_recipe.with_overrides(train_args="--use-state").run(
        SimEnv(num_clients=6, workers=2, workspace=tmp_path, display="none")
    )
    assert run.ok and run.extra["resident"] is False
    counts = {
        (s["site"], s["round"]): s["metrics"]["count"]
        for s in _lines(run.result_dir / "metrics/sites.jsonl")
    }
    # rounds are numbered from 1 in the metrics files
    assert all(counts[(f"site-{i}", r)] == r for i in range(1, 7) for r in range(1, 4))
    assert (run.result_dir / "sites/site-4/state.safetensors").is_file()


@pytest.mark.parametrize("backend", ["ray", "process"])
def test_worker_death_is_a_site_failure_and_the_worker_comes_back(
    ray_cluster, backend, toy_dir, tmp_path
) -> None:
    client = toy_dir / "client.py"
    client.write_text(
        client.read_text().replace(
            "    rnd = received.current_round\n",
            "    rnd = received.current_round\n"
            "    if site == 'site-2' and rnd == 0:\n"
            "        import os\n"
            "        os._exit(3)\n",
        )
    )
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2)
    env = SimEnv(num_clients=3, workers=3, backend=backend, workspace=tmp_path, display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    assert run.metrics[0]["failed"] == ["site-2"] and run.metrics[1]["accepted"] == 3
    assert "worker process died" in (run.result_dir / "run.log").read_text()


@pytest.mark.parametrize("backend", ["ray", "process"])
def test_hung_site_is_dropped_at_the_deadline(ray_cluster, backend, toy_recipe, tmp_path) -> None:
    recipe = toy_recipe.with_overrides(
        num_rounds=1, round_timeout=12.0, train_args="--hang-sites site-3"
    )
    env = SimEnv(num_clients=3, workers=3, backend=backend, workspace=tmp_path, display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    assert run.metrics[0]["missing"] == ["site-3"] and run.metrics[0]["accepted"] == 2


def test_script_that_never_sends(toy_dir, tmp_path) -> None:
    (toy_dir / "client.py").write_text(
        "import fedctl.client as flare\nflare.init()\nflare.receive()\nprint('forgot to send')\n"
    )
    recipe = load_recipe(toy_dir).recipe
    run = recipe.run(SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none"))
    assert run.status == "FAILED"
    assert "site-1: script finished without calling send()" in (run.reason or "")


def test_missing_weight_is_warned_once_per_site(toy_recipe, tmp_path) -> None:
    run = toy_recipe.with_overrides(train_args="--no-steps").run(
        SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none")
    )
    assert run.ok
    log = (run.result_dir / "run.log").read_text()
    assert log.count("sent no meta['NUM_STEPS_CURRENT_ROUND']") == 2


@pytest.mark.parametrize("bad", [{"num_clients": 0}, {"workers": 0}, {"backend": "spark"}])
def test_bad_env_values(bad) -> None:
    from fedctl.errors import UsageError

    with pytest.raises(UsageError):
        SimEnv(**bad)


def test_the_simulator_does_not_hash_again_the_job_it_has_just_exported(
    toy_recipe, tmp_path: Path, monkeypatch
) -> None:
    """The run folder's job is written and hashed by the simulator itself, then loaded back
    with every check a server makes but the hashes (hashing them again: 0.24 s for 400 MB)."""
    from fedctl.recipe import jobfolder
    from fedctl.sim.runner import _export_job

    hashed: list[Path] = []
    real = jobfolder.sha256_file

    def counting(path):
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(jobfolder, "sha256_file", counting)
    job = _export_job(toy_recipe, tmp_path)
    model = tmp_path / "job" / jobfolder.MODEL_FILE
    assert model.is_file()
    # the code files were hashed once, as written (in the folder that became job/), not again
    assert hashed and not any(p.is_relative_to(tmp_path / "job") for p in hashed)
    assert job.to_spec() == toy_recipe.to_spec()
    # what the folder says is still checked: a spec naming a missing model is refused
    spec = tmp_path / "job" / jobfolder.JOB_SPEC
    model.unlink()
    with pytest.raises(RecipeError, match="model"):
        jobfolder.load_job(tmp_path / "job", verify=False)
    assert spec.is_file()
