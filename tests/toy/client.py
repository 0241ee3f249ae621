"""Test client: linear regression per site, with switches to misbehave on purpose."""

import argparse

import torch
from model import Toy

import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--fail-sites", default="")
parser.add_argument("--fail-rounds", default="")
parser.add_argument("--diff", action="store_true")
parser.add_argument("--no-steps", action="store_true")
parser.add_argument("--use-state", action="store_true")
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--hang-sites", default="")
parser.add_argument("--sleep", type=float, default=0.0, help="seconds of 'work' per task")
parser.add_argument("--evil-sites", default="", help="sites that send what --evil says")
parser.add_argument("--evil", default="", help="per round: weight:VALUE or a hostile file mode")
parser.add_argument("--nan-loss", action="store_true", help="report a NaN loss")
args = parser.parse_args()
fail_sites = {s for s in args.fail_sites.split(",") if s}
fail_rounds = {int(r) for r in args.fail_rounds.split(",") if r}
hang_sites = {s for s in args.hang_sites.split(",") if s}

flare.init()
site, idx = flare.get_site_name(), flare.get_site_index()
g = torch.Generator().manual_seed(100 + idx)
x = torch.randn(64, 4, generator=g)
y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1 * idx
model = Toy()
print(f"{site} starting")

while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    rnd = received.current_round
    if site in fail_sites and (not fail_rounds or rnd in fail_rounds):
        raise RuntimeError(f"boom at {site} in round {rnd}")
    if site in hang_sites:
        import time

        time.sleep(3600)
    if args.sleep:
        import time

        time.sleep(args.sleep)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    steps = 3 + idx % 3
    for _ in range(steps):
        batch = torch.randint(0, 64, (16,))
        opt.zero_grad()
        loss = ((model(x[batch]).squeeze(1) - y[batch]) ** 2).mean()
        loss.backward()
        opt.step()
    metrics = {"loss": float("nan") if args.nan_loss else loss.item(), "site_index": idx}
    if args.use_state:
        state = flare.get_state()
        state["count"] = state.get("count", 0) + 1
        state["last"] = model.fc.weight.detach().clone()
        metrics["count"] = state["count"]
    params = model.state_dict()
    if args.diff:
        params = {k: v - received.params[k] for k, v in params.items()}
    meta = {} if args.no_steps else {"NUM_STEPS_CURRENT_ROUND": steps}
    if site in args.evil_sites.split(",") and args.evil:
        modes = args.evil.split(",")  # one per round, in turn
        mode = modes[rnd % len(modes)]
        if mode.startswith("weight:"):
            meta["NUM_STEPS_CURRENT_ROUND"] = float(mode.split(":", 1)[1])
        else:
            from hostile import send_hostile_file

            send_hostile_file(mode, rnd)
            continue
    flare.send(
        flare.FLModel(
            params_type="DIFF" if args.diff else "FULL",
            params=params,
            metrics=metrics,
            meta=meta,
        )
    )
