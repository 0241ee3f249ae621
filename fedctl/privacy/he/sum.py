"""The server's running sum of encrypted tensors, with the public context only.

Each site's ciphertexts are checked and folded into the sum one at a time as they are read, so
memory is the sum plus one ciphertext, whatever the number of sites. A site's update is taken
whole or not at all: if ciphertext ``j`` of some tensor turns out bad, the ones already folded
in are taken out again (ciphertext addition is exact arithmetic modulo q, so subtracting them
restores the sum bit for bit) and the error names the tensor and the ciphertext.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.privacy.he.blob import dump_vector, load_vector, pack, unpack
from fedctl.privacy.he.params import HEError

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.he.context import HEContext
    from fedctl.privacy.he.tensors import Description


class EncryptedSum:
    """Σ of the sites' encrypted tensors that ``description`` lists (see the module docstring)."""

    def __init__(self, description: Description, ctx: HEContext) -> None:
        self.description = description
        self.ctx = ctx
        self._sum: dict[str, list[Any]] = {
            k: [None] * spec.count for k, spec in description.tensors.items()
        }
        #: updates folded in
        self.count = 0
        self._broken: str | None = None

    def _sizes(self, name: str) -> list[int]:
        numel, slots = self.description.tensors[name].numel, self.ctx.params.slots
        return [min(slots, numel - i * slots) for i in range(self.description.tensors[name].count)]

    def add(self, params: Mapping[str, torch.Tensor], *, fold: bool = True) -> None:
        """Check one site's encrypted tensors and (``fold``) add them; HEError refuses them all.

        ``fold=False`` checks without adding (a site whose weight is 0).
        """
        if self._broken is not None:
            raise HEError(f"the encrypted sum is unusable: {self._broken}")
        missing = [k for k in self.description.tensors if k not in params]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise HEError(
                f"encrypted parameter(s) {', '.join(map(repr, missing[:3]))}{more} missing "
                "from the update"
            )
        done: list[tuple[str, int, bool]] = []  # (name, index, was the first term)
        try:
            for name, spec in self.description.tensors.items():
                what = f"parameter {name!r}"
                acc = self._sum[name]
                sizes = self._sizes(name)
                for i, ct in enumerate(unpack(params[name], self.ctx, spec.count, what)):
                    vec = load_vector(self.ctx, ct, sizes[i], f"{what}, ciphertext {i}")
                    if not fold:
                        continue
                    if acc[i] is None:
                        acc[i] = vec
                        done.append((name, i, True))
                    else:
                        acc[i].add_(vec)
                        done.append((name, i, False))
        except Exception as exc:
            self._undo(params, done)
            if isinstance(exc, HEError):
                raise
            raise HEError(f"the encrypted update cannot be added ({exc})") from None
        self.count += 1

    def _undo(self, params: Mapping[str, torch.Tensor], done: list[tuple[str, int, bool]]) -> None:
        """Take the ciphertexts in ``done`` out of the sum again."""
        try:
            blobs: dict[str, list[Any]] = {}
            for name, i, first in reversed(done):
                if first:
                    self._sum[name][i] = None
                    continue
                if name not in blobs:
                    spec = self.description.tensors[name]
                    blobs[name] = unpack(params[name], self.ctx, spec.count, name)
                vec = load_vector(self.ctx, blobs[name][i], self._sizes(name)[i], name)
                self._sum[name][i].sub_(vec)
        except Exception as exc:  # cannot happen with the bytes that loaded a moment ago
            self._broken = f"a refused update could not be taken out again ({exc})"

    def result(self, divisor: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The encrypted sums as uint8 tensors, and their description with ``divisor`` (Σw)."""
        if self._broken is not None:
            raise HEError(f"the encrypted sum is unusable: {self._broken}")
        out = {}
        for name, acc in self._sum.items():
            if any(v is None for v in acc):
                raise HEError(f"parameter {name!r}: no encrypted update was added")
            cts = []
            for i, v in enumerate(acc):
                cts.append(dump_vector(v))
                acc[i] = None  # free the sum as it is serialized
            out[name] = pack(self.ctx.key_id, cts)
        return out, self.description.with_divisor(divisor).to_dict()
