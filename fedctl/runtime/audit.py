"""Append-only audit trail with a hash chain: who did what, on the server and on every site.

Each line of ``audit.jsonl`` is a JSON record::

    {"seq": 7, "time": "2026-11-22T10:15:02.123Z", "event": "job_submitted",
     "actor": "lead@hospital-a.org", ..., "prev": "<hash of record 6>", "hash": "<hash of this>"}

``hash`` is the SHA-256 of the record's canonical JSON without ``hash`` (so it covers ``prev``),
which chains every record to the one before: editing a line breaks its own hash, deleting or
reordering lines breaks the next record's ``prev`` and the ``seq`` sequence. ``audit.head``
(written after every append) holds the last sequence number and hash, so cutting lines off the
end is detected too. Records hold model hashes and sizes, never model contents.

    fedctl audit verify workspace/audit.jsonl
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AuditLog:
    """An audit trail file; :meth:`record` appends a chained record (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str], participant: str) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head")
        self.participant = participant
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._prev = self._tail()

    def _tail(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["hash"])
        except (FileNotFoundError, ValueError, KeyError):
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
        """Append one record and return it."""
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
                fh.flush()
                os.fsync(fh.fileno())
            tmp = self.head_path.with_name(f".{self.head_path.name}.tmp")
            tmp.write_text(json.dumps({"seq": rec["seq"], "hash": rec["hash"]}))
            os.replace(tmp, self.head_path)
            self._seq, self._prev = rec["seq"], rec["hash"]
            return rec


@dataclass
class Verification:
    """Outcome of :func:`verify`: ``ok``, the number of records, and each problem found."""

    ok: bool
    records: int
    problems: list[str] = field(default_factory=list)


def verify(path: str | os.PathLike[str]) -> Verification:
    """Check an audit trail: every hash, every link, the numbering and the head file."""
    path = Path(path)
    problems: list[str] = []
    prev, expected_seq, count = GENESIS, 1, 0
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return Verification(False, 0, [f"{path}: no such file"])
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            problems.append(f"line {lineno}: empty line")
            continue
        try:
            rec = json.loads(raw)
            seq, digest, link = rec["seq"], rec["hash"], rec["prev"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {lineno}: not an audit record")
            continue
        count += 1
        if _digest(rec) != digest:
            problems.append(f"line {lineno}: record {seq} was modified (its hash does not match)")
        if link != prev:
            problems.append(
                f"line {lineno}: record {seq} does not follow the record before it "
                "(a record was deleted, inserted or reordered)"
            )
        if seq != expected_seq:
            problems.append(f"line {lineno}: record number {seq}, expected {expected_seq}")
        prev, expected_seq = digest, seq + 1
    head = path.with_suffix(".head")
    if head.exists():
        try:
            h = json.loads(head.read_text())
            if h.get("hash") != prev or h.get("seq") != expected_seq - 1:
                problems.append(
                    f"the log ends at record {expected_seq - 1} but {head.name} says "
                    f"{h.get('seq')}: records were removed from the end"
                )
        except ValueError:
            problems.append(f"{head.name}: unreadable")
    return Verification(not problems, count, problems)
