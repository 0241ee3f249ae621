"""Flower's own simulation engine on an app: what ``flwr run`` does for a local-simulation
federation once the app's dependencies are installed (its VCE runtime, Ray backend, InMemoryGrid
and node contexts), without the SuperLink process and the runtime environment it builds.

    python flower_reference.py APP_DIR NUM_SUPERNODES KEY=VALUE ...
"""

import sys
from dataclasses import replace
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType


def main() -> None:
    app = Path(sys.argv[1]).resolve()
    num = int(sys.argv[2])
    override = {}
    for pair in sys.argv[3:]:
        key, _, value = pair.partition("=")
        override[key] = value
    components = get_project_config(app)["tool"]["flwr"]["app"]["components"]
    run = replace(
        Run.create_empty(1),
        override_config=override,
        primary_task_id=1,
        federation_id=NOOP_FEDERATION_ID,
    )
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app, override),
    )
    TaskIdentity.task_id = 1  # as Flower's simulation process sets it
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    result = _run_simulation(
        server_app_attr=components["serverapp"],
        client_app_attr=components["clientapp"],
        num_supernodes=num,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": 1}},
        app_dir=str(app),
        run=run,
        server_app_context=context,
        is_app=True,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
    )
    print("clientapp runtime", result.metrics.clientapp_runtime)


if __name__ == "__main__":
    main()
