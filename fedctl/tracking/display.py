"""Progress display for a running job: a rich live panel on a terminal, plain lines elsewhere.

It is a workflow-event listener, so simulation, POC and production jobs look the same. Failed
sites are printed with their traceback (once per site and round), never swallowed.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedctl.tracking.store import model_label


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Display:
    """Shows round k/R, results received/expected, latest global metrics; then a summary."""

    def __init__(
        self,
        title: str,
        num_rounds: int,
        mode: str = "auto",
        console: Console | None = None,
    ) -> None:
        self.console = console or Console(file=sys.stderr, soft_wrap=True, highlight=False)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        if mode not in ("rich", "plain", "none"):
            raise ValueError("display must be 'auto', 'rich', 'plain' or 'none'")
        self.mode = mode
        self.title = title
        self.num_rounds = num_rounds
        self.round: int | None = None
        self.expected = 0
        self.received = 0
        self.failed = 0
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._live: Live | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Display:
        if self.mode == "rich":
            self._live = Live(
                self._render(), console=self.console, refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _print(self, *items: Any) -> None:
        if self.mode == "none":
            return
        self.console.print(*items)

    def listener(self, event: dict[str, Any]) -> None:
        """Workflow event → screen."""
        with self._lock:
            self._handle(event)
            if self._live is not None:
                self._live.update(self._render())

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "round_started":
            self.round = event["round"]
            self.expected = len(event["targets"])
            self.received = self.failed = 0
        elif kind == "result":
            if event["ok"]:
                if not event.get("phase"):  # evaluation results are not the round's training
                    self.received += 1
            else:
                self.failed += 1
                where = f" in round {event['round'] + 1}" if event.get("round") is not None else ""
                if event.get("phase"):
                    where = f"{where} ({event['phase']})"
                self._print(Text(f"✗ {event['site']} failed{where}: {event['error']}", "red"))
                if event.get("traceback"):
                    self._print(Text(event["traceback"].rstrip(), "dim"))
        elif kind == "round_completed":
            self.history.append(event)
            if self.mode == "plain":
                metrics = " ".join(f"{k}={_fmt(v)}" for k, v in event["metrics"].items())
                self._print(
                    f"round {event['round'] + 1}/{self.num_rounds}: "
                    f"{len(event['accepted'])}/{self.expected} results, "
                    f"{len(event['failed'])} failed ({event['duration']:.2f}s) {metrics}"
                )
        elif kind in ("warning", "error"):
            self._print(
                Text(f"{kind}: {event['message']}", "yellow" if kind == "warning" else "red")
            )
        elif kind == "resumed":
            self._print(f"resumed from checkpoint at round {event['round'] + 1}")
        elif kind == "cross_site_eval":
            self._print(self._cross_site_table(event["matrix"], event.get("metric")))
            self._print(f"cross-site evaluation: {event.get('path') or '(not saved)'}")

    def _cross_site_table(self, matrix: dict[str, Any], metric: str | None) -> Table:
        """One row per model (global first), one column per site's data, ``metric`` in cells."""
        sites = list(matrix.get("sites") or [])
        results = matrix.get("results") or {}
        table = Table(title=f"cross-site evaluation ({metric or 'no metrics'})", box=None)
        table.add_column("model \\ data")
        for site in sites:
            table.add_column(site, justify="right")
        for model in matrix.get("models") or []:
            cells = []
            for site in sites:
                value = (results.get(model) or {}).get(site, {}).get(metric) if metric else None
                cells.append(_fmt(value) if isinstance(value, int | float) else "-")
            table.add_row(model_label(matrix, model), *cells)
        return table

    def _render(self) -> Group:
        elapsed = time.monotonic() - self.started
        rnd = f"{self.round + 1}/{self.num_rounds}" if self.round is not None else "starting"
        head = Text.assemble(
            (self.title, "bold"),
            f"   round {rnd}   results {self.received}/{self.expected}",
            (f"   failed {self.failed}" if self.failed else "", "red"),
            f"   {elapsed:.0f}s",
        )
        return Group(head, self._table(self.history[-8:]))

    def _table(self, rows: list[dict[str, Any]]) -> Table:
        keys: list[str] = []
        for ev in rows:
            keys += [k for k in ev["metrics"] if k not in keys]
        table = Table(box=None, pad_edge=False)
        table.add_column("round", justify="right")
        table.add_column("results", justify="right")
        for k in keys:
            table.add_column(k, justify="right")
        table.add_column("time", justify="right")
        for ev in rows:
            results = f"{len(ev['accepted'])}"
            if ev["failed"] or ev["missing"]:
                results += f" (+{len(ev['failed']) + len(ev['missing'])} ✗)"
            table.add_row(
                str(ev["round"] + 1),
                results,
                *(_fmt(ev["metrics"].get(k, "")) for k in keys),
                f"{ev['duration']:.2f}s",
            )
        return table

    def summary(self, status: str, reason: str | None, lines: list[str]) -> None:
        """Print the final table and where results are."""
        if self.mode == "none":
            return
        if self.mode == "rich" and self.history:
            self._print(Text(self.title, "bold"))
            self._print(self._table(self.history))
        style = "green" if status == "FINISHED" else "red"
        self._print(Text(f"{status}" + (f": {reason}" if reason else ""), style))
        for line in lines:
            self._print(line)
