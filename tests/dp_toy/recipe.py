import torch
from model import Net

from fedctl.recipe import FedAvgRecipe

torch.manual_seed(0)
recipe = FedAvgRecipe(
    name="dp-toy",
    min_clients=2,
    num_rounds=3,
    model=Net(),
    train_script="client.py",
    key_metric=None,
)
