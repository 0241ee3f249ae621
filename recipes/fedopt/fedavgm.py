"""FedAvgM (server momentum): ``fedctl simulate recipes/fedopt/fedavgm.py``.

Half of the sites train each round (``sample_clients=0.5``, seeded): momentum smooths the
direction across rounds whose samples pull the model different ways.
"""

import torch
from model import Net

from fedctl.recipe import FedAvgMRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAvgMRecipe(
    name="fedavgm",
    min_clients=2,
    num_rounds=8,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.3",
    server_lr=1.0,
    server_momentum=0.5,
    sample_clients=0.5,
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=10)
