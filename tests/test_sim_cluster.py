"""Joining an existing Ray cluster (``SimEnv(ray_address=...)``): slow, starts its own Ray head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")

SCRIPT = """
import json, sys
from fedctl.recipe import load_recipe, SimEnv
r = load_recipe(sys.argv[1]).recipe.with_overrides(num_rounds=2)
run = r.run(SimEnv(num_clients=3, ray_address=sys.argv[2], workspace=sys.argv[3], display="none"))
print(json.dumps({"status": run.status, "reason": run.reason}))
"""


def _run(address: str, tmp_path: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(REPO / "recipes" / "hello_pt"),
            address,
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_simulation_joins_an_existing_cluster(tmp_path) -> None:
    # A clean environment: a Ray instance of this test process may have exported RAY_* variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    start = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--port=6399",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=120)
    try:
        assert _run("auto", tmp_path, env) == {"status": "FINISHED", "reason": None}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_unreachable_cluster_fails_fast(tmp_path) -> None:
    import time

    from fedctl.recipe import SimEnv, load_recipe

    recipe = load_recipe(REPO / "recipes" / "hello_pt").recipe
    started = time.monotonic()
    run = recipe.run(
        SimEnv(num_clients=2, ray_address="127.0.0.1:1", workspace=tmp_path, display="none")
    )
    assert run.status == "FAILED" and "cannot reach the Ray cluster at 127.0.0.1:1" in run.reason
    assert time.monotonic() - started < 30
