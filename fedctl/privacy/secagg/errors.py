"""The errors of secure aggregation: one line each, naming the round and what is missing."""

from __future__ import annotations

from fedctl.errors import FedctlError, UsageError


class SecAggError(FedctlError):
    """A secure-aggregation session cannot go on: too few parties or shares, a forged or
    malformed message, a request a party must refuse. The message names the round."""


class SecAggConfigError(SecAggError, UsageError):
    """Parameters that cannot work (a threshold above the group, a modulus over 62 bits...)."""
