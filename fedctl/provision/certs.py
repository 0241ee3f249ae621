"""Keys, the project CA, leaf certificates, CSRs and detached signatures.

Kept small on purpose: one function per thing a provisioner does. ECDSA P-256 with SHA-256 is
the default (fast, and gRPC/OpenSSL handle it); P-384 and RSA-3072 are there for policies that
ask for them. Certificates follow the profile in docs/provisioning.md: the CA is ``CA:TRUE,
pathlen:0``; leaves are ``CA:FALSE`` with key usage digitalSignature (plus keyEncipherment for
RSA), clientAuth (servers also serverAuth), and SKI/AKI so chains build unambiguously.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedctl.errors import UsageError
from fedctl.provision.identity import Identity, subject_name

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]  # noqa: UP007
PublicKey = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey]  # noqa: UP007

#: Certificates start this long before "now", so a peer whose clock is a little behind accepts them.
BACKDATE = dt.timedelta(hours=1)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)  # noqa: UP017


def generate_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A fresh private key of the project's key type."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise UsageError(f"unknown key type {key_type!r}")


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what gRPC and OpenSSL read); the file itself is mode 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(data: bytes) -> PrivateKey:
    """Parse a PEM private key; raise ValueError if it is not an EC or RSA key."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(data: bytes) -> x509.Certificate:
    """Parse the first PEM certificate in ``data`` (raises ValueError if there is none)."""
    return x509.load_pem_x509_certificate(data)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def create_ca(
    project: str, org: str, *, valid_days: int, key_type: str = "ecdsa-p256"
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed root CA for one project: CN '<project> root CA', CA:TRUE with pathlen 0."""
    key = generate_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{project} root CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        ]
    )
    now = utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # the CA also signs kit manifests
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    identity: Identity,
    public_key: PublicKey,
    *,
    valid_days: int,
    host_names: Iterable[str] = (),
) -> x509.Certificate:
    """Sign a leaf certificate for ``identity`` (never longer-lived than the CA itself).

    ``host_names`` (DNS names or IP addresses) become subjectAltNames and matter for the server;
    admin certificates also carry their e-mail as an rfc822Name.
    """
    now = utcnow()
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise UsageError(
            f"the project CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            "provision a new workspace"
        )
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.type == "server":
        eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    sans: list[x509.GeneralName] = []
    for h in host_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if identity.type == "admin":
        sans.append(x509.RFC822Name(identity.name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def create_csr(identity: Identity, key: PrivateKey) -> x509.CertificateSigningRequest:
    """A CSR whose subject carries ``identity``; the signer decides what is finally issued."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_name(identity))
        .sign(key, hashes.SHA256())
    )


def is_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``ca_cert`` signed ``cert`` (issuer name and signature both match)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sign_bytes(key: PrivateKey, data: bytes) -> bytes:
    """A detached DER signature over ``data`` with SHA-256.

    ``openssl dgst -sha256 -verify <(openssl x509 -in rootCA.pem -pubkey -noout) -signature
    MANIFEST.sig MANIFEST.json`` checks it without fedctl.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_bytes(public_key: object, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid :func:`sign_bytes` signature by ``public_key``."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def cert_host_names(cert: x509.Certificate) -> list[str]:
    """DNS and IP subjectAltNames of ``cert`` as strings, in certificate order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for gn in san:
        if isinstance(gn, x509.DNSName):
            out.append(gn.value)
        elif isinstance(gn, x509.IPAddress):
            out.append(str(gn.value))
    return out


_SHORT = {
    NameOID.COMMON_NAME: "CN",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    x509.ObjectIdentifier("2.5.4.72"): "role",
}


def describe_name(name: x509.Name) -> str:
    """A subject or issuer in certificate order, e.g. ``CN=site-1, O=poc, OU=site``."""
    parts = []
    for attr in name:
        label = _SHORT.get(attr.oid) or attr.oid._name or attr.oid.dotted_string
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        parts.append(f"{label}={value}")
    return ", ".join(parts)
