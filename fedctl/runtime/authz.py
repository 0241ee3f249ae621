"""Who may do what on this server: the kit's ``local/authorization.yaml``, by certificate role.

Every admin call goes through :meth:`Authorizer.authorize`; a denial is one line naming who,
what and which job, and is written to the audit trail. The policy file is re-read when it
changes, so an operator's edit applies without a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.errors import PermissionDenied

if TYPE_CHECKING:
    from fedctl.provision.identity import Identity
    from fedctl.runtime import store as st
    from fedctl.runtime.serverstate import ServerState

_WHAT = {
    "submit": "submit jobs",
    "view": "see",
    "manage": "manage",
    "download": "download the results of",
    "sites": "list sites",
}


class Authorizer:
    """The server's authorization decisions (see the module docstring)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._policy: tuple[float, Any] | None = None

    def policy(self) -> Any:
        """The server's local/authorization.yaml (re-read when it changes; default if absent)."""
        from fedctl.provision.policy import default_authorization, load_authorization

        path = self.state.kit.local_dir / "authorization.yaml"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return default_authorization()
        if self._policy is None or self._policy[0] != mtime:
            self._policy = (mtime, load_authorization(path))
        return self._policy[1]

    def allowed(self, ident: Identity, action: str, rec: st.JobRecord | None = None) -> bool:
        """Whether ``ident`` may do ``action`` (on ``rec``) under the server's policy."""
        from fedctl.provision.identity import Identity as Id

        if ident.type != "admin":
            return False
        policy = self.policy()
        if action == "submit":
            return policy.allows("submit", ident) and policy.allows("byoc", ident)
        if action == "sites":
            return policy.rights(ident.role).view != "none"
        owner = None
        if rec is not None:
            owner = Id(rec.submitter, rec.submitter_org, "admin", rec.extra.get("submitter_role"))
        return policy.allows(action, ident, owner)

    def authorize(self, ident: Identity, action: str, rec: st.JobRecord | None = None) -> None:
        """Raise PermissionDenied (and audit it) unless ``ident`` may do ``action``."""
        if self.allowed(ident, action, rec):
            return
        target = f" job {rec.id} (submitted by {rec.submitter})" if rec is not None else ""
        what = _WHAT.get(action, action)
        reason = f"{ident.name} (role {ident.role}) may not {what}{target} on this server"
        self.state.audit.record(
            "access_denied", ident.name, action=action, job=rec.id if rec else None, reason=reason
        )
        raise PermissionDenied(reason)
