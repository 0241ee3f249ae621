"""How a Flower ``Message`` travels in fedctl's frames (Flower's own protobuf bytes as a uint8
tensor: nothing is pickled), and where a Flower app's components are (its pyproject.toml).
Shared by the Flower bridge's two sides (:mod:`fedctl.workflows.flower`,
:mod:`fedctl.client.flower`); flwr itself is imported by neither module here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: the params key of a serialized Flower Message, and the meta key of the node's facts
MSG = "flower.msg"
NODE = "flower_node"


def to_tensor(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def from_tensor(t: Any) -> bytes:
    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("the task carries no serialized Flower message")
    return bytes(t.numpy().tobytes())


def load_component(app_dir: Path, which: str) -> Any:
    """The app's ``serverapp`` or ``clientapp`` object, as its pyproject.toml names it."""
    import importlib
    import tomllib

    with open(app_dir / "pyproject.toml", "rb") as fh:
        spec = tomllib.load(fh)
    ref = spec.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get(which)
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"{app_dir}/pyproject.toml names no [tool.flwr.app.components] {which}")
    module, _, attr = ref.partition(":")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
