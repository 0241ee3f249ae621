"""Asynchronous-training client: the same loop as for FedAvg. FedBuff and FedAsync change only
when the server aggregates; a site never waits for the others."""

import argparse

import torch
from model import Net
from torch import nn

import fedctl.client as flare  # FL
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

flare.init()  # FL
shard = make_shard(flare.get_site_index(), flare.get_num_sites(), alpha=args.alpha, noise=1.5)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()

while flare.is_running():  # FL
    model.load_state_dict(flare.receive().params)  # FL
    steps = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(shard.num_train).split(32):
            optimizer.zero_grad()
            loss = loss_fn(model(shard.x_train[idx]), shard.y_train[idx])
            loss.backward()
            optimizer.step()
            steps += 1
    flare.send(  # FL
        flare.FLModel(
            params=model.state_dict(),
            metrics={"train_loss": loss.item()},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
