"""The non-IID benchmark workload as a FedAvg recipe (bench/bench_algorithms.py varies it)."""

import torch
from model import Net

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)
recipe = FedAvgRecipe(
    name="noniid",
    min_clients=2,
    num_rounds=10,
    model=Net(),
    train_script="client.py",
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=30)
