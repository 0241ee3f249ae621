"""hello_pt's client: local_train.py plus six lines of fedctl.client (marked # FL)."""

import argparse

import torch
from data import make_shard
from model import Net
from torch import nn

import fedctl.client as flare  # FL


def evaluate(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    flare.init()  # FL
    (x_train, y_train), (x_val, y_val) = make_shard(flare.get_site_index(), flare.get_num_sites())
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    while flare.is_running():  # FL
        model.load_state_dict(flare.receive().params)  # FL
        accuracy = evaluate(model, x_val, y_val)  # how good is the global model here?
        steps, total = 0, 0.0
        for _ in range(args.epochs):
            order = torch.randperm(len(x_train))
            for i in range(0, len(order), args.batch_size):
                idx = order[i : i + args.batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                steps, total = steps + 1, total + loss.item()
        print(f"accuracy {accuracy:.3f}")
        flare.send(  # FL
            flare.FLModel(
                params=model.state_dict(),
                metrics={"accuracy": accuracy, "train_loss": total / steps},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )


if __name__ == "__main__":
    main()
