"""FedProx on label-skewed synthetic data: sites add (mu/2)·‖w - w_global‖² to their loss.

fedctl simulate recipes/fedprox                 # 10 simulated sites (the `env` below)
fedctl recipe show fedprox                       # what mu does, and the client line
"""

import torch
from model import Net

from fedctl.recipe import FedProxRecipe, SimEnv

torch.manual_seed(0)

recipe = FedProxRecipe(
    name="fedprox",
    min_clients=2,
    num_rounds=8,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.2 --epochs 3",
    mu=0.1,
)
env = SimEnv(num_clients=10)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
