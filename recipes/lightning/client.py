"""A Lightning training script made federated by one line: flare.patch(trainer) (# FL).

Each round the patched trainer loads the received global model, `validate` reports its metrics,
`fit` trains `--epochs` epochs and sends the weights with those metrics and the number of
optimizer steps (the aggregation weight). loop_client.py is the same training without Lightning.
"""

import argparse
import logging

import lightning.pytorch as L
from data import SiteData
from model import LitNet

import fedctl.client as flare  # FL

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner in client.log

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

flare.init()  # FL
data = SiteData(flare.get_site_index(), flare.get_num_sites(), args.batch_size)
model = LitNet(lr=args.lr)
trainer = L.Trainer(
    max_epochs=args.epochs,  # per round
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    log_every_n_steps=5,
)
flare.patch(trainer)  # FL

while flare.is_running():  # FL
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.fit(model, datamodule=data)
