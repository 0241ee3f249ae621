"""Cost of one secure-aggregation session: time of each phase and bytes of each message.

    python bench/bench_secagg.py              # 1M parameters: 10 parties, 100, 100 with SecAgg+
    python bench/bench_secagg.py --quick      # 100k parameters: 10 parties, 30 with SecAgg+

All parties run in this process, one after another, on one thread, with Ed25519 identity keys.
A fraction of the parties (``--drop``, 10% by default) drops after sharing its keys and before
masking, so the server also pays for rebuilding their mask keys and removing their pairwise
masks. "client" times are the mean (and max) over the parties of one step; "server" times are
the total of the server's work in that round (taking every message, building the requests).
Message sizes are of the JSON text of each message (means over the parties); the masked
input is a tensor sent apart from it: 8 bytes a value as int64, k bits a value if packed.
Prints figures; asserts only that the sum came out right.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


PHASES = ["0 advertise", "1 share keys", "2 masked input", "2b consistency", "3 unmask", "result"]


def json_bytes(msg: dict[str, Any]) -> int:
    return len(json.dumps(msg, separators=(",", ":")))


class Clock:
    """Accumulates the time of labelled pieces of work."""

    def __init__(self) -> None:
        self.client: dict[str, list[float]] = {}
        self.server: dict[str, float] = {}

    def on_client(self, step: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.client.setdefault(step, []).append(time.perf_counter() - t0)
        return out

    def on_server(self, step: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.server[step] = self.server.get(step, 0.0) + time.perf_counter() - t0
        return out


def session(n: int, length: int, neighbours: int | None, drop: float, bits: int) -> None:
    import torch
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedctl.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer

    parties = [f"site-{i:03d}" for i in range(n)]
    ids = {p: Ed25519PrivateKey.generate() for p in parties}
    pub = {p: k.public_key() for p, k in ids.items()}

    def verify(party: str, message: bytes, signature: bytes) -> bool:
        try:
            pub[party].verify(signature, message)
        except (InvalidSignature, KeyError):
            return False
        return True

    config = SecAggConfig(f"bench/{n}", length, bound=1.0, bits=bits, neighbours=neighbours)
    rng = random.Random(0)
    clients = {p: SecAggClient(p, config, ids[p].sign, verify) for p in parties}
    server = SecAggServer(config, verify)
    gen = torch.Generator().manual_seed(0)
    dropped = set(rng.sample(parties, int(drop * n)))
    clock, sizes = Clock(), {}

    def size(label: str, msgs: list[dict[str, Any]]) -> None:
        sizes[label] = statistics.mean(json_bytes(m) for m in msgs)

    ads = [clock.on_client("0 advertise", c.advertise) for c in clients.values()]
    size("advertise (client → server)", ads)
    for m in ads:
        clock.on_server("0 advertise", server.receive_advertisement, m)
    request = clock.on_server("0 advertise", server.share_keys_request)
    size("share-keys request (server → each)", [request])

    answers = [clock.on_client("1 share keys", c.share_keys, request) for c in clients.values()]
    size("sealed shares (client → server)", answers)
    for m in answers:
        clock.on_server("1 share keys", server.receive_shares, m)
    requests = clock.on_server("1 share keys", server.masked_input_requests)
    size("masked-input request (server → each)", list(requests.values()))

    inputs = {}
    for p in parties:
        if p in dropped:
            continue
        x = torch.rand(length, generator=gen) * 2 - 1
        inputs[p] = x.double()
        msg = clock.on_client("2 masked input", clients[p].masked_input, requests[p], x)
        sizes["masked input, header (client → server)"] = json_bytes(
            {k: v for k, v in msg.items() if k != "masked"}
        )
        clock.on_server("2 masked input", server.receive_masked_input, msg)

    request = clock.on_server("2b consistency", server.consistency_request)
    size("consistency request (server → each)", [request])
    survivors = server.survivors
    confirms = [clock.on_client("2b consistency", clients[p].confirm, request) for p in survivors]
    size("confirmation (client → server)", confirms)
    for m in confirms:
        clock.on_server("2b consistency", server.receive_confirmation, m)
    request = clock.on_server("2b consistency", server.unmask_request)
    size("unmask request (server → each)", [request])

    shares = [clock.on_client("3 unmask", clients[p].unmask, request) for p in survivors]
    size("unmask shares (client → server)", shares)
    for m in shares:
        clock.on_server("3 unmask", server.receive_unmask, m)
    total = clock.on_server("result", server.result)

    expected = sum(inputs.values())
    bound = config.quantizer(n).error_bound(len(inputs))
    err = float((total - expected).abs().max())
    assert err <= bound * (1 + 1e-9), (err, bound)

    k = config.quantizer(n).modulus_bits
    mode = f"SecAgg+ d={neighbours}" if neighbours else "SecAgg (everyone)"
    print(
        f"\n{n} parties, {mode}, t = {server.threshold}, {length:,} values, q = {bits}, "
        f"k = {k} bits, {len(dropped)} dropped before masking; max error {err:.2e} "
        f"(bound {bound:.2e})"
    )
    print(f"  {'phase':<22}{'client mean':>13}{'client max':>12}{'server':>10}")
    for step in PHASES:
        times = clock.client.get(step)
        c_mean = f"{statistics.mean(times) * 1e3:10.1f} ms" if times else " " * 13
        c_max = f"{max(times) * 1e3:9.1f} ms" if times else " " * 12
        s = clock.server.get(step)
        s_txt = f"{s:8.2f} s" if s is not None else ""
        print(f"  {step:<22}{c_mean}{c_max}{s_txt:>10}")
    print(f"  {'message':<44}{'bytes':>12}")
    for label, b in sizes.items():
        print(f"  {label:<44}{b:12,.0f}")
    print(f"  {'masked input tensor as int64':<44}{8 * length:12,}")
    print(f"  {f'masked input tensor packed at {k} bits':<44}{(k * length + 7) // 8:12,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="values per input")
    parser.add_argument(
        "--runs", default="10,100,100:14", help="parties[:neighbours] for each session"
    )
    parser.add_argument("--drop", type=float, default=0.1, help="fraction dropping before masking")
    parser.add_argument("--bits", type=int, default=24, help="q, bits per value")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.params, args.runs = 100_000, "10,30:8"

    import torch

    torch.set_num_threads(1)
    print(f"secure aggregation: {args.params:,} values per input, one thread")
    for run in args.runs.split(","):
        n, _, k = run.partition(":")
        session(int(n), args.params, int(k) if k else None, args.drop, args.bits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
