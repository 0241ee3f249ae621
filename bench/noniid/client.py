"""One client script for every algorithm of the non-IID benchmark.

The recipe alone picks the algorithm: ``flare.proximal_term`` is 0 unless the server runs
FedProx, and ``flare.Scaffold`` does nothing unless it runs SCAFFOLD; FedNova and FedAdam need
nothing on the site beyond the step and sample counts every script sends. ``--dp-noise`` or
``--dp-epsilon`` trains with DP-SGD on the site (``flare.make_private``, Poisson-sampled batches
of expected size ``--batch-size``) and reports the site's ε as ``dp_site_epsilon``
(bench/bench_privacy.py).
"""

import argparse
import random

import torch
from model import Net
from task import TASK
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedctl.client as flare
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=0.1)
parser.add_argument("--samples", type=int, default=200)
parser.add_argument("--quantity-skew", type=float, default=0.0)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument(
    "--max-epochs",
    type=int,
    default=0,
    help="systems heterogeneity: each site draws its epochs in 1..N each round (0: off)",
)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--dp-noise", type=float, default=None, help="DP-SGD noise multiplier")
parser.add_argument("--dp-epsilon", type=float, default=None, help="DP-SGD target ε of the site")
parser.add_argument("--dp-epochs", type=int, default=None, help="epochs --dp-epsilon covers")
parser.add_argument("--dp-clip", type=float, default=1.0, help="DP-SGD per-sample gradient clip")
parser.add_argument("--dp-delta", type=float, default=1e-4)
args = parser.parse_args()

flare.init()
shard = make_shard(
    flare.get_site_index(),
    flare.get_num_sites(),
    alpha=args.alpha,
    samples=args.samples,
    quantity_skew=args.quantity_skew,
    **TASK,
)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()
private = None
if args.dp_noise is not None or args.dp_epsilon is not None:
    private = flare.make_private(
        model,
        optimizer,
        DataLoader(TensorDataset(shard.x_train, shard.y_train), batch_size=args.batch_size),
        noise_multiplier=args.dp_noise,
        target_epsilon=args.dp_epsilon,
        epochs=args.dp_epochs,
        max_grad_norm=args.dp_clip,
        delta=args.dp_delta,
    )
    model, optimizer, _ = private


def batches():
    """One epoch of mini-batches: DP-SGD's Poisson-sampled ones, or a shuffle."""
    if private is not None:
        yield from private.data_loader
        return
    order = torch.randperm(shard.num_train)
    for i in range(0, len(order), args.batch_size):
        idx = order[i : i + args.batch_size]
        yield shard.x_train[idx], shard.y_train[idx]


def accuracy(x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


while flare.is_running():
    received = flare.receive()
    if flare.is_evaluate():
        model.load_state_dict(received.params)
        acc = accuracy(shard.x_val, shard.y_val)
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_SAMPLES": len(shard.y_val)}))
        continue
    model.load_state_dict(received.params)
    scaffold = flare.Scaffold(model, received, optimizer)
    steps = 0
    epochs = random.randint(1, args.max_epochs) if args.max_epochs else args.epochs
    for _ in range(epochs):
        for x, y in batches():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss = loss + flare.proximal_term(model, received)
            loss.backward()
            scaffold.correct()
            optimizer.step()
            steps += 1
    with torch.no_grad():  # client drift: how far local training moved the model
        drift = sum((p - received.params[n]).pow(2).sum() for n, p in model.state_dict().items())
    metrics = {"train_loss": loss.item(), "drift": drift.sqrt().item()}
    if private is not None:
        metrics.update(private.metrics(), dp_sigma=private.noise_multiplier)
    flare.send(
        scaffold.update(
            flare.FLModel(
                params=model.state_dict(),
                metrics=metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": steps, "NUM_SAMPLES": shard.num_train},
            )
        )
    )
