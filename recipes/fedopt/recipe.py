"""FedAdam: Adam on the server's pseudo-gradient (Reddi et al., 2021).

fedctl simulate recipes/fedopt                   # FedAdam (this file)
fedctl simulate recipes/fedopt/fedyogi.py        # FedYogi
fedctl simulate recipes/fedopt/fedadagrad.py     # FedAdagrad
fedctl simulate recipes/fedopt/fedavgm.py        # FedAvgM (server momentum)

The global model is also evaluated on the server after every round (evaluate.py), which adds
``server_accuracy`` to the round metrics; it also picks the best model.
"""

import torch
from model import Net

from fedctl.recipe import FedAdamRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAdamRecipe(
    name="fedadam",
    min_clients=2,
    num_rounds=8,
    model=Net(),
    train_script="client.py",
    train_args="--alpha 0.3",
    eta=0.01,
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=10)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
