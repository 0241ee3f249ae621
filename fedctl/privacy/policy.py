"""A site's privacy policy (``local/privacy.yaml`` of its kit, or ``SimEnv(site_privacy=…)``).

::

    version: 1
    filters:                   # always run on this site, after the job's own, in this order
      - name: exclude_vars
        patterns: ["head.*"]
      - name: clip_update
        max_norm: 1.0          # at result_out unless `at:` says otherwise
    require:                   # what a job must do for this site to take part
      central_dp: true         # the job runs with central DP ...
      max_epsilon: 8           # ... whose budget (target_epsilon) is at most 8
      min_clients: 3           # no aggregate of fewer than 3 sites
      exclude_vars: ["head.*"] # the job itself keeps these parameters on the sites
      secure_aggregation: true # the server sees only the sum of the updates
      homomorphic_encryption: true # ... or only ciphertexts of the updates

A job cannot remove a site's filters: they run on everything the site sends, whatever the job
asks for. A job that does not meet the requirements is refused by the site, with the reason,
as an authorization refusal is. A policy that names an unknown filter, an unknown setting or a
bad value is refused when the site starts, with one line naming the file, the key and the
problem.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl._yaml import YAMLInputError, load_yaml
from fedctl.errors import ConfigError
from fedctl.privacy.dp import CentralDP, DPError
from fedctl.privacy.filters import FilterChain, FilterError

REQUIREMENTS = (
    "central_dp",
    "max_epsilon",
    "min_clients",
    "exclude_vars",
    "secure_aggregation",
    "homomorphic_encryption",
)


@dataclass(frozen=True)
class PrivacyPolicy:
    """A site's own filters and what it requires of jobs."""

    filters: FilterChain = field(default_factory=FilterChain)
    require: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: Any, where: str = "privacy policy") -> PrivacyPolicy:
        """Validate a parsed policy (ConfigError naming ``where`` and the key)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'filters' and 'require'")
        legacy = {k: data[k] for k in ("outgoing", "incoming") if k in data}
        if any(legacy.values()):
            raise ConfigError(
                f"{where}: {'/'.join(legacy)} come from an old template whose filters never ran; "
                "write them as 'filters:' (docs/privacy.md)"
            )
        data = {k: v for k, v in data.items() if k not in legacy}  # the old, empty template
        unknown = sorted(set(data) - {"version", "filters", "require"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (keys: version, filters, require)"
            )
        if data.get("version", 1) != 1:
            raise ConfigError(f"{where}: version must be 1, got {data.get('version')!r}")
        try:
            chain = FilterChain.from_specs(data.get("filters") or [], f"{where}: filters")
        except FilterError as exc:
            raise ConfigError(str(exc)) from None
        for placed in chain.placed:
            if placed.point not in ("task_in", "result_out"):
                raise ConfigError(
                    f"{where}: filters: {placed.filter.name} at {placed.point!r}: a site's "
                    "filters run where the site is (task_in, result_out)"
                )
        require = dict(data.get("require") or {})
        _check_requirements(require, f"{where}: require")
        return cls(chain, require)

    def check_job(
        self, args: Mapping[str, Any], num_sites: int, kind: str | None = None
    ) -> str | None:
        """Why this site refuses a job of recipe ``kind`` with arguments ``args`` (None: it
        takes part)."""
        if kind == "flower" and self.filters:
            return (
                "its privacy policy adds filters, which cannot run on a Flower app's messages "
                "(the app's own mods must do that)"
            )
        need = self.require
        dp = args.get("central_dp")
        if need.get("central_dp") and dp is None:
            return "its privacy policy requires central DP (central_dp) and the job has none"
        if "max_epsilon" in need:
            if dp is None:
                return (
                    f"its privacy policy allows at most ε = {need['max_epsilon']} and the job "
                    "has no central DP"
                )
            target = dp.get("target_epsilon")
            limit = float(need["max_epsilon"])
            if target is None or target > limit:
                projected = _projected_epsilon(dp, args, num_sites)
                if target is not None or projected > limit:
                    shown = target if target is not None else f"{projected:.3g} (projected)"
                    return (
                        f"its privacy policy allows at most ε = {limit:g}; the job's budget is "
                        f"{shown}"
                    )
        if "min_clients" in need and int(args.get("min_clients", 0)) < int(need["min_clients"]):
            return (
                f"its privacy policy requires min_clients ≥ {need['min_clients']}; the job has "
                f"{args.get('min_clients')}"
            )
        if need.get("secure_aggregation") and not args.get("secure_aggregation"):
            return (
                "its privacy policy requires secure aggregation (secure_aggregation) and the job "
                "has none"
            )
        if need.get("homomorphic_encryption") and not args.get("homomorphic_encryption"):
            return (
                "its privacy policy requires homomorphic encryption (homomorphic_encryption) "
                "and the job has none"
            )
        required = list(need.get("exclude_vars") or [])
        if required:
            excluded = FilterChain.from_specs(args.get("privacy")).excluded_patterns()
            missing = [p for p in required if not _covered(p, excluded)]
            if missing:
                return (
                    f"its privacy policy requires the job to exclude {missing} "
                    "(an exclude_vars filter at result_out)"
                )
        return None


def _covered(pattern: str, excluded: list[str]) -> bool:
    return any(p == pattern or fnmatch.fnmatchcase(pattern, p) for p in excluded)


def _projected_epsilon(dp: Mapping[str, Any], args: Mapping[str, Any], num_sites: int) -> float:
    """ε the job would reach over all its rounds if every round ran."""
    from fedctl.privacy.dp import epsilon
    from fedctl.sampling import sample_count

    config = CentralDP.from_spec(dict(dp))
    assert config is not None
    sampled = sample_count(args.get("sample_clients"), num_sites, int(args.get("min_clients", 1)))
    return epsilon(config, int(args.get("num_rounds", 1)), sampled, num_sites)


def _check_requirements(require: dict[str, Any], where: str) -> None:
    unknown = sorted(set(require) - set(REQUIREMENTS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown requirement {unknown[0]!r} ({', '.join(REQUIREMENTS)})"
        )
    for flag in ("central_dp", "secure_aggregation", "homomorphic_encryption"):
        if flag in require and not isinstance(require[flag], bool):
            raise ConfigError(f"{where}.{flag}: must be true or false")
    if "max_epsilon" in require:
        v = require["max_epsilon"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}.max_epsilon: must be a number > 0, got {v!r}")
    if "min_clients" in require:
        v = require["min_clients"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.min_clients: must be an integer ≥ 1, got {v!r}")
    if "exclude_vars" in require:
        v = require["exclude_vars"]
        if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
            raise ConfigError(f"{where}.exclude_vars: must be a list of name patterns")


def load_policy(path: str | os.PathLike[str]) -> PrivacyPolicy:
    """A site's ``local/privacy.yaml`` (an absent file: no filters, no requirements)."""
    path = Path(path)
    if not path.exists():
        return PrivacyPolicy()
    try:
        doc = load_yaml(path.read_bytes(), source=str(path))
    except YAMLInputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return PrivacyPolicy.from_data(doc.data, str(path))
    except DPError as exc:
        raise ConfigError(f"{path}: {exc}") from None
