"""The server's job store: SQLite, one file, every state change a transaction.

Jobs move SUBMITTED → SCHEDULED → RUNNING → FINISHED / FAILED / ABORTED; each transition is
recorded with its time and reason, and illegal transitions are refused. Progress events of a job
(rounds, results, warnings) are kept in an ``events`` table so ``job status``, ``job logs`` and a
following client can read them incrementally.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl.errors import FedctlError, NotFound
from fedctl.jobs import (
    ABORTED,
    FAILED,
    FINISHED,
    RUNNING,
    SCHEDULED,
    SUBMITTED,
    TERMINAL,
)

_NEXT = {
    SUBMITTED: {SCHEDULED, FAILED, ABORTED},
    SCHEDULED: {RUNNING, SUBMITTED, FAILED, ABORTED},
    RUNNING: {FINISHED, FAILED, ABORTED, SCHEDULED},
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    submitter TEXT NOT NULL,
    submitter_org TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    submitted_at REAL NOT NULL,
    scheduled_at REAL,
    started_at REAL,
    finished_at REAL,
    job_dir TEXT NOT NULL,
    result_dir TEXT NOT NULL,
    min_clients INTEGER NOT NULL,
    num_rounds INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    sites TEXT NOT NULL DEFAULT '[]',
    round INTEGER,
    metrics TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""


@dataclass
class JobRecord:
    """One row of the jobs table."""

    id: str
    name: str
    kind: str
    submitter: str
    submitter_org: str
    state: str
    reason: str | None
    submitted_at: float
    scheduled_at: float | None
    started_at: float | None
    finished_at: float | None
    job_dir: str
    result_dir: str
    min_clients: int
    num_rounds: int
    seed: int
    bundle_sha256: str
    bundle_size: int
    sites: list[str] = field(default_factory=list)
    round: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class JobStore:
    """Thread-safe access to the job database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, row: sqlite3.Row | tuple[Any, ...], cols: list[str]) -> JobRecord:
        data = dict(zip(cols, row, strict=True))
        for key in ("sites", "metrics", "extra"):
            data[key] = json.loads(data[key])
        return JobRecord(**data)

    def add(self, rec: JobRecord) -> None:
        """Insert a new job (state SUBMITTED)."""
        data = rec.to_json()
        for key in ("sites", "metrics", "extra"):
            data[key] = json.dumps(data[key])
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", list(data.values()))

    def get(self, job_id: str) -> JobRecord:
        """The job with this id, or NotFound."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            cols = [d[0] for d in cur.description]
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return self._row(row, cols)

    def list(self, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        """Jobs in submission order (optionally only some states)."""
        query = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if states:
            query += f" WHERE state IN ({', '.join('?' for _ in states)})"
            args = states
        with self._lock:
            cur = self._db.execute(query + " ORDER BY submitted_at, id", args)
            rows = cur.fetchall()
            cols = [d[0] for d in cur.description]
        return [self._row(r, cols) for r in rows]

    def transition(
        self, job_id: str, state: str, reason: str | None = None, **fields: Any
    ) -> JobRecord:
        """Move a job to ``state`` (refusing illegal moves); sets the matching timestamp."""
        now = time.time()
        stamps: dict[str, str] = {SCHEDULED: "scheduled_at", RUNNING: "started_at"}
        stamp = stamps.get(state)
        if state in TERMINAL:
            stamp = "finished_at"
        with self._lock:
            cur = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            if state not in _NEXT.get(row[0], set()):
                raise FedctlError(f"job {job_id} is {row[0]}; it cannot become {state}")
            sets = {"state": state, "reason": reason, **fields}
            if stamp:
                sets[stamp] = now
            for key in ("sites", "metrics", "extra"):
                if key in sets:
                    sets[key] = json.dumps(sets[key])
            assignments = ", ".join(f"{k} = ?" for k in sets)
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", [*sets.values(), job_id]
            )
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields without a state change (round, metrics, reason while waiting)."""
        for key in ("sites", "metrics", "extra"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", [*fields.values(), job_id]
            )

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append a progress event; returns its sequence number."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (job_id, time, kind, data) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), kind, json.dumps(data)),
            )
            return int(cur.lastrowid or 0)

    def events(
        self, job_id: str, after: int = 0, limit: int = 1000
    ) -> builtins.list[dict[str, Any]]:
        """Events of a job with sequence numbers greater than ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, kind, data FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [{"seq": s, "time": t, "event": k, **json.loads(d)} for s, t, k, d in rows]
