"""The client script of a Flower app run by fedctl (:class:`fedctl.recipe.FlowerRecipe`).

fedctl writes a two-line script into the job that calls :func:`main`. It takes fedctl tasks
through the ordinary client API; each carries one Flower ``Message`` in Flower's own protobuf
serialization (params ``{"flower.msg": uint8 tensor}``), which is handed to the app's own
``ClientApp`` with a Flower ``Context`` (``node_config``: this site's ``partition-id`` and the
``num-partitions``; the app's ``run_config``). The reply goes back the same way. The node's
``context.state`` survives rounds: in memory while the script lives, and in
``fedctl.client.get_state()`` when the simulator runs the script once per round. Nothing is
pickled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedctl.codec.flower import MSG, NODE, from_tensor, load_component, to_tensor


def main() -> None:
    """Serve the app's ClientApp for every task of the job."""
    from flwr.app import Context, RecordDict
    from flwr.common.serde import (
        message_from_proto,
        message_to_proto,
        recorddict_from_proto,
        recorddict_to_proto,
    )
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedctl.client as flare

    _STATE = "flower.context_state"

    app_dir = Path(sys.argv[0]).resolve().parent
    client_app = load_component(app_dir, "clientapp")
    flare.init()
    state: RecordDict | None = None
    while flare.is_running():
        task = flare.receive()
        assert task is not None and task.params is not None
        node = dict((task.meta or {}).get(NODE) or {})
        if state is None:  # the first task of this script: the state kept by the site
            kept = flare.get_state().get(_STATE)
            state = RecordDict()
            if kept is not None:
                proto = ProtoRecordDict()
                proto.ParseFromString(from_tensor(kept))
                state = recorddict_from_proto(proto)
        context = Context(
            run_id=int(node.get("run_id", 0)),
            node_id=int(node["node_id"]),
            node_config=dict(node.get("node_config") or {}),
            state=state,
            run_config=dict(node.get("run_config") or {}),
        )
        TaskIdentity.task_id = 1  # who is running, as Flower's own SuperNode says
        TaskIdentity.run_id = context.run_id
        TaskIdentity.node_id = context.node_id
        proto = ProtoMessage()
        proto.ParseFromString(from_tensor(task.params[MSG]))
        reply = client_app(message_from_proto(proto), context)
        state = context.state
        flare.get_state()[_STATE] = to_tensor(recorddict_to_proto(state).SerializeToString())
        data = message_to_proto(reply).SerializeToString()
        flare.send(flare.FLModel(params={MSG: to_tensor(data)}))
