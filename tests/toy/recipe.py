import torch
from model import Toy

from fedctl.recipe import FedAvgRecipe

torch.manual_seed(0)
recipe = FedAvgRecipe(
    name="toy", min_clients=2, num_rounds=3, model=Toy(), train_script="client.py", key_metric=None
)
