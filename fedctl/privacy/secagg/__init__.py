"""Secure aggregation with dropout recovery (Bonawitz et al., CCS 2017), with the sparse
neighbourhoods of SecAgg+ (Bell et al., CCS 2020) as an option: the server learns the sum of
the sites' inputs and nothing else about any one of them. Transport-free: the client and server
state machines of :mod:`.protocol` take and return plain messages that the caller carries.
See docs/secagg.md.

Import it explicitly (``from fedctl.privacy.secagg import SecAggClient``): it loads torch and
``cryptography``, which ``fedctl.privacy`` alone does not need.
"""

from fedctl.privacy.secagg.client import SecAggClient
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.protocol import SecAggConfig, Signer, Verifier, suggested_bits
from fedctl.privacy.secagg.quantize import (
    Quantizer,
    pack_weighted,
    unpack_weighted,
    weighted_bound,
)
from fedctl.privacy.secagg.server import SecAggServer

__all__ = [
    "Quantizer",
    "SecAggClient",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggError",
    "SecAggServer",
    "Signer",
    "Verifier",
    "pack_weighted",
    "suggested_bits",
    "unpack_weighted",
    "weighted_bound",
]
