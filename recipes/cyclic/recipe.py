"""Cyclic weight transfer with hello_pt's unchanged client: ``fedctl simulate recipes/cyclic``.

One model visits the sites in turn each round (a cycle), in a fresh seeded order per cycle; each
site trains what the previous one sent and the server never aggregates.
"""

import sys
from pathlib import Path

import torch

HELLO = Path(__file__).resolve().parent.parent / "hello_pt"  # the job's code: hello_pt's
sys.path.insert(0, str(HELLO))

from model import Net  # noqa: E402

from fedctl.recipe import CyclicRecipe, SimEnv  # noqa: E402

torch.manual_seed(0)

recipe = CyclicRecipe(
    name="cyclic",
    min_clients=2,
    num_rounds=3,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 1",
    order="random",
    base_dir=HELLO,
)
env = SimEnv(num_clients=4)

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
