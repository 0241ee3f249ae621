"""Swarm learning with hello_pt's unchanged client: ``fedctl simulate recipes/swarm``.

The sites aggregate among themselves, in rotation, and the server only relays what they seal
for each other (X25519 + AES-GCM between the sites' identities): it never holds a model it could
open. Each site keeps the final model in its own folder (in simulation
``sites/<site>/swarm-final.safetensors``).
"""

import sys
from pathlib import Path

import torch

HELLO = Path(__file__).resolve().parent.parent / "hello_pt"  # the job's code: hello_pt's
sys.path.insert(0, str(HELLO))

from model import Net  # noqa: E402

from fedctl.recipe import SimEnv, SwarmRecipe  # noqa: E402

torch.manual_seed(0)

recipe = SwarmRecipe(
    name="swarm",
    min_clients=2,
    num_rounds=5,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 1",
    key_metric=None,
    base_dir=HELLO,
)
env = SimEnv(num_clients=4)

if __name__ == "__main__":
    run = recipe.run(env)
    print(run)
    raise SystemExit(0 if run.ok else 1)
