"""The site-editable policy files in a kit's ``local/`` folder: templates and the rights model.

``local/`` is deliberately outside the kit's signature: a site owns its policy and may tighten
it at any time without breaking its kit. ``authorization.yaml`` maps each admin role (carried in
the admin's certificate) to rights:

* ``submit`` (bool): submit jobs;
* ``byoc`` (bool): run jobs that bring their own code;
* ``manage``, ``view``, ``download``: ``none`` | ``own`` | ``org`` | ``any`` — whose jobs the
  role may abort/delete, see (status, metrics, logs), and download results of.

The server checks at submission and each site checks again before deploying a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl._yaml import YAMLInputError, load_yaml
from fedctl.errors import ConfigError
from fedctl.provision.identity import ROLES, Identity

SCOPES: tuple[str, ...] = ("none", "own", "org", "any")
BOOL_RIGHTS: tuple[str, ...] = ("submit", "byoc")
SCOPED_RIGHTS: tuple[str, ...] = ("manage", "view", "download")
RIGHTS: tuple[str, ...] = BOOL_RIGHTS + SCOPED_RIGHTS

#: What a project gets unless a site edits its local/authorization.yaml.
DEFAULT_AUTHORIZATION: dict[str, dict[str, bool | str]] = {
    "project_admin": {
        "submit": True,
        "byoc": True,
        "manage": "any",
        "view": "any",
        "download": "any",
    },
    "org_admin": {
        "submit": False,
        "byoc": False,
        "manage": "org",
        "view": "any",
        "download": "org",
    },
    "lead": {"submit": True, "byoc": True, "manage": "own", "view": "any", "download": "own"},
    "member": {"submit": False, "byoc": False, "manage": "none", "view": "any", "download": "none"},
}


@dataclass(frozen=True)
class Rights:
    """What one role may do on one site."""

    submit: bool = False
    byoc: bool = False
    manage: str = "none"
    view: str = "none"
    download: str = "none"

    def allows(self, right: str, actor: Identity, owner: Identity | None = None) -> bool:
        """Whether ``actor`` may use ``right`` (on a job submitted by ``owner``, if scoped)."""
        if right in BOOL_RIGHTS:
            return bool(getattr(self, right))
        if right not in SCOPED_RIGHTS:
            raise ValueError(f"unknown right {right!r}")
        scope = getattr(self, right)
        if scope == "any":
            return True
        if scope == "none" or owner is None:
            return False
        if scope == "org":
            return actor.org == owner.org
        return actor.name.casefold() == owner.name.casefold()  # own


@dataclass(frozen=True)
class AuthorizationPolicy:
    """A parsed local/authorization.yaml; roles it does not list have no rights."""

    roles: Mapping[str, Rights]

    def rights(self, role: str | None) -> Rights:
        return self.roles.get(role or "", Rights())

    def allows(self, right: str, actor: Identity, owner: Identity | None = None) -> bool:
        """Whether the admin ``actor`` (by the role in its certificate) may use ``right``."""
        if actor.type != "admin":
            return False
        return self.rights(actor.role).allows(right, actor, owner)


def default_authorization() -> AuthorizationPolicy:
    """The policy written into new kits."""
    return parse_authorization(
        {"version": 1, "roles": DEFAULT_AUTHORIZATION}, source="default policy"
    )


def load_authorization(path: str | Path) -> AuthorizationPolicy:
    """Read and validate a local/authorization.yaml; errors name the file and key path.

    Read with :func:`fedctl._yaml.load_yaml`: anchors and aliases, deep nesting, duplicate keys
    and files over 1 MiB are refused.
    """
    return parse_authorization(read_policy_yaml(path), source=str(path))


def read_policy_yaml(path: str | Path) -> Any:
    """The data of one of a kit's ``local/*.yaml`` policy files, read safely (see
    :func:`fedctl._yaml.load_yaml`); :class:`ConfigError` naming the file and line if not."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        return load_yaml(raw, source=str(p)).data
    except YAMLInputError as exc:
        raise ConfigError(str(exc)) from None


def parse_authorization(data: Any, *, source: str = "authorization.yaml") -> AuthorizationPolicy:
    """Validate an authorization policy held in a dict."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}")

    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'version' and 'roles'")
    for k in data:
        if k not in ("version", "roles"):
            raise fail(str(k), "unknown key (expected one of: version, roles)")
    if data.get("version", 1) != 1:
        raise fail("version", f"unsupported version {data.get('version')!r} (this fedctl reads 1)")
    roles = data.get("roles") or {}
    if not isinstance(roles, Mapping):
        raise fail("roles", "must be a mapping of role to rights")
    parsed: dict[str, Rights] = {}
    for role, rights in roles.items():
        key = f"roles.{role}"
        if role not in ROLES:
            raise fail(key, f"unknown role (expected one of: {', '.join(ROLES)})")
        if not isinstance(rights, Mapping):
            raise fail(key, "must be a mapping of right to value")
        values: dict[str, Any] = {}
        for right, value in rights.items():
            if right in BOOL_RIGHTS:
                if not isinstance(value, bool):
                    raise fail(f"{key}.{right}", f"must be true or false, got {value!r}")
            elif right in SCOPED_RIGHTS:
                if value not in SCOPES:
                    raise fail(
                        f"{key}.{right}", f"must be one of {', '.join(SCOPES)}, got {value!r}"
                    )
            else:
                raise fail(
                    f"{key}.{right}", f"unknown right (expected one of: {', '.join(RIGHTS)})"
                )
            values[right] = value
        parsed[role] = Rights(**values)
    return AuthorizationPolicy(roles=parsed)


# --------------------------------------------------------------------------- templates


def authorization_yaml(participant: str, project: str) -> str:
    """The commented default local/authorization.yaml for a server or site kit."""
    rows = []
    for role in ROLES:
        r = DEFAULT_AUTHORIZATION[role]
        rows.append(
            f"  {role}:\n"
            f"    submit: {str(r['submit']).lower()}\n"
            f"    byoc: {str(r['byoc']).lower()}\n"
            f"    manage: {r['manage']}\n"
            f"    view: {r['view']}\n"
            f"    download: {r['download']}\n"
        )
    return (
        f"# Authorization policy of {participant} in project {project}.\n"
        "#\n"
        "# Who may do what here, by the role in the admin's certificate (project_admin,\n"
        "# org_admin, lead, member). The server checks these rights when a job is submitted and\n"
        "# every site checks them again before it deploys a job, so a site can refuse a job the\n"
        "# server accepted. This file is yours: local/ is not covered by the kit's signature.\n"
        "#\n"
        "# Rights:\n"
        "#   submit    true | false               submit jobs\n"
        "#   byoc      true | false               run jobs that bring their own code\n"
        "#   manage    none | own | org | any     abort or delete jobs (own = jobs the admin\n"
        "#                                        submitted, org = jobs of the admin's org)\n"
        "#   view      none | own | org | any     see jobs: status, metrics, logs\n"
        "#   download  none | own | org | any     download job results (models, metrics, logs)\n"
        "# A role left out has no rights at all.\n"
        "version: 1\n"
        "roles:\n" + "".join(rows)
    )


def privacy_yaml(participant: str) -> str:
    """The commented local/privacy.yaml template (no filters, no requirements: the site opts
    in). Read by the site agent (fedctl.privacy.policy); tests check that it and its examples,
    uncommented, are a valid policy."""
    return (
        f"# Privacy policy of site {participant} (docs/privacy.md). Read when the site starts:\n"
        "# an unknown filter or setting stops it with one line saying where.\n"
        "# This file is yours: local/ is not covered by the kit's signature.\n"
        "version: 1\n"
        "# Filters that run on this site, after the job's own, on everything it sends\n"
        "# (at: result_out, the default) or receives (at: task_in); a job cannot remove them.\n"
        "filters: []\n"
        "#  - name: exclude_vars          # these parameters never leave this site\n"
        '#    patterns: ["classifier.*"]\n'
        "#  - name: clip_update           # the update's L2 norm is at most max_norm\n"
        "#    max_norm: 1.0\n"
        "#  - name: gaussian_noise        # N(0, sigma^2) on every value sent\n"
        "#    sigma: 0.001\n"
        "# What a job must do for this site to take part; it refuses other jobs, with the reason.\n"
        "require: {}\n"
        "#  central_dp: true              # the job runs with central differential privacy\n"
        "#  max_epsilon: 8                # whose budget (target_epsilon) is at most 8\n"
        "#  min_clients: 3                # no aggregate of fewer than 3 sites\n"
        '#  exclude_vars: ["classifier.*"] # the job keeps these parameters on the sites\n'
        "#  secure_aggregation: true      # the server sees only the sum of the updates\n"
        "#  homomorphic_encryption: true  # ... or only ciphertexts of the updates\n"
    )


def resources_yaml(participant: str, resources: Mapping[str, Any], *, server: bool) -> str:
    """The local/resources.yaml template, seeded from the project's ``resources`` entry."""
    default_jobs = 4 if server else 1
    jobs = resources.get("max_concurrent_jobs", default_jobs)
    text = (
        f"# Resources {participant} offers to jobs. Edit to match the machine;\n"
        "# local/ is not covered by the kit's signature.\n"
        "version: 1\n"
        f"# How many jobs may run here at once.\n"
        f"max_concurrent_jobs: {jobs}\n"
    )
    if not server:
        if "gpus" in resources:
            gpus = ", ".join(str(g) for g in resources["gpus"])
            text += (
                "# GPU indices jobs may use (CUDA_VISIBLE_DEVICES); [] = CPU only.\n"
                f"gpus: [{gpus}]\n"
            )
        else:
            text += (
                "# GPU indices jobs may use (CUDA_VISIBLE_DEVICES); [] = CPU only; leave out to\n"
                "# let jobs see every GPU.\n"
                "# gpus: [0, 1]\n"
            )
    return text
