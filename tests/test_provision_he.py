"""Provisioning a project's homomorphic-encryption context: one per project, the secret key in
site kits only, the server's kit public, kept across re-provisioning, checked by kit verify."""

from __future__ import annotations

import importlib.util
import json
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fedctl.cli.main import main
from fedctl.errors import UsageError
from fedctl.provision import (
    KitError,
    ProjectError,
    add_site,
    assemble_kit,
    load_kit,
    parse_project,
    provision,
    request_certificate,
    sign_csr,
    verify_kit,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "provisioning" / "example.yml"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
ADMINS = ["admin@example.org", "researcher@hospital-a.org"]
SERVER = "fl.example.org"
HE_SECTION = "homomorphic_encryption:\n  poly_modulus_degree: 8192\n"
MISSING = "homomorphic encryption needs TenSEAL: pip install 'fedctl[he]'"

needs_he = pytest.mark.skipif(
    importlib.util.find_spec("tenseal") is None, reason="TenSEAL is not installed"
)


def he_project(tmp_path: Path, extra: str = HE_SECTION) -> Path:
    path = tmp_path / "project.yml"
    path.write_text(EXAMPLE.read_text() + extra)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("he-prov")
    root = tmp / "ws"
    provision(he_project(tmp), root)
    return root


def kit_context(ws: Path, name: str) -> Path:
    path = load_kit(ws / "kits" / name).he_context_path
    assert path is not None, f"{name}'s kit has no HE context"
    return path


# --------------------------------------------------------------------------- kits


@needs_he
def test_sites_get_the_secret_the_server_the_public_context_admins_nothing(ws: Path) -> None:
    from fedctl.privacy.he import context_info

    server = kit_context(ws, SERVER)
    assert server.name == "he_context.public"
    assert not context_info(server.read_bytes()).has_secret_key
    key_ids = set()
    for site in SITES:
        path = kit_context(ws, site)
        assert path.name == "he_context.secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        info = context_info(path.read_bytes())
        assert info.has_secret_key
        key_ids.add(info.key_id)
    assert key_ids == {context_info(server.read_bytes()).key_id}  # one context per project
    for admin in ADMINS:
        assert load_kit(ws / "kits" / admin).he_context_path is None
        assert not list((ws / "kits" / admin / "startup").glob("he_context*"))
    # signed like every other startup file; kept in state/ like the CA
    manifest = json.loads((ws / "kits" / "hospital-a" / "startup" / "MANIFEST.json").read_text())
    assert "he_context.secret" in manifest["files"]
    state = ws / "state"
    assert stat.S_IMODE((state / "he_context.secret").stat().st_mode) == 0o600
    assert (state / "he_context.secret").read_bytes() == (
        ws / "kits" / "hospital-b" / "startup" / "he_context.secret"
    ).read_bytes()


@needs_he
def test_server_context_cannot_decrypt_and_sites_share_one_key(ws: Path) -> None:
    from fedctl.privacy.he import HEError, decrypt_params, encrypt_params, load_context

    server = load_context(kit_context(ws, SERVER).read_bytes(), need_secret=False)
    assert not server.ts_context.has_secret_key()  # the secret key is absent, not just unused
    with pytest.raises(HEError, match="holds no secret key: only sites can decrypt"):
        load_context(kit_context(ws, SERVER).read_bytes(), need_secret=True)
    a, b = (
        load_context(kit_context(ws, s).read_bytes(), need_secret=True)
        for s in ("hospital-a", "hospital-c")
    )
    params = {"w": torch.linspace(-1, 1, 50)}
    enc, desc = encrypt_params(params, None, a, weight=1.0)
    assert torch.allclose(decrypt_params(enc, desc, b)["w"], params["w"], atol=1e-6)
    with pytest.raises(HEError, match="no secret key"):
        decrypt_params(enc, desc, server)


@needs_he
def test_kit_verify_reports_and_checks_the_context(
    ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kit", "verify", str(ws / "kits" / "hospital-a")]) == 0
    out = capsys.readouterr().out
    assert "ok       homomorphic encryption: CKKS N=8192, primes [60, 40, 60]" in out
    assert "secret key (decrypts)" in out
    assert main(["kit", "verify", str(ws / "kits" / SERVER), "--json"]) == 0
    he = json.loads(capsys.readouterr().out)["result"]["homomorphic_encryption"]
    assert he["secret_key"] is False and he["poly_modulus_degree"] == 8192

    site = tmp_path / "site"
    shutil.copytree(ws / "kits" / "hospital-a", site)
    secret = site / "startup" / "he_context.secret"
    secret.chmod(0o644)
    with pytest.raises(KitError, match=r"HE secret key is readable by others \(mode 0644\)"):
        verify_kit(site)
    secret.chmod(0o600)
    data = bytearray(secret.read_bytes())
    data[-100] ^= 1
    secret.write_bytes(bytes(data))
    with pytest.raises(KitError, match="he_context.secret: modified since the kit was signed"):
        verify_kit(site)


@needs_he
def test_zip_keeps_the_secret_private(ws: Path, tmp_path: Path) -> None:
    zpath = ws / "kits" / "hospital-b.zip"
    assert stat.S_IMODE(zpath.stat().st_mode) == 0o600
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo("hospital-b/startup/he_context.secret")
        assert stat.S_IMODE(info.external_attr >> 16) == 0o600
    with zipfile.ZipFile(ws / "kits" / f"{SERVER}.zip") as zf:
        names = zf.namelist()
        assert f"{SERVER}/startup/he_context.public" in names
        assert not [n for n in names if n.endswith("he_context.secret")]


# --------------------------------------------------------------------------- re-provisioning


@needs_he
def test_reprovisioning_keeps_the_context_and_a_change_makes_a_new_one(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    project = he_project(tmp_path)
    provision(project, root)
    secret = (root / "state" / "he_context.secret").read_bytes()
    again = provision(project, root)
    assert {k.status for k in again.kits} == {"unchanged"} and not again.warnings
    assert (root / "state" / "he_context.secret").read_bytes() == secret

    changed = he_project(tmp_path, "homomorphic_encryption: {poly_modulus_degree: 16384}\n")
    res = provision(changed, root)
    assert len(res.warnings) == 1 and "homomorphic_encryption changed" in res.warnings[0]
    status = {k.name: (k.status, k.note) for k in res.kits}
    for name in [SERVER, *SITES]:
        assert status[name][0] == "stale"
        assert "homomorphic-encryption context (another key)" in status[name][1]
    assert {status[a][0] for a in ADMINS} == {"unchanged"}
    res = provision(changed, root, force=True)
    assert {k.status for k in res.kits} == {"rebuilt"}
    info = load_kit(root / "kits" / "hospital-a").he_info()
    assert info is not None and info.params.poly_modulus_degree == 16384


@needs_he
def test_adding_the_section_later_and_growing(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(EXAMPLE, root)
    assert load_kit(root / "kits" / "hospital-a").he_context_path is None
    res = provision(he_project(tmp_path), root)
    assert res.kit("hospital-a").status == "stale"
    assert "homomorphic-encryption context (missing)" in res.kit("hospital-a").note
    grown = add_site(root, "hospital-d", "hospital-d")
    kit = load_kit(grown.kit_dir("hospital-d"))
    assert kit.he_context_path is not None
    assert kit.he_context_path.read_bytes() == (root / "state" / "he_context.secret").read_bytes()


@needs_he
def test_a_site_that_keeps_its_key_gets_the_context_in_its_signed_kit(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    provision(he_project(tmp_path), root)
    req = request_certificate("hospital-e", org="hospital-e", out_dir=tmp_path / "site")
    signed = sign_csr(root, req.csr_path)
    kit = assemble_kit(signed.zip_path, key=req.key_path, out_dir=tmp_path / "site" / "kit")
    assert kit.he_context_path is not None
    assert stat.S_IMODE(kit.he_context_path.stat().st_mode) == 0o600
    mine, server = kit.he_info(), load_kit(root / "kits" / SERVER).he_info()
    assert mine is not None and server is not None and mine.key_id == server.key_id


# --------------------------------------------------------------------------- project.yml


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "homomorphic_encryption: {poly_modulus_degree: 4096}\n",
            "homomorphic_encryption.poly_modulus_degree: must be one of 8192, 16384, 32768, got "
            "4096",
        ),
        (
            "homomorphic_encryption: {coeff_mod_bit_sizes: [60, 60, 60, 60]}\n",
            "homomorphic_encryption.coeff_mod_bit_sizes: total 240 bits is more than the 218 bits "
            "that keep poly_modulus_degree 8192 at 128-bit security",
        ),
        (
            "homomorphic_encryption: {coeff_mod_bit_sizes: [60, 70, 60]}\n",
            "homomorphic_encryption.coeff_mod_bit_sizes[1]: must be 20-60 bits, got 70",
        ),
        (
            "homomorphic_encryption: {coeff_mod_bit_sizes: [40, 60], global_scale_bits: 40}\n",
            "homomorphic_encryption.coeff_mod_bit_sizes: the data primes (40 = 40 bits; the last "
            "prime is SEAL's special prime) leave 0 bits above the 40-bit scale",
        ),
        (
            "homomorphic_encryption: {poly_modulus_degre: 8192}\n",
            "homomorphic_encryption.poly_modulus_degre: unknown key (did you mean "
            "'poly_modulus_degree'?",
        ),
        ("homomorphic_encryption:\n", "homomorphic_encryption: must be a mapping of CKKS"),
    ],
)
def test_invalid_section_is_named_with_its_line(section: str, message: str) -> None:
    text = EXAMPLE.read_text() + section
    line = text.count("\n", 0, text.index("homomorphic_encryption")) + 1
    with pytest.raises(ProjectError) as err:
        parse_project(text)
    assert str(err.value).startswith(f"project.yml:{line}: {message}")


def test_section_defaults_are_written_out() -> None:
    project = parse_project(EXAMPLE.read_text() + "homomorphic_encryption: {}\n")
    assert project.homomorphic_encryption == {
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": [60, 40, 60],
        "global_scale_bits": 40,
    }
    assert parse_project(project.to_yaml()) == project
    assert parse_project(EXAMPLE.read_text()).homomorphic_encryption is None


def test_without_tenseal_only_a_project_with_the_section_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tenseal", None)  # `import tenseal` raises ImportError
    res = provision(EXAMPLE, tmp_path / "plain")
    assert load_kit(res.kit_dir("hospital-a")).he_context_path is None
    with pytest.raises(UsageError) as err:
        provision(he_project(tmp_path), tmp_path / "he")
    assert str(err.value) == MISSING
    assert not (tmp_path / "he").exists()  # nothing half-written
    capsys.readouterr()
    assert main(["provision", str(he_project(tmp_path)), "-o", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err == f"error: {MISSING}\n"
