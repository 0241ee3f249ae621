"""The channel of a client script started by a site agent (POC and production).

The agent passes a unix socket path in ``FEDCTL_AGENT_SOCKET``; the script connects, receives
who and where it is, then asks for tasks. Models move as files in the job's folder, in the safe
tensor framing: the agent writes a task's model where this channel reads it, and this channel
writes the script's answer where the agent uploads it from. Nothing is pickled.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from fedctl._fs import safe_name
from fedctl.client.channel import Channel, SiteInfo
from fedctl.client.state import SiteState
from fedctl.codec.model import FLModel, Task, join_model, split_model
from fedctl.codec.tensors import load_file, save_file_hashed
from fedctl.constants import ENV_AGENT_SOCKET, ENV_MODE
from fedctl.errors import ClientAPIError
from fedctl.transport.frames import FrameSocket

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
        self.conn.send({"t": "hello", "pid": os.getpid()})
        got = self.conn.recv({"info"})
        if got is None:
            raise ClientAPIError("the fedctl site agent closed the connection")
        info = got[0]
        self.info = SiteInfo(
            site_name=str(info["site_name"]),
            site_index=int(info["site_index"]),
            num_sites=int(info["num_sites"]),
            job_id=str(info["job_id"]),
            mode=str(info["mode"]),
            seed=int(info["seed"]),
            workspace=str(info["workspace"]),
        )
        self._state: SiteState | None = None
        self._result_dir: Path | None = None
        self._records: list[dict[str, Any]] = []

    def next_task(self) -> Task | None:
        self._flush_records()
        self.conn.send({"t": "next"})
        got = self.conn.recv({"task", "end"})
        if got is None or got[0]["t"] == "end":
            self._save_state()  # the job is over for this site
            return None
        h = got[0]
        tensors = load_file(h["path"])[0] if h.get("path") else {}
        if h.get("path"):
            Path(h["path"]).unlink(missing_ok=True)
        self._result_dir = Path(h["result_dir"])
        model = join_model(h["header"], tensors)
        return Task(str(h["name"]), model, task_id=str(h["task_id"]), job_id=self.info.job_id)

    def submit(self, task: Task, model: FLModel) -> None:
        header, tensors = split_model(model)
        path, sha = None, None
        if tensors:
            assert self._result_dir is not None
            path = self._result_dir / f"result.{safe_name(task.task_id)}.safetensors"
            # written now (later changes do not leak), hashed while written
            _, sha = save_file_hashed(tensors, path, durable=False)
        self._flush_records()
        self.conn.send(
            {
                "t": "result",
                "task_id": task.task_id,
                "header": header,
                "path": str(path) if path else None,
                "sha256": sha,
            }
        )
        got = self.conn.recv({"ok"})
        if got is None:
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
            self.conn.send({"t": "records", "records": records})

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
