"""Every command block of README.md, docs/*.md and recipes/*/README.md runs (``make test-docs``).

A command block is a fenced block in ``console`` (its ``$ `` lines, also ``site$ ``, ``admin$ ``
…; other lines are sample output and are not compared), ``bash``, ``sh`` or ``shell`` (every line
that is not a comment). Each document's blocks run in order, each command in ``bash`` with
``fedctl`` and ``python`` being this checkout's, in a fresh folder (``recipes/`` and
``provisioning/`` linked in) and with a fresh HOME, so a POC the document starts lives in a
temporary ``~/.fedctl/poc``; whatever POC is left is stopped by PID at the end. Every command
must exit 0.

HTML comments right before a block steer it:

* ``<!-- doc-test: skip (why) -->`` — not run (production on other machines, the test suite
  itself); the reason is required;
* ``<!-- doc-test: cwd PATH -->`` — run in PATH, relative to the folder the document's commands
  run in (e.g. a kit an earlier block made);
* ``<!-- doc-test: needs PROGRAM -->`` — skipped, saying so, when PROGRAM is not installed.

Sizes are shrunk by :data:`SUBSTITUTIONS`, never silently: each rule is listed with its reason
and the commands as run are printed. ``test_every_command_block_is_run_or_marked`` (in the
default suite) checks that every block either runs or is marked; the runs themselves are
``slow`` (three to five minutes on two cores: seven simulations and two POCs) and run by
``make test-docs``, which CI calls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(REPO.glob("recipes/*/README.md")),
]
COMMAND_LANGS = {"console", "bash", "sh", "shell"}
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
PROMPT = re.compile(r"^(?:[\w.@-]+)?\$ (.*)$")  # "$ cmd", "site$ cmd", "admin$ cmd"


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    commands: list[str] = field(default_factory=list)
    skip: str | None = None
    cwd: str | None = None
    needs: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        out.append((pending + line.strip()).strip())
        pending = ""
    if pending:
        out.append(pending.strip())
    return out


def parse(doc: Path) -> list[Block]:
    """The command blocks of ``doc`` with their directives."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        if lang in COMMAND_LANGS:
            block = Block(doc, i + 1, lang)
            j = i - 1
            while j >= 0 and (d := DIRECTIVE.match(lines[j])):
                _directive(block, d.group(1))
                j -= 1
            if lang == "console":
                raw: list[str] = []
                for k, ln in enumerate(body):
                    p = PROMPT.match(ln)
                    if not p:
                        continue
                    raw.append(p.group(1))
                    while raw[-1].rstrip().endswith("\\") and k + 1 < len(body):
                        k += 1
                        raw[-1] = raw[-1].rstrip()[:-1] + " " + body[k].strip()
                block.commands = [c.strip() for c in raw]
            else:
                code = [ln for ln in body if ln.strip() and not ln.lstrip().startswith("#")]
                block.commands = _join_continuations(code)
            blocks.append(block)
        i = end + 1
    return blocks


def _directive(block: Block, text: str) -> None:
    m = re.fullmatch(r"skip \((.+)\)", text)
    if m:
        block.skip = m.group(1)
    elif text.startswith("cwd "):
        block.cwd = text[4:].strip()
    elif text.startswith("needs "):
        block.needs += text[6:].split()
    else:
        raise AssertionError(f"{block.doc}: unknown doc-test directive {text!r}")


# ---------------------------------------------------------------------------- substitutions


def _split_comment(command: str) -> tuple[str, str]:
    m = re.search(r"\s+#\s", command)
    return (command[: m.start()], command[m.start() :]) if m else (command, "")


def _shrink_simulate(command: str) -> str:
    cmd, comment = _split_comment(command)
    cmd = re.sub(r"(--clients|-n) \d+", r"\1 2", cmd)
    cmd = re.sub(r"(--rounds|-r) \d+", r"\1 1", cmd)
    cmd = re.sub(r"--workers \d+", "--workers 2", cmd)
    if not re.search(r"(--clients|-n) ", cmd):
        cmd += " --clients 2"
    if not re.search(r"(--rounds|-r) ", cmd):
        cmd += " --rounds 1"
    return cmd + comment


#: (what is matched, how the command changes, why) — applied in order to every command run
SUBSTITUTIONS: list[tuple[re.Pattern[str], Callable[[str, dict[str, str]], str], str]] = [
    (
        re.compile(r"^fedctl simulate "),
        lambda c, ctx: _shrink_simulate(c),
        "`fedctl simulate`: 2 sites (`--clients N` → `--clients 2`, added when absent), 1 round "
        "(`--rounds R` → `--rounds 1`, added when absent), at most 2 workers",
    ),
    (
        re.compile(r"fedctl poc prepare"),
        lambda c, ctx: c.replace("fedctl poc prepare", f"fedctl poc prepare --port {ctx['port']}"),
        "`fedctl poc prepare`: `--port P` with P a free port on 127.0.0.1 (8002 may be taken)",
    ),
]


def substitute(command: str, ctx: dict[str, str]) -> str:
    for pattern, change, _why in SUBSTITUTIONS:
        if pattern.search(command):
            command = change(command, ctx)
    return command


# ---------------------------------------------------------------------------- the checks


def test_every_command_block_is_run_or_marked() -> None:
    """Every command block runs, or says why not; none is empty. (Fast: parsing only.)"""
    blocks = [b for doc in DOCS for b in parse(doc)]
    assert len(blocks) >= 10
    for b in blocks:
        if b.skip is not None:
            assert b.skip.strip(), f"{b.where}: a skipped block needs a reason"
            continue
        assert b.commands, f"{b.where}: a {b.lang} block with no command (mark it or fix it)"
        for c in b.commands:
            assert "[" not in _split_comment(c)[0], f"{b.where}: {c!r} looks like a synopsis"
    run = [b for b in blocks if b.skip is None]
    assert {b.doc.name for b in run} >= {"README.md", "runtime.md", "provisioning.md"}
    assert any("fedctl poc start" in c for b in run for c in b.commands)


def test_substitutions_shrink_and_say_so() -> None:
    ctx = {"port": "18002"}
    assert (
        substitute("fedctl simulate recipes/hello_pt --clients 64 --rounds 3 --seed 1 --json", ctx)
        == "fedctl simulate recipes/hello_pt --clients 2 --rounds 1 --seed 1 --json"
    )
    assert (
        substitute("fedctl simulate recipes/hello_pt --clients 8   # live progress", ctx)
        == "fedctl simulate recipes/hello_pt --clients 2 --rounds 1   # live progress"
    )
    assert substitute("fedctl poc prepare --clients 2 && fedctl poc start", ctx) == (
        "fedctl poc prepare --port 18002 --clients 2 && fedctl poc start"
    )
    assert substitute("fedctl submit job recipes/hello_pt --target poc", ctx).endswith("poc")


RUNNABLE = [d for d in DOCS if any(b.skip is None for b in parse(d))]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", RUNNABLE, ids=[str(d.relative_to(REPO)) for d in RUNNABLE])
def test_doc_commands_run(doc: Path, tmp_path: Path) -> None:
    work, home, bin_dir = tmp_path / "work", tmp_path / "home", tmp_path / "bin"
    for d in (work, home, bin_dir):
        d.mkdir()
    for name in ("recipes", "provisioning"):
        (work / name).symlink_to(REPO / name)
    (bin_dir / "fedctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedctl.cli.main "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "NO_COLOR": "1",
    }
    env.pop("FEDCTL_POC_WORKSPACE", None)
    env.pop("FEDCTL_ADMIN_KIT", None)
    ctx = {"port": str(free_port())}
    try:
        for block in parse(doc):
            if block.skip is not None:
                continue
            missing = [p for p in block.needs if shutil.which(p) is None]
            if missing:
                print(f"{block.where}: not run, {', '.join(missing)} not installed")
                continue
            cwd = work / block.cwd if block.cwd else work
            for command in block.commands:
                run = substitute(command, ctx)
                print(f"{block.where}$ {run}")
                proc = subprocess.run(
                    ["bash", "-c", run],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, (
                    f"{block.where}: `{run}` exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
                )
    finally:
        from fedctl.runtime import poc

        workspace = home / ".fedctl" / "poc"
        if (workspace / poc.POC_FILE).exists():
            poc.stop(workspace)  # exactly the processes `poc start` recorded, by PID
