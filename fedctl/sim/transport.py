"""Moving parameter dicts between the simulator's driver and its workers.

``RayTransport`` puts a model into Ray's object store once (as flat uint8 numpy buffers, which Ray
stores without pickling their data and hands back as zero-copy read-only views);
``LocalTransport`` is the in-process equivalent. Both give a *snapshot*: what a script sends
is copied at ``send`` time, so later changes to its model cannot leak into the aggregate.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Packed = tuple[list[tuple[str, str, tuple[int, ...]]], list[Any]]


def pack(params: dict[str, torch.Tensor]) -> Packed:
    """Params → (names, dtypes, shapes) + flat uint8 numpy views of each tensor's bytes."""
    import torch

    from fedctl.codec.tensors import dtype_name

    meta: list[tuple[str, str, tuple[int, ...]]] = []
    arrays: list[Any] = []
    for name, t in params.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        meta.append((name, dtype_name(t.dtype), tuple(t.shape)))
        arrays.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None)
    return meta, arrays


def unpack(packed: Packed) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`; tensors are views of the given buffers (treat as read-only)."""
    import torch

    from fedctl.codec.tensors import torch_dtype

    meta, arrays = packed
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers are intended here
        for (name, dname, shape), arr in zip(meta, arrays, strict=True):
            dt = torch_dtype(dname)
            if arr is None:
                out[name] = torch.empty(shape, dtype=dt)
            else:
                out[name] = torch.from_numpy(arr).view(dt).reshape(shape)
    return out


class LocalTransport:
    """Same-process transport: a snapshot is a clone."""

    def put(self, params: dict[str, torch.Tensor], *, snapshot: bool = True) -> Any:
        if not snapshot:
            return params
        return {k: v.detach().clone() for k, v in params.items()}

    def get(self, handle: Any) -> dict[str, torch.Tensor]:
        return handle


class RayTransport:
    """Ray object store transport: one copy into shared memory, zero-copy reads."""

    def put(self, params: dict[str, torch.Tensor], *, snapshot: bool = True) -> Any:
        import ray

        return ray.put(pack(params))

    def get(self, handle: Any) -> dict[str, torch.Tensor]:
        import ray

        return unpack(ray.get(handle))
