"""``simulate(recipe, env)``: export the job, start the pool, run the workflow, report a Run.

The simulator runs the *exported job folder*, not the recipe object: what works here is exactly
what a POC or production server would receive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedctl.errors import FedctlError, RecipeError, RunFailed, UsageError
from fedctl.jobs import ABORTED, FAILED, new_job_id
from fedctl.privacy.compression import job_chain
from fedctl.recipe.base import Recipe
from fedctl.recipe.jobfolder import load_job
from fedctl.recipe.registry import check_recipe, server_code_refusal
from fedctl.recipe.runner import run_workflow
from fedctl.sim.env import (
    LARGE_MODEL_CPUS,
    SITE_MODEL_COPIES,
    SimEnv,
    fit_workers,
    large_model_workers,
)
from fedctl.sim.pool import (
    START_TIMEOUT,
    LocalPool,
    Pool,
    RayPool,
    SimCommunicator,
    available_cpus,
)
from fedctl.sim.procs import ProcessPool, Zygote, transport_dir
from fedctl.sim.worker import WorkerConfig
from fedctl.tracking.display import Display
from fedctl.tracking.run import Run, finish_run
from fedctl.tracking.sinks import environment_choice
from fedctl.tracking.store import RunStore
from fedctl.workflows.base import WorkflowContext
from fedctl.workflows.clock import VirtualClock

log = logging.getLogger("fedctl.sim")


class _QuietRay(logging.Filter):
    """Drops Ray's start-up notice about token auth (docs/simulation.md explains it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """While Ray starts a single-machine cluster here: keep 127.0.0.1 as its node address.

    ``ray.init(_node_ip_address="127.0.0.1")`` treats a loopback address as "find the machine's
    own": it opens a socket towards 8.8.8.8 (and Google's IPv6 resolver) and, on a machine or
    network namespace without such a route, prints "Failed to determine local IP via external
    connectivity to: 8.8.8.8:53 ..." on every simulation before falling back to the host name.
    Ray's own single-machine setting (``ENABLE_RAY_CLUSTER`` off, what it uses on macOS and
    Windows) answers 127.0.0.1 without probing; it is switched off only around ``ray.init``.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - another Ray layout: keep its behaviour
        yield
        return
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # pragma: no cover
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ensure_ray(env: SimEnv, workers: int) -> bool:
    """Start Ray on 127.0.0.1 without a dashboard (or join ``env.ray_address``).

    Returns True when this call started it (and so must shut it down).
    """
    import ray

    if env.ray_address:
        _check_reachable(env.ray_address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if env.ray_address not in (None, "auto", current):
            raise RunFailed(
                f"this process is already connected to Ray at {current}; "
                f"it cannot also join {env.ray_address}"
            )
        return False
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _QuietRay) for f in handler.filters):
            handler.addFilter(_QuietRay())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common: dict[str, Any] = {
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "include_dashboard": False,
    }
    try:
        if env.ray_address:
            host = env.ray_address.rsplit(":", 1)[0]
            quiet = (
                _loopback_node_ip()
                if host in ("127.0.0.1", "localhost")
                else contextlib.nullcontext()
            )
            with quiet:  # a cluster on this machine: no probing for the machine's address
                ray.init(address=env.ray_address, **common)
        else:
            with _loopback_node_ip():
                ray.init(
                    num_cpus=max(workers, available_cpus()),
                    num_gpus=int(env.gpus or 0),
                    _node_ip_address="127.0.0.1",
                    # Release freed objects promptly: with the default (1 s) a fast stream of
                    # small results keeps ~1 s of dead objects resident in shared memory. No
                    # task events: Ray's daemons keep them for its dashboard, which fedctl does
                    # not start, and grew ~23 MiB per 1,000 rounds with them (bench/soak.py).
                    _system_config={
                        "free_objects_period_milliseconds": 20,
                        "task_events_report_interval_ms": 0,
                    },
                    **common,
                )
    except Exception as exc:
        hint = ""
        if env.ray_address and env.ray_address.split(":")[0] in ("127.0.0.1", "localhost"):
            # Ray replaces a loopback address by the machine's own before connecting.
            hint = " (for a cluster started on this machine, use ray_address='auto')"
        raise RunFailed(f"could not start Ray: {type(exc).__name__}: {exc}{hint}") from None
    return True


def sim_he_context(run_dir: Path) -> tuple[str, bytes]:
    """A CKKS context for one simulated run (the sites' secret one, 0600, in ``run_dir/he``:
    ``fedctl he decrypt`` reads the run's models with it); returns its path and the public
    context the simulated server aggregates with."""
    from fedctl._fs import atomic_write
    from fedctl.privacy.he import generate_context, public_context

    secret = generate_context()
    public = public_context(secret)
    folder = run_dir / "he"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(folder / "he_context.secret", secret, mode=0o600)
    atomic_write(folder / "he_context.public", public)
    return str(folder / "he_context.secret"), public


def _model_bytes(job: Any) -> int:
    """Bytes of the job's initial model (from its file's header; 0: no model file)."""
    from fedctl.codec.tensorfiles import LazyTensorFile

    model = getattr(job, "model", None)
    if isinstance(model, str | os.PathLike) and Path(model).is_file():
        return LazyTensorFile(model).nbytes
    return 0


def _sized_pool(workers: int, model_bytes: int) -> tuple[int, list[str]]:
    """The default pool's size for a model of ``model_bytes`` (at most ``workers``: see
    :class:`SimEnv`), and why it is smaller, for the run log."""
    gb, site_gb = model_bytes / 1e9, SITE_MODEL_COPIES * model_bytes / 1e9
    notes: list[str] = []

    def fewer(n: int, why: str) -> int:
        if n < workers:
            notes.append(f"{_workers(n)}, not {workers}: {why} (SimEnv(workers=...) chooses)")
        return min(n, workers)

    workers = fewer(
        large_model_workers(workers, model_bytes, available_cpus()),
        f"a {gb:.1f} GB model trains one site per {LARGE_MODEL_CPUS} CPUs, on their threads; "
        f"each site training at once would add about {site_gb:.1f} GB",
    )
    available = _available_memory()
    workers = fewer(
        fit_workers(workers, model_bytes, available),
        f"a site training a {gb:.1f} GB model needs about {site_gb:.1f} GB and "
        f"{available / 1e9:.1f} GB is available",
    )
    return workers, notes


def _workers(n: int) -> str:
    return f"{n} {'worker' if n == 1 else 'workers'}"


def _available_memory() -> int:
    """Bytes of memory available to a new run on this machine."""
    import psutil

    return int(psutil.virtual_memory().available)


def cluster_workers(env: SimEnv, num_sites: int) -> int | None:
    """The pool's size on a cluster joined with ``ray_address`` and no ``workers``: one worker
    per CPU the cluster has, at most one per site (None: not such a run)."""
    if env.resolved_backend() != "ray" or not env.ray_address or env.workers is not None:
        return None
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(num_sites, cpus))


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a Ray cluster address does not answer."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise RunFailed(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _check_gpus(env: SimEnv) -> None:
    if env.gpus and not env.ray_address:
        import torch

        if torch.cuda.device_count() < env.gpus:
            raise UsageError(
                f"gpus={env.gpus} requested but {torch.cuda.device_count()} GPU(s) are visible"
            )


def simulate(recipe: Recipe, env: SimEnv) -> Run:
    """Run ``recipe`` in the simulator described by ``env``; always returns a Run with a real
    status (FINISHED, FAILED or ABORTED and why). Bad input raises a UsageError instead."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"expected a fedctl Recipe, got {type(recipe).__name__}")
    # what a server would refuse is refused here, with the server's message
    check_recipe(recipe)
    _check_gpus(env)
    try:
        environment_choice(os.environ)  # a bad FEDCTL_TRACKING: an error before anything runs
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if env.num_clients < recipe.min_clients:
        raise UsageError(
            f"{recipe.name} needs min_clients={recipe.min_clients} but the simulation has "
            f"{env.num_clients} site(s); use more clients (--clients)"
        )
    started = time.monotonic()
    job_id = new_job_id(recipe.name)
    run_dir = (env.workspace_path / job_id).resolve()
    try:
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the run folder {run_dir} in the workspace: {exc.strerror or exc}"
        ) from None
    backend = env.resolved_backend()
    # the process backend's zygote imports torch (about a second) while this process exports
    # the job (a large model's file: as long again) and prepares the run
    zygote = (
        Zygote(run_dir / "workers.log", transport_dir(run_dir)) if backend == "process" else None
    )
    try:
        try:
            job = _export_job(recipe, run_dir)
        except BaseException:
            # a job that cannot run leaves no run folder; its zygote, which has forked no worker,
            # is killed rather than waited for (and closed below)
            if zygote is not None:
                zygote.proc.kill()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return _simulate(env, job, run_dir, job_id, started, backend, zygote)
    finally:
        if zygote is not None:
            zygote.close()  # already closed by the pool, unless the run failed before it


def _export_job(recipe: Recipe, run_dir: Path) -> Recipe:
    """The recipe exported to ``run_dir/job`` and loaded back, its client script compiled (a
    syntax error is a RecipeError naming the script's line). The folder is validated as a
    server would, but its files are not hashed again: this process has just written them and
    hashed them while writing (hashing them again: 0.24 s for a 400 MB model here)."""
    job = load_job(recipe.export(run_dir / "job"), verify=False)
    script = run_dir / "job" / "code" / job.train_script
    try:
        compile(script.read_text(), str(script), "exec")
    except SyntaxError as exc:
        raise RecipeError(f"{recipe.train_script}:{exc.lineno}: {exc.msg}") from None
    return job


def _simulate(
    env: SimEnv,
    job: Any,
    run_dir: Path,
    job_id: str,
    started: float,
    backend: str,
    zygote: Zygote | None,
) -> Run:
    """simulate() once the job is exported (and the zygote, if any, is starting)."""

    all_sites = env.site_names()
    policies = env.policies()
    refused = {
        site: why
        for site, policy in policies.items()
        if (why := policy.check_job(job.to_spec(), len(all_sites), job.kind)) is not None
    }
    sites = [s for s in all_sites if s not in refused]
    workers = env.resolved_workers()
    memory_notes: list[str] = []
    if env.workers is None and not env.ray_address and backend != "local":
        workers, memory_notes = _sized_pool(workers, _model_bytes(job))
    resident = env.resident if env.resident is not None else len(sites) <= workers
    store = RunStore(
        run_dir,
        key_metric=job.key_metric,
        key_metric_mode=job.key_metric_mode,
        checkpoint=env.checkpoint,
    )
    store.start_tracking(
        job.tracking,
        job_id=job_id,
        name=job.name,
        kind=job.kind,
        args=job.to_spec(),
        mode="simulation",
    )
    title = f"{job.name} · simulation · {len(sites)} sites on {_workers(workers)}"
    display = Display(title, job.num_rounds, env.display)
    store.log(f"{title}; job {job_id}; seed {env.seed}; {'resident' if resident else 'per-round'}")
    for site, why in refused.items():
        store.log(f"{site} refused the job: {why}")
    for note in memory_notes:
        store.log(note)
    warnings = []
    refusal = server_code_refusal(job)
    if refusal:
        # the simulator runs it (all on the user's machine); a production server would not
        warnings.append(f"a production server refuses this job: {refusal}")
    config = WorkerConfig(
        job_id=job_id,
        code_dir=str(job.base_dir),
        train_script=job.train_script,
        train_args=job.train_args,
        run_dir=str(run_dir),
        seed=env.seed,
        num_sites=len(all_sites),
        resident=resident,
        threads=max(1, available_cpus() // workers),
        filters=list(job.privacy or []),
        site_filters={s: p.filters.specs() for s, p in policies.items()},
        compression=job.compression,
        secure=job.secure_aggregation is not None,
    )
    he_public = None
    if getattr(job, "homomorphic_encryption", None) is not None:
        config.he_context, he_public = sim_he_context(run_dir)
        store.log(f"homomorphic encryption: this run's CKKS context is in {run_dir / 'he'}")
    status, reason = FAILED, None
    ray_started = False
    pool: Pool | None = None
    timings: dict[str, float] = {}
    import torch

    driver_threads = torch.get_num_threads()
    if not env.ray_address:
        # The driver shares the CPUs with the local workers: more than one intra-op thread here
        # makes every small aggregation wait on a busy core (OpenMP barriers), not go faster.
        torch.set_num_threads(1)
    for message in warnings:
        event = {"event": "warning", "message": message, "time": time.time()}
        store.listener(event)
        display.listener(event)
    with display:
        try:
            if len(sites) < job.min_clients:
                parts = "; ".join(f"{s} refused: {why}" for s, why in refused.items())
                raise RunFailed(
                    f"the job needs {job.min_clients} sites but {len(sites)} take part ({parts})"
                )
            t0 = time.monotonic()
            if backend == "process":
                assert zygote is not None
                pool = ProcessPool(config, workers, zygote, START_TIMEOUT)
                store.log(f"{workers} worker processes (pids {', '.join(map(str, pool.pids))})")
            elif backend == "ray":
                ray_started = ensure_ray(env, workers)
                timings["ray_start_s"] = time.monotonic() - t0
                sized = cluster_workers(env, len(sites))
                if sized is not None and sized != workers:
                    workers = sized
                    if env.resident is None:
                        resident = config.resident = len(sites) <= workers
                    store.log(f"the cluster has room for {workers} workers")
                pool = RayPool(config, workers, env.gpus)
                nodes = len(set(pool.nodes))
                store.log(f"{workers} workers on {nodes} Ray {'node' if nodes == 1 else 'nodes'}")
            else:
                pool = LocalPool(config)
            timings["startup_s"] = time.monotonic() - t0
            clock = VirtualClock(env.speed_model(), env.seed)
            comm = SimCommunicator(pool, sites, resident, all_sites, clock)
            ctx = WorkflowContext(
                comm,
                job_id=job_id,
                seed=env.seed,
                store=store,
                listeners=[store.listener, display.listener],
                filters=job_chain(
                    job.privacy, job.compression, secure=job.secure_aggregation is not None
                ),
                he_public=he_public,
            )
            status, reason = run_workflow(job, ctx)
        except KeyboardInterrupt:  # while the pool starts
            status, reason = ABORTED, "interrupted by the user"
        except FedctlError as exc:  # Ray or the pool could not start
            status, reason = FAILED, str(exc)
        except Exception as exc:
            status, reason = FAILED, f"internal error: {type(exc).__name__}: {exc}"
            store.log(traceback.format_exc())
        finally:
            t1 = time.monotonic()
            if pool is not None:
                try:
                    pool.close()
                except Exception as exc:  # never hide the run's own outcome behind cleanup
                    store.log(f"worker pool did not stop cleanly: {exc}")
            if ray_started:
                import ray

                ray.shutdown()
            torch.set_num_threads(driver_threads)
            timings["shutdown_s"] = time.monotonic() - t1

    run = finish_run(
        store,
        job_id=job_id,
        name=job.name,
        mode="simulation",
        status=status,
        reason=reason,
        num_rounds=job.num_rounds,
        duration=time.monotonic() - started,
        extra={
            "num_clients": len(all_sites),
            **({"refused": refused} if refused else {}),
            "backend": backend,
            "workers": workers,
            **({"ray_nodes": len(set(pool.nodes))} if isinstance(pool, RayPool) else {}),
            "resident": resident,
            "seed": env.seed,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings,
        },
    )
    display.summary(status, reason, _summary_lines(run))
    return run


def _summary_lines(run: Run) -> list[str]:
    lines = [f"results:     {run.result_dir}"]
    if run.final_model:
        lines.append(f"final model: {run.final_model}")
    if run.best_model:
        lines.append(f"best model:  {run.best_model}")
    lines.append(f"metrics:     {Path(run.result_dir) / 'metrics' / 'global.jsonl'}")
    lines.append(f"log:         {Path(run.result_dir) / 'run.log'}")
    return lines
