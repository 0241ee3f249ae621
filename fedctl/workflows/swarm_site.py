"""Swarm learning on a site: everything the site runtime does that its training script does not
see, the same for the simulator's script hosts and a real site's job runner.

The server of a swarm job only relays (:mod:`fedctl.workflows.swarm`): every model and update
that crosses it is sealed from one site to another (:mod:`fedctl.privacy.e2e`). A site answers
four *system tasks* (name :data:`TASK`, the protocol message in ``meta[META]``) itself:

* ``keys``: make this job's X25519 key and advertise it, signed with the site's identity;
* ``aggregate``: open the round's updates sealed for this site, take their weighted mean (the
  FedAvg aggregate, computed as the server would) and seal the new model for every site;
* ``reseal``: seal this site's last update again for a replacement aggregator;
* ``final``: open the last model and keep it in the site's folder (:data:`FINAL_FILE`).

A training task carries ``meta[META] = {"kind": "train", ...}``: the runtime opens the model
sealed for this site before the script sees the task (meta without the protocol entry), and
seals the script's result for the round's aggregator. What the site keeps between tasks (its
key, the model it trained from, its last update) lives in its own folder, readable by its owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.weighted import WeightedAggregator, check_update, check_weight
from fedctl.codec.model import ParamsType
from fedctl.codec.tensorfiles import load_file, save_file
from fedctl.codec.tensors import decode, iter_encode
from fedctl.constants import MAX_BLOB_BYTES
from fedctl.privacy import e2e
from fedctl.privacy.e2e import E2EError
from fedctl.workflows.fedavg import resolve_precision

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.secagg.site import SiteIdentity

#: the protocol's system tasks, and its entry in a task's meta
TASK = "swarm"
META = "swarm"
#: the params key of a sealed payload (``CT/<site>`` when a task carries several)
CT = "swarm.ct"
#: this site's copy of the job's last model, in its folder
FINAL_FILE = "swarm-final.safetensors"
_KEY_FILE = "swarm.key"
_BASE_FILE = "swarm-base.safetensors"
_UPDATE_FILE = "swarm-update.safetensors"


def is_train(meta: Mapping[str, Any] | None) -> bool:
    """Whether a training task is a swarm round's (its model and result are sealed)."""
    spec = (meta or {}).get(META)
    return isinstance(spec, Mapping) and spec.get("kind") == "train"


def strip(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A task's meta without the protocol's entry (what the script sees)."""
    return {k: v for k, v in (meta or {}).items() if k != META}


def to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors in fedctl's framing, as one byte string (what is sealed)."""
    return b"".join(bytes(piece) for piece in iter_encode(tensors))


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_bytes` (bounded like any model from the network)."""
    return decode(data, MAX_BLOB_BYTES, copy=True)[0]


def as_tensor(sealed: bytes) -> torch.Tensor:
    """A sealed payload as a uint8 tensor (so it travels in fedctl's framing)."""
    import torch

    return torch.frombuffer(bytearray(sealed), dtype=torch.uint8)


def _raw(value: Any, what: str) -> bytes:
    import torch

    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise E2EError(f"{what} is not a sealed payload")
    return value.numpy().tobytes()


class SwarmSite:
    """One site's side of a swarm job (its state in ``state_dir``)."""

    def __init__(self, identity: SiteIdentity, state_dir: Path, job_id: str) -> None:
        self.identity = identity
        self.name = identity.name
        self.state_dir = Path(state_dir)
        self.job_id = job_id

    # ------------------------------------------------------------------------- keys

    def _key(self) -> e2e.E2EKey:
        return e2e.E2EKey.load_or_create(self.state_dir / _KEY_FILE)

    def _peers(self, spec: Mapping[str, Any], only: Any = None) -> dict[str, Any]:
        """The roster's keys, each checked against its site's identity (``only``: that one's)."""
        roster = spec.get("roster")
        if not isinstance(roster, Mapping):
            raise E2EError("the task has no roster of the sites' keys")
        if only is not None:
            if not isinstance(only, str) or only not in roster:
                raise E2EError(f"{only!r} is not in the roster of this job's sites")
            roster = {only: roster[only]}
        certs = {s: ad.get("cert") for s, ad in roster.items() if isinstance(ad, Mapping)}
        verify = self.identity.verifier({s: c for s, c in certs.items() if isinstance(c, str)})
        return e2e.peer_keys(self.job_id, roster, verify)

    def _peer(self, spec: Mapping[str, Any], site: Any) -> Any:
        return self._peers(spec, only=site)[site]

    def _ad(self, spec: Mapping[str, Any], purpose: str, sender: str, receiver: str) -> bytes:
        rnd = spec.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            raise E2EError("the task names no round")
        return e2e.context(self.job_id, rnd, purpose, sender, receiver)

    # ------------------------------------------------------------------------- system tasks

    def handle(
        self, spec: Mapping[str, Any], params: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """Answer a system task: (the reply for ``meta[META]``, the params to send back)."""
        kind = spec.get("kind")
        if kind == "keys":
            ad = self._key().advertise(self.job_id, self.name, self.identity.sign)
            return {**ad, "cert": self.identity.certificate()}, None
        if kind == "aggregate":
            return self._aggregate(spec, params or {})
        if kind == "reseal":
            update = load_file(self.state_dir / _UPDATE_FILE, MAX_BLOB_BYTES)[0]
            return {}, self.seal_result(update, spec)
        if kind == "final":
            model = self.open_model(params or {}, spec, keep=FINAL_FILE)
            digest = hashlib.sha256(to_bytes(model)).hexdigest()
            return {"sha256": digest}, None
        raise E2EError(f"unknown swarm step {kind!r}")

    def open_model(
        self, params: Mapping[str, torch.Tensor], spec: Mapping[str, Any], keep: str = _BASE_FILE
    ) -> dict[str, torch.Tensor]:
        """The model sealed for this site by ``spec["from"]`` (the first round's model comes
        from the recipe, in the clear); kept in the site's folder as ``keep``."""
        sender = spec.get("from")
        if sender is None:
            if CT in params:
                raise E2EError("a sealed model without a sender")
            model = dict(params)
        else:
            made = {**spec, "round": spec.get("model_round")}
            ad = self._ad(made, "model", sender, self.name)
            sealed = _raw(params.get(CT), f"the model from {sender}")
            plain = e2e.open_sealed(self._key(), self._peer(spec, sender), sealed, ad, sender)
            model = from_bytes(plain)
        save_file(model, self.state_dir / keep, durable=False)
        return model

    def seal_result(
        self, params: Mapping[str, torch.Tensor], spec: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The script's update sealed for the round's aggregator (and kept for a reseal)."""
        target = spec.get("to")
        plain = to_bytes(params)
        save_file(dict(params), self.state_dir / _UPDATE_FILE, durable=False)
        ad = self._ad(spec, "update", self.name, str(target))
        sealed = e2e.seal(self._key(), self._peer(spec, target), plain, ad)
        return {CT: as_tensor(sealed)}

    def _aggregate(
        self, spec: Mapping[str, Any], params: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        senders = spec.get("senders")
        receivers = spec.get("to")
        if not isinstance(senders, list) or not senders or not isinstance(receivers, list):
            raise E2EError("the aggregation task names no senders or receivers")
        base_path = self.state_dir / _BASE_FILE
        if not base_path.exists():
            raise E2EError("this site has not trained in this round: no model to aggregate on")
        base = load_file(base_path, MAX_BLOB_BYTES)[0]
        peers = self._peers(spec)
        key = self._key()
        agg = WeightedAggregator(base, resolve_precision("auto", base))  # as FedAvg's
        for entry in senders:
            site, weight, kind = (
                entry if isinstance(entry, list) and len(entry) == 3 else [None] * 3
            )
            if site not in peers:
                raise E2EError(f"the aggregation task names {site!r}, which is not in the roster")
            sealed = _raw(params.get(f"{CT}/{site}"), f"the update from {site}")
            ad = self._ad(spec, "update", site, self.name)
            update = from_bytes(e2e.open_sealed(key, peers[site], sealed, ad, site))
            try:
                params_type = ParamsType(str(kind))
            except ValueError:
                raise E2EError(f"{site}'s update has an unknown kind {kind!r}") from None
            w = check_weight(weight, f"{site}'s weight")
            check_update(base, update, w, params_type)
            agg.add(update, w, params_type, validate=False)
        new = agg.result()
        plain = to_bytes(new)
        out: dict[str, torch.Tensor] = {}
        for site in receivers:
            if site not in peers:
                raise E2EError(f"the aggregation task names {site!r}, which is not in the roster")
            ad = self._ad(spec, "model", self.name, site)
            out[f"{CT}/{site}"] = as_tensor(e2e.seal(key, peers[site], plain, ad))
        return {"aggregated": len(senders)}, out
