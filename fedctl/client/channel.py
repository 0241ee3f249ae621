"""The hidden runtime behind ``fedctl.client``: a channel to whatever runs the script.

A runtime (the simulator's worker, the POC/production site agent, or nothing at all when the
script runs as plain ``python client.py``) installs a :class:`Channel`; the public functions in
:mod:`fedctl.client.api` only talk to it. Channels are looked up per thread first (the
simulator keeps several scripts alive in one process) and then per process.
"""

from __future__ import annotations

import hashlib
import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from fedctl.client.state import SiteState
from fedctl.codec.model import FLModel, Task


@dataclass
class SiteInfo:
    """Who and where the running script is."""

    site_name: str
    site_index: int  # 0-based position of this site among the job's sites
    num_sites: int
    job_id: str
    mode: str  # "simulation", "poc", "production" or "standalone"
    seed: int | None = 0
    workspace: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def derive_seed(seed: int, site_index: int, round_: int | None, task_name: str = "train") -> int:
    """The seed fedctl sets before a script receives a task: a pure function of the run's seed,
    the site, the round and the task, so results do not depend on scheduling or process layout."""
    key = f"{seed}:{site_index}:{round_ if round_ is not None else -1}:{task_name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seed_everything(value: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the ones training loops use)."""
    random.seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        # torch.manual_seed would also queue a CUDA seeding call, recording a stack trace each
        # time CUDA is not initialised: seed the CPU generator directly, CUDA only if in use.
        torch.default_generator.manual_seed(value)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(value)


class Channel(ABC):
    """What a runtime provides to the client API; also holds the API's per-script state."""

    info: SiteInfo

    def __init__(self) -> None:
        self.initialized = False
        self.task: Task | None = None  # the task the script is working on
        self.answered = False  # send() was called for ``task``
        self.finished = False  # the job is over for this site
        self.warned: set[str] = set()

    @abstractmethod
    def next_task(self) -> Task | None:
        """Block until the next task arrives; None when the job is over for this site."""

    @abstractmethod
    def submit(self, task: Task, model: FLModel) -> None:
        """Deliver the script's answer to ``task``."""

    @abstractmethod
    def record(self, record: dict[str, Any]) -> None:
        """Forward a tracking record (metric, text) to the server side."""

    @property
    @abstractmethod
    def state(self) -> SiteState:
        """The site's persistent state (kept across rounds by the runtime)."""

    def on_receive(self, task: Task) -> None:
        """Hook run when the script takes a task: seeds the global generators."""
        if self.info.seed is not None:
            seed_everything(
                derive_seed(
                    self.info.seed, self.info.site_index, task.model.current_round, task.name
                )
            )


_local = threading.local()
_process_channel: Channel | None = None


def install(channel: Channel | None, *, thread_only: bool = False) -> None:
    """Make ``channel`` the one the client API uses (for this thread, or the whole process)."""
    global _process_channel
    if thread_only:
        _local.channel = channel
    else:
        _process_channel = channel


def current() -> Channel | None:
    """The channel installed for this thread, else for this process, else None."""
    ch = getattr(_local, "channel", None)
    return ch if ch is not None else _process_channel
