"""project.yml as Python: the dataclasses, POC's in-code project, and reading project.yml.

A project is one server, any number of sites and admins, and a few CA settings. Validation
(:mod:`fedctl.provision.schema`) reports the first problem as one line naming the file, line,
key path and what is wrong, e.g.
``project.yml:14: participants[3].name: duplicate name 'site-2' (first used at participants[1])``.
The same checks run whether the project comes from YAML (:func:`load_project`), from a dict
(:meth:`Project.from_dict`) or is built from the dataclasses in code. YAML is read with
:func:`fedctl._yaml.load_yaml`: anchors and aliases, deep nesting and duplicate keys are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl._yaml import YAMLInputError, dump_yaml, load_yaml
from fedctl.errors import NotFound
from fedctl.provision.identity import ROLES, Identity
from fedctl.provision.schema import (
    API_VERSION,
    DEFAULT_CA_VALID_DAYS,
    DEFAULT_CERT_VALID_DAYS,
    DEFAULT_KEY_TYPE,
    DEFAULT_PORT,
    KEY_TYPES,
    MAX_PROJECT_FILE_BYTES,
    MAX_VALID_DAYS,
    ProjectError,
    Validator,
    is_ip,
)

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Server:
    """The one server: ``name`` is the DNS name everyone connects to (and its certificate CN)."""

    name: str
    host_names: tuple[str, ...] = ()
    port: int = DEFAULT_PORT
    org: str | None = None
    listen_host: str = "0.0.0.0"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.host_names:
            d["host_names"] = list(self.host_names)
        d["port"] = self.port
        if self.org is not None:
            d["org"] = self.org
        if self.listen_host != "0.0.0.0":
            d["listen_host"] = self.listen_host
        return d


@dataclass(frozen=True)
class Site:
    """A data-holding participant that runs a client from its kit."""

    name: str
    org: str
    resources: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    type = "site"
    role = None

    @property
    def identity(self) -> Identity:
        return Identity(name=self.name, org=self.org, type="site")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "site", "name": self.name, "org": self.org}
        if self.resources:
            d["resources"] = dict(self.resources)
        if self.labels:
            d["labels"] = dict(self.labels)
        return d


@dataclass(frozen=True)
class Admin:
    """A person (named by e-mail) who submits and manages jobs with the rights of ``role``."""

    name: str
    org: str
    role: str

    type = "admin"

    @property
    def identity(self) -> Identity:
        return Identity(name=self.name, org=self.org, type="admin", role=self.role)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "admin", "name": self.name, "org": self.org, "role": self.role}


Participant = Site | Admin


@dataclass(frozen=True)
class Project:
    """A validated project: build it directly, with :meth:`from_dict` or :func:`load_project`."""

    name: str
    server: Server
    participants: tuple[Participant, ...] = ()
    description: str = ""
    ca_valid_days: int = DEFAULT_CA_VALID_DAYS
    cert_valid_days: int = DEFAULT_CERT_VALID_DAYS
    key_type: str = DEFAULT_KEY_TYPE
    api_version: int = API_VERSION
    #: CKKS parameters of the project's homomorphic-encryption context, or None for none
    homomorphic_encryption: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.participants, tuple):
            object.__setattr__(self, "participants", tuple(self.participants))
        if not isinstance(self.server, Server):
            raise ProjectError(f"must be a Server, got {type(self.server).__name__}", key="server")
        for i, p in enumerate(self.participants):
            if not isinstance(p, Site | Admin):
                raise ProjectError(
                    f"must be a Site or an Admin, got {type(p).__name__}", key=f"participants[{i}]"
                )
        if self.homomorphic_encryption is not None:
            he = Validator().homomorphic_encryption(self.homomorphic_encryption)
            object.__setattr__(self, "homomorphic_encryption", he)
        Validator().project(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> Project:
        """Validate a parsed project.yml (or an equivalent dict) and build the project."""
        return _build(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The project.yml form of this project (defaults written out)."""
        d: dict[str, Any] = {"api_version": self.api_version, "name": self.name}
        if self.description:
            d["description"] = self.description
        d["ca_valid_days"] = self.ca_valid_days
        d["cert_valid_days"] = self.cert_valid_days
        d["key_type"] = self.key_type
        d["server"] = self.server.to_dict()
        d["participants"] = [p.to_dict() for p in self.participants]
        if self.homomorphic_encryption is not None:
            d["homomorphic_encryption"] = dict(self.homomorphic_encryption)
        return d

    def to_yaml(self) -> str:
        """The project.yml text (no YAML anchors or aliases, so :func:`load_project` reads it)."""
        return dump_yaml(self.to_dict())

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(p for p in self.participants if isinstance(p, Site))

    @property
    def admins(self) -> tuple[Admin, ...]:
        return tuple(p for p in self.participants if isinstance(p, Admin))

    @property
    def server_identity(self) -> Identity:
        """The server's identity; its org defaults to the project name."""
        return Identity(name=self.server.name, org=self.server.org or self.name, type="server")

    def participant(self, name: str) -> Participant | None:
        """The site or admin called ``name`` (case-insensitive), if any."""
        key = name.casefold()
        return next((p for p in self.participants if p.name.casefold() == key), None)

    def identities(self) -> list[Identity]:
        """Server first, then participants in file order."""
        return [self.server_identity] + [p.identity for p in self.participants]

    def with_participant(self, participant: Participant) -> Project:
        """A copy with one more participant (validated like the rest)."""
        from dataclasses import replace

        return replace(self, participants=(*self.participants, participant))


def poc_project(
    sites: int | Sequence[str] = 2,
    *,
    port: int = DEFAULT_PORT,
    name: str = "poc",
    org: str = "poc",
    admin_domain: str = "poc.local",
    homomorphic_encryption: Mapping[str, Any] | None = None,
) -> Project:
    """A localhost project for POC: server ``localhost`` (+127.0.0.1), N sites, an admin per role
    (and a CKKS context for jobs with homomorphic_encryption, given its parameters; {}: defaults).

    Admins are named ``<role>@<admin_domain>`` (e.g. ``project_admin@poc.local``); everyone is in
    ``org``; the server listens on 127.0.0.1 only.
    """
    names = [f"site-{i + 1}" for i in range(sites)] if isinstance(sites, int) else list(sites)
    participants: list[Participant] = [Site(name=n, org=org) for n in names]
    participants += [Admin(name=f"{r}@{admin_domain}", org=org, role=r) for r in ROLES]
    return Project(
        name=name,
        server=Server(
            name="localhost", host_names=("127.0.0.1",), port=port, org=org, listen_host="127.0.0.1"
        ),
        participants=tuple(participants),
        description="POC project on localhost",
        homomorphic_encryption=homomorphic_encryption,
    )


# --------------------------------------------------------------------------- loading YAML


def load_project(path: str | Path) -> Project:
    """Read and validate a project.yml; errors name the file, line and key path."""
    p = Path(path)
    source = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ProjectError("is a folder, expected a project.yml file", source=source) from None
    except OSError as exc:
        raise ProjectError(f"cannot read: {exc.strerror}", source=source) from None
    return _parse(raw, source)


def parse_project(text: str, *, source: str = "project.yml") -> Project:
    """Validate project YAML held in a string (see :func:`load_project`)."""
    return _parse(text, source)


def _parse(text: str | bytes, source: str) -> Project:
    try:
        doc = load_yaml(text, source=source, max_bytes=MAX_PROJECT_FILE_BYTES)
    except YAMLInputError as exc:
        raise ProjectError(exc.problem, key=exc.key, source=source, line=exc.line) from None
    return _build(doc.data, source=source, lines=doc.lines)


def _build(
    data: Any, *, source: str | None = None, lines: Mapping[str, int] | None = None
) -> Project:
    """Validate a parsed project and build the dataclasses."""
    d = Validator(source=source, lines=lines).project(data)
    server_d = d["server"]
    server = Server(
        name=server_d["name"],
        host_names=tuple(server_d.get("host_names") or ()),
        port=server_d.get("port", DEFAULT_PORT),
        org=server_d.get("org"),
        listen_host=server_d.get("listen_host", "0.0.0.0"),
    )
    participants: list[Participant] = []
    for p in d.get("participants") or ():
        if p["type"] == "site":
            labels = {k: _label_str(v) for k, v in (p.get("labels") or {}).items()}
            participants.append(
                Site(
                    name=p["name"],
                    org=p["org"],
                    resources=dict(p.get("resources") or {}),
                    labels=labels,
                )
            )
        else:
            participants.append(Admin(name=p["name"], org=p["org"], role=p["role"]))
    return Project(
        name=d["name"],
        server=server,
        participants=tuple(participants),
        description=d.get("description") or "",
        ca_valid_days=d.get("ca_valid_days", DEFAULT_CA_VALID_DAYS),
        cert_valid_days=d.get("cert_valid_days", DEFAULT_CERT_VALID_DAYS),
        key_type=d.get("key_type", DEFAULT_KEY_TYPE),
        api_version=d.get("api_version", API_VERSION),
        homomorphic_encryption=d.get("homomorphic_encryption"),
    )


def _label_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def validate_participant(participant: Participant) -> None:
    """Check one participant on its own; errors read ``cannot add site 'x': <problem>``."""
    d = participant.to_dict()
    try:
        Validator().participant(d, "p")
    except ProjectError as exc:
        field_ = (exc.key or "").removeprefix("p").lstrip(".")
        what = f"{field_} " if field_ else ""
        raise ProjectError(
            f"cannot add {d.get('type', 'participant')} {d.get('name')!r}: {what}{exc.problem}"
        ) from None


__all__ = [
    "API_VERSION",
    "DEFAULT_CA_VALID_DAYS",
    "DEFAULT_CERT_VALID_DAYS",
    "DEFAULT_KEY_TYPE",
    "DEFAULT_PORT",
    "KEY_TYPES",
    "MAX_PROJECT_FILE_BYTES",
    "MAX_VALID_DAYS",
    "Admin",
    "Participant",
    "Project",
    "ProjectError",
    "Server",
    "Site",
    "is_ip",
    "load_project",
    "parse_project",
    "poc_project",
    "validate_participant",
]
