"""project.yml: the schema, its validation and the in-code form POC mode builds directly.

A project is one server, any number of sites and admins, and a few CA settings. Validation
reports the first problem as one line naming the file, line, key path and what is wrong, e.g.
``project.yml:14: participants[3].name: duplicate name 'site-2' (first used at participants[1])``.
The same checks run whether the project comes from YAML (:func:`load_project`), from a dict
(:meth:`Project.from_dict`) or is built from the dataclasses in code.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl.errors import ConfigError
from fedctl.provision.identity import ROLES, Identity

API_VERSION = 1
DEFAULT_PORT = 8002
DEFAULT_CA_VALID_DAYS = 3650
DEFAULT_CERT_VALID_DAYS = 365
MAX_VALID_DAYS = 36500
KEY_TYPES: tuple[str, ...] = ("ecdsa-p256", "ecdsa-p384", "rsa-3072")
DEFAULT_KEY_TYPE = "ecdsa-p256"
MAX_PROJECT_FILE_BYTES = 1 << 20

_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_ORG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._&-]{0,62}[A-Za-z0-9._&-])?")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")

_TOP_KEYS = (
    "api_version",
    "name",
    "description",
    "ca_valid_days",
    "cert_valid_days",
    "key_type",
    "server",
    "participants",
)
_SERVER_KEYS = ("name", "host_names", "port", "org", "listen_host")
_SITE_KEYS = ("type", "name", "org", "resources", "labels")
_ADMIN_KEYS = ("type", "name", "org", "role")
_RESOURCE_KEYS = ("max_concurrent_jobs", "gpus")


class ProjectError(ConfigError):
    """project.yml (or an in-code project) is not valid; the message names where and what."""

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        source: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem, self.key, self.source, self.line = problem, key, source, line
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(f"{where}{key}: {problem}" if key else f"{where}{problem}")


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
        _Validator().project(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> Project:
        """Validate a parsed project.yml (or an equivalent dict) and build the project."""
        return _Validator(source=source).build(data)

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
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

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
) -> Project:
    """A localhost project for POC: server ``localhost`` (+127.0.0.1), N sites, an admin per role.

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
    )


# --------------------------------------------------------------------------- loading YAML


def load_project(path: str | Path) -> Project:
    """Read and validate a project.yml; errors name the file, line and key path."""
    p = Path(path)
    source = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ProjectError("no such file", source=source) from None
    except IsADirectoryError:
        raise ProjectError("is a folder, expected a project.yml file", source=source) from None
    except OSError as exc:
        raise ProjectError(f"cannot read: {exc.strerror}", source=source) from None
    if len(raw) > MAX_PROJECT_FILE_BYTES:
        raise ProjectError(f"too large ({len(raw)} bytes, limit 1 MiB)", source=source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProjectError(f"not UTF-8 text (byte {exc.start})", source=source) from None
    return parse_project(text, source=source)


def parse_project(text: str, *, source: str = "project.yml") -> Project:
    """Validate project YAML held in a string (see :func:`load_project`)."""
    data, lines = _parse_yaml(text, source)
    return _Validator(source=source, lines=lines).build(data)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    import yaml

    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise ProjectError(
            "empty file (expected a project: see `fedctl provision --init`)", source=source
        )
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = f" (column {mark.column + 1})" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ProjectError(f"YAML syntax error: {problem}{col}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise ProjectError(f"YAML syntax error: {exc}", source=source) from None
    lines: dict[str, int] = {}
    if node is not None:
        _positions(node, "", lines, source)
    return data, lines


def _positions(node: Any, path: str, out: dict[str, int], source: str) -> None:
    """Record the line of every key path; refuse duplicate keys (YAML would keep the last)."""
    import yaml

    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise ProjectError(
                    f"duplicate key (first on line {seen[key]})",
                    key=child,
                    source=source,
                    line=line,
                )
            seen[key] = line
            out.setdefault(child, key_node.start_mark.line + 1)
            _positions(value_node, child, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, f"{path}[{i}]", out, source)


# --------------------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def is_ip(value: str) -> bool:
    """Whether ``value`` is an IPv4 or IPv6 address (host names may be either)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_dns_name(value: str) -> bool:
    if not value or len(value) > 253 or value.endswith("."):
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in value.split("."))


class _Validator:
    """Walks a project dict; the first problem raises :class:`ProjectError` with its key path."""

    def __init__(self, source: str | None = None, lines: Mapping[str, int] | None = None) -> None:
        self.source = source
        self.lines = lines or {}

    def fail(self, key: str, problem: str) -> ProjectError:
        line = None
        probe = key
        while probe:
            if probe in self.lines:
                line = self.lines[probe]
                break
            shorter = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", probe)
            probe = "" if shorter == probe else shorter
        if line is None and self.lines:
            line = self.lines.get("")
        return ProjectError(problem, key=key or None, source=self.source, line=line)

    # -- helpers
    def mapping(self, value: Any, key: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping, got {_describe(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                extra = f"did you mean {hint[0]!r}? " if hint else ""
                sub = f"{key}.{k}" if key else str(k)
                raise self.fail(sub, f"unknown key ({extra}expected one of: {', '.join(allowed)})")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_describe(value)}")
        return value

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer {lo}-{hi}, got {_describe(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be {lo}-{hi}, got {value}")
        return value

    def required(self, d: Mapping[str, Any], k: str, key: str, what: str = "") -> Any:
        if k not in d or d[k] is None:
            sub = f"{key}.{k}" if key else k
            raise self.fail(sub, f"missing{what}")
        return d[k]

    def org(self, value: Any, key: str) -> str:
        s = self.string(value, key)
        if not _ORG.fullmatch(s):
            raise self.fail(
                key,
                "must be 1-64 letters, digits, spaces, '.', '_', '&' or '-', starting with a "
                f"letter or digit, got {s!r}",
            )
        return s

    # -- sections
    def build(self, data: Any) -> Project:
        d = self.project(data)
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
        )

    def project(self, data: Any) -> Mapping[str, Any]:
        if data is None:
            raise self.fail("", "empty file (expected a project: see `fedctl provision --init`)")
        if not isinstance(data, Mapping):
            raise self.fail(
                "", f"the top level must be a mapping of project keys, got {_describe(data)}"
            )
        d = self.mapping(data, "", _TOP_KEYS)
        if "api_version" in d:
            v = d["api_version"]
            if isinstance(v, bool) or v != API_VERSION:
                raise self.fail(
                    "api_version",
                    f"unsupported version {_describe(v)} (this fedctl reads {API_VERSION})",
                )
        name = self.string(self.required(d, "name", "", " (the project's name)"), "name")
        if not _PROJECT_NAME.fullmatch(name):
            raise self.fail(
                "name",
                "must be 1-48 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                f"got {name!r}",
            )
        if d.get("description") is not None:
            self.string(d["description"], "description")
        ca_days = DEFAULT_CA_VALID_DAYS
        if "ca_valid_days" in d:
            ca_days = self.integer(d["ca_valid_days"], "ca_valid_days", 1, MAX_VALID_DAYS)
        if "cert_valid_days" in d:
            cert_days = self.integer(d["cert_valid_days"], "cert_valid_days", 1, MAX_VALID_DAYS)
            if cert_days > ca_days:
                raise self.fail(
                    "cert_valid_days",
                    f"must not exceed ca_valid_days ({ca_days}), got {cert_days}",
                )
        if "key_type" in d and d["key_type"] not in KEY_TYPES:
            raise self.fail(
                "key_type",
                f"must be one of {', '.join(KEY_TYPES)}, got {_describe(d['key_type'])}",
            )
        if "server" not in d or d["server"] is None:
            raise self.fail("server", "missing (every project has one server)")
        self.server(d["server"])
        names: dict[str, str] = {d["server"]["name"].casefold(): "server.name"}
        parts = d.get("participants")
        if parts is None:
            parts = []
        if not isinstance(parts, list | tuple):
            raise self.fail("participants", f"must be a list, got {_describe(parts)}")
        for i, p in enumerate(parts):
            key = f"participants[{i}]"
            pname = self.participant(p, key)
            first = names.get(pname.casefold())
            if first is not None:
                raise self.fail(f"{key}.name", f"duplicate name {pname!r} (first used at {first})")
            names[pname.casefold()] = f"{key}.name"
        return d

    def server(self, value: Any) -> None:
        s = self.mapping(value, "server", _SERVER_KEYS)
        name = self.string(
            self.required(s, "name", "server", " (the server's DNS name)"), "server.name"
        )
        if len(name) > 64 or not (is_ip(name) or _is_dns_name(name)):
            raise self.fail(
                "server.name",
                f"must be a DNS name or IP address of at most 64 characters, got {name!r}",
            )
        seen = {name.casefold(): "server.name"}
        hosts = s.get("host_names")
        if hosts is not None:
            if not isinstance(hosts, list | tuple):
                raise self.fail("server.host_names", f"must be a list, got {_describe(hosts)}")
            for i, h in enumerate(hosts):
                key = f"server.host_names[{i}]"
                h = self.string(h, key)
                if not (is_ip(h) or _is_dns_name(h)):
                    raise self.fail(key, f"must be a DNS name or IP address, got {h!r}")
                if h.casefold() in seen:
                    raise self.fail(key, f"duplicate host name {h!r} (also {seen[h.casefold()]})")
                seen[h.casefold()] = key
        if "port" in s:
            self.integer(s["port"], "server.port", 1, 65535)
        if s.get("org") is not None:
            self.org(s["org"], "server.org")
        if "listen_host" in s:
            lh = self.string(s["listen_host"], "server.listen_host")
            if not (is_ip(lh) or _is_dns_name(lh)):
                raise self.fail(
                    "server.listen_host", f"must be an IP address or host name, got {lh!r}"
                )

    def participant(self, value: Any, key: str) -> str:
        if not isinstance(value, Mapping):
            raise self.fail(
                key, f"must be a mapping with type, name and org, got {_describe(value)}"
            )
        ptype = self.required(value, "type", key, " (site or admin)")
        if ptype not in ("site", "admin"):
            hint = " (the server has its own 'server' section)" if ptype == "server" else ""
            raise self.fail(
                f"{key}.type", f"must be 'site' or 'admin', got {_describe(ptype)}{hint}"
            )
        allowed = _SITE_KEYS if ptype == "site" else _ADMIN_KEYS
        for k in value:
            if k not in allowed:
                if ptype == "site" and k == "role":
                    raise self.fail(f"{key}.role", "only admins have a role")
                if ptype == "admin" and k in ("resources", "labels"):
                    raise self.fail(f"{key}.{k}", "only sites have resources and labels")
        self.mapping(value, key, allowed)
        name = self.string(self.required(value, "name", key), f"{key}.name")
        if ptype == "site":
            if not _SITE_NAME.fullmatch(name):
                raise self.fail(
                    f"{key}.name",
                    "site names are 1-63 letters, digits, '.', '_' or '-', starting with a letter "
                    f"or digit, got {name!r}",
                )
        elif len(name) > 64 or not _EMAIL.fullmatch(name):
            raise self.fail(
                f"{key}.name",
                f"admins are named by e-mail address (at most 64 characters), got {name!r}",
            )
        self.org(self.required(value, "org", key), f"{key}.org")
        if ptype == "admin":
            role = self.required(value, "role", key, f" (one of {', '.join(ROLES)})")
            if role not in ROLES:
                raise self.fail(
                    f"{key}.role", f"must be one of {', '.join(ROLES)}, got {_describe(role)}"
                )
        else:
            if value.get("resources") is not None:
                self.resources(value["resources"], f"{key}.resources")
            if value.get("labels") is not None:
                labels = value["labels"]
                if not isinstance(labels, Mapping):
                    raise self.fail(f"{key}.labels", f"must be a mapping, got {_describe(labels)}")
                for lk, lv in labels.items():
                    if not isinstance(lk, str) or not _LABEL_KEY.fullmatch(lk):
                        raise self.fail(
                            f"{key}.labels",
                            f"label names are letters, digits, '.', '_', '/' or '-', got {lk!r}",
                        )
                    if isinstance(lv, Mapping | list | tuple) or lv is None:
                        raise self.fail(
                            f"{key}.labels.{lk}", f"must be a single value, got {_describe(lv)}"
                        )
        return name

    def resources(self, value: Any, key: str) -> None:
        r = self.mapping(value, key, _RESOURCE_KEYS)
        if "max_concurrent_jobs" in r:
            self.integer(r["max_concurrent_jobs"], f"{key}.max_concurrent_jobs", 1, 1024)
        if "gpus" in r:
            gpus = r["gpus"]
            if not isinstance(gpus, list | tuple):
                raise self.fail(
                    f"{key}.gpus", f"must be a list of GPU indices, got {_describe(gpus)}"
                )
            for i, g in enumerate(gpus):
                self.integer(g, f"{key}.gpus[{i}]", 0, 1023)


def _label_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def validate_participant(participant: Participant) -> None:
    """Check one participant on its own; errors read ``cannot add site 'x': <problem>``."""
    d = participant.to_dict()
    try:
        _Validator().participant(d, "p")
    except ProjectError as exc:
        field_ = (exc.key or "").removeprefix("p").lstrip(".")
        what = f"{field_} " if field_ else ""
        raise ProjectError(
            f"cannot add {d.get('type', 'participant')} {d.get('name')!r}: {what}{exc.problem}"
        ) from None
