"""The admin API client: what ``fedctl submit/job/sites`` and ``PocEnv``/``ProdEnv`` call.

Every call authenticates with the admin kit's certificate; the server takes the admin's name,
organisation and role from it, never from a request field.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fedctl.codec import protocol
from fedctl.codec.protocol import (
    AdminRequest,
    Download,
    Follow,
    JobEvent,
    LogPiece,
    Logs,
    Reply,
    StreamEnd,
    Submit,
)
from fedctl.errors import FedctlError, NotFound, PermissionDenied, RecipeError, UsageError
from fedctl.runtime.bundle import make_bundle
from fedctl.transport import rpc

if TYPE_CHECKING:
    import grpc

    from fedctl.provision.kit import Kit


class ServerError(FedctlError):
    """The server refused or failed a request (its message says why)."""


def _raise_for(exc: grpc.RpcError, kit: Kit, address: str | None) -> None:
    import grpc

    from fedctl.transport import tls

    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.PERMISSION_DENIED:
        raise PermissionDenied(details) from None
    if code == grpc.StatusCode.NOT_FOUND:
        raise NotFound(details) from None
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        raise UsageError(details) from None
    if code == grpc.StatusCode.UNAVAILABLE:
        raise ServerError(tls.describe_rpc_error(exc, kit, address)) from None
    raise ServerError(details) from None


class AdminClient:
    """A connection to the server from an admin kit."""

    def __init__(self, kit: Kit | str | os.PathLike[str], address: str | None = None) -> None:
        from fedctl.transport import tls

        self.kit = kit if not isinstance(kit, str | os.PathLike) else tls.load_kit(kit)
        if self.kit.type != "admin":
            raise UsageError(
                f"{self.kit.root} is a {self.kit.type} kit; admin commands need an admin kit"
            )
        self.address = address
        self.channel = tls.secure_channel(self.kit, address, options=rpc.CHANNEL_OPTIONS)
        self.stubs = rpc.Stubs(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(
        self, op: str, job: str | None = None, after: int = 0, timeout: float = 30.0
    ) -> dict[str, Any]:
        import grpc

        try:
            raw = self.stubs.Admin(protocol.encode(AdminRequest(op, job, after)), timeout=timeout)
        except grpc.RpcError as exc:
            _raise_for(exc, self.kit, self.address)
        reply, _ = protocol.decode(raw, Reply)
        return reply.data

    # ------------------------------------------------------------------ jobs

    def submit(self, job: str | os.PathLike[str], seed: int = 0) -> dict[str, Any]:
        """Submit a job folder, or a recipe (file/folder) which is exported first."""
        import grpc

        from fedctl.recipe.jobfolder import JOB_SPEC

        with tempfile.TemporaryDirectory(prefix="fedctl-submit-") as tmp:
            job_dir = Path(job)
            if not (job_dir / JOB_SPEC).is_file():
                from fedctl.recipe.loader import load_recipe

                job_dir = load_recipe(job).recipe.export(Path(tmp) / "job")
            bundle = Path(tmp) / "bundle.zip"
            sha = make_bundle(job_dir, bundle)
            first = Submit(bundle.stat().st_size, sha, seed)
            try:
                raw = self.stubs.AdminUpload(rpc.file_frames(bundle, first), timeout=3600)
            except grpc.RpcError as exc:
                _raise_for(exc, self.kit, self.address)
        reply, _ = protocol.decode(raw, Reply)
        return reply.data["job"]

    def submit_recipe(self, recipe: Any, seed: int = 0) -> dict[str, Any]:
        """Submit a Recipe object (exported to a temporary job folder)."""
        with tempfile.TemporaryDirectory(prefix="fedctl-submit-") as tmp:
            job_dir = recipe.export(Path(tmp) / "job")
            return self.submit(job_dir, seed)

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._call("list")["jobs"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("status", job=job_id)["job"]

    def abort(self, job_id: str) -> dict[str, Any]:
        return self._call("abort", job=job_id, timeout=60)["job"]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return self._call("events", job=job_id, after=after)["events"]

    def sites(self) -> list[dict[str, Any]]:
        return self._call("sites")["sites"]

    def follow(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Events of a job as they happen, until it ends (the last item has ``t == "end"``)."""
        import grpc

        stream = self.stubs.AdminStream(protocol.encode(Follow(job_id, after)))
        try:
            for raw in stream:
                msg, _ = protocol.decode(raw, JobEvent, StreamEnd)
                if isinstance(msg, StreamEnd):
                    yield {"t": "end", "status": msg.state}
                    return
                yield {"t": "event", **msg.event}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                _raise_for(exc, self.kit, self.address)

    def logs(self, job_id: str, site: str | None = None, follow: bool = False) -> Iterator[bytes]:
        """The job's log (or a site's script output) in pieces; with ``follow``, until it ends."""
        import grpc

        stream = self.stubs.AdminStream(protocol.encode(Logs(job_id, site, follow)))
        try:
            for raw in stream:
                msg, payload = protocol.decode(raw, LogPiece, StreamEnd)
                if isinstance(msg, StreamEnd):
                    return
                yield payload
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                _raise_for(exc, self.kit, self.address)

    def download(self, job_id: str, out_dir: str | os.PathLike[str]) -> Path:
        """The job's result folder (models, metrics, logs, job.json) unpacked into ``out_dir``."""
        import grpc

        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"{out} already exists and is not empty")
        with tempfile.TemporaryDirectory(prefix="fedctl-download-") as tmp:
            zip_path = Path(tmp) / "result.zip"
            stream = self.stubs.AdminStream(protocol.encode(Download(job_id)))
            try:
                protocol.decode(next(stream), Download)
                rpc.receive_file(stream, zip_path, max_bytes=1 << 46)
            except grpc.RpcError as exc:
                _raise_for(exc, self.kit, self.address)
            staging = Path(tmp) / "out"
            _safe_unzip(zip_path, staging)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.rmdir()
            shutil.move(str(staging), out)
        return out


def _safe_unzip(zip_path: Path, dest: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                raise RecipeError(f"result archive has an unsafe path {info.filename!r}")
            if info.is_dir():
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
