"""FedAsync: ``fedctl simulate recipes/async/fedasync.py``.

Ten sites whose speeds differ tenfold (a seeded virtual clock), with the unchanged client and
data of ``recipes/fedopt``: every update that comes in is mixed into the global model at once,
with weight α discounted by its staleness (polynomial, a = 0.5). ``num_rounds`` counts new
global models.
"""

import sys
from pathlib import Path

import torch

FEDOPT = Path(__file__).resolve().parent.parent / "fedopt"  # the job's code: fedopt's client
sys.path.insert(0, str(FEDOPT))

from model import Net  # noqa: E402

from fedctl.recipe import FedAsyncRecipe, SimEnv  # noqa: E402

torch.manual_seed(0)

recipe = FedAsyncRecipe(
    name="fedasync",
    min_clients=3,
    num_rounds=40,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 1",
    alpha=0.6,
    max_staleness=10,
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
    base_dir=FEDOPT,
    eval_every=2,
)
env = SimEnv(num_clients=10, speeds={"spread": 10.0})

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
