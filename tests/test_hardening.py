"""Production hardening on a real POC: authorization, audit, dropouts, restarts, resume.

One POC with three sites and a 4-second offline grace serves the whole module; tests run in
file order (the server kill comes last) and every process is stopped by PID at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import free_port

from fedctl.cli.main import main
from fedctl.codec.tensorfiles import load_file
from fedctl.errors import PermissionDenied
from fedctl.recipe import SimEnv, load_recipe
from fedctl.runtime import poc
from fedctl.runtime.admin import AdminClient
from fedctl.runtime.audit import AuditLog, verify

TERMINAL = ("FINISHED", "FAILED", "ABORTED")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    path = tmp_path_factory.mktemp("poc5") / "ws"
    poc.prepare(path, clients=3, port=free_port(), offline_grace=4.0)
    poc.start(path)
    yield path
    poc.stop(path)


def _admin(ws: Path, role: str = "project_admin") -> AdminClient:
    return AdminClient(poc.admin_kit(ws, role))


def _server_ws(ws: Path) -> Path:
    return Path(poc.load_info(ws)["server"]) / "workspace"


def _site_ws(ws: Path, site: str) -> Path:
    return Path(poc.load_info(ws)["sites"][site]) / "workspace"


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "audit.jsonl").read_text().splitlines()]


def _wait(admin: AdminClient, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.status(job_id)
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def _rounds(job: dict) -> list[dict]:
    path = Path(job["result_dir"]) / "metrics" / "global.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _kill(ws: Path, name: str) -> None:
    pid = poc.status(ws)["processes"][name]["pid"]
    proc = psutil.Process(pid)
    proc.kill()
    proc.wait(10)


def _wait_online(admin: AdminClient, names: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while {s["name"] for s in admin.sites() if s["online"]} != names:
        assert time.monotonic() < deadline, admin.sites()
        time.sleep(0.2)


def test_roles_are_enforced_and_denials_audited(ws, toy_dir, tmp_path, capsys) -> None:
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=1)
    with _admin(ws, "member") as member:
        with pytest.raises(
            PermissionDenied, match=r"member@poc.local \(role member\) may not submit"
        ):
            member.submit_recipe(recipe)
        assert member.sites()  # members may look
    with _admin(ws, "org_admin") as org_admin:
        with pytest.raises(PermissionDenied, match="may not submit"):
            org_admin.submit_recipe(recipe)
    with _admin(ws, "lead") as lead:
        job = lead.submit_recipe(recipe)
        assert _wait(lead, job["job_id"])["status"] == "FINISHED"
    with _admin(ws, "member") as member:
        with pytest.raises(PermissionDenied, match="may not download the results of job"):
            member.download(job["job_id"], tmp_path / "dl")
        with pytest.raises(PermissionDenied, match="may not manage"):
            member.abort(job["job_id"])
    with _admin(ws, "org_admin") as org_admin:  # same organisation: may download
        assert (org_admin.download(job["job_id"], tmp_path / "dl2") / "models").is_dir()
    # the CLI says it in one line and exits with the distinct code 3
    code = main(
        [
            "submit",
            "job",
            str(toy_dir),
            "--target",
            "poc",
            "--poc-workspace",
            str(ws),
            "--kit",
            poc.admin_kit(ws, "member"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.startswith("error: member@poc.local (role member) may not submit")
    denied = [r for r in _audit(_server_ws(ws)) if r["event"] == "access_denied"]
    assert {r["actor"] for r in denied} >= {"member@poc.local", "org_admin@poc.local"}
    assert {r["action"] for r in denied} >= {"submit", "download", "manage"}


def test_a_site_refuses_a_job_it_may_not_run(ws, toy_dir) -> None:
    policy = Path(poc.load_info(ws)["sites"]["site-3"]) / "local" / "authorization.yaml"
    original = policy.read_text()
    edited = yaml.safe_load(original)
    edited["roles"]["lead"]["submit"] = False
    policy.write_text(yaml.safe_dump(edited))
    try:
        with _admin(ws, "lead") as lead:
            recipe = load_recipe(toy_dir).recipe.with_overrides(min_clients=3, num_rounds=1)
            job = _wait(lead, lead.submit_recipe(recipe)["job_id"])
        assert job["status"] == "FAILED"
        assert "site-3 refused: site-3 does not run jobs from lead@poc.local" in job["reason"]
        assert "'submit' is not allowed by its local/authorization.yaml" in job["refused"]["site-3"]
        site_log = [r for r in _audit(_site_ws(ws, "site-3")) if r["event"] == "job_refused"]
        assert site_log and site_log[-1]["actor"] == "lead@poc.local"
        # an edited local/ does not break the kit (the agent kept serving)
        with _admin(ws) as admin:
            assert "site-3" in {s["name"] for s in admin.sites() if s["online"]}
    finally:
        policy.write_text(original)


def test_audit_trails_verify_and_tampering_is_detected(ws, tmp_path, capsys) -> None:
    for path in (_server_ws(ws), _site_ws(ws, "site-1")):
        result = verify(path / "audit.jsonl")
        assert result.ok and result.records >= 3, result.problems
        events = {r["event"] for r in _audit(path)}
        assert {"model_sent", "model_received"} <= events
    server_events = {r["event"] for r in _audit(_server_ws(ws))}
    assert {"job_submitted", "job_deployed", "job_finished", "admin_request"} <= server_events
    sent = next(r for r in _audit(_server_ws(ws)) if r["event"] == "model_sent")
    assert len(sent["sha256"]) == 64 and sent["size"] > 0 and "params" not in sent

    log = AuditLog(tmp_path / "audit.jsonl", "t")
    for i in range(5):
        log.record("thing", f"admin{i}@x", n=i)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    edited = tmp_path / "edited.jsonl"
    edited.write_text(
        "\n".join([*lines[:2], lines[2].replace("admin2", "mallory"), *lines[3:]]) + "\n"
    )
    assert "record 3 was modified" in verify(edited).problems[0]
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert any("does not follow the record before it" in p for p in verify(deleted).problems)
    (tmp_path / "audit.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # cut the last one
    assert any("removed from the end" in p for p in verify(tmp_path / "audit.jsonl").problems)
    assert main(["audit", "verify", str(edited)]) == 1
    assert "TAMPERED" in capsys.readouterr().out
    assert main(["audit", "verify", str(_server_ws(ws) / "audit.jsonl")]) == 0


def test_site_killed_mid_round_and_restarted(ws, toy_dir) -> None:
    """A site killed mid-round and back within seconds rejoins that very round: it is deployed
    again and given its task again, so even min_clients = all sites finishes (issue 11). Its
    client script dies with its agent, never orphaned."""
    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=6, min_clients=3, train_args="--sleep 0.6"
    )
    with _admin(ws) as admin:
        job_id = admin.submit_recipe(recipe)["job_id"]
        for ev in admin.follow(job_id):
            if ev.get("event") == "round_started" and ev.get("round") == 1:
                break
        agent = psutil.Process(poc.status(ws)["processes"]["site-3"]["pid"])
        scripts = agent.children(recursive=True)
        assert scripts  # site-3's client script is running the round
        _kill(ws, "site-3")
        _, alive = psutil.wait_procs(scripts, timeout=10)
        assert not alive, f"orphaned client scripts: {alive}"
        poc.start(ws, site="site-3")
        job = _wait(admin, job_id)
    assert job["status"] == "FINISHED", job["reason"]
    rounds = _rounds(job)
    assert [r["accepted"] for r in rounds] == [3] * 6  # round 2 included: the task came again


def test_job_that_loses_too_many_sites_fails_with_the_reason(ws, toy_dir) -> None:
    recipe = load_recipe(toy_dir).recipe.with_overrides(
        num_rounds=20, min_clients=3, train_args="--sleep 0.5"
    )
    with _admin(ws) as admin:
        job_id = admin.submit_recipe(recipe)["job_id"]
        for ev in admin.follow(job_id):
            if ev.get("event") == "round_completed":
                break
        _kill(ws, "site-2")
        started = time.monotonic()
        job = _wait(admin, job_id, timeout=60)
        assert time.monotonic() - started < 30  # failed promptly, not at the round deadline
        assert job["status"] == "FAILED"
        assert "site-2" in job["reason"] and "offline for more than 4s" in job["reason"]
        poc.start(ws, site="site-2")
        _wait_online(admin, {"site-1", "site-2", "site-3"})


def test_server_killed_and_restarted_mid_job_gives_the_same_model(ws, toy_dir, tmp_path) -> None:
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=5, train_args="--sleep 0.3")
    with _admin(ws) as admin:
        job_id = admin.submit_recipe(recipe, seed=3)["job_id"]
        for ev in admin.follow(job_id):
            if ev.get("event") == "round_completed" and ev.get("round") == 1:
                break
    _kill(ws, "server")
    poc.start(ws)  # restarts the server; the sites reconnect by themselves
    with _admin(ws) as admin:
        job = _wait(admin, job_id)
        assert job["status"] == "FINISHED", job["reason"]
        out = admin.download(job_id, tmp_path / "dl")
        events = [e["event"] for e in admin.events(job_id)]
    assert "server_restarted" in events and "resumed" in events
    run_log = (out / "run.log").read_text()
    assert "FAILED" not in run_log  # losing the server is not an outcome (issue 11)
    assert "lost the server process; the job resumes from its last checkpoint" in run_log
    got = load_file(out / "models" / "final.safetensors")[0]
    ref = recipe.run(
        SimEnv(num_clients=3, backend="local", seed=3, display="none", workspace=tmp_path / "sim")
    ).load_final()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_poc_stop_leaves_no_process(ws) -> None:
    procs = [psutil.Process(p["pid"]) for p in poc.status(ws)["processes"].values() if p["running"]]
    everything = procs + [c for p in procs for c in p.children(recursive=True)]
    poc.stop(ws)
    for p in everything:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
