"""The project's homomorphic-encryption context: kept in the workspace, placed in kits.

With a ``homomorphic_encryption`` section in project.yml, provisioning makes ONE CKKS context
for the project (:mod:`fedctl.privacy.he`) and keeps it in ``state/`` like the CA: every site
kit gets the secret context (``startup/he_context.secret``, mode 0600), the server kit only its
public form (``startup/he_context.public``), admin kits nothing. Both files are listed in the
signed manifest. Re-provisioning reuses the kept context while the section's parameters stay
the same; changed parameters make a new context, and every kit holding the old one is reported
stale until rebuilt (``--force``). Without the section nothing here runs, and TenSEAL is never
needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import atomic_write
from fedctl.errors import ConfigError
from fedctl.provision.kitspec import HE_PUBLIC_FILE, HE_SECRET_FILE, STARTUP, KitError, KitFile

if TYPE_CHECKING:
    from fedctl.privacy.he import ContextInfo

#: the kept context in WORKSPACE/state (secret 0600, public 0644)
STATE_SECRET, STATE_PUBLIC = HE_SECRET_FILE, HE_PUBLIC_FILE


@dataclass(frozen=True)
class HEMaterial:
    """The project's context, secret and public, and what its header says."""

    secret: bytes
    public: bytes
    info: ContextInfo

    def kit_file(self, participant_type: str) -> KitFile | None:
        """The context file a kit of this type carries (sites: secret; server: public)."""
        if participant_type == "site":
            return KitFile(f"{STARTUP}/{HE_SECRET_FILE}", self.secret, 0o600)
        if participant_type == "server":
            return KitFile(f"{STARTUP}/{HE_PUBLIC_FILE}", self.public)
        return None


def workspace_context(
    state_dir: Path, section: Mapping[str, Any] | None
) -> tuple[HEMaterial | None, str | None]:
    """The project's context (made and kept in ``state_dir`` if needed) and a warning when a
    new one replaced a kept one; ``(None, None)`` without a section."""
    if section is None:
        return None, None
    from fedctl.privacy.he import HEError, HEParams, context_info, generate_context, public_context

    params = HEParams.from_mapping(section)
    secret_path, public_path = state_dir / STATE_SECRET, state_dir / STATE_PUBLIC
    old: ContextInfo | None = None
    if secret_path.exists():
        try:
            secret, public = secret_path.read_bytes(), public_path.read_bytes()
            old, pub_info = context_info(secret), context_info(public)
        except (OSError, HEError) as exc:
            raise ConfigError(f"{state_dir}: the kept HE context is unusable ({exc})") from None
        if pub_info.key_id != old.key_id or pub_info.has_secret_key or not old.has_secret_key:
            raise ConfigError(f"{state_dir}: {STATE_PUBLIC} does not belong to {STATE_SECRET}")
        if old.params == params:
            return HEMaterial(secret, public, old), None
    secret = generate_context(
        params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.global_scale_bits
    )
    public = public_context(secret)
    atomic_write(secret_path, secret, mode=0o600, durable=True)
    atomic_write(public_path, public, durable=True)
    info = context_info(secret)
    warning = None
    if old is not None:
        warning = (
            f"homomorphic_encryption changed: a new CKKS context (key id {info.key_id}) replaces "
            f"key id {old.key_id}; the server and every site need the new one (rebuild their "
            "kits with --force; sites that keep their own key need a newly signed CSR)"
        )
    return HEMaterial(secret, public, info), warning


def kit_context_file(kit_dir: Path, participant_type: str) -> Path | None:
    """The context file a kit of this type would hold, if it holds one."""
    name = {"site": HE_SECRET_FILE, "server": HE_PUBLIC_FILE}.get(participant_type)
    path = kit_dir / STARTUP / name if name else None
    return path if path is not None and path.is_file() else None


def stale_reason(kit_dir: Path, participant_type: str, material: HEMaterial | None) -> str:
    """Why a kit's HE context does not match the project's ('' if it does)."""
    if participant_type not in ("site", "server"):
        return ""
    path = kit_context_file(kit_dir, participant_type)
    if material is None:
        return "homomorphic-encryption context (the project has none)" if path else ""
    if path is None:
        return "homomorphic-encryption context (missing)"
    from fedctl.privacy.he import HEError, context_info

    try:
        have = context_info(path.read_bytes()).key_id
    except (OSError, HEError):
        have = None
    return "" if have == material.info.key_id else "homomorphic-encryption context (another key)"


def check_kit_context(root: Path, participant_type: str) -> ContextInfo | None:
    """Check a kit's HE context file (right kind for the participant, private if secret, a
    readable header); KitError naming the file otherwise. None if the kit has none."""
    secret, public = root / STARTUP / HE_SECRET_FILE, root / STARTUP / HE_PUBLIC_FILE
    if secret.exists() and participant_type != "site":
        raise KitError(
            f"{secret}: a {participant_type} kit must never hold the HE secret key (only sites do)"
        )
    if public.exists() and participant_type != "server":
        raise KitError(f"{public}: only the server kit holds the public HE context")
    path = secret if secret.exists() else public if public.exists() else None
    if path is None:
        return None
    from fedctl.privacy.he import HEError, context_info

    if path == secret and os.name == "posix":
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KitError(
                f"{path}: the HE secret key is readable by others (mode {mode:04o}); run: "
                f"chmod 600 {path}"
            )
    try:
        info = context_info(path.read_bytes(), source=str(path))
    except HEError as exc:
        raise KitError(str(exc)) from None
    except OSError as exc:
        raise KitError(f"{path}: cannot read ({exc.strerror})") from None
    if info.has_secret_key != (path == secret):
        kind = "holds a secret key" if info.has_secret_key else "holds no secret key"
        raise KitError(f"{path}: {kind}, which its name says it should not")
    return info
