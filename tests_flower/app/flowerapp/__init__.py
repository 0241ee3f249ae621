"""flowerapp: a Flower / PyTorch app on synthetic data (no downloads)."""
