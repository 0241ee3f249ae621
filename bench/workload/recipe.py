"""The benchmark workload as a runnable recipe: ``fedctl simulate bench/workload``."""

import torch
from model import make_model

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)
recipe = FedAvgRecipe(
    name="bench-small",
    min_clients=8,
    num_rounds=20,
    model=make_model("small"),
    train_script="client.py",
    train_args="--size small --samples 2048",
    key_metric=None,
)
env = SimEnv(num_clients=8)
