"""Flower apps, unmodified, through fedctl (issue 18): the app of ``tests_flower/app`` (the
layout ``flwr new`` makes for PyTorch, on synthetic data) with Flower's own FedAvg and with a
custom strategy, in fedctl's simulation (Ray and in-process) and on a POC, against Flower's own
simulation engine running the same app. Runs in its own virtual environment
(``make test-flower``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HERE, free_port

from fedctl.codec.tensorfiles import load_file
from fedctl.recipe import FlowerRecipe, SimEnv

APP = HERE / "app"
#: Flower adds the replies of a round in the order they arrive (float32 sums); fedctl's order
#: differs, so models agree to float32 rounding, not bit for bit
TOLERANCE = 1e-6


def _flower(tmp_path: Path, name: str, **config: str) -> dict[str, torch.Tensor]:
    """The app's final model under Flower's own simulation engine."""
    out = tmp_path / f"{name}-flower.safetensors"
    pairs = [f"out={out}", *(f"{k}={v}" for k, v in config.items())]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HOME": str(tmp_path / "home")}
    subprocess.run(
        [sys.executable, str(HERE / "flower_reference.py"), str(APP), "4", *pairs],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=600,
    )
    return load_file(out)[0]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["fedavg", "damped"])
def test_fedctl_simulation_equals_flowers_own(tmp_path, strategy) -> None:
    expected = _flower(tmp_path, strategy, strategy=strategy)
    for backend in ("ray", "local"):
        out = tmp_path / f"{strategy}-{backend}.safetensors"
        recipe = FlowerRecipe(
            APP, min_clients=4, run_config={"out": str(out), "strategy": strategy}
        )
        env = SimEnv(num_clients=4, backend=backend, workspace=tmp_path / backend, display="none")
        run = recipe.run(env)
        assert run.ok, run.reason
        assert _close(load_file(out)[0], expected) <= TOLERANCE, backend
        assert len(run.metrics) == 3 and all(m["accepted"] == 4 for m in run.metrics)
        # context.state lives across rounds on each node (here: per-round scripts)
        assert [m["metrics"]["rounds-seen"] for m in run.metrics] == [1.0, 2.0, 3.0]
        sites = (run.result_dir / "metrics" / "sites.jsonl").read_text().splitlines()
        phases = {json.loads(s).get("phase") for s in sites}
        assert phases == {None, "evaluate"}  # Flower's evaluate messages reached the sites too


def test_poc_runs_the_app_and_keeps_what_its_server_app_writes(tmp_path) -> None:
    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    expected = _flower(tmp_path, "poc")
    ws = tmp_path / "poc"
    poc.prepare(ws, sites=[f"site-{i}" for i in range(1, 5)], port=free_port())
    poc.start(ws)
    try:
        run = FlowerRecipe(APP, min_clients=4).run(
            PocEnv(workspace=ws, display="none", results=tmp_path / "res")
        )
        assert run.ok, run.reason
        assert len(run.metrics) == 3 and all(m["accepted"] == 4 for m in run.metrics)
        # the ServerApp saved its final model in its working directory: the run's folder
        final = run.result_dir / "final_model.safetensors"
        assert _close(load_file(final)[0], expected) <= TOLERANCE
    finally:
        poc.stop(ws)
