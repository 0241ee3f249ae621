"""What every server RPC handler does first and last: who is calling, and which status to answer.

The peer's identity comes from its certificate only (never from a request field); a fedctl
error raised by a handler becomes the gRPC status that the client maps back to the same error
(bad input → INVALID_ARGUMENT, not allowed → PERMISSION_DENIED, unknown → NOT_FOUND, over a
limit → RESOURCE_EXHAUSTED, other refusals → FAILED_PRECONDITION).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from fedctl.codec.frames import FrameError
from fedctl.errors import CodecError, FedctlError, NotFound, PermissionDenied, RecipeError

if TYPE_CHECKING:
    from fedctl.provision.identity import Identity
    from fedctl.runtime.audit import AuditLog


class LimitExceeded(FedctlError):
    """A request asks for more than the server allows (answered RESOURCE_EXHAUSTED)."""


def abort(context: Any, code: str, message: str) -> NoReturn:
    """End the RPC with gRPC status ``code`` (a StatusCode name) and ``message``."""
    import grpc

    context.abort(getattr(grpc.StatusCode, code), message)
    raise AssertionError("context.abort returned")  # pragma: no cover - it always raises


def who(context: Any, kind: str, audit: AuditLog) -> Identity:
    """The caller's identity from its certificate; it must be a ``kind`` (site or admin)."""
    from fedctl.transport import tls

    try:
        ident = tls.peer_identity(context)
    except PermissionDenied as exc:
        audit.record("identity_rejected", None, peer=context.peer(), reason=str(exc))
        abort(context, "UNAUTHENTICATED", str(exc))
    if ident.type != kind:
        reason = f"{ident.name} holds a {ident.type} certificate; this call needs a {kind}"
        audit.record("identity_rejected", ident.name, peer=context.peer(), reason=reason)
        abort(context, "PERMISSION_DENIED", reason)
    return ident


@contextlib.contextmanager
def as_status(context: Any, prefix: str = "") -> Iterator[None]:
    """Turn fedctl errors raised by a handler into the gRPC status the client maps back."""
    try:
        yield
    except (FrameError, StopIteration) as exc:
        abort(context, "INVALID_ARGUMENT", f"{prefix}{exc or 'the request ended early'}")
    except PermissionDenied as exc:
        abort(context, "PERMISSION_DENIED", str(exc))
    except NotFound as exc:
        abort(context, "NOT_FOUND", str(exc))
    except LimitExceeded as exc:
        abort(context, "RESOURCE_EXHAUSTED", str(exc))
    except (RecipeError, CodecError) as exc:  # bad job bundles and specs, bad data
        abort(context, "INVALID_ARGUMENT", f"{prefix}{exc}")
    except FedctlError as exc:
        abort(context, "FAILED_PRECONDITION", str(exc))
