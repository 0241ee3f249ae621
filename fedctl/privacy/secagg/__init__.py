"""Secure aggregation with dropout recovery (Bonawitz et al., CCS 2017), with the sparse
neighbourhoods of SecAgg+ (Bell et al., CCS 2020) as an option. This commit: the primitives
(Shamir sharing, quantization, masks, sealed share envelopes, the neighbourhood graph).
"""

from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.quantize import (
    Quantizer,
    pack_weighted,
    unpack_weighted,
    weighted_bound,
)

__all__ = [
    "Quantizer",
    "SecAggConfigError",
    "SecAggError",
    "pack_weighted",
    "unpack_weighted",
    "weighted_bound",
]
