"""The channel of a client script started by a site agent (POC and production).

The agent passes a unix socket path in ``FEDCTL_AGENT_SOCKET``; the script connects, receives
who and where it is, then asks for tasks. Models move as files in the job's folder, in the safe
tensor framing: the agent writes a task's model where this channel reads it, and this channel
writes the script's answer where the agent uploads it from. Nothing is pickled.
"""

from __future__ import annotations

import functools
import os
import socket
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import safe_name
from fedctl.client.channel import Channel, SiteInfo
from fedctl.client.state import SiteState
from fedctl.codec import protocol
from fedctl.codec.frames import FrameSocket
from fedctl.codec.model import FLModel, Task, join_model, split_model
from fedctl.codec.protocol import (
    NextTask,
    ResultTaken,
    ScriptEnd,
    ScriptHello,
    ScriptInfo,
    ScriptRecords,
    ScriptResult,
    ScriptTask,
)
from fedctl.codec.tensorfiles import load_file, save_file_hashed
from fedctl.constants import ENV_AGENT_SOCKET, ENV_MODE
from fedctl.errors import ClientAPIError

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.safetensors"


class AgentChannel(Channel):
    """Talks to the site agent that started this script."""

    def __init__(self, path: str) -> None:
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ClientAPIError(f"cannot reach the fedctl site agent at {path}: {exc}") from None
        self.conn = FrameSocket(sock)
        protocol.send(self.conn, ScriptHello(os.getpid()))
        info = protocol.recv(self.conn, ScriptInfo)
        if info is None:
            raise ClientAPIError("the fedctl site agent closed the connection")
        self.info = SiteInfo(
            site_name=info.site_name,
            site_index=info.site_index,
            num_sites=info.num_sites,
            job_id=info.job_id,
            mode=info.mode,
            seed=info.seed,
            workspace=info.workspace,
        )
        self._state: SiteState | None = None
        self._result_dir: Path | None = None
        self._records: list[dict[str, Any]] = []
        self._models = HeldModels()

    def next_task(self) -> Task | None:
        self._flush_records()
        protocol.send(self.conn, NextTask(*self._models.take()))
        msg = protocol.recv(self.conn, ScriptTask, ScriptEnd)
        if not isinstance(msg, ScriptTask):
            self._save_state()  # the job is over for this site
            return None
        tensors = self._models.load(msg.path) if msg.path else {}
        self._result_dir = Path(msg.result_dir)
        model = join_model(msg.header, tensors)
        return Task(msg.name, model, task_id=msg.task_id, job_id=self.info.job_id)

    def submit(self, task: Task, model: FLModel) -> None:
        header, tensors = split_model(model)
        path, sha = None, None
        if tensors:
            assert self._result_dir is not None
            path = self._result_dir / f"result.{safe_name(task.task_id)}.safetensors"
            # written now (later changes do not leak), hashed while written
            _, sha = save_file_hashed(tensors, path, durable=False)
        self._flush_records()
        result = ScriptResult(
            task.task_id, header, str(path) if path else None, sha, *self._models.take()
        )
        protocol.send(self.conn, result)
        if protocol.recv(self.conn, ResultTaken) is None:
            raise ClientAPIError("the fedctl site agent closed the connection")
        self._save_state()

    def _save_state(self) -> None:
        """Persist the site's state (at each send and when the job ends for the site)."""
        if self._state is not None:
            self._state.save()

    def record(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if len(self._records) >= 100:
            self._flush_records()

    def _flush_records(self) -> None:
        if self._records:
            records, self._records = self._records, []
            protocol.send(self.conn, ScriptRecords(records))

    @property
    def state(self) -> SiteState:
        if self._state is None:
            self._state = SiteState(Path(self.info.workspace) / STATE_FILE)
        return self._state


def connect_from_env() -> AgentChannel:
    """The channel for a script started by a site agent (``FEDCTL_AGENT_SOCKET``)."""
    path = os.environ.get(ENV_AGENT_SOCKET)
    if not path:
        raise ClientAPIError(f"{ENV_MODE} is set but {ENV_AGENT_SOCKET} is not")
    return AgentChannel(path)


class HeldModels:
    """The model files the agent lent this script: which ones tensors still map, and which ones
    they no longer map, to tell the agent with the next message (see
    :class:`fedctl.runtime.lent.LentFiles`).

    A file is *released* (the agent may rewrite it in place) when its last tensor is gone, unless
    the script forked while it held it: a child may map it still, so it is *dropped* (the agent
    removes it, which a mapping survives)."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._forked: set[str] = set()
        self._released: list[str] = []
        self._dropped: list[str] = []
        os.register_at_fork(before=functools.partial(_on_fork, weakref.ref(self)))

    def load(self, path: str) -> dict[str, torch.Tensor]:
        """The tensors of the model file ``path`` (views of its mapping)."""
        tensors = load_file(path, on_release=functools.partial(self._on_release, path))[0]
        self._held.add(path)
        return tensors

    def take(self) -> tuple[list[str] | None, list[str] | None]:
        """(released, dropped) since the last call."""
        released, self._released = self._released, []
        dropped, self._dropped = self._dropped, []
        return released or None, dropped or None

    def _on_fork(self) -> None:
        """The script forks: the child maps what is held now."""
        self._forked |= self._held

    def _on_release(self, path: str) -> None:
        """The last tensor mapping ``path`` is gone (a finalizer: on any thread)."""
        self._held.discard(path)
        if path in self._forked:
            self._forked.discard(path)
            self._dropped.append(path)
        else:
            self._released.append(path)


def _on_fork(ref: weakref.ref[HeldModels]) -> None:
    """A fork hook that does not keep its HeldModels alive."""
    held = ref()
    if held is not None:
        held._on_fork()
