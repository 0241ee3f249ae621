"""A LightningModule: a small MLP for the synthetic non-IID task (32 features, 10 classes).

Its training_step adds FedProx's proximal term (zero unless the recipe is FedProx), so the same
module serves FedAvg, FedProx and SCAFFOLD (whose correction flare.patch applies).
"""

import lightning.pytorch as L
import torch
from torch import nn
from torch.nn import functional as F

import fedctl.client as flare


class LitNet(L.LightningModule):
    def __init__(self, lr: float = 0.05, features: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.lr = lr
        self.layers = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        # FedProx's proximal term: (mu/2)·‖w - w_global‖², 0 under any other recipe
        return loss + flare.proximal_term(self, flare.receive())

    def _evaluate(self, batch, prefix):
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_accuracy", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
