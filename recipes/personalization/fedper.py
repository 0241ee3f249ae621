"""Partial sharing (FedPer): the body is federated, each site keeps its own head.

``fedctl simulate recipes/personalization/fedper.py``; strong label skew (alpha=0.2) is where a
personal head pays off: each site's head specialises in the classes it actually sees.
"""

import torch
from model import Net

from fedctl.recipe import PartialSharingRecipe, SimEnv

torch.manual_seed(0)

recipe = PartialSharingRecipe(
    name="fedper",
    min_clients=2,
    num_rounds=6,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.2 --feature-skew 0.0",
    local=["head.*"],
)
env = SimEnv(num_clients=8)
