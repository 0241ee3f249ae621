"""Server-side evaluation (``server_eval="evaluate.py:evaluate"``): the global model on a
balanced test set of the task, after every round. Runs on the server, never on a site."""

import torch
from model import Net

from fedctl.datasets import test_set

X, Y = test_set(2000, noise=1.5)
NET = Net()


def evaluate(params, current_round):
    NET.load_state_dict(params)
    with torch.no_grad():
        return {"accuracy": (NET(X).argmax(1) == Y).float().mean().item()}
