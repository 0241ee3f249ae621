"""Append-only audit trail with a hash chain and a signed head: who did what, on every machine.

Each line of ``audit.jsonl`` is a JSON record::

    {"seq": 7, "time": "2026-11-22T10:15:02.123Z", "event": "job_submitted",
     "actor": "lead@hospital-a.org", ..., "prev": "<hash of record 6>", "hash": "<hash of this>"}

``hash`` is the SHA-256 of the record's canonical JSON without ``hash`` (so it covers ``prev``),
which chains every record to the one before: editing a line breaks its own hash, deleting or
reordering lines breaks the next record's ``prev`` and the ``seq`` sequence. ``audit.head``
(rewritten after every append) names the last record; with a :class:`HeadSigner` (the server's
and every site's trail: the participant's own key from its startup kit) it is signed::

    {"format": "fedctl-audit-head/1", "seq": 7, "hash": "<hash of record 7>",
     "participant": "site-1", "time": "...", "cert_sha256": "<signer's certificate>",
     "sig": "<base64 DER ECDSA-SHA256 over the canonical JSON of the first five fields>"}

so cutting records off the end and rewriting the head needs the participant's private key.
Records hold model hashes and sizes, never model contents. What this proves and what it cannot
is in docs/runtime.md ("Audit trail")::

    fedctl audit verify workspace/audit.jsonl [--cert CERT | --kit KIT] [--anchor FILE]
    fedctl audit head workspace/audit.jsonl >> anchors.jsonl   # keep a copy elsewhere
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from fedctl.codec import jsondata
from fedctl.errors import CodecError, UsageError

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.provision.certs import PrivateKey
    from fedctl.provision.kit import Kit

log = logging.getLogger("fedctl.audit")
#: seconds the thread that makes records durable waits for more before it ends
SYNC_IDLE = 5.0

GENESIS = "0" * 64
#: names the signed head's layout, and is part of what is signed (a signature over a head is
#: never a valid signature over anything else the participant's key signs)
HEAD_FORMAT = "fedctl-audit-head/1"
#: the fields of a head that its signature covers
SIGNED_FIELDS = ("format", "seq", "hash", "participant", "time")
#: said whenever a certificate was given but no signed head vouches for the trail's end
NO_SIGNED_HEAD = "no signed head: truncation cannot be ruled out"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def head_path(log: str | os.PathLike[str]) -> Path:
    """Where the head of the trail ``log`` lives (``audit.jsonl`` → ``audit.head``)."""
    return Path(log).with_suffix(".head")


# --------------------------------------------------------------------------- signing


class HeadSigner:
    """Signs audit heads with a participant's private key (ECDSA or RSA, SHA-256).

    The head records the SHA-256 fingerprint of the signer's certificate, so a verifier can
    tell "signed by another key" from "rewritten".
    """

    def __init__(self, key: PrivateKey, cert: x509.Certificate) -> None:
        from fedctl.provision import certs

        if certs.public_key_bytes(key.public_key()) != certs.public_key_bytes(
            cert.public_key()  # type: ignore[arg-type]
        ):
            raise UsageError("the audit signing key does not match its certificate")
        self._key = key
        self.cert = cert
        self.fingerprint = certs.fingerprint(cert)

    @classmethod
    def from_files(
        cls, key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str]
    ) -> HeadSigner:
        """A signer from a PEM private key and its PEM certificate."""
        from fedctl.provision import certs

        try:
            key = certs.load_key(Path(key_path).read_bytes())
            cert = certs.load_cert(Path(cert_path).read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read the audit signing key: {exc}") from None
        except (ValueError, TypeError):
            raise UsageError(f"{key_path} / {cert_path}: not a PEM key and certificate") from None
        return cls(key, cert)

    @classmethod
    def from_kit(cls, kit: Kit) -> HeadSigner:
        """The signer of a participant's own trail: its startup kit's key and certificate."""
        return cls.from_files(kit.key_path, kit.cert_path)

    def sign(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` (the :data:`SIGNED_FIELDS`) with ``cert_sha256`` and ``sig`` added."""
        from fedctl.provision import certs

        signature = certs.sign_bytes(self._key, _canonical(_signed_part(body)))
        return {
            **body,
            "cert_sha256": self.fingerprint,
            "sig": base64.b64encode(signature).decode(),
        }


def _signed_part(head: Mapping[str, Any]) -> dict[str, Any]:
    return {k: head.get(k) for k in SIGNED_FIELDS}


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """A PEM certificate to verify heads with; UsageError (one line) if it cannot be read."""
    from fedctl.provision import certs

    try:
        return certs.load_cert(Path(path).read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such certificate file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise UsageError(f"{path}: not a PEM certificate") from None


def kit_certificate(kit_dir: str | os.PathLike[str]) -> Path:
    """The certificate of the kit ``kit_dir`` (UsageError if it is not a kit with one)."""
    from fedctl.provision.kitspec import CERT_FILE, STARTUP

    cert = Path(kit_dir) / STARTUP / CERT_FILE
    if not cert.is_file():
        raise UsageError(f"{kit_dir}: not a startup kit (no {STARTUP}/{CERT_FILE})")
    return cert


def default_certificate(log: str | os.PathLike[str]) -> Path | None:
    """The kit certificate for a trail at ``<kit>/workspace/audit.jsonl``, if there is one."""
    from fedctl.provision.kitspec import CERT_FILE, STARTUP

    path = Path(log).absolute()
    if path.parent.name != "workspace":
        return None
    cert = path.parent.parent / STARTUP / CERT_FILE
    return cert if cert.is_file() else None


def _head_problem(head: Mapping[str, Any], cert: x509.Certificate) -> str | None:
    """Why ``head`` is not a valid head signed with ``cert``'s key (None if it is)."""
    from fedctl.provision import certs

    sig, signer = head.get("sig"), head.get("cert_sha256")
    if not isinstance(sig, str) or not isinstance(signer, str):
        return "the head is not signed: truncation cannot be ruled out"
    if head.get("format") != HEAD_FORMAT:
        return f"the head's format {head.get('format')!r} is not {HEAD_FORMAT!r}"
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return "the head's signature is not base64"
    if certs.verify_bytes(cert.public_key(), raw, _canonical(_signed_part(head))):
        return None
    expected = certs.fingerprint(cert)
    if signer != expected:
        return (
            f"the head is signed by another key (certificate sha256 {signer[:16]}…, "
            f"expected {expected[:16]}…): it was rewritten with a key that is not the "
            "participant's"
        )
    return "the head's signature does not verify: the head was rewritten"


# --------------------------------------------------------------------------- writing


class AuditLog:
    """An audit trail file; :meth:`record` appends a chained record (thread-safe).

    With ``signer`` every head written is signed (servers and sites sign with their kit's key);
    without one the head is plain (tools and tests).

    A record is in the file (written and flushed to the operating system) when :meth:`record`
    returns, so a crash of the process loses none. A thread of the log's own then makes it
    durable (``fsync``), one fsync for the records written meanwhile: a model transfer does not
    wait for the disk (an fsync waits for every write the disk has queued, seconds while models
    are written back), and a power cut can lose only the last moment's records.
    :meth:`sync` waits until every record so far is on disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        participant: str,
        signer: HeadSigner | None = None,
    ) -> None:
        self.path = Path(path)
        self.head_path = head_path(self.path)
        self.participant = participant
        self.signer = signer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._prev = self._tail()
        #: the last record written and the last one made durable; the syncer waits on _synced
        self._written = self._durable = self._seq
        self._synced = threading.Condition()
        self._syncer: threading.Thread | None = None

    def _tail(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["hash"])
        except (FileNotFoundError, ValueError, KeyError, TypeError, RecursionError):
            pass
        last = None
        if self.path.exists():
            with open(self.path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        last = line
        if last is None:
            return 0, GENESIS
        rec = json.loads(last)
        return int(rec["seq"]), str(rec["hash"])

    def record(self, event: str, actor: str | None = None, **fields: Any) -> dict[str, Any]:
        """Append one record, rewrite the (signed) head, and return the record."""
        with self._lock:
            rec: dict[str, Any] = {
                "seq": self._seq + 1,
                "time": _now(),
                "at": self.participant,
                "event": event,
                "actor": actor,
                **{k: v for k, v in fields.items() if v is not None},
                "prev": self._prev,
            }
            rec["hash"] = _digest(rec)
            line = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
            with open(self.path, "a") as fh:
                fh.write(line)
            head: dict[str, Any] = {
                "format": HEAD_FORMAT,
                "seq": rec["seq"],
                "hash": rec["hash"],
                "participant": self.participant,
                "time": rec["time"],
            }
            if self.signer is not None:
                head = self.signer.sign(head)
            tmp = self.head_path.with_name(f".{self.head_path.name}.tmp")
            tmp.write_text(json.dumps(head, sort_keys=True, separators=(",", ":")))
            os.replace(tmp, self.head_path)
            self._seq, self._prev = rec["seq"], rec["hash"]
        with self._synced:
            self._written = max(self._written, rec["seq"])
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_loop, name="audit-sync")
                self._syncer.daemon = True
                self._syncer.start()
            self._synced.notify_all()
        return rec

    def _sync_loop(self) -> None:
        """fsync the trail whenever records were written since the last fsync."""
        while True:
            with self._synced:
                if self._durable >= self._written:
                    self._synced.wait(SYNC_IDLE)
                if self._durable >= self._written:  # idle: the next record starts a new thread
                    self._syncer = None
                    return
                target = self._written
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # the disk is gone or full: say so, keep the records coming
                log.warning("audit trail %s: fsync failed: %s", self.path, exc)
            with self._synced:
                self._durable = max(self._durable, target)
                self._synced.notify_all()

    def sync(self, timeout: float | None = 30.0) -> bool:
        """Wait until every record written so far is on disk (False: not within ``timeout``)."""
        with self._synced:
            return self._synced.wait_for(lambda: self._durable >= self._written, timeout)


# --------------------------------------------------------------------------- verifying


@dataclass
class Verification:
    """Outcome of :func:`verify`.

    ``ok``; the number of records; each problem found; ``head``: ``"verified"`` (signed with
    the given certificate's key), ``"unverified"`` (no certificate given), ``"missing"`` or
    ``"invalid"``; the head itself (as read) and how many anchors were checked.
    """

    ok: bool
    records: int
    problems: list[str] = field(default_factory=list)
    head: str = "unverified"
    head_record: dict[str, Any] | None = None
    anchors: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what ``fedctl audit verify --json`` prints)."""
        return {
            "ok": self.ok,
            "records": self.records,
            "problems": self.problems,
            "head": self.head,
            "head_record": self.head_record,
            "anchors": self.anchors,
        }


def read_head(log: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The head beside ``log`` as read (None if there is none); CodecError if unreadable."""
    path = head_path(log)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    head = jsondata.loads(raw, path.name)
    if not isinstance(head, dict):
        raise CodecError(f"{path.name}: not a JSON object")
    return head


def read_anchors(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Anchors kept elsewhere: one head a line, as ``fedctl audit head`` prints them.

    UsageError (one line) if the file is missing or a line is not a head with ``seq`` and
    ``hash``.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such anchor file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    anchors = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            anchor = jsondata.loads(raw, f"{path}:{lineno}")
        except CodecError as exc:
            raise UsageError(str(exc)) from None
        if not (
            isinstance(anchor, dict)
            and _is_seq(anchor.get("seq"))
            and isinstance(anchor.get("hash"), str)
        ):
            raise UsageError(f"{path}:{lineno}: not an audit head (needs seq and hash)")
        anchors.append(anchor)
    if not anchors:
        raise UsageError(f"{path}: holds no anchor")
    return anchors


def _is_seq(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def verify(
    path: str | os.PathLike[str],
    *,
    cert: x509.Certificate | None = None,
    anchors: Iterable[Mapping[str, Any]] = (),
) -> Verification:
    """Check an audit trail: every hash, every link, the numbering and the head.

    With ``cert`` the head must also be signed with that certificate's key and name the last
    record (so records cut from the end are found even if the head was rewritten); each of
    ``anchors`` (heads kept elsewhere) must still be in the trail with the same hash.
    """
    path = Path(path)
    problems: list[str] = []
    prev, expected_seq, count = GENESIS, 1, 0
    wanted = {int(a["seq"]): str(a["hash"]) for a in anchors}
    found: dict[int, str] = {}
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below; lines are streamed)
    except FileNotFoundError:
        return Verification(False, 0, [f"{path}: no such file"], head="missing")
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                problems.append(f"line {lineno}: empty line")
                continue
            try:
                rec = jsondata.loads(raw, f"line {lineno}")
                seq, digest, link = rec["seq"], rec["hash"], rec["prev"]
                if not _is_seq(seq) or not isinstance(digest, str):
                    raise TypeError
            except (CodecError, KeyError, TypeError):
                problems.append(f"line {lineno}: not an audit record")
                continue
            count += 1
            if _digest(rec) != digest:
                problems.append(
                    f"line {lineno}: record {seq} was modified (its hash does not match)"
                )
            if link != prev:
                problems.append(
                    f"line {lineno}: record {seq} does not follow the record before it "
                    "(a record was deleted, inserted or reordered)"
                )
            if seq != expected_seq:
                problems.append(f"line {lineno}: record number {seq}, expected {expected_seq}")
            if seq in wanted:
                found.setdefault(seq, digest)
            prev, expected_seq = digest, seq + 1
    last = expected_seq - 1
    for seq, digest in sorted(wanted.items()):
        if seq not in found:
            problems.append(
                f"anchor: record {seq} is not in the trail (it was cut or rewritten before it)"
            )
        elif found[seq] != digest:
            problems.append(
                f"anchor: record {seq} is not the anchored one (its hash differs): "
                f"records up to {seq} were rewritten"
            )

    status = "unverified"
    try:
        head = read_head(path)
    except CodecError:
        head = None
        status = "invalid"
        problems.append(f"{head_path(path).name}: unreadable")
    if head is None and status != "invalid":
        status = "missing"
        if cert is not None:
            problems.append(NO_SIGNED_HEAD)
    elif head is not None:
        name, h_seq, h_hash = head_path(path).name, head.get("seq"), head.get("hash")
        if not _is_seq(h_seq) or not isinstance(h_hash, str):
            problems.append(f"{name} does not name a record (no seq and hash)")
        elif h_seq > last:
            problems.append(
                f"the log ends at record {last} but {name} says {h_seq}: "
                "records were removed from the end"
            )
        elif h_seq < last:
            problems.append(
                f"the log goes on to record {last} but {name} says {h_seq}: records were "
                "added after the head (by hand, or a crash between the two writes)"
            )
        elif h_hash != prev:
            problems.append(
                f"the last record ({last}) is not the one {name} names: "
                "the end of the trail was rewritten"
            )
        if cert is not None:
            problem = _head_problem(head, cert)
            status = "invalid" if problem else "verified"
            if problem:
                problems.append(problem)
    return Verification(
        not problems, count, problems, head=status, head_record=head, anchors=len(wanted)
    )
