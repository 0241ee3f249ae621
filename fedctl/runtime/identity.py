"""A site's identity in secure aggregation's key exchange, from its startup kit: it signs
with the kit's private key, and checks a peer's signature against the peer's certificate
(relayed by the server) after checking that certificate against the project's CA and that it
names that peer as a site. The server holds no site's key, so it cannot speak for one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedctl.provision.kit import Kit


class KitIdentity:
    """:class:`fedctl.privacy.secagg.site.SiteIdentity` of a real site."""

    def __init__(self, kit: Kit) -> None:
        from fedctl.provision import certs

        self.name = kit.name
        self._key = certs.load_key(kit.key_path.read_bytes())
        self._cert_pem = kit.cert_path.read_text()
        self._ca = certs.load_cert(kit.ca_path.read_bytes())

    def sign(self, data: bytes) -> bytes:
        from fedctl.provision import certs

        return certs.sign_bytes(self._key, data)

    def certificate(self) -> str | None:
        return self._cert_pem

    def verifier(self, relayed: Mapping[str, str]) -> Callable[[str, bytes, bytes], bool]:
        """Checks a peer's signature with the certificate relayed for it (issued by this
        project's CA, for a site of that name, valid now); no certificate: not verified."""
        from fedctl.errors import FedctlError
        from fedctl.provision import certs
        from fedctl.provision.identity import identity_from_certificate

        checked: dict[str, Any] = {}

        def public_key(party: str) -> Any:
            if party in checked:
                return checked[party]
            key = None
            pem = relayed.get(party)
            if pem is not None:
                try:
                    cert = certs.load_cert(pem.encode())
                    who = identity_from_certificate(cert)
                    now = dt.datetime.now(dt.UTC)
                    if (
                        certs.is_issued_by(cert, self._ca)
                        and who.name == party
                        and who.type == "site"
                        and cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
                    ):
                        key = cert.public_key()
                except (ValueError, TypeError, FedctlError):
                    key = None
            checked[party] = key
            return key

        def verify(party: str, message: bytes, signature: bytes) -> bool:
            key = public_key(party)
            return key is not None and certs.verify_bytes(key, signature, message)

        return verify
