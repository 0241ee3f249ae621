"""Hostile and faulty input that must stay one site's or one job's failure (issue 11), in the
simulator and at the unit level. The POC side is in test_runtime.py and test_hardening.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from hostile_results import hostile_bytes

from fedctl.cli.main import main
from fedctl.codec import tensors as tc
from fedctl.errors import CodecError, RecipeError
from fedctl.recipe import SimEnv, load_job, load_recipe


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_weight_that_would_overflow_the_sum_fails_only_its_site(toy_recipe, tmp_path) -> None:
    recipe = toy_recipe.with_overrides(
        min_clients=1, train_args="--evil-sites site-2 --evil weight:1.7e308"
    )
    run = recipe.run(SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none"))
    assert run.ok, run.reason
    assert [(r["accepted"], r["failed"]) for r in run.metrics] == [(1, ["site-2"])] * 3
    log = (run.result_dir / "run.log").read_text()
    assert log.count("aggregation weight must be a finite number ≤ 1e+12, got 1.7e+308") == 3
    final = run.load_final()
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_nan_metrics_are_recorded_as_null_with_one_warning(toy_recipe, tmp_path) -> None:
    run = toy_recipe.with_overrides(train_args="--nan-loss").run(
        SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    sites = _lines(run.result_dir / "metrics/sites.jsonl")
    assert all(s["metrics"]["loss"] is None for s in sites)
    assert "loss" not in run.metrics[0]["metrics"]  # nothing to average
    log = (run.result_dir / "sites/site-1/client.log").read_text()
    assert log.count("metric 'loss' is nan; it is recorded as null") == 1  # once per site


@pytest.mark.parametrize("field", ["round_timeout", "wait_after_min"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_timeouts_are_refused(toy_recipe, field, value) -> None:
    with pytest.raises(RecipeError, match=field):
        toy_recipe.with_overrides(**{field: value})


def test_a_self_sharing_task_meta_is_refused_at_once(toy_recipe) -> None:
    bomb: list = [1] * 8
    for _ in range(25):
        bomb = [bomb] * 8  # 8**25 values in a few kilobytes
    started = time.monotonic()
    with pytest.raises(RecipeError, match="task_meta"):
        toy_recipe.with_overrides(task_meta={"x": bomb})
    assert time.monotonic() - started < 5


def _job(recipe, tmp_path: Path) -> Path:
    return recipe.export(tmp_path / "job")


def test_a_yaml_bomb_in_a_job_spec_is_refused(toy_recipe, tmp_path, capsys) -> None:
    job = _job(toy_recipe, tmp_path)
    spec = job / "fedctl-job.yaml"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    text = spec.read_text().replace("task_meta: {}", "task_meta:\n  bomb: *i")
    spec.write_text("\n".join(lines) + "\n" + text)
    started = time.monotonic()
    code = main(["simulate", str(job), "--workspace", str(tmp_path / "runs")])
    assert code == 2 and time.monotonic() - started < 5
    assert "anchors and aliases are not allowed" in capsys.readouterr().err


def test_a_job_carrying_a_pickle_is_refused_and_never_unpickled(
    toy_recipe, tmp_path, monkeypatch, capsys
) -> None:
    job = _job(toy_recipe, tmp_path)
    model = job / "model" / "initial.pt"
    torch.save(toy_recipe.initial_params(), model)
    (job / "model" / "initial.safetensors").unlink()
    spec = yaml.safe_load((job / "fedctl-job.yaml").read_text())
    spec["model"] = "model/initial.pt"
    spec["files"] = {k: v for k, v in spec["files"].items() if not k.startswith("model/")}
    from fedctl._fs import sha256_file

    spec["files"]["model/initial.pt"] = sha256_file(model)
    (job / "fedctl-job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    def never(*a, **k):
        raise AssertionError("torch.load was called on a job's file")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(RecipeError, match="model must be a .safetensors file"):
        load_job(job)
    assert main(["simulate", str(job), "--workspace", str(tmp_path / "runs")]) == 2
    assert "model must be a .safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["deep", "bigint", "overflow"])
def test_a_job_whose_model_is_hostile_is_refused_when_loaded(toy_dir, tmp_path, mode) -> None:
    job = _job(load_recipe(toy_dir).recipe, tmp_path)
    model = job / "model" / "initial.safetensors"
    model.write_bytes(hostile_bytes(mode))
    spec = yaml.safe_load((job / "fedctl-job.yaml").read_text())
    from fedctl._fs import sha256_file

    spec["files"]["model/initial.safetensors"] = sha256_file(model)
    (job / "fedctl-job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(RecipeError, match="not a valid tensor file"):
        load_job(job)


@pytest.mark.parametrize("mode", ["deep", "bigint", "overflow"])
def test_hostile_tensor_headers_are_codec_errors(toy_dir, mode) -> None:
    data = hostile_bytes(mode)
    with pytest.raises(CodecError):
        tc.decode(data)
    stream = tc.StreamDecoder(lambda name, t: None)
    with pytest.raises(CodecError):
        for i in range(0, len(data), 1000):
            stream.feed(data[i : i + 1000])
        stream.finish()


def test_stream_decoder_refuses_an_empty_header_instead_of_spinning() -> None:
    stream = tc.StreamDecoder(lambda name, t: None)
    started = time.monotonic()
    with pytest.raises(CodecError, match="not valid JSON"):
        stream.feed(b"\x00" * 8 + b"{}")
    assert time.monotonic() - started < 1
