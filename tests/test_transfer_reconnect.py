"""A connection that drops in the middle of a model download or a result upload: the site does
the transfer again on its next session, and the job's model is the one a run without drops
gives (in-process server and agents, so the test can cut the streams at that exact moment)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from conftest import free_port

from fedctl.codec.tensorfiles import load_file
from fedctl.provision import poc_project, provision
from fedctl.recipe import SimEnv, load_recipe
from fedctl.runtime.admin import AdminClient
from fedctl.transport import rpc, tls


def test_a_drop_mid_transfer_is_retried_not_a_failed_task(toy_dir, tmp_path, monkeypatch) -> None:
    from fedctl.runtime.agent import SiteAgent
    from fedctl.runtime.server import Server

    res = provision(poc_project(2, port=free_port()), tmp_path / "ws")
    kits = {r.identity.name: r.kit_dir for r in res.kits}
    server = Server(tls.load_kit(kits["localhost"]), mode="poc")
    port = server.start("127.0.0.1:0")
    agents = [
        SiteAgent(tls.load_kit(kits[s]), address=f"127.0.0.1:{port}") for s in ("site-1", "site-2")
    ]
    sends = rpc.file_frames
    cuts = {"download": 0, "upload": 0}
    cut_lock = threading.Lock()

    def cutting(path: Any, first: Any = None, sha256: str | None = None):
        """The frames of a task model (server) or a result (site); the first two of each kind
        stop after their first frame, every site's stream is dropped, and they go on only once
        the sites have seen the drop (so the transfer is broken, not finished)."""
        name = Path(path).name
        kind = "upload" if first is not None else "download" if name.startswith("task") else None
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
    for a in agents:
        threading.Thread(target=a.run, daemon=True).start()
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3)
    try:
        with AdminClient(kits["project_admin@poc.local"], f"127.0.0.1:{port}") as admin:
            while len([s for s in admin.sites() if s["online"]]) < 2:
                time.sleep(0.1)
            job = admin.submit_recipe(recipe)
            for ev in admin.follow(job["job_id"]):
                if ev["t"] == "end":
                    break
            final = admin.status(job["job_id"])
            assert final["status"] == "FINISHED", final["reason"]
            admin.download(job["job_id"], tmp_path / "out")
    finally:
        for a in agents:
            a.stop()
        server.stop()
    assert cuts == {"download": 2, "upload": 2}
    poc_model = load_file(tmp_path / "out" / "models" / "final.safetensors")[0]
    sim = recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    sim_model = sim.load_final()
    assert poc_model.keys() == sim_model.keys()
    assert all(torch.equal(poc_model[k], sim_model[k]) for k in sim_model)
