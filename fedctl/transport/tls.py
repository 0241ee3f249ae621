"""Mutual TLS for gRPC from fedctl startup kits, and peer identity from certificates.

Everything the gRPC runtime needs to secure a connection comes from a kit::

    from fedctl.transport import tls

    kit = tls.load_kit("workspace/kits/fl.example.org")          # verifies the signed kit
    server = grpc.server(ThreadPoolExecutor(8))
    port = tls.add_secure_port(server, kit)                       # binds kit.listen_address
    ...
    def Handler(request, context):
        who = tls.peer_identity(context)                          # Identity(name, org, type, role)

    site = tls.load_kit("hospital-a")
    channel = tls.secure_channel(site)                            # to site.server_address

The peer's identity is always read from the certificate it presented in the handshake, never
from a message. When a connection fails, :func:`diagnose_connection` repeats the handshake with
Python's ``ssl`` module and says which side refused which certificate and which name was
expected, instead of gRPC's generic ``UNAVAILABLE``.
"""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import FedctlError, PermissionDenied
from fedctl.provision.identity import Identity, IdentityError, identity_from_certificate
from fedctl.provision.kit import Kit, KitError, load_kit, verify_kit

if TYPE_CHECKING:
    import grpc

__all__ = [
    "Identity",
    "Kit",
    "KitError",
    "TlsCheck",
    "add_secure_port",
    "channel_credentials",
    "channel_options",
    "describe_rpc_error",
    "diagnose_connection",
    "load_kit",
    "peer_identity",
    "peer_identity_from_pem",
    "secure_channel",
    "server_credentials",
    "verify_kit",
]

KitLike = Kit | str | Path


def _kit(kit: KitLike) -> Kit:
    return kit if isinstance(kit, Kit) else load_kit(kit)


def _pem_parts(kit: Kit) -> tuple[bytes, bytes, bytes]:
    try:
        return kit.key_path.read_bytes(), kit.cert_path.read_bytes(), kit.ca_path.read_bytes()
    except OSError as exc:
        raise KitError(f"{exc.filename}: cannot read ({exc.strerror})") from None


def server_credentials(kit: KitLike) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate from the kit's CA."""
    import grpc

    k = _kit(kit)
    key, cert, ca = _pem_parts(k)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(kit: KitLike) -> grpc.ChannelCredentials:
    """Channel credentials presenting the kit's certificate and trusting only the kit's CA."""
    import grpc

    k = _kit(kit)
    key, cert, ca = _pem_parts(k)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(kit: KitLike, server_name: str | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options for reaching the kit's server.

    ``server_name`` overrides the name checked against the server certificate, for when the
    address dialled differs from every name in it (e.g. through an SSH tunnel to localhost).
    """
    opts: list[tuple[str, Any]] = []
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
        opts.append(("grpc.default_authority", server_name))
    return opts


def secure_channel(
    kit: KitLike,
    address: str | None = None,
    *,
    server_name: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A mutual-TLS channel from a site or admin kit to ``address`` (default: the kit's server)."""
    import grpc

    k = _kit(kit)
    return grpc.secure_channel(
        address or k.server_address,
        channel_credentials(k),
        options=channel_options(k, server_name) + list(options or []),
    )


def add_secure_port(server: grpc.Server, kit: KitLike, address: str | None = None) -> int:
    """Bind ``server`` with mutual TLS from a server kit; returns the bound port.

    ``address`` defaults to the kit's listen address; ``host:0`` picks a free port.
    """
    k = _kit(kit)
    if k.type != "server":
        raise KitError(f"{k.root}: is a {k.type} kit; only a server kit can serve")
    addr = address or k.listen_address
    try:
        port = server.add_secure_port(addr, server_credentials(k))
    except RuntimeError as exc:
        raise FedctlError(f"cannot listen on {addr}: {exc}") from None
    if port == 0:
        raise FedctlError(f"cannot listen on {addr} (address in use or not available)")
    return port


# --------------------------------------------------------------------------- peer identity


@functools.lru_cache(maxsize=1024)
def peer_identity_from_pem(pem: bytes) -> Identity:
    """The identity in a peer's PEM certificate (cached: the same peers call often)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise IdentityError("peer certificate: not a PEM certificate") from None
    return identity_from_certificate(cert, what="peer certificate")


def peer_identity(context: Any) -> Identity:
    """Who is calling: the identity in the client certificate of this RPC's TLS connection.

    ``context`` is a ``grpc.ServicerContext`` (sync or aio). Raises :class:`PermissionDenied`
    if the connection carries no certificate (e.g. an insecure port) or one that carries no
    fedctl identity. TLS has already checked it was issued by the project CA.
    """
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise PermissionDenied(
            f"peer {_peer(context)} presented no client certificate (is this a TLS port?)"
        )
    return peer_identity_from_pem(bytes(pems[0]))


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "(unknown)"


# --------------------------------------------------------------------------- diagnostics


@dataclass(frozen=True)
class TlsCheck:
    """Result of :func:`diagnose_connection`: ``ok`` and one line saying what happened."""

    ok: bool
    message: str
    server: Identity | None = None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise KitError(f"{address!r}: not a host:port address") from None


def _name_matches(cert: Any, name: str) -> bool:
    import ipaddress

    from fedctl.provision.certs import cert_host_names

    names = cert_host_names(cert)
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return any(n.casefold() == name.casefold() for n in names)
    return any(n == str(ip) for n in names)


def diagnose_connection(
    kit: KitLike,
    address: str | None = None,
    *,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> TlsCheck:
    """Try a mutual-TLS handshake with the kit's server and explain exactly what fails.

    Checks, in order: the address resolves and accepts TCP; it speaks TLS; the server's
    certificate comes from this kit's CA, is a server certificate, is valid now and covers the
    name dialled; and the server accepts this kit's own certificate.
    """
    from cryptography import x509

    from fedctl.provision import certs

    k = _kit(kit)
    addr = address or k.server_address
    host, port = _split(addr)
    expected = server_name or host
    ca = certs.load_cert(k.ca_path.read_bytes())
    own = certs.load_cert(k.cert_path.read_bytes())
    ca_desc = certs.describe_name(ca.subject)
    me = f"this kit's certificate ({k.identity}, {k.cert_path})"

    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return TlsCheck(False, f"cannot resolve the server name {host!r} (from {addr})")
    except ConnectionRefusedError:
        return TlsCheck(
            False, f"nothing listens at {addr} (connection refused): is the server running?"
        )
    except TimeoutError:
        return TlsCheck(
            False, f"no answer from {addr} within {timeout:g} s (firewall or wrong address?)"
        )
    except OSError as exc:
        return TlsCheck(False, f"cannot connect to {addr}: {exc.strerror or exc}")

    # 1. Fetch the server's certificate without trusting it, to say what is wrong with it.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    probe.set_alpn_protocols(["h2"])
    probe.load_cert_chain(k.cert_path, k.key_path)
    try:
        with probe.wrap_socket(raw, server_hostname=expected) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
            return TlsCheck(
                False,
                f"{addr} did not answer with TLS (a plain-text port, or a proxy/load balancer "
                "in front of the server that terminates or does not pass TLS?)",
            )
        return TlsCheck(False, f"TLS handshake with {addr} failed: {exc.reason or exc}")
    except OSError as exc:
        return TlsCheck(False, f"{addr} closed the connection during the TLS handshake ({exc})")
    if not der:
        return TlsCheck(False, f"the server at {addr} presented no certificate")
    server_cert = x509.load_der_x509_certificate(der)
    subject = certs.describe_name(server_cert.subject)
    if not certs.is_issued_by(server_cert, ca):
        return TlsCheck(
            False,
            f"the server at {addr} presented a certificate for {subject} issued by "
            f"{certs.describe_name(server_cert.issuer)}, not by this kit's CA {ca_desc} "
            f"({k.ca_path}): a kit from another project, or the server was re-provisioned",
        )
    try:
        server_id = identity_from_certificate(server_cert, what=f"server certificate at {addr}")
    except IdentityError as exc:
        return TlsCheck(False, str(exc))
    if server_id.type != "server":
        return TlsCheck(
            False,
            f"the peer at {addr} presented a {server_id.type} certificate "
            f"({server_id.name!r}), not a server certificate",
        )
    now = certs.utcnow()
    if now > server_cert.not_valid_after_utc:
        return TlsCheck(
            False,
            f"the server certificate for {server_id.name!r} at {addr} expired "
            f"on {server_cert.not_valid_after_utc:%Y-%m-%d}",
            server_id,
        )
    if now < server_cert.not_valid_before_utc:
        return TlsCheck(
            False,
            f"the server certificate for {server_id.name!r} at {addr} is not "
            f"valid before {server_cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check the clocks)",
            server_id,
        )
    if not _name_matches(server_cert, expected):
        names = ", ".join(certs.cert_host_names(server_cert)) or "none"
        return TlsCheck(
            False,
            f"the server certificate at {addr} does not cover the name {expected!r} "
            f"(it covers: {names}); connect by one of those, or add {expected!r} to "
            "server.host_names and re-provision the server kit",
            server_id,
        )
    if now > own.not_valid_after_utc:
        return TlsCheck(False, f"{me} expired on {own.not_valid_after_utc:%Y-%m-%d}", server_id)

    # 2. The real handshake, presenting our certificate; TLS 1.3 servers reject a client
    #    certificate after the handshake, so exchange the HTTP/2 preface to see the verdict.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(k.ca_path))
    ctx.load_cert_chain(k.cert_path, k.key_path)
    ctx.set_alpn_protocols(["h2"])
    refused = (
        f"the server {server_id.name!r} at {addr} refused {me}, issued by {ca_desc}: "
        "the server trusts another CA (a kit from another project, or the server was "
        "re-provisioned)"
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        with ctx.wrap_socket(raw, server_hostname=expected) as tls_sock:
            tls_sock.sendall(preface)
            if not tls_sock.recv(9):
                # Its certificate checked out above, so closing on us means it refused ours.
                return TlsCheck(False, refused, server_id)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".lower()
        if "certificate" in text or "unknown ca" in text or "alert" in text:
            return TlsCheck(False, f"{refused} [{exc.reason or exc}]", server_id)
        return TlsCheck(False, f"TLS handshake with {addr} failed: {exc.reason or exc}", server_id)
    except OSError as exc:
        return TlsCheck(
            False, f"the connection to {addr} failed after the handshake ({exc})", server_id
        )
    return TlsCheck(True, f"mutual TLS with server {server_id.name!r} at {addr} works", server_id)


def describe_rpc_error(exc: Exception, kit: KitLike, address: str | None = None) -> str:
    """One line for a failed RPC; connection failures go through :func:`diagnose_connection`."""
    import grpc

    k = _kit(kit)
    addr = address or k.server_address
    if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
        check = diagnose_connection(k, addr)
        if not check.ok:
            return check.message
    details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
    return f"{addr}: {details}"
