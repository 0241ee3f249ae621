"""Secure aggregation with dropout recovery (Bonawitz et al., CCS 2017), with the sparse
neighbourhoods of SecAgg+ (Bell et al., CCS 2020) as an option: the server learns the sum of
the sites' inputs and nothing else about any one of them. Transport-free: the client and server
state machines (:mod:`.client`, :mod:`.server`, the messages in :mod:`.protocol`) take and
return plain messages that the caller carries; :mod:`.site` runs a site's side in fedctl's
runtimes, :mod:`fedctl.workflows.secure` the server's. See docs/secagg.md.

The names below are imported on first use: they load torch and ``cryptography``, which
importing this package (e.g. for :mod:`.keys` or :mod:`.errors`) does not.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SecAggClient": "client",
    "SecAggConfig": "protocol",
    "Signer": "protocol",
    "Verifier": "protocol",
    "suggested_bits": "protocol",
    "SecAggServer": "server",
    "Quantizer": "quantize",
    "pack_weighted": "quantize",
    "unpack_weighted": "quantize",
    "weighted_bound": "quantize",
    "SecAggError": "errors",
    "SecAggConfigError": "errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedctl.privacy.secagg' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedctl.privacy.secagg.{module}"), name)


__all__ = sorted(_LAZY)
