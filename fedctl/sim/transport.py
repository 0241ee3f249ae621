"""Moving parameter dicts between the simulator's driver and its workers.

``RayTransport`` puts a model into Ray's object store once (as flat uint8 numpy buffers, which Ray
stores without pickling their data and hands back as zero-copy read-only views);
``LocalTransport`` is the in-process equivalent. Both give a *snapshot*: what a script sends
is copied at ``send`` time, so later changes to its tensors cannot leak into the aggregate.

The copy is never skipped, not even for a script that has ended: objects outlive a script in its
worker process (a module-level model cache in a helper module, an ``lru_cache``, the next site's
``load_state_dict`` into that cached model), so "nothing can change this any more" is never
true of a tensor a script handed over. A real site serialises at ``send``; so does this.
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


# Ray hands out read-only numpy views of its shared memory; wrapping them is intended here and
# nothing writes through them (workers clone before a script sees them, the driver only reads).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def unpack(packed: Packed) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`; tensors are views of the given buffers (treat as read-only)."""
    import torch

    from fedctl.codec.tensors import torch_dtype

    meta, arrays = packed
    out: dict[str, torch.Tensor] = {}
    for (name, dname, shape), arr in zip(meta, arrays, strict=True):
        dt = torch_dtype(dname)
        if arr is None:
            out[name] = torch.empty(shape, dtype=dt)
        else:
            out[name] = torch.from_numpy(arr).view(dt).reshape(shape)
    return out


#: Results up to this size travel inside their batch's return value; larger ones get their
#: own object in Ray's store (one copy, zero-copy reads), so a batch never holds many big ones.
INLINE_BYTES = 4 * 1024 * 1024


def _clone(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


class LocalTransport:
    """Same-process transport: sharing is free, a snapshot is a clone."""

    def share(self, params: dict[str, torch.Tensor]) -> Any:
        """Make the round's global params available to workers."""
        return params

    def snapshot(self, params: dict[str, torch.Tensor], *, in_place: bool = False) -> Any:
        """Freeze what a script sent, at send time: a private copy (``in_place``: see
        FileTransport; ignored here)."""
        return _clone(params)

    def get(self, handle: Any) -> dict[str, torch.Tensor]:
        return handle


class RayTransport:
    """Ray object store transport: one copy into shared memory, zero-copy reads."""

    #: the driver may keep the shared copy as the global model (one copy, not two)
    shares_memory = True

    def share(self, params: dict[str, torch.Tensor]) -> Any:
        import ray

        return ("ref", ray.put(pack(params)))

    def snapshot(self, params: dict[str, torch.Tensor], *, in_place: bool = False) -> Any:
        """Freeze what a script sent, at send time: small results are cloned and travel in
        their batch's return value; large ones are copied into the object store now
        (``in_place``: see FileTransport; ignored here)."""
        import ray

        nbytes = sum(t.numel() * t.element_size() for t in params.values())
        if nbytes <= INLINE_BYTES:
            return ("inline", pack(_clone(params)))
        return ("ref", ray.put(pack(params)))  # ray.put copies the bytes before it returns

    def get(self, handle: Any) -> dict[str, torch.Tensor]:
        import ray

        kind, value = handle
        return unpack(value if kind == "inline" else ray.get(value))
