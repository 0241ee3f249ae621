"""Metrics sinks (TensorBoard, MLflow) and the client's SummaryWriter (issue 17).

Simulations run in-process (``backend="local"``): TensorBoard's event files are read back with
TensorBoard's own reader, MLflow's file store with MLflow's client.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port

from fedctl.client import channel as client_channel
from fedctl.client.channel import Channel, SiteInfo
from fedctl.client.state import SiteState
from fedctl.client.tracking import SummaryWriter
from fedctl.codec.model import FLModel, Task
from fedctl.errors import ClientAPIError, RecipeError, UsageError
from fedctl.recipe import SimEnv, load_recipe
from fedctl.tracking import sinks
from fedctl.tracking.sinks import RunInfo, Sink, SinkHub, record_items

#: a script that records through every SummaryWriter call and flare.log
TRACKING_CLIENT = """
import fedctl.client as flare
from model import Toy

flare.init()
site, idx = flare.get_site_name(), flare.get_site_index()
writer = flare.tracking.SummaryWriter(log_dir="ignored")
model = Toy()
while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    rnd = received.current_round
    for step in range(3):
        writer.add_scalar("train/loss", 10 * idx + step, rnd * 3 + step)
    writer.add_scalars("lr", {"a": 0.1, "b": 0.2}, rnd)
    writer.add_histogram("weights", model.fc.weight, rnd)
    writer.add_text("note", f"<b>{site}</b> round {rnd}", rnd)
    flare.log("plain", float(idx))
    flare.send(
        flare.FLModel(
            params=model.state_dict(),
            metrics={"accuracy": 0.5 + 0.1 * idx + 0.01 * rnd},
            meta={"NUM_STEPS_CURRENT_ROUND": 1},
        )
    )
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("FEDCTL_TRACKING", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def tracked(toy_dir: Path, clean_env):
    """The toy recipe running TRACKING_CLIENT, 2 rounds."""
    (toy_dir / "tracking_client.py").write_text(TRACKING_CLIENT)
    return load_recipe(toy_dir).recipe.with_overrides(
        train_script="tracking_client.py", num_rounds=2
    )


def _run(recipe: Any, tmp_path: Path, clients: int = 3) -> Any:
    env = SimEnv(num_clients=clients, backend="local", workspace=tmp_path / "runs", display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    return run


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ---------------------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize("max_pending", [1, 1 << 20])
def test_tensorboard_keeps_one_event_file_per_site_across_flushes(tmp_path, max_pending) -> None:
    """Each site's records are appended to its one event file at every flush (1,000 sites once
    made 1,000 files a round); nothing is written before a flush unless the records held in
    memory reach ``max_pending`` bytes."""
    from fedctl.tracking.sinks import RunInfo
    from fedctl.tracking.tensorboard import TensorBoardSink

    sink = TensorBoardSink(max_pending=max_pending)
    sink.open(RunInfo(root=tmp_path, job_id="j", name="n", kind="fedavg", args={}, mode="sim"))
    for step in range(4):
        for site in ("site-1", "site-2", "site-3"):
            sink.scalars(site, step, {"loss": step + int(site[-1]) / 10}, 1000.0 + step)
        if step == 0:  # held in memory until the flush, unless over max_pending
            assert (tmp_path / "tb" / "site-1").exists() == (max_pending == 1)
        sink.flush()
    sink.close("FINISHED")
    for site in ("site-1", "site-2", "site-3"):
        files = list((tmp_path / "tb" / site).iterdir())
        assert len(files) == 1, files
        acc = _events(tmp_path / "tb" / site)
        expected = [(step, pytest.approx(step + int(site[-1]) / 10)) for step in range(4)]
        assert _scalars(acc, "loss") == expected


def test_tensorboard_event_files_hold_each_sites_scalars(tracked, tmp_path) -> None:
    run = _run(tracked, tmp_path)
    tb = run.result_dir / "tb"
    assert sorted(p.name for p in tb.iterdir()) == ["global", "site-1", "site-2", "site-3"]
    rows = [r for r in run.metrics]
    glob = _events(tb / "global")
    assert _scalars(glob, "accuracy") == [
        (1, pytest.approx(rows[0]["metrics"]["accuracy"], rel=1e-6)),
        (2, pytest.approx(rows[1]["metrics"]["accuracy"], rel=1e-6)),
    ]
    model_bytes = 5 * 4  # Linear(4, 1): 4 weights and a bias, float32
    assert [v for _, v in _scalars(glob, "fedctl/bytes_sent")] == [3 * model_bytes] * 2
    assert [v for _, v in _scalars(glob, "fedctl/sites_accepted")] == [3.0, 3.0]
    assert {"fedctl/round_duration_s", "fedctl/bytes_received"} <= set(glob.Tags()["scalars"])
    # bytes moved are in the metrics file too: the model to each of 3 sites, and back
    assert [(r["bytes_sent"], r["bytes_received"]) for r in rows] == [(60, 60), (60, 60)]
    for idx in range(3):
        acc = _events(tb / f"site-{idx + 1}")
        # what the site sent with its results, per round (counted from 1)...
        expected = [(1, 0.5 + 0.1 * idx), (2, 0.5 + 0.1 * idx + 0.01)]
        assert _scalars(acc, "accuracy") == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
        # ...and what its script recorded, at the script's own steps
        assert _scalars(acc, "train/loss") == [(s, 10.0 * idx + s % 3) for s in range(6)]
        assert _scalars(acc, "lr/a") == [(0, pytest.approx(0.1)), (1, pytest.approx(0.1))]
        assert _scalars(acc, "plain") == [(1, float(idx)), (2, float(idx))]  # no step: round
        hist = acc.Histograms("weights")
        assert [h.step for h in hist] == [0, 1] and hist[0].histogram_value.num == 4
        assert sum(hist[0].histogram_value.bucket) == 4
        texts = acc.Tensors("note")
        assert texts[0].tensor_proto.string_val[0].decode() == f"<b>site-{idx + 1}</b> round 0"
    log = (run.result_dir / "run.log").read_text()
    assert "tracking: metrics/*.jsonl, tensorboard (tb/)" in log
    assert "failed" not in log


def test_fedctl_tracking_none_writes_jsonl_only(tracked, tmp_path, clean_env) -> None:
    clean_env.setenv("FEDCTL_TRACKING", "none")
    run = _run(tracked, tmp_path, clients=2)
    assert not (run.result_dir / "tb").exists()
    assert (run.result_dir / "metrics" / "tracking.jsonl").read_text().count('"tag"') == 2 * 2 * 7


def test_a_bad_fedctl_tracking_is_an_error_before_anything_runs(tracked, tmp_path, clean_env):
    clean_env.setenv("FEDCTL_TRACKING", "tensorboard,mlfow")
    with pytest.raises(UsageError, match="unknown sink 'mlfow'"):
        tracked.run(
            SimEnv(num_clients=2, backend="local", workspace=tmp_path / "ws", display="none")
        )
    assert not (tmp_path / "ws").exists()


# ---------------------------------------------------------------------------- MLflow


def _mlflow(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_file_store_holds_runs_params_and_metrics(tracked, tmp_path, clean_env) -> None:
    clean_env.setenv("FEDCTL_TRACKING", "none")  # the job's choice wins for the sink it names
    recipe = tracked.with_overrides(
        tracking={"mlflow": {"tracking_uri": "mlruns", "experiment": "fedctl-test"}}
    )
    run = _run(recipe, tmp_path, clients=2)
    assert not (run.result_dir / "tb").exists()
    client = _mlflow((run.result_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("fedctl-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"toy", "site-1", "site-2"}
    parent = runs["toy"]
    assert parent.data.tags["fedctl.job_id"] == run.job_id
    assert parent.data.tags["fedctl.kind"] == "fedavg"
    assert parent.data.params["num_rounds"] == "2"
    assert parent.data.params["train_script"] == "tracking_client.py"
    assert parent.data.params["tracking.mlflow.experiment"] == "fedctl-test"
    history = client.get_metric_history(parent.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [
        (i + 1, pytest.approx(r["metrics"]["accuracy"])) for i, r in enumerate(run.metrics)
    ]
    assert [
        m.value for m in client.get_metric_history(parent.info.run_id, "fedctl/bytes_sent")
    ] == [
        40.0,
        40.0,
    ]
    for idx, site in enumerate(["site-1", "site-2"]):
        child = runs[site]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        loss = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in loss) == [
            (s, 10.0 * idx + s % 3) for s in range(6)
        ]
        acc = client.get_metric_history(child.info.run_id, "accuracy")
        assert [m.step for m in acc] == [1, 2]
        assert child.info.status == "FINISHED"
    assert parent.info.status == "FINISHED"


def test_mlflow_from_the_environment(tracked, tmp_path, clean_env) -> None:
    store = tmp_path / "store"
    clean_env.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # auto: on when a URI is set
    run = _run(tracked, tmp_path, clients=2)
    exp = _mlflow(store.as_uri()).get_experiment_by_name("toy")  # named after the job
    names = {r.info.run_name for r in _mlflow(store.as_uri()).search_runs([exp.experiment_id])}
    assert names == {"toy", "site-1", "site-2"}
    assert (run.result_dir / "tb" / "global").is_dir()  # and TensorBoard as well


def test_a_broken_sink_does_not_fail_the_job(tracked, tmp_path, clean_env) -> None:
    # MLflow at an address nobody answers: reported once, the job and TensorBoard go on
    clean_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    clean_env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    nobody = f"http://127.0.0.1:{free_port()}"
    run = _run(tracked.with_overrides(tracking={"mlflow": {"tracking_uri": nobody}}), tmp_path, 2)
    log = (run.result_dir / "run.log").read_text()
    assert log.count("the mlflow sink failed") == 1, log
    assert _scalars(_events(run.result_dir / "tb" / "site-2"), "plain") == [(1, 1.0), (2, 1.0)]


def test_a_sink_that_raises_mid_run_is_switched_off(tracked, tmp_path, clean_env) -> None:
    from fedctl.tracking.tensorboard import TensorBoardSink

    calls = []
    original = TensorBoardSink.scalars

    def flaky(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        original(self, *args)

    clean_env.setattr(TensorBoardSink, "scalars", flaky)
    run = _run(tracked, tmp_path, clients=2)
    log = (run.result_dir / "run.log").read_text()
    assert log.count("the tensorboard sink failed (scalars)") == 1 and "disk full" in log
    assert len(calls) == 3  # nothing more after the failure
    assert len(run.metrics) == 2 and run.final_model is not None


# ---------------------------------------------------------------------------- the hub


class _Recorder(Sink):
    name = "recorder"

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None) -> None:
        self.items: list[tuple[Any, ...]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.closed_with: Any = "not closed"

    def open(self, info: RunInfo) -> None:
        if self.fail_on == "open":
            raise RuntimeError("cannot open")

    def scalars(self, scope, step, values, wall_time) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_on == "scalars":
            raise ValueError("bad value")
        self.items.append((scope, step, values))

    def close(self, status) -> None:
        self.closed_with = status


def _info(tmp_path: Path) -> RunInfo:
    return RunInfo(tmp_path, "job-1", "job", "fedavg", "simulation", {})


def test_hub_delivers_in_order_and_closes_with_the_status(tmp_path) -> None:
    sink, lines = _Recorder(), []
    hub = SinkHub([sink], _info(tmp_path), lines.append).start()
    for i in range(100):
        hub.scalars("global", i, {"x": float(i)}, 0.0)
    assert hub.close("FINISHED", timeout=10)
    assert [step for _, step, _ in sink.items] == list(range(100))
    assert sink.closed_with == "FINISHED" and lines == []


def test_a_failing_sink_is_reported_once_and_others_go_on(tmp_path) -> None:
    bad, good, lines = _Recorder(fail_on="scalars"), _Recorder(), []
    bad.name = "bad"
    hub = SinkHub([bad, good], _info(tmp_path), lines.append).start()
    for i in range(10):
        hub.scalars("site-1", i, {"x": 1.0}, 0.0)
    assert hub.close("FAILED", timeout=10)
    assert len(good.items) == 10 and good.closed_with == "FAILED"
    assert len(lines) == 1 and "the bad sink failed (scalars)" in lines[0]
    assert "ValueError: bad value" in lines[0] and hub.failed == {"bad": "ValueError: bad value"}
    assert bad.closed_with == "not closed"  # a failed sink gets nothing more


def test_a_sink_that_cannot_open_gets_nothing(tmp_path) -> None:
    sink, lines = _Recorder(fail_on="open"), []
    hub = SinkHub([sink], _info(tmp_path), lines.append).start()
    hub.scalars("global", 1, {"x": 1.0}, 0.0)
    hub.close(None, timeout=10)
    assert sink.items == [] and "failed (open)" in lines[0]


def test_a_hung_sink_never_blocks_the_caller(tmp_path) -> None:
    gate, lines = threading.Event(), []
    hub = SinkHub([_Recorder(gate)], _info(tmp_path), lines.append, max_items=5).start()
    started = time.monotonic()
    for i in range(1000):  # the sink is stuck on the first: the queue fills, the rest drop
        hub.scalars("global", i, {"x": 1.0}, 0.0)
    assert time.monotonic() - started < 1.0
    assert hub.dropped >= 1000 - 6
    assert not hub.close("FINISHED", timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert any("records behind" in line for line in lines)
    assert any("did not finish within" in line for line in lines)
    gate.set()  # the sink comes back: the thread writes what is queued and ends
    hub._thread.join(10)
    assert not hub._thread.is_alive()


def test_records_from_sites_are_validated() -> None:
    ok = {"kind": "scalar", "tag": "loss", "value": 1.5, "step": 7, "round": 0, "time": 5.0}
    assert record_items("s", ok) == [("scalars", "s", 7, {"loss": 1.5}, 5.0)]
    assert record_items("s", {**ok, "step": None}) == [("scalars", "s", 1, {"loss": 1.5}, 5.0)]
    assert record_items("s", {**ok, "value": None}) == []  # a NaN the script recorded
    multi = {**ok, "multi": True, "value": {"a": 1, "b": "x", "c": None}}
    assert record_items("s", multi) == [("scalars", "s", 7, {"loss/a": 1.0}, 5.0)]
    text = {**ok, "kind": "text", "value": "x" * 100_000}
    assert len(record_items("s", text)[0][3]) == sinks.MAX_TEXT
    hist = {
        "min": 0,
        "max": 1,
        "num": 3,
        "sum": 1,
        "sum_squares": 1,
        "bucket_limits": [0.5, 1.0],
        "bucket_counts": [1, 2],
    }
    assert record_items("s", {**ok, "kind": "histogram", "value": hist})[0][0] == "histogram"
    for bad in (
        "not a dict",
        {**ok, "tag": ""},
        {**ok, "tag": "t" * 300},
        {**ok, "tag": 5},
        {**ok, "value": "1.5"},
        {**ok, "value": True},
        {**ok, "kind": "image"},
        {**ok, "multi": True, "value": [1, 2]},
        {**ok, "kind": "text", "value": 3},
        {**ok, "kind": "histogram", "value": {**hist, "bucket_limits": [1.0, 0.5]}},
        {**ok, "kind": "histogram", "value": {**hist, "bucket_counts": [1]}},
        {**ok, "kind": "histogram", "value": {**hist, "bucket_counts": [1, -2]}},
        {**ok, "kind": "histogram", "value": {**hist, "num": "3"}},
    ):
        assert record_items("s", bad) is None, bad
    assert record_items("s", {**ok, "step": 2**70})[0][2] == 1  # out of range: the round


def test_bad_records_are_said_once_per_site(tmp_path) -> None:
    sink, lines = _Recorder(), []
    hub = SinkHub([sink], _info(tmp_path), lines.append).start()
    hub.records("site-1", [{"kind": "x"}, {"kind": "scalar", "tag": "a", "value": 1.0}])
    hub.records("site-1", [{"kind": "y"}])
    hub.close("FINISHED", timeout=10)
    assert len(sink.items) == 1 and len(lines) == 1 and "site-1" in lines[0]


# ---------------------------------------------------------------------------- choosing sinks


def test_which_sinks_run(monkeypatch) -> None:
    monkeypatch.setattr(sinks, "installed", lambda name: True)
    assert (lambda c: (c.tensorboard, c.mlflow))(sinks.plan(None, {})) == (True, False)
    uri = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert (lambda c: (c.tensorboard, c.mlflow))(sinks.plan(None, uri)) == (True, True)
    none = {"FEDCTL_TRACKING": "none"}
    c = sinks.plan({"tensorboard": True}, none)
    assert (c.tensorboard, c.mlflow) == (True, False)
    c = sinks.plan({"mlflow": False}, {"FEDCTL_TRACKING": "mlflow", **uri})
    assert (c.tensorboard, c.mlflow) == (False, False)
    c = sinks.plan({"mlflow": {"tracking_uri": "runs", "experiment": "e"}}, none)
    assert (c.mlflow, c.tracking_uri, c.experiment) == (True, "runs", "e")
    c = sinks.plan(None, {"FEDCTL_TRACKING": " TensorBoard , mlflow "})
    assert (c.tensorboard, c.mlflow) == (True, True)
    c = sinks.plan(None, {"FEDCTL_TRACKING": "wandb"})
    assert (c.tensorboard, c.mlflow) == (False, False) and "unknown sink 'wandb'" in c.notes[0]
    monkeypatch.setattr(sinks, "installed", lambda name: False)
    c = sinks.plan(None, {"FEDCTL_TRACKING": "tensorboard"})
    assert not c.tensorboard and "pip install 'fedctl[tensorboard]'" in c.notes[0]
    assert sinks.plan(None, {}).notes == []  # auto: quietly off when not installed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tensorboard", "must be a dict"),
        ({"tensorbord": True}, "unknown sink 'tensorbord'"),
        ({"tensorboard": "yes"}, "true or false"),
        ({"mlflow": "http://x"}, "true, false or a dict"),
        ({"mlflow": {"uri": "x"}}, "unknown key 'uri'"),
        ({"mlflow": {"experiment": ""}}, "non-empty string"),
        ({"mlflow": {"tracking_uri": "/srv/mlruns"}}, "relative to its run folder"),
        ({"mlflow": {"tracking_uri": "file:/srv/mlruns"}}, "relative to its run folder"),
        ({"mlflow": {"tracking_uri": "sqlite:///x.db"}}, "relative to its run folder"),
        ({"mlflow": {"tracking_uri": "../mlruns"}}, "inside the run folder"),
    ],
)
def test_a_jobs_tracking_is_validated(toy_recipe, spec, message) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        toy_recipe.with_overrides(tracking=spec)
    assert "\n" not in str(info.value)


def test_a_jobs_tracking_travels_with_the_job(toy_recipe, tmp_path) -> None:
    from fedctl.recipe.jobfolder import load_job

    spec = {"tensorboard": False, "mlflow": {"tracking_uri": "https://mlflow.example:5000"}}
    job = load_job(toy_recipe.with_overrides(tracking=spec).export(tmp_path / "job"))
    assert job.tracking == spec


# ---------------------------------------------------------------------------- SummaryWriter


class _Capture(Channel):
    """A channel that keeps what the script records."""

    def __init__(self) -> None:
        super().__init__()
        self.info = SiteInfo("site-1", 0, 1, "job", "test")
        self.records: list[dict[str, Any]] = []
        self.initialized = True
        self.task = Task("train", FLModel(params={}, current_round=4))

    def next_task(self) -> Task | None:
        return None

    def submit(self, task: Task, model: FLModel) -> None:
        pass

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    @property
    def state(self) -> SiteState:
        raise NotImplementedError


@pytest.fixture
def capture():
    ch = _Capture()
    client_channel.install(ch, thread_only=True)
    yield ch
    client_channel.install(None, thread_only=True)


def test_summary_writer_keeps_torchs_calls(capture, capsys) -> None:
    with SummaryWriter("runs/x", comment="ignored", flush_secs=5) as w:
        w.add_scalar("loss", torch.tensor(0.25), 3, walltime=100.0)
        w.add_scalar("nan", float("nan"))
        w.add_scalars("lr", {"a": 1, "b": np.float32(2.0)}, global_step=np.int64(2))
        w.add_text("note", "hello", 1)
        w.add_histogram("w", torch.arange(10.0), 5, bins=5)
        w.flush()
    recs = capture.records
    assert recs[0] == {
        "kind": "scalar",
        "multi": False,
        "tag": "loss",
        "value": 0.25,
        "step": 3,
        "round": 4,
        "time": 100.0,
    }
    assert recs[1]["value"] is None and "recorded as null" in capsys.readouterr().err
    assert recs[2]["multi"] and recs[2]["value"] == {"a": 1.0, "b": 2.0} and recs[2]["step"] == 2
    assert recs[3]["kind"] == "text" and recs[3]["value"] == "hello"
    hist = recs[4]["value"]
    counts, edges = np.histogram(np.arange(10.0), bins=5)
    assert hist["bucket_counts"] == counts.tolist() and hist["bucket_limits"] == edges[1:].tolist()
    assert (hist["min"], hist["max"], hist["num"], hist["sum"]) == (0.0, 9.0, 10.0, 45.0)
    assert hist["sum_squares"] == float(sum(i * i for i in range(10)))


def test_summary_writer_histogram_bins() -> None:
    from fedctl.client.tracking import histogram

    values = np.random.default_rng(0).normal(size=10_000)
    assert len(histogram(values, "tensorflow", None, "t")["bucket_counts"]) == 30
    assert len(histogram(values, 5000, None, "t")["bucket_counts"]) == 1024
    assert len(histogram(values, "auto", 16, "t")["bucket_counts"]) <= 16
    assert histogram([1.0, float("nan"), 3.0], 2, None, "t")["num"] == 2.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.add_scalar("x", "1.0"), "expected a number"),
        (lambda w: w.add_scalar("x", torch.ones(3)), "expected one number"),
        (lambda w: w.add_scalar("", 1.0), "non-empty string"),
        (lambda w: w.add_scalars("x", [1, 2]), "dict of numbers"),
        (lambda w: w.add_histogram("x", ["a"]), "must be numbers"),
        (lambda w: w.add_histogram("x", [float("nan")]), "no finite values"),
        (lambda w: w.add_histogram("x", [1.0], bins=0), "add_histogram"),
        (lambda w: w.add_histogram("x", [1.0], bins=2.5), "bins must be"),
        (lambda w: w.add_scalar("x", 1.0, global_step="a"), "expected a number"),
    ],
)
def test_summary_writer_misuse_is_one_line(capture, call, message) -> None:
    with pytest.raises(ClientAPIError, match=message) as info:
        call(SummaryWriter())
    assert "\n" not in str(info.value)
    assert capture.records == []


def test_summary_writer_before_init() -> None:
    client_channel.install(None, thread_only=True)
    with pytest.raises(ClientAPIError, match="init"):
        SummaryWriter().add_scalar("x", 1.0)
