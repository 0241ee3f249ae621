"""A connection that drops in the middle of a model download or a result upload: the site does
the transfer again on its next session, and the job's model is the one a run without drops
gives (in-process server and agents, so the test can cut the streams at that exact moment)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from conftest import in_process_poc

from fedctl.codec.protocol import Push
from fedctl.codec.tensorfiles import load_file
from fedctl.errors import FedctlError
from fedctl.recipe import SimEnv, load_recipe
from fedctl.transport import rpc


def test_a_drop_mid_transfer_is_retried_not_a_failed_task(toy_dir, tmp_path, monkeypatch) -> None:
    sends = rpc.file_frames
    cuts = {"download": 0, "upload": 0}
    cut_lock = threading.Lock()

    def cutting(path: Any, first: Any = None, sha256: str | None = None):
        """The frames of a task model (server) or a result (site); the first two of each kind
        stop after their first frame, every site's stream is dropped, and they go on only once
        the sites have seen the drop (so the transfer is broken, not finished)."""
        name = Path(path).name
        upload = isinstance(first, Push)  # a site's result (not an admin's job bundle)
        kind = "upload" if upload else "download" if name.startswith("task") else None
        frames = sends(path, first, sha256)
        yield next(frames)
        with cut_lock:
            cut = kind is not None and cuts[kind] < 2
            if cut:
                cuts[kind] += 1
        if cut:
            for site in ("site-1", "site-2"):
                server.sites[site].link.close()
            deadline = time.monotonic() + 10
            while any(a.connected.is_set() for a in agents) and time.monotonic() < deadline:
                time.sleep(0.01)
        yield from frames

    monkeypatch.setattr(rpc, "file_frames", cutting)
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3)
    with in_process_poc(tmp_path) as poc_run:
        server, agents, admin = poc_run.server, poc_run.agents, poc_run.admin
        job = admin.submit_recipe(recipe)
        for ev in admin.follow(job["job_id"]):
            if ev["t"] == "end":
                break
        final = admin.status(job["job_id"])
        assert final["status"] == "FINISHED", final["reason"]
        admin.download(job["job_id"], tmp_path / "out")
    assert cuts == {"download": 2, "upload": 2}
    poc_model = load_file(tmp_path / "out" / "models" / "final.safetensors")[0]
    sim = recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    sim_model = sim.load_final()
    assert poc_model.keys() == sim_model.keys()
    assert all(torch.equal(poc_model[k], sim_model[k]) for k in sim_model)


class _Dropped(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "Channel closed!"


class _Stopping:
    """A stand-in for the agent's stop event that records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.stopped = False

    def is_set(self) -> bool:
        return self.stopped

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.stopped


def _agent_transfer(stopping: _Stopping, errors: list[Exception]) -> tuple[Any, int]:
    from fedctl.runtime.agent import SiteAgent

    calls = 0

    def once() -> str:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        return "done"

    agent = SimpleNamespace(stopping=stopping)
    try:
        return SiteAgent._transfer(agent, "upload of the result of t:1", once), calls  # type: ignore[arg-type]
    except FedctlError as exc:
        return exc, calls


def test_a_transfer_is_tried_five_times_then_fails_in_one_line() -> None:
    stopping = _Stopping()
    drops = [_Dropped(grpc.StatusCode.CANCELLED), _Dropped(grpc.StatusCode.UNAVAILABLE)]
    assert _agent_transfer(stopping, list(drops)) == ("done", 3)
    assert stopping.waits == [0.5, 1.0]
    err, calls = _agent_transfer(_Stopping(), [_Dropped(grpc.StatusCode.CANCELLED)] * 5)
    assert calls == 5 and isinstance(err, FedctlError)
    assert str(err) == "upload of the result of t:1 failed: CANCELLED: Channel closed!"


def _closed_channel_error() -> ValueError:
    """What grpc raises for a call on a channel already closed (the agent's session loop closes
    its channel when a session ends, and a transfer may have taken its stubs just before)."""
    channel = grpc.insecure_channel("127.0.0.1:1")
    call = channel.unary_unary("/fedctl.Test/Call")
    channel.close()
    try:
        call(b"")
    except ValueError as exc:
        return exc
    raise AssertionError("grpc called a closed channel")


def test_a_call_on_a_channel_closed_under_it_is_tried_again() -> None:
    stopping = _Stopping()
    assert _agent_transfer(stopping, [_closed_channel_error()]) == ("done", 2)
    assert stopping.waits == [0.5]
    err, calls = _agent_transfer(_Stopping(), [_closed_channel_error() for _ in range(5)])
    assert calls == 5
    assert str(err) == "upload of the result of t:1 failed: Cannot invoke RPC on closed channel!"
    with pytest.raises(ValueError, match="not a channel"):  # any other ValueError is a bug
        _agent_transfer(_Stopping(), [ValueError("not a channel")])


def test_a_refusal_or_a_stopping_agent_is_not_tried_again() -> None:
    err, calls = _agent_transfer(_Stopping(), [_Dropped(grpc.StatusCode.PERMISSION_DENIED)])
    assert calls == 1 and "failed: PERMISSION_DENIED" in str(err)
    stopping = _Stopping()
    stopping.stopped = True
    err, calls = _agent_transfer(stopping, [_Dropped(grpc.StatusCode.CANCELLED)])
    assert calls == 1 and stopping.waits == [] and isinstance(err, FedctlError)
