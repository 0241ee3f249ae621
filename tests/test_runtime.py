"""The real runtime: a POC server and site agents as processes, mutual TLS on 127.0.0.1.

The module starts one POC (sites site-1 and site-2 running; site-3 provisioned but left off so
its kit can play a misbehaving peer) and stops it, by PID, in the last test.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import zipfile
from pathlib import Path

import grpc
import hugepages
import psutil
import pytest
import torch
from conftest import free_port, in_process_poc
from ground_truth import reference as ground_truth

from fedctl.cli.main import main
from fedctl.codec import frames
from fedctl.codec.tensorfiles import load_file
from fedctl.errors import FedctlError, PermissionDenied, UsageError
from fedctl.provision import poc_project, provision
from fedctl.recipe import PocEnv, SimEnv, load_recipe
from fedctl.runtime import poc
from fedctl.runtime.admin import AdminClient, ServerError
from fedctl.transport import rpc, tls

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def poc_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("poc") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    poc.start(ws, site="site-1")
    poc.start(ws, site="site-2")
    yield ws
    poc.stop(ws)


@pytest.fixture
def admin(poc_ws):
    with AdminClient(poc.admin_kit(poc_ws)) as client:
        yield client


def _wait_state(admin: AdminClient, job_id: str, states: tuple[str, ...], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.status(job_id)
        if job["status"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck in {job['status']}")


def _toy(toy_dir: Path, **changes):
    return load_recipe(toy_dir).recipe.with_overrides(**changes)


def test_poc_end_to_end_matches_simulation(poc_ws, tmp_path) -> None:
    recipe = load_recipe(REPO / "recipes" / "hello_pt").recipe.with_overrides(num_rounds=3)
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    assert run.mode == "poc" and run.rounds_completed == 3
    assert run.result_dir.is_dir() and run.final_model is not None
    assert (run.result_dir / "sites" / "site-1" / "client.log").read_text().count("accuracy") == 3
    sim = recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    a, b = run.load_final(), sim.load_final()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same model, bit for bit


def test_poc_equals_the_framework_free_loop(poc_ws, tmp_path) -> None:
    """A script that sends its cached model's own tensors and changes them right after send()
    gives the ground-truth FedAvg model in POC too (issue 9)."""
    args = f"--cache-dir {ground_truth.HELPERS} --mutate"
    recipe = load_recipe(ground_truth.WORKLOAD).recipe.with_overrides(num_rounds=3, train_args=args)
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path))
    assert run.ok, run.reason
    ground_truth.assert_bit_identical(run.load_final(), ground_truth.fedavg(2, 3))


@hugepages.needs_thp
def test_a_sites_script_backs_large_tensors_with_huge_pages(poc_ws, toy_dir, tmp_path) -> None:
    # as the simulator's workers do (fedctl.constants.SCRIPT_ENV_DEFAULTS): a script trains at
    # the same speed in simulation and on a site
    (toy_dir / "client.py").write_text(hugepages.CLIENT)
    recipe = _toy(toy_dir, num_rounds=2, train_args="")
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path))
    assert run.ok, run.reason
    logs = [p.read_text() for p in run.result_dir.rglob("client.log")]
    assert hugepages.reported(logs) == ["HUGE_PAGES True"] * 4


KEEPING_CLIENT = """\
import torch
import fedctl.client as flare

flare.init()
idx = flare.get_site_index()
previous = None  # the last round's model as received, kept across rounds (module level)
while flare.is_running():
    params = flare.receive().params
    out = {}
    for name, t in params.items():
        step = t - previous[name] if previous is not None else torch.zeros_like(t)
        out[name] = t + 0.5 * step + 0.001 * (idx + 1)
    flare.send(flare.FLModel(params=out, meta={"NUM_STEPS_CURRENT_ROUND": idx + 1}))
    for t in out.values():
        t.mul_(-3.0)  # the sent tensors change right after send()
    previous = params
"""


def test_poc_rewrites_large_files_in_place_only_once_nothing_maps_them(poc_ws, tmp_path) -> None:
    """A model over the spare threshold (64 MiB): downloads, results and global models are
    rewritten in place once retired, while each script keeps the previous round's model as
    received (the file it maps) and changes what it sent right after send(). The model equals
    the same loop in plain PyTorch, bit for bit."""
    from fedctl import _fs
    from fedctl.codec.tensorfiles import save_file
    from fedctl.recipe import FedAvgRecipe

    n = _fs.SPARE_MIN_BYTES // 4 + 1000
    init = {"w": torch.randn(n, generator=torch.Generator().manual_seed(3)), "b": torch.ones(5)}
    save_file(init, tmp_path / "initial.safetensors")
    code = tmp_path / "code"
    code.mkdir()
    (code / "client.py").write_text(KEEPING_CLIENT)
    recipe = FedAvgRecipe(
        "spares",
        2,
        4,
        tmp_path / "initial.safetensors",
        "client.py",
        base_dir=code,
        key_metric=None,
    )
    run = recipe.run(PocEnv(workspace=poc_ws, display="none", results=tmp_path / "run"))
    assert run.ok, run.reason
    model, previous = dict(init), [None, None]
    for _ in range(4):  # the framework-free loop: weights 1 and 2, summed in float64
        acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in model.items()}
        for i in range(2):
            for k, t in model.items():
                step = t - previous[i][k] if previous[i] is not None else torch.zeros_like(t)
                acc[k] += (t + 0.5 * step + 0.001 * (i + 1)).double() * (i + 1)
            previous[i] = model
        model = {k: (acc[k] / 3).to(v.dtype) for k, v in model.items()}
    ground_truth.assert_bit_identical(run.load_final(), model)


def test_cli_submit_status_logs_download(poc_ws, toy_dir, tmp_path, capsys) -> None:
    base = ["--poc-workspace", str(poc_ws)]
    code = main(
        [
            "submit",
            "job",
            str(toy_dir),
            "--target",
            "poc",
            *base,
            "--json",
            "--results",
            str(tmp_path / "r"),
        ]
    )
    out = json.loads(capsys.readouterr().out)["result"]
    assert code == 0 and out["status"] == "FINISHED" and out["rounds_completed"] == 3, out
    job_id = out["job_id"]
    assert main(["job", "status", job_id, *base, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["result"]
    assert status["status"] == "FINISHED" and status["deployed"] == ["site-1", "site-2"]
    assert main(["job", "logs", job_id, "--site", "site-2", *base]) == 0
    assert "site-2 starting" in capsys.readouterr().out
    assert main(["job", "logs", job_id, *base]) == 0
    assert "round 3 completed" in capsys.readouterr().out
    assert main(["job", "download", job_id, "-o", str(tmp_path / "dl"), *base]) == 0
    assert (tmp_path / "dl" / "models" / "final.safetensors").is_file()
    assert "downloaded" in capsys.readouterr().out
    assert main(["job", "list", *base, "--json"]) == 0
    assert job_id in [j["job_id"] for j in json.loads(capsys.readouterr().out)["result"]]
    assert main(["sites", *base, "--json"]) == 0
    online = [s["name"] for s in json.loads(capsys.readouterr().out)["result"] if s["online"]]
    assert online == ["site-1", "site-2"]
    assert main(["job", "status", "no-such-job", *base]) == 4
    assert "no job 'no-such-job'" in capsys.readouterr().err


def test_abort_mid_run(poc_ws, admin, toy_dir) -> None:
    job = admin.submit_recipe(_toy(toy_dir, num_rounds=200, train_args="--sleep 0.3"))
    for ev in admin.follow(job["job_id"]):
        if ev.get("event") == "round_completed":
            break
    done = admin.abort(job["job_id"])
    assert done["status"] == "ABORTED" and "aborted by project_admin@poc.local" in done["reason"]
    status = admin.status(job["job_id"])
    assert status["round"] is not None and status["round"] < 200  # 1-based
    # the sites stopped the job's scripts: their agents have no children left
    deadline = time.monotonic() + 20
    agents = [
        psutil.Process(poc.status(poc_ws)["processes"][s]["pid"]) for s in ("site-1", "site-2")
    ]
    while any(a.children(recursive=True) for a in agents) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(a.children(recursive=True) for a in agents)


def test_two_jobs_at_once(poc_ws, admin, toy_dir) -> None:
    recipe = _toy(toy_dir, num_rounds=4, train_args="--sleep 0.4")
    jobs = [admin.submit_recipe(recipe), admin.submit_recipe(recipe)]
    done = [_wait_state(admin, j["job_id"], ("FINISHED", "FAILED", "ABORTED")) for j in jobs]
    assert [d["status"] for d in done] == ["FINISHED", "FINISHED"]
    a, b = done
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # overlap


def _other_project(tmp_path: Path) -> dict[str, Path]:
    res = provision(poc_project(["site-1"], port=free_port()), tmp_path / "other")
    return {r.identity.name: r.kit_dir for r in res.kits}


def _server_address(poc_ws: Path) -> str:
    return f"127.0.0.1:{poc.load_info(poc_ws)['port']}"


def test_foreign_certificate_and_no_certificate_are_refused(poc_ws, tmp_path) -> None:
    other = _other_project(tmp_path)
    address = _server_address(poc_ws)
    with pytest.raises(ServerError):
        AdminClient(other["project_admin@poc.local"], address).sites()
    ca = Path(poc.load_info(poc_ws)["server"]) / "startup" / "rootCA.pem"
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())  # no client cert
    with grpc.secure_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as err:
        rpc.Stubs(channel).Admin(frames.encode({"t": "admin", "op": "sites"}), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a site certificate cannot act as an admin, nor an admin certificate as a site
    site3 = poc.load_info(poc_ws)["sites"]["site-3"]
    with tls.secure_channel(site3, options=rpc.CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as err:
            rpc.Stubs(channel).Admin(frames.encode({"t": "admin", "op": "sites"}), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "holds a site certificate" in err.value.details()
    with tls.secure_channel(poc.admin_kit(poc_ws), options=rpc.CHANNEL_OPTIONS) as channel:
        hello = frames.encode({"t": "hello", "incarnation": "x", "recv_seq": 0})
        with pytest.raises(grpc.RpcError) as err:
            list(rpc.Stubs(channel).Session(iter([hello]), timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unsafe_and_oversized_bundles_are_refused(poc_ws, admin, tmp_path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("fedctl-job.yaml", "x: 1\n")
        zf.writestr("../../outside.py", "print('escaped')\n")
    first = {
        "t": "submit",
        "size": evil.stat().st_size,
        "seed": 0,
        "sha256": __import__("hashlib").sha256(evil.read_bytes()).hexdigest(),
    }
    with pytest.raises(grpc.RpcError) as err:
        admin.stubs.AdminUpload(rpc.file_frames(evil, first), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsafe path '../../outside.py'" in err.value.details()
    huge = {**first, "size": 2**45}
    with pytest.raises(grpc.RpcError) as err:
        admin.stubs.AdminUpload(rpc.file_frames(evil, huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the server's limit" in err.value.details()
    assert not (tmp_path.parent / "outside.py").exists()


def test_malformed_frame_closes_only_that_stream(poc_ws, admin) -> None:
    site3 = poc.load_info(poc_ws)["sites"]["site-3"]
    with tls.secure_channel(site3, options=rpc.CHANNEL_OPTIONS) as channel:
        stubs = rpc.Stubs(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stubs.Session(iter([b"this is not a frame"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        hello = frames.encode({"t": "hello", "incarnation": "rogue", "recv_seq": 0})

        def messages():
            yield hello
            time.sleep(0.3)
            yield b"FC\x01\x00\xff\xff\xff\xffgarbage"

        with pytest.raises(grpc.RpcError) as err:
            list(stubs.Session(messages(), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed frame from site-3" in err.value.details()
    online = [s["name"] for s in admin.sites() if s["online"]]
    assert online == ["site-1", "site-2"]  # the others were served throughout


def test_hostile_results_fail_only_their_site(poc_ws, admin, toy_dir) -> None:
    """A site with a valid kit sends, round after round, a tensor header nested 50,000 deep,
    one holding an integer of 5,000 digits, one whose shape overflows beside a zero dimension,
    and a weight that overflows the sum: each is that site's failure, named with its reason in
    the round and the audit trail, and the job goes on with the honest site (issue 11)."""
    evil = "--evil-sites site-2 --evil deep,bigint,overflow,weight:1.7e308"
    shutil.copyfile(TESTS / "hostile_results.py", toy_dir / "hostile.py")
    job = admin.submit_recipe(_toy(toy_dir, num_rounds=4, min_clients=1, train_args=evil))
    done = _wait_state(admin, job["job_id"], ("FINISHED", "FAILED", "ABORTED"))
    assert done["status"] == "FINISHED", done["reason"]
    result_dir = Path(done["result_dir"])
    rounds = [json.loads(x) for x in (result_dir / "metrics/global.jsonl").read_text().splitlines()]
    assert [(r["accepted"], r["failed"]) for r in rounds] == [(1, ["site-2"])] * 4
    log = (result_dir / "run.log").read_text()
    for reason in (
        "JSON nested deeper than 32",
        "integer of 5000 digits is out of range",
        "has more than 281474976710656 elements",
        "aggregation weight must be a finite number ≤ 1e+12",
    ):
        assert reason in log, reason
    server_audit = Path(poc.load_info(poc_ws)["server"]) / "workspace" / "audit.jsonl"
    failed = [
        r
        for r in map(json.loads, server_audit.read_text().splitlines())
        if r["event"] == "result_failed" and r.get("job") == job["job_id"]
    ]
    assert [r["actor"] for r in failed] == ["site-2"] * 4


def test_nan_metrics_finish_in_poc_as_in_simulation(poc_ws, admin, toy_dir) -> None:
    job = admin.submit_recipe(_toy(toy_dir, num_rounds=2, train_args="--nan-loss"))
    done = _wait_state(admin, job["job_id"], ("FINISHED", "FAILED", "ABORTED"))
    assert done["status"] == "FINISHED", done["reason"]
    sites = Path(done["result_dir"]) / "metrics" / "sites.jsonl"
    assert all(json.loads(x)["metrics"]["loss"] is None for x in sites.read_text().splitlines())


def test_hostile_admin_frames_are_invalid_arguments(poc_ws, admin) -> None:
    deep: list = []
    for _ in range(40):
        deep = [deep]
    for header, expected in (
        ({"t": "admin", "op": "status", "job": "x", "after": 10**40}, "out of range"),
        ({"t": "admin", "op": "list", "job": None, "after": deep}, "nested deeper than 32"),
        ({"t": "admin", "op": "frobnicate"}, "unknown admin operation 'frobnicate'"),
        ({"t": "admin", "op": "status"}, "needs a job id"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            admin.stubs.Admin(frames.encode(header), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, header
        assert expected in err.value.details()


def test_a_site_may_only_upload_results_it_owes(poc_ws, admin, toy_dir) -> None:
    from fedctl.codec import protocol

    job = admin.submit_recipe(_toy(toy_dir, num_rounds=50, train_args="--sleep 0.2"))
    _wait_state(admin, job["job_id"], ("RUNNING",))
    blob = Path(poc_ws) / "junk.bin"
    blob.write_bytes(b"x" * 1000)
    site1 = poc.load_info(poc_ws)["sites"]["site-1"]
    try:
        with tls.secure_channel(site1, options=rpc.CHANNEL_OPTIONS) as channel:
            first = protocol.Push(job["job_id"], "not-a-task-of-mine", 1000)
            with pytest.raises(grpc.RpcError) as err:
                rpc.Stubs(channel).Push(rpc.file_frames(blob, first), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "owes no result for task 'not-a-task-of-mine'" in err.value.details()
    finally:
        admin.abort(job["job_id"])


def test_finished_job_processes_are_reaped(poc_ws, admin) -> None:
    server = psutil.Process(poc.status(poc_ws)["processes"]["server"]["pid"])
    deadline = time.monotonic() + 10
    while any(c.status() == psutil.STATUS_ZOMBIE for c in server.children()):
        assert time.monotonic() < deadline, "a finished job's process is left a zombie"
        time.sleep(0.2)


def test_privacy_filters_and_central_dp_in_poc(poc_ws, admin, toy_dir) -> None:
    """The job's filters run on the sites (exclude_vars: fc.bias never reaches the server),
    central DP reports ε, and the site audit names the filters every result went through."""
    recipe = _toy(
        toy_dir,
        num_rounds=2,
        privacy=[
            {"name": "exclude_vars", "patterns": ["fc.bias"]},
            {"name": "clip_update", "max_norm": 0.2},
            {"name": "clip_update", "max_norm": 0.1, "at": "result_in"},
        ],
        central_dp={"noise_multiplier": 0.8, "clip": 0.5, "delta": 1e-3},
    )
    job = admin.submit_recipe(recipe)
    done = _wait_state(admin, job["job_id"], ("FINISHED", "FAILED", "ABORTED"))
    assert done["status"] == "FINISHED", done["reason"]
    result_dir = Path(done["result_dir"])
    final = load_file(result_dir / "models" / "final.safetensors")[0]
    assert torch.equal(final["fc.bias"], recipe.initial_params()["fc.bias"])
    rounds = [json.loads(x) for x in (result_dir / "metrics/global.jsonl").read_text().splitlines()]
    assert [r["metrics"]["dp_epsilon"] > 0 for r in rounds] == [True, True]
    result = json.loads((result_dir / "result.json").read_text())
    assert result["privacy"]["rounds"] == 2
    for site in ("site-1", "site-2"):
        audit = Path(poc.load_info(poc_ws)["sites"][site]) / "workspace" / "audit.jsonl"
        sent = [
            r
            for r in map(json.loads, audit.read_text().splitlines())
            if r["event"] == "model_sent" and r.get("job") == job["job_id"]
        ]
        assert len(sent) == 2 and all(r["filters"] == ["exclude_vars", "clip_update"] for r in sent)
    server_audit = Path(poc.load_info(poc_ws)["server"]) / "workspace" / "audit.jsonl"
    applied = [
        (r["actor"], r["point"], r["filters"])
        for r in map(json.loads, server_audit.read_text().splitlines())
        if r["event"] == "filters_applied" and r.get("job") == job["job_id"]
    ]
    expected = [(site, "result_in", ["clip_update"]) for site in ("site-1", "site-2")]
    assert sorted(applied) == sorted(expected * 2)


def test_a_site_policy_refuses_a_job_and_an_invalid_one_stops_the_site(
    poc_ws, admin, toy_dir, capsys
) -> None:
    site3 = Path(poc.load_info(poc_ws)["sites"]["site-3"])
    policy = site3 / "local" / "privacy.yaml"
    original = policy.read_text()
    try:
        policy.write_text("version: 1\nfilters:\n  - name: gausian_noise\n    sigma: 1\n")
        assert main(["client", "start", "--kit", str(site3)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(policy) in err[0]
        assert (
            "filters[0]: unknown filter 'gausian_noise' (did you mean 'gaussian_noise'?)" in err[0]
        )
        policy.write_text("version: 1\nrequire:\n  central_dp: true\n")
        poc.start(poc_ws, site="site-3")
        job = admin.submit_recipe(_toy(toy_dir, num_rounds=1))
        done = _wait_state(admin, job["job_id"], ("FINISHED", "FAILED", "ABORTED"))
        assert done["status"] == "FINISHED", done["reason"]  # site-1 and site-2 ran it
        assert done["refused"] == {
            "site-3": "site-3 refuses the job: its privacy policy requires central DP "
            "(central_dp) and the job has none"
        }
    finally:
        poc.stop(poc_ws, site="site-3")
        policy.write_text(original)


def test_reconnect_neither_loses_nor_duplicates(toy_dir, tmp_path) -> None:
    """In-process server and agents, so the test can cut a site's stream in the middle."""
    with in_process_poc(tmp_path) as poc_run:
        admin = poc_run.admin
        job = admin.submit_recipe(_toy(toy_dir, num_rounds=4, train_args="--sleep 0.2"))
        cut = 0
        for ev in admin.follow(job["job_id"]):
            if ev.get("event") in ("round_started", "result") and cut < 3:
                link = poc_run.server.sites["site-1"].link
                if link.online:
                    link.close()  # drop site-1's stream
                    cut += 1
            if ev["t"] == "end":
                break
        final = admin.status(job["job_id"])
        result_dir = Path(final["result_dir"])
    assert final["status"] == "FINISHED", final["reason"]
    rows = [
        json.loads(line)
        for line in (result_dir / "metrics" / "sites.jsonl").read_text().splitlines()
    ]
    assert sorted((r["round"], r["site"]) for r in rows) == [
        (r, s) for r in range(1, 5) for s in ("site-1", "site-2")
    ]


def test_busy_port_is_a_clear_error(tmp_path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        poc.prepare(tmp_path / "ws", clients=1, port=port)
        with pytest.raises(FedctlError, match=rf"port {port} is in use by PID \d+"):
            poc.start(tmp_path / "ws")
        assert poc.status(tmp_path / "ws")["processes"]["server"]["running"] is False
    finally:
        holder.close()


def test_admin_commands_need_a_kit(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("FEDCTL_ADMIN_KIT", raising=False)
    code = main(["job", "list", "--poc-workspace", str(tmp_path / "none")])
    assert code == 4 and "run `fedctl poc prepare` first" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--target prod needs --kit"):
        from fedctl.cli.common import admin_client

        admin_client(None, None, "prod")
    assert issubclass(PermissionDenied, FedctlError)


def test_poc_stop_leaves_no_process(poc_ws) -> None:
    procs = [
        psutil.Process(p["pid"]) for p in poc.status(poc_ws)["processes"].values() if p["running"]
    ]
    everything = procs + [c for p in procs for c in p.children(recursive=True)]
    assert len(procs) == 3
    stopped = poc.stop(poc_ws)
    assert sorted(stopped) == ["server", "site-1", "site-2"]
    for p in everything:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    assert poc.stop(poc_ws) == []  # nothing left to stop


def test_server_code_needs_the_operators_consent(toy_dir, tmp_path) -> None:
    """A job with server_eval runs code on the server: refused unless the server allows it."""
    from fedctl.runtime.server import Server

    (toy_dir / "evaluate.py").write_text("def evaluate(params, rnd):\n    return {'n': 1.0}\n")
    recipe = load_recipe(toy_dir).recipe.with_overrides(server_eval="evaluate.py:evaluate")
    res = provision(poc_project(1, port=free_port()), tmp_path / "ws")
    kits = {r.identity.name: r.kit_dir for r in res.kits}
    server = Server(tls.load_kit(kits["localhost"]))
    port = server.start("127.0.0.1:0")
    try:
        with AdminClient(kits["project_admin@poc.local"], f"127.0.0.1:{port}") as admin:
            with pytest.raises(PermissionDenied, match="does not run code from jobs"):
                admin.submit_recipe(recipe)
            assert admin.list_jobs() == []
    finally:
        server.stop()
