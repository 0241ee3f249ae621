"""SCAFFOLD client: a plain PyTorch loop, fedctl.client (# FL) and three SCAFFOLD lines.

The site's control variate lives in flare.get_state(), so it survives rounds even when the
simulator runs many more sites than workers and re-runs this script every round.
"""

import argparse

import torch
from model import Net
from torch import nn

import fedctl.client as flare  # FL
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

flare.init()  # FL
shard = make_shard(flare.get_site_index(), flare.get_num_sites(), alpha=args.alpha, noise=1.5)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)  # plain SGD, as SCAFFOLD assumes
loss_fn = nn.CrossEntropyLoss()


def accuracy(x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


while flare.is_running():  # FL
    received = flare.receive()  # FL
    model.load_state_dict(received.params)  # FL
    scaffold = flare.Scaffold(model, received, optimizer)  # SCAFFOLD: c from the server, c_i kept
    acc = accuracy(shard.x_val, shard.y_val)
    if flare.is_evaluate():  # FL
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_SAMPLES": len(shard.y_val)}))
        continue
    steps = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(shard.num_train).split(args.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(shard.x_train[idx]), shard.y_train[idx])
            loss.backward()
            scaffold.correct()  # SCAFFOLD: gradient - c_i + c
            optimizer.step()
            steps += 1
    flare.send(  # FL
        scaffold.update(  # SCAFFOLD: new c_i kept on the site, its change sent
            flare.FLModel(
                params=model.state_dict(),
                metrics={"accuracy": acc, "train_loss": loss.item()},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )
    )
