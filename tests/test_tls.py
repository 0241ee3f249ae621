"""Mutual TLS from provisioned kits over real gRPC on 127.0.0.1, and its diagnostics."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fedctl.errors import PermissionDenied
from fedctl.provision import (
    ProvisionResult,
    assemble_kit,
    poc_project,
    provision,
    request_certificate,
    sign_csr,
)
from fedctl.transport import tls

METHOD = "/fedctl.test.Echo/WhoAmI"


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        identity = tls.peer_identity(context)
    except PermissionDenied as exc:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    return json.dumps(identity.to_dict()).encode()


def _server(bind: callable) -> tuple[grpc.Server, int]:  # type: ignore[valid-type]
    handler = grpc.method_handlers_generic_handler(
        "fedctl.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = bind(server)
    server.start()
    return server, port


def _call(channel: grpc.Channel) -> dict:
    with channel:
        return json.loads(channel.unary_unary(METHOD)(b"", timeout=10))


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> ProvisionResult:
    return provision(poc_project(2, port=1), tmp_path_factory.mktemp("poc") / "ws")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> ProvisionResult:
    """A second project with the same names: only its CA differs."""
    return provision(poc_project(2, port=1, name="other"), tmp_path_factory.mktemp("other") / "ws")


@pytest.fixture(scope="module")
def address(poc: ProvisionResult) -> Iterator[str]:
    server, port = _server(
        lambda s: tls.add_secure_port(s, poc.kit_dir("localhost"), "127.0.0.1:0")
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_site_and_admin_complete_mutual_tls_and_identity_comes_from_the_cert(
    poc: ProvisionResult, address: str
) -> None:
    got = _call(tls.secure_channel(poc.kit_dir("site-1"), address))
    assert got == {"name": "site-1", "type": "site", "org": "poc", "role": None}
    got = _call(tls.secure_channel(poc.kit_dir("org_admin@poc.local"), address))
    assert got == {
        "name": "org_admin@poc.local",
        "type": "admin",
        "org": "poc",
        "role": "org_admin",
    }
    # By host name too: the server certificate covers both localhost and 127.0.0.1.
    port = address.rsplit(":", 1)[1]
    got = _call(tls.secure_channel(poc.kit_dir("site-2"), f"localhost:{port}"))
    assert got["name"] == "site-2"
    check = tls.diagnose_connection(poc.kit_dir("site-1"), address)
    assert check.ok and check.server is not None and check.server.name == "localhost"


def test_client_certificate_from_another_project_is_refused(
    poc: ProvisionResult, other: ProvisionResult, address: str
) -> None:
    ours = tls.load_kit(poc.kit_dir("site-1"))
    theirs = tls.load_kit(other.kit_dir("site-1"))
    # Trusts our CA (so the server's certificate is fine) but presents the foreign certificate:
    # the refusal is the server's.
    creds = grpc.ssl_channel_credentials(
        root_certificates=ours.ca_path.read_bytes(),
        private_key=theirs.key_path.read_bytes(),
        certificate_chain=theirs.cert_path.read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(grpc.secure_channel(address, creds))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The foreign kit as a whole is refused too, and the diagnosis says why.
    with pytest.raises(grpc.RpcError):
        _call(tls.secure_channel(theirs, address))
    check = tls.diagnose_connection(theirs, address)
    assert not check.ok
    assert check.message.startswith(
        f"the server at {address} presented a certificate for CN=localhost"
    )
    assert "not by this kit's CA CN=other root CA, O=poc" in check.message


def test_client_without_certificate_is_refused(poc: ProvisionResult, address: str) -> None:
    ca = tls.load_kit(poc.kit_dir("site-1")).ca_path.read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        _call(grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_refusing_our_certificate_is_explained(
    poc: ProvisionResult, other: ProvisionResult
) -> None:
    """A server with our project's certificate that trusts another CA for clients."""
    server_kit = tls.load_kit(poc.kit_dir("localhost"))
    creds = grpc.ssl_server_credentials(
        [(server_kit.key_path.read_bytes(), server_kit.cert_path.read_bytes())],
        root_certificates=tls.load_kit(other.kit_dir("site-1")).ca_path.read_bytes(),
        require_client_auth=True,
    )
    server, port = _server(lambda s: s.add_secure_port("127.0.0.1:0", creds))
    try:
        addr = f"127.0.0.1:{port}"
        with pytest.raises(grpc.RpcError):
            _call(tls.secure_channel(poc.kit_dir("site-1"), addr))
        check = tls.diagnose_connection(poc.kit_dir("site-1"), addr)
        assert not check.ok
        assert check.message.startswith(
            f"the server 'localhost' at {addr} refused this kit's certificate "
            "(site 'site-1' (org poc)"
        )
        assert "the server trusts another CA" in check.message
    finally:
        server.stop(None)


def test_wrong_name_plain_text_and_closed_port_are_explained(
    poc: ProvisionResult, address: str
) -> None:
    kit = poc.kit_dir("site-1")
    check = tls.diagnose_connection(kit, address, server_name="fl.example.org")
    assert check.message == (
        f"the server certificate at {address} does not cover the name 'fl.example.org' "
        "(it covers: localhost, 127.0.0.1); connect by one of those, or add 'fl.example.org' "
        "to server.host_names and re-provision the server kit"
    )
    plain, port = _server(lambda s: s.add_insecure_port("127.0.0.1:0"))
    try:
        check = tls.diagnose_connection(kit, f"127.0.0.1:{port}")
        assert not check.ok
        assert "did not answer with TLS" in check.message
        # And on a plain-text port the handler sees no certificate at all.
        with pytest.raises(grpc.RpcError) as info:
            _call(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "presented no client certificate" in info.value.details()
    finally:
        plain.stop(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    check = tls.diagnose_connection(kit, f"127.0.0.1:{free}")
    assert (
        check.message
        == f"nothing listens at 127.0.0.1:{free} (connection refused): is the server running?"
    )


def test_describe_rpc_error_uses_the_diagnosis(
    poc: ProvisionResult, other: ProvisionResult, address: str
) -> None:
    theirs = other.kit_dir("site-2")
    with pytest.raises(grpc.RpcError) as info:
        _call(tls.secure_channel(theirs, address))
    text = tls.describe_rpc_error(info.value, theirs, address)
    assert "not by this kit's CA" in text


def test_kit_from_a_csr_handshakes(poc: ProvisionResult, address: str, tmp_path: Path) -> None:
    req = request_certificate("site-csr", org="poc", out_dir=tmp_path)
    signed = sign_csr(poc.workspace, req.csr_path)
    kit = assemble_kit(signed.zip_path, key=req.key_path, out_dir=tmp_path / "kit")
    got = _call(tls.secure_channel(kit, address))
    assert got == {"name": "site-csr", "type": "site", "org": "poc", "role": None}


def test_only_a_server_kit_can_serve(poc: ProvisionResult) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(tls.KitError, match=r"is a site kit; only a server kit can serve"):
            tls.add_secure_port(server, poc.kit_dir("site-1"), "127.0.0.1:0")
    finally:
        server.stop(None)


def test_peer_identity_rejects_non_fedctl_certificates() -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")])
    now = dt.datetime.now(dt.timezone.utc)  # noqa: UP017
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)

    class Ctx:
        def auth_context(self) -> dict:
            return {"x509_pem_cert": [pem]}

    with pytest.raises(PermissionDenied, match=r"peer certificate: subject has no O"):
        tls.peer_identity(Ctx())
