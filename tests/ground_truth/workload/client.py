"""The differential workload's client, written the way users write scripts.

--cache-dir DIR   take the model from a module-level cache in a helper module outside the job
                  (built once per process, reused by every site that process runs)
--mutate          change the model's tensors right after send() (the next epoch, say)
--diff            send DIFF updates instead of full weights
--global-rng      mini-batch order from torch's global generator (which fedctl seeds)
--build-model     build the model with flare.build_model (no random initialisation)
"""

import argparse
import functools
import sys

import torch
from model import Net
from train import local_train, shard

import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--cache-dir", default="")
parser.add_argument("--mutate", action="store_true")
parser.add_argument("--diff", action="store_true")
parser.add_argument("--global-rng", action="store_true")
parser.add_argument("--build-model", action="store_true")
args = parser.parse_args()

if args.cache_dir:
    sys.path.insert(0, args.cache_dir)
    from model_cache import get_model
elif args.build_model:
    get_model = functools.partial(flare.build_model, Net)
else:
    get_model = Net

flare.init()
idx = flare.get_site_index()
x, y = shard(idx)
model = get_model()
while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    steps = local_train(model, x, y, idx, received.current_round, global_rng=args.global_rng)
    params = model.state_dict()  # no clone: the tensors are the model's own
    if args.diff:
        params = {k: v - received.params[k] for k, v in params.items()}
    flare.send(
        flare.FLModel(
            params_type="DIFF" if args.diff else "FULL",
            params=params,
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
    if args.mutate:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0).add_(1.0)
