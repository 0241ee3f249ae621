"""End-to-end encryption between two sites through a relay that must not read or forge.

Each site makes an X25519 key pair for a job and *advertises* its public key signed with its
identity (the private key of its startup kit, whose certificate the project's CA issued; in
simulation an Ed25519 key derived from the run's seed). The relay passes advertisements on with
the certificates; a site accepts a peer's key only if the signature checks against that peer's
certificate (issued by the project's CA, naming that site). A payload from A to B is sealed with
AES-256-GCM under a key derived (HKDF-SHA256) from the X25519 agreement of A's private and B's
public key, bound by the associated data to the job, the round, the purpose and both names: only
A and B can compute the key, so B knows A sealed it, and nothing sealed for one purpose or round
opens as another. A changed byte fails the GCM tag check.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl._fs import atomic_write
from fedctl.errors import FedctlError

#: what is signed with a site's identity: this prefix, the job, the site and its public key
_AD_PREFIX = b"fedctl-e2e-key/v1"
_HKDF_INFO = b"fedctl-e2e/v1"
NONCE_BYTES = 12


class E2EError(FedctlError):
    """A payload or a peer's key that does not check (tampered, wrong site, unsigned)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise E2EError(f"{what} is not base64 text")
    try:
        return base64.b64decode(text.encode(), validate=True)
    except ValueError:
        raise E2EError(f"{what} is not base64 text") from None


def _signed(job: str, site: str, public: bytes) -> bytes:
    return b"|".join([_AD_PREFIX, job.encode(), site.encode(), public])


@dataclass
class E2EKey:
    """One site's X25519 key for one job (kept in its job folder, readable by its owner)."""

    private: Any

    @classmethod
    def load_or_create(cls, path: Path) -> E2EKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise E2EError(f"{path}: not an X25519 private key")
            return cls(X25519PrivateKey.from_private_bytes(raw))
        key = X25519PrivateKey.generate()
        from cryptography.hazmat.primitives import serialization

        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, raw, mode=0o600)
        return cls(key)

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    def advertise(self, job: str, site: str, sign: Callable[[bytes], bytes]) -> dict[str, str]:
        """This site's public key, signed with its identity, for the relay to pass on."""
        public = self.public_bytes()
        return {"public": _b64(public), "signature": _b64(sign(_signed(job, site, public)))}


def peer_keys(
    job: str,
    roster: Mapping[str, Mapping[str, Any]],
    verify: Callable[[str, bytes, bytes], bool],
) -> dict[str, Any]:
    """The peers' public keys from the relayed advertisements, each checked against its
    site's identity; any that does not check is an error naming the site."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    out: dict[str, Any] = {}
    for site, ad in roster.items():
        if not isinstance(ad, Mapping):
            raise E2EError(f"the key advertised for {site!r} is malformed")
        public = _unb64(ad.get("public"), f"{site}'s public key")
        signature = _unb64(ad.get("signature"), f"{site}'s key signature")
        if len(public) != 32:
            raise E2EError(f"{site}'s public key is not an X25519 key")
        if not verify(site, _signed(job, site, public), signature):
            raise E2EError(f"the key advertised for {site!r} is not signed by {site}'s identity")
        out[site] = X25519PublicKey.from_public_bytes(public)
    return out


def _aead(mine: E2EKey, theirs: Any, context: bytes) -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = mine.private.exchange(theirs)
    key = HKDF(hashes.SHA256(), 32, salt=None, info=_HKDF_INFO + b"|" + context).derive(shared)
    return AESGCM(key)


def context(job: str, round_: int, purpose: str, sender: str, receiver: str) -> bytes:
    """The associated data that binds a payload to where it belongs."""
    return "|".join([job, str(round_), purpose, sender, receiver]).encode()


def seal(mine: E2EKey, theirs: Any, plaintext: bytes, ad: bytes) -> bytes:
    """``plaintext`` for the owner of ``theirs`` only: nonce ‖ AES-GCM ciphertext and tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + bytes(_aead(mine, theirs, ad).encrypt(nonce, plaintext, ad))


def open_sealed(mine: E2EKey, theirs: Any, sealed: bytes, ad: bytes, sender: str) -> bytes:
    """What ``sender`` sealed for this site; an error naming the sender if anything was
    changed, or if it was not sealed by ``sender`` for this site, job, round and purpose."""
    from cryptography.exceptions import InvalidTag

    if len(sealed) < NONCE_BYTES + 16:
        raise E2EError(f"the payload from {sender} is truncated")
    try:
        return bytes(
            _aead(mine, theirs, ad).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
        )
    except InvalidTag:
        raise E2EError(
            f"the payload from {sender} failed authentication (changed on the way, or not "
            "sealed by it for this site and round)"
        ) from None
