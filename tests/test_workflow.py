"""FedAvg and the round policy, against a scripted in-process communicator."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest
import torch

from fedctl.codec.model import FLModel, Task, TaskResult
from fedctl.workflows.base import (
    Communicator,
    JobAborted,
    NotEnoughResults,
    ResultStream,
    WorkflowContext,
)
from fedctl.workflows.fedavg import FedAvg

# behaviour(site, task) -> (delay seconds or None for "never answers", result maker)
Behaviour = Callable[[str, Task], tuple[float | None, Callable[[], TaskResult]]]


class ScriptedStream(ResultStream):
    def __init__(self, plan: list[tuple[float | None, str, Callable[[], TaskResult]]]) -> None:
        self.t0 = time.monotonic()
        self.plan = sorted((p for p in plan if p[0] is not None), key=lambda p: p[0])  # type: ignore[arg-type,return-value]
        self._pending = {site for _, site, _ in plan}
        self.targets = tuple(sorted(self._pending))
        self.cancelled = False

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def next(self, timeout: float | None) -> TaskResult | None:
        if not self.plan:
            time.sleep(timeout or 0)
            return None
        delay, site, make = self.plan[0]
        wait = self.t0 + delay - time.monotonic()  # type: ignore[operator]
        if timeout is not None and wait > timeout:
            time.sleep(max(timeout, 0))
            return None
        time.sleep(max(wait, 0))
        self.plan.pop(0)
        self._pending.discard(site)
        return make()

    def cancel(self) -> None:
        self.cancelled = True
        self._pending.clear()


class ScriptedComm(Communicator):
    def __init__(self, sites: Sequence[str], behaviour: Behaviour) -> None:
        self._sites = list(sites)
        self.behaviour = behaviour
        self.tasks: list[Task] = []

    def sites(self) -> list[str]:
        return list(self._sites)

    def broadcast(self, task: Task, targets: Sequence[str]) -> ScriptedStream:
        self.tasks.append(task)
        plan = []
        for s in targets:
            delay, make = self.behaviour(s, task)
            plan.append((delay, s, make))
        return ScriptedStream(plan)


def _ok(site: str, task: Task, shift: float, steps: int | None = None, **kw) -> TaskResult:
    params = {k: v + shift for k, v in task.model.params.items()}  # type: ignore[union-attr]
    meta = {} if steps is None else {"NUM_STEPS_CURRENT_ROUND": steps}
    return TaskResult(
        site, task.task_id, model=FLModel(params=params, metrics={"acc": shift}, meta=meta, **kw)
    )


def _ctx(comm: Communicator, events: list[dict] | None = None) -> WorkflowContext:
    return WorkflowContext(comm, listeners=[events.append] if events is not None else [])


SITES = ["site-1", "site-2", "site-3"]
INITIAL = {"w": torch.zeros(2)}


def test_fedavg_rounds_compute_the_weighted_mean() -> None:
    def behaviour(site: str, task: Task):
        i = SITES.index(site)
        return 0.0, lambda: _ok(site, task, shift=float(i + 1), steps=i + 1)

    comm = ScriptedComm(SITES, behaviour)
    events: list[dict] = []
    out = FedAvg(2, 3).run(_ctx(comm, events), INITIAL)
    # each round adds (1*1 + 2*2 + 3*3) / 6 = 14/6
    assert torch.allclose(out["w"], torch.full((2,), 2 * 14 / 6))
    rounds = [e for e in events if e["event"] == "round_completed"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["metrics"]["acc"] == pytest.approx(14 / 6)
    assert comm.tasks[1].model.current_round == 1 and comm.tasks[1].model.total_rounds == 2


def test_failed_site_with_enough_survivors() -> None:
    def behaviour(site: str, task: Task):
        if site == "site-2":
            return 0.0, lambda: TaskResult(
                site, task.task_id, error="ValueError: bad", traceback="tb"
            )
        return 0.0, lambda: _ok(site, task, 1.0, 1)

    events: list[dict] = []
    out = FedAvg(1, 2).run(_ctx(ScriptedComm(SITES, behaviour), events), INITIAL)
    assert torch.equal(out["w"], torch.ones(2))
    done = next(e for e in events if e["event"] == "round_completed")
    assert done["failed"] == {"site-2": "ValueError: bad"} and len(done["accepted"]) == 2
    failed = next(e for e in events if e["event"] == "result" and not e["ok"])
    assert failed["site"] == "site-2" and failed["traceback"] == "tb"


def test_not_enough_results_fails_fast_with_every_reason() -> None:
    def behaviour(site: str, task: Task):
        if site in ("site-1", "site-2"):
            return 0.0, lambda: TaskResult(site, task.task_id, error=f"RuntimeError: {site} broke")
        return 30.0, lambda: _ok(site, task, 1.0, 1)

    wf = FedAvg(1, 2, round_timeout=60)
    start = time.monotonic()
    with pytest.raises(NotEnoughResults) as err:
        wf.run(_ctx(ScriptedComm(SITES, behaviour)), INITIAL)
    assert time.monotonic() - start < 5  # did not wait for the deadline
    message = str(err.value)
    assert "round 1: only 0 of the 2 required results" in message
    assert "site-1: RuntimeError: site-1 broke" in message and "site-2: RuntimeError" in message


def test_deadline_closes_the_round_and_names_the_silent_sites() -> None:
    def behaviour(site: str, task: Task):
        if site == "site-3":
            return None, lambda: _ok(site, task, 100.0, 1)  # never answers
        return 0.0, lambda: _ok(site, task, 1.0, 1)

    events: list[dict] = []
    out = FedAvg(1, 2, round_timeout=0.3).run(_ctx(ScriptedComm(SITES, behaviour), events), INITIAL)
    assert torch.equal(out["w"], torch.ones(2))
    done = next(e for e in events if e["event"] == "round_completed")
    assert done["missing"] == ["site-3"]

    with pytest.raises(NotEnoughResults, match="no answer within the deadline from site-3"):
        FedAvg(1, 3, round_timeout=0.3).run(_ctx(ScriptedComm(SITES, behaviour)), INITIAL)


def test_wait_after_min_drops_stragglers() -> None:
    def behaviour(site: str, task: Task):
        delay = 5.0 if site == "site-3" else 0.0
        return delay, lambda: _ok(site, task, 1.0, 1)

    events: list[dict] = []
    start = time.monotonic()
    FedAvg(1, 2, wait_after_min=0.1).run(_ctx(ScriptedComm(SITES, behaviour), events), INITIAL)
    assert time.monotonic() - start < 3
    done = next(e for e in events if e["event"] == "round_completed")
    assert done["missing"] == ["site-3"] and len(done["accepted"]) == 2


def test_missing_weight_defaults_to_one_with_one_warning_per_site() -> None:
    def behaviour(site: str, task: Task):
        return 0.0, lambda: _ok(site, task, float(SITES.index(site)), steps=None)

    events: list[dict] = []
    out = FedAvg(3, 3).run(_ctx(ScriptedComm(SITES, behaviour), events), INITIAL)
    assert torch.allclose(out["w"], torch.full((2,), 3.0))  # plain mean of 0, 1, 2 each round
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 3 and all("NUM_STEPS_CURRENT_ROUND" in w["message"] for w in warnings)


def test_nan_update_is_rejected_as_a_failure() -> None:
    def behaviour(site: str, task: Task):
        shift = float("nan") if site == "site-1" else 1.0
        return 0.0, lambda: _ok(site, task, shift, 1)

    events: list[dict] = []
    out = FedAvg(1, 2).run(_ctx(ScriptedComm(SITES, behaviour), events), INITIAL)
    assert torch.equal(out["w"], torch.ones(2))
    done = next(e for e in events if e["event"] == "round_completed")
    assert "NaN" in done["failed"]["site-1"]


def test_abort_stops_the_job() -> None:
    comm = ScriptedComm(SITES, lambda s, t: (0.0, lambda: _ok(s, t, 1.0, 1)))
    ctx = _ctx(comm)
    ctx.abort.set()
    with pytest.raises(JobAborted):
        FedAvg(2, 2).run(ctx, INITIAL)
    assert comm.tasks == []


def test_too_few_sites_fails_with_the_reason() -> None:
    comm = ScriptedComm(["site-1"], lambda s, t: (0.0, lambda: _ok(s, t, 1.0, 1)))
    with pytest.raises(Exception, match="needs 2 sites but only 1 are available"):
        FedAvg(1, 2).run(_ctx(comm), INITIAL)


def test_unreachable_minimum_is_not_called_a_deadline() -> None:
    def behaviour(site: str, task: Task):
        if site == "site-1":
            return 0.0, lambda: TaskResult(site, task.task_id, error="RuntimeError: x")
        return 30.0, lambda: _ok(site, task, 1.0, 1)

    with pytest.raises(NotEnoughResults) as err:
        FedAvg(1, 3).run(_ctx(ScriptedComm(SITES, behaviour)), INITIAL)
    assert "not waiting for site-2, site-3: the minimum can no longer be reached" in str(err.value)


def test_a_result_is_dropped_as_soon_as_it_is_aggregated() -> None:
    """A large result is a model-sized buffer: the round must not keep it while it waits for
    the next one."""
    import gc
    import weakref

    sent: list[weakref.ref] = []
    alive_at_next: list[int] = []

    def behaviour(site: str, task: Task):
        def make() -> TaskResult:
            result = _ok(site, task, shift=1.0, steps=1)
            sent.append(weakref.ref(result.model.params["w"]))  # type: ignore[union-attr]
            return result

        return 0.05 * SITES.index(site), make

    class Watching(ScriptedComm):
        def broadcast(self, task: Task, targets: Sequence[str]) -> ScriptedStream:
            stream = super().broadcast(task, targets)
            inner = stream.next

            def next_(timeout: float | None) -> TaskResult | None:
                gc.collect()
                alive_at_next.append(sum(r() is not None for r in sent))
                return inner(timeout)

            stream.next = next_  # type: ignore[method-assign]
            return stream

    FedAvg(1, 3).run(_ctx(Watching(SITES, behaviour)), INITIAL)
    assert len(sent) == 3
    assert alive_at_next and max(alive_at_next) == 0
