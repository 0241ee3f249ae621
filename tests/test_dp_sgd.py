"""DP-SGD on the site (``flare.make_private``, Opacus): ε per round as Opacus's own accountant
computes it, kept across rounds in the site state, plain state_dict names, where the noise's
randomness comes from, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_client_api import FakeChannel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fedctl.client as flare
from fedctl.client import channel as ch
from fedctl.client.dp import EPSILON_METRIC, STATE_KEY
from fedctl.errors import ClientAPIError
from fedctl.recipe import SimEnv, load_recipe

pytest.importorskip("opacus")

DP_TOY = Path(__file__).resolve().parent / "dp_toy"
_spec = importlib.util.spec_from_file_location("dp_toy_model", DP_TOY / "model.py")
assert _spec is not None and _spec.loader is not None
_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_model)
Net = _model.Net  # the recipe's model, without putting its folder on sys.path

DELTA = 1e-3
BATCH = 10


def _n(site_index: int) -> int:
    return 40 + 20 * site_index  # the samples of site-(i+1) in dp_toy/client.py


def _opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    return acc.get_epsilon(delta=delta)


def _sites(run) -> list[dict]:
    lines = (run.result_dir / "metrics" / "sites.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def site():
    channel = FakeChannel([])
    ch.install(channel, thread_only=True)
    flare.init()
    yield channel
    ch.install(None, thread_only=True)
    ch.install(None)


def _data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def _private(**kw):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*_data()), batch_size=BATCH)
    args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": DELTA, **kw}
    return model, flare.make_private(model, optimizer, loader, **args)


def _epoch(private) -> None:
    for xb, yb in private.data_loader:
        private.optimizer.zero_grad()
        F.cross_entropy(private.model(xb), yb).backward()
        private.optimizer.step()


# ---------------------------------------------------------------------- in the simulator


def test_site_epsilon_per_round_is_opacus_accounting_per_round_and_resident(tmp_path) -> None:
    recipe = load_recipe(DP_TOY).recipe.with_overrides(train_args="--noise 1.1 --epochs 2")
    finals, eps = [], []
    for resident in (False, True):  # 3 sites on the local backend's one worker: per round
        run = recipe.run(
            SimEnv(
                num_clients=3,
                backend="local",
                resident=resident,
                workspace=tmp_path,
                display="none",
            )
        )
        assert run.ok, run.reason
        assert run.extra["resident"] is resident
        finals.append(run.load_final())
        records = _sites(run)
        assert len(records) == 9 and all(r["ok"] for r in records)
        for site in ("site-1", "site-2", "site-3"):
            mine = sorted((r for r in records if r["site"] == site), key=lambda r: r["round"])
            n = _n(int(site.split("-")[1]) - 1)
            q = 1 / math.ceil(n / BATCH)
            for rnd, rec in enumerate(mine):
                m = rec["metrics"]
                steps = (rnd + 1) * 2 * math.ceil(n / BATCH)  # every epoch is len(loader) steps
                assert m["dp_steps"] == steps and m["dp_sample_rate"] == pytest.approx(q)
                assert m[EPSILON_METRIC] == pytest.approx(
                    _opacus_epsilon(1.1, q, steps, DELTA), rel=1e-12
                )
            values = [r["metrics"][EPSILON_METRIC] for r in mine]
            assert values == sorted(values) and values[0] < values[-1]  # grows with rounds
        eps.append([r["metrics"][EPSILON_METRIC] for r in records])
        rounds = [r["metrics"][EPSILON_METRIC] for r in run.metrics]  # the sites' mean
        assert rounds == sorted(rounds)
    assert sorted(eps[0]) == sorted(eps[1])
    for k in finals[0]:  # same seed, same model: per-round and resident runs draw the same noise
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_epsilon_agrees_with_an_independent_accountant() -> None:
    """Opacus's RDP and Google's dp-accounting (what central DP uses) agree on DP-SGD's ε (to
    within 2%: they try different Rényi orders)."""
    import logging

    import dp_accounting
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)

    for noise, q, steps in ((1.1, 1 / 4, 24), (0.8, 1 / 6, 60), (2.0, 0.05, 500)):
        acc = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        assert _opacus_epsilon(noise, q, steps, DELTA) == pytest.approx(
            acc.get_epsilon(DELTA), rel=2e-2
        )


def test_target_epsilon_is_reached_and_not_exceeded(tmp_path) -> None:
    recipe = load_recipe(DP_TOY).recipe.with_overrides(
        train_args="--target-epsilon 3 --total-epochs 3"
    )
    run = recipe.run(SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none"))
    assert run.ok, run.reason
    last = [r["metrics"] for r in _sites(run) if r["round"] == 3]
    assert len(last) == 2
    for m in last:  # three rounds of one epoch: the budget Opacus chose the noise for
        assert 2.95 <= m[EPSILON_METRIC] <= 3.0
        assert m["dp_noise_multiplier"] > 0


def test_a_script_that_misuses_make_private_fails_its_site_with_one_line(tmp_path) -> None:
    recipe = load_recipe(DP_TOY).recipe.with_overrides(train_args="--noise -1")
    run = recipe.run(SimEnv(num_clients=2, backend="local", workspace=tmp_path, display="none"))
    assert not run.ok
    assert "make_private: noise_multiplier must be a number > 0, got -1.0" in run.reason


# ---------------------------------------------------------------------- the helper itself


def test_state_dict_keeps_the_models_own_names(site) -> None:
    model, private = _private()
    plain = list(Net().state_dict())
    assert list(private.model.state_dict()) == plain  # Opacus alone would say _module.hidden…
    assert [n for n, _ in private.model._module.named_parameters()] == plain
    new = {k: torch.full_like(v, 0.5) for k, v in Net().state_dict().items()}
    private.model.load_state_dict(new)  # the global model, as received
    assert all(torch.equal(v, new[k]) for k, v in private.model.state_dict().items())
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items())  # shared weights
    wrapped = {"_module." + k: torch.zeros_like(v) for k, v in new.items()}
    private.model.load_state_dict(wrapped)  # Opacus's own names still load
    assert all(float(v.abs().sum()) == 0 for v in model.state_dict().values())
    with pytest.raises(RuntimeError, match="Missing key"):
        private.model.load_state_dict({"hidden.weight": new["hidden.weight"]})
    _epoch(private)  # trains, and what it sends has the plain names
    assert list(private.model.state_dict()) == plain


def test_accountant_history_is_kept_in_the_site_state(site) -> None:
    _, first = _private()
    assert first.epsilon() == 0.0 and first.steps == 0
    _epoch(first)
    assert site.state[STATE_KEY] == [[1.0, 0.2, 5]]  # 50 samples, batches of 10: q = 1/5
    eps1 = first.epsilon()
    assert eps1 == pytest.approx(_opacus_epsilon(1.0, 0.2, 5, DELTA))
    # the next round of a per-round script: a new helper continues from the state
    _, second = _private()
    assert second.steps == 5 and second.epsilon() == pytest.approx(eps1)
    _epoch(second)
    assert site.state[STATE_KEY] == [[1.0, 0.2, 10]]
    assert second.epsilon() == pytest.approx(_opacus_epsilon(1.0, 0.2, 10, DELTA))
    assert second.epsilon() > eps1
    assert second.metrics() == {EPSILON_METRIC: second.epsilon()}
    assert second.epsilon(delta=1e-2) < second.epsilon()
    # a different noise multiplier later is composed, not mixed up
    _, third = _private(noise_multiplier=2.0)
    _epoch(third)
    assert site.state[STATE_KEY] == [[1.0, 0.2, 10], [2.0, 0.2, 5]]
    model, optimizer, loader = third  # unpacks like Opacus's make_private
    assert (model, optimizer, loader) == (third.model, third.optimizer, third.data_loader)


@pytest.mark.parametrize("bad", ["x", [[1.0, 0.2]], [[1.0, 2.0, 5]], [[1.0, 0.2, -1]]])
def test_a_damaged_history_in_the_state_is_refused(site, bad) -> None:
    site.state[STATE_KEY] = bad
    with pytest.raises(ClientAPIError, match="is not an accountant history"):
        _private()


def test_noise_is_reproducible_in_simulation_and_secret_on_real_sites(site) -> None:
    def one_epoch() -> dict[str, torch.Tensor]:
        _, private = _private()
        site.state.pop(STATE_KEY, None)
        torch.manual_seed(7)  # what fedctl does before a task, from the run's seed
        _epoch(private)
        return {k: v.clone() for k, v in private.model.state_dict().items()}

    _, sim = _private()
    assert sim.optimizer.generator is None  # torch's global generator, seeded by fedctl
    a, b = one_epoch(), one_epoch()
    assert all(torch.equal(a[k], b[k]) for k in a)
    site.info.mode = "production"
    _, real = _private()
    assert isinstance(real.optimizer.generator, torch.Generator)
    assert real.data_loader.batch_sampler.generator is real.optimizer.generator
    c, d = one_epoch(), one_epoch()
    assert not all(torch.equal(c[k], d[k]) for k in c)  # the job's seed does not predict it


BAD = [
    ({"noise_multiplier": None}, "give either noise_multiplier or target_epsilon"),
    ({"target_epsilon": 3.0}, "give either noise_multiplier or target_epsilon"),
    ({"noise_multiplier": None, "target_epsilon": 3.0}, "target_epsilon needs epochs"),
    ({"epochs": 3}, "epochs goes with target_epsilon"),
    ({"noise_multiplier": 0}, "noise_multiplier must be a number > 0, got 0"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier must be a number > 0"),
    ({"max_grad_norm": -1}, "max_grad_norm must be a number > 0, got -1"),
    ({"delta": 0.05}, r"delta = 0.05 is not below 1/50 \(the number of samples\)"),
    ({"delta": 1.5}, "delta must be a number > 0 and < 1"),
    ({"accountant": "gdp"}, "accountant must be one of rdp, prv, got 'gdp'"),
    (
        {"noise_multiplier": None, "target_epsilon": 1e-6, "epochs": 500},
        "no noise multiplier reaches target_epsilon 1e-06",
    ),
]


@pytest.mark.parametrize(("kw", "message"), BAD)
def test_bad_arguments_are_one_line_errors(site, kw, message) -> None:
    with pytest.raises(ClientAPIError, match=message) as info:
        _private(**kw)
    assert "\n" not in str(info.value)


def test_what_opacus_cannot_train_is_one_line(site) -> None:
    loader = DataLoader(TensorDataset(*_data()), batch_size=BATCH)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cases = [
        (bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader, "Opacus refused: .*BatchNorm"),
        (Net(), torch.optim.SGD(Net().parameters(), lr=0.1), loader, "Opacus refused: Module"),
        ("net", None, loader, "model must be a torch.nn.Module, got str"),
        (Net(), "sgd", loader, "optimizer must be a torch.optim.Optimizer, got str"),
        (Net(), None, [1, 2], "data_loader must be a torch DataLoader, got list"),
    ]
    for model, optimizer, data, message in cases:
        if optimizer is None:
            optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
        with pytest.raises(ClientAPIError, match=message) as info:
            flare.make_private(model, optimizer, data, noise_multiplier=1.0, max_grad_norm=1.0)
        assert "\n" not in str(info.value)


def test_before_init_is_a_clear_error() -> None:
    ch.install(None)
    with pytest.raises(ClientAPIError, match=r"init\(\) before make_private\(\)"):
        _private()


def test_without_the_dp_extra_one_line_says_what_to_install(site, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now fails
    with pytest.raises(ClientAPIError) as info:
        _private()
    assert str(info.value) == (
        "make_private needs Opacus, which fedctl's dp extra installs: pip install 'fedctl[dp]'"
    )


def test_importing_the_client_api_does_not_import_opacus() -> None:
    code = "import sys, fedctl.client; assert 'opacus' not in sys.modules, 'opacus imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_helpers_that_edit_gradients_refuse_a_private_model(site) -> None:
    from fedctl.codec.keys import FEDPROX_MU_KEY, SCAFFOLD_KEY

    _, private = _private(noise_multiplier=1e-6)
    # why: a gradient that does not come from the model's per-sample computation is dropped
    before = {k: v.clone() for k, v in private.model.state_dict().items()}
    x, y = _data()
    private.optimizer.zero_grad()
    loss = 0 * F.cross_entropy(private.model(x), y)
    loss = loss + 100 * sum(p.pow(2).sum() for p in private.model.parameters())
    loss.backward()
    private.optimizer.step()
    after = private.model.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)

    received = flare.FLModel(params=before, meta={FEDPROX_MU_KEY: 0.1, SCAFFOLD_KEY: True})
    with pytest.raises(ClientAPIError, match="FedProx's proximal term does not work with DP-SGD"):
        flare.proximal_term(private.model, received)
    assert flare.proximal_term(private.model, received, mu=0.0).item() == 0.0
    with pytest.raises(ClientAPIError, match="SCAFFOLD's gradient correction does not work"):
        flare.Scaffold(private.model, received, private.optimizer)
    flare.Scaffold(private.model, flare.FLModel(params=before), private.optimizer)  # inactive
