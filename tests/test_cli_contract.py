"""The command line's contract (README, "Exit codes" and "JSON output").

* every command and subcommand answers bad arguments with one ``error:`` line (typer's "did you
  mean" kept), its usage line, and exit 2 — walked over every registered command;
* ``fedctl`` alone and a command group alone print their help and exit 0;
* every command takes ``--json`` and prints exactly one envelope, success and error alike;
* a path that does not exist is exit 4 for every command that takes one.

Everything here runs in this process and stops at argument parsing or at the first missing
file, except one simulation (local backend) and one on Ray in a subprocess (Ray's IP warning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedctl.cli.main import command, main
from fedctl.cli.output import KINDS

REPO = Path(__file__).resolve().parent.parent
TOY = Path(__file__).resolve().parent / "toy"


def _walk(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    commands = getattr(node, "commands", None)
    if not commands:
        return [(path, node)]
    out = []
    for name, sub in commands.items():
        out += _walk(sub, (*path, name))
    return out


LEAVES = dict(_walk(command()))
GROUPS = sorted(
    {path[:i] for path in LEAVES for i in range(1, len(path))},
)


def _ids(paths: Any) -> list[str]:
    return [" ".join(p) or "fedctl" for p in paths]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_envelope(out: str, code: int, command_name: str) -> dict[str, Any]:
    """``out`` is exactly one JSON envelope saying the command ended with ``code``."""
    doc = json.loads(out)
    assert set(doc) == {"ok", "command", "result", "error"}, doc
    assert doc["ok"] is (code == 0), doc
    assert doc["command"] == command_name
    if code == 0:
        assert doc["error"] is None
    else:
        error = doc["error"]
        assert set(error) == {"code", "kind", "message", "hint"}
        assert error["code"] == code and error["kind"] == KINDS[code], error
        assert isinstance(error["message"], str) and error["message"].strip()
        assert "\n" not in error["message"] and "Traceback" not in error["message"]
        assert error["hint"] is None or isinstance(error["hint"], str)
    return doc


def _usage_error(err: str, path: tuple[str, ...], *needles: str) -> None:
    """One ``error:`` line naming the problem, then the command's usage line; nothing else."""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert lines[1].startswith(f"usage: fedctl {' '.join(path)}".rstrip()), err
    assert lines[1].endswith(f"(more: {' '.join(('fedctl', *path))} --help)"), err


def _annotation(param: Any) -> Any:
    """The Python type of a parameter (typer ≥ 0.22 keeps it; older typer has a click type)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        return desc.annotation
    name = getattr(getattr(param, "type", None), "name", "")
    return {"integer": int, "float": float, "boolean": bool}.get(name, str)


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False))


def _fillers(cmd: Any, skip: Any = None) -> list[str]:
    """Values for the command's required parameters (other than ``skip``), so that parsing
    reaches the parameter under test."""
    args: list[str] = []
    for p in cmd.params:
        if p is skip or not p.required:
            continue
        args += ["x"] if p.param_type_name == "argument" else [p.opts[0], "x"]
    return args


def _options(kind: str) -> list[tuple[tuple[str, ...], str]]:
    cases = []
    for path, cmd in LEAVES.items():
        for p in cmd.params:
            if p.param_type_name != "option" or _is_flag(p):
                continue
            if kind == "value" or (kind == "number" and _annotation(p) in (int, float)):
                cases.append((path, p.opts[0]))
    return cases


# ---------------------------------------------------------------------------- help


@pytest.mark.parametrize("path", [(), *GROUPS], ids=_ids([(), *GROUPS]))
def test_fedctl_alone_and_a_group_alone_print_help_and_exit_0(path, capsys) -> None:
    code, out, err = _run(list(path), capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"Usage: {' '.join(('fedctl', *path))} [OPTIONS] COMMAND")


@pytest.mark.parametrize("path", sorted(LEAVES), ids=_ids(sorted(LEAVES)))
def test_help_is_plain_and_flags_carry_no_type(path, capsys) -> None:
    code, out, _ = _run([*path, "--help"], capsys)
    assert code == 0 and out.startswith(f"Usage: fedctl {' '.join(path)}")
    assert "<bool>" not in out and "BOOLEAN" not in out and "\\[" not in out
    assert "╭" not in out  # no box drawing: the same text in a terminal, a pipe and a log
    assert "--json" in out


# ---------------------------------------------------------------------------- the walk


@pytest.mark.parametrize("path", sorted(LEAVES), ids=_ids(sorted(LEAVES)))
def test_every_command_refuses_an_unknown_option(path, capsys) -> None:
    code, out, err = _run([*path, "--no-such-option"], capsys)
    assert code == 2 and out == ""
    _usage_error(err, path, "--no-such-option")
    code, out, err = _run([*path, "--json", "--no-such-option"], capsys)
    assert code == 2
    doc = check_envelope(out, 2, " ".join(path))
    assert "--no-such-option" in doc["error"]["message"]
    assert doc["error"]["hint"].startswith(f"usage: fedctl {' '.join(path)}")


@pytest.mark.parametrize("path", sorted(LEAVES), ids=_ids(sorted(LEAVES)))
def test_a_misspelt_option_is_named_with_the_right_one(path, capsys) -> None:
    cmd = LEAVES[path]
    option = next(o for p in cmd.params for o in p.opts if o.startswith("--") and len(o) > 5)
    code, _, err = _run([*path, *_fillers(cmd), option[:-1] + "z"], capsys)
    assert code == 2
    _usage_error(err, path, option[:-1] + "z", option)


@pytest.mark.parametrize(
    ("path", "option"), _options("value"), ids=[f"{' '.join(p)} {o}" for p, o in _options("value")]
)
def test_every_option_that_takes_a_value_needs_one(path, option, capsys) -> None:
    cmd = LEAVES[path]
    param = next(p for p in cmd.params if option in p.opts)
    code, out, err = _run([*path, *_fillers(cmd, skip=param), option], capsys)
    assert code == 2 and out == ""
    _usage_error(err, path, option, "requires an argument")


@pytest.mark.parametrize(
    ("path", "option"),
    _options("number"),
    ids=[f"{' '.join(p)} {o}" for p, o in _options("number")],
)
def test_every_number_option_refuses_text(path, option, capsys) -> None:
    cmd = LEAVES[path]
    code, _, err = _run([*path, *_fillers(cmd), option, "abc"], capsys)
    assert code == 2
    _usage_error(err, path, "Invalid value", option)


REQUIRED = [
    (path, p.name) for path, cmd in sorted(LEAVES.items()) for p in cmd.params if p.required
]


@pytest.mark.parametrize(
    ("path", "name"), REQUIRED, ids=[f"{' '.join(p)} {n}" for p, n in REQUIRED]
)
def test_every_required_parameter_is_named_when_missing(path, name, capsys) -> None:
    cmd = LEAVES[path]
    param = next(p for p in cmd.params if p.name == name)
    code, _, err = _run([*path, *_fillers(cmd, skip=param)], capsys)
    assert code == 2
    shown = param.opts[0] if param.param_type_name == "option" else (param.metavar or name)
    _usage_error(err, path, "Missing")
    assert shown.lower() in err.splitlines()[0].lower()  # older typer upper-cases argument names


@pytest.mark.parametrize("path", [(), *GROUPS], ids=_ids([(), *GROUPS]))
def test_a_misspelt_command_gets_did_you_mean(path, capsys) -> None:
    group = command()
    for name in path:
        group = group.commands[name]
    real = max(group.commands, key=len)
    code, _, err = _run([*path, real[:-1]], capsys)
    assert code == 2
    _usage_error(err, path, f"No such command '{real[:-1]}'", f"Did you mean '{real}'?")


@pytest.mark.parametrize(
    ("path", "args"),
    [
        (("simulate",), ["x", "--backend", "gpu"]),
        (("submit", "job"), ["x", "--target", "staging"]),
        (("server", "start"), ["--kit", "x", "--mode", "dev"]),
        (("cert", "request"), ["x", "--org", "o", "--type", "robot"]),
    ],
    ids=["backend", "target", "mode", "type"],
)
def test_values_outside_their_set_are_usage_errors(path, args, capsys) -> None:
    code, out, err = _run([*path, *args], capsys)
    assert code == 2 and out == ""
    _usage_error(err, path, f"{args[-1]!r} is not one of")


def test_the_issues_examples(capsys) -> None:
    """The exact commands of issue 12, each with its expected line."""
    hello = str(REPO / "recipes" / "hello_pt")
    cases = [
        (["simulat"], "No such command 'simulat'. Did you mean 'simulate'?"),
        (["simulate", hello, "--clientz", "2"], "--clientz"),
        (["simulate", hello, "--clients", "abc"], "Invalid value for '--clients'"),
        (["simulate", hello, "--rounds"], "Option '--rounds' requires an argument."),
        (["job", "status"], "Missing argument 'JOB_ID'."),
    ]
    for argv, message in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err.splitlines()[0], err


# ---------------------------------------------------------------------------- envelopes


def _envelope_cases(tmp: Path) -> list[tuple[str, list[str], int]]:
    """(command, argv, exit code) for every command, without a server: what succeeds without
    one succeeds; the rest fail on something missing (exit 4), in the envelope."""
    none = str(tmp / "nowhere")
    poc = ["--poc-workspace", none]
    return [
        ("recipe list", ["recipe", "list"], 0),
        ("recipe show", ["recipe", "show", "fedprox"], 0),
        ("recipe show", ["recipe", "show", "scafold"], 2),
        ("simulate", ["simulate", none], 4),
        (
            "simulate",
            ["simulate", str(TOY), "--backend", "local", "-r", "1", "--workspace", str(tmp)],
            0,
        ),
        ("provision", ["provision", "--init", str(tmp / "project.yml")], 0),
        ("provision", ["provision", str(tmp / "project.yml"), "-o", str(tmp / "ws")], 0),
        ("provision", ["provision", none, "-o", str(tmp / "ws2")], 4),
        ("cert request", ["cert", "request", "hospital-z", "--org", "hz", "-o", str(tmp)], 0),
        ("cert sign", ["cert", "sign", str(tmp / "hospital-z.csr"), "-w", str(tmp / "ws")], 0),
        ("cert sign", ["cert", "sign", str(tmp / "hospital-z.csr"), "-w", str(tmp / "ws")], 2),
        ("cert sign", ["cert", "sign", none, "-w", str(tmp / "ws")], 4),
        (
            "kit assemble",
            [
                "kit",
                "assemble",
                str(tmp / "ws" / "kits" / "hospital-z.zip"),
                "--key",
                str(tmp / "hospital-z.key"),
                "-o",
                str(tmp / "hospital-z"),
            ],
            0,
        ),
        ("kit assemble", ["kit", "assemble", none], 4),
        ("kit verify", ["kit", "verify", str(tmp / "hospital-z")], 0),
        ("kit verify", ["kit", "verify", none], 4),
        ("audit verify", ["audit", "verify", none], 4),
        ("audit head", ["audit", "head", none], 4),
        ("report", ["report", none], 4),
        ("he decrypt", ["he", "decrypt", none, "--context", none, "-o", str(tmp / "x")], 4),
        ("poc prepare", ["poc", "prepare", "--workspace", str(tmp / "poc"), "-n", "0"], 2),
        ("poc prepare", ["poc", "prepare", "--workspace", str(tmp / "poc"), "-n", "1"], 0),
        ("poc status", ["poc", "status", "--workspace", str(tmp / "poc")], 1),
        ("poc stop", ["poc", "stop", "--workspace", str(tmp / "poc")], 0),
        ("poc clean", ["poc", "clean", "--workspace", str(tmp / "poc")], 0),
        ("poc start", ["poc", "start", "--workspace", none], 4),
        ("poc status", ["poc", "status", "--workspace", none], 4),
        ("poc stop", ["poc", "stop", "--workspace", none], 0),  # nothing to stop
        ("poc clean", ["poc", "clean", "--workspace", none], 0),  # nothing to remove
        ("server start", ["server", "start", "--kit", none], 4),
        ("server stop", ["server", "stop", "--kit", none], 4),
        ("client start", ["client", "start", "--kit", none], 4),
        ("client stop", ["client", "stop", "--kit", none], 4),
        ("submit job", ["submit", "job", str(TOY), *poc], 4),
        ("submit job", ["submit", "job", none, *poc], 4),
        ("job list", ["job", "list", *poc], 4),
        ("job status", ["job", "status", "j1", *poc], 4),
        ("job abort", ["job", "abort", "j1", *poc], 4),
        ("job download", ["job", "download", "j1", "-o", str(tmp / "dl"), *poc], 4),
        ("job logs", ["job", "logs", "j1", *poc], 4),
        ("job logs", ["job", "logs", "j1", "--follow", "--kit", none], 4),
        ("sites", ["sites", *poc], 4),
    ]


def test_every_command_prints_one_envelope(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDCTL_ADMIN_KIT", raising=False)
    cases = _envelope_cases(tmp_path)
    assert {c for c, _, _ in cases} == {" ".join(p) for p in LEAVES}  # every command
    for name, argv, expected in cases:
        code, out, err = _run([*argv, "--json"], capsys)
        assert code == expected, (argv, out, err)
        doc = check_envelope(out, code, name)
        if code:  # the same line on stderr, for people
            assert err.startswith(f"error: {doc['error']['message']}"), (argv, err)
        elif name == "simulate":
            run = doc["result"]
            assert run["status"] == "FINISHED" and run["job_id"] and run["rounds_completed"] == 1
            assert [m["round"] for m in run["metrics"]] == [1]  # rounds are 1-based


def test_the_simulate_envelope_of_a_failed_run(tmp_path, toy_dir, capsys) -> None:
    argv = ["simulate", str(toy_dir), "--backend", "local", "--workspace", str(tmp_path)]
    code, out, _ = _run([*argv, "--rounds", "1", "--json"], capsys)
    assert code == 0
    (toy_dir / "client.py").write_text("raise SystemExit('no data here')\n")
    code, out, _ = _run([*argv, "--json"], capsys)
    doc = check_envelope(out, 1, "simulate")
    assert code == 1 and doc["result"]["status"] == "FAILED"
    assert doc["error"]["message"].startswith("toy FAILED: ")


def test_an_internal_error_under_json_is_an_envelope(monkeypatch, capsys) -> None:
    import fedctl.cli.recipe as recipe_cli

    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(recipe_cli, "_catalog", broken)
    code, out, err = _run(["recipe", "list", "--json"], capsys)
    doc = check_envelope(out, 1, "recipe list")
    assert code == 1 and doc["error"]["message"] == "internal error: RuntimeError: a bug"
    assert "Traceback" in err  # the bug is still visible


# ---------------------------------------------------------------------------- small fixes


def test_summary_writer_is_reachable_from_flare() -> None:
    import fedctl.client as flare
    from fedctl.client.tracking import SummaryWriter

    assert flare.tracking.SummaryWriter is SummaryWriter  # as docs/client-api.md lists it


def test_a_simulation_prints_no_ray_ip_warning(tmp_path) -> None:
    """Ray probes 8.8.8.8 for a loopback node address and warns without a route; fedctl keeps
    127.0.0.1 without the probe. Checked by recording the probe (any network) and by stderr."""
    script = (
        "import sys\n"
        "import ray._private.services as services\n"
        "probe = services.node_ip_address_from_perspective\n"
        "def recorded(*a, **k):\n"
        "    print('PROBED', file=sys.stderr)\n"
        "    return probe(*a, **k)\n"
        "services.node_ip_address_from_perspective = recorded\n"
        "from fedctl.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [str(TOY), "--clients", "2", "--rounds", "1", "--workspace", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", script, "simulate", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PROBED" not in proc.stderr and "8.8.8.8" not in proc.stderr, proc.stderr
    assert "Failed to determine local IP" not in proc.stderr
