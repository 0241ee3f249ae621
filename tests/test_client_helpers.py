"""Client helpers: FedProx's proximal term, SCAFFOLD's correction and control variates,
personalization (local parameters kept in the site state), the kept local model."""

from __future__ import annotations

import pytest
import torch
from test_client_api import FakeChannel
from torch import nn

import fedctl.client as flare
from fedctl.client import channel as ch
from fedctl.client.scaffold import STATE_PREFIX
from fedctl.codec.keys import (
    FEDPROX_MU_KEY,
    PERSONAL_KEY,
    SCAFFOLD_C_PREFIX,
    SCAFFOLD_DC_PREFIX,
    SCAFFOLD_KEY,
)
from fedctl.codec.model import FLModel
from fedctl.errors import ClientAPIError


@pytest.fixture
def site():
    channel = FakeChannel([])
    ch.install(channel, thread_only=True)
    flare.init()
    yield channel
    ch.install(None, thread_only=True)
    ch.install(None)


def _linear(w: list[float], b: float) -> nn.Linear:
    m = nn.Linear(len(w), 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.fill_(b)
    return m


def test_proximal_term_value_and_gradient() -> None:
    model = _linear([1.0, 2.0], 0.5)
    received = FLModel(
        params={"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([1.5])},
        meta={FEDPROX_MU_KEY: 0.2},
    )
    term = flare.proximal_term(model, received)
    # (0.2 / 2) · ((1-0)² + (2-1)² + (0.5-1.5)²) = 0.3
    assert term.item() == pytest.approx(0.3)
    term.backward()
    assert torch.allclose(model.weight.grad, torch.tensor([[0.2, 0.2]]))  # mu · (w - w_g)
    assert torch.allclose(model.bias.grad, torch.tensor([-0.2]))
    assert flare.proximal_term(model, FLModel(params=received.params)).item() == 0.0  # no mu
    assert flare.proximal_term(model, received.params, mu=2.0).item() == pytest.approx(3.0)
    with pytest.raises(ClientAPIError, match="pass mu="):
        flare.proximal_term(model, received.params)


def _sgd_round(model, received, scaffold, optimizer, steps: int, x, y) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x).squeeze(1) - y) ** 2).mean().backward()
        scaffold.correct()
        optimizer.step()


def test_scaffold_corrects_gradients_and_keeps_its_control_variate(site) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 2), torch.randn(8)
    model = _linear([0.0, 0.0], 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = {"weight": torch.tensor([[0.5, -0.5]]), "bias": torch.tensor([0.1])}
    c = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([-1.0])}
    received = FLModel(
        params={**g, **{SCAFFOLD_C_PREFIX + k: v for k, v in c.items()}},
        meta={SCAFFOLD_KEY: True},
    )
    scaffold = flare.Scaffold(model, received, opt)
    assert set(received.params) == {"weight", "bias"}  # c was taken out: the model loads
    model.load_state_dict(received.params)

    # one step by hand: the gradient gets + c - c_i (c_i = 0 on the first round)
    opt.zero_grad()
    ((model(x).squeeze(1) - y) ** 2).mean().backward()
    raw = model.weight.grad.clone()
    scaffold.correct()
    assert torch.allclose(model.weight.grad, raw + c["weight"])
    opt.step()
    _sgd_round(model, received, scaffold, opt, 3, x, y)

    sent = scaffold.update(flare.FLModel(params=model.state_dict()))
    y_w = model.weight.detach()
    expected_ci = -c["weight"] + (g["weight"] - y_w) / (4 * 0.1)  # c_i - c + (x - y) / (K·lr)
    assert torch.allclose(site.state[STATE_PREFIX + "weight"], expected_ci, atol=1e-6)
    assert torch.allclose(sent.params[SCAFFOLD_DC_PREFIX + "weight"], expected_ci, atol=1e-6)
    assert set(sent.params) == {"weight", "bias", "scaffold.dc:weight", "scaffold.dc:bias"}

    # next round: c_i comes back from the site state and enters the correction
    received2 = FLModel(params={**g}, meta={SCAFFOLD_KEY: True})
    s2 = flare.Scaffold(model, received2, opt)
    model.load_state_dict(received2.params)
    opt.zero_grad()
    ((model(x).squeeze(1) - y) ** 2).mean().backward()
    raw = model.weight.grad.clone()
    s2.correct()
    assert torch.allclose(model.weight.grad, raw - expected_ci, atol=1e-6)  # c = 0 now


def test_scaffold_is_a_no_op_under_other_recipes(site) -> None:
    model = _linear([0.0, 0.0], 0.0)
    received = FLModel(params={k: v.clone() for k, v in model.state_dict().items()})
    s = flare.Scaffold(model, received, torch.optim.SGD(model.parameters(), lr=0.1))
    s.correct()
    sent = flare.FLModel(params=model.state_dict())
    assert s.update(sent) is sent and set(sent.params) == {"weight", "bias"}
    assert len(site.state) == 0
    with pytest.raises(ClientAPIError, match="needs the local optimizer"):
        flare.Scaffold(model, FLModel(params={}, meta={SCAFFOLD_KEY: True}))


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def test_personalize_keeps_local_parameters_in_the_site_state(site) -> None:
    torch.manual_seed(0)
    model = BNNet()
    spec = {"fedbn": True, "shared": None, "local": ["head.*"]}
    global1 = {k: v.clone() for k, v in BNNet().state_dict().items()}
    pz = flare.personalize(model, FLModel(params=global1, meta={PERSONAL_KEY: spec}))
    assert pz.local == {
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "head.weight",
        "head.bias",
    }
    model.train()
    model(torch.randn(16, 3) * 5 + 2)  # moves the running statistics
    with torch.no_grad():
        model.head.weight.add_(1.0)
    local_values = {k: v.clone() for k, v in model.state_dict().items() if k in pz.local}
    shared = pz.shared()
    assert set(shared) == {"fc.weight", "fc.bias"}

    # next round: a new global model; local entries come back from the site state
    global2 = {k: v + 10 for k, v in global1.items()}
    fresh = BNNet()
    flare.personalize(fresh, FLModel(params=global2, meta={PERSONAL_KEY: spec}))
    for k, v in fresh.state_dict().items():
        expected = local_values[k] if k in local_values else global2[k]
        assert torch.equal(v, expected), k

    # without personalization meta it is a plain load_state_dict
    plain = flare.personalize(fresh, FLModel(params=global1))
    assert plain.local == set() and set(plain.shared()) == set(global1)


def test_keep_local_model(site) -> None:
    assert flare.local_model() is None
    model = _linear([1.0, 2.0], 3.0)
    flare.keep_local_model(model)
    kept = flare.local_model()
    assert kept is not None and torch.equal(kept["weight"], torch.tensor([[1.0, 2.0]]))
    flare.keep_local_model({"other": torch.zeros(1)})
    assert set(flare.local_model()) == {"other"}


def test_receive_sets_the_control_variate_aside_so_the_model_loads() -> None:
    from fedctl.codec.model import Task

    model = _linear([0.0, 0.0], 0.0)
    params = {
        **{k: v.clone() for k, v in model.state_dict().items()},
        SCAFFOLD_C_PREFIX + "weight": torch.ones(1, 2),
        SCAFFOLD_C_PREFIX + "bias": torch.ones(1),
    }
    task = Task("train", FLModel(params=params, meta={SCAFFOLD_KEY: True}, current_round=1))
    channel = FakeChannel([task])
    ch.install(channel, thread_only=True)
    try:
        flare.init()
        received = flare.receive()
        model.load_state_dict(received.params)  # no unexpected keys
        assert set(received.optimizer_params) == {"scaffold.c:weight", "scaffold.c:bias"}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        s = flare.Scaffold(model, received, opt)
        assert torch.equal(s.c["weight"], torch.ones(1, 2))
        model(torch.ones(1, 2)).sum().backward()
        s.correct()
        assert torch.allclose(model.weight.grad, torch.ones(1, 2) + torch.ones(1, 2))
    finally:
        ch.install(None, thread_only=True)
        ch.install(None)
