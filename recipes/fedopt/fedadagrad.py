"""FedAdagrad: ``fedctl simulate recipes/fedopt/fedadagrad.py``."""

import torch
from model import Net

from fedctl.recipe import FedAdagradRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAdagradRecipe(
    name="fedadagrad",
    min_clients=2,
    num_rounds=8,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.3",
    eta=0.03,
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=10)
