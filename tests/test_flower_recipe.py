"""FlowerRecipe without Flower installed (issue 18): what the default suite can check of the
bridge. The app runs in fedctl's simulator and on a POC in tests_flower/ (make test-flower, in
its own virtual environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedctl.errors import RecipeError
from fedctl.recipe import FlowerRecipe, SimEnv

HERE = Path(__file__).resolve().parent.parent / "tests_flower"
APP = HERE / "app"


def test_the_job_carries_no_pickle_and_the_app_unchanged(tmp_path) -> None:
    recipe = FlowerRecipe(APP, min_clients=2)
    job = recipe.export(tmp_path / "job")
    code = job / "code"
    for rel in ("pyproject.toml", "flowerapp/client_app.py", "flowerapp/server_app.py"):
        assert (code / rel).read_bytes() == (APP / rel).read_bytes()
    assert "from fedctl.client.flower import main" in (code / "fedctl_flower_client.py").read_text()
    assert not list(job.rglob("*.pkl")) and not list(job.rglob("*.pt"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"app_dir": HERE}, "is not a Flower app: it has no pyproject.toml"),
        ({"app_dir": APP, "run_config": {"no-such-key": 1}}, "run_config sets 'no-such-key'"),
        ({"app_dir": APP, "sample_clients": 2}, "flower does not take sample_clients"),
        ({"app_dir": APP, "secure_aggregation": True}, "flower does not take secure_aggregation"),
    ],
)
def test_what_is_not_a_flower_job_is_refused(kwargs, match) -> None:
    with pytest.raises(RecipeError, match=match):
        FlowerRecipe(**kwargs)


def test_a_site_whose_policy_adds_filters_refuses_a_flower_job(tmp_path) -> None:
    clip = {"filters": [{"name": "clip_update", "max_norm": 1.0, "at": "result_out"}]}
    env = SimEnv(
        num_clients=3,
        workspace=tmp_path,
        display="none",
        backend="local",
        site_privacy={"site-2": clip},
    )
    run = FlowerRecipe(APP, min_clients=3).run(env)
    assert run.status == "FAILED"
    assert "site-2 refused: its privacy policy adds filters, which cannot run on a Flower app" in (
        run.reason
    )


def test_without_flower_installed_the_job_fails_with_one_line(tmp_path) -> None:
    try:  # the default suite's environment has no flwr (the Flower suite has its own)
        import flwr  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flwr is installed here (the Flower suite's environment)")
    env = SimEnv(num_clients=2, workspace=tmp_path, display="none", backend="local")
    run = FlowerRecipe(APP, min_clients=2).run(env)
    assert run.status == "FAILED"
    assert run.reason == (
        "Flower jobs need the flower extra where the ServerApp runs: pip install 'fedctl[flower]'"
    )
