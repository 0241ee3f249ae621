"""A LightningDataModule over this site's synthetic shard (nothing is downloaded)."""

import lightning.pytorch as L
from torch.utils.data import DataLoader, TensorDataset

from fedctl.datasets import make_shard


class SiteData(L.LightningDataModule):
    def __init__(self, site_index: int, num_sites: int, batch_size: int = 32, alpha: float = 0.5):
        super().__init__()
        self.site_index, self.num_sites = site_index, num_sites
        self.batch_size, self.alpha = batch_size, alpha
        self.train = self.val = None

    def setup(self, stage=None):
        if self.train is None:
            shard = make_shard(self.site_index, self.num_sites, alpha=self.alpha, noise=1.5)
            self.train = TensorDataset(shard.x_train, shard.y_train)
            self.val = TensorDataset(shard.x_val, shard.y_val)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self):
        return self.val_dataloader()
