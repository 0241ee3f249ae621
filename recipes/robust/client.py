"""Client for robust aggregation: honest sites train as usual; the sites named in
``--faulty-sites`` send garbage (a broken pipeline, or an attacker), which a plain mean would
average into the global model."""

import argparse

import torch
from model import Net
from torch import nn

import fedctl.client as flare  # FL
from fedctl.datasets import make_shard

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--faulty-sites", default="", help="comma list of sites that send garbage")
args = parser.parse_args()

flare.init()  # FL
faulty = flare.get_site_name() in args.faulty_sites.split(",")
shard = make_shard(flare.get_site_index(), flare.get_num_sites(), alpha=args.alpha, noise=1.5)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()


def accuracy(x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


while flare.is_running():  # FL
    received = flare.receive()  # FL
    model.load_state_dict(received.params)  # FL
    acc = accuracy(shard.x_val, shard.y_val)
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
    params = model.state_dict()
    if faulty:
        params = {k: v + 50 * torch.randn_like(v) for k, v in params.items()}
    flare.send(  # FL
        flare.FLModel(
            params=params, metrics={"accuracy": acc}, meta={"NUM_STEPS_CURRENT_ROUND": steps}
        )
    )
