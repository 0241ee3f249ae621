"""A simulator worker: runs virtual sites' client scripts for the tasks it is given.

How a script runs (the design is in docs/simulation.md):

* **resident** (default when there are no more sites than workers): each site's script starts
  once in a thread of its worker and stays alive across rounds, blocked in ``is_running()``
  between tasks, so its Python variables (model, optimizer, data) persist like on a real site.
* **per-round** (more sites than workers, e.g. 1000 sites on 2 workers): a site's script runs from
  the top for each task and ends after its ``send`` (``is_running()`` then returns False).
  Memory does not grow with the number of sites; what a site must keep between rounds goes in
  ``fedctl.client.get_state()``, which the worker saves to ``sites/<site>/state.safetensors``.

Either way a worker runs one script at a time, so per-process settings (``sys.argv``, the
working directory) are set for the script that is running; ``print`` output of each script goes
to its site's ``client.log``. Before each task the global generators are seeded from
(seed, site, round), so results do not depend on the mode or on which worker ran what.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shlex
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.client import channel as client_channel
from fedctl.client.channel import Channel, SiteInfo
from fedctl.client.state import SiteState
from fedctl.codec.model import FLModel, Task, TaskResult
from fedctl.recipe.loader import isolated_imports

STATE_FILE = "state.safetensors"
LOG_FILE = "client.log"


@dataclass
class WorkerConfig:
    """What a worker needs to run a job's scripts (plain data: it is sent to Ray actors)."""

    job_id: str
    code_dir: str
    train_script: str
    train_args: str
    run_dir: str
    seed: int
    num_sites: int
    resident: bool
    threads: int = 1


@dataclass
class WorkItem:
    """One task for one site (the global params travel separately, once per round)."""

    site: str
    site_index: int
    task: Task


class _RoutedStream(io.TextIOBase):
    """sys.stdout/sys.stderr replacement that sends each thread's writes to its own file."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.routes: dict[int, Any] = {}

    def _target(self) -> Any:
        return self.routes.get(threading.get_ident(), self.fallback)

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


_streams: tuple[_RoutedStream, _RoutedStream] | None = None


def _routed_streams() -> tuple[_RoutedStream, _RoutedStream]:
    global _streams
    if _streams is None:
        _streams = (_RoutedStream(sys.stdout), _RoutedStream(sys.stderr))
        sys.stdout, sys.stderr = _streams
    return _streams


class SimChannel(Channel):
    """The client-API channel of one virtual site inside a worker."""

    def __init__(self, host: ScriptHost, inbox: Any) -> None:
        super().__init__()
        self.host = host
        self.info = host.info
        # resident scripts block on a queue.Queue; per-round ones read a plain list
        self.inbox = inbox
        self._state: SiteState | None = None

    def next_task(self) -> Task | None:
        task = (
            self.inbox.get() if self.host.resident else (self.inbox.pop(0) if self.inbox else None)
        )
        if task is not None:
            self.host.enter_context()
        return task

    def submit(self, task: Task, model: FLModel) -> None:
        params = model.params
        handle = None
        if params is not None:
            # A per-round script ends before its result leaves the worker: nothing can change
            # the tensors in between, so no copy. A resident one keeps running: copy at send.
            handle = self.host.transport.snapshot(params, frozen=not self.host.resident)
        sent = FLModel(
            params_type=model.params_type,
            params=None,
            optimizer_params=model.optimizer_params,
            metrics=model.metrics,
            start_round=model.start_round,
            current_round=model.current_round,
            total_rounds=model.total_rounds,
            meta=model.meta,
        )
        if self.host.resident:
            self.host.outbox.put(("result", sent, handle))
        else:
            self.host.sent = ("result", sent, handle)  # and its loop ends: the inbox is empty

    def record(self, record: dict[str, Any]) -> None:
        self.host.records.append(record)

    @property
    def state(self) -> SiteState:
        if self._state is None:
            self._state = SiteState(self.host.site_dir / STATE_FILE)
        return self._state


class ScriptHost:
    """One site's script: a thread running it, with queues to hand it tasks and take results."""

    def __init__(self, worker: WorkerCore, site: str, site_index: int) -> None:
        self.worker = worker
        self.transport = worker.transport
        self.resident = worker.config.resident
        self.site = site
        self.site_dir = Path(worker.config.run_dir) / "sites" / site
        self.info = SiteInfo(
            site,
            site_index,
            worker.config.num_sites,
            worker.config.job_id,
            "simulation",
            seed=worker.config.seed,
            workspace=str(self.site_dir),
        )
        self.outbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.sent: tuple[Any, ...] | None = None
        self.records: list[dict[str, Any]] = []
        self.channel: SimChannel | None = None
        self.thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def enter_context(self) -> None:
        """Per-process settings for this script (it is the only one running in the worker)."""
        os.chdir(self.site_dir)

    def _start(self) -> None:
        self.worker.make_site_dir(self.site_dir)
        self.channel = SimChannel(self, queue.Queue())
        self.outbox = queue.Queue()
        self.thread = threading.Thread(
            target=lambda: self.outbox.put(self._execute()), name=f"fedctl-{self.site}", daemon=True
        )
        self.thread.start()

    def _execute(self) -> tuple[Any, ...]:
        """Run the script to its end in the calling thread; returns ("exit", error, traceback)."""
        script = self.worker.script_path
        out, err = _routed_streams()
        log = open(self.site_dir / LOG_FILE, "a", buffering=1)  # noqa: SIM115
        ident = threading.get_ident()
        out.routes[ident] = err.routes[ident] = log
        client_channel.install(self.channel, thread_only=True)
        status: tuple[Any, ...] = ("exit", None, None)
        try:
            sys.argv = [script, *self.worker.argv]
            self.enter_context()
            namespace = {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__}
            exec(self.worker.code, namespace)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status = ("exit", f"script exited with code {exc.code}", None)
        except BaseException as exc:
            tb = _script_traceback(exc, script)
            status = ("exit", f"{type(exc).__name__}: {exc}", tb)
            log.write(tb)
        finally:
            client_channel.install(None, thread_only=True)
            out.routes.pop(ident, None)
            err.routes.pop(ident, None)
            log.close()
        return status

    def run(self, task: Task) -> tuple[TaskResult, Any]:
        """Give the script ``task``; wait for its send (or its end). Returns (result, handle)."""
        self.records = []
        started = time.monotonic()
        if self.resident:
            msg = self._run_resident(task)
        else:
            msg = self._run_inline(task)
        result = TaskResult(self.site, task.task_id)
        handle = None
        if msg[0] == "result":
            _, result.model, handle = msg
        else:
            _, error, tb = msg
            result.error = error or "script finished without calling send()"
            result.traceback = tb
            self.thread = None
        self._save_state()
        result.records = self.records
        result.duration = time.monotonic() - started
        return result, handle

    def _run_inline(self, task: Task) -> tuple[Any, ...]:
        """Per-round mode: run the script from the top in this thread for one task."""
        self.worker.make_site_dir(self.site_dir)
        self.channel = SimChannel(self, [task])
        self.sent = None
        status = self._execute()
        sent, self.sent = self.sent, None
        # An error after send() (code after the loop) is in the site's client.log; the result
        # that was sent stands.
        return status if sent is None else sent

    def _run_resident(self, task: Task) -> tuple[Any, ...]:
        """Resident mode: hand the task to the site's long-lived script thread."""
        for _ in range(2):
            if not self.alive:
                self._start()
            assert self.channel is not None
            self.channel.inbox.put(task)
            msg = self.outbox.get()
            if msg[0] == "exit" and not msg[1] and not self.channel.inbox.empty():
                # A resident script that ended on its own between tasks: start it again.
                self.thread = None
                continue
            return msg
        return msg

    def _save_state(self) -> None:
        ch = self.channel
        if ch is not None and ch._state is not None and (len(ch._state) or ch._state.path.exists()):
            ch._state.save()

    def stop(self, timeout: float = 10.0) -> None:
        """End a resident script: its ``is_running()`` returns False."""
        if self.alive and self.channel is not None:
            self.channel.inbox.put(None)
            assert self.thread is not None
            self.thread.join(timeout)


def _script_traceback(exc: BaseException, script: str) -> str:
    """The traceback from the user's script down, without fedctl's own frames on top."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, f in enumerate(frames) if f.filename == script), 0)
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames[start:])]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


class WorkerCore:
    """Runs batches of work items for one job; the Ray actor and the local backend wrap it."""

    def __init__(self, config: WorkerConfig, transport: Any) -> None:
        import torch

        self.config = config
        self.transport = transport
        script = Path(config.code_dir) / config.train_script
        self.script_path = str(script)
        self.argv = shlex.split(config.train_args)
        self.code = compile(script.read_text(), self.script_path, "exec")
        # argparse asks for the terminal size on every parser; scripts have no terminal here.
        os.environ.setdefault("COLUMNS", "100")
        os.environ.setdefault("LINES", "40")
        # the job's code folder is importable (from model import Net), shadowing same-named
        # modules of this process, until close()
        self._imports = contextlib.ExitStack()
        self._imports.enter_context(isolated_imports(config.code_dir))
        self._cwd = os.getcwd()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.hosts: dict[str, ScriptHost] = {}
        self._site_dirs: set[Path] = set()
        self._model_id: str | None = None
        self._model: dict[str, Any] | None = None

    def make_site_dir(self, path: Path) -> None:
        """Create a site's folder once per worker (not once per task)."""
        if path not in self._site_dirs:
            path.mkdir(parents=True, exist_ok=True)
            self._site_dirs.add(path)

    def _global(self, model_id: str, handle: Any) -> dict[str, Any]:
        if model_id != self._model_id:
            self._model = None  # drop the previous round's model before fetching this one
            self._model = self.transport.get(handle)
            self._model_id = model_id
        assert self._model is not None
        return self._model

    def run_batch(
        self, items: list[WorkItem], model_id: str, handle_box: list[Any]
    ) -> list[tuple[TaskResult, Any]]:
        """Run each item's task in turn; the global params come from ``handle_box[0]``."""
        out = []
        for item in items:
            params = None
            if handle_box and handle_box[0] is not None:
                base = self._global(model_id, handle_box[0])
                params = {k: v.clone() for k, v in base.items()}  # the script's own copy
            m = item.task.model
            model = FLModel(
                params_type=m.params_type,
                params=params,
                optimizer_params=None,
                metrics=m.metrics,
                start_round=m.start_round,
                current_round=m.current_round,
                total_rounds=m.total_rounds,
                meta=dict(m.meta or {}),
            )
            task = Task(item.task.name, model, item.task.task_id, item.task.job_id)
            host = self.hosts.get(item.site)
            if host is None:
                host = ScriptHost(self, item.site, item.site_index)
                if self.config.resident:
                    self.hosts[item.site] = host
            out.append(host.run(task))
        return out

    def close(self) -> None:
        """Stop resident scripts and undo this worker's changes to the process."""
        for host in self.hosts.values():
            host.stop()
        self.hosts.clear()
        self._model = None
        self._imports.close()
        try:
            os.chdir(self._cwd)
        except OSError:
            pass
