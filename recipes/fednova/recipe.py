"""FedNova on synthetic data with quantity skew: sites run from ~2 to ~60 local steps a round.

fedctl simulate recipes/fednova
"""

import torch
from model import Net

from fedctl.recipe import FedNovaRecipe, SimEnv

torch.manual_seed(0)

recipe = FedNovaRecipe(
    name="fednova",
    min_clients=2,
    num_rounds=8,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.3 --quantity-skew 1.0 --epochs 2",
)
env = SimEnv(num_clients=10)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
