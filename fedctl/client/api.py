"""The functions a training script calls: ``init``, ``receive``, ``send``, ``is_running`` …

The contract, in the order a script uses it::

    flare.init()                        # bind to the runtime (or to a standalone local round)
    while flare.is_running():           # blocks until the next task; False when the job is over
        model = flare.receive()         # FLModel: .params (state_dict), .current_round, .meta
        ...                             # unchanged training code
        flare.send(flare.FLModel(params=..., metrics=..., meta={"NUM_STEPS_CURRENT_ROUND": n}))
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedctl.client import channel as _ch
from fedctl.client.state import SiteState
from fedctl.codec.keys import SCAFFOLD_C_PREFIX
from fedctl.codec.model import (
    TASK_EVALUATE,
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    FLModel,
    as_tensor_dict,
    check_json,
    plain_metrics,
)
from fedctl.constants import ENV_MODE
from fedctl.errors import ClientAPIError, CodecError

#: ``params`` names that carry algorithm state, not model weights (see _set_aside_algorithm_state)
RESERVED_PREFIXES = (SCAFFOLD_C_PREFIX,)


def init(rank: int | str | None = None) -> None:
    """Connect the script to whatever runs it; outside any job, to a one-round local run.

    Safe to call more than once. ``rank`` is accepted for compatibility with multi-process
    training scripts; only rank 0 talks to the server.
    """
    ch = _ch.current()
    if ch is None:
        mode = os.environ.get(ENV_MODE)
        if mode in ("poc", "production"):
            from fedctl.client.agent_channel import connect_from_env

            ch = connect_from_env()
        else:
            from fedctl.client.standalone import StandaloneChannel

            ch = StandaloneChannel(_script_dir())
        _ch.install(ch)
    ch.initialized = True


def _script_dir() -> Path:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "")
    return Path(path).resolve().parent if path else Path.cwd()


def _channel(caller: str) -> _ch.Channel:
    ch = _ch.current()
    if ch is None or not ch.initialized:
        raise ClientAPIError(f"call fedctl.client.init() before {caller}()")
    return ch


def _advance(ch: _ch.Channel) -> bool:
    """Take the next task unless one is still waiting for its answer; False at the end."""
    if ch.finished:
        return False
    if ch.task is not None and not ch.answered:
        return True
    task = ch.next_task()
    if task is None:
        ch.finished = True
        ch.task = None
        return False
    ch.task, ch.answered = task, False
    _set_aside_algorithm_state(task.model)
    ch.on_receive(task)
    return True


def _set_aside_algorithm_state(model: FLModel) -> None:
    """Move tensors an algorithm sends along with the model (SCAFFOLD's control variate, under
    reserved ``params`` names) to ``optimizer_params``, so ``load_state_dict(received.params)``
    works whether or not the script uses the algorithm's helper."""
    params = model.params
    if not params:
        return
    aside = {k for k in params if k.startswith(RESERVED_PREFIXES)}
    if aside:
        model.optimizer_params = {
            **(model.optimizer_params or {}),
            **{k: params[k] for k in aside},
        }
        model.params = {k: v for k, v in params.items() if k not in aside}


def is_running() -> bool:
    """True while the job has work for this site; blocks until the next task arrives."""
    return _advance(_channel("is_running"))


def receive(timeout: float | None = None) -> FLModel | None:
    """The model of the current task (the global model for training); None once the job ended.

    Calling it again before ``send`` returns the same model. ``timeout`` is accepted for
    compatibility; the runtime's own deadlines apply.
    """
    ch = _channel("receive")
    if not _advance(ch):
        return None
    assert ch.task is not None
    return ch.task.model


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Answer the current task with ``model`` (weights or DIFF, metrics, meta).

    With ``clear_cache`` (the default) the runtime forgets the received model once the answer is
    sent, so its memory is freed unless the script still holds it.
    """
    ch = _channel("send")
    if not isinstance(model, FLModel):
        raise ClientAPIError(f"send() expects a fedctl.client.FLModel, got {type(model).__name__}")
    if ch.task is None or ch.answered:
        what = "twice for the same task" if ch.answered else "before receive()"
        raise ClientAPIError(f"send() called {what}")
    try:
        # What the runtime gets is the script's answer as of this call: its own dicts (the
        # script may reuse its metrics or meta), metrics as plain numbers, every part checked.
        # The tensors are frozen by the channel (a copy or a file written before this returns).
        model = replace(
            model,
            params=None if model.params is None else as_tensor_dict(model.params, "FLModel.params"),
            optimizer_params=(
                None
                if model.optimizer_params is None
                else as_tensor_dict(model.optimizer_params, "FLModel.optimizer_params")
            ),
            metrics=None if model.metrics is None else _finite(ch, plain_metrics(model.metrics)),
            meta=copy.deepcopy(check_json(model.meta or {}, "FLModel.meta")),
        )
        check_json(model.metrics or {}, "FLModel.metrics")
    except CodecError as exc:
        raise ClientAPIError(f"send(): {exc}") from None
    if ch.task.name == TASK_TRAIN and model.params is None:
        raise ClientAPIError("send(): a training task needs FLModel.params")
    ch.submit(ch.task, model)
    ch.answered = True
    if clear_cache and ch.task.model.params is not None:
        # Drop the channel's reference to the received weights (the script may keep its own).
        received = ch.task.model
        ch.task = replace(ch.task, model=replace(received, params=None, optimizer_params=None))


def _info() -> _ch.SiteInfo:
    return _channel("get_site_name").info


def get_site_name() -> str:
    """This site's name, e.g. ``site-3`` in simulation or ``hospital-a`` in production."""
    return _info().site_name


def get_job_id() -> str:
    """The id of the running job."""
    return _info().job_id


def get_site_index() -> int:
    """This site's 0-based position among the job's sites (``site-1`` has index 0)."""
    return _info().site_index


def get_num_sites() -> int:
    """How many sites take part in the job (for sharding synthetic or shared data)."""
    return _info().num_sites


def system_info() -> dict[str, Any]:
    """Site name, index and count, job id, run mode and host facts, as a dict."""
    info = _info()
    return {
        "site_name": info.site_name,
        "site_index": info.site_index,
        "num_sites": info.num_sites,
        "job_id": info.job_id,
        "mode": info.mode,
        "seed": info.seed,
        "workspace": info.workspace,
        "hostname": platform.node(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        **info.extra,
    }


def get_task_name() -> str | None:
    """Name of the current task (``train``, ``evaluate`` or ``submit_model``)."""
    ch = _channel("get_task_name")
    return ch.task.name if ch.task is not None else None


def is_train() -> bool:
    """True when the current task asks for training."""
    return get_task_name() == TASK_TRAIN


def is_evaluate() -> bool:
    """True when the current task asks to evaluate the received model (send metrics only)."""
    return get_task_name() == TASK_EVALUATE


def is_submit_model() -> bool:
    """True when the current task asks for the site's own best local model."""
    return get_task_name() == TASK_SUBMIT_MODEL


def get_state() -> SiteState:
    """This site's persistent state: survives rounds (and script restarts) for this site only."""
    return _channel("get_state").state


_KINDS = {"SCALAR", "SCALARS", "METRIC", "METRICS", "TEXT"}


def log(
    key: str,
    value: Any,
    data_type: str = "SCALAR",
    global_step: int | None = None,
    **kwargs: Any,
) -> None:
    """Stream a metric (or text) to the server's tracking sinks, tagged with site and round."""
    ch = _channel("log")
    kind = str(getattr(data_type, "name", data_type)).upper()
    if kind not in _KINDS:
        raise ClientAPIError(f"log(): data_type must be one of {sorted(_KINDS)}, got {data_type!r}")
    if not isinstance(key, str) or not key:
        raise ClientAPIError("log(): key must be a non-empty string")
    if kind in ("SCALAR", "METRIC"):
        value = _finite(ch, {key: _number(value, key)})[key]
    elif kind in ("SCALARS", "METRICS"):
        if not isinstance(value, dict):
            raise ClientAPIError(f"log(): {key}: {kind} needs a dict of numbers")
        numbers = {f"{key}/{k}": _number(v, f"{key}/{k}") for k, v in value.items()}
        value = {name.split("/", 1)[1]: v for name, v in _finite(ch, numbers).items()}
    else:
        value = str(value)
    ch.record(
        {
            "kind": kind.lower().rstrip("s") if kind != "TEXT" else "text",
            "multi": kind in ("SCALARS", "METRICS"),
            "tag": key,
            "value": value,
            "step": global_step,
            "round": ch.task.model.current_round if ch.task is not None else None,
            "time": time.time(),
        }
    )


def _number(value: Any, key: str) -> float:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientAPIError(f"log(): {key}: expected a number, got {type(value).__name__}")
    return float(value)


def _finite(ch: _ch.Channel, metrics: dict[str, Any]) -> dict[str, Any]:
    """The one NaN policy, in every mode: a NaN or infinite metric is sent as null (JSON has
    neither), with one warning per site and name on the script's stderr; a diverging loss then
    shows as a gap in the curves instead of failing the job on a real site."""
    out = dict(metrics)
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[name] = None
            if f"nan:{name}" not in ch.warned:
                ch.warned.add(f"nan:{name}")
                print(
                    f"fedctl: metric {name!r} is {value}; it is recorded as null "
                    "(warned once per metric)",
                    file=sys.stderr,
                )
    return out
