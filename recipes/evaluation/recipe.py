"""Evaluation options on one recipe: client sampling, federated evaluation each round,
server-side evaluation, and cross-site evaluation at the end.

fedctl simulate recipes/evaluation

Each round 60% of the sites train (seeded by the run's seed and the round); the new global model
is then evaluated on sampled sites (``eval_accuracy``, weighted by their sample counts) and on
the server's test set (``server_accuracy``, from evaluate.py). After the last round every site's
own model and the global model are evaluated on every site: the matrix is shown as a table and
saved as cross_site_eval.json in the run folder.
"""

import torch
from model import Net

from fedctl.recipe import FedAvgRecipe, SimEnv

torch.manual_seed(0)

recipe = FedAvgRecipe(
    name="evaluation",
    min_clients=2,
    num_rounds=5,
    model=Net(),
    train_script="client.py",
    sample_clients=0.6,
    federated_eval=True,
    server_eval="evaluate.py:evaluate",
    cross_site_eval=True,
    key_metric="eval_accuracy",
)
env = SimEnv(num_clients=5)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
