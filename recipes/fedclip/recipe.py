"""fedclip: a recipe kind that is not built into fedctl, from the example plugin.

pip install -e recipes/fedclip-plugin        # once, on every machine that runs the job
fedctl simulate recipes/fedclip               # 4 simulated sites (the `env` below)
fedctl recipe show fedclip                     # marked as coming from the plugin

Without the plugin installed, `fedctl simulate`, a POC and a production server all refuse the
job with the same message: unknown recipe kind 'fedclip' (see docs/plugins.md).
"""

import torch
from fedctl_fedclip import FedClipRecipe
from model import Net

from fedctl.recipe import SimEnv

torch.manual_seed(0)

recipe = FedClipRecipe(
    name="fedclip",
    min_clients=2,
    num_rounds=4,
    model=Net(),
    train_script="client.py",
    train_args="--epochs 2",
    clip_norm=0.5,
)
env = SimEnv(num_clients=4)

if __name__ == "__main__":
    run = recipe.run(env)
    raise SystemExit(0 if run.ok else 1)
