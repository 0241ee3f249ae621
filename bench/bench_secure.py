"""Per-round overhead of secure aggregation against plain FedAvg, through fedctl's own code
paths (the sites' ``SiteSecAgg`` and the server's ``SecAggServer``/``InputSpec``, as a round
of ``FedAvg(secure_aggregation=...)`` runs them; only the transport is left out).

    python bench/bench_secure.py            # 1M and 10M float32 parameters, 10 and 100 sites
    python bench/bench_secure.py --quick    # 100k parameters, 10 and 30 sites

For every (parameters, sites) it prints, for plain FedAvg and for secure aggregation:

* site time: what a site's runtime adds to its round (SecAgg: every system task it answers and
  turning its result into the masked input; plain FedAvg: nothing beyond sending);
* server time: aggregating the round's results (plain: the weighted running mean; SecAgg: taking
  every message, building the requests, unmasking the sum and the mean update);
* bytes on the wire per site, up and down: tensors at their stored size plus the JSON of the
  protocol's messages (the masked input travels as int64, 8 bytes a value);
* peak memory: for a site, the most its work adds while it runs; for the server, the most it
  holds above the process's baseline (the round's inputs already in memory) while it works.
  RSS is sampled every 2 ms, with glibc told to return every allocation over 64 KiB to the
  system when freed (``MALLOC_MMAP_THRESHOLD_``; the script sets it and restarts itself), so
  freed tensors leave the RSS.

With 100 sites, SecAgg uses SecAgg+ neighbourhoods (d = 14) as recommended; "everyone masks
against everyone" at 100 sites is measured at 1M parameters and its 10M time scaled from it
(said in the output). Sites run one after another in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024 * 1024


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """The largest RSS seen while a ``with`` block runs (sampled in a thread), in MiB above
    ``base`` (default: the RSS when the block starts)."""

    def __init__(self, base: int | None = None) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.fixed = base
        self.base = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self.base = self.fixed if self.fixed is not None else self.peak
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above(self) -> float:
        return (self.peak - self.base) / MiB


def _json(msg: Any) -> int:
    return len(json.dumps(msg, separators=(",", ":"), default=str))


def plain_round(params: int, sites: int) -> dict[str, float]:
    """The server's weighted running mean of ``sites`` float32 results."""
    import torch

    from fedctl.aggregators.weighted import WeightedAggregator
    from fedctl.codec.model import ParamsType

    g = {"w": torch.zeros(params)}
    result = {"w": torch.randn(params)}
    server_time, peak = 0.0, 0.0
    with PeakRSS(rss()) as mem:
        agg = WeightedAggregator(g, "float64" if params <= 32 * MiB else "float32")
        for i in range(sites):
            t0 = time.perf_counter()
            agg.add(result, 1.0 + i, ParamsType.FULL)
            server_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        agg.result()
        server_time += time.perf_counter() - t0
    peak = mem.above
    return {
        "site_s": 0.0,
        "server_s": server_time,
        "up_MB": params * 4 / 1e6,
        "down_MB": params * 4 / 1e6,
        "site_MiB": 0.0,
        "server_MiB": peak,
    }


def secure_round(
    params: int, sites: int, neighbours: int | None, tmp: Path, measure_sites: int | None = None
) -> dict[str, float]:
    """One secure-aggregation round of ``sites`` sites (the runtime's code paths)."""
    import torch

    from fedctl.codec.model import FLModel, ParamsType
    from fedctl.privacy.secagg.keys import CERTS, INPUT, MASKED, META, START
    from fedctl.privacy.secagg.protocol import SecAggConfig
    from fedctl.privacy.secagg.server import SecAggServer
    from fedctl.privacy.secagg.site import SimulatedIdentity, SiteSecAgg
    from fedctl.privacy.secagg.vector import InputSpec

    g = {"w": torch.zeros(params)}
    spec = InputSpec.for_model(g, 8.0)
    config = SecAggConfig("bench:round-1", spec.length, 1.0, 32, None, neighbours)
    server = SecAggServer(config)
    names = [f"site-{i + 1}" for i in range(sites)]
    runtimes = {p: SiteSecAgg(SimulatedIdentity(p, 0), tmp / p, seed=1) for p in names}
    site_time = dict.fromkeys(names, 0.0)
    server_time = 0.0
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    site_peak = server_peak = 0.0
    base = {"w": torch.zeros(params)}
    update = FLModel(params={"w": torch.randn(params) * 0.01}, params_type=ParamsType.FULL)
    baseline = rss()

    def on_server(fn: Any, *args: Any) -> Any:
        nonlocal server_time, server_peak
        with PeakRSS(baseline) as mem:
            t0 = time.perf_counter()
            out = fn(*args)
            server_time += time.perf_counter() - t0
        server_peak = max(server_peak, mem.above)
        return out

    def on_site(p: str, fn: Any, *args: Any) -> Any:
        nonlocal site_peak
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn(*args)
            site_time[p] += time.perf_counter() - t0
        site_peak = max(site_peak, mem.above)
        return out

    start = {META: {"kind": START, "session": config.session, "config": config.public()}}
    for p in names:
        down[p] += _json(start)
        reply = on_site(p, runtimes[p].handle, start)
        up[p] += _json(reply)
        on_server(server.receive_advertisement, reply[META])
    request = {META: on_server(server.share_keys_request), CERTS: {}}
    for p in names:
        down[p] += _json(request)
        reply = on_site(p, runtimes[p].handle, request)
        up[p] += _json(reply)
        on_server(server.receive_shares, reply[META])
    requests = on_server(server.masked_input_requests)
    for p in names:
        meta = {META: requests[p], INPUT: spec.public()}
        down[p] += _json(meta) + params * 4  # the task's meta and the global model
        masked, _ = on_site(p, runtimes[p].masked_result, update, meta, base)
        tensor = masked.params[MASKED]
        up[p] += _json(masked.meta) + tensor.numel() * tensor.element_size()
        on_server(server.receive_masked_input, {**masked.meta[META], "masked": tensor})
        del masked, tensor
    request = {META: on_server(server.consistency_request)}
    for p in names:
        down[p] += _json(request)
        reply = on_site(p, runtimes[p].handle, request)
        up[p] += _json(reply)
        on_server(server.receive_confirmation, reply[META])
    request = {META: on_server(server.unmask_request)}
    for p in names:
        down[p] += _json(request)
        reply = on_site(p, runtimes[p].handle, request)
        up[p] += _json(reply)
        on_server(server.receive_unmask, reply[META])
    total = on_server(server.result)
    on_server(spec.mean_update, total, {"w": g["w"].shape}, None)
    mean_site = sum(site_time.values()) / sites
    return {
        "site_s": mean_site,
        "server_s": server_time,
        "up_MB": sum(up.values()) / sites / 1e6,
        "down_MB": sum(down.values()) / sites / 1e6,
        "site_MiB": site_peak,
        "server_MiB": server_peak,
    }


def main() -> None:
    import os
    import tempfile

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see the module docstring
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k parameters, 10 and 30 sites")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        cases = [(100_000, 10, None), (100_000, 30, 14)]
    else:
        cases = [(1_000_000, 10, None), (1_000_000, 100, 14), (1_000_000, 100, None)]
        cases += [(10_000_000, 10, None), (10_000_000, 100, 14)]
    print("command: python bench/bench_secure.py" + (" --quick" if args.quick else ""))
    print("one torch thread; sites run one after another in this process\n")
    header = (
        "| parameters | sites | method | site time (s) | server time (s) | up / site (MB) "
        "| down / site (MB) | site peak (MiB) | server peak (MiB) |"
    )
    print(header)
    print("|" + " --- |" * 9)
    rows: dict[tuple[int, int, str], dict[str, float]] = {}
    for params, sites, d in cases:
        label = "secagg" + (f" (d={d})" if d else " (everyone)")
        if (params, sites, "plain") not in rows:
            rows[(params, sites, "plain")] = plain_round(params, sites)
            _row(params, sites, "plain FedAvg", rows[(params, sites, "plain")])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rows[(params, sites, label)] = secure_round(params, sites, d, Path(tmp))
            wall = time.perf_counter() - t0
        _row(params, sites, label, rows[(params, sites, label)])
        print(f"<!-- {label}, {params} params, {sites} sites: {wall:.0f} s wall for the bench -->")
    if not args.quick:
        one = rows[(1_000_000, 100, "secagg (everyone)")]
        scaled = {k: v * (10 if k.endswith("_s") else 1) for k, v in one.items()}
        print(
            f"\n10M parameters, 100 sites, everyone masking against everyone: not run (about "
            f"{scaled['site_s'] * 100 / 60:.0f} min); scaled from 1M (time grows linearly "
            f"with the parameters): site ≈ {scaled['site_s']:.1f} s, server ≈ "
            f"{scaled['server_s']:.1f} s per round"
        )
    ratio = {key: rows[key]["site_s"] + rows[key]["server_s"] for key in rows if key[2] != "plain"}
    for (params, sites, label), t in ratio.items():
        plain = rows[(params, sites, "plain")]
        base = plain["site_s"] + plain["server_s"]
        print(
            f"{label}, {params:,} params, {sites} sites: one site + the server take "
            f"{t:.2f} s against {base:.3f} s for plain FedAvg's server "
            f"({'∞' if base == 0 else f'{t / base:.0f}×'}); bytes up ×"
            f"{rows[(params, sites, label)]['up_MB'] / plain['up_MB']:.2f}"
        )


def _row(params: int, sites: int, method: str, r: dict[str, float]) -> None:
    print(
        f"| {params:,} | {sites} | {method} | {r['site_s']:.3f} | {r['server_s']:.3f} | "
        f"{r['up_MB']:.2f} | {r['down_MB']:.2f} | {r['site_MiB']:.0f} | {r['server_MiB']:.0f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
