"""Shared fixtures. Ray (when a test needs it) starts once per session on 127.0.0.1, with HOME in
a temporary folder so its auth token never lands in the user's home."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TOY = TESTS / "toy"

_home = tempfile.mkdtemp(prefix="fedctl-test-home-")
os.environ["HOME"] = _home
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_sim(tmp_path: Path, name: str, n: int = 3, **kw: Any) -> Any:
    """A quiet in-process simulation of ``n`` sites with its workspace in ``tmp_path / name``."""
    from fedctl.recipe import SimEnv

    return SimEnv(num_clients=n, backend="local", workspace=tmp_path / name, display="none", **kw)


@contextmanager
def in_process_poc(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A two-site POC served from this process, so a test can reach into the server's links:
    ``server``, ``agents`` (running, both online) and an ``admin`` client; all stopped after."""
    from fedctl.provision import poc_project, provision
    from fedctl.runtime.admin import AdminClient
    from fedctl.runtime.agent import SiteAgent
    from fedctl.runtime.server import Server
    from fedctl.transport import tls

    res = provision(poc_project(2, port=free_port()), tmp_path / "ws")
    kits = {r.identity.name: r.kit_dir for r in res.kits}
    server = Server(tls.load_kit(kits["localhost"]), mode="poc")
    address = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    agents = [SiteAgent(tls.load_kit(kits[s]), address=address) for s in ("site-1", "site-2")]
    for a in agents:
        threading.Thread(target=a.run, daemon=True).start()
    try:
        with AdminClient(kits["project_admin@poc.local"], address) as admin:
            while len([s for s in admin.sites() if s["online"]]) < 2:
                time.sleep(0.1)
            yield SimpleNamespace(server=server, agents=agents, admin=admin)
    finally:
        for a in agents:
            a.stop()
        server.stop()


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest difference between two models with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    shutil.rmtree(_home, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray instance shared by the simulator tests (stopped at the end of the session)."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    yield ray


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    """A fresh copy of the toy recipe folder."""
    dst = tmp_path / "toy"
    shutil.copytree(TOY, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture
def toy_recipe(toy_dir: Path):
    """The toy recipe loaded from its folder."""
    from fedctl.recipe import load_recipe

    return load_recipe(toy_dir).recipe
