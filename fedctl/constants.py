"""Hard limits and environment variable names, in one place.

Every input boundary checks against these (docs/runtime.md lists them with the reasons); every
``FEDCTL_*`` variable fedctl reads or sets is named here. Imports nothing from fedctl.
"""

from __future__ import annotations

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# ------------------------------------------------------------------ sizes

#: a submitted job bundle (code + initial model); the server and every site refuse larger ones
MAX_BUNDLE_BYTES = 8 * GiB
#: a job's code folder (data belongs on the sites, not in a job)
MAX_CODE_BYTES = 64 * MiB
#: one model file moved between server and site (a task's model, a site's result)
MAX_BLOB_BYTES = 64 * GiB

# ------------------------------------------------------------------ environment variables

#: how a client script is run: "poc" or "production" (set by the site agent); unset elsewhere
ENV_MODE = "FEDCTL_MODE"
#: the unix socket a client script uses to reach its site agent
ENV_AGENT_SOCKET = "FEDCTL_AGENT_SOCKET"
#: the one-time token a job process proves itself with to its server
ENV_JOB_TOKEN = "FEDCTL_JOB_TOKEN"
#: default admin kit for admin commands (`--kit`)
ENV_ADMIN_KIT = "FEDCTL_ADMIN_KIT"
#: default POC workspace (`--poc-workspace`)
ENV_POC_WORKSPACE = "FEDCTL_POC_WORKSPACE"
#: the metrics sinks of the process that writes run folders (simulator, server): "auto", "none"
#: or a comma list of "tensorboard", "mlflow" (docs/tracking.md)
ENV_TRACKING = "FEDCTL_TRACKING"
#: what a client script's process gets unless its environment already sets it (the simulator's
#: worker processes, a site's script): PyTorch backs each tensor of 2 MiB or more with huge pages
#: (``madvise(MADV_HUGEPAGE)``), which spares most page faults and TLB misses of a large model
#: (a run of bench case (c)'s 100M-parameter MLP takes up to 1.3x less time on our machine);
#: ``THP_MEM_ALLOC_ENABLE=0`` in the environment keeps PyTorch's default (docs/simulation.md)
SCRIPT_ENV_DEFAULTS: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"}

# ------------------------------------------------------------------ JSON and messages

#: nesting depth of any JSON value fedctl accepts (headers, meta, metrics, specs)
MAX_JSON_DEPTH = 32
#: size of any one JSON document fedctl parses (a model header, a job's meta, a state file)
MAX_JSON_BYTES = 16 * MiB
#: values in one JSON document (numbers, strings, lists, objects)
MAX_JSON_NODES = 1_000_000
#: JSON integers must lie in [-MAX_INT, MAX_INT] (a 64-bit signed range: counts, sizes, seeds)
MAX_INT = 2**63 - 1
#: a JSON string fedctl accepts (names, ids, paths are shorter: see fedctl.codec.protocol)
MAX_STRING = 1 * MiB

# ------------------------------------------------------------------ results

#: the largest aggregation weight a site may send (NUM_STEPS_CURRENT_ROUND, NUM_SAMPLES): far
#: above any real step or sample count, far below what could overflow a running sum
MAX_WEIGHT = 1e12

#: a site's result may be this many times the size of the model it was sent (optimizer state…)
RESULT_FACTOR = 4
#: ...and always at least this big (a result for a task that sent no model, say)
MIN_RESULT_LIMIT = 64 * MiB


def result_limit(asked: int | None, task_bytes: int) -> int:
    """The most bytes one result of a task may have: what the workflow asked (ciphertexts
    are larger than the model), else RESULT_FACTOR × the task's model; at least
    MIN_RESULT_LIMIT, at most MAX_BLOB_BYTES."""
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        limit = asked
    else:
        limit = RESULT_FACTOR * task_bytes
    return min(max(limit, MIN_RESULT_LIMIT), MAX_BLOB_BYTES)


# ------------------------------------------------------------------ tracking sinks

#: records waiting for the sinks (TensorBoard, MLflow); beyond this they are dropped (and the
#: run log says how many), so a stalled sink never holds training or the server's memory
SINK_QUEUE_ITEMS = 200_000
#: how long the end of a run waits for the sinks to write what is queued
SINK_CLOSE_TIMEOUT = 60.0
