"""hello_pt: federated averaging of a small classifier over synthetic per-site data.

fedctl simulate recipes/hello_pt            # 8 simulated sites (the `env` below)
python recipes/hello_pt/recipe.py           # the same from Python
"""

import torch
from model import Net

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)  # the same initial model every time the recipe is loaded

recipe = FedAvgRecipe(
    name="hello-pt",
    min_clients=2,
    num_rounds=5,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 1",
)
env = SimEnv(num_clients=8)

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
