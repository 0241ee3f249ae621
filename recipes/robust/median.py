"""Coordinate-wise median: ``fedctl simulate recipes/robust/median.py``."""

import torch
from model import Net

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAvgRecipe(
    name="robust-median",
    min_clients=3,
    num_rounds=6,
    model=Net(),
    train_script="client.py",
    train_args="--faulty-sites site-3",
    aggregator={"name": "median", "f": 1},
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=8)
