"""``flare.build_model``: a model built without torch.nn.init's random initialisation, guarded
until the received weights are loaded into it."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import fedctl.client as flare
from fedctl.errors import ClientAPIError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)
        self.register_buffer("steps", torch.arange(3))  # not an initialiser's: built as usual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return Net().state_dict()


def test_the_initialisers_are_skipped_and_the_loaded_model_is_the_usual_one() -> None:
    weights = _weights()
    before = torch.get_rng_state()
    model = flare.build_model(Net)
    assert torch.equal(torch.get_rng_state(), before)  # nothing random was drawn
    assert torch.equal(model.steps, torch.arange(3))
    model.load_state_dict(weights)
    usual = Net()
    usual.load_state_dict(weights)
    x = torch.randn(4, 8)
    assert torch.equal(model(x), usual(x))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks  # the guard is gone once every tensor was loaded


def test_attention_layers_skip_theirs_too() -> None:
    """nn.MultiheadAttention imports its initialisers by name; they are skipped as well."""
    before = torch.get_rng_state()
    model = flare.build_model(nn.TransformerEncoderLayer, 8, 2, dim_feedforward=16)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ClientAPIError, match="has no value yet"):
        model(torch.zeros(1, 3, 8))
    assert nn.modules.activation.xavier_uniform_ is nn.init.xavier_uniform_  # restored


def test_arguments_reach_the_factory() -> None:
    model = flare.build_model(nn.Linear, 5, out_features=2, bias=False)
    assert model.weight.shape == (2, 5) and model.bias is None


@pytest.mark.parametrize("use", ["forward", "state_dict"])
def test_using_the_model_before_loading_is_refused(use: str) -> None:
    model = flare.build_model(Net)
    with pytest.raises(ClientAPIError, match=r"'fc1.bias' has no value yet; load the received"):
        model(torch.zeros(1, 8)) if use == "forward" else model.state_dict()


def test_a_partial_load_leaves_the_rest_guarded() -> None:
    weights = _weights()
    model = flare.build_model(Net)
    model.load_state_dict({k: v for k, v in weights.items() if k.startswith("fc1")}, strict=False)
    with pytest.raises(ClientAPIError, match=r"'fc2.bias' has no value yet"):
        model(torch.zeros(1, 8))
    rest = {k: v for k, v in weights.items() if not k.startswith("fc1")}
    model.load_state_dict(rest, strict=False)
    assert model(torch.zeros(1, 8)).shape == (1, 3)


def test_a_failed_strict_load_still_counts_what_it_copied() -> None:
    weights = _weights()
    model = flare.build_model(Net)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in weights.items() if k != "norm.weight"})
    with pytest.raises(ClientAPIError, match=r"'norm.weight' has no value yet"):
        model(torch.zeros(1, 8))


def test_tied_weights_are_filled_by_either_name() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = flare.build_model(Tied)
    model.load_state_dict({"a.weight": torch.eye(4)}, strict=False)
    assert torch.equal(model(torch.ones(1, 4)), torch.ones(1, 4))


def test_a_plain_tensor_given_to_an_initialiser_is_initialised() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("mask", nn.init.ones_(torch.empty(2)), persistent=False)

    model = flare.build_model(Masked)
    assert torch.equal(model.mask, torch.ones(2))


def test_a_skipped_parameter_loading_cannot_reach_is_refused_at_build() -> None:
    class Unregistered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.extra = [nn.Parameter(torch.empty(2))]
            nn.init.ones_(self.extra[0])

    def drop_bias(module: nn.Module, state: dict, prefix: str, local: dict) -> None:
        del state[prefix + "fc.bias"]

    class Unsaved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self._register_state_dict_hook(drop_bias)

    with pytest.raises(ClientAPIError, match=r"filled a parameter the model does not register"):
        flare.build_model(Unregistered)
    with pytest.raises(ClientAPIError, match=r"filled 'fc.bias', which is not in the model's"):
        flare.build_model(Unsaved)


def test_a_factory_that_returns_no_module_is_refused_and_init_is_restored() -> None:
    originals = {name: getattr(nn.init, name) for name in ("uniform_", "kaiming_uniform_")}
    with pytest.raises(ClientAPIError, match=r"the factory returned dict, not a torch.nn.Module"):
        flare.build_model(lambda: {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="boom"):
        flare.build_model(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert {name: getattr(nn.init, name) for name in originals} == originals
    t = torch.zeros(3)
    nn.init.ones_(t)
    assert torch.equal(t, torch.ones(3))


def test_other_threads_initialise_as_usual_meanwhile() -> None:
    inside, done = threading.Event(), threading.Event()

    def slow_factory() -> nn.Module:
        model = nn.Linear(2, 2)
        inside.set()
        assert done.wait(10)
        return model

    built: list[nn.Module] = []
    worker = threading.Thread(target=lambda: built.append(flare.build_model(slow_factory)))
    worker.start()
    assert inside.wait(10)
    t = torch.zeros(3)
    nn.init.ones_(t)  # this thread is not building: the initialiser runs
    done.set()
    worker.join(10)
    assert torch.equal(t, torch.ones(3))
    with pytest.raises(ClientAPIError, match="has no value yet"):
        built[0](torch.zeros(1, 2))


def test_a_build_inside_a_factory_is_guarded_by_the_outer_model_too() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = flare.build_model(nn.Linear, 2, 2)
            self.head = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.inner(x))

    model = flare.build_model(Outer)
    model.load_state_dict({"head.weight": torch.ones(1, 2), "head.bias": torch.ones(1)}, False)
    with pytest.raises(ClientAPIError, match=r"'inner.bias' has no value yet"):
        model(torch.zeros(1, 2))
    model.load_state_dict({"inner.weight": torch.eye(2), "inner.bias": torch.zeros(2)}, False)
    assert torch.equal(model(torch.ones(1, 2)), torch.full((1, 1), 3.0))


def test_a_model_built_on_the_meta_device_is_left_alone() -> None:
    with torch.device("meta"):
        model = flare.build_model(nn.Linear, 3, 2)
    assert model.weight.is_meta and not model._forward_pre_hooks


def test_importing_the_client_api_does_not_import_torch() -> None:
    """build_model imports torch when it builds: a script's ``import fedctl.client`` (and the
    Flower bridge's) stays as light as before it existed."""
    code = "import sys, fedctl.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
