"""fedctl.client: the contract training scripts rely on, misuse errors, standalone runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedctl.client as flare
from fedctl.client import channel as ch
from fedctl.client.state import SiteState
from fedctl.client.tracking import SummaryWriter
from fedctl.codec.model import TASK_EVALUATE, TASK_TRAIN, FLModel, Task
from fedctl.errors import ClientAPIError

REPO = Path(__file__).resolve().parent.parent


class FakeChannel(ch.Channel):
    def __init__(self, tasks: list[Task], seed: int | None = 0) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.info = ch.SiteInfo("site-2", 1, 3, "job-1", "simulation", seed=seed)
        self.sent: list[FLModel] = []
        self.records: list[dict[str, Any]] = []
        self._state = SiteState()

    def next_task(self) -> Task | None:
        return self.tasks.pop(0) if self.tasks else None

    def submit(self, task: Task, model: FLModel) -> None:
        self.sent.append(model)

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    @property
    def state(self) -> SiteState:
        return self._state


def _task(name: str = TASK_TRAIN, rnd: int = 0) -> Task:
    return Task(name, FLModel(params={"w": torch.zeros(2)}, current_round=rnd, total_rounds=2))


@pytest.fixture
def fake():
    channel = FakeChannel([_task(rnd=0), _task(TASK_EVALUATE, rnd=1)])
    ch.install(channel, thread_only=True)
    yield channel
    ch.install(None, thread_only=True)
    ch.install(None)


def test_calls_before_init_are_clear_errors() -> None:
    ch.install(None)
    with pytest.raises(ClientAPIError, match=r"call fedctl.client.init\(\) before receive\(\)"):
        flare.receive()
    with pytest.raises(ClientAPIError, match=r"before send\(\)"):
        flare.send(FLModel())


def test_the_loop_contract(fake: FakeChannel) -> None:
    flare.init()
    assert flare.get_site_name() == "site-2" and flare.get_job_id() == "job-1"
    assert flare.get_site_index() == 1 and flare.get_num_sites() == 3
    assert flare.system_info()["mode"] == "simulation"
    seen = []
    while flare.is_running():
        model = flare.receive()
        assert flare.receive() is model  # same task until send
        seen.append((model.current_round, flare.is_train(), flare.is_evaluate()))
        if flare.is_train():
            flare.send(FLModel(params={"w": torch.ones(2)}, meta={"NUM_STEPS_CURRENT_ROUND": 3}))
        else:
            flare.send(FLModel(metrics={"accuracy": 0.5}))
    assert seen == [(0, True, False), (1, False, True)]
    assert len(fake.sent) == 2 and flare.receive() is None and not flare.is_running()
    assert not flare.is_submit_model()


def test_send_misuse(fake: FakeChannel) -> None:
    flare.init()
    with pytest.raises(ClientAPIError, match=r"send\(\) called before receive\(\)"):
        flare.send(FLModel(params={"w": torch.ones(2)}))
    flare.receive()
    with pytest.raises(ClientAPIError, match="expects a fedctl.client.FLModel, got dict"):
        flare.send({"w": torch.ones(2)})  # type: ignore[arg-type]
    with pytest.raises(ClientAPIError, match=r"FLModel.params\['w'\] is a list"):
        flare.send(FLModel(params={"w": [1, 2]}))
    with pytest.raises(ClientAPIError, match="training task needs FLModel.params"):
        flare.send(FLModel(metrics={"a": 1}))
    with pytest.raises(ClientAPIError, match="not JSON data"):
        flare.send(FLModel(params={"w": torch.ones(2)}, meta={"x": object()}))
    flare.send(FLModel(params={"w": torch.ones(2)}))
    with pytest.raises(ClientAPIError, match="twice for the same task"):
        flare.send(FLModel(params={"w": torch.ones(2)}))


def test_generators_are_seeded_per_site_and_round(fake: FakeChannel) -> None:
    flare.init()
    flare.receive()
    first = torch.rand(3)
    expected = ch.derive_seed(0, 1, 0, TASK_TRAIN)
    torch.manual_seed(expected)
    assert torch.equal(first, torch.rand(3))
    assert ch.derive_seed(0, 1, 0) != ch.derive_seed(0, 2, 0) != ch.derive_seed(0, 1, 1)
    assert ch.derive_seed(5, 1, 0) == ch.derive_seed(5, 1, 0)


def test_tracking_records(fake: FakeChannel) -> None:
    flare.init()
    flare.receive()
    writer = SummaryWriter(log_dir="ignored")
    writer.add_scalar("loss", torch.tensor(0.25), global_step=7)
    writer.add_scalars("acc", {"train": 0.9, "val": 0.8}, 7)
    flare.log("lr", 0.1)
    with pytest.raises(ClientAPIError, match="expected a number, got str"):
        writer.add_scalar("loss", "high")
    with pytest.raises(ClientAPIError, match="data_type must be one of"):
        flare.log("x", 1, data_type="IMAGE")
    tags = [(r["tag"], r["value"], r["step"], r["round"]) for r in fake.records]
    assert tags == [
        ("loss", 0.25, 7, 0),
        ("acc", {"train": 0.9, "val": 0.8}, 7, 0),
        ("lr", 0.1, None, 0),
    ]


def test_site_state_round_trip(tmp_path: Path) -> None:
    state = SiteState(tmp_path / "s.safetensors")
    state["count"] = 3
    state["c"] = torch.arange(4.0)
    state["info"] = {"a": [1, 2]}
    state.save()
    again = SiteState(tmp_path / "s.safetensors")
    assert again["count"] == 3 and again["info"] == {"a": [1, 2]}
    assert torch.equal(again["c"], torch.arange(4.0))
    with pytest.raises(ClientAPIError, match="keys must be non-empty strings"):
        again[""] = 1
    with pytest.raises(Exception, match="not JSON data"):
        again["x"] = object()


def _run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hello_pt_client_runs_as_a_plain_script() -> None:
    proc = _run_script(REPO / "recipes" / "hello_pt" / "client.py", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout
    assert "fedctl standalone round done: sent 4 tensors" in proc.stderr


def test_standalone_without_a_recipe_warns_and_gives_no_params(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        "import fedctl.client as flare\n"
        "flare.init()\n"
        "while flare.is_running():\n"
        "    m = flare.receive()\n"
        "    print('params', m.params)\n"
        "    flare.send(flare.FLModel(params={}, metrics={'ok': 1}))\n"
    )
    proc = _run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert "params None" in proc.stdout and "no recipe.py or job folder" in proc.stderr
