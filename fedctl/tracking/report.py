"""``fedctl report``: one self-contained HTML page about a run (and PNGs of its charts).

Sections, always in this order and always present (a section with nothing to show says why):

1. summary — status and reason, rounds, duration, sites, best model, final metrics;
2. global metrics per round — one chart per metric of ``metrics/global.jsonl``;
3. per-site metrics — each metric the sites sent, one line per site (min/mean/max beyond
   :data:`MAX_SITE_LINES` sites), and the scalars their scripts recorded;
4. participation and failures — per round, the sites that answered, failed or were missing, and
   every failure's reason;
5. round durations and bytes moved — per round (bytes: see :mod:`fedctl.tracking.store`);
6. cross-site evaluation — the model × site matrix as a heatmap;
7. differential privacy — ε (and the clip) per round, and the accountant's summary;
8. recipe arguments.

The page has no script and loads nothing: charts are inline SVG (:mod:`fedctl.tracking.charts`),
every text from the run is escaped. It is written atomically, and PNGs into a folder that
appears whole, so a failed report leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from fedctl._fs import atomic_write
from fedctl.errors import UsageError
from fedctl.tracking.charts import (
    BarChart,
    Chart,
    Heatmap,
    LineChart,
    Series,
    fmt,
    png,
    slug,
    svg,
)
from fedctl.tracking.rundata import RunData, load_run

#: (id, title) of every section, in order
SECTIONS = [
    ("summary", "Summary"),
    ("global", "Global metrics per round"),
    ("sites", "Per-site metrics"),
    ("participation", "Participation and failures"),
    ("timing", "Round durations and bytes moved"),
    ("cross_site", "Cross-site evaluation"),
    ("privacy", "Differential privacy"),
    ("recipe", "Recipe arguments"),
]
#: beyond this many sites a per-site chart shows min, mean and max instead of one line each
MAX_SITE_LINES = 20
#: charts of script-recorded scalars shown (the rest are listed by name)
MAX_RECORD_CHARTS = 24
#: failures listed in the participation section
MAX_FAILURES = 200


@dataclass
class Section:
    id: str
    title: str
    parts: list[str | Chart] = field(default_factory=list)

    def add(self, part: str | Chart) -> None:
        self.parts.append(part)

    @property
    def charts(self) -> list[Chart]:
        return [p for p in self.parts if not isinstance(p, str)]


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    run: Path
    html: Path
    sections: list[str]
    charts: int
    pngs: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "html": str(self.html),
            "sections": self.sections,
            "charts": self.charts,
            "png": [str(p) for p in self.pngs],
        }


def _p(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


# ---------------------------------------------------------------------------- sections


def _summary(d: RunData) -> Section:
    sec = Section(*SECTIONS[0])
    r = d.result
    status = r.get("status") or d.job.get("state") or "not finished (no result.json)"
    reason = r.get("reason") or d.job.get("reason")
    num_rounds = (
        r.get("num_rounds")
        or d.job.get("num_rounds")
        or (d.recipe or {}).get("args", {}).get("num_rounds")
    )
    sites = d.job.get("sites") or r.get("sites") or sorted({str(x.get("site")) for x in d.sites})
    rows = [
        ["job", d.name],
        ["job id", d.job_id],
        ["mode", r.get("mode") or ("server (downloaded)" if d.job else "-")],
        ["status", status + (f": {reason}" if reason else "")],
        ["rounds completed", f"{len(d.rounds)} of {num_rounds or '?'}"],
        ["duration", _duration(r.get("duration"))],
        [
            "sites",
            f"{len(sites)}: {', '.join(map(str, sites[:20]))}" + (" …" if len(sites) > 20 else ""),
        ],
    ]
    if r.get("seed") is not None or d.job.get("seed") is not None:
        rows.append(["seed", r.get("seed", d.job.get("seed"))])
    best = r.get("best")
    if isinstance(best, dict) and best.get("metric"):
        rnd = best.get("round")
        shown = rnd + 1 - d.base if isinstance(rnd, int) else "?"
        rows.append(
            ["best model", f"{best['metric']} = {fmt(best.get('value', 0.0))} (round {shown})"]
        )
    sec.add(_table(["", ""], rows))
    final = d.rounds[-1].get("metrics") if d.rounds else None
    if isinstance(final, dict) and final:
        sec.add("<h3>Final global metrics</h3>")
        sec.add(
            _table(
                ["metric", "value"],
                [[k, fmt(v) if _num(v) is not None else v] for k, v in final.items()],
            )
        )
    for name, count in sorted(d.skipped.items()):
        sec.add(_note(f"{count} unreadable line(s) of {name} were skipped."))
    return sec


def _metric_names(rows: list[dict[str, Any]], key: str = "metrics") -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for k, v in (row.get(key) or {}).items():
            if _num(v) is not None:
                names[str(k)] = None
    return list(names)


def _global(d: RunData) -> Section:
    sec = Section(*SECTIONS[1])
    names = [n for n in _metric_names(d.rounds) if not n.startswith("dp_")]
    if not d.rounds:
        sec.add(_note("No round completed, so there are no global metrics."))
        return sec
    if not names:
        sec.add(_note("The sites sent no numeric metrics."))
        return sec
    sec.add(
        _p(
            "The weighted mean over the round's results (metrics from training describe the "
            "global model the sites received; eval_* and server_* the new one)."
        )
    )
    for name in names:
        pts = [
            (float(rnd), v)
            for row in d.rounds
            if (rnd := d.round_of(row)) is not None
            and (v := _num((row.get("metrics") or {}).get(name))) is not None
        ]
        sec.add(LineChart(name, "round", name, [Series("global", pts)]))
    return sec


def _per_site_series(points: dict[str, list[tuple[float, float]]]) -> tuple[list[Series], str]:
    if len(points) <= MAX_SITE_LINES:
        return [Series(site, sorted(pts)) for site, pts in sorted(points.items())], ""
    by_x: dict[float, list[float]] = defaultdict(list)
    for pts in points.values():
        for x, y in pts:
            by_x[x].append(y)
    xs = sorted(by_x)
    series = [
        Series("max", [(x, max(by_x[x])) for x in xs], color="#9c755f"),
        Series("mean", [(x, sum(by_x[x]) / len(by_x[x])) for x in xs], color="#4e79a7"),
        Series("min", [(x, min(by_x[x])) for x in xs], color="#bab0ac"),
    ]
    return series, f"{len(points)} sites: min, mean and max over the sites"


def _sites(d: RunData) -> Section:
    sec = Section(*SECTIONS[2])
    results = [r for r in d.sites if r.get("ok") and r.get("phase") in (None, "evaluate")]
    if not results and not d.tracking:
        sec.add(_note("No site result with metrics was recorded."))
        return sec
    names: dict[str, None] = {}
    for r in results:
        prefix = "eval_" if r.get("phase") == "evaluate" else ""
        for k, v in (r.get("metrics") or {}).items():
            if _num(v) is not None:
                names[prefix + str(k)] = None
    if names:
        sec.add(_p("What each site sent with its results (eval_*: evaluation tasks)."))
    for name in names:
        phase, key = ("evaluate", name[5:]) if name.startswith("eval_") else (None, name)
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in results:
            if r.get("phase") != phase or (rnd := d.round_of(r)) is None:
                continue
            v = _num((r.get("metrics") or {}).get(key))
            if v is not None:
                points[str(r.get("site"))].append((float(rnd), v))
        if not points:
            continue
        series, note = _per_site_series(points)
        sec.add(
            LineChart(f"{name} per site" + (f" ({note})" if note else ""), "round", name, series)
        )
    # what scripts recorded (SummaryWriter, flare.log): scalars by tag, one line per site
    tags: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    texts = 0
    for rec in d.tracking:
        if rec.get("kind") == "text":
            texts += 1
        if rec.get("kind") not in ("scalar", "metric"):
            continue
        step = _num(rec.get("step"))
        x = step if step is not None else d.round_of(rec)
        if x is None:
            continue
        values = rec.get("value")
        pairs = (
            [(f"{rec.get('tag')}/{k}", v) for k, v in values.items()]
            if rec.get("multi") and isinstance(values, dict)
            else [(str(rec.get("tag")), values)]
        )
        for tag, v in pairs:
            num = _num(v)
            if num is not None:
                tags[tag][str(rec.get("site"))].append((float(x), num))
    if tags:
        sec.add("<h3>Recorded by the scripts</h3>")
        sec.add(_p("SummaryWriter and flare.log scalars, by step (the round when none was given)."))
    for i, (tag, points) in enumerate(tags.items()):
        if i == MAX_RECORD_CHARTS:
            rest = list(tags)[MAX_RECORD_CHARTS:]
            sec.add(_note(f"{len(rest)} more tags, not drawn: {', '.join(rest[:50])}"))
            break
        series, note = _per_site_series(points)
        sec.add(LineChart(tag + (f" ({note})" if note else ""), "step", tag, series))
    if texts:
        sec.add(_note(f"{texts} text record(s) are in metrics/tracking.jsonl (and TensorBoard)."))
    return sec


def _participation(d: RunData) -> Section:
    sec = Section(*SECTIONS[3])
    cats, accepted, failed, missing = [], [], [], []
    for row in d.rounds:
        rnd = d.round_of(row)
        cats.append(str(rnd))
        accepted.append(float(row.get("accepted") or 0))
        failed.append(float(len(row.get("failed") or [])))
        missing.append(float(len(row.get("missing") or [])))
    # a round that failed the job has results but no global row
    done = {d.round_of(r) for r in d.rounds}
    open_rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in d.sites:
        rnd = d.round_of(r)
        if rnd is not None and rnd not in done and r.get("phase") is None:
            open_rounds[rnd].append(r)
    for rnd, rows in sorted(open_rounds.items()):
        cats.append(f"{rnd} (not completed)")
        accepted.append(float(sum(1 for r in rows if r.get("ok"))))
        failed.append(float(sum(1 for r in rows if not r.get("ok"))))
        missing.append(0.0)
    if cats:
        sec.add(
            BarChart(
                "sites per round",
                "round",
                "sites",
                cats,
                [
                    Series("answered", values=accepted, color="#59a14f"),
                    Series("failed", values=failed, color="#e15759"),
                    Series("missing", values=missing, color="#bab0ac"),
                ],
                stacked=True,
            )
        )
    else:
        sec.add(_note("No round started."))
    failures = []
    for r in d.sites:
        if not r.get("ok"):
            rnd = d.round_of(r)
            what = str(rnd) if rnd is not None else "-"
            if r.get("phase"):
                what += f" ({r['phase']})"
            error = str(r.get("error") or "").strip().splitlines()
            failures.append([what, r.get("site"), (error[0] if error else "")[:300]])
    for row in d.rounds:
        for site in row.get("missing") or []:
            failures.append([str(d.round_of(row)), site, "no answer before the round closed"])
    if failures:
        sec.add(f"<h3>Failures ({len(failures)})</h3>")
        sec.add(_table(["round", "site", "reason"], failures[:MAX_FAILURES]))
        if len(failures) > MAX_FAILURES:
            sec.add(_note(f"{len(failures) - MAX_FAILURES} more in metrics/sites.jsonl."))
    else:
        sec.add(_p("No site failed and none was missing."))
    return sec


def _timing(d: RunData) -> Section:
    sec = Section(*SECTIONS[4])
    if not d.rounds:
        sec.add(_note("No round completed."))
        return sec
    cats = [str(d.round_of(r)) for r in d.rounds]
    sec.add(
        BarChart(
            "round duration",
            "round",
            "seconds",
            cats,
            [Series("duration", values=[_num(r.get("duration")) or 0.0 for r in d.rounds])],
            unit="s",
        )
    )
    if any("bytes_sent" in r for r in d.rounds):
        sent = [_num(r.get("bytes_sent")) or 0.0 for r in d.rounds]
        received = [_num(r.get("bytes_received")) or 0.0 for r in d.rounds]
        sec.add(
            BarChart(
                "bytes moved",
                "round",
                "bytes",
                cats,
                [Series("to sites", values=sent), Series("from sites", values=received)],
                unit="bytes",
            )
        )
        sec.add(
            _p(
                f"Total: {fmt(sum(sent), 'bytes')} to the sites, {fmt(sum(received), 'bytes')} "
                "back. Counted by the server as the tensor bytes of each task's model times its "
                "targets (training and evaluation tasks), and of each result that came back "
                "with a model; JSON headers, metrics and the transport's framing are not "
                "counted. In simulation nothing crosses a network: the figures are what the "
                "same job moves on real sites."
            )
        )
    else:
        sec.add(_note("Bytes moved were not recorded for this run (written by an older fedctl)."))
    return sec


def _cross_site(d: RunData) -> Section:
    sec = Section(*SECTIONS[5])
    m = d.cross_site
    if not m:
        sec.add(_note("Cross-site evaluation did not run (recipe argument cross_site_eval)."))
        return sec
    sites = [str(s) for s in m.get("sites") or []]
    models = [str(x) for x in m.get("models") or []]
    results = m.get("results") or {}
    metrics = [str(x) for x in m.get("metrics") or []]
    metrics = (["accuracy"] if "accuracy" in metrics else []) + [
        x for x in metrics if x != "accuracy"
    ]
    sec.add(
        _p(
            "Each row is a model (the global one and each site's own), each column the site "
            "whose data evaluated it."
        )
    )
    for metric in metrics[:4]:
        values = [
            [_num(((results.get(model) or {}).get(site) or {}).get(metric)) for site in sites]
            for model in models
        ]
        sec.add(Heatmap(f"cross-site {metric}", models, sites, values, "model", "data of site"))
    if not metrics:
        sec.add(_note("No site reported a metric in cross-site evaluation."))
    errors = m.get("errors") or {}
    rows = [
        [phase, owner, site, str(why)[:300]]
        for phase, per in errors.items()
        if isinstance(per, dict)
        for owner, inner in per.items()
        for site, why in (inner.items() if isinstance(inner, dict) else [(owner, inner)])
    ]
    if rows:
        sec.add(_table(["phase", "model", "site", "error"], rows[:MAX_FAILURES]))
    return sec


def _privacy(d: RunData) -> Section:
    sec = Section(*SECTIONS[6])
    series = {}
    for name, label in (("dp_epsilon", "ε (epsilon)"), ("dp_clip", "clip norm")):
        pts = [
            (float(rnd), v)
            for row in d.rounds
            if (rnd := d.round_of(row)) is not None
            and (v := _num((row.get("metrics") or {}).get(name))) is not None
        ]
        if pts:
            series[name] = LineChart(f"{label} over rounds", "round", label, [Series(name, pts)])
    if not series and not d.privacy:
        sec.add(_note("Central differential privacy was off for this run."))
        return sec
    if "dp_epsilon" in series:
        sec.add(_p("The privacy spent so far, after each round, as the accountant computed it."))
    for chart in series.values():
        sec.add(chart)
    if d.privacy:
        sec.add(_table(["", ""], [[k, json.dumps(v)] for k, v in d.privacy.items()]))
    return sec


def _recipe_section(d: RunData) -> Section:
    sec = Section(*SECTIONS[7])
    if not d.recipe:
        sec.add(_note("The recipe's arguments were not recorded in this run folder."))
        return sec
    args = d.recipe.get("args") or {}
    sec.add(_p(f"kind: {d.recipe.get('kind') or '?'}"))
    sec.add(_table(["argument", "value"], [[k, json.dumps(v)] for k, v in args.items()]))
    return sec


def build_sections(data: RunData) -> list[Section]:
    """Every section of the report for ``data``."""
    return [
        _summary(data),
        _global(data),
        _sites(data),
        _participation(data),
        _timing(data),
        _cross_site(data),
        _privacy(data),
        _recipe_section(data),
    ]


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:2px}h2{font-size:18px;margin-top:34px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:12px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top;max-width:700px;
overflow-wrap:anywhere}th{background:#f4f4f4}.note{color:#666;font-style:italic}
.sub{color:#666}.chart{margin:6px 12px 6px 0;max-width:100%;height:auto}
.chart .ct{font-size:13px;font-weight:600}.chart .tk{font-size:10px;fill:#555}
.chart .al{font-size:11px;fill:#333}.chart .lg{font-size:11px;fill:#333}
.chart .pl{fill:#fff;stroke:#ccc}.chart .gr{stroke:#eee}.chart .cv{font-size:10px;fill:#222}
.chart .cv.dk{fill:#fff}
"""


def render_html(data: RunData, sections: list[Section]) -> str:
    """The report page."""
    from fedctl import __version__

    nav = " ".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{s.id}"><h2>{escape(s.title)}</h2>')
        body += [p if isinstance(p, str) else svg(p) for p in s.parts]
        body.append("</section>")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(data.name)} · fedctl report</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(data.name)}</h1><p class="sub">job {escape(data.job_id)} · '
        f"{escape(str(data.root))} · report by fedctl {escape(__version__)} at {stamp}</p>"
        f"<nav>{nav}</nav>" + "\n".join(body) + "</body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None, *, with_png: bool = False) -> Report:
    """Write the report of ``run_dir`` to ``out`` (default ``<run>/report.html``), and with
    ``with_png`` every chart as a PNG in ``<out stem>-png/`` next to it."""
    if with_png:
        from fedctl.tracking.charts import matplotlib_available

        if not matplotlib_available():
            raise UsageError("--png needs matplotlib: pip install 'fedctl[report]'")
    data = load_run(run_dir)
    sections = build_sections(data)
    out = (out or run_dir / "report.html").resolve()
    if out.is_dir():
        raise UsageError(f"{out} is a folder; give the report's file name")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} does not exist")
    page = render_html(data, sections)
    charts = [(s.id, c) for s in sections for c in s.charts]
    pngs: list[Path] = []
    if with_png:
        folder = out.with_name(out.stem + "-png")
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out.parent))
        try:
            for i, (sid, chart) in enumerate(charts, 1):
                name = f"{i:02d}-{sid.replace('_', '-')}-{slug(chart.title)}.png"
                png(chart, tmp / name)
                pngs.append(folder / name)
            atomic_write(out, page)
            tmp.chmod(0o755)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        atomic_write(out, page)
    return Report(run_dir, out, [s.id for s in sections], len(charts), pngs)
