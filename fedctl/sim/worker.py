"""A simulator worker: runs virtual sites' client scripts for the tasks it is given.

How a script runs (the design is in docs/simulation.md):

* **resident** (default when there are no more sites than workers): each site's script starts
  once in a thread of its worker and stays alive across rounds, blocked in ``is_running()``
  between tasks, so its Python variables (model, optimizer, data) persist like on a real site.
* **per-round** (more sites than workers, e.g. 1000 sites on 2 workers): a site's script runs from
  the top for each task and ends after its ``send`` (``is_running()`` then returns False).
  Memory does not grow with the number of sites; what a site must keep between rounds goes in
  ``fedctl.client.get_state()``, which the worker saves to ``sites/<site>/state.safetensors``.

Either way a worker *executes* one script at a time: a resident script that has sent its result
runs on (the code after ``send``) until it blocks again in ``is_running()`` before any other site
of its worker is given a task. Sites of one worker share a process, like a module-level cache in a
helper module does; taking turns makes them behave as if each had its own, as on real sites.
Per-process settings (``sys.argv``, the working directory) are set for the script that is
running; ``print`` output of each script goes to its site's ``client.log``. Before each task the
global generators are seeded from (seed, site, round), so results do not depend on the mode or on
which worker ran what.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import os
import queue
import shlex
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedctl._fs import resident_bytes
from fedctl._imports import isolated_imports
from fedctl.client import channel as client_channel
from fedctl.client.channel import Channel, SiteInfo, derive_seed
from fedctl.client.state import SiteState
from fedctl.codec.model import FLModel, Task, TaskResult
from fedctl.errors import FedctlError
from fedctl.privacy.compression import job_chain
from fedctl.privacy.filters import FilterChain, FilterContext
from fedctl.privacy.he import model as he_model
from fedctl.privacy.secagg import keys as secagg_keys
from fedctl.sim.hoststeps import HostSteps
from fedctl.workflows import swarm_site

STATE_FILE = "state.safetensors"
LOG_FILE = "client.log"
#: what a resident script's thread reports when it blocks for its next task
PARKED = ("parked",)
#: a per-round script that leaves its worker at least this much bigger than it found it is
#: followed by a garbage collection (see :meth:`ScriptHost._run_inline`)
RECLAIM_BYTES = 32 << 20


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
    #: the job's privacy filter specs, and each site's own (its policy's), run at task_in and
    #: result_out as a real site runs them
    filters: list[dict[str, Any]] = field(default_factory=list)
    site_filters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: the run's secret HE context file (jobs with homomorphic_encryption; the sites' key)
    he_context: str | None = None
    #: the job's compression (docs/compression.md) and whether it runs secure aggregation
    compression: dict[str, Any] | None = None
    secure: bool = False


@dataclass
class WorkItem:
    """One task for one site (the global params travel separately, once per round)."""

    site: str
    site_index: int
    task: Task
    #: what this site's task adds to the task's meta (Task.site_meta of this site)
    meta: dict[str, Any] | None = None


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
    """sys.stdout/sys.stderr, routed per script thread (installed again if something else,
    e.g. a test runner or a notebook, replaced them since)."""
    global _streams
    if _streams is None or sys.stdout is not _streams[0] or sys.stderr is not _streams[1]:
        old = _streams
        _streams = (_RoutedStream(sys.stdout), _RoutedStream(sys.stderr))
        if old is not None:  # scripts still running keep their routes
            _streams[0].routes.update(old[0].routes)
            _streams[1].routes.update(old[1].routes)
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
        self.warned = host.warned  # warn once per site, also when its script runs per round

    def next_task(self) -> Task | None:
        if self.host.resident:
            self.host.outbox.put(PARKED)  # the worker may now run another site's script
            task = self.inbox.get()
        else:
            task = self.inbox.pop(0) if self.inbox else None
        if task is not None:
            self.host.enter_context()
        else:
            self.save_state()
        return task

    def submit(self, task: Task, model: FLModel) -> None:
        # Frozen now, in the script's thread: the tensors are copied before send() returns (see
        # fedctl.sim.transport), the JSON parts were copied by the client API.
        handle = None
        model = self.host.filter_result(model, task.name)  # as a real site runs its filters
        if self.host.he_keys is not None:
            try:
                model = self.host.he_seal(model)
            except FedctlError as exc:
                self._deliver(("failed", f"homomorphic encryption: {exc}", None))
                return
        elif self.host.he_strip and model.params is not None:
            model = he_model.without_params(model)  # never a plain model under HE
        if self.host.secagg_task is not None:
            try:
                model = self.host.secure_input(model)
            except FedctlError as exc:
                self._deliver(("failed", f"secure aggregation: {exc}", None))
                return
        if self.host.swarm_task is not None:
            try:
                model = self.host.swarm_seal(model)
            except FedctlError as exc:
                self._deliver(("failed", f"swarm: {exc}", None))
                return
        if model.params is not None:
            params, resident = dict(model.params), self.host.resident
            handle = self.host.transport.snapshot(params, in_place=not resident)  # see release
        sent = replace(
            model,
            params=None,
            optimizer_params=(
                {k: v.detach().clone() for k, v in model.optimizer_params.items()}
                if model.optimizer_params is not None
                else None
            ),
        )
        self.save_state()
        self._deliver(("result", sent, handle))

    def _deliver(self, msg: tuple[Any, ...]) -> None:
        """Hand the script's answer to its host. The records made so far travel with it; what
        the script logs after send() (each record names its round) goes with its next one."""
        records, self.host.records = self.host.records, []
        if self.host.resident:
            self.host.outbox.put((*msg, records))
        else:
            self.host.sent = (*msg, records)  # and its loop ends

    def save_state(self) -> None:
        """Persist the site's state (at each send and when the job ends for the site), in the
        script's own thread so nothing it does meanwhile can race the write."""
        st = self._state
        if st is not None and st.path is not None and (len(st) or st.path.exists()):
            st.save()

    def record(self, record: dict[str, Any]) -> None:
        self.host.records.append(record)

    @property
    def state(self) -> SiteState:
        if self._state is None:
            self._state = SiteState(self.host.site_dir / STATE_FILE)
        return self._state


class ScriptHost(HostSteps):
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
        #: a resident script has sent its result and has not blocked in is_running() again
        self.unsettled = False
        self.sent: tuple[Any, ...] | None = None
        self.records: list[dict[str, Any]] = []
        # warnings already given to this site (kept by the worker: per-round hosts are new)
        self.warned: set[str] = worker.warned.setdefault(site, set())
        self.channel: SimChannel | None = None
        self.thread: threading.Thread | None = None
        config = worker.config
        #: the job's filters, then this site's own (they run last: a job cannot undo them),
        #: inside the job's compression (decoding first, encoding last)
        self.filters = job_chain(
            config.filters,
            config.compression,
            secure=config.secure,
            site=FilterChain.from_specs(config.site_filters.get(site)),
        )
        #: what the script started the current task from (updates are relative to it)
        self.base: Any = None
        #: the secure-aggregation part of the current training task's meta (None: none)
        self.secagg_task: dict[str, Any] | None = None
        #: the parameters the current training task asks to encrypt (None: none)
        self.he_keys: list[str] | None = None
        #: the current task's model was encrypted and its result is not: send no parameters
        self.he_strip = False

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _filter_context(self, point: str, model: FLModel, task: str | None) -> FilterContext:
        """Reproducible randomness in simulation (from the run's seed, site, round, point);
        what filters keep across rounds lives in the site's folder."""
        config, rnd = self.worker.config, model.current_round
        seed = derive_seed(config.seed, self.info.site_index, rnd, point)
        ctx = FilterContext(point, site=self.site, round=rnd, base=self.base, seed=seed)
        ctx.task, ctx.state_dir = task, self.site_dir
        return ctx

    def filter_task(
        self, model: FLModel, base: Any = None, encrypted: bool = False, task: str | None = None
    ) -> FLModel:
        """The task's model through the ``task_in`` filters (before the script sees it);
        ``base``: the same params, read-only (the script may change its own copy)."""
        self.base = base if base is not None else model.params
        self.secagg_task = None
        self.he_keys = he_model.task_request(model.meta)
        self.he_strip = encrypted and self.he_keys is None
        if self.he_keys is not None:
            model = replace(model, meta=he_model.strip_request(model.meta))
        if secagg_keys.wants_input(model.meta):
            meta = model.meta or {}
            self.secagg_task = {k: meta[k] for k in secagg_keys.PRIVATE_META if k in meta}
            model = replace(model, meta=secagg_keys.strip_private(meta))
        self.swarm_task = None
        if swarm_site.is_train(model.meta):
            model = self.swarm_open(model)
            self.base = dict(model.params or {})
            model = replace(model, params={k: v.clone() for k, v in self.base.items()})
        if model.params is None or not self.filters.at("task_in"):
            return model
        model = self.filters.apply("task_in", model, self._filter_context("task_in", model, task))
        model = replace(model, params=dict(model.params or {}))
        self.base = dict(model.params or {})  # the script's copy may change: keep its start
        model = replace(model, params={k: v.clone() for k, v in self.base.items()})
        return model

    def filter_result(self, model: FLModel, task: str | None = None) -> FLModel:
        """The script's answer through the ``result_out`` filters (before it leaves)."""
        if model.params is None or not self.filters.at("result_out"):
            return model
        ctx = self._filter_context("result_out", model, task)
        return self.filters.apply("result_out", model, ctx)

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
        started = time.monotonic()
        if self.resident:
            msg = self._run_resident(task)
        else:
            msg = self._run_inline(task)
        result = TaskResult(self.site, task.task_id)
        handle = None
        if msg[0] != "result" and self.secagg_task is not None:
            self.secagg().forget_task(self.secagg_task)  # dropped out of the round
            self.secagg_task = None
        if msg[0] == "result":
            _, result.model, handle, result.records = msg
        elif msg[0] == "failed":  # the script sent, its site could not pass it on
            _, result.error, result.traceback, result.records = msg
        else:
            _, error, tb = msg
            result.error = error or "script finished without calling send()"
            result.traceback = tb
            self.thread = None
            result.records, self.records = self.records, []  # the script has ended
        result.duration = time.monotonic() - started
        return result, handle

    def _run_inline(self, task: Task) -> tuple[Any, ...]:
        """Per-round mode: run the script from the top in this thread for one task."""
        self.worker.make_site_dir(self.site_dir)
        self.channel = SimChannel(self, [task])
        self.sent = None
        before = resident_bytes()
        status = self._execute()
        sent, self.sent = self.sent, None
        # The channel refers back to this host: that cycle would keep the host (and the round's
        # global model it holds as ``base``) until a cyclic collection, past the next script.
        self.channel = None
        # A script's globals are usually in a reference cycle (a module-level def or class
        # refers to them), so what the script held (its model, data, optimizer) outlives it
        # until Python's cyclic collector happens to run: with a large model, several sites'
        # models at once. A script that left the worker bigger gets that collection now.
        if resident_bytes() - before >= RECLAIM_BYTES:
            gc.collect()
        if hasattr(self.transport, "release"):  # what it kept of what it sent: its own memory
            self.transport.release()
        # An error after send() (code after the loop) is in the site's client.log; the result
        # that was sent stands.
        return status if sent is None else sent

    def _run_resident(self, task: Task) -> tuple[Any, ...]:
        """Resident mode: hand the task to the site's long-lived script thread."""
        for _ in range(2):
            if not self.alive:
                if self.channel is not None:
                    # this site's earlier script has ended (on its own or failing): free what
                    # it held before its successor starts (see _run_inline; this is rare)
                    gc.collect()
                self._start()
            assert self.channel is not None
            self.channel.inbox.put(task)
            msg = self._next_message()
            if msg[0] == "exit" and not msg[1] and not self.channel.inbox.empty():
                # A resident script that ended on its own between tasks: start it again.
                self.thread = None
                continue
            self.unsettled = msg[0] in ("result", "failed")
            return msg
        return msg

    def _next_message(self) -> tuple[Any, ...]:
        """The script's next result or exit (it parks before taking a task: skipped here)."""
        while True:
            msg = self.outbox.get()
            if msg is not PARKED:
                return msg

    def settle(self) -> None:
        """Wait until a resident script that has sent its result blocks again in
        ``is_running()`` (or ends): until then it may still change what the process shares."""
        if not self.unsettled:
            return
        self.unsettled = False
        msg = self.outbox.get()
        if msg is not PARKED:  # it ended; an error after send() is in its client.log
            self.thread = None

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
        self._active: ScriptHost | None = None  # the host that ran last
        self.warned: dict[str, set[str]] = {}
        self._he_context: Any = None
        self._encrypted = False  # whether the current global model came encrypted

    def he_context(self) -> Any:
        """The run's secret HE context (loaded once per worker)."""
        if self._he_context is None:
            from fedctl.privacy.he import load_context

            if self.config.he_context is None:
                raise FedctlError("the job encrypts, but this run has no HE context")
            data = Path(self.config.he_context).read_bytes()
            self._he_context = load_context(data, need_secret=True, source="the run's HE context")
        return self._he_context

    def make_site_dir(self, path: Path) -> None:
        """Create a site's folder once per worker (not once per task)."""
        if path not in self._site_dirs:
            path.mkdir(parents=True, exist_ok=True)
            self._site_dirs.add(path)

    def _global(self, model_id: str, handle: Any) -> dict[str, Any]:
        """The round's global params, fetched once per broadcast and never handed to a script
        (each gets a clone). With Ray they are read-only views of the object store; in the local
        backend they are the workflow's own tensors, which stay unchanged while the broadcast
        runs because workflows and aggregators never modify broadcast params in place (every
        step builds new tensors; ``tests/test_algorithms.py`` pins it for every workflow)."""
        if model_id != self._model_id:
            self._model = None  # drop the previous round's model before fetching this one
            model = self.transport.get(handle)
            self._encrypted = he_model.is_encrypted(model)
            if self._encrypted:  # the sites' runtime decrypts, once per worker
                model = he_model.open_params(model, self.he_context())
            self._model = model
            self._model_id = model_id
        assert self._model is not None
        return self._model

    def run_batch(
        self, items: list[WorkItem], model_id: str, handle_box: list[Any]
    ) -> list[tuple[TaskResult, Any]]:
        """Run each item's task in turn; the global params come from ``handle_box[0]``."""
        out = []
        for item in items:
            params = base = None
            if handle_box and handle_box[0] is not None:
                base = self._global(model_id, handle_box[0])
                params = self._script_copy(handle_box[0], base)
            m = item.task.model
            # Each script gets its own copies: the task object is shared by every item of the
            # batch (and, in the local backend, with the workflow), and scripts may edit what
            # they receive.
            model = replace(
                m,
                params=params,
                optimizer_params=None,
                metrics=copy.deepcopy(m.metrics),
                meta={**copy.deepcopy(m.meta or {}), **copy.deepcopy(item.meta or {})},
            )
            host = self.hosts.get(item.site)
            if host is None:
                host = ScriptHost(self, item.site, item.site_index)
                if self.config.resident:
                    self.hosts[item.site] = host
            if item.task.name in (secagg_keys.TASK, swarm_site.TASK):
                result, sent = host.answer_system_task(replace(item.task, model=model))
                out.append((result, self.transport.snapshot(sent) if sent else None))
                continue
            model = host.filter_task(
                model, base, base is not None and self._encrypted, item.task.name
            )
            task = Task(item.task.name, model, item.task.task_id, item.task.job_id)
            self._settle()
            out.append(host.run(task))
            self._active = host
        return out

    def _script_copy(self, handle: Any, base: dict[str, Any]) -> dict[str, Any]:
        """The script's own copy of the global params: a copy-on-write mapping where the
        transport has one (the process backend: pages shared until written), else a clone."""
        private = getattr(self.transport, "private_copy", None)
        if private is not None and not self._encrypted:
            params = private(handle)
            if params is not None:
                return params
        return {k: v.clone() for k, v in base.items()}

    def _settle(self) -> None:
        """Let the script that ran last finish its code after send() before another starts."""
        if self._active is not None:
            self._active.settle()
            self._active = None

    def close(self, restore_cwd: bool = True) -> None:
        """Stop resident scripts and undo this worker's changes to the process (but for the
        working folder with ``restore_cwd=False``: a core replaced while another runs scripts
        must not move the process out of that one's site folder)."""
        self._settle()
        for host in self.hosts.values():
            host.stop()
        self.hosts.clear()
        self._model = None
        self._imports.close()
        if not restore_cwd:
            return
        try:
            os.chdir(self._cwd)
        except OSError:
            pass
