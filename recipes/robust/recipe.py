"""Robust aggregation: Krum (f=1) keeps the global model sane while site-3 sends garbage.

fedctl simulate recipes/robust                   # Krum
fedctl simulate recipes/robust/median.py         # coordinate-wise median, same faulty site

Change ``aggregator`` to None (the plain mean) to see the garbage ruin the model.
"""

import torch
from model import Net

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAvgRecipe(
    name="robust-krum",
    min_clients=5,  # Krum with f=1 needs at least 2f + 3 = 5 results per round
    num_rounds=6,
    model=Net(),
    train_script="client.py",
    train_args="--faulty-sites site-3",
    aggregator={"name": "krum", "f": 1},
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
)
env = SimEnv(num_clients=8)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
