"""One job runner for every executor: run a job's workflow and say how it ended.

The simulator (``fedctl.sim.runner``) and a server's job process (``fedctl.runtime.jobproc``)
differ only in the communicator and the process layout underneath; both run the workflow
through :func:`run_workflow`, which maps every way a run can end to a final status and a
one-line reason, and both then write the run folder with :func:`~fedctl.tracking.run.finish_run`.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

from fedctl.errors import FedctlError, RunFailed
from fedctl.jobs import ABORTED, FAILED, FINISHED, JobStatus
from fedctl.workflows.base import JobAborted

if TYPE_CHECKING:
    from fedctl.recipe.base import Recipe
    from fedctl.workflows.base import WorkflowContext


def run_workflow(job: Recipe, ctx: WorkflowContext) -> tuple[JobStatus, str | None]:
    """Run ``job``'s workflow from its initial model on ``ctx``; (final status, reason).

    * the workflow returns: FINISHED;
    * the job is aborted (a user, Ctrl-C, or any failure once an abort was asked for): ABORTED;
    * a fedctl error (not enough results, a bad update policy, a hook that fails): FAILED with
      its message;
    * anything else is a bug: FAILED with "internal error: …", the traceback in the run log.
    """
    try:
        job.build_workflow().run(ctx, job.initial_params())
        return FINISHED, None
    except JobAborted as exc:
        return ABORTED, str(exc)
    except KeyboardInterrupt:
        return ABORTED, "interrupted by the user"
    except RunFailed as exc:
        if ctx.abort.is_set():
            return ABORTED, "job aborted"
        return FAILED, str(exc)
    except FedctlError as exc:
        return FAILED, str(exc)
    except Exception as exc:
        if ctx.store is not None:
            ctx.store.log(traceback.format_exc())
        return FAILED, f"internal error: {type(exc).__name__}: {exc}"
