"""A plain PyTorch training loop with fedctl.client (# FL) on label-skewed synthetic data.

Nothing here knows about clipping: the plugin's aggregator on the server clips each update.
"""

import argparse

import torch
from model import Net
from torch import nn

import fedctl.client as flare  # FL
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

flare.init()  # FL
shard = make_shard(flare.get_site_index(), flare.get_num_sites(), alpha=args.alpha)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()


def accuracy(x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


while flare.is_running():  # FL
    received = flare.receive()  # FL
    model.load_state_dict(received.params)  # FL
    acc = accuracy(shard.x_val, shard.y_val)  # the global model on this site's data
    if flare.is_evaluate():  # FL
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_SAMPLES": len(shard.y_val)}))
        continue
    steps = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(shard.num_train).split(args.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(shard.x_train[idx]), shard.y_train[idx])
            loss.backward()
            optimizer.step()
            steps += 1
    flare.send(  # FL
        flare.FLModel(
            params=model.state_dict(),
            metrics={"accuracy": acc, "train_loss": loss.item()},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
