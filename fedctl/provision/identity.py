"""Who a certificate says its holder is: the one place the subject encoding is defined.

Every fedctl certificate names its holder in the subject, so that a peer's identity can be taken
from the TLS handshake alone, never from a field in a message:

* ``CN``   (2.5.4.3)  participant name: the server's DNS name, a site name, an admin's e-mail;
* ``O``    (2.5.4.10) organisation;
* ``OU``   (2.5.4.11) participant type: ``server``, ``site`` or ``admin``;
* ``role`` (2.5.4.72, X.520 *role*; ``openssl x509 -text`` prints it as ``role=``) — admins only:
  ``project_admin``, ``org_admin``, ``lead`` or ``member``.

Each attribute appears exactly once; a certificate that breaks these rules has no identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedctl.errors import PermissionDenied

if TYPE_CHECKING:
    from cryptography import x509

PARTICIPANT_TYPES: tuple[str, ...] = ("server", "site", "admin")
ROLES: tuple[str, ...] = ("project_admin", "org_admin", "lead", "member")
ROLE_OID_DOTTED = "2.5.4.72"


@dataclass(frozen=True)
class Identity:
    """A participant as its certificate names it; ``role`` is set for admins only."""

    name: str
    org: str
    type: str
    role: str | None = None

    def __str__(self) -> str:
        extra = f", role {self.role}" if self.role else ""
        return f"{self.type} '{self.name}' (org {self.org}{extra})"

    def to_dict(self) -> dict[str, str | None]:
        """Plain dict for JSON (kit.json, audit records)."""
        return {"name": self.name, "type": self.type, "org": self.org, "role": self.role}


class IdentityError(PermissionDenied):
    """A certificate that does not carry a well-formed fedctl identity."""


def subject_name(identity: Identity) -> x509.Name:
    """The X.509 subject that encodes ``identity`` (see the module docstring)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.type),
    ]
    if identity.role is not None:
        attrs.append(x509.NameAttribute(ObjectIdentifier(ROLE_OID_DOTTED), identity.role))
    return x509.Name(attrs)


def identity_from_name(subject: x509.Name, *, what: str = "certificate") -> Identity:
    """Decode a subject written by :func:`subject_name`; :class:`IdentityError` if it is not one."""
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    def one(oid: object, label: str, required: bool = True) -> str | None:
        values = subject.get_attributes_for_oid(oid)  # type: ignore[arg-type]
        if len(values) > 1:
            raise IdentityError(f"{what}: subject has {len(values)} {label} attributes, expected 1")
        if not values:
            if required:
                raise IdentityError(f"{what}: subject has no {label} (not a fedctl certificate?)")
            return None
        value = values[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")

    name = one(NameOID.COMMON_NAME, "CN (participant name)")
    org = one(NameOID.ORGANIZATION_NAME, "O (organisation)")
    ptype = one(NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (participant type)")
    role = one(ObjectIdentifier(ROLE_OID_DOTTED), "role", required=False)
    assert name is not None and org is not None and ptype is not None
    if ptype not in PARTICIPANT_TYPES:
        raise IdentityError(
            f"{what}: OU must be one of {', '.join(PARTICIPANT_TYPES)}, got {ptype!r}"
        )
    if ptype == "admin":
        if role is None:
            raise IdentityError(f"{what}: admin certificate for {name!r} carries no role")
        if role not in ROLES:
            raise IdentityError(
                f"{what}: role must be one of {', '.join(ROLES)}, got {role!r} for {name!r}"
            )
    elif role is not None:
        raise IdentityError(f"{what}: {ptype} certificate for {name!r} must not carry a role")
    return Identity(name=name, org=org, type=ptype, role=role)


def identity_from_certificate(cert: x509.Certificate, *, what: str = "certificate") -> Identity:
    """The identity a fedctl certificate carries in its subject."""
    return identity_from_name(cert.subject, what=what)
