"""A Flower app's ``ServerApp``, unmodified, driving fedctl's sites (``FlowerRecipe``).

The ServerApp runs where fedctl's workflows run (the simulator's process, the server's job
process) with a Flower ``Grid`` over fedctl's communicator. Each Flower ``Message`` becomes one
fedctl task to the site that is its destination node, carrying the message in Flower's own
protobuf serialization (a ``uint8`` tensor in fedctl's framing, never pickle); the site's
runtime hands it to the app's ``ClientApp`` (:mod:`fedctl.client.flower`) and the reply comes
back the same way. Every site is a Flower node: node id = its place among the job's sites + 1,
``node_config = {"partition-id": place, "num-partitions": sites}``. Each batch of ``train``
messages is one round in fedctl's events, metrics and logs; other batches are a phase of it.
Files the ServerApp writes land in the run's folder (its working directory while it runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import MetricsMean
from fedctl.codec.flower import MSG, NODE, from_tensor, load_component, to_tensor
from fedctl.codec.model import TASK_EVALUATE, TASK_TRAIN, FLModel, TaskResult
from fedctl.errors import RunFailed
from fedctl.workflows.base import RoundPolicy, Workflow, WorkflowContext
from fedctl.workflows.swarm import MergedStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.workflow")

#: the run id every Flower Message and Context of a fedctl job carries
RUN_ID = 1


def natural(site: str) -> tuple[Any, ...]:
    """Sort key: ``site-2`` before ``site-10`` (partition ids follow the sites' numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", site))


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _numbers(records: Any) -> dict[str, float]:
    """A reply's MetricRecords as plain numbers (lists and non-numbers left out)."""
    out: dict[str, float] = {}
    for record in records.values():
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
    return out


class FlowerWorkflow(Workflow):
    """Runs a Flower app's ServerApp against fedctl's sites; see the module docstring."""

    def __init__(
        self,
        app_dir: Path,
        min_clients: int,
        run_config: dict[str, Any],
        *,
        num_rounds: int = 1,
        round_timeout: float | None = 3600.0,
    ) -> None:
        self.app_dir = Path(app_dir)
        self.min_clients = min_clients
        self.run_config = dict(run_config)
        self.num_rounds = num_rounds
        self.timeout = round_timeout
        self.round = -1

    def run(
        self, ctx: WorkflowContext, initial: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run the ServerApp's main; returns no fedctl model (the app keeps its own)."""
        try:
            from flwr.app import Context, RecordDict
        except ImportError:
            raise RunFailed(
                "Flower jobs need the flower extra where the ServerApp runs: "
                "pip install 'fedctl[flower]'"
            ) from None

        server_app = load_component(self.app_dir, "serverapp")
        sites = sorted(ctx.comm.wait_for_sites(self.min_clients, self.timeout), key=natural)
        self.sites = {i + 1: s for i, s in enumerate(sites)}
        ctx.emit(
            "run_started", num_rounds=self.num_rounds, start_round=0, min_clients=self.min_clients
        )
        grid = make_grid(self, ctx)
        context = Context(
            run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=self.run_config
        )
        _identify(node_id=None)
        root = getattr(ctx.store, "root", None)
        with _cwd(Path(root) if root is not None else None):
            try:
                server_app(grid, context)
            except RunFailed:
                raise
            except Exception as exc:
                raise RunFailed(
                    f"the Flower ServerApp failed: {type(exc).__name__}: {exc}"
                ) from exc
        return {}

    def exchange(
        self, ctx: WorkflowContext, messages: list[Any], timeout: float | None
    ) -> list[Any]:
        """Deliver ``messages`` to their nodes' sites; the replies that came back in time."""
        kinds = {m.metadata.message_type.split(".")[0] for m in messages}
        training = kinds == {"train"}
        if training:
            self.round += 1
        rnd = max(self.round, 0)
        by_site: dict[str, Any] = {}
        streams = []
        n = len(self.sites)
        for msg in messages:
            site = self.sites[msg.metadata.dst_node_id]
            by_site[site] = msg
            node = {
                "run_id": RUN_ID,
                "node_id": msg.metadata.dst_node_id,
                "node_config": {"partition-id": msg.metadata.dst_node_id - 1, "num-partitions": n},
                "run_config": self.run_config,
            }
            name = TASK_EVALUATE if kinds == {"evaluate"} else TASK_TRAIN
            model = FLModel(
                params={MSG: encode(msg)},
                meta={NODE: node},
                current_round=rnd,
                total_rounds=self.num_rounds,
            )
            streams.append(ctx.broadcast(ctx.new_task(name, model), [site]))
        if training:
            ctx.emit("round_started", round=rnd, targets=sorted(by_site, key=natural))
        replies: list[Any] = []
        metrics = MetricsMean()

        def on_result(result: TaskResult) -> None:
            m = result.model
            if m is None or m.params is None or MSG not in m.params:
                raise RunFailed(f"{result.site} sent no Flower message")
            reply = decode(m.params[MSG])
            sent = by_site[result.site]
            if reply.metadata.reply_to_message_id != sent.metadata.message_id:
                raise RunFailed(f"{result.site} answered another message")
            replies.append(reply)
            if reply.has_content():
                metrics.add(_numbers(reply.content.metric_records), 1.0)

        wait = timeout if timeout is not None else self.timeout
        phase = None if training else "/".join(sorted(kinds))
        outcome = ctx.gather(
            MergedStream(streams), RoundPolicy(0, wait), on_result, round_=rnd, phase=phase
        )
        if training:
            ctx.emit(
                "round_completed",
                round=rnd,
                metrics=metrics.result(),
                accepted=outcome.accepted,
                failed=outcome.failed,
                missing=outcome.missing,
                duration=outcome.duration,
            )
        return replies


def _identify(node_id: int | None) -> None:
    """Who is running, as Flower's own runtimes tell its Message constructor (the server side:
    the SuperLink's node)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID if node_id is None else node_id


def encode(msg: Any) -> Any:
    """A Flower Message in Flower's protobuf serialization, as a uint8 tensor."""
    from flwr.common.serde import message_to_proto

    return to_tensor(message_to_proto(msg).SerializeToString())


def decode(t: Any) -> Any:
    """Inverse of :func:`encode`."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage()
    proto.ParseFromString(from_tensor(t))
    return message_from_proto(proto)


def make_grid(flow: FlowerWorkflow, ctx: WorkflowContext) -> Any:
    """A Flower ``Grid`` whose messages go to ``flow``'s sites through ``ctx``."""
    from flwr.app import Message
    from flwr.serverapp import Grid

    class FedctlGrid(Grid):  # type: ignore[misc,unused-ignore]
        """Flower's Grid over a fedctl workflow context."""

        def __init__(self) -> None:
            self._run: Any = None
            self._out: dict[str, Any] = {}
            self._in: dict[str, Any] = {}

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(
            self,
            content: Any,
            message_type: str,
            dst_node_id: int,
            group_id: str,
            ttl: float | None = None,
        ) -> Any:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(flow.sites)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            ids = []
            for msg in messages:
                if msg.metadata.dst_node_id not in flow.sites:
                    raise ValueError(f"no node {msg.metadata.dst_node_id} in this job")
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                msg.metadata.__dict__["_run_id"] = RUN_ID
                self._out[msg.metadata.message_id] = msg
                ids.append(msg.metadata.message_id)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            wanted = [i for i in message_ids if i in self._out]
            if wanted:
                batch = [self._out.pop(i) for i in wanted]
                for reply in flow.exchange(ctx, batch, None):
                    self._in[reply.metadata.reply_to_message_id] = reply
            return [self._in.pop(i) for i in list(message_ids) if i in self._in]

        def send_and_receive(
            self, messages: Iterable[Any], *, timeout: float | None = None
        ) -> Iterable[Any]:
            ids = list(self.push_messages(messages))
            batch = [self._out.pop(i) for i in ids]
            return flow.exchange(ctx, batch, timeout)

    return FedctlGrid()
