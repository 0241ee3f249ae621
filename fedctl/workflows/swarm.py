"""Swarm learning (a client-controlled workflow): the sites aggregate among themselves and the
server only manages the job and relays payloads it cannot read.

Each round every live site trains the model sealed for it (the first round: the recipe's
initial model, which is public) and seals its update for the round's aggregator, a site chosen
in rotation (round r: the r-th of the round's sites in sorted order). The server hands the
aggregator the sealed updates; the aggregator opens them, takes their weighted mean (FedAvg's
aggregate, weighted by ``NUM_STEPS_CURRENT_ROUND``) and seals the new model for every site that
trained, which the server relays in the next round. If the aggregator fails, the next site in
the rotation takes over: the trainers seal their kept update again for it and the round goes
on. After the last round every site opens the last model and keeps it in its own folder
(``swarm-final.safetensors``) and reports its SHA-256; the job fails if the sites do not all
hold the same model. No model is saved on the server side: it never holds one it could open.

Payloads are sealed site to site (X25519 + AES-256-GCM, keys signed by the sites' identities:
:mod:`fedctl.privacy.e2e`); the site side is :mod:`fedctl.workflows.swarm_site`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import MetricsMean
from fedctl.codec.model import (
    NUM_STEPS_KEY,
    TASK_TRAIN,
    FLModel,
    ParamsType,
    TaskResult,
    scalar_metrics,
)
from fedctl.errors import RunFailed
from fedctl.workflows.base import (
    GatherOutcome,
    NotEnoughResults,
    ResultStream,
    RoundPolicy,
    Workflow,
    WorkflowContext,
    round_model,
)
from fedctl.workflows.swarm_site import CT, META, TASK

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.workflow")


class MergedStream(ResultStream):
    """Several streams read as one (tasks that differ per site: each site's own payload)."""

    def __init__(self, streams: Sequence[ResultStream]) -> None:
        self.streams = list(streams)
        self.targets = tuple(t for s in self.streams for t in s.targets)

    @property
    def pending(self) -> set[str]:
        return set().union(*(s.pending for s in self.streams))

    def next(self, timeout: float | None) -> TaskResult | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            live = [s for s in self.streams if not s.done]
            if not live:
                return None
            for stream in live:
                result = stream.next(0.0)
                if result is not None:
                    return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            result = live[0].next(min(remaining, 0.05))
            if result is not None:
                return result

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


def _weight(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 1.0


class Swarm(Workflow):
    """Swarm learning; see the module docstring. ``min_clients``: the sites a round needs."""

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        round_timeout: float | None = 3600.0,
        task_meta: dict[str, Any] | None = None,
    ) -> None:
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.timeout = round_timeout
        self.task_meta = dict(task_meta or {})
        self.roster: dict[str, Any] = {}

    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run the rounds; returns an empty mapping (the model stays on the sites)."""
        ctx.emit(
            "run_started", num_rounds=self.num_rounds, start_round=0, min_clients=self.min_clients
        )
        sites = sorted(ctx.comm.wait_for_sites(self.min_clients, self.timeout))
        self.roster = self._keys(ctx, sites)
        sealed: dict[str, Any] | None = None
        made_by: str | None = None
        for rnd in range(self.num_rounds):
            ctx.check_abort()
            targets = sorted(sealed) if sealed is not None else sorted(self.roster)
            ctx.emit("round_started", round=rnd, targets=targets)
            spin = rnd % len(targets)
            order = targets[spin:] + targets[:spin]
            updates, metrics, outcome = self._train(
                ctx, rnd, targets, order[0], initial, sealed, made_by
            )
            sealed, made_by = self._aggregate(ctx, rnd, order, updates)
            ctx.emit(
                "round_completed",
                round=rnd,
                metrics=metrics,
                accepted=outcome.accepted,
                failed=outcome.failed,
                missing=outcome.missing,
                duration=outcome.duration,
            )
            ctx.emit("info", message=f"round {rnd + 1}: aggregated by {made_by}")
        assert sealed is not None and made_by is not None
        self._final(ctx, sealed, made_by)
        return {}

    def _spec(self, rnd: int, **extra: Any) -> dict[str, Any]:
        return {"round": rnd, "roster": self.roster, **extra}

    def _per_site(
        self, ctx: WorkflowContext, name: str, sealed: dict[str, Any], rnd: int, spec: Any
    ) -> MergedStream:
        """One task per site, each carrying what was sealed for that site."""
        streams = []
        for site in sorted(sealed):
            meta = {**(self.task_meta if name == TASK_TRAIN else {}), META: spec}
            model = round_model({CT: sealed[site]}, rnd, self.num_rounds, meta)
            streams.append(ctx.broadcast(ctx.new_task(name, model), [site]))
        return MergedStream(streams)

    def _keys(self, ctx: WorkflowContext, sites: list[str]) -> dict[str, Any]:
        """Every site's signed key (the sites check each other's signatures)."""
        roster: dict[str, Any] = {}

        def on_result(result: TaskResult) -> None:
            assert result.model is not None
            ad = (result.model.meta or {}).get(META)
            if not isinstance(ad, dict) or not {"public", "signature"} <= set(ad):
                raise RunFailed(f"{result.site} advertised no key")
            roster[result.site] = {k: ad.get(k) for k in ("public", "signature", "cert")}

        task = ctx.new_task(TASK, FLModel(meta={META: {"kind": "keys"}}))
        policy = RoundPolicy(self.min_clients, self.timeout)
        ctx.gather(ctx.broadcast(task, sites), policy, on_result, phase="keys")
        return dict(sorted(roster.items()))

    def _train(
        self,
        ctx: WorkflowContext,
        rnd: int,
        targets: list[str],
        aggregator: str,
        initial: dict[str, torch.Tensor],
        sealed: dict[str, Any] | None,
        made_by: str | None,
    ) -> tuple[dict[str, list[Any]], dict[str, float], GatherOutcome]:
        """The round's training: each site's update, sealed for ``aggregator``."""
        spec = self._spec(rnd, kind="train", to=aggregator, model_round=rnd - 1)
        spec["from"] = made_by
        updates: dict[str, list[Any]] = {}
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            m = result.model
            assert m is not None
            if m.params is None or set(m.params) != {CT}:
                raise RunFailed(f"{result.site} sent an update that is not sealed")
            steps = (m.meta or {}).get(NUM_STEPS_KEY, 1)
            kind = m.params_type.value if m.params_type else ParamsType.FULL.value
            updates[result.site] = [m.params[CT], steps, kind]
            metrics.add(scalar_metrics(m.metrics), _weight(steps))

        if sealed is None:  # the recipe's initial model is public: it goes in the clear
            model = round_model(initial, rnd, self.num_rounds, {**self.task_meta, META: spec})
            stream: ResultStream = ctx.broadcast(ctx.new_task(TASK_TRAIN, model), targets)
        else:
            stream = self._per_site(ctx, TASK_TRAIN, sealed, rnd, spec)
        outcome = ctx.gather(
            stream, RoundPolicy(self.min_clients, self.timeout), on_result, round_=rnd
        )
        return updates, metrics.result(), outcome

    def _reseal(
        self, ctx: WorkflowContext, rnd: int, target: str, updates: dict[str, list[Any]]
    ) -> dict[str, list[Any]]:
        """The trainers' kept updates sealed again, for ``target``."""
        out: dict[str, list[Any]] = {}

        def on_result(result: TaskResult) -> None:
            m = result.model
            assert m is not None
            if m.params is None or set(m.params) != {CT}:
                raise RunFailed(f"{result.site} resealed nothing")
            out[result.site] = [m.params[CT], *updates[result.site][1:]]

        spec = self._spec(rnd, kind="reseal", to=target)
        task = ctx.new_task(TASK, FLModel(meta={META: spec}, current_round=rnd))
        policy = RoundPolicy(self.min_clients, self.timeout)
        ctx.gather(
            ctx.broadcast(task, sorted(updates)), policy, on_result, round_=rnd, phase="reseal"
        )
        return out

    def _aggregate(
        self, ctx: WorkflowContext, rnd: int, order: list[str], updates: dict[str, list[Any]]
    ) -> tuple[dict[str, Any], str]:
        """The new model sealed for every trainer by the round's aggregator, or by the next in
        the rotation when it fails (the updates sealed again for that one)."""
        reasons: list[str] = []
        sealed_for = order[0]  # whom the trainers sealed their updates for
        for candidate in [s for s in order if s in updates]:
            if candidate != sealed_for:
                message = f"round {rnd + 1}: {candidate} takes over the aggregation"
                log.warning("%s", message)
                ctx.emit("warning", message=message)
                try:
                    updates = self._reseal(ctx, rnd, candidate, updates)
                except NotEnoughResults as exc:
                    raise RunFailed(f"round {rnd + 1}: {exc}") from None
                sealed_for = candidate
                if candidate not in updates:
                    continue
            names = sorted(updates)
            senders = [[s, updates[s][1], updates[s][2]] for s in names]
            spec = self._spec(rnd, kind="aggregate", senders=senders, to=names)
            params = {f"{CT}/{s}": updates[s][0] for s in names}
            task = ctx.new_task(TASK, FLModel(params=params, meta={META: spec}, current_round=rnd))
            out: dict[str, Any] = {}

            def on_result(
                result: TaskResult, want: list[str] = names, out: dict[str, Any] = out
            ) -> None:
                m = result.model
                assert m is not None
                got = {k[len(CT) + 1 :]: v for k, v in (m.params or {}).items()}
                if sorted(got) != want:
                    raise RunFailed(f"{result.site} did not seal the new model for every site")
                out.update(got)

            try:
                ctx.gather(
                    ctx.broadcast(task, [candidate]),
                    RoundPolicy(1, self.timeout),
                    on_result,
                    round_=rnd,
                    phase="aggregate",
                )
            except NotEnoughResults as exc:
                message = f"round {rnd + 1}: the aggregator {candidate} failed ({exc})"
                log.warning("%s", message)
                ctx.emit("warning", message=message)
                reasons.append(str(exc))
                continue  # the updates are sealed again for the next (who answers is in)
            return out, candidate
        raise RunFailed(f"round {rnd + 1}: no site could aggregate ({'; '.join(reasons)})")

    def _final(self, ctx: WorkflowContext, sealed: dict[str, Any], made_by: str) -> None:
        """Every site opens the last model and keeps it; they must all hold the same one."""
        digests: dict[str, str] = {}

        def on_result(result: TaskResult) -> None:
            m = result.model
            assert m is not None
            reply = (m.meta or {}).get(META)
            digest = reply.get("sha256") if isinstance(reply, dict) else None
            if not isinstance(digest, str):
                raise RunFailed(f"{result.site} did not say which model it holds")
            digests[result.site] = digest

        last = self.num_rounds - 1
        spec = self._spec(last, kind="final", model_round=last)
        spec["from"] = made_by
        stream = self._per_site(ctx, TASK, sealed, last, spec)
        ctx.gather(stream, RoundPolicy(self.min_clients, self.timeout), on_result, phase="final")
        if len(set(digests.values())) != 1:
            raise RunFailed(f"the sites hold different final models: {digests}")
        digest = next(iter(digests.values()))
        ctx.emit(
            "info",
            message=f"{len(digests)} sites hold the final model (sha256 {digest[:16]}…); "
            "the server holds none",
        )
