"""``fedctl report``: the HTML report (and PNGs) of a run folder (issue 17).

One real simulation (sampling, federated, server-side and cross-site evaluation, central DP)
gives a report with every section filled; hand-made run folders pin the edges: hostile text,
rounds counted from 0 or from 1, broken files, bad arguments.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fedctl.cli.main import main
from fedctl.recipe import SimEnv, load_recipe
from fedctl.tracking import charts
from fedctl.tracking.report import SECTIONS, write_report
from fedctl.tracking.rundata import load_run

REPO = Path(__file__).resolve().parent.parent
ALL = [sid for sid, _ in SECTIONS]


def _result(out: str) -> Any:
    """A --json document (the command's own object, or its envelope's result)."""
    doc = json.loads(out)
    return doc["result"] if isinstance(doc, dict) and "ok" in doc and "result" in doc else doc


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Path:
    """recipes/evaluation with central DP: 3 sites, 2 rounds, cross-site evaluation."""
    recipe = load_recipe(REPO / "recipes" / "evaluation").recipe.with_overrides(
        num_rounds=2, central_dp={"noise_multiplier": 0.3, "clip": 5.0}
    )
    ws = tmp_path_factory.mktemp("report-sim")
    run = recipe.run(SimEnv(num_clients=3, backend="local", workspace=ws, display="none"))
    assert run.ok, run.reason
    return run.result_dir


def test_report_of_a_simulation_has_every_section(sim_run, capsys) -> None:
    assert main(["report", str(sim_run), "--json"]) == 0
    out = _result(capsys.readouterr().out)
    assert out["sections"] == ALL and out["html"] == str(sim_run / "report.html")
    html = (sim_run / "report.html").read_text()
    # self-contained: no script, nothing loaded
    assert "<script" not in html and "<link" not in html and not re.search(r"(src|href)=\"?h", html)
    assert "FINISHED" in _section(html, "summary") and "2 of 2" in _section(html, "summary")
    for metric in ("train_accuracy", "eval_accuracy", "server_accuracy"):
        assert f'aria-label="{metric}"' in _section(html, "global")
    sites = _section(html, "sites")
    assert 'aria-label="train_accuracy per site"' in sites and ">site-3</text>" in sites
    assert "sites per round" in _section(html, "participation")
    timing = _section(html, "timing")
    assert 'aria-label="round duration"' in timing and 'aria-label="bytes moved"' in timing
    cross = _section(html, "cross_site")
    assert 'aria-label="cross-site accuracy"' in cross and cross.count("<rect") >= 4 * 3
    privacy = _section(html, "privacy")
    assert 'aria-label="ε (epsilon) over rounds"' in privacy and "noise_multiplier" in privacy
    recipe = _section(html, "recipe")
    assert "central_dp" in recipe and "cross_site_eval" in recipe and "fedavg" in recipe


def test_report_pngs(sim_run, tmp_path, capsys) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(sim_run), "--png", "-o", str(out)]) == 0
    pngs = sorted((tmp_path / "r-png").iterdir())
    assert len(pngs) >= 10 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert any("cross-site" in p.name for p in pngs) and any("epsilon" in p.name for p in pngs)
    assert "png:" in capsys.readouterr().out
    # again: the folder is replaced whole
    assert main(["report", str(sim_run), "--png", "-o", str(out)]) == 0
    assert sorted((tmp_path / "r-png").iterdir()) == pngs


def test_png_without_matplotlib_writes_nothing(sim_run, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(charts, "matplotlib_available", lambda: False)
    out = tmp_path / "r.html"
    assert main(["report", str(sim_run), "--png", "-o", str(out)]) == 2
    assert "pip install 'fedctl[report]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- hand-made runs


def _write_run(root: Path, base: int = 0, **extra: Any) -> Path:
    """A run folder as fedctl writes it, rounds counted from ``base``."""
    (root / "metrics").mkdir(parents=True)
    rows = [
        {
            "round": base + i,
            "metrics": {"accuracy": 0.1 * (i + 1), "dp_epsilon": 1.0 + i},
            "accepted": 2,
            "failed": [],
            "missing": ["site-3"] if i == 1 else [],
            "duration": 1.5,
            "time": 1.0,
            "bytes_sent": 300,
            "bytes_received": 200,
        }
        for i in range(2)
    ]
    (root / "metrics" / "global.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sites = [
        {"round": base + i, "site": s, "ok": True, "metrics": {"accuracy": 0.2}, "error": None}
        for i in range(2)
        for s in ("site-1", "site-2")
    ]
    sites += extra.get("sites", [])
    (root / "metrics" / "sites.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sites))
    (root / "metrics" / "tracking.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in extra.get("tracking", []))
    )
    result = {"job_id": "job-1", "name": "made", "mode": "simulation", "status": "FINISHED"}
    (root / "result.json").write_text(json.dumps({**result, **extra.get("result", {})}))
    return root


def test_rounds_counted_from_zero_or_one_read_the_same(tmp_path) -> None:
    zero, one = load_run(_write_run(tmp_path / "a", 0)), load_run(_write_run(tmp_path / "b", 1))
    assert [zero.round_of(r) for r in zero.rounds] == [1, 2]
    assert [one.round_of(r) for r in one.rounds] == [1, 2]
    assert [zero.round_of(r) for r in zero.sites] == [one.round_of(r) for r in one.sites]
    a = write_report(zero.root).html.read_text()
    b = write_report(one.root).html.read_text()
    strip = re.compile(r"<p class=\"sub\">.*?</p>")
    assert strip.sub("", a).replace(str(zero.root), "") == strip.sub("", b).replace(
        str(one.root), ""
    )


def test_report_escapes_what_sites_send(tmp_path) -> None:
    evil = "<script>alert(1)</script>"
    run = _write_run(
        tmp_path / "run",
        sites=[{"round": 1, "site": evil, "ok": False, "error": f"{evil}\ntrace", "metrics": {}}],
        tracking=[
            {"site": evil, "kind": "scalar", "tag": evil, "value": 1.0, "step": 1, "round": 0},
            {"site": "site-1", "kind": "text", "tag": "t", "value": evil, "step": 1, "round": 0},
        ],
        result={"name": evil, "reason": evil},
    )
    html = write_report(run).html.read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    failures = _section(html, "participation")
    assert "Failures (2)" in failures and "trace" not in failures  # first line of the error
    assert "no answer before the round closed" in failures


def test_missing_parts_say_why(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "run.log").write_text("started\n")  # a run that never completed a round
    html = write_report(run).html.read_text()
    assert re.findall(r'<section id="(\w+)">', html) == ALL
    assert "No round completed" in _section(html, "global")
    assert "did not run" in _section(html, "cross_site")
    assert "was off" in _section(html, "privacy")
    assert "not recorded" in _section(html, "recipe")
    assert "not finished" in _section(html, "summary")


def test_unreadable_jsonl_lines_are_skipped_and_said(tmp_path) -> None:
    run = _write_run(tmp_path / "run")
    with open(run / "metrics" / "sites.jsonl", "a") as fh:
        fh.write('{"round": 1, "site": "site-1", "ok": tr')  # a line cut short by a crash
    html = write_report(run).html.read_text()
    assert "1 unreadable line(s) of metrics/sites.jsonl were skipped" in html


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", "no-such-job"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fedctl job download no-such-job" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", "empty"]) == 2
    assert "holds none" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert main(["report", "file.txt"]) == 2
    run = _write_run(tmp_path / "run")
    (run / "result.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    assert "result.json: not valid JSON" in capsys.readouterr().err
    assert not (run / "report.html").exists()
    (run / "result.json").write_text("[]")
    assert main(["report", str(run)]) == 2
    (run / "result.json").write_text("{}")
    assert main(["report", str(run), "-o", str(tmp_path / "nope" / "r.html")]) == 2
    assert main(["report", str(run), "-o", str(tmp_path)]) == 2
    assert not (run / "report.html").exists()


def test_a_workspace_gives_its_newest_run_and_a_job_id_is_looked_up(tmp_path, capsys) -> None:
    ws = tmp_path / "runs"
    old = _write_run(ws / "made-old", result={"job_id": "made-old"})
    new = _write_run(ws / "made-new", result={"job_id": "made-new"})
    os.utime(old / "result.json", (time.time() - 100, time.time() - 100))
    assert main(["report", str(ws)]) == 0
    assert "the newest of 2 runs" in capsys.readouterr().out
    assert (new / "report.html").exists() and not (old / "report.html").exists()
    assert main(["report", "made-old", "--workspace", str(ws)]) == 0
    assert (old / "report.html").exists()


def test_many_sites_are_drawn_as_min_mean_max(tmp_path) -> None:
    many = [
        {"round": r, "site": f"s{i}", "ok": True, "metrics": {"loss": float(i)}}
        for r in range(2)
        for i in range(50)
    ]
    html = write_report(_write_run(tmp_path / "run", sites=many)).html.read_text()
    assert "50 sites: min, mean and max" in _section(html, "sites")
