"""project.yml's schema: its keys, limits and defaults, and the checks a project must pass.

The checks work on the plain-dict form of a project (parsed YAML, :meth:`Project.to_dict`), so
a project is validated the same way whether it comes from a file, a dict or the dataclasses of
:mod:`fedctl.provision.project`. The first problem raises :class:`ProjectError` naming the key
path, and the file and line when the dict came from YAML.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fedctl.errors import ConfigError
from fedctl.provision.identity import ROLES

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
    "homomorphic_encryption",
)
_SERVER_KEYS = ("name", "host_names", "port", "org", "listen_host")
_SITE_KEYS = ("type", "name", "org", "resources", "labels")
_ADMIN_KEYS = ("type", "name", "org", "role")
_RESOURCE_KEYS = ("max_concurrent_jobs", "gpus")
_HE_KEYS = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits")


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


class Validator:
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
        if "homomorphic_encryption" in d:
            self.homomorphic_encryption(d["homomorphic_encryption"])
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

    def homomorphic_encryption(self, value: Any) -> dict[str, Any]:
        """The section's CKKS parameters with defaults filled in (docs/he.md)."""
        key = "homomorphic_encryption"
        if not isinstance(value, Mapping):
            raise self.fail(
                key,
                f"must be a mapping of CKKS parameters ({{}} for the defaults), got "
                f"{_describe(value)}",
            )
        self.mapping(value, key, _HE_KEYS)
        from fedctl.privacy.he.params import HEConfigError, HEParams

        try:
            return HEParams.check(**dict(value)).to_dict()
        except HEConfigError as exc:
            raise self.fail(f"{key}.{exc.field}" if exc.field else key, exc.problem) from None
