"""How the simulator's communicator hands batches of sites to its workers (fedctl.sim.pool)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedctl.client.api import FLModel
from fedctl.codec.model import Task, TaskResult
from fedctl.sim.pool import BATCH_BYTES, MAX_BATCH, Pool, SimCommunicator, WorkerDied
from fedctl.sim.transport import LocalTransport


class _Token:
    def __init__(self, worker: int, sites: list[str]) -> None:
        self.worker, self.sites, self.done = worker, sites, False


class ScriptedPool(Pool):
    """Workers that finish a batch only when the test says so (``finish``), in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.transport = LocalTransport()
        self.sent: list[_Token] = []
        self.dead: set[int] = set()
        self.restarts: list[int] = []

    def submit(self, w: int, items: list[Any], model_id: str, box: list[Any]) -> _Token:
        token = _Token(w, [item.site for item in items])
        self.sent.append(token)
        return token

    def wait(self, tokens: list[Any], timeout: float) -> list[Any]:
        return [t for t in tokens if t.done or t.worker in self.dead]

    def result(self, token: Any) -> list[tuple[TaskResult, Any]]:
        if token.worker in self.dead:
            raise WorkerDied("process 1234 ended")
        results = []
        for site in token.sites:
            model = FLModel(params={"w": torch.zeros(1)})
            results.append((TaskResult(site, "t", model=model), None))
        return results

    def restart(self, w: int) -> None:
        self.restarts.append(w)
        self.dead.discard(w)

    def close(self) -> None:
        pass

    def finish(self, worker: int) -> None:
        """The worker's oldest unfinished batch is done."""
        next(t for t in self.sent if t.worker == worker and not t.done).done = True


def _broadcast(pool: ScriptedPool, sites: int, nbytes: int) -> Any:
    names = [f"site-{i + 1}" for i in range(sites)]
    comm = SimCommunicator(pool, names, resident=False)
    params = {"w": torch.zeros(max(1, nbytes // 4))}
    return comm, comm.broadcast(Task("train", FLModel(params=params), task_id="t"), names)


def test_a_worker_has_its_next_batch_while_it_runs_one_for_a_small_model() -> None:
    pool = ScriptedPool(size=1)
    comm, stream = _broadcast(pool, sites=4 * MAX_BATCH, nbytes=1000)
    assert stream.next(timeout=0.01) is None  # nothing finished yet
    assert [t.worker for t in pool.sent] == [0, 0]  # the one running and the next
    first = pool.sent[0].sites
    pool.finish(0)
    got = [stream.next(timeout=0.01) for _ in first]
    assert [r.site for r in got] == first and all(r.error is None for r in got)
    # the worker was given its next batch when the first came back, before it was taken in
    assert len(pool.sent) == 3 and not pool.sent[1].done
    comm.close()


def test_a_large_model_keeps_one_batch_per_worker() -> None:
    """No result is held while the next site trains a large model (memory)."""
    pool = ScriptedPool(size=1)
    comm, stream = _broadcast(pool, sites=3, nbytes=BATCH_BYTES)
    assert stream.next(timeout=0.01) is None
    assert len(pool.sent) == 1
    pool.finish(0)
    assert stream.next(timeout=0.01).site == pool.sent[0].sites[0]
    assert len(pool.sent) == 2
    comm.close()


@pytest.mark.parametrize("queued", [1, 2])
def test_a_dead_worker_fails_every_batch_it_held_once(queued: int) -> None:
    pool = ScriptedPool(size=1)
    nbytes = 1000 if queued == 2 else BATCH_BYTES
    comm, stream = _broadcast(pool, sites=3 * MAX_BATCH if queued == 2 else 3, nbytes=nbytes)
    assert stream.next(timeout=0.01) is None
    held = [site for t in pool.sent for site in t.sites]
    assert len(pool.sent) == queued
    pool.dead.add(0)
    failed = [stream.next(timeout=0.01) for _ in held]
    assert sorted(r.site for r in failed) == sorted(held)
    assert all(r.error == "worker process died: process 1234 ended" for r in failed)
    assert pool.restarts == [0]
    # the replaced worker goes on with the sites nobody ran yet
    assert pool.sent[-1].sites[0] not in held
    comm.close()


def test_cancelling_a_round_replaces_a_worker_holding_its_sites() -> None:
    pool = ScriptedPool(size=2)
    comm, stream = _broadcast(pool, sites=8 * MAX_BATCH, nbytes=1000)
    assert stream.next(timeout=0.01) is None
    assert sorted(t.worker for t in pool.sent) == [0, 0, 1, 1]
    stream.cancel()
    assert sorted(pool.restarts) == [0, 1] and not comm.busy
    comm.close()


def test_the_local_pool_runs_no_queued_batch_after_a_restart(tmp_path) -> None:
    """The local backend's thread cannot be killed: a batch queued behind the running one is
    cancelled when the worker is replaced, so no script runs for a cancelled round."""
    import threading

    from fedctl.sim.pool import LocalPool
    from fedctl.sim.worker import WorkerConfig

    (tmp_path / "client.py").write_text("")
    config = WorkerConfig("j", str(tmp_path), "client.py", "", str(tmp_path), 0, 2, False)
    pool = LocalPool(config)
    pool.core.close()
    started, release, ran = threading.Event(), threading.Event(), []

    class Core:
        def run_batch(self, items: list[Any], model_id: str, box: list[Any]) -> list[Any]:
            ran.append(items)
            started.set()
            release.wait(10)
            return []

        def close(self, restore_cwd: bool = True) -> None:
            ran.append("closed")

    pool.core = Core()  # type: ignore[assignment]
    first = pool.submit(0, ["a"], "m", [])
    second = pool.submit(0, ["b"], "m", [])
    assert started.wait(10)
    pool.restart(0)
    release.set()
    assert first.result(timeout=10) == [] and second.cancelled()
    pool.close()
    # the replaced core is closed by its own thread after its batch (its job folder's modules
    # go with it), and close() waits for that
    assert ran == [["a"], "closed"]


def test_a_large_next_batch_waits_for_the_reply_before_it_is_sent() -> None:
    """A worker blocked sending a large reply does not read: a large batch sent to it meanwhile
    could block the driver too. Small next batches go at once; a large one after the reply."""
    import pickle

    from fedctl.sim.procs import QUEUE_BYTES, ProcessPool, _Worker

    class Conn:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def send_bytes(self, data: bytes) -> None:
            self.sent.append(data)

        def recv_bytes(self) -> bytes:
            return pickle.dumps(("ok", []))

    pool = ProcessPool.__new__(ProcessPool)
    conn = Conn()
    pool.workers = [_Worker(1, conn)]  # type: ignore[arg-type]
    first = pool.submit(0, ["a"], "m", [])
    second = pool.submit(0, ["b"], "m", [])  # small: queued on the socket at once
    assert len(conn.sent) == 2
    assert pool.result(first) == [] and pool.result(second) == []
    third = pool.submit(0, ["c"], "m", [])
    fourth = pool.submit(0, ["x" * QUEUE_BYTES], "m", [])  # large: held back
    assert len(conn.sent) == 3
    assert pool.result(third) == []
    assert len(conn.sent) == 4 and b"x" * 100 in conn.sent[-1]
    assert pool.result(fourth) == [] and pool.workers[0].outstanding == 0
