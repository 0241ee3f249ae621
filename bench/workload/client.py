"""Benchmark client: the training loop of train.py behind fedctl.client (or a trivial echo)."""

import argparse

from model import make_model
from train import local_train, shard

import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--size", default="small")
parser.add_argument("--samples", type=int, default=2048)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--trivial", action="store_true", help="send back what was received")
parser.add_argument(
    "--build-model", action="store_true", help="build the model with flare.build_model (no init)"
)
args = parser.parse_args()


def result(model, loss: float, steps: int) -> flare.FLModel:
    """What a site sends (a module-level function, as most client scripts have one)."""
    return flare.FLModel(
        params=model.state_dict(),
        metrics={"train_loss": loss},
        meta={"NUM_STEPS_CURRENT_ROUND": steps},
    )


flare.init()
if args.trivial:
    while flare.is_running():
        received = flare.receive()
        flare.send(flare.FLModel(params=received.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
else:
    x, y = shard(args.size, flare.get_site_index(), args.samples)
    model = flare.build_model(make_model, args.size) if args.build_model else make_model(args.size)
    while flare.is_running():
        model.load_state_dict(flare.receive().params)
        steps, loss = local_train(model, x, y, args.epochs, args.batch_size, args.lr)
        flare.send(result(model, loss, steps))
