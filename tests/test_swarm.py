"""Swarm learning (issue 16, deliverables 4 and 5): sites aggregate among themselves, every
payload the server relays is sealed site to site (X25519 + AES-GCM, keys signed by the sites'
identities), the final model equals FedAvg's bit for bit in simulation and on a POC, a tampered
payload is rejected by the site that receives it and its aggregator is replaced, and a site
killed mid-run leaves the others going."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import local_sim

from fedctl.codec.tensorfiles import load_file
from fedctl.errors import RecipeError
from fedctl.privacy import e2e
from fedctl.privacy.secagg.site import SimulatedIdentity
from fedctl.recipe import FedAvgRecipe, SwarmRecipe
from fedctl.workflows import swarm_site
from fedctl.workflows.base import WorkflowContext

CLIENT = """
import os
import signal
import sys
import fedctl.client as flare

flare.init()
site = flare.get_site_name()
number = int(site.split("-")[1])
tasks = 0
while flare.is_running():
    received = flare.receive()
    tasks += 1
    if len(sys.argv) > 2 and site == sys.argv[1] and tasks == 2:  # its agent dies mid-run
        os.kill(int(sys.argv[2]), signal.SIGKILL)
    params = {k: v * 0.9 + 0.1 * number for k, v in received.params.items()}  # "training"
    flare.send(flare.FLModel(
        params=params, metrics={"n": number}, meta={"NUM_STEPS_CURRENT_ROUND": number}
    ))
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "client.py").write_text(CLIENT)
    return folder


def _recipe(cls, folder: Path, **kw):
    torch.manual_seed(0)
    model = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    args = {"name": "swarm", "min_clients": 3, "num_rounds": 3, "key_metric": None, **kw}
    return cls(model=model, train_script="client.py", base_dir=folder, **args)


def _finals(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.parent.name if p.parent.name.startswith("site-") else p.parts[-6]: load_file(p)[0]
        for p in sorted(root.glob(f"**/{swarm_site.FINAL_FILE}"))
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the envelope


def _pair(tmp_path: Path, job_id: str = "j"):
    keys = {s: e2e.E2EKey.load_or_create(tmp_path / f"{s}.key") for s in ("a", "b", "c")}
    roster = {s: k.advertise(job_id, s, SimulatedIdentity(s, 7).sign) for s, k in keys.items()}
    verify = SimulatedIdentity("a", 7).verifier({})
    return keys, e2e.peer_keys(job_id, roster, verify), roster, verify


def test_a_sealed_payload_opens_only_for_its_receiver_round_and_purpose(tmp_path) -> None:
    keys, peers, _, _ = _pair(tmp_path)
    ad = e2e.context("j", 2, "update", "a", "b")
    sealed = e2e.seal(keys["a"], peers["b"], b"weights", ad)
    assert b"weights" not in sealed
    assert e2e.open_sealed(keys["b"], peers["a"], sealed, ad, "a") == b"weights"
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    for mine, theirs, context in (
        (keys["c"], peers["a"], ad),  # another site
        (keys["b"], peers["a"], e2e.context("j", 3, "update", "a", "b")),  # a replayed round
        (keys["b"], peers["a"], e2e.context("j", 2, "model", "a", "b")),  # another purpose
        (keys["b"], peers["c"], ad),  # said to come from someone else
    ):
        with pytest.raises(e2e.E2EError, match="failed authentication"):
            e2e.open_sealed(mine, theirs, sealed, context, "a")


def test_a_changed_byte_is_rejected(tmp_path) -> None:
    keys, peers, _, _ = _pair(tmp_path)
    ad = e2e.context("j", 0, "update", "a", "b")
    sealed = bytearray(e2e.seal(keys["a"], peers["b"], b"x" * 100, ad))
    for i in (0, 20, len(sealed) - 1):  # nonce, body, tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(e2e.E2EError, match="the payload from a failed authentication"):
            e2e.open_sealed(keys["b"], peers["a"], bytes(bad), ad, "a")
    with pytest.raises(e2e.E2EError, match="truncated"):
        e2e.open_sealed(keys["b"], peers["a"], bytes(sealed[:20]), ad, "a")


def test_a_key_not_signed_by_its_site_is_refused(tmp_path) -> None:
    keys, _, roster, verify = _pair(tmp_path)
    forged = keys["c"].advertise("j", "b", SimulatedIdentity("c", 7).sign)  # c posing as b
    with pytest.raises(e2e.E2EError, match="the key advertised for 'b' is not signed by b's"):
        e2e.peer_keys("j", {**roster, "b": forged}, verify)
    with pytest.raises(e2e.E2EError, match="not signed"):  # another job's advertisement
        e2e.peer_keys("other", roster, verify)


# ----------------------------------------------------------------------------- in simulation


def test_swarm_equals_fedavg_bit_for_bit_and_the_server_holds_no_model(
    job, tmp_path, monkeypatch
) -> None:
    seen: list[tuple[str, dict]] = []
    take = WorkflowContext._take

    def record(self, result, on_result, outcome, round_, phase=None):
        if result.model is not None and result.model.params is not None:
            seen.append((result.site, dict(result.model.params)))
        return take(self, result, on_result, outcome, round_, phase)

    monkeypatch.setattr(WorkflowContext, "_take", record)
    swarm = _recipe(SwarmRecipe, job).run(local_sim(tmp_path, "swarm", 3))
    assert swarm.ok, swarm.reason
    monkeypatch.setattr(WorkflowContext, "_take", take)
    fedavg = _recipe(FedAvgRecipe, job).run(local_sim(tmp_path, "fedavg", 3))
    assert fedavg.ok, fedavg.reason
    finals = _finals(swarm.result_dir / "sites")
    assert sorted(finals) == ["site-1", "site-2", "site-3"]
    expected = fedavg.load_final()
    assert all(_equal(model, expected) for model in finals.values())
    # the server side saw sealed payloads only, and saved no model
    assert seen and all(
        k.startswith(swarm_site.CT) and v.dtype == torch.uint8
        for _, p in seen
        for k, v in p.items()
    )
    plain = swarm_site.to_bytes(expected)[-48:]  # the tail of the model's tensor data
    assert not any(plain in v.numpy().tobytes() for _, p in seen for v in p.values())
    assert not list((swarm.result_dir / "models").glob("*.safetensors"))
    log = (swarm.result_dir / "run.log").read_text()
    for n, site in enumerate(("site-1", "site-2", "site-3")):
        assert f"round {n + 1}: aggregated by {site}" in log  # in rotation


def test_a_tampered_update_is_rejected_and_the_aggregator_replaced(
    job, tmp_path, monkeypatch
) -> None:
    from fedctl.workflows import swarm as swarm_flow

    broadcast = WorkflowContext.broadcast
    tampered: list[str] = []

    def tamper(self, task, targets):
        spec = (task.model.meta or {}).get(swarm_site.META) or {}
        if spec.get("kind") == "aggregate" and not tampered:  # the relay changes one byte
            key = f"{swarm_site.CT}/site-2"
            bad = task.model.params[key].clone()
            bad[40] ^= 1
            task.model.params[key] = bad
            tampered.append(targets[0])
        return broadcast(self, task, targets)

    monkeypatch.setattr(WorkflowContext, "broadcast", tamper)
    run = _recipe(SwarmRecipe, job).run(local_sim(tmp_path, "swarm", 3))
    monkeypatch.setattr(WorkflowContext, "broadcast", broadcast)
    assert run.ok, run.reason
    assert tampered == ["site-1"]
    log = (run.result_dir / "run.log").read_text()
    assert "the aggregator site-1 failed" in log
    assert "the payload from site-2 failed authentication" in log
    assert "round 1: site-2 takes over the aggregation" in log
    fedavg = _recipe(FedAvgRecipe, job).run(local_sim(tmp_path, "fedavg", 3))
    assert all(_equal(m, fedavg.load_final()) for m in _finals(run.result_dir / "sites").values())
    assert swarm_flow.Swarm  # the workflow the recipe runs


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"sample_clients": 2}, "swarm does not take sample_clients"),
        ({"server_eval": "x.py:f"}, "swarm does not take server_eval"),
        ({"secure_aggregation": True}, "swarm does not take secure_aggregation"),
        ({"compression": {"result": "fp16"}}, "swarm does not take compression"),
        (
            {"privacy": [{"name": "clip_update", "max_norm": 1.0, "at": "result_in"}]},
            "swarm runs no filters at result_in",
        ),
    ],
)
def test_what_needs_a_server_that_sees_models_is_refused(job, changes, match) -> None:
    with pytest.raises(RecipeError, match=match):
        _recipe(SwarmRecipe, job, **changes)


# ----------------------------------------------------------------------------- on a POC


def test_poc_swarm_equals_fedavg_and_survives_a_site_killed_mid_run(job, tmp_path) -> None:
    from conftest import free_port

    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    ws = tmp_path / "poc"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    poc.start(ws)
    try:
        env = PocEnv(workspace=ws, display="none", results=tmp_path / "res")
        run = _recipe(SwarmRecipe, job).run(env)
        assert run.ok, run.reason
        fedavg = _recipe(FedAvgRecipe, job).run(local_sim(tmp_path, "fedavg", 3))
        finals = _finals(ws / "provision" / "kits")
        assert sorted(finals) == ["site-1", "site-2", "site-3"]
        assert all(_equal(m, fedavg.load_final()) for m in finals.values())
        # what the server's side of the job keeps is sealed, or the public initial model
        server = ws / "provision" / "kits" / "localhost"
        initial = _recipe(SwarmRecipe, job).initial_params()
        for path in [p for p in server.rglob("*.safetensors") if run.job_id in str(p)]:
            tensors = {k.removeprefix("p:"): v for k, v in load_file(path)[0].items()}
            sealed = all(k.startswith(swarm_site.CT) for k in tensors)
            assert sealed or _equal(tensors, initial), path
        # site-2's agent is killed while it trains in round 2: the others go on
        for p in (ws / "provision" / "kits").glob(f"**/{swarm_site.FINAL_FILE}"):
            os.remove(p)
        agent = poc.status(ws)["processes"]["site-2"]["pid"]
        killed = _recipe(
            SwarmRecipe, job, min_clients=2, round_timeout=15, train_args=f"site-2 {agent}"
        ).run(env)
        assert killed.ok, killed.reason
        assert [m["accepted"] for m in killed.metrics] == [3, 2, 2]
        log = (killed.result_dir / "run.log").read_text()
        # round 2's aggregator (site-2) is gone: site-3 takes over, its updates sealed for it
        assert "round 2: site-3 takes over the aggregation" in log
        assert "round 2: aggregated by site-3" in log and "failed authentication" not in log
        finals = _finals(ws / "provision" / "kits")
        assert sorted(finals) == ["site-1", "site-3"] and _equal(finals["site-1"], finals["site-3"])
    finally:
        poc.stop(ws)
