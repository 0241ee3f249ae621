"""What every layer says about a job: its status, its id, how its rounds are numbered.

A job moves SUBMITTED → SCHEDULED → RUNNING → FINISHED / FAILED / ABORTED on a server; a run in
the simulator ends FINISHED, FAILED or ABORTED. The statuses are strings on the wire and in files
(``JobStatus`` is a ``StrEnum``, so ``JobStatus.FINISHED == "FINISHED"``).

Rounds: workflows, their events and the client API (``FLModel.current_round``) index rounds from
0; everything users see — the live display, logs, ``metrics/*.jsonl``, ``result.json``, the JSON of
every command, audit records — numbers them from 1 (:func:`user_round`). Imports nothing from
fedctl.
"""

from __future__ import annotations

import re
import secrets
import time
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """A job's state; the last three are final."""

    SUBMITTED = "SUBMITTED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"

    @property
    def final(self) -> bool:
        """True for FINISHED, FAILED and ABORTED."""
        return self in TERMINAL


SUBMITTED, SCHEDULED, RUNNING = JobStatus.SUBMITTED, JobStatus.SCHEDULED, JobStatus.RUNNING
FINISHED, FAILED, ABORTED = JobStatus.FINISHED, JobStatus.FAILED, JobStatus.ABORTED
#: the final statuses
TERMINAL = frozenset({FINISHED, FAILED, ABORTED})


def user_round(index: Any) -> Any:
    """A 0-based round index (workflow events, ``FLModel.current_round``) as users see it:
    1-based. None, and anything that is not an integer, passes through unchanged."""
    if isinstance(index, int) and not isinstance(index, bool):
        return index + 1
    return index


#: process exit code of a job run by its final status (job processes, `fedctl simulate`)
EXIT_CODES = {FINISHED: 0, FAILED: 1, ABORTED: 2}


def new_job_id(name: str) -> str:
    """A readable, unique job id: name, UTC time, 4 random hex digits."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def natural_key(name: str) -> list[Any]:
    """Sort key that puts site-2 before site-10: the order that gives a job's sites their index."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
