"""The names secure aggregation uses in tasks and results (light: no torch, no crypto), and
the two helpers a site runtime needs before it knows whether a task is one of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: the name of the protocol's system tasks (answered by the site runtime, not the script)
TASK = "secagg"
#: a protocol message in a task's meta, or the answer in a result's meta
META = "secagg"
#: the input spec in a training task's meta
INPUT = "secagg_input"
#: a site's certificate (PEM) next to its advertisement; the roster's, next to the share keys
CERT = "secagg_cert"
CERTS = "secagg_certs"
#: the params key of a masked input
MASKED = "secagg.masked"
#: the server's first message of a session: ``{"kind", "session", "config"}``
START = "secagg/start"

#: what a script never sees of a task's meta
PRIVATE_META = (META, INPUT, CERTS)


def strip_private(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A task's meta without the protocol's entries (what the script sees)."""
    return {k: v for k, v in (meta or {}).items() if k not in PRIVATE_META}


def wants_input(meta: Mapping[str, Any] | None) -> bool:
    """Whether a training task asks for a masked input."""
    return meta is not None and INPUT in meta
