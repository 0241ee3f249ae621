"""Test client: DP-SGD through flare.make_private on a small synthetic classification task.

Site i has 40 + 20·i samples; each round it trains --epochs epochs of Poisson-sampled batches
of expected size --batch, and reports its ε and what the accountant was given.
"""

import argparse

import torch
from model import Net
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--noise", type=float, default=None)
parser.add_argument("--target-epsilon", type=float, default=None)
parser.add_argument("--total-epochs", type=int, default=None)
parser.add_argument("--clip", type=float, default=1.0)
parser.add_argument("--delta", type=float, default=1e-3)
parser.add_argument("--batch", type=int, default=10)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--accountant", default="rdp")
args = parser.parse_args()

flare.init()
idx = flare.get_site_index()
g = torch.Generator().manual_seed(100 + idx)
n = 40 + 20 * idx
x = torch.randn(n, 4, generator=g)
y = (x[:, 0] + x[:, 1] > 0).long()
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
private = flare.make_private(
    model,
    optimizer,
    loader,
    noise_multiplier=args.noise,
    target_epsilon=args.target_epsilon,
    epochs=args.total_epochs,
    max_grad_norm=args.clip,
    delta=args.delta,
    accountant=args.accountant,
)
model, optimizer, loader = private

while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    if flare.is_evaluate():
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        flare.send(flare.FLModel(metrics={"accuracy": acc}))
        continue
    steps = 0
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            steps += 1
    flare.send(
        flare.FLModel(
            params=model.state_dict(),
            metrics={
                **private.metrics(),
                "dp_steps": private.steps,
                "dp_sample_rate": private.sample_rate,
                "dp_noise_multiplier": private.noise_multiplier,
                "n": n,
            },
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
