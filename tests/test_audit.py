"""Audit trails with a signed head: truncation, forged heads, deleted heads, anchors, the CLI.

Kits are provisioned once for the module (a POC project with two sites); each test writes its
trail in a fresh ``<kit>/workspace`` so the CLI's default certificate lookup applies.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from fedctl.cli.main import main
from fedctl.errors import UsageError
from fedctl.provision import certs, poc_project, provision
from fedctl.provision.kit import load_kit
from fedctl.runtime.audit import (
    NO_SIGNED_HEAD,
    SIGNED_FIELDS,
    AuditLog,
    HeadSigner,
    load_certificate,
    read_anchors,
    verify,
)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    res = provision(poc_project(["site-1", "site-2"]), tmp_path_factory.mktemp("audit") / "ws")
    return {name: res.kit_dir(name) for name in ("localhost", "site-1", "site-2")}


@pytest.fixture
def site(kits: dict[str, Path]) -> Path:
    """site-1's kit with an empty workspace."""
    shutil.rmtree(kits["site-1"] / "workspace", ignore_errors=True)
    return kits["site-1"]


def _signer(kit_dir: Path) -> HeadSigner:
    return HeadSigner.from_kit(load_kit(kit_dir))


def _cert(kit_dir: Path) -> Path:
    return load_kit(kit_dir).cert_path


def _trail(kit_dir: Path, n: int = 6, *, signer: HeadSigner | None = None) -> Path:
    log = AuditLog(kit_dir / "workspace" / "audit.jsonl", kit_dir.name, signer or _signer(kit_dir))
    for i in range(n):
        log.record("thing", f"admin{i}@x", n=i)
    return log.path


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def _head(log: Path) -> dict:
    return json.loads(log.with_suffix(".head").read_text())


def _cut(log: Path, keep: int) -> dict:
    """Keep the first ``keep`` records; return the head body that would name the new last."""
    lines = _lines(log)[:keep]
    log.write_text("\n".join(lines) + "\n")
    last = json.loads(lines[-1])
    return {
        "format": "fedctl-audit-head/1",
        "seq": last["seq"],
        "hash": last["hash"],
        "participant": log.parent.parent.name,
        "time": last["time"],
    }


def _write_head(log: Path, head: dict) -> None:
    log.with_suffix(".head").write_text(json.dumps(head))


def test_signed_trail_verifies_and_its_head_is_an_ecdsa_signature(site: Path) -> None:
    log = _trail(site)
    head = _head(log)
    cert = load_certificate(_cert(site))
    assert head["seq"] == 6 and head["participant"] == "site-1"
    assert head["cert_sha256"] == certs.fingerprint(cert)
    body = json.dumps({k: head[k] for k in SIGNED_FIELDS}, sort_keys=True, separators=(",", ":"))
    assert certs.verify_bytes(cert.public_key(), base64.b64decode(head["sig"]), body.encode())

    result = verify(log, cert=cert)
    assert result.ok and result.records == 6 and result.head == "verified", result.problems
    unchecked = verify(log)
    assert unchecked.ok and unchecked.head == "unverified"
    # a log reopened continues the chain and keeps signing
    AuditLog(log, "site-1", _signer(site)).record("again")
    assert verify(log, cert=cert).ok and _head(log)["seq"] == 7


def test_truncation_with_a_rewritten_unsigned_head_is_detected(site: Path) -> None:
    log = _trail(site)
    _write_head(log, _cut(log, 4))
    result = verify(log, cert=load_certificate(_cert(site)))
    assert not result.ok and result.head == "invalid"
    assert result.problems == ["the head is not signed: truncation cannot be ruled out"]
    # without a certificate the cut cannot be seen, and verify says the head is unverified
    assert verify(log).ok and verify(log).head == "unverified"


def test_truncation_with_a_reused_signature_is_detected(site: Path) -> None:
    log = _trail(site)
    old = _head(log)
    _write_head(log, {**old, **_cut(log, 4)})  # the old signature on a new body
    result = verify(log, cert=load_certificate(_cert(site)))
    assert result.problems == ["the head's signature does not verify: the head was rewritten"]


def test_truncation_with_a_head_signed_by_another_kit_is_detected(
    site: Path, kits: dict[str, Path]
) -> None:
    log = _trail(site)
    _write_head(log, _signer(kits["site-2"]).sign(_cut(log, 3)))
    result = verify(log, cert=load_certificate(_cert(site)))
    assert not result.ok
    assert len(result.problems) == 1 and "signed by another key" in result.problems[0]
    # it is a valid head for site-2's key, which is why the certificate matters
    assert verify(log, cert=load_certificate(_cert(kits["site-2"]))).ok


def test_records_cut_with_the_head_left_alone_are_detected(site: Path) -> None:
    log = _trail(site)
    _cut(log, 5)
    problems = verify(log, cert=load_certificate(_cert(site))).problems
    assert problems == [
        "the log ends at record 5 but audit.head says 6: records were removed from the end"
    ]


def test_a_deleted_head_is_a_problem_when_a_certificate_is_given(site: Path) -> None:
    log = _trail(site)
    _cut(log, 2)
    log.with_suffix(".head").unlink()
    result = verify(log, cert=load_certificate(_cert(site)))
    assert result.problems == [NO_SIGNED_HEAD] and result.head == "missing"
    assert verify(log).ok and verify(log).head == "missing"


def test_the_chain_checks_still_apply_with_a_signed_head(site: Path) -> None:
    log = _trail(site)
    lines = _lines(log)
    edited = lines[2].replace("admin2", "mallory")
    log.write_text("\n".join([*lines[:2], edited, *lines[3:]]) + "\n")
    problems = verify(log, cert=load_certificate(_cert(site))).problems
    assert problems == ["line 3: record 3 was modified (its hash does not match)"]
    log.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    problems = verify(log, cert=load_certificate(_cert(site))).problems
    assert any("does not follow the record before it" in p for p in problems)
    log.write_text("\n".join([*lines, "not json", '{"seq": "x", "hash": 1, "prev": 2}']) + "\n")
    problems = verify(log).problems
    assert "line 7: not an audit record" in problems and "line 8: not an audit record" in problems


def test_an_anchor_detects_a_rewritten_prefix(site: Path, tmp_path: Path) -> None:
    log = _trail(site, 4)
    anchor = tmp_path / "anchors.jsonl"
    anchor.write_text(json.dumps(_head(log)) + "\n")
    AuditLog(log, "site-1", _signer(site)).record("later")
    cert = load_certificate(_cert(site))
    assert verify(log, cert=cert, anchors=read_anchors(anchor)).ok

    # someone with the key rewrites the whole trail (other records 1..5) and signs a new head:
    # the chain and the signature are fine, only the anchor kept elsewhere shows it
    log.unlink()
    log.with_suffix(".head").unlink()
    _trail(site, 5)
    assert verify(log, cert=cert).ok
    result = verify(log, cert=cert, anchors=read_anchors(anchor))
    assert result.problems == [
        "anchor: record 4 is not the anchored one (its hash differs): records up to 4 were "
        "rewritten"
    ]
    # ...or cuts it below the anchor
    log.unlink()
    log.with_suffix(".head").unlink()
    _trail(site, 2)
    result = verify(log, cert=cert, anchors=read_anchors(anchor))
    assert result.problems == [
        "anchor: record 4 is not in the trail (it was cut or rewritten before it)"
    ]


def test_anchor_files_that_are_not_heads_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "anchors.jsonl"
    for text in ("", "{}\n", "[1]\n", '{"seq": 0, "hash": "x"}\n', '{"seq": 1}\n', "nope\n"):
        path.write_text(text)
        with pytest.raises(UsageError):
            read_anchors(path)
    with pytest.raises(UsageError, match="no such anchor file"):
        read_anchors(tmp_path / "missing")


def test_signer_refuses_a_key_that_does_not_match_its_certificate(kits: dict[str, Path]) -> None:
    one, two = load_kit(kits["site-1"]), load_kit(kits["site-2"])
    with pytest.raises(UsageError, match="does not match"):
        HeadSigner.from_files(one.key_path, two.cert_path)
    with pytest.raises(UsageError, match="not a PEM"):
        HeadSigner.from_files(one.cert_path, one.cert_path)


def test_server_and_site_agent_sign_their_trails(kits: dict[str, Path], tmp_path: Path) -> None:
    from fedctl.runtime.agent import SiteAgent
    from fedctl.runtime.serverstate import ServerConfig, ServerState

    server = ServerState(load_kit(kits["localhost"]), tmp_path / "server", ServerConfig())
    agent = SiteAgent(load_kit(kits["site-2"]), tmp_path / "site")
    for audit, kit in ((server.audit, kits["localhost"]), (agent.audit, kits["site-2"])):
        audit.record("started")
        assert verify(audit.path, cert=load_certificate(_cert(kit))).head == "verified"


# --------------------------------------------------------------------------- the CLI


def test_cli_verify_exit_codes_and_default_certificate(
    site: Path, kits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _trail(site)
    cert = str(_cert(site))
    # the log is in <kit>/workspace: the kit's certificate is used without being named
    assert main(["audit", "verify", str(log)]) == 0
    out = capsys.readouterr().out
    assert "6 records, chain intact" in out and "head signed with the key of" in out
    assert main(["audit", "verify", str(log), "--cert", cert]) == 0
    assert main(["audit", "verify", str(log), "--kit", str(site)]) == 0
    # a copy elsewhere is checked without a certificate, and says so
    copy = tmp_path / "audit.jsonl"
    shutil.copy(log, copy)
    shutil.copy(log.with_suffix(".head"), copy.with_suffix(".head"))
    capsys.readouterr()
    assert main(["audit", "verify", str(copy)]) == 0
    assert "head unverified" in capsys.readouterr().out
    assert main(["audit", "verify", str(copy), "--kit", str(kits["site-2"])]) == 1

    log.with_suffix(".head").unlink()
    assert main(["audit", "verify", str(log)]) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and NO_SIGNED_HEAD in out

    assert main(["audit", "verify", str(log), "--cert", str(tmp_path / "nope.pem")]) == 4
    assert "no such certificate file" in capsys.readouterr().err
    assert main(["audit", "verify", str(log), "--cert", str(log)]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err
    assert main(["audit", "verify", str(log), "--kit", str(tmp_path)]) == 2
    assert main(["audit", "verify", str(log), "--kit", str(site), "--cert", cert]) == 2
    assert main(["audit", "verify", str(log), "--anchor", str(tmp_path / "nope")]) == 4
    assert "no such anchor file" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 4
    assert "no such audit log" in capsys.readouterr().err


def test_cli_verify_json(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _trail(site)
    assert main(["audit", "verify", str(log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out = doc["result"]
    assert doc["ok"] is True and doc["error"] is None
    assert out["ok"] is True and out["records"] == 6 and out["problems"] == []
    assert out["head"] == "verified" and out["head_record"]["seq"] == 6
    assert out["cert"] == str(_cert(site))
    _write_head(log, _cut(log, 3))
    assert main(["audit", "verify", str(log), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    out = doc["result"]
    assert doc["ok"] is False and doc["error"]["code"] == 1 and doc["error"]["kind"] == "failed"
    assert "tampered" in doc["error"]["message"] and "not signed" in doc["error"]["message"]
    assert out["ok"] is False and out["head"] == "invalid" and out["records"] == 3
    assert out["problems"] == ["the head is not signed: truncation cannot be ruled out"]


def test_cli_head_and_anchor(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _trail(site, 3)
    assert main(["audit", "head", str(log)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and json.loads(line) == _head(log)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(line)
    AuditLog(log, "site-1", _signer(site)).record("later")
    assert main(["audit", "head", str(log)]) == 0
    with anchors.open("a") as fh:
        fh.write(capsys.readouterr().out)
    assert main(["audit", "verify", str(log), "--anchor", str(anchors), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["anchors"] == 2

    log.unlink()
    log.with_suffix(".head").unlink()
    _trail(site, 4)  # rewritten from the start, validly signed
    assert main(["audit", "verify", str(log)]) == 0
    assert main(["audit", "verify", str(log), "--anchor", str(anchors)]) == 1
    assert "not the anchored one" in capsys.readouterr().out

    # no head to print, or a trail that does not verify: nothing printed, an error
    _cut(log, 3)
    assert main(["audit", "head", str(log)]) == 1
    assert capsys.readouterr().out == ""
    log.with_suffix(".head").unlink()
    assert main(["audit", "head", str(log)]) == 4
    assert main(["audit", "head", str(tmp_path / "missing.jsonl")]) == 4


def test_records_are_in_the_file_at_once_and_made_durable_off_the_callers_thread(
    tmp_path, monkeypatch
) -> None:
    """An fsync waits for everything the disk has queued: the caller (a model transfer) must
    not. Each record is in the file when record() returns; a thread of the log's own fsyncs it,
    and sync() waits for that."""
    import threading

    from fedctl.runtime import audit as audit_mod

    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        gate.wait(10)
        synced.append((threading.current_thread().name, len(path.read_text().splitlines())))
        real_fsync(fd)

    monkeypatch.setattr(audit_mod.os, "fsync", slow_fsync)
    monkeypatch.setattr(audit_mod, "SYNC_IDLE", 0.2)
    path = tmp_path / "audit.jsonl"
    trail = audit_mod.AuditLog(path, "site-1")
    for i in range(3):  # none of these waits for the (held) fsync
        trail.record("model_sent", None, task=str(i))
    assert len(path.read_text().splitlines()) == 3
    assert not trail.sync(timeout=0.2) and synced == []
    gate.set()
    assert trail.sync(timeout=10)
    assert synced and all(name == "audit-sync" for name, _ in synced)
    assert synced[-1][1] == 3  # the last fsync covered every record
    assert audit_mod.verify(path).ok
    time.sleep(0.6)  # idle: its thread ends, and the next record starts another
    assert trail._syncer is None
    trail.record("model_sent", None, task="3")
    assert trail.sync(timeout=10) and synced[-1][1] == 4
