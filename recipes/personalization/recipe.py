"""FedBN on feature-skewed synthetic data: batch-norm layers stay on each site.

fedctl simulate recipes/personalization          # FedBN (this file)
fedctl simulate recipes/personalization/fedper.py   # partial sharing: a personal head per site
"""

import torch
from model import Net

from fedctl.recipe import FedBNRecipe, SimEnv

torch.manual_seed(0)

recipe = FedBNRecipe(
    name="fedbn",
    min_clients=2,
    num_rounds=6,
    model=Net(),
    train_script="client.py",
    train_args="--feature-skew 1.0",
)
env = SimEnv(num_clients=8)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
