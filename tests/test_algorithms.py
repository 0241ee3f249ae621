"""Server-side algorithms against the scripted communicator (no Ray): FedNova, SCAFFOLD,
FedOpt/FedAvgM, FedProx, robust aggregation, sampling, evaluation, personalization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_workflow import ScriptedComm, _ctx

from fedctl.codec.keys import (
    EVAL_KIND_KEY,
    FEDPROX_MU_KEY,
    MODEL_OWNER_KEY,
    PERSONAL_KEY,
    SCAFFOLD_C_PREFIX,
    SCAFFOLD_DC_PREFIX,
    SCAFFOLD_KEY,
)
from fedctl.codec.model import (
    TASK_EVALUATE,
    TASK_SUBMIT_MODEL,
    FLModel,
    ParamsType,
    Task,
    TaskResult,
)
from fedctl.sampling import sample_count, sample_sites
from fedctl.tracking.store import RunStore, cross_site_lines
from fedctl.workflows.asynchronous import AsyncAggregation
from fedctl.workflows.base import NotEnoughResults, WorkflowContext
from fedctl.workflows.cyclic import Cyclic
from fedctl.workflows.fedavg import FedAvg
from fedctl.workflows.fedavgm import FedAvgM
from fedctl.workflows.fednova import FedNova
from fedctl.workflows.fedopt import FedAdam
from fedctl.workflows.fedprox import FedProx
from fedctl.workflows.personalized import Personalized
from fedctl.workflows.scaffold import Scaffold

SITES = [f"site-{i}" for i in range(1, 6)]
INITIAL = {"w": torch.zeros(3), "n": torch.tensor(0)}
RNG = np.random.default_rng(11)
# each site moves the model by a fixed offset each round
OFFSETS = {s: torch.tensor(RNG.normal(size=3), dtype=torch.float32) for s in SITES}


def _train(site: str, task: Task, steps: int | None = 2, samples: int | None = None, extra=None):
    params = {"w": task.model.params["w"] + OFFSETS[site], "n": task.model.params["n"] + 1}
    meta = {}
    if steps is not None:
        meta["NUM_STEPS_CURRENT_ROUND"] = steps
    if samples is not None:
        meta["NUM_SAMPLES"] = samples
    params.update(extra or {})
    return TaskResult(site, task.task_id, model=FLModel(params=params, meta=meta))


def _train_any(site: str, task: Task) -> TaskResult:
    """``_train``, with the control variate's update SCAFFOLD's tasks ask for."""
    extra = {}
    if SCAFFOLD_C_PREFIX + "w" in task.model.params:
        extra = {SCAFFOLD_DC_PREFIX + "w": OFFSETS[site] * 0.1}
    return _train(site, task, extra=extra)


def _comm(make, sites=SITES) -> ScriptedComm:
    return ScriptedComm(sites, lambda s, t: (0.0, lambda: make(s, t)))


# ---------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_by_seed_and_round() -> None:
    sites = [f"site-{i}" for i in range(1, 101)]
    a = sample_sites(sites, 0.1, 2, seed=7, rnd=3)
    assert sorted(a) == sorted(sample_sites(sites[::-1], 0.1, 2, seed=7, rnd=3))
    assert len(a) == 10 and a == sample_sites(sites, 0.1, 2, seed=7, rnd=3)
    assert a != sample_sites(sites, 0.1, 2, seed=8, rnd=3)
    assert a != sample_sites(sites, 0.1, 2, seed=7, rnd=4)
    assert sample_count(0.01, 100, 5) == 5  # never below the round's minimum
    assert sample_count(30, 10, 2) == 10 and sample_count(None, 10, 2) == 10


def test_fedavg_samples_targets_per_round_reproducibly() -> None:
    def targets(seed: int) -> list[list[str]]:
        events: list[dict] = []
        comm = _comm(lambda s, t: _train(s, t))
        FedAvg(3, 2, sample_clients=2).run(
            WorkflowContext(comm, seed=seed, listeners=[events.append]), INITIAL
        )
        return [e["targets"] for e in events if e["event"] == "round_started"]

    first = targets(1)
    assert all(len(t) == 2 for t in first) and first == targets(1)
    assert any(targets(s) != first for s in (2, 3, 4))


def test_sample_spec_errors() -> None:
    with pytest.raises(ValueError, match="below min_clients=3"):
        FedAvg(1, 3, sample_clients=2)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        FedAvg(1, 3, sample_clients=1.5)


# ---------------------------------------------------------------------------- FedNova


def test_fednova_with_equal_steps_is_fedavg() -> None:
    comm = _comm(lambda s, t: _train(s, t, steps=4))
    nova = FedNova(3, 5).run(_ctx(comm), INITIAL)
    avg = FedAvg(3, 5).run(_ctx(_comm(lambda s, t: _train(s, t, steps=4))), INITIAL)
    assert torch.equal(nova["w"], avg["w"]) and torch.equal(nova["n"], avg["n"])


def test_fednova_normalises_by_steps() -> None:
    steps = {s: i + 1 for i, s in enumerate(SITES)}
    samples = {s: 10 * (i + 2) for i, s in enumerate(SITES)}
    comm = _comm(lambda s, t: _train(s, t, steps=steps[s], samples=samples[s]))
    out = FedNova(1, 5).run(_ctx(comm), INITIAL)
    p = np.array([samples[s] for s in SITES], dtype=float)
    tau = np.array([steps[s] for s in SITES], dtype=float)
    delta = np.stack([OFFSETS[s].double().numpy() for s in SITES])
    d = delta / tau[:, None]
    tau_eff = (p * tau).sum() / p.sum()
    expected = tau_eff * (p[:, None] * d).sum(0) / p.sum()
    np.testing.assert_allclose(out["w"].numpy(), expected, rtol=1e-6)
    # FedAvg (weights = steps) would give a different model
    avg = (tau[:, None] * delta).sum(0) / tau.sum()
    assert not np.allclose(avg, expected, rtol=1e-3)


def test_fednova_needs_steps_and_takes_no_aggregator() -> None:
    comm = _comm(lambda s, t: _train(s, t, steps=None))
    with pytest.raises(NotEnoughResults, match=r"fednova needs meta\['NUM_STEPS_CURRENT_ROUND'\]"):
        FedNova(1, 2).run(_ctx(comm), INITIAL)
    with pytest.raises(ValueError, match="takes no aggregator"):
        FedNova(1, 3, aggregator="median")


# ---------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_server_update_and_control_variate_transport() -> None:
    dcs = {s: torch.tensor(RNG.normal(size=3), dtype=torch.float32) for s in SITES}
    seen: list[dict] = []

    def make(site: str, task: Task) -> TaskResult:
        seen.append(dict(task.model.params))
        assert task.model.meta[SCAFFOLD_KEY] is True
        return _train(site, task, extra={SCAFFOLD_DC_PREFIX + "w": dcs[site]})

    # three of five sites train each round: c moves by Σ Δc / N with N = 5 available sites
    wf = Scaffold(2, 3, sample_clients=3, server_lr=0.5)
    events: list[dict] = []
    out = wf.run(WorkflowContext(_comm(make), seed=5, listeners=[events.append]), INITIAL)
    rounds = [e["targets"] for e in events if e["event"] == "round_started"]
    c = torch.zeros(3, dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    for targets in rounds:
        x = x + 0.5 * torch.stack([OFFSETS[s].double() for s in targets]).mean(0)
        c = c + torch.stack([dcs[s].double() for s in targets]).sum(0) / 5
        if targets is rounds[0]:
            first_c = c.clone()
    assert torch.allclose(out["w"].double(), x, atol=1e-6)
    assert torch.allclose(wf.c["w"].double(), c, atol=1e-6)
    assert "n" not in wf.c and set(out) == {"w", "n"}  # c is not part of the model
    assert all(SCAFFOLD_C_PREFIX + "w" not in p for p in seen[:3])  # round 1: c = 0, not sent
    assert all(torch.allclose(p[SCAFFOLD_C_PREFIX + "w"].double(), first_c) for p in seen[3:])
    assert wf.state_dict()["c"]["w"].shape == (3,)


def test_scaffold_warns_when_a_site_sends_no_control_variate() -> None:
    events: list[dict] = []
    Scaffold(2, 2).run(_ctx(_comm(lambda s, t: _train(s, t)), events), INITIAL)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 5 and "flare.Scaffold" in warnings[0]


# ------------------------------------------------------------------ FedOpt, FedAvgM, FedProx


def test_fedadam_workflow_applies_adam_to_the_pseudo_gradient() -> None:
    out = FedAdam(2, 5, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3).run(
        _ctx(_comm(lambda s, t: _train(s, t))), INITIAL
    )
    mean = torch.stack([OFFSETS[s] for s in SITES]).double().mean(0).numpy()
    x, m, v = np.zeros(3), np.zeros(3), np.full(3, 1e-6)
    for _ in range(2):
        d = mean  # the sites' mean move, whatever x is
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d**2
        x = x + 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(out["w"].numpy(), x, rtol=1e-5)
    assert out["n"].item() == 2  # integer entries take the aggregate


def test_fedavgm_without_momentum_is_fedavg_and_with_momentum_is_not() -> None:
    plain = FedAvg(3, 5).run(_ctx(_comm(lambda s, t: _train(s, t))), INITIAL)
    m0 = FedAvgM(3, 5, server_momentum=0.0).run(_ctx(_comm(lambda s, t: _train(s, t))), INITIAL)
    assert torch.allclose(plain["w"], m0["w"], atol=1e-6)
    m9 = FedAvgM(3, 5, server_momentum=0.9).run(_ctx(_comm(lambda s, t: _train(s, t))), INITIAL)
    mean = torch.stack([OFFSETS[s] for s in SITES]).mean(0)
    # v1 = Δ, v2 = 1.9Δ, v3 = 2.71Δ: x3 = 5.61Δ
    assert torch.allclose(m9["w"], 5.61 * mean, atol=1e-5)


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    comm = _comm(lambda s, t: _train(s, t))
    out = FedProx(2, 5, mu=0.3, task_meta={"lr": 0.1}).run(_ctx(comm), INITIAL)
    assert comm.tasks[0].model.meta == {"lr": 0.1, FEDPROX_MU_KEY: 0.3}
    plain = FedAvg(2, 5).run(_ctx(_comm(lambda s, t: _train(s, t))), INITIAL)
    assert torch.equal(out["w"], plain["w"])
    with pytest.raises(ValueError, match="mu must be ≥ 0"):
        FedProx(1, 1, mu=-1)


# ---------------------------------------------------------------------------- robust aggregation


def test_krum_in_a_workflow_drops_the_poisoned_site() -> None:
    def make(site: str, task: Task) -> TaskResult:
        r = _train(site, task)
        if site == "site-3":
            r.model.params["w"] = torch.full((3,), 1e4)
        return r

    out = FedAvg(1, 5, aggregator={"name": "krum", "f": 1}).run(_ctx(_comm(make)), INITIAL)
    assert out["w"].abs().max() < 10
    with pytest.raises(ValueError, match="needs at least 5 results per round, but min_clients"):
        FedAvg(1, 3, aggregator={"name": "krum", "f": 1})


def test_too_few_results_for_f_fails_the_round_with_the_numbers() -> None:
    def make(site: str, task: Task) -> TaskResult:
        r = _train(site, task)
        if site in ("site-1", "site-2", "site-3"):
            r.model.meta["NUM_STEPS_CURRENT_ROUND"] = 0  # weight 0: accepted, not aggregated
        return r

    with pytest.raises(NotEnoughResults) as err:
        FedAvg(1, 3, aggregator={"name": "median", "f": 1}).run(_ctx(_comm(make)), INITIAL)
    assert str(err.value) == ("round 1: aggregator median with f=1 needs at least 3 results, got 2")


# ---------------------------------------------------------------------------- evaluation


def _eval_or_train(site: str, task: Task) -> TaskResult:
    if task.name == TASK_EVALUATE:
        i = SITES.index(site)
        assert task.model.meta[EVAL_KIND_KEY] == "federated"
        return TaskResult(
            site,
            task.task_id,
            model=FLModel(metrics={"accuracy": 0.1 * (i + 1)}, meta={"NUM_SAMPLES": i + 1}),
        )
    return _train(site, task)


def test_federated_and_server_evaluation_metrics() -> None:
    calls = []

    def server_eval(params, current_round):
        calls.append((params["w"].clone(), current_round))
        return {"loss": float(current_round)}

    events: list[dict] = []
    comm = _comm(_eval_or_train)
    out = FedAvg(3, 5, federated_eval=True, eval_every=2, server_eval=server_eval).run(
        _ctx(comm, events), INITIAL
    )
    rounds = [e for e in events if e["event"] == "round_completed"]
    # rounds 2 and 3 are evaluated (every 2nd, and the last); weights 1..5
    expected = sum(0.1 * (i + 1) * (i + 1) for i in range(5)) / 15
    assert "eval_accuracy" not in rounds[0]["metrics"]
    assert rounds[1]["metrics"]["eval_accuracy"] == pytest.approx(expected)
    assert rounds[2]["metrics"]["server_loss"] == 2.0
    assert [c[1] for c in calls] == [1, 2] and torch.equal(calls[-1][0], out["w"])
    eval_results = [e for e in events if e["event"] == "result" and e["phase"] == "evaluate"]
    assert len(eval_results) == 10
    assert [t.name for t in comm.tasks].count(TASK_EVALUATE) == 2


def test_server_eval_errors_fail_the_job_with_the_reason() -> None:
    def broken(params):
        raise KeyError("fc.weight")

    with pytest.raises(Exception, match=r"round 1: server evaluation failed: KeyError"):
        FedAvg(1, 5, server_eval=broken).run(_ctx(_comm(_eval_or_train)), INITIAL)


def _cross_site(site: str, task: Task) -> TaskResult:
    i = SITES.index(site)
    if task.name == TASK_SUBMIT_MODEL:
        if site == "site-5":
            return TaskResult(site, task.task_id, error="RuntimeError: no local model")
        params = {"w": torch.full((3,), float(i + 1)), "n": torch.tensor(0)}
        return TaskResult(site, task.task_id, model=FLModel(params=params))
    if task.name == TASK_EVALUATE:
        # a known toy "evaluation": model value × 10 + the evaluating site's number
        value = float(task.model.params["w"][0]) * 10 + (i + 1)
        owner = task.model.meta[MODEL_OWNER_KEY]
        assert task.model.meta[EVAL_KIND_KEY] == "cross_site"
        assert owner == "global" or float(task.model.params["w"][0]) == SITES.index(owner) + 1
        return TaskResult(site, task.task_id, model=FLModel(metrics={"accuracy": value}))
    return TaskResult(
        site,
        task.task_id,
        model=FLModel(params={"w": task.model.params["w"] + 0.5, "n": task.model.params["n"]}),
    )


@pytest.mark.parametrize("with_store", [False, True])
def test_cross_site_matrix_shape_and_values(tmp_path: Path, with_store: bool) -> None:
    store = RunStore(tmp_path) if with_store else None
    events: list[dict] = []
    ctx = WorkflowContext(_comm(_cross_site), store=store, listeners=[events.append])
    out = FedAvg(1, 5, cross_site_eval=True).run(ctx, INITIAL)
    matrix = next(e for e in events if e["event"] == "cross_site_eval")["matrix"]
    assert matrix["models"] == ["global", "site-1", "site-2", "site-3", "site-4"]
    assert matrix["sites"] == SITES
    g = float(out["w"][0])
    assert g == 0.5
    for j, site in enumerate(SITES):
        assert matrix["results"]["global"][site]["accuracy"] == pytest.approx(g * 10 + j + 1)
        for i, owner in enumerate(SITES[:4]):
            assert matrix["results"][owner][site]["accuracy"] == pytest.approx((i + 1) * 10 + j + 1)
    assert matrix["errors"]["submit_model"] == {"site-5": "RuntimeError: no local model"}
    assert any(e["event"] == "warning" and "site-5" in e["message"] for e in events)
    if with_store:
        saved = json.loads((tmp_path / "cross_site_eval.json").read_text())
        assert saved["results"] == matrix["results"]
        assert (tmp_path / "models" / "local-site-2.safetensors").is_file()
        store.close()


def test_cross_site_marks_sites_that_never_trained(tmp_path: Path) -> None:
    """site-3 fails every training round but answers submit_model and evaluate: its row is
    marked, not shown as if it held a model it trained."""

    def make(site: str, task: Task) -> TaskResult:
        if site == "site-3" and task.name not in (TASK_SUBMIT_MODEL, TASK_EVALUATE):
            return TaskResult(site, task.task_id, error="RuntimeError: out of memory")
        return _cross_site(site, task)

    store = RunStore(tmp_path)
    events: list[dict] = []
    ctx = WorkflowContext(_comm(make), store=store, listeners=[store.listener, events.append])
    FedAvg(2, 3, cross_site_eval=True).run(ctx, INITIAL)
    matrix = next(e for e in events if e["event"] == "cross_site_eval")["matrix"]
    assert matrix["never_trained"] == ["site-3"]
    assert json.loads((tmp_path / "cross_site_eval.json").read_text())["never_trained"] == [
        "site-3"
    ]
    assert any(
        e["event"] == "warning" and "site-3 never had a training update accepted" in e["message"]
        for e in events
    )
    lines = cross_site_lines(matrix, "accuracy")
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [
        "global",
        "site-1",
        "site-2",
        "site-3 (never trained)",
        "site-4",  # site-5 submits no model (see _cross_site)
    ]
    store.close()
    log = (tmp_path / "run.log").read_text()
    assert "site-3 (never trained)" in log and "site-1 (never trained)" not in log


# ---------------------------------------------------------------------------- personalization


def test_personalized_drops_local_parameters_and_sends_the_spec() -> None:
    initial = {
        "body.weight": torch.zeros(2),
        "bn.weight": torch.ones(2),
        "bn.running_mean": torch.zeros(2),
        "head.weight": torch.zeros(2),
    }

    def make(site: str, task: Task) -> TaskResult:
        assert task.model.meta[PERSONAL_KEY] == {"fedbn": True, "shared": None, "local": ["head.*"]}
        params = {k: v + 1 for k, v in task.model.params.items()}  # a script sending everything
        return TaskResult(site, task.task_id, model=FLModel(params=params, meta={}))

    events: list[dict] = []
    out = Personalized(2, 5, fedbn=True, local=["head.*"]).run(_ctx(_comm(make), events), initial)
    assert torch.equal(out["body.weight"], torch.full((2,), 2.0))
    for k in ("bn.weight", "bn.running_mean", "head.weight"):
        assert torch.equal(out[k], initial[k]), k  # local: never averaged
    warnings = [e for e in events if e["event"] == "warning" and "local parameter" in e["message"]]
    assert len(warnings) == 5  # once per site, not once per round


def test_diff_updates_work_with_every_server_optimizer() -> None:
    def make(site: str, task: Task) -> TaskResult:
        return TaskResult(
            site,
            task.task_id,
            model=FLModel(
                params_type=ParamsType.DIFF,
                params={"w": OFFSETS[site], "n": torch.tensor(1)},
                meta={"NUM_STEPS_CURRENT_ROUND": 1},
            ),
        )

    full = FedAvgM(2, 5).run(_ctx(_comm(lambda s, t: _train(s, t, steps=1))), INITIAL)
    diff = FedAvgM(2, 5).run(_ctx(_comm(make)), INITIAL)
    assert torch.allclose(full["w"], diff["w"], atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedadam", "scaffold", "fedavgm"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_model(tmp_path: Path, algorithm) -> None:
    dcs = {s: torch.tensor(RNG.normal(size=3), dtype=torch.float32) for s in SITES}

    def make(site: str, task: Task) -> TaskResult:
        # the update depends on the model received, so a wrong resumed state would show
        w = task.model.params["w"]
        extra = {SCAFFOLD_DC_PREFIX + "w": dcs[site] + 0.1 * w} if algorithm == "scaffold" else {}
        r = _train(site, task, extra=extra)
        r.model.params["w"] = r.model.params["w"] - 0.3 * w.pow(2)
        if SCAFFOLD_C_PREFIX + "w" in task.model.params:
            r.model.params["w"] = r.model.params["w"] + task.model.params[SCAFFOLD_C_PREFIX + "w"]
        return r

    def workflow(rounds: int):
        if algorithm == "fedadam":
            return FedAdam(rounds, 5, eta=0.1)
        if algorithm == "scaffold":
            return Scaffold(rounds, 5)
        return FedAvgM(rounds, 5, server_momentum=0.7)

    straight = workflow(4).run(_ctx(_comm(make)), INITIAL)
    store = RunStore(tmp_path, checkpoint=True)
    workflow(2).run(WorkflowContext(_comm(make), store=store), INITIAL)
    events: list[dict] = []
    resumed = workflow(4).run(
        WorkflowContext(_comm(make), store=store, listeners=[events.append]), INITIAL
    )
    store.close()
    assert any(e["event"] == "resumed" and e["round"] == 2 for e in events)
    assert torch.allclose(resumed["w"], straight["w"], atol=1e-6)


# ---------------------------------------------------------------------------- broadcast params


@pytest.mark.parametrize(
    "workflow",
    [
        lambda: FedAvg(3, 5),
        lambda: FedAvg(3, 5, aggregator="median"),
        lambda: FedAvg(3, 5, aggregator={"name": "krum", "f": 1}),
        lambda: FedAvg(3, 5, federated_eval=True),
        lambda: FedAvgM(3, 5, server_momentum=0.9),
        lambda: FedAdam(3, 5, eta=0.1),
        lambda: FedNova(3, 5),
        lambda: FedProx(3, 5, mu=0.1),
        lambda: Scaffold(3, 5),
        lambda: Personalized(3, 5, fedbn=True, local=["n"]),
    ],
    ids=[
        "fedavg",
        "median",
        "krum",
        "eval",
        "fedavgm",
        "fedadam",
        "fednova",
        "fedprox",
        "scaffold",
        "personalized",
    ],
)
def test_workflows_never_modify_broadcast_params_in_place(workflow) -> None:
    """The simulator hands workers the workflow's own broadcast tensors (local backend) or
    read-only shared memory (Ray): no workflow may write into them once broadcast."""
    sent: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording(ScriptedComm):
        def broadcast(self, task, targets):
            for t in (task.model.params or {}).values():
                sent.append((t, t.clone()))
            return super().broadcast(task, targets)

    comm = Recording(SITES, lambda s, t: (0.0, lambda: _train_any(s, t)))
    workflow().run(_ctx(comm), INITIAL)
    assert len(sent) >= 6
    assert all(torch.equal(t, before) for t, before in sent)


@pytest.mark.parametrize(
    "workflow",
    [
        lambda: FedAvg(3, 5),
        lambda: FedAdam(3, 5, eta=0.1),
        lambda: Scaffold(3, 5),
        lambda: Personalized(3, 5, fedbn=True, local=["n"]),
        lambda: Cyclic(2, 5),
        # one site at a time: no task of the first version is still out at a later broadcast
        lambda: AsyncAggregation(5, 1, mode="fedasync", concurrency=1),
        lambda: AsyncAggregation(5, 1, mode="fedbuff", concurrency=1, buffer_size=1),
    ],
    ids=["fedavg", "fedadam", "scaffold", "personalized", "cyclic", "fedasync", "fedbuff"],
)
def test_no_workflow_holds_the_initial_model_once_it_is_replaced(workflow) -> None:
    """The first global model is dropped once its round is over: held for the whole run, a
    400 MB model would be in memory twice from round 2 on (the simulator maps it from shared
    memory). Checked at every broadcast of a later round (a cyclic round is a whole cycle: its
    starting model is kept until the cycle ends, for the run's best-model record)."""
    import gc
    import weakref

    first: list[weakref.ref[torch.Tensor]] = []
    alive: list[bool] = []
    broadcasts = [0]
    per_round = len(SITES) if isinstance(workflow(), Cyclic) else 1

    class Watching(ScriptedComm):
        def broadcast(self, task, targets):
            self.tasks.clear()  # this test's communicator keeps no earlier task
            broadcasts[0] += 1
            if broadcasts[0] > per_round:
                gc.collect()
                alive.append(first[0]() is not None)
            return super().broadcast(task, targets)

    comm = Watching(SITES, lambda s, t: (0.0, lambda: _train_any(s, t)))
    box = [{"w": torch.zeros(3), "n": torch.tensor(0)}]
    first.append(weakref.ref(box[0]["w"]))
    workflow().run(_ctx(comm), box.pop())  # the workflow holds the only reference
    assert len(alive) >= 2 and not any(alive), alive
