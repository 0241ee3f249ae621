"""client.py's training as a hand-written loop: no Lightning Trainer, the same model.

It does exactly what the patched trainer does each round, in the same order (so the same
random numbers are drawn): load the global model, evaluate it on the validation data, train
`--epochs` epochs with a new optimizer (FedProx's term in the loss, SCAFFOLD's correction before
each step, as the module and the patch do), evaluating after each epoch as Lightning's fit
does, and send the weights with the global model's metrics and the step count.
tests/test_lightning.py checks that both give the same global model, bit for bit.
"""

import argparse

import torch
from data import SiteData
from model import LitNet
from torch.nn import functional as F

import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()


def evaluate(model, loader):
    model.eval()
    n, loss, correct = 0, 0.0, 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            n += len(y)
            loss += F.cross_entropy(logits, y).item() * len(y)
            correct += (logits.argmax(1) == y).float().sum().item()
    model.train()
    return {"val_loss": loss / n, "val_accuracy": correct / n}


flare.init()
data = SiteData(flare.get_site_index(), flare.get_num_sites(), args.batch_size)
data.setup()
model = LitNet(lr=args.lr)

while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    metrics = evaluate(model, data.val_dataloader())
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics=metrics, meta={"NUM_SAMPLES": len(data.val)}))
        continue
    optimizer = model.configure_optimizers()
    scaffold = flare.Scaffold(model, received, optimizer)  # does nothing unless SCAFFOLD
    steps = 0
    for _ in range(args.epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) + flare.proximal_term(model, received)
            loss.backward()
            scaffold.correct()
            optimizer.step()
            steps += 1
        evaluate(model, data.val_dataloader())  # Lightning validates after each epoch
    model_out = flare.FLModel(
        params=model.state_dict(), metrics=metrics, meta={"NUM_STEPS_CURRENT_ROUND": steps}
    )
    flare.send(scaffold.update(model_out))
