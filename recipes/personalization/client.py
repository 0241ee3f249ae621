"""Personalization client (FedBN, partial sharing): two lines differ from a FedAvg client.

``flare.personalize`` loads the global model and puts back this site's own values of the
parameters that stay local (its batch-norm layers under FedBN, its head under FedPer);
``pz.shared()`` keeps those values on the site (in flare.get_state()) and returns the rest.
Each site's inputs are scaled and shifted its own way (feature skew), like different scanners.
"""

import argparse

import torch
from model import Net
from torch import nn

import fedctl.client as flare  # FL
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew")
parser.add_argument("--feature-skew", type=float, default=1.0)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

flare.init()  # FL
shard = make_shard(
    flare.get_site_index(),
    flare.get_num_sites(),
    alpha=args.alpha,
    feature_skew=args.feature_skew,
    noise=1.5,
)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()


def accuracy(x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


while flare.is_running():  # FL
    received = flare.receive()  # FL
    pz = flare.personalize(model, received)  # personalization: global + this site's own layers
    acc = accuracy(shard.x_val, shard.y_val)  # the personalised model on this site's data
    if flare.is_evaluate():  # FL
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_SAMPLES": len(shard.y_val)}))
        continue
    steps = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(shard.num_train).split(args.batch_size):
            optimizer.zero_grad()
            loss_fn(model(shard.x_train[idx]), shard.y_train[idx]).backward()
            optimizer.step()
            steps += 1
    flare.send(  # FL
        flare.FLModel(
            params=pz.shared(),  # personalization: only the federated parameters leave
            metrics={"accuracy": acc},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
