"""A client that answers the three kinds of task: train, evaluate and submit_model.

* ``evaluate``: the received model on this site's validation data (federated evaluation each
  round, and the cross-site matrix at the end), weighted by NUM_SAMPLES;
* ``submit_model``: this site's own last local model (kept with flare.keep_local_model, so it
  survives when the simulator re-runs the script every round).
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
shard = make_shard(flare.get_site_index(), flare.get_num_sites(), alpha=args.alpha, noise=1.5)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()


def accuracy(x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


while flare.is_running():  # FL
    received = flare.receive()  # FL
    if flare.is_submit_model():  # FL: cross-site evaluation asks for this site's own model
        flare.send(flare.FLModel(params=flare.local_model() or model.state_dict()))
        continue
    model.load_state_dict(received.params)  # FL
    acc = accuracy(shard.x_val, shard.y_val)
    if flare.is_evaluate():  # FL: federated or cross-site evaluation
        flare.send(flare.FLModel(metrics={"accuracy": acc}, meta={"NUM_SAMPLES": len(shard.y_val)}))
        continue
    steps = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(shard.num_train).split(args.batch_size):
            optimizer.zero_grad()
            loss_fn(model(shard.x_train[idx]), shard.y_train[idx]).backward()
            optimizer.step()
            steps += 1
    flare.keep_local_model(model)  # FL: this site's model, for submit_model
    flare.send(  # FL
        flare.FLModel(
            params=model.state_dict(),
            metrics={"train_accuracy": accuracy(shard.x_train, shard.y_train)},
            meta={"NUM_STEPS_CURRENT_ROUND": steps, "NUM_SAMPLES": shard.num_train},
        )
    )
