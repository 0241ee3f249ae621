"""Secure aggregation in fedctl's runtimes (issue 14): the site side, the FedAvg rounds in the
simulator and on a POC, dropouts, distributed DP, and what is refused.

The protocol itself (Shamir, masks, the state machines, attacks) is tested in test_secagg.py.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import pytest
import torch
from conftest import local_sim, max_diff

from fedctl.codec.model import FLModel, ParamsType
from fedctl.errors import RecipeError
from fedctl.privacy.secagg import SecAggClient, SecAggConfig, SecAggError, SecAggServer
from fedctl.privacy.secagg.keys import INPUT, MASKED, META, strip_private, wants_input
from fedctl.privacy.secagg.site import SimulatedIdentity, SiteSecAgg
from fedctl.privacy.secagg.vector import InputSpec
from fedctl.recipe import SimEnv, load_recipe
from fedctl.workflows.secure import SecureAggregation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _sim(tmp_path: Path, name: str, n: int = 4, **kw) -> SimEnv:
    return local_sim(tmp_path, name, n, **kw)


_max_diff = max_diff


# ---------------------------------------------------------------------- the site's side


def _session(n: int = 3, tmp: Path | None = None):
    ids = {f"site-{i}": SimulatedIdentity(f"site-{i}", 7) for i in range(1, n + 1)}
    sites = {p: SiteSecAgg(ident, tmp / p, seed=11) for p, ident in ids.items()} if tmp else {}
    return ids, sites


def test_a_party_survives_being_saved_between_rounds() -> None:
    ids, _ = _session()
    config = SecAggConfig("s", 5, 1.0, 20)
    parties = {p: SecAggClient(p, config, i.sign, i.verifier({})) for p, i in sorted(ids.items())}
    server = SecAggServer(config)

    def reload(p: str) -> SecAggClient:
        data = json.loads(json.dumps(parties[p].export_state()))  # through a file's JSON
        parties[p] = SecAggClient.restore(data, ids[p].sign, ids[p].verifier({}))
        return parties[p]

    for p in parties:
        server.receive_advertisement(reload(p).advertise())
    request = server.share_keys_request()
    for p in parties:
        server.receive_shares(reload(p).share_keys(request))
    inputs = {p: torch.full((5,), 0.1 * i) for i, p in enumerate(parties)}
    for p, req in server.masked_input_requests().items():
        server.receive_masked_input(reload(p).masked_input(req, inputs[p]))
    request = server.consistency_request()
    for p in parties:
        server.receive_confirmation(reload(p).confirm(request))
    request = server.unmask_request()
    for p in parties:
        server.receive_unmask(reload(p).unmask(request))
    assert torch.allclose(server.result(), sum(inputs.values()).double(), atol=1e-5)
    damaged = parties["site-1"].export_state()
    damaged["c_sk"] = "not base64!"
    with pytest.raises(SecAggError, match="restoring a party"):
        SecAggClient.restore(damaged, ids["site-1"].sign, ids["site-1"].verifier({}))
    with pytest.raises(SecAggError, match="damaged state"):
        SecAggClient.restore({"config": {}}, ids["site-1"].sign, ids["site-1"].verifier({}))


def test_simulated_identities_sign_for_themselves_only() -> None:
    a, b = SimulatedIdentity("site-1", 1), SimulatedIdentity("site-2", 1)
    verify = a.verifier({})
    assert verify("site-1", b"m", a.sign(b"m")) and verify("site-2", b"m", b.sign(b"m"))
    assert not verify("site-2", b"m", a.sign(b"m"))  # site-1 cannot speak for site-2
    assert not SimulatedIdentity("site-1", 2).verifier({})("site-1", b"m", a.sign(b"m"))


def test_site_state_is_private_and_removed_when_the_session_ends(tmp_path) -> None:
    _, sites = _session(3, tmp_path)
    config = SecAggConfig("job:round-1", 3, 1.0, 20, consistency_check=False)
    server = SecAggServer(config)
    start = {"kind": "secagg/start", "session": config.session, "config": config.public()}
    for p, site in sites.items():
        server.receive_advertisement(site.handle({META: start})[META])
        (state,) = (tmp_path / p).iterdir()
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
    request = server.share_keys_request()
    for site in sites.values():
        server.receive_shares(site.handle({META: request, "secagg_certs": {}})[META])
    spec = InputSpec(("w",), (2,), clip=1.0)
    base = {"w": torch.zeros(2)}
    for p, req in server.masked_input_requests().items():
        model = FLModel(params={"w": torch.tensor([0.5, -0.25])}, params_type=ParamsType.FULL)
        meta = {META: req, INPUT: spec.public()}
        out, _ = sites[p].masked_result(model, meta, base)
        assert set(out.params) == {MASKED} and out.params[MASKED].dtype == torch.int64
        assert set(out.meta) == {META} and "masked" not in out.meta[META]
        server.receive_masked_input({**out.meta[META], "masked": out.params[MASKED]})
    request = server.unmask_request()
    for site in sites.values():
        server.receive_unmask(site.handle({META: request})[META])
    mean, weights = spec.mean_update(server.result(), {"w": torch.Size([2])}, None)
    assert weights == 3 and torch.allclose(mean["w"], torch.tensor([0.5, -0.25]).double())
    assert not [f for p in sites for f in (tmp_path / p).iterdir()]  # the secrets are gone
    with pytest.raises(SecAggError, match="no state for session"):
        sites["site-1"].handle({META: request})
    with pytest.raises(SecAggError, match="unknown secure-aggregation message"):
        sites["site-1"].handle({META: {"kind": "secagg/nope", "session": "x"}})


def test_the_script_never_sees_the_protocol(tmp_path) -> None:
    meta = {META: {"x": 1}, INPUT: {}, "secagg_certs": {}, "lr": 0.1}
    assert wants_input(meta) and not wants_input({"lr": 0.1}) and not wants_input(None)
    assert strip_private(meta) == {"lr": 0.1}


def test_input_vector_clipping_noise_and_weights() -> None:
    base = {"a": torch.zeros(3), "b": torch.ones(2)}
    model = FLModel(
        params={"a": torch.tensor([20.0, -0.5, 0.25]), "b": torch.tensor([1.5, 0.0])},
        meta={"NUM_STEPS_CURRENT_ROUND": 5},
    )
    spec = InputSpec(("a", "b"), (3, 2), clip=8.0, max_weight=10)
    vec, notes = spec.site_input(model, base, None)
    assert notes["clipped"] == 1 and spec.weight_of(model) == 0.5
    expected = torch.tensor([8.0, -0.5, 0.25, 0.5, -1.0]) * 0.5 / 8.0
    assert torch.allclose(vec[:-1], expected.double()) and float(vec[-1]) == 0.5
    # a DIFF result is the update itself; no NUM_STEPS_CURRENT_ROUND weighs 1 (of max_weight 10)
    diff = FLModel(params={"a": torch.ones(3), "b": torch.ones(2)}, params_type=ParamsType.DIFF)
    assert torch.allclose(
        spec.site_input(diff, None, None)[0][:-1], torch.full((5,), 0.1 / 8.0).double()
    )
    with pytest.raises(SecAggError, match="has no 'b'"):
        spec.site_input(FLModel(params={"a": torch.zeros(3)}), base, None)
    with pytest.raises(SecAggError, match="NaN"):
        spec.site_input(
            FLModel(params={"a": torch.full((3,), math.nan), "b": torch.ones(2)}), base, None
        )
    with pytest.raises(SecAggError, match="NUM_STEPS"):
        spec.site_input(
            FLModel(params=model.params, meta={"NUM_STEPS_CURRENT_ROUND": -1}), base, None
        )
    # distributed DP: L2 clip, then Gaussian noise of the asked standard deviation
    big = {"a": torch.zeros(200_000)}
    dp = InputSpec(("a",), (200_000,), clip=1.0, l2=True, noise_std=0.01)
    g = torch.Generator().manual_seed(0)
    vec, notes = dp.site_input(FLModel(params={"a": torch.full((200_000,), 0.5)}), big, g)
    values = vec[:-1] * dp.bound  # weight 1
    assert notes["norm"] == pytest.approx(0.5 * math.sqrt(200_000))
    noise = values - 1.0 / math.sqrt(200_000)
    assert float(noise.std()) == pytest.approx(0.01, rel=0.02) and abs(float(noise.mean())) < 1e-4


def test_settings_are_validated_with_one_line() -> None:
    assert SecureAggregation.from_spec(True) == SecureAggregation()
    assert SecureAggregation.from_spec(None) is None and SecureAggregation.from_spec(False) is None
    for spec, match in [
        ({"clip": 0}, "clip must be a number > 0"),
        ({"bits": 60}, "bits must be an integer in 1..52"),
        ({"neighbours": 3}, "neighbours must be an even number"),
        ({"threshold": 1}, "threshold must be an integer ≥ 2"),
        ({"clipp": 1}, "no setting 'clipp'"),
        ("yes", "must be true or a mapping"),
    ]:
        with pytest.raises(SecAggError, match=match):
            SecureAggregation.from_spec(spec)


# ---------------------------------------------------------------------- in the simulator


def test_secure_fedavg_equals_fedavg_within_the_quantization_error(toy_recipe, tmp_path) -> None:
    """Weighted by steps (max_weight) and in per-round mode (5 sites on 2 workers): the final
    model is FedAvg's up to rounding, and the run reports who took part."""
    plain = toy_recipe.run(_sim(tmp_path, "plain", 5, workers=2))
    secure = toy_recipe.with_overrides(
        secure_aggregation={"max_weight": 10, "clip": 4.0, "bits": 36}
    ).run(_sim(tmp_path, "secure", 5, workers=2))
    assert plain.ok and secure.ok, secure.reason
    assert _max_diff(plain.load_final(), secure.load_final()) < 1e-6
    assert [m["accepted"] for m in secure.metrics] == [5, 5, 5]
    assert secure.metrics[-1]["metrics"]["loss"] > 0
    sites = (secure.result_dir / "sites").iterdir()
    assert not [f for s in sites for f in s.iterdir() if f.name.startswith("secagg-")]


def test_uniform_weights_and_the_ray_backend(toy_recipe, tmp_path, ray_cluster) -> None:
    env = SimEnv(num_clients=3, workspace=tmp_path / "ray", display="none")
    run = toy_recipe.with_overrides(num_rounds=2, secure_aggregation=True).run(env)
    local = toy_recipe.with_overrides(num_rounds=2, secure_aggregation=True).run(
        _sim(tmp_path, "local", 3)
    )
    assert run.ok and local.ok, run.reason
    assert _max_diff(run.load_final(), local.load_final()) == 0.0  # same seed, same model


@pytest.mark.parametrize(("n", "failing"), [(4, "site-2"), (10, "site-2,site-5,site-9")])
def test_sites_that_drop_after_sharing_keys_are_recovered(toy_recipe, tmp_path, n, failing):
    """Sites that fail while training (after the key exchange: 1 of 4, then 30% of 10) drop
    out of the round; the others' sum is still unmasked, and equals FedAvg without them."""
    args = f"--fail-sites {failing} --fail-rounds 1"
    plain = toy_recipe.with_overrides(train_args=args).run(_sim(tmp_path, "plain", n))
    secure = toy_recipe.with_overrides(
        train_args=args, secure_aggregation={"max_weight": 10, "bits": 36}
    ).run(_sim(tmp_path, "secure", n))
    assert plain.ok and secure.ok, secure.reason
    dropped = failing.split(",")
    first = secure.metrics[1]
    assert first["accepted"] == n - len(dropped) and sorted(first["failed"]) == sorted(dropped)
    assert _max_diff(plain.load_final(), secure.load_final()) < 1e-6


def test_fewer_survivors_than_the_threshold_fail_the_round_with_the_reason(toy_recipe, tmp_path):
    recipe = toy_recipe.with_overrides(
        min_clients=1,
        train_args="--fail-sites site-2,site-3,site-4 --fail-rounds 0",
        secure_aggregation={"threshold": 3},
    )
    run = recipe.run(_sim(tmp_path, "few", 4))
    assert run.status == "FAILED"
    assert "round 1: secure aggregation: " in run.reason and "threshold" in run.reason


def test_distributed_dp_accounts_like_central_dp(toy_recipe, tmp_path) -> None:
    dp = {"noise_multiplier": 1.0, "clip": 0.5, "delta": 1e-2}
    central = toy_recipe.with_overrides(num_rounds=2, central_dp=dp).run(_sim(tmp_path, "c"))
    distributed = toy_recipe.with_overrides(
        num_rounds=2, central_dp=dp, secure_aggregation=True
    ).run(_sim(tmp_path, "d"))
    assert central.ok and distributed.ok, distributed.reason
    eps = [m["metrics"]["dp_epsilon"] for m in distributed.metrics]
    assert eps == [m["metrics"]["dp_epsilon"] for m in central.metrics] and eps[0] < eps[1]
    privacy = json.loads((distributed.result_dir / "privacy.json").read_text())
    assert privacy["mechanism"].startswith("DP-FedAvg (distributed noise")
    # each site's share: z·C/√min_clients, so any min_clients survivors carry z·C
    assert privacy["noise_per_site"] == pytest.approx(1.0 * 0.5 / math.sqrt(2))
    noiseless = toy_recipe.with_overrides(num_rounds=2, secure_aggregation=True).run(
        _sim(tmp_path, "n")
    )
    assert _max_diff(noiseless.load_final(), distributed.load_final()) > 1e-3


def test_a_site_that_sends_its_update_in_the_clear_fails_only_itself(
    toy_recipe, tmp_path, monkeypatch
) -> None:
    """A hostile or broken site runtime that sends plain params, or speaks for another site,
    is dropped from the round; the others' sum is still unmasked."""
    real = SiteSecAgg.masked_result

    def hostile(self, model, task_meta, base, generator=None):
        out, notes = real(self, model, task_meta, base, generator)
        if self.identity.name == "site-2":
            return model, notes  # the update itself, not masked
        if self.identity.name == "site-3":
            out.meta["secagg"]["party"] = "site-1"
        return out, notes

    monkeypatch.setattr(SiteSecAgg, "masked_result", hostile)
    run = toy_recipe.with_overrides(num_rounds=1, secure_aggregation=True).run(
        _sim(tmp_path, "hostile", 5)
    )
    assert run.ok, run.reason
    failed = run.metrics[0]["failed"]
    assert sorted(failed) == ["site-2", "site-3"] and run.metrics[0]["accepted"] == 3
    log = (run.result_dir / "run.log").read_text()
    assert "site-2 failed round 1: update rejected: the answer carries no secure-agg" in log
    assert "site-3 failed round 1: update rejected: the answer speaks for 'site-1'" in log


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"aggregator": "median"}, "no robust aggregator"),
        ({"cross_site_eval": True}, "cross_site_eval"),
        ({"privacy": [{"name": "clip_update", "max_norm": 1, "at": "result_in"}]}, "result_in"),
        (
            {"central_dp": {"noise_multiplier": 1, "clip": 1, "adaptive": True}},
            "adaptive clipping",
        ),
        ({"secure_aggregation": {"bits": 0}}, "bits must be"),
    ],
)
def test_what_cannot_go_with_secure_aggregation_is_refused(toy_recipe, changes, match) -> None:
    changes = {"secure_aggregation": True, **changes}
    with pytest.raises(RecipeError, match=match):
        toy_recipe.with_overrides(**changes)


def test_workflows_that_are_not_a_plain_mean_refuse_it(tmp_path) -> None:
    from fedctl.recipe import ScaffoldRecipe

    torch.manual_seed(0)
    model = {"w": torch.zeros(2)}
    (tmp_path / "client.py").write_text("")
    with pytest.raises(RecipeError, match="scaffold does not support secure_aggregation"):
        ScaffoldRecipe("s", 2, 1, model, "client.py", base_dir=tmp_path, secure_aggregation=True)


# ---------------------------------------------------------------------- on a POC


@pytest.fixture(scope="module")
def poc_ws(tmp_path_factory):
    from conftest import free_port

    from fedctl.runtime import poc

    ws = tmp_path_factory.mktemp("poc") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    for site in ("site-1", "site-2", "site-3"):
        poc.start(ws, site=site)
    yield ws
    poc.stop(ws)


def test_poc_gives_the_simulations_model_and_the_sites_audit_each_step(
    poc_ws, toy_dir, tmp_path
) -> None:
    """Same recipe, same seed: the POC's final model is the simulation's, bit for bit; a
    site that fails while training is recovered; the server's files hold no site's update."""
    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=2,
        train_args="--fail-sites site-3 --fail-rounds 1",
        secure_aggregation={"max_weight": 10},
    )
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    sim = recipe.run(_sim(tmp_path, "sim", 3))
    assert sim.ok, sim.reason
    assert _max_diff(run.load_final(), sim.load_final()) == 0.0
    assert run.metrics[1]["failed"] == ["site-3"] and run.metrics[1]["accepted"] == 2
    for site in ("site-1", "site-2", "site-3"):
        kit = Path(poc.load_info(poc_ws)["sites"][site])
        records = [
            json.loads(x) for x in (kit / "workspace" / "audit.jsonl").read_text().splitlines()
        ]
        steps = [
            r["step"]
            for r in records
            if r["event"] == "secure_aggregation" and r.get("job") == run.job_id
        ]
        assert steps[:2] == ["secagg/start", "secagg/share_keys"]
        sent = [r for r in records if r["event"] == "model_sent"]
        assert all(r["filters"] == ["secure_aggregation"] for r in sent)
        assert not list((kit / "workspace" / "jobs" / run.job_id / "secagg").glob("*.json"))


def test_kit_identities_accept_project_sites_only(poc_ws) -> None:
    from fedctl.provision.kit import load_kit
    from fedctl.runtime import poc
    from fedctl.runtime.identity import KitIdentity

    info = poc.load_info(poc_ws)
    one = KitIdentity(load_kit(info["sites"]["site-1"]))
    two = KitIdentity(load_kit(info["sites"]["site-2"]))
    certs = {"site-1": one.certificate(), "site-2": two.certificate()}
    verify = two.verifier(certs)
    assert verify("site-1", b"keys", one.sign(b"keys"))
    assert not verify("site-2", b"keys", one.sign(b"keys"))  # site-1 cannot speak for site-2
    assert not two.verifier({"site-2": certs["site-1"]})("site-2", b"k", one.sign(b"k"))
    assert not verify("site-3", b"keys", one.sign(b"keys"))  # no certificate relayed
    admin = load_kit(poc.admin_kit(poc_ws))  # a valid certificate of the project, not a site's
    admin_pem = admin.cert_path.read_text()
    from fedctl.provision import certs

    key = certs.load_key(admin.key_path.read_bytes())
    signed = certs.sign_bytes(key, b"k")
    assert not two.verifier({admin.name: admin_pem})(admin.name, b"k", signed)


def test_a_site_policy_can_require_secure_aggregation(toy_recipe, tmp_path) -> None:
    from fedctl.errors import ConfigError
    from fedctl.privacy.policy import PrivacyPolicy

    strict = {"require": {"secure_aggregation": True}}
    policies = {"site-1": strict, "site-2": strict}
    run = toy_recipe.run(_sim(tmp_path, "plain", 3, site_privacy=policies))
    assert run.status == "FAILED"
    assert "site-1 refused: its privacy policy requires secure aggregation" in run.reason
    run = toy_recipe.with_overrides(num_rounds=1, secure_aggregation=True).run(
        _sim(tmp_path, "secure", 3, site_privacy=policies)
    )
    assert run.ok and "refused" not in run.extra
    with pytest.raises(ConfigError, match="require.secure_aggregation: must be true or false"):
        PrivacyPolicy.from_data({"require": {"secure_aggregation": "yes"}})
