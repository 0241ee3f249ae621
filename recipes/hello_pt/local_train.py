"""The plain PyTorch script hello_pt starts from: trains on one site's data, no federation."""

import argparse

import torch
from data import make_shard
from model import Net
from torch import nn


def evaluate(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    (x_train, y_train), (x_val, y_val) = make_shard(0, 1)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    for _ in range(args.epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
    print(f"accuracy {evaluate(model, x_val, y_val):.3f}")


if __name__ == "__main__":
    main()
