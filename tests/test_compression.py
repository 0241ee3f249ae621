"""Compression as filters (issue 15): the codecs (fp16, bf16, int8, top-k with error feedback),
what a hostile sender's payload gets, the recipe option and its refusals, runs in simulation and
on a POC (the same model, bit for bit), and fewer bytes on the wire."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import local_sim, max_diff

from fedctl.codec.model import FLModel, ParamsType
from fedctl.errors import RecipeError
from fedctl.privacy.codecs import INDEX, META_KEY, SCALE
from fedctl.privacy.compression import RESIDUAL_FILE, Compression, job_chain
from fedctl.privacy.context import FilterContext, FilterFailed
from fedctl.recipe import load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_sim, _max_diff = local_sim, max_diff


def _trip(spec, params, base, state_dir=None, task="train", rnd=0):
    """A site's result through result_out (encode) and the server's result_in (decode)."""
    chain = job_chain(None, spec)
    model = FLModel(params=params, params_type=ParamsType.FULL, current_round=rnd)
    out_ctx = FilterContext("result_out", base=base, task=task, state_dir=state_dir, seed=0)
    wire = chain.apply("result_out", model, out_ctx)
    in_ctx = FilterContext("result_in", base=base, task=task, seed=0)
    return wire, chain.apply("result_in", wire, in_ctx)


# ---------------------------------------------------------------------- the codecs


def test_half_and_int8_stay_within_their_error_and_keep_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "n": torch.tensor(3)}
    new = {"w": base["w"] + 0.01 * torch.randn(64, 32, generator=g), "n": torch.tensor(4)}
    update = new["w"] - base["w"]
    for codec, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        wire, back = _trip({"result": codec}, new, base)
        half = torch.float16 if codec == "fp16" else torch.bfloat16
        assert wire.params["w"].dtype == half and wire.params["n"].dtype == torch.int64
        err = (back.params["w"] - new["w"]).abs().max()
        assert err <= rel * float(update.abs().max()) + 1e-7, codec
        assert back.params["w"].dtype == torch.float32 and int(back.params["n"]) == 4
        assert META_KEY not in (back.meta or {})
    wire, back = _trip({"result": "int8"}, new, base)
    assert wire.params["w"].dtype == torch.int8 and wire.params["w" + SCALE].dim() == 0
    scale = float(wire.params["w" + SCALE])
    assert scale == pytest.approx(float(update.abs().max()) / 127)
    assert float((back.params["w"] - new["w"]).abs().max()) <= scale / 2 + 1e-6
    assert set(back.params) == {"w", "n"}


def test_topk_with_error_feedback_sends_everything_eventually(tmp_path) -> None:
    """What top-k does not send is kept in the site's folder and added to the next update: the
    updates sent over rounds plus what is left equal the true updates summed."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(1000)}
    spec = {"result": {"codec": "topk", "ratio": 0.05}}
    sent_total = torch.zeros(1000)
    true_total = torch.zeros(1000)
    for rnd in range(3):
        update = torch.randn(1000, generator=g)
        true_total += update
        wire, back = _trip(spec, {"w": base["w"] + update}, base, tmp_path, rnd=rnd)
        assert wire.params["w"].numel() == 50 and wire.params["w" + INDEX].dtype == torch.int32
        sent_total += back.params["w"] - base["w"]
    from fedctl.codec.tensorfiles import load_file

    residual = load_file(tmp_path / RESIDUAL_FILE)[0]["w"]
    assert torch.allclose(sent_total + residual, true_total, atol=1e-5)
    # without feedback nothing is kept
    _trip(
        {"result": {"codec": "topk", "ratio": 0.05, "error_feedback": False}},
        {"w": base["w"] + 1},
        base,
        tmp_path / "none",
    )
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_topk_sends_dense_where_sparse_does_not_pay_and_evaluations_dense(tmp_path) -> None:
    base = {"w": torch.zeros(10)}
    wire, back = _trip(
        {"result": {"codec": "topk", "ratio": 0.9}}, {"w": torch.ones(10)}, base, tmp_path
    )
    assert "w" + INDEX not in wire.params and torch.equal(back.params["w"], torch.ones(10))
    wire, _ = _trip(
        {"result": {"codec": "topk", "ratio": 0.01}},
        {"w": torch.ones(1000) * 0},
        {"w": torch.zeros(1000)},
        tmp_path,
        task="evaluate",
    )
    assert "w" + INDEX not in wire.params  # an evaluation's model is never sparsified


def test_a_task_broadcast_decodes_on_the_site_and_results_travel_as_updates() -> None:
    chain = job_chain(None, {"task": "int8"})
    g = torch.Generator().manual_seed(2)
    model = FLModel(params={"w": torch.randn(100, generator=g)}, params_type=ParamsType.FULL)
    sctx = FilterContext("aggregate_out", task="train", seed=0)
    wire = chain.apply("aggregate_out", model, sctx)
    assert wire.params["w"].dtype == torch.int8 and sctx.unencoded is not None
    assert wire.meta[META_KEY]["nbytes"] == 400
    site = chain.apply("task_in", wire, FilterContext("task_in", seed=0))
    assert site.params["w"].dtype == torch.float32
    assert float((site.params["w"] - model.params["w"]).abs().max()) <= float(
        wire.params["w" + SCALE]
    )


# ---------------------------------------------------------------------- hostile payloads


def _wire(codec="int8"):
    base = {"w": torch.zeros(100)}
    wire, _ = _trip({"result": codec}, {"w": torch.linspace(-1, 1, 100)}, base)
    return wire, base


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p, m: m.pop(META_KEY), "has no 'fedctl.compression'"),
        (lambda p, m: m[META_KEY].update(codec="fp16"), "encoded as 'fp16'"),
        (lambda p, m: m[META_KEY].update(extra=1), "unknown keys"),
        (lambda p, m: p.update({"w::scale": torch.tensor(float("nan"))}), "finite number"),
        (lambda p, m: p.update({"w::scale": torch.ones(3)}), "one number"),
        (lambda p, m: p.update({"w": p["w"].to(torch.int32)}), "expected I8"),
        (lambda p, m: p.pop("w::scale"), "'w::scale' is missing"),
        (lambda p, m: p.update({"x::idx": torch.zeros(1, dtype=torch.int32)}), "unexpected"),
        (lambda p, m: m[META_KEY]["tensors"].update(w=["int8", "I64", "u"]), "dtype must be"),
        (lambda p, m: m[META_KEY]["tensors"].update(w=["zip", "F32", "u"]), "entry must be"),
    ],
)
def test_a_hostile_int8_result_is_refused_with_one_line(edit, match) -> None:
    wire, base = _wire()
    params, meta = dict(wire.params), json.loads(json.dumps(wire.meta))
    edit(params, meta)
    model = FLModel(params=params, params_type=ParamsType.FULL, meta=meta)
    chain = job_chain(None, {"result": "int8"})
    with pytest.raises(FilterFailed, match=match) as info:
        chain.apply("result_in", model, FilterContext("result_in", base=base, seed=0))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("idx", "values", "match"),
    [
        (torch.tensor([5, 200], dtype=torch.int32), torch.ones(2), "strictly increasing within"),
        (torch.tensor([5, 5], dtype=torch.int32), torch.ones(2), "strictly increasing"),
        (torch.tensor([-1, 3], dtype=torch.int32), torch.ones(2), "strictly increasing"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.ones(3), "the same length"),
        (torch.arange(101, dtype=torch.int32), torch.ones(101), "for a tensor of 100"),
        (torch.tensor([1.0, 2.0]), torch.ones(2), "positions is F32"),
    ],
)
def test_hostile_topk_positions_never_reach_torch(idx, values, match) -> None:
    base = {"w": torch.zeros(100)}
    meta = {META_KEY: {"codec": "topk", "version": 1, "tensors": {"w": ["topk", "F32", "u"]}}}
    model = FLModel(params={"w": values, "w::idx": idx}, params_type=ParamsType.FULL, meta=meta)
    chain = job_chain(None, {"result": {"codec": "topk", "ratio": 0.1}})
    with pytest.raises(FilterFailed, match=match):
        chain.apply("result_in", model, FilterContext("result_in", base=base, seed=0))


# ---------------------------------------------------------------------- the recipe's option


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"result": "fp61"}, "unknown codec 'fp61' \\(did you mean 'fp16'\\?\\)"),
        ({"task": {"codec": "topk"}}, "topk compresses results only"),
        ({"results": "fp16"}, "no direction 'results' \\(did you mean 'result'\\?\\)"),
        ({"result": {"codec": "topk", "ratio": 0}}, "ratio must be a number > 0"),
        ({"result": {"codec": "int8", "ratio": 0.1}}, "int8 has no argument 'ratio'"),
        ({}, "names no codec"),
        ("fp16", "must be a mapping"),
    ],
)
def test_bad_compression_specs_are_refused_with_the_reason(toy_recipe, spec, match) -> None:
    with pytest.raises(RecipeError, match=match):
        toy_recipe.with_overrides(compression=spec)


def test_compression_refuses_what_it_cannot_go_with(toy_recipe) -> None:
    with pytest.raises(RecipeError, match="does not go with secure_aggregation"):
        toy_recipe.with_overrides(secure_aggregation=True, compression={"result": "fp16"})
    toy_recipe.with_overrides(secure_aggregation=True, compression={"task": "fp16"})
    pytest.importorskip("tenseal")
    with pytest.raises(RecipeError, match="does not go with homomorphic_encryption"):
        toy_recipe.with_overrides(homomorphic_encryption=True, compression={"task": "fp16"})
    assert Compression.from_spec({"result": "bf16"}).spec() == {"result": {"codec": "bf16"}}


# ---------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    ("spec", "tolerance", "ratio"),
    [
        ({"result": "fp16", "task": "fp16"}, 1e-2, 0.55),
        ({"result": "int8", "task": "int8"}, 5e-2, 0.65),  # a 5-value model: the scale counts
        ({"result": {"codec": "topk", "ratio": 0.25}}, None, 0.80),
    ],
)
def test_a_compressed_run_is_close_to_plain_with_fewer_bytes(
    toy_recipe, tmp_path, spec, tolerance, ratio
) -> None:
    recipe = toy_recipe.with_overrides(num_rounds=3)
    plain = recipe.run(_sim(tmp_path, "plain"))
    comp = recipe.with_overrides(compression=spec).run(_sim(tmp_path, "comp"))
    assert plain.ok and comp.ok, comp.reason
    if tolerance is not None:
        assert _max_diff(comp.load_final(), plain.load_final()) < tolerance
    else:  # one value of four per round: slower, but it learns
        losses = [m["metrics"]["loss"] for m in comp.metrics]
        assert losses[-1] < 0.5 * losses[0], losses
    sent = sum(m["bytes_sent"] + m["bytes_received"] for m in comp.metrics)
    base = sum(m["bytes_sent"] + m["bytes_received"] for m in plain.metrics)
    assert sent <= ratio * base, (sent, base)


def test_topk_residuals_live_in_each_sites_folder(toy_recipe, tmp_path) -> None:
    spec = {"result": {"codec": "topk", "ratio": 0.5}}
    run = toy_recipe.with_overrides(num_rounds=2, compression=spec).run(_sim(tmp_path, "k"))
    assert run.ok, run.reason
    residuals = sorted(p.parent.name for p in run.result_dir.rglob(RESIDUAL_FILE))
    assert residuals == ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def poc_ws(tmp_path_factory):
    from conftest import free_port

    from fedctl.runtime import poc

    ws = tmp_path_factory.mktemp("poc") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    poc.start(ws)
    yield ws
    poc.stop(ws)


def test_poc_gives_the_simulations_model_bit_for_bit(poc_ws, toy_dir, tmp_path) -> None:
    from fedctl.runtime.envs import PocEnv

    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=2,
        train_args="--fail-sites site-3 --fail-rounds 1",
        compression={"result": {"codec": "topk", "ratio": 0.5}, "task": "int8"},
    )
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    sim = recipe.run(_sim(tmp_path, "sim", 3))
    assert sim.ok, sim.reason
    assert _max_diff(run.load_final(), sim.load_final()) == 0.0
    assert run.metrics[1]["failed"] == ["site-3"]
