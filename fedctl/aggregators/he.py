"""The weighted mean when some parameters arrive homomorphically encrypted (docs/he.md).

The server holds only the public CKKS context. Parameters the round's HE description lists come
from each site as ciphertexts of ``w · x`` (the site already applied its weight); they are
summed as ciphertexts, one ciphertext at a time as they are read, into Σ w·x, and the result's
description carries the divisor Σ w in plain: a site decrypts the sum and divides, which gives
the weighted mean exactly to float64 (see :mod:`fedctl.privacy.he.tensors` for why the server
does not multiply by 1/Σw under encryption). Every other parameter goes to an ordinary
:class:`~fedctl.aggregators.weighted.WeightedAggregator`.

Each site's update is refused whole, with :class:`~fedctl.aggregators.weighted.UpdateRejected`
naming the parameter and the reason, if an encrypted parameter is missing, plain where a
ciphertext is expected, larger than its ciphertexts can be, made under another key or
parameters, or does not load; or if the update is a DIFF (encrypted parameters must be FULL
weights: the server cannot add the global model to them). A refused update leaves the sum as
it was. What the server cannot check is what is inside a ciphertext: a site may encrypt any
values, as it may send any plain update within range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import (
    AggregateUnusable,
    UpdateRejected,
    WeightedAggregator,
    check_update,
    check_weight,
)
from fedctl.codec.model import ParamsType
from fedctl.errors import UsageError
from fedctl.privacy.he import EncryptedSum, HEError, parse_description

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.he import HEContext


class HEMean:
    """One round's weighted mean over plain and encrypted parameters (module docstring).

    ``global_params`` is the round's global model (encrypted parameters in it may be plain or
    ciphertexts: only their description is used), ``description`` the HE description of what
    sites send (``describe_params`` or the previous round's :attr:`result_description`), ``ctx``
    the server's public context. After :meth:`result`, :attr:`result_description` describes the
    encrypted parameters of the new global model (divisor Σ w).
    """

    def __init__(
        self,
        global_params: Mapping[str, torch.Tensor],
        description: Any,
        ctx: HEContext,
        precision: str = "float64",
    ) -> None:
        if ctx.has_secret_key:
            raise UsageError(
                "the HE aggregate is computed by the server, which must hold only the public "
                "context (fedctl.privacy.he.public_context)"
            )
        try:
            self.description = parse_description(description, ctx)
        except HEError as exc:
            raise UsageError(str(exc)) from None
        absent = [k for k in self.description.tensors if k not in global_params]
        if absent:
            raise UsageError(
                f"the HE description lists {', '.join(map(repr, absent[:3]))}, which the global "
                "model does not have"
            )
        self.global_params = global_params
        self._plain_global = {
            k: v for k, v in global_params.items() if k not in self.description.tensors
        }
        self._plain = WeightedAggregator(self._plain_global, precision)
        self._sum = EncryptedSum(self.description, ctx)
        self.count = 0
        self.total_weight = 0.0
        self.result_description: dict[str, Any] | None = None

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = ParamsType.FULL,
        *,
        validate: bool = True,
    ) -> None:
        """Fold one site's update in, or refuse it whole (UpdateRejected).

        The encrypted parameters are always checked (they come from the network whatever the
        caller validated); ``validate`` applies to the plain ones, as for the weighted mean.
        """
        weight = check_weight(weight)
        encrypted = self.description.tensors
        if params_type == ParamsType.DIFF and encrypted:
            raise UpdateRejected(
                "a DIFF update cannot be aggregated under encryption: encrypted parameters must "
                "be sent as FULL weights"
            )
        plain = {k: v for k, v in params.items() if k not in encrypted}
        if validate:
            check_update(self._plain_global, plain, weight, params_type)
        try:
            self._sum.add(params, fold=weight > 0)
        except HEError as exc:
            raise UpdateRejected(str(exc)) from None
        self._plain.add(plain, weight, params_type, validate=False)
        self.count += 1
        self.total_weight += weight

    def result(self) -> dict[str, torch.Tensor]:
        """The new global parameters: plain means, and encrypted sums (see
        :attr:`result_description`); call once per round."""
        encrypted: dict[str, torch.Tensor] = {}
        if self.description.tensors:
            if self.total_weight <= 0:
                raise AggregateUnusable(
                    "no update with a positive weight: the encrypted parameters have no aggregate"
                )
            try:
                encrypted, self.result_description = self._sum.result(self.total_weight)
            except HEError as exc:
                raise AggregateUnusable(str(exc)) from None
        else:
            self.result_description = self.description.with_divisor(self.total_weight).to_dict()
        plain = self._plain.result()
        return {k: encrypted[k] if k in encrypted else plain[k] for k in self.global_params}
