"""Secure aggregation on a site: the protocol's system tasks and the masked input of a
training result, the same for the simulator's script hosts and a real site's job runner.

The server drives a session with tasks named :data:`TASK`, which the site runtime answers
itself (the training script never sees them): each carries one protocol message in
``meta[META]`` and the answer goes back in the result's ``meta[META]``. The round's training
task carries this site's masked-input request in ``meta[META]`` and the :class:`InputSpec` in
``meta[INPUT]``; the runtime takes both out before the script sees the task, and turns the
script's result (after the site's own ``result_out`` filters) into the masked input: params
``{MASKED: int64 tensor}``, the script's metrics, nothing else.

Between tasks the party's state (its private keys, its self-mask seed, the shares it holds)
is kept in a file of the site's own folder, readable by its owner only, and removed when the
session ends. Identities: on a real site, the site's key from its startup kit signs, and the
peers' certificates (relayed by the server, checked against the project's CA) verify; in
simulation, each virtual site has an Ed25519 key derived from the run's seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedctl._fs import atomic_write
from fedctl.codec.model import FLModel, ParamsType
from fedctl.privacy.secagg.client import SecAggClient
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.keys import CERT, CERTS, INPUT, MASKED, META, START
from fedctl.privacy.secagg.protocol import (
    CONSISTENCY,
    SHARE_KEYS,
    UNMASK,
    SecAggConfig,
    Verifier,
)
from fedctl.privacy.secagg.vector import InputSpec

if TYPE_CHECKING:
    import torch


class SiteIdentity(Protocol):
    """Who a site is in the key exchange: it signs with its identity key; peers' signatures
    are checked against what the server relays (certificates), or known keys in simulation."""

    name: str

    def sign(self, data: bytes) -> bytes: ...

    def certificate(self) -> str | None: ...

    def verifier(self, certs: Mapping[str, str]) -> Verifier: ...


class SimulatedIdentity:
    """A virtual site's identity: an Ed25519 key derived from the run's seed and its name
    (every virtual site runs on the user's own machine; there is nothing to certify)."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.seed = seed

    @staticmethod
    def _key(seed: int, name: str) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        raw = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=32, person=b"fedctl-sim-id")
        return Ed25519PrivateKey.from_private_bytes(raw.digest())

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key(self.seed, self.name).sign(data))

    def certificate(self) -> str | None:
        return None

    def verifier(self, certs: Mapping[str, str]) -> Verifier:
        from cryptography.exceptions import InvalidSignature

        seed = self.seed

        def verify(party: str, message: bytes, signature: bytes) -> bool:
            try:
                SimulatedIdentity._key(seed, party).public_key().verify(signature, message)
            except InvalidSignature:
                return False
            return True

        return verify


class SiteSecAgg:
    """One site's side of every session of a job (state kept in ``state_dir``).

    ``seed``: reproducible randomness (simulation); None: the operating system's (real sites).
    """

    def __init__(self, identity: SiteIdentity, state_dir: str | os.PathLike[str], seed: int | None):
        self.identity = identity
        self.state_dir = Path(state_dir)
        self.seed = seed

    # ------------------------------------------------------------------ state files

    def _path(self, session: str) -> Path:
        digest = hashlib.sha256(session.encode()).hexdigest()[:24]
        return self.state_dir / f"secagg-{digest}.json"

    def _rng(self, session: str, step: str) -> random.Random | None:
        if self.seed is None:
            return None
        return random.Random(f"{self.seed}:{self.identity.name}:{session}:{step}")

    def _save(self, client: SecAggClient, certs: Mapping[str, str]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {"client": client.export_state(), "certs": dict(certs)}
        atomic_write(self._path(client.config.session), json.dumps(data), mode=0o600)

    def _load(
        self, session: Any, step: str, relayed: Mapping[str, str] | None = None
    ) -> tuple[SecAggClient, dict[str, str]]:
        """The party saved for ``session``; ``relayed``: the peers' certificates from now on."""
        if not isinstance(session, str) or not session:
            raise SecAggError(f"{step}: the message names no session")
        path = self._path(session)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SecAggError(f"{step}: this site has no state for session {session!r}") from None
        except (OSError, ValueError) as exc:
            raise SecAggError(f"{step}: this site's state is unreadable ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("certs"), dict):
            raise SecAggError(f"{step}: this site's state is damaged")
        certs = dict(relayed) if relayed is not None else data["certs"]
        client = SecAggClient.restore(
            data.get("client") or {},
            self.identity.sign,
            self.identity.verifier(certs),
            self._rng(session, step),
        )
        if client.party != self.identity.name or client.config.session != session:
            raise SecAggError(f"{step}: this site's state belongs to another party or session")
        return client, certs

    def forget(self, session: Any) -> None:
        """Remove a session's state (it ended, or this site dropped out of it)."""
        if isinstance(session, str) and session:
            self._path(session).unlink(missing_ok=True)

    def forget_task(self, task_meta: Mapping[str, Any] | None) -> None:
        """Remove the state of the session a training task belonged to (its script failed:
        this site has dropped out of the round)."""
        msg = (task_meta or {}).get(META)
        if isinstance(msg, Mapping):
            self.forget(msg.get("session"))

    def forget_all(self) -> None:
        """Remove every session's state (the job ended here)."""
        for path in self.state_dir.glob("secagg-*.json"):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ system tasks

    def handle(self, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        """Answer one system task (its meta) with the result's meta; SecAggError refuses."""
        msg = (meta or {}).get(META)
        if not isinstance(msg, Mapping):
            raise SecAggError("a secure-aggregation task without its message")
        kind, session = msg.get("kind"), msg.get("session")
        if kind == START:
            return self._start(msg)
        step = {SHARE_KEYS: "round 1", CONSISTENCY: "consistency check", UNMASK: "round 3"}.get(
            kind  # type: ignore[arg-type]
        )
        if step is None:
            raise SecAggError(f"unknown secure-aggregation message {kind!r:.60}")
        relayed = None
        if kind == SHARE_KEYS:
            relayed = (meta or {}).get(CERTS) or {}
            if not isinstance(relayed, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in relayed.items()
            ):
                raise SecAggError("round 1: the relayed certificates are malformed")
        client, certs = self._load(session, step, relayed)
        try:
            if kind == SHARE_KEYS:
                reply = client.share_keys(msg)
            elif kind == CONSISTENCY:
                reply = client.confirm(msg)
            else:
                reply = client.unmask(msg)
                self.forget(session)  # the session is over for this site
                return {META: reply}
        except SecAggError:
            self.forget(session)  # a refusal ends the session here: this site drops out
            raise
        self._save(client, certs)
        return {META: reply}

    def _start(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        if set(msg) != {"kind", "session", "config"} or not isinstance(msg["config"], Mapping):
            raise SecAggError("round 0: the start message is {kind, session, config}")
        try:
            config = SecAggConfig(**msg["config"])
        except (SecAggConfigError, TypeError) as exc:
            raise SecAggError(f"round 0: the server's parameters: {exc}") from None
        if config.session != msg["session"]:
            raise SecAggError("round 0: the parameters are for another session")
        client = SecAggClient(
            self.identity.name,
            config,
            self.identity.sign,
            self.identity.verifier({}),
            self._rng(config.session, "round 0"),
        )
        reply: dict[str, Any] = {META: client.advertise()}
        cert = self.identity.certificate()
        if cert is not None:
            reply[CERT] = cert
        self._save(client, {})
        return reply

    # ------------------------------------------------------------------ the training result

    def masked_result(
        self,
        model: FLModel,
        task_meta: Mapping[str, Any],
        base: Mapping[str, torch.Tensor] | None,
        generator: torch.Generator | None = None,
    ) -> tuple[FLModel, dict[str, Any]]:
        """The script's result → the masked input the server may see (and notes for the log).
        ``base``: the model the task carried; ``generator``: for distributed DP's noise (None:
        secret randomness)."""
        import torch

        spec = InputSpec.from_public(task_meta.get(INPUT))
        request = task_meta.get(META)
        if not isinstance(request, Mapping):
            raise SecAggError("round 2: the training task carries no masked-input request")
        session = request.get("session")
        client, certs = self._load(session, "round 2")
        if generator is None and spec.noise_std > 0:
            generator = torch.Generator().manual_seed(
                int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
            )
        try:
            values, notes = spec.site_input(model, base, generator)
            reply = client.masked_input(request, values)
        except SecAggError:
            self.forget(session)
            raise
        self._save(client, certs)
        masked = reply.pop("masked")
        meta = {META: reply}
        out = replace(
            model,
            params={MASKED: masked},
            params_type=ParamsType.FULL,
            optimizer_params=None,
            meta=meta,
        )
        notes["weight"] = spec.weight_of(model)
        return out, notes
