"""Plain ``python client.py`` outside any job: one local training round, then exit 0.

The script receives its recipe's initial weights (``recipe.py`` next to it, or the initial
model of an exported job folder) so it can be debugged as an ordinary program. Without either,
``receive()`` gives an FLModel with ``params=None`` and a warning says why.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from fedctl.client.channel import Channel, SiteInfo
from fedctl.client.state import SiteState
from fedctl.codec.model import TASK_TRAIN, FLModel, ParamsType, Task, scalar_metrics


class StandaloneChannel(Channel):
    """Serves a single training task, prints what the script sent, then ends the job."""

    def __init__(self, script_dir: Path) -> None:
        super().__init__()
        self.script_dir = script_dir
        self.info = SiteInfo(
            "site-1", 0, 1, "local", "standalone", seed=0, workspace=str(Path.cwd())
        )
        self._served = False
        self._state = SiteState()
        self.sent: FLModel | None = None
        self.records: list[dict[str, Any]] = []

    def next_task(self) -> Task | None:
        if self._served:
            return None
        self._served = True
        params = _initial_params(self.script_dir)
        if params is None:
            warnings.warn(
                f"fedctl standalone run: no recipe.py or job folder found in {self.script_dir}, "
                "so receive() returns params=None",
                stacklevel=4,
            )
        model = FLModel(params_type=ParamsType.FULL, params=params, current_round=0, total_rounds=1)
        return Task(TASK_TRAIN, model, task_id="local-0", job_id="local")

    def submit(self, task: Task, model: FLModel) -> None:
        self.sent = model
        n = len(model.params or {})
        metrics = scalar_metrics(model.metrics)
        print(
            f"fedctl standalone round done: sent {n} tensors "
            f"({model.params_type.value if model.params_type else 'FULL'}), metrics {metrics}",
            file=sys.stderr,
        )

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    @property
    def state(self) -> SiteState:
        return self._state


def _initial_params(folder: Path) -> dict[str, Any] | None:
    # The client side may read its own recipe (user code on the user's machine); it never
    # talks to the server side from here.
    from fedctl.recipe.loader import find_initial_params

    return find_initial_params(folder)
