"""Homomorphic encryption in fedctl's runtimes (issue 14): FedAvg rounds whose chosen
parameters travel and are summed as CKKS ciphertexts, in the simulator and on a POC; what is
refused; hostile sites; ``fedctl he decrypt``.

The HE library itself (contexts, ciphertext framing, sums, bounds) is tested in test_he.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from conftest import local_sim, max_diff

pytest.importorskip("tenseal")

from fedctl.constants import MAX_BLOB_BYTES, MIN_RESULT_LIMIT, result_limit
from fedctl.errors import RecipeError
from fedctl.privacy.he import load_context
from fedctl.privacy.he import model as he_model
from fedctl.recipe import SimEnv, load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_sim, _max_diff = local_sim, max_diff


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from fedctl.cli.main import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _run_context(run):
    return load_context(
        (run.result_dir / "he" / "he_context.secret").read_bytes(), need_secret=True
    )


@pytest.mark.parametrize("args", ["", "--diff"])
def test_a_simulated_run_equals_fedavg_and_the_server_holds_only_ciphertexts(
    toy_recipe, tmp_path, args
) -> None:
    """Same recipe and seed with and without HE: the decrypted final model is FedAvg's (within
    CKKS's error); every model the server kept holds ciphertexts, not weights."""
    recipe = toy_recipe.with_overrides(num_rounds=3, train_args=args)
    plain = recipe.run(_sim(tmp_path, "plain"))
    he = recipe.with_overrides(homomorphic_encryption=True).run(_sim(tmp_path, "he"))
    assert plain.ok and he.ok, he.reason
    final = he.load_final()
    assert set(final) == {"fc.weight", "fc.bias", he_model.HE_MODEL_KEY}
    assert all(t.dtype == torch.uint8 for t in final.values())
    ctx = _run_context(he)
    assert _max_diff(he_model.open_params(final, ctx), plain.load_final()) < 1e-6
    secret = he.result_dir / "he" / "he_context.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    from fedctl.codec.tensorfiles import load_file

    for path in (he.result_dir / "models").glob("*.safetensors"):
        kept = load_file(path)[0]
        assert all(t.dtype == torch.uint8 for t in kept.values()), path.name
    assert [m["accepted"] for m in he.metrics] == [3, 3, 3]
    assert he.metrics[0]["metrics"]["loss"] == pytest.approx(plain.metrics[0]["metrics"]["loss"])


def test_the_ray_backend_with_per_round_scripts(toy_recipe, tmp_path, ray_cluster) -> None:
    """Ray workers decrypt the global model and encrypt results as the local backend does,
    with scripts that start again each round (more sites than workers)."""
    recipe = toy_recipe.with_overrides(num_rounds=2, min_clients=3)
    plain = recipe.run(_sim(tmp_path, "plain", 5))
    env = SimEnv(
        num_clients=5, workers=2, resident=False, workspace=tmp_path / "ray", display="none"
    )
    he = recipe.with_overrides(homomorphic_encryption=True).run(env)
    assert he.ok, he.reason
    decrypted = he_model.open_params(he.load_final(), _run_context(he))
    assert _max_diff(decrypted, plain.load_final()) < 1e-6


def test_evaluation_results_of_an_he_job_carry_no_plain_model(
    toy_recipe, tmp_path, monkeypatch
) -> None:
    """The toy script sends its trained weights for every task: for an evaluation of an HE
    job the site's runtime drops them (the server must never receive a plain model)."""
    from fedctl.workflows.fedavg import FedAvg

    seen = []
    real = FedAvg.samples_of

    def spy(self, ctx, result):
        seen.append(result.model.params)
        return real(self, ctx, result)

    monkeypatch.setattr(FedAvg, "samples_of", spy)
    run = toy_recipe.with_overrides(
        num_rounds=2, federated_eval=True, homomorphic_encryption=True
    ).run(_sim(tmp_path, "he"))
    assert run.ok, run.reason
    assert len(seen) == 6 and all(p is None for p in seen)
    assert "eval_loss" in run.metrics[1]["metrics"]


def test_chosen_parameters_only_are_encrypted(toy_recipe, tmp_path) -> None:
    recipe = toy_recipe.with_overrides(num_rounds=2)
    plain = recipe.run(_sim(tmp_path, "plain"))
    he = recipe.with_overrides(homomorphic_encryption={"keys": ["fc.bias"]}).run(
        _sim(tmp_path, "he")
    )
    assert he.ok, he.reason
    final = he.load_final()
    assert final["fc.bias"].dtype == torch.uint8 and final["fc.weight"].dtype == torch.float32
    description = he_model.extract(final)[1]
    assert description is not None and list(description["tensors"]) == ["fc.bias"]
    decrypted = he_model.open_params(final, _run_context(he))
    assert _max_diff(decrypted, plain.load_final()) < 1e-6


def test_a_resumed_run_reads_its_encrypted_checkpoint(toy_recipe, tmp_path) -> None:
    """The global model describes itself: a run that resumes from an encrypted checkpoint goes
    on encrypting the same parameters."""
    from fedctl.codec.tensorfiles import load_file
    from fedctl.workflows.he import HERounds, HomomorphicEncryption

    he = toy_recipe.with_overrides(num_rounds=1, homomorphic_encryption=True).run(
        _sim(tmp_path, "he")
    )
    assert he.ok, he.reason

    class Ctx:
        he_public = (he.result_dir / "he" / "he_context.public").read_bytes()

    rounds = HERounds(HomomorphicEncryption(("fc.weight",)), Ctx())  # type: ignore[arg-type]
    rounds.prepare(load_file(he.result_dir / "models" / "final.safetensors")[0])
    assert rounds.keys == ["fc.bias", "fc.weight"] or rounds.keys == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"aggregator": "median"}, "robust aggregator"),
        ({"central_dp": {"noise_multiplier": 1, "clip": 1}}, "central_dp"),
        ({"secure_aggregation": True}, "secure_aggregation"),
        ({"privacy": [{"name": "clip_update", "max_norm": 1, "at": "result_in"}]}, "filters"),
        ({"cross_site_eval": True}, "cross_site_eval"),
        ({"homomorphic_encryption": {"keys": ["fc.weigth"]}}, "did you mean 'fc.weight'"),
        ({"homomorphic_encryption": {"keys": "fc.weight"}}, "non-empty list"),
        ({"homomorphic_encryption": {"key": ["fc.weight"]}}, "must be true or"),
    ],
)
def test_what_cannot_go_with_homomorphic_encryption_is_refused(toy_recipe, changes, match):
    changes = {"homomorphic_encryption": True, **changes}
    with pytest.raises(RecipeError, match=match):
        toy_recipe.with_overrides(**changes)


def test_workflows_that_change_the_aggregate_refuse_it(tmp_path) -> None:
    from fedctl.recipe import FedAvgMRecipe, FedProxRecipe
    from fedctl.workflows.fedavgm import FedAvgM

    model = {"w": torch.zeros(2)}
    (tmp_path / "client.py").write_text("")
    with pytest.raises(RecipeError, match="fedavgm does not support homomorphic_encryption"):
        FedAvgMRecipe("s", 2, 1, model, "client.py", base_dir=tmp_path, homomorphic_encryption=True)
    with pytest.raises(ValueError, match="FedAvgM changes the aggregate"):
        FedAvgM(1, 2, homomorphic_encryption=True)
    FedProxRecipe("s", 2, 1, model, "client.py", base_dir=tmp_path, homomorphic_encryption=True)


def test_a_site_that_sends_plain_or_misweighted_updates_fails_only_itself(
    toy_recipe, tmp_path, monkeypatch
) -> None:
    real = he_model.seal_result

    def hostile(model, keys, base, ctx):
        site = Path.cwd().name
        if site == "site-2":
            return model  # its update in the clear
        sealed = real(model, keys, base, ctx)
        if site == "site-3":
            sealed.meta["he"]["divisor"] = 1000.0  # claims another weight than it sent
        return sealed

    monkeypatch.setattr(he_model, "seal_result", hostile)
    run = toy_recipe.with_overrides(num_rounds=1, homomorphic_encryption=True).run(
        _sim(tmp_path, "hostile", 4)
    )
    assert run.ok, run.reason
    assert sorted(run.metrics[0]["failed"]) == ["site-2", "site-3"]
    assert run.metrics[0]["accepted"] == 2
    log = (run.result_dir / "run.log").read_text()
    assert "site-2 failed round 1: update rejected: HE description: missing" in log
    assert "site-3 failed round 1: update rejected: the update was encrypted with weight" in log


def test_a_site_whose_result_cannot_be_encrypted_fails_with_the_reason(toy_recipe, tmp_path):
    run = toy_recipe.with_overrides(
        num_rounds=1,
        min_clients=1,
        homomorphic_encryption=True,
        train_args="--evil-sites site-2 --evil weight:-3",
    ).run(_sim(tmp_path, "bad", 3))
    assert run.ok, run.reason
    assert run.metrics[0]["failed"] == ["site-2"]
    assert (
        "homomorphic encryption: weight must be within" in (run.result_dir / "run.log").read_text()
    )


def test_a_site_policy_can_require_homomorphic_encryption(toy_recipe, tmp_path) -> None:
    strict = {"require": {"homomorphic_encryption": True}}
    policies = {"site-1": strict, "site-2": strict}
    run = toy_recipe.run(_sim(tmp_path, "plain", 3, site_privacy=policies))
    assert run.status == "FAILED"
    assert "site-1 refused: its privacy policy requires homomorphic encryption" in run.reason
    run = toy_recipe.with_overrides(num_rounds=1, homomorphic_encryption=True).run(
        _sim(tmp_path, "he", 3, site_privacy=policies)
    )
    assert run.ok, run.reason


def test_result_limits_follow_what_the_workflow_asks_within_bounds() -> None:
    assert result_limit(None, 100 * 2**20) == 400 * 2**20
    assert result_limit(None, 1) == MIN_RESULT_LIMIT
    assert result_limit(1500 * 2**20, 100 * 2**20) == 1500 * 2**20
    assert result_limit(2**50, 1) == MAX_BLOB_BYTES
    assert result_limit(True, 100 * 2**20) == 400 * 2**20  # not a size


def test_he_decrypt_command(toy_recipe, tmp_path, capsys) -> None:
    he = toy_recipe.with_overrides(num_rounds=1, homomorphic_encryption=True).run(
        _sim(tmp_path, "he")
    )
    final = he.result_dir / "models" / "final.safetensors"
    context = he.result_dir / "he" / "he_context.secret"
    out = tmp_path / "plain.safetensors"
    code, stdout, _ = _cli(
        ["he", "decrypt", str(final), "--context", str(context), "-o", str(out), "--json"], capsys
    )
    assert code == 0, stdout
    assert json.loads(stdout)["result"]["decrypted"] == ["fc.bias", "fc.weight"]
    from fedctl.codec.tensorfiles import load_file

    plain = load_file(out)[0]
    assert plain["fc.weight"].dtype == torch.float32 and plain.keys() == {"fc.weight", "fc.bias"}
    code, _, err = _cli(["he", "decrypt", str(out), "--context", str(context), "-o", "x"], capsys)
    assert code == 2 and "holds no encrypted parameters" in err
    public = he.result_dir / "he" / "he_context.public"
    code, _, err = _cli(["he", "decrypt", str(final), "--context", str(public), "-o", "x"], capsys)
    assert code == 2 and "no secret key" in err
    code, _, err = _cli(["he", "decrypt", str(final), "-o", "x"], capsys)
    assert code == 2 and "exactly one of --kit and --context" in err
    code, _, err = _cli(
        ["he", "decrypt", str(tmp_path / "nope"), "--context", str(context)], capsys
    )
    assert code == 2  # -o missing: a usage error


# ---------------------------------------------------------------------- on a POC


@pytest.fixture(scope="module")
def he_poc(tmp_path_factory):
    from conftest import free_port

    from fedctl.runtime import poc

    ws = tmp_path_factory.mktemp("hepoc") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port(), he=True)
    for site in ("site-1", "site-2", "site-3"):
        poc.start(ws, site=site)
    yield ws
    poc.stop(ws)


def test_poc_round_trip_matches_the_simulation_and_sites_audit_encryption(
    he_poc, toy_dir, tmp_path, capsys
) -> None:
    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=2,
        train_args="--fail-sites site-3 --fail-rounds 1",
        homomorphic_encryption=True,
        federated_eval=True,
    )
    run = recipe.run(PocEnv(workspace=he_poc, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    sim = recipe.run(_sim(tmp_path, "sim", 3))
    assert sim.ok, sim.reason
    info = poc.load_info(he_poc)
    site_kit = Path(info["sites"]["site-1"])
    final = run.result_dir / "models" / "final.safetensors"
    out = tmp_path / "plain.safetensors"
    code, _, err = _cli(
        ["he", "decrypt", str(final), "--kit", str(site_kit), "-o", str(out)], capsys
    )
    assert code == 0, err
    from fedctl.codec.tensorfiles import load_file

    decrypted = load_file(out)[0]
    assert _max_diff(decrypted, he_model.open_params(sim.load_final(), _run_context(sim))) < 1e-6
    assert run.metrics[1]["failed"] == ["site-3"] and run.metrics[1]["accepted"] == 2
    assert "eval_loss" in run.metrics[1]["metrics"]  # sites decrypt evaluation tasks too
    for site in ("site-1", "site-2"):
        kit = Path(info["sites"][site])
        records = [
            json.loads(x) for x in (kit / "workspace" / "audit.jsonl").read_text().splitlines()
        ]
        sent = [r for r in records if r["event"] == "model_sent" and r.get("job") == run.job_id]
        # one encrypted result per training round; evaluations send metrics only
        assert [r["filters"] for r in sent] == [["homomorphic_encryption"]] * 2
    # the server's kit holds only the public context
    server_kit = Path(info["server"])
    assert not list(server_kit.rglob("he_context.secret"))
    code, _, err = _cli(["he", "decrypt", str(final), "--kit", str(server_kit), "-o", "x"], capsys)
    assert code == 2 and "no secret key" in err


def test_a_project_without_he_fails_the_job_with_the_reason(poc_ws_plain, toy_dir, tmp_path):
    from fedctl.runtime.envs import PocEnv

    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=1, homomorphic_encryption=True)
    run = recipe.run(PocEnv(workspace=poc_ws_plain, display="none", results=tmp_path / "p"))
    assert run.status == "FAILED"
    assert "this server has no HE context" in run.reason


@pytest.fixture(scope="module")
def poc_ws_plain(tmp_path_factory):
    from conftest import free_port

    from fedctl.runtime import poc

    ws = tmp_path_factory.mktemp("plainpoc") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2"], port=free_port())
    poc.start(ws)
    yield ws
    poc.stop(ws)
