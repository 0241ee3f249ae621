"""FLModel and the task/result messages exchanged between a workflow and client scripts.

These are plain data: a workflow builds a :class:`Task`, a client script receives its
:class:`FLModel`, and sends back an FLModel that travels as a :class:`TaskResult`. For the wire
they split into a JSON header (validated, size-limited) and a tensor payload in the safe framing
of :mod:`fedctl.codec.tensors`; nothing in either is ever executed or unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from fedctl.codec.jsondata import check_json
from fedctl.errors import CodecError

if TYPE_CHECKING:
    import torch

#: Meta key whose value weights a client's update in aggregation (FL practitioners' convention).
NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"

TASK_TRAIN = "train"
TASK_EVALUATE = "evaluate"
TASK_SUBMIT_MODEL = "submit_model"
TASK_NAMES = (TASK_TRAIN, TASK_EVALUATE, TASK_SUBMIT_MODEL)


class ParamsType(StrEnum):
    """Whether ``params`` holds full weights or differences to the received weights."""

    FULL = "FULL"
    DIFF = "DIFF"


def _params_type(value: Any) -> ParamsType | None:
    if value is None or isinstance(value, ParamsType):
        return value
    try:
        return ParamsType(str(value).upper())
    except ValueError:
        raise CodecError(f"params_type must be FULL or DIFF, got {value!r}") from None


@dataclass
class FLModel:
    """A model (or update) with its metrics and metadata, as a client receives and sends it.

    ``params`` is a state_dict-like mapping of names to torch tensors (on the server, a large
    result's params load tensor by tensor as they are read); ``meta`` carries
    JSON-able extras, e.g. ``meta["NUM_STEPS_CURRENT_ROUND"]`` (the aggregation weight).
    """

    params_type: ParamsType | None = None
    params: Mapping[str, Any] | None = None
    optimizer_params: Mapping[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params_type = _params_type(self.params_type)
        if self.meta is None:
            self.meta = {}

    def summary(self) -> str:
        """One line describing the model, for logs."""
        n = len(self.params or {})
        return (
            f"FLModel({self.params_type.value if self.params_type else 'None'}, {n} tensors, "
            f"round={self.current_round}, metrics={self.metrics})"
        )


@dataclass
class Task:
    """A unit of work a workflow sends to one or more sites."""

    name: str
    model: FLModel
    task_id: str = ""
    job_id: str = ""
    #: per-site additions to ``model.meta``, by site (a protocol's messages addressed to one
    #: site); each communicator merges a target's entry into the meta that site receives
    site_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the most bytes one site's result may have (None: a multiple of the task's model; a
    #: workflow whose results are larger by design, e.g. ciphertexts, says so here)
    result_bytes: int | None = None


@dataclass
class TaskResult:
    """What came back from one site for one task: a model, or an error with its traceback."""

    site: str
    task_id: str
    model: FLModel | None = None
    error: str | None = None
    traceback: str | None = None
    #: tracking records (``SummaryWriter`` calls, ``log``) made while the task ran
    records: list[dict[str, Any]] = field(default_factory=list)
    duration: float = 0.0
    #: True when the result arrived after its round closed (it is not aggregated)
    late: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.model is not None


def scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (what can be averaged and plotted)."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:  # 0-d tensors
            f = float(v.item())
            if math.isfinite(f):
                out[k] = f
    return out


# --------------------------------------------------------------------------- tensors of a model


def as_tensor_dict(params: Any, what: str) -> dict[str, torch.Tensor]:
    """Check a params mapping and return it with numpy arrays turned into tensors."""
    import numpy as np
    import torch

    if not isinstance(params, dict):
        raise CodecError(f"{what} must be a dict of tensors, got {type(params).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in params.items():
        if not isinstance(k, str):
            raise CodecError(f"{what}: key {k!r} is not a string")
        if isinstance(v, torch.Tensor):
            out[k] = v.detach()
        elif isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        else:
            raise CodecError(f"{what}[{k!r}] is a {type(v).__name__}, expected a tensor")
    return out


def split_model(model: FLModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """FLModel → (JSON header, flat tensor dict) for framing; params keys get a ``p:`` prefix
    and optimizer_params an ``o:`` prefix."""
    header = {
        "params_type": model.params_type.value if model.params_type else None,
        "metrics": None if model.metrics is None else plain_metrics(model.metrics),
        "start_round": model.start_round,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
        "meta": model.meta or {},
        "has_params": model.params is not None,
        "has_optimizer_params": model.optimizer_params is not None,
    }
    check_json(header, "model header")
    tensors: dict[str, torch.Tensor] = {}
    if model.params is not None:
        for k, v in as_tensor_dict(model.params, "params").items():
            tensors["p:" + k] = v
    if model.optimizer_params is not None:
        for k, v in as_tensor_dict(model.optimizer_params, "optimizer_params").items():
            tensors["o:" + k] = v
    return header, tensors


_HEADER_KEYS = {
    "params_type",
    "metrics",
    "start_round",
    "current_round",
    "total_rounds",
    "meta",
    "has_params",
    "has_optimizer_params",
}


class LazyMap(Mapping[str, Any]):
    """A mapping whose values are computed from their key when read (nothing is kept): how
    filters and large results stay at one tensor in memory."""

    def __init__(self, keys: list[str], compute: Callable[[str], Any]) -> None:
        self._keys = keys
        self._set = set(keys)
        self._compute = compute

    def __getitem__(self, key: str) -> Any:
        if key not in self._set:
            raise KeyError(key)
        return self._compute(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set


def model_tensors(model: FLModel) -> Mapping[str, torch.Tensor]:
    """The tensors of :func:`split_model` (``p:``/``o:`` names), read from the model's own
    mappings when asked for: a lazy or filtered model is written one tensor at a time."""
    params = model.params or {}
    opt = model.optimizer_params or {}
    names = [f"p:{k}" for k in params] + [f"o:{k}" for k in opt]

    def get(name: str) -> Any:
        t = params[name[2:]] if name.startswith("p:") else opt[name[2:]]
        return as_tensor_dict({name: t}, "params")[name]

    return LazyMap(names, get)


def join_model(header: Any, tensors: dict[str, torch.Tensor]) -> FLModel:
    """Inverse of :func:`split_model`, validating the header strictly."""
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise CodecError("model header has missing or unknown keys")
    check_json(header, "model header")
    for key in ("start_round", "current_round", "total_rounds"):
        v = header[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise CodecError(f"model header: {key} must be an integer or null")
    for key in ("metrics", "meta"):
        if header[key] is not None and not isinstance(header[key], dict):
            raise CodecError(f"model header: {key} must be an object")
    params: dict[str, torch.Tensor] | None = {} if header["has_params"] else None
    opt: dict[str, torch.Tensor] | None = {} if header["has_optimizer_params"] else None
    for name, t in tensors.items():
        prefix, _, key = name.partition(":")
        target = params if prefix == "p" else opt if prefix == "o" else None
        if target is None or not key:
            raise CodecError(f"model payload has an unexpected tensor {name!r}")
        target[key] = t
    return FLModel(
        params_type=header["params_type"],
        params=params,
        optimizer_params=opt,
        metrics=header["metrics"],
        start_round=header["start_round"],
        current_round=header["current_round"],
        total_rounds=header["total_rounds"],
        meta=header["meta"],
    )


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``metrics`` with one-value tensors (and numpy scalars) as Python numbers."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                raise CodecError(f"metric {k!r} is a tensor with more than one value") from None
        out[k] = v
    return out
