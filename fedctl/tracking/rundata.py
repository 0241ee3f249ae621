"""Reading a run folder back: a simulation's, a server's, or a job downloaded from a server.

All three hold the same files (:mod:`fedctl.tracking.store`); a download adds ``job.json`` (the
server's view of the job). The recipe's arguments come from ``recipe.json`` (written at the
start of every run), else from the job folder a simulation exports (``job/fedctl-job.yaml``).

Rounds: what users read is counted from 1. The files number them from 0 or from 1 depending on
the fedctl version that wrote them; :func:`round_base` tells which from the rows themselves (a
round 0 only exists when they count from 0) and :meth:`RunData.round_of` is the one place a
row's round is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl.errors import NotFound, UsageError

#: files a folder must have one of to be a run folder
MARKERS = ("result.json", "metrics/global.jsonl", "run.log")
#: JSON files larger than this are not read (a run writes a few kB to a few MB)
MAX_JSON_FILE = 256 * 1024 * 1024


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def find_run(ref: str, workspace: Path) -> tuple[Path, str | None]:
    """The run folder ``ref`` names, and a note when it was picked from several.

    ``ref`` is a run folder; or a folder of run folders (a workspace such as ``fedctl-runs``:
    its newest run); or a job id, looked up in ``workspace``.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_run_folder(path):
            return path.resolve(), None
        runs = [p for p in path.iterdir() if is_run_folder(p)]
        if not runs:
            raise UsageError(f"{path} is not a run folder and holds none ({' or '.join(MARKERS)})")
        newest = max(runs, key=_activity)
        which = f"the newest of {len(runs)} runs" if len(runs) > 1 else "the only run"
        return newest.resolve(), f"{which} in {path}"
    if path.exists():
        raise UsageError(f"{path} is a file, not a run folder")
    candidate = workspace / ref
    job_id = "/" not in ref and "\\" not in ref and ref not in (".", "..")
    if job_id and is_run_folder(candidate):
        return candidate.resolve(), None
    if not job_id:  # a path: there is nothing else it could name
        raise NotFound(f"no run folder {ref!r}")
    raise NotFound(
        f"no run folder {ref!r} (nor {candidate}); for a POC or production job, download it "
        f"first: fedctl job download {ref} -o {candidate}"
    )


def _activity(run: Path) -> float:
    times = [(run / m).stat().st_mtime for m in MARKERS if (run / m).is_file()]
    return max(times, default=run.stat().st_mtime)


def _json_file(path: Path) -> Any:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_FILE:
        raise UsageError(f"{path} is larger than {MAX_JSON_FILE >> 20} MiB")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None


def _jsonl(path: Path, skipped: dict[str, int], name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped[name] = skipped.get(name, 0) + 1
    return rows


def round_base(*tables: list[dict[str, Any]]) -> int:
    """0 when the rows count rounds from 0 (a row of round 0 exists), else 1."""
    for rows in tables:
        for row in rows:
            r = row.get("round")
            if isinstance(r, int) and not isinstance(r, bool) and r == 0:
                return 0
    return 1


@dataclass
class RunData:
    """Everything a report shows, read from one run folder."""

    root: Path
    result: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    cross_site: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    base: int = 1

    def round_of(self, row: dict[str, Any]) -> int | None:
        """A row's round as users count it (from 1); None when it has none."""
        r = row.get("round")
        if isinstance(r, int) and not isinstance(r, bool):
            return r + 1 - self.base
        return None

    @property
    def name(self) -> str:
        return str(
            self.result.get("name")
            or self.job.get("name")
            or (self.recipe or {}).get("name")
            or self.root.name
        )

    @property
    def job_id(self) -> str:
        return str(self.result.get("job_id") or self.job.get("id") or self.root.name)


def load_run(root: Path) -> RunData:
    """Read the run folder ``root`` (UsageError with one line when it is not one)."""
    if not is_run_folder(root):
        raise UsageError(f"{root} is not a run folder (it has none of {', '.join(MARKERS)})")
    data = RunData(root=root)
    for name, attr in (("result.json", "result"), ("job.json", "job")):
        value = _json_file(root / name)
        if value is not None and not isinstance(value, dict):
            raise UsageError(f"{root / name}: expected a JSON object")
        setattr(data, attr, value or {})
    m = root / "metrics"
    data.rounds = _jsonl(m / "global.jsonl", data.skipped, "metrics/global.jsonl")
    data.sites = _jsonl(m / "sites.jsonl", data.skipped, "metrics/sites.jsonl")
    data.tracking = _jsonl(m / "tracking.jsonl", data.skipped, "metrics/tracking.jsonl")
    data.base = round_base(data.rounds, data.sites)
    data.recipe = _recipe(root)
    cross = _json_file(root / "cross_site_eval.json")
    data.cross_site = cross if isinstance(cross, dict) else None
    privacy = data.result.get("privacy")
    if not isinstance(privacy, dict):
        privacy = _json_file(root / "privacy.json")
    data.privacy = privacy if isinstance(privacy, dict) else None
    return data


def _recipe(root: Path) -> dict[str, Any] | None:
    recorded = _json_file(root / "recipe.json")
    if isinstance(recorded, dict) and isinstance(recorded.get("args"), dict):
        return recorded
    spec_path = root / "job" / "fedctl-job.yaml"
    if spec_path.is_file():
        from fedctl._yaml import YAMLInputError, load_yaml

        try:
            spec = load_yaml(spec_path.read_bytes(), source=str(spec_path), max_bytes=4 << 20).data
        except YAMLInputError as exc:
            raise UsageError(str(exc)) from None
        if isinstance(spec, dict) and isinstance(spec.get("args"), dict):
            return {"kind": spec.get("kind"), "name": spec.get("name"), "args": spec["args"]}
    return None
