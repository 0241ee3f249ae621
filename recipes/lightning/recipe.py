"""lightning: federated averaging of a LightningModule with flare.patch(trainer).

fedctl simulate recipes/lightning             # 3 simulated sites (the `env` below)
python recipes/lightning/recipe.py            # the same from Python

Needs PyTorch Lightning where the recipe is loaded and on the sites (the lightning extra).
"""

import torch
from model import LitNet

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)  # the same initial model every time the recipe is loaded

recipe = FedAvgRecipe(
    name="lightning",
    min_clients=2,
    num_rounds=3,
    model=LitNet(),
    train_script="client.py",
    train_args="--epochs 1",
    key_metric="val_accuracy",
)
env = SimEnv(num_clients=3)

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
