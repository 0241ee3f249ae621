"""The fedctl wire protocol: every message kind, who sends it to whom, and its fields.

Four conversations carry fedctl's control messages, each as :mod:`~fedctl.codec.frames` whose
JSON header names the kind in ``t``:

====================  ===========================================  ==============================
conversation          between                                      carried by
====================  ===========================================  ==============================
``SESSION``           a site agent and the server                  the ``Session`` gRPC stream
``TRANSFER``          a site or an admin and the server            ``Fetch``/``Push``/``Admin*``
``ADMIN``             an admin and the server                      ``Admin``/``AdminStream`` RPCs
``JOB``               the server and a job's own process           a private unix socket
``SCRIPT``            a site agent and the client script it runs   a private unix socket
====================  ===========================================  ==============================

Each kind is a frozen dataclass below: its fields are its typed shape, ``KIND`` its ``t`` value,
``DIRECTION`` who sends it. :func:`decode` checks a received header against the kinds the
receiver expects (unknown or extra fields, a wrong type, a string or list over its limit, an
integer outside 64 bits, JSON nested too deep: one :class:`~fedctl.codec.frames.FrameError`
line), so handlers work on validated objects and never on raw dicts. Session messages that must
arrive exactly once (``Numbered``) carry a ``seq`` set by
:class:`~fedctl.transport.reliable.ReliableLink`. Models never travel in these messages: a
``header`` field holds a model's JSON header (validated again by
:func:`~fedctl.codec.model.join_model`), its tensors move as files.

This module is the whole catalogue, every message of every conversation, on purpose in one
place (so it is longer than fedctl's other modules); the machinery is in
:mod:`fedctl.codec.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedctl.codec import frames
from fedctl.codec.messages import (
    Message,
    Name,
    Numbered,
    Obj,
    Shape,
    Text,
    decode,
    encode,
    kind,
    kinds,
    parse,
    recv,
    send,
)

__all__ = ["Message", "Numbered", "Shape", "decode", "encode", "kinds", "parse", "recv", "send"]

SESSION, TRANSFER, ADMIN, JOB, SCRIPT = "session", "transfer", "admin", "job", "script"


# ============================================================================ shared parts


@dataclass(frozen=True)
class BlobInfo(Shape):
    """A file the receiver may fetch or was sent: its id, size and SHA-256."""

    id: Name
    size: int
    sha256: Name


@dataclass(frozen=True)
class FileInfo(Shape):
    """Size and SHA-256 of a file a job process wrote (its name is sent beside it)."""

    size: int
    sha256: Name


@dataclass(frozen=True)
class Submitter(Shape):
    """Who submitted a job, as the server's certificate check saw them."""

    name: Name
    org: Name
    role: Name | None


# ============================================================================ SESSION
# A site agent's Session stream. Unnumbered: hello/welcome open the stream; heartbeat and ack
# keep it alive. Everything else is Numbered.

S2V, V2S, BOTH = "site → server", "server → site", "both ways"


@kind("hello", SESSION, S2V)
@dataclass(frozen=True)
class SiteHello(Message):
    """First frame of a session: the agent's incarnation (changes when it restarts) and the
    last numbered message it processed."""

    incarnation: Name
    recv_seq: int


@kind("welcome", SESSION, V2S)
@dataclass(frozen=True)
class Welcome(Message):
    """First answer: the server process's id (changes on restart), what it processed, and the
    heartbeat period."""

    server_id: Name
    recv_seq: int
    heartbeat: float


@kind("heartbeat", SESSION, BOTH)
@dataclass(frozen=True)
class Heartbeat(Message):
    """Keeps an idle stream alive."""


@kind("ack", SESSION, BOTH)
@dataclass(frozen=True)
class Ack(Message):
    """The sender has processed every numbered message up to ``seq``."""

    seq: int


@kind("deploy", SESSION, V2S)
@dataclass(frozen=True)
class Deploy(Numbered):
    """Run this job here: fetch its bundle, check it and the site's policy, report back."""

    job: Name
    name: Name
    bundle: BlobInfo
    site_index: int
    num_sites: int
    seed: int
    mode: Name
    submitter: Submitter


@kind("task", SESSION, V2S)
@dataclass(frozen=True)
class SiteTask(Numbered):
    """A task for the job's script; its model (if any) is fetched as ``blob``."""

    job: Name
    task_id: Name
    name: Name
    header: Obj
    blob: BlobInfo | None


@kind("cancel", SESSION, V2S)
@dataclass(frozen=True)
class CancelTask(Numbered):
    """The task's round closed: do not run it (or drop its result)."""

    job: Name
    task_id: Name


@kind("end_job", SESSION, V2S)
@dataclass(frozen=True)
class EndJob(Numbered):
    """The job ended with ``status``: stop its script."""

    job: Name
    status: Name


@kind("deployed", SESSION, S2V)
@dataclass(frozen=True)
class Deployed(Numbered):
    """The job is unpacked and accepted here; its script starts with the first task."""

    job: Name


@kind("refused", SESSION, S2V)
@dataclass(frozen=True)
class Refused(Numbered):
    """This site does not run the job (bad bundle, site policy), and why."""

    job: Name
    reason: Text


@kind("result", SESSION, S2V)
@dataclass(frozen=True)
class SiteResult(Numbered):
    """The script answered a task; its tensors were uploaded as ``blob`` (Push) first."""

    job: Name
    task_id: Name
    header: Obj
    blob: BlobInfo | None


@kind("task_failed", SESSION, S2V)
@dataclass(frozen=True)
class TaskFailed(Numbered):
    """The task failed here (the script raised or died), with its traceback."""

    job: Name
    task_id: Name
    error: Text
    traceback: Text | None = None


@kind("log", SESSION, S2V)
@dataclass(frozen=True)
class SiteLog(Numbered):
    """Lines the job's script printed."""

    job: Name
    lines: list[Text]


@kind("records", SESSION, S2V)
@dataclass(frozen=True)
class SiteRecords(Numbered):
    """Tracking records (``SummaryWriter``, ``log``) the script made."""

    job: Name
    records: list[Obj]


# ============================================================================ TRANSFER
# Files in chunks: a first frame saying what, ``chunk`` frames (payload only), an ``end`` frame.

Y2V, V2Y = "site or admin → server", "server → site or admin"


@kind("fetch", TRANSFER, "site → server")
@dataclass(frozen=True)
class Fetch(Message):
    """Download a blob of a job this site takes part in (``bundle`` or a task's model)."""

    job: Name
    blob: Name


@kind("push", TRANSFER, "site → server")
@dataclass(frozen=True)
class Push(Message):
    """Upload a task's result file of ``size`` bytes (chunks follow)."""

    job: Name
    task_id: Name
    size: int


@kind("submit", TRANSFER, "admin → server")
@dataclass(frozen=True)
class Submit(Message):
    """Upload a job bundle (chunks follow)."""

    size: int
    sha256: Name
    seed: int


@kind("chunk", TRANSFER, BOTH)
@dataclass(frozen=True)
class Chunk(Message):
    """The next piece of the file, in the frame's payload."""


@kind("end", TRANSFER, BOTH)
@dataclass(frozen=True)
class End(Message):
    """The file is complete: its size and SHA-256 (the receiver checks both)."""

    size: int
    sha256: Name


def decode_chunk(data: bytes | memoryview) -> tuple[Chunk | End, memoryview]:
    """A file transfer's next frame (a chunk, or the end), its payload a view (no copy)."""
    header, payload = frames.decode_view(data)
    return parse(header, Chunk, End), payload


@kind("ok", TRANSFER, "server → site")
@dataclass(frozen=True)
class Stored(Message):
    """An upload was stored as ``blob``, with the SHA-256 the server computed."""

    blob: Name
    sha256: Name


# ============================================================================ ADMIN

A2V, V2A = "admin → server", "server → admin"


@kind("admin", ADMIN, A2V)
@dataclass(frozen=True)
class AdminRequest(Message):
    """``op``: list, sites (no job), status, events, abort (a job)."""

    op: Name
    job: Name | None = None
    after: int = 0


@kind("reply", ADMIN, V2A)
@dataclass(frozen=True)
class Reply(Message):
    """The answer to a request: ``data`` is the op's result (jobs, job, sites, events)."""

    data: Obj


@kind("follow", ADMIN, A2V)
@dataclass(frozen=True)
class Follow(Message):
    """Stream a job's events after ``after`` until it ends."""

    job: Name
    after: int = 0


@kind("logs", ADMIN, A2V)
@dataclass(frozen=True)
class Logs(Message):
    """Stream the job's log, or one site's script output; with ``follow``, until it ends."""

    job: Name
    site: Name | None = None
    follow: bool = False


@kind("download", ADMIN, BOTH)
@dataclass(frozen=True)
class Download(Message):
    """Request (admin → server): a job's result folder as a zip. The server's first answer
    frame has the same kind, with the job's ``state``; transfer frames follow."""

    job: Name
    state: Name | None = None


@kind("event", ADMIN, V2A)
@dataclass(frozen=True)
class JobEvent(Message):
    """One of the job's events: ``seq`` (its order), ``time``, ``event`` (its name) and its
    fields, as the job's event log holds them."""

    event: Obj


@kind("log", ADMIN, V2A)
@dataclass(frozen=True)
class LogPiece(Message):
    """The next piece of a log, in the frame's payload."""


@kind("end", ADMIN, V2A)
@dataclass(frozen=True)
class StreamEnd(Message):
    """The stream is over; the job's state now."""

    state: Name


# ============================================================================ JOB
# The server and a job process: the process authenticates with its one-time token, then sends
# tasks and events; the server relays results and site changes.

J2V, V2J = "job → server", "server → job"


@kind("hello", JOB, J2V)
@dataclass(frozen=True)
class JobHello(Message):
    """First frame: which job this process runs, proven by the token it was started with."""

    job: Name
    token: Name


@kind("start", JOB, V2J)
@dataclass(frozen=True)
class JobStart(Message):
    """Run: on these sites (their order gives their index), with this seed."""

    sites: list[Name]
    seed: int
    offline_grace: float


@kind("error", JOB, V2J)
@dataclass(frozen=True)
class JobRefused(Message):
    """The server does not know this job or token."""

    message: Text


@kind("abort", JOB, V2J)
@dataclass(frozen=True)
class JobAbort(Message):
    """Stop the job now."""

    reason: Text


@kind("dispatch", JOB, J2V)
@dataclass(frozen=True)
class Dispatch(Message):
    """Send a task to ``targets``; its model (if any) is the file ``blob`` in the job's folder."""

    task_id: Name
    name: Name
    header: Obj
    targets: list[Name]
    blob: Name | None = None
    blob_info: FileInfo | None = None
    #: what each target's task adds to the header's meta (a protocol's per-site messages)
    site_meta: dict[str, Obj] | None = None
    #: the most bytes a result may have (None: the server's multiple of the model's size)
    result_limit: int | None = None


@kind("cancel", JOB, J2V)
@dataclass(frozen=True)
class JobCancel(Message):
    """The task's round closed: tell ``sites`` to drop it."""

    task_id: Name
    sites: list[Name]


@kind("event", JOB, J2V)
@dataclass(frozen=True)
class WorkflowEvent(Message):
    """A workflow event (round started, result, round completed, …) for the job's status."""

    event: Obj


@kind("finished", JOB, J2V)
@dataclass(frozen=True)
class Finished(Message):
    """The job ended: FINISHED, FAILED or ABORTED, and why."""

    status: Name
    reason: Text | None = None


@kind("sites", JOB, V2J)
@dataclass(frozen=True)
class SitesChanged(Message):
    """The job's sites now: deployed and online, refused (and why), offline."""

    ready: list[Name]
    refused: dict[str, str]
    offline: list[Name]


@kind("result", JOB, V2J)
@dataclass(frozen=True)
class JobResult(Message):
    """A site answered a task; its tensors are in the file ``blob`` (if any)."""

    site: Name
    task_id: Name
    header: Obj
    blob: Name | None = None


@kind("failed", JOB, V2J)
@dataclass(frozen=True)
class JobTaskFailed(Message):
    """A site's task failed (or can no longer come back), and why."""

    site: Name
    task_id: Name
    error: Text
    traceback: Text | None = None


@kind("records", JOB, V2J)
@dataclass(frozen=True)
class JobRecords(Message):
    """Tracking records a site's script made."""

    site: Name
    records: list[Obj]


@kind("site_restarted", JOB, V2J)
@dataclass(frozen=True)
class SiteRestarted(Message):
    """The site's agent restarted: the tasks it had are lost."""

    site: Name


# ============================================================================ SCRIPT
# A site agent and its client script (fedctl.client's AgentChannel).

C2A, A2C = "script → agent", "agent → script"


@kind("hello", SCRIPT, C2A)
@dataclass(frozen=True)
class ScriptHello(Message):
    """The script called ``fedctl.client.init()``."""

    pid: int


@kind("info", SCRIPT, A2C)
@dataclass(frozen=True)
class ScriptInfo(Message):
    """Who and where the script is."""

    site_name: Name
    site_index: int
    num_sites: int
    job_id: Name
    seed: int
    mode: Name
    workspace: Name


@kind("next", SCRIPT, C2A)
@dataclass(frozen=True)
class NextTask(Message):
    """The script waits for its next task (``is_running()``); ``released``, ``dropped``: model
    files it was given that it no longer maps (see :class:`fedctl.runtime.lent.LentFiles`)."""

    released: list[Name] | None = None
    dropped: list[Name] | None = None


@kind("task", SCRIPT, A2C)
@dataclass(frozen=True)
class ScriptTask(Message):
    """The next task; its model (if any) is the file ``path``; results go in ``result_dir``."""

    task_id: Name
    name: Name
    header: Obj
    result_dir: Name
    path: Name | None = None


@kind("end", SCRIPT, A2C)
@dataclass(frozen=True)
class ScriptEnd(Message):
    """The job is over for this site (``is_running()`` returns False)."""

    reason: Text = ""


@kind("result", SCRIPT, C2A)
@dataclass(frozen=True)
class ScriptResult(Message):
    """The script's answer; its tensors are in the file ``path`` (hashed while written)."""

    task_id: Name
    header: Obj
    path: Name | None = None
    sha256: Name | None = None
    released: list[Name] | None = None
    dropped: list[Name] | None = None


@kind("ok", SCRIPT, A2C)
@dataclass(frozen=True)
class ResultTaken(Message):
    """The agent has taken the result file: ``send()`` returns."""


@kind("records", SCRIPT, C2A)
@dataclass(frozen=True)
class ScriptRecords(Message):
    """Tracking records made since the last flush."""

    records: list[Obj]
