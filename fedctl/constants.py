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
