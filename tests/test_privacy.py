"""Privacy filters, central DP and its accountant, site policies: unit level and simulation.
The POC side (a site's policy refusing a job, an invalid policy, filters in the audit trail)
is in test_runtime.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedctl.codec.model import FLModel, ParamsType
from fedctl.errors import ConfigError, RecipeError
from fedctl.privacy import CentralDP, FilterChain, FilterContext, FilterError, epsilon
from fedctl.privacy.filters import parse_filter
from fedctl.privacy.policy import REQUIREMENTS, PrivacyPolicy
from fedctl.recipe import SimEnv


def _model(params, kind="FULL", steps=1) -> FLModel:
    return FLModel(params_type=kind, params=params, meta={"NUM_STEPS_CURRENT_ROUND": steps})


def _norm(params) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in params.values()))


# ---------------------------------------------------------------------- filters, unit level


def test_clip_update_bounds_the_update_not_the_weights() -> None:
    g = {"w": torch.full((100,), 5.0), "b": torch.zeros(3)}
    x = {
        "w": g["w"] + torch.randn(100, generator=torch.Generator().manual_seed(0)),
        "b": torch.ones(3),
    }
    chain = FilterChain.from_specs([{"name": "clip_update", "max_norm": 0.5}])
    ctx = FilterContext("result_out", base=g, seed=1)
    out = chain.apply("result_out", _model(x), ctx)
    update = {k: out.params[k] - g[k] for k in g}
    assert _norm(update) == pytest.approx(0.5, rel=1e-5)
    direction = {k: x[k] - g[k] for k in g}  # same direction, shorter
    cos = sum(float((update[k] * direction[k]).sum()) for k in g) / (
        _norm(update) * _norm(direction)
    )
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert ctx.notes == [
        {
            "filter": "clip_update",
            "norm": pytest.approx(_norm(direction), rel=1e-5),
            "clipped": True,
        }
    ]
    small = {k: g[k] + 0.001 for k in g}  # within the norm: untouched, bit for bit
    assert (
        chain.apply("result_out", _model(small), FilterContext("result_out", base=g))
        .params["w"]
        .equal(small["w"])
    )
    diff = chain.apply("result_out", _model(direction, "DIFF"), FilterContext("result_out"))
    assert _norm(dict(diff.params)) == pytest.approx(0.5, rel=1e-5)


def test_gaussian_noise_has_the_requested_spread_and_is_reproducible_only_with_a_seed() -> None:
    zeros = {"w": torch.zeros(400_000), "step": torch.tensor(7)}
    chain = FilterChain.from_specs([{"name": "gaussian_noise", "sigma": 0.3}])
    out = chain.apply("result_out", _model(zeros, "DIFF"), FilterContext("result_out", seed=5))
    w = out.params["w"]
    assert float(w.std()) == pytest.approx(0.3, rel=0.01)
    assert abs(float(w.mean())) < 0.003
    assert torch.equal(out.params["step"], torch.tensor(7))  # integers are not noised
    assert torch.equal(w, out.params["w"])  # read twice (a lazy map): the same noise
    again = chain.apply("result_out", _model(zeros, "DIFF"), FilterContext("result_out", seed=5))
    assert torch.equal(again.params["w"], w)
    secret = [
        chain.apply("result_out", _model(zeros, "DIFF"), FilterContext("result_out")).params["w"]
        for _ in range(2)
    ]
    assert not torch.equal(secret[0], secret[1])  # no seed: unpredictable


def test_exclude_vars_drops_matching_parameters() -> None:
    chain = FilterChain.from_specs([{"name": "exclude_vars", "patterns": ["head.*", "*.bias"]}])
    params = {
        "body.weight": torch.ones(2),
        "body.bias": torch.ones(2),
        "head.weight": torch.ones(2),
    }
    out = chain.apply("result_out", _model(params), FilterContext("result_out"))
    assert list(out.params) == ["body.weight"]


def test_percentile_privacy_shares_only_the_largest_values_clipped() -> None:
    g = {"w": torch.zeros(1000)}
    x = {"w": torch.linspace(-1, 1, 1000) / 100}  # |update| spread uniformly
    chain = FilterChain.from_specs(
        [{"name": "percentile_privacy", "percentile": 90, "gamma": 0.005}]
    )
    out = chain.apply("result_out", _model(x, steps=2), FilterContext("result_out", base=g))
    w = out.params["w"]
    shared = w != 0
    assert int(shared.sum()) == pytest.approx(100, abs=2)  # the top 10 %
    assert float(w.abs().max()) <= 0.005 * 2 + 1e-9  # clipped per step, times the steps
    assert bool((x["w"][shared].abs() >= x["w"][~shared].abs().max()).all())


def test_svt_privacy_releases_the_requested_fraction() -> None:
    g = {"a": torch.zeros(300), "b": torch.zeros(200, 2)}
    x = {
        "a": torch.randn(300, generator=torch.Generator().manual_seed(1)) * 1e-4,
        "b": torch.randn(200, 2, generator=torch.Generator().manual_seed(2)) * 1e-4,
    }
    chain = FilterChain.from_specs([{"name": "svt_privacy", "fraction": 0.2, "gamma": 1e-4}])
    out = chain.apply("result_out", _model(x), FilterContext("result_out", base=g, seed=3))
    released = sum(int((out.params[k] != 0).sum()) for k in g)
    assert released == 140  # ceil(0.2 × 700)
    assert max(float(out.params[k].abs().max()) for k in g) <= 1e-4 + 1e-12
    assert out.params["b"].shape == (200, 2)


def test_quantize_rounds_each_tensor_to_the_levels() -> None:
    x = {"w": torch.linspace(0, 1, 1001)}
    out = FilterChain.from_specs([{"name": "quantize", "bits": 2}]).apply(
        "result_out", _model(x, "DIFF"), FilterContext("result_out")
    )
    assert sorted(set(out.params["w"].tolist())) == pytest.approx([0, 1 / 3, 2 / 3, 1])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "gausian_noise", "sigma": 1},
            "unknown filter 'gausian_noise' (did you mean 'gaussian_noise'?)",
        ),
        ({"name": "clip_update"}, "missing 1 required positional argument: 'max_norm'"),
        ({"name": "clip_update", "max_norm": -1}, "max_norm must be a number > 0"),
        ({"name": "clip_update", "max_norm": 1, "colour": 2}, "has no argument 'colour'"),
        (
            {"name": "clip_update", "max_norm": 1, "at": "aggregate_out"},
            "runs at result_out, result_in",
        ),
        ({"name": "exclude_vars", "patterns": []}, "non-empty list"),
        ({"name": "gaussian_noise", "sigma": float("nan")}, "not a JSON number"),
        (42, "a filter is a name or a mapping"),
    ],
)
def test_bad_filter_specs_are_one_line_errors(spec, message) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter(spec, "privacy[0]")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_recipes_validate_their_privacy_and_central_dp(toy_recipe) -> None:
    with pytest.raises(RecipeError, match="unknown filter 'noise'"):
        toy_recipe.with_overrides(privacy=[{"name": "noise"}])
    with pytest.raises(RecipeError, match="central_dp needs 'clip'"):
        toy_recipe.with_overrides(central_dp={"noise_multiplier": 1.0})
    with pytest.raises(RecipeError, match="takes no robust aggregator"):
        toy_recipe.with_overrides(
            min_clients=3, aggregator="median", central_dp={"noise_multiplier": 1, "clip": 1}
        )
    from fedctl.recipe import ScaffoldRecipe

    with pytest.raises(RecipeError, match="scaffold does not support central_dp"):
        ScaffoldRecipe(
            **{**toy_recipe.to_spec(), "central_dp": {"noise_multiplier": 1, "clip": 1}},
            model=toy_recipe.model,
            base_dir=toy_recipe.base_dir,
        )


# ---------------------------------------------------------------------- the accountant


@pytest.mark.parametrize(("z", "rounds", "sampled", "sites"), [(1.1, 20, 10, 100), (2.0, 5, 4, 4)])
def test_epsilon_is_dp_accountings(z, rounds, sampled, sites) -> None:
    dp = CentralDP(noise_multiplier=z, clip=1.0, delta=1e-5)
    q = sampled / sites
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    assert epsilon(dp, rounds, sampled, sites) == pytest.approx(accountant.get_epsilon(1e-5))


# ---------------------------------------------------------------------- simulation


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_clipping_bounds_how_far_each_round_moves_the_model(toy_recipe, tmp_path) -> None:
    recipe = toy_recipe.with_overrides(
        num_rounds=3, train_args="--lr 0.5", privacy=[{"name": "clip_update", "max_norm": 0.05}]
    )
    env = SimEnv(
        num_clients=3, backend="local", workspace=tmp_path, display="none", checkpoint=True
    )
    run = recipe.run(env)
    assert run.ok, run.reason
    models = [toy_recipe.initial_params()]
    plain = toy_recipe.with_overrides(num_rounds=3, train_args="--lr 0.5").run(env).load_final()
    final = run.load_final()
    # a mean of updates of norm ≤ 0.05 moves the model ≤ 0.05 per round
    assert _norm({k: final[k] - models[0][k] for k in final}) <= 3 * 0.05 + 1e-6
    assert _norm({k: plain[k] - models[0][k] for k in plain}) > 3 * 0.05  # it mattered


def test_exclude_vars_keeps_a_parameter_on_the_sites(toy_recipe, tmp_path) -> None:
    recipe = toy_recipe.with_overrides(privacy=[{"name": "exclude_vars", "patterns": ["fc.bias"]}])
    run = recipe.run(SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none"))
    assert run.ok, run.reason
    final, initial = run.load_final(), toy_recipe.initial_params()
    assert torch.equal(final["fc.bias"], initial["fc.bias"])  # nobody sent it
    assert not torch.equal(final["fc.weight"], initial["fc.weight"])


def test_central_dp_reports_epsilon_and_stops_at_the_budget(toy_recipe, tmp_path) -> None:
    dp = {"noise_multiplier": 1.0, "clip": 0.1, "delta": 1e-3, "target_epsilon": 6.0}
    recipe = toy_recipe.with_overrides(num_rounds=20, central_dp=dp)
    run = recipe.run(SimEnv(num_clients=4, backend="local", workspace=tmp_path, display="none"))
    assert run.ok, run.reason
    config = CentralDP(**dp)
    k = run.rounds_completed
    assert 0 < k < 20
    assert epsilon(config, k, 4, 4) <= 6.0 < epsilon(config, k + 1, 4, 4)
    eps = [r["metrics"]["dp_epsilon"] for r in run.metrics]
    assert eps == [pytest.approx(epsilon(config, r + 1, 4, 4)) for r in range(k)]
    assert run.extra["privacy"]["epsilon"] == pytest.approx(eps[-1])
    result = json.loads((run.result_dir / "result.json").read_text())
    assert result["privacy"]["rounds"] == k and result["privacy"]["delta"] == 1e-3
    assert "privacy budget reached: round" in (run.result_dir / "run.log").read_text()


def test_central_dp_noise_matches_sigma_over_the_expected_sites(toy_recipe, tmp_path) -> None:
    """With updates that are exactly zero, the new model minus the old is pure DP noise of
    standard deviation z·C/m."""
    from fedctl.privacy.dp import DPAggregator

    g = {"w": torch.zeros(200_000)}
    agg = DPAggregator(
        g, clip=2.0, noise_multiplier=1.5, expected=4, ctx=FilterContext("central_dp", seed=9)
    )
    for _ in range(4):
        agg.add({"w": torch.zeros(200_000)}, 1.0, ParamsType.FULL)
    out = agg.result()["w"]
    assert float(out.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    big = DPAggregator(g, clip=2.0, noise_multiplier=0.0, expected=2, ctx=FilterContext("x"))
    big.add({"w": torch.full((200_000,), 1.0)}, 1.0)  # norm 447: clipped to 2
    assert _norm(big.result()) == pytest.approx(2.0 / 2, rel=1e-6)


def test_adaptive_clipping_follows_the_update_norms(toy_recipe, tmp_path) -> None:
    dp = {
        "noise_multiplier": 0.1,
        "clip": 100.0,
        "adaptive": True,
        "count_stddev": 1.0,
        "delta": 1e-3,
        "clip_lr": 0.5,
    }
    run = toy_recipe.with_overrides(num_rounds=6, central_dp=dp).run(
        SimEnv(num_clients=4, backend="local", workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    clips = [r["metrics"]["dp_clip"] for r in run.metrics]
    assert clips[0] == 100.0 and clips[-1] < clips[0] / 2  # moves down towards the norms


def test_site_policies_in_the_simulator(toy_recipe, tmp_path) -> None:
    policy = {
        "filters": [{"name": "exclude_vars", "patterns": ["fc.bias"]}],
        "require": {"min_clients": 2},
    }
    run = toy_recipe.run(
        SimEnv(
            num_clients=3,
            backend="local",
            workspace=tmp_path,
            display="none",
            site_privacy={"site-1": policy},
        )
    )
    assert run.ok and "refused" not in run.extra
    strict = {"require": {"central_dp": True}}
    run = toy_recipe.run(
        SimEnv(
            num_clients=3,
            backend="local",
            workspace=tmp_path,
            display="none",
            site_privacy={"site-1": strict, "site-2": strict},
        )
    )
    assert run.status == "FAILED"
    assert run.reason == (
        "the job needs 2 sites but 1 take part (site-1 refused: its privacy policy requires "
        "central DP (central_dp) and the job has none; site-2 refused: its privacy policy "
        "requires central DP (central_dp) and the job has none)"
    )


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"filters": [{"name": "gausian_noise"}]}, "filters[0]: unknown filter 'gausian_noise'"),
        ({"require": {"max_epsilon": -1}}, "require.max_epsilon: must be a number > 0"),
        ({"require": {"dp": True}}, "unknown requirement 'dp'"),
        (
            {"filters": [{"name": "gaussian_noise", "sigma": 1, "at": "result_in"}]},
            "a site's filters run where the site is",
        ),
        ({"outgoing": [{"type": "gaussian_dp"}]}, "old template whose filters never ran"),
    ],
)
def test_bad_policies_are_refused_with_the_key(policy, message) -> None:
    with pytest.raises(ConfigError) as err:
        PrivacyPolicy.from_data(policy, "site-1/local/privacy.yaml")
    assert message in str(err.value) and "site-1/local/privacy.yaml" in str(err.value)


def test_max_epsilon_requirement_uses_the_jobs_budget(toy_recipe) -> None:
    policy = PrivacyPolicy.from_data({"require": {"max_epsilon": 5}})
    args = toy_recipe.to_spec()
    assert "has no central DP" in policy.check_job(args, 4)
    within = {**args, "central_dp": {"noise_multiplier": 1.0, "clip": 1.0, "target_epsilon": 4}}
    assert policy.check_job(within, 4) is None
    over = {**args, "central_dp": {"noise_multiplier": 0.3, "clip": 1.0}}  # 3 rounds, no target
    assert "(projected)" in policy.check_job(over, 4)


def test_the_kit_template_is_a_valid_policy_and_so_are_its_examples() -> None:
    import yaml

    from fedctl.provision.policy import privacy_yaml

    text = privacy_yaml("site-1")
    assert not PrivacyPolicy.from_data(yaml.safe_load(text)).filters
    examples = text.replace("filters: []", "filters:").replace("require: {}", "require:")
    examples = "\n".join(
        line.replace("#  ", "  ", 1) if line.startswith("#  ") else line
        for line in examples.splitlines()
    )
    policy = PrivacyPolicy.from_data(yaml.safe_load(examples))
    assert [f.name for f in policy.filters.at("result_out")] == [
        "exclude_vars",
        "clip_update",
        "gaussian_noise",
    ]
    assert set(policy.require) == set(REQUIREMENTS)  # every requirement has its example
