"""FedBuff: ``fedctl simulate recipes/async/fedbuff.py``.

Ten sites whose speeds differ tenfold (``SimEnv(speeds=...)``, a seeded virtual clock), with
the unchanged client and data of ``recipes/fedopt``: every site trains all the time, and each 3
updates that come in make a new global model, discounted by how many versions old they are.
``num_rounds`` counts new global models.
"""

import sys
from pathlib import Path

import torch

FEDOPT = Path(__file__).resolve().parent.parent / "fedopt"  # the job's code: fedopt's client
sys.path.insert(0, str(FEDOPT))

from model import Net  # noqa: E402

from fedctl.recipe import FedBuffRecipe, SimEnv  # noqa: E402

torch.manual_seed(0)

recipe = FedBuffRecipe(
    name="fedbuff",
    min_clients=3,
    num_rounds=20,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 1",
    buffer_size=3,
    max_staleness=10,
    server_eval="evaluate.py:evaluate",
    key_metric="server_accuracy",
    base_dir=FEDOPT,
)
env = SimEnv(num_clients=10, speeds={"spread": 10.0})

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
