"""Datasets for examples, tests and benchmarks (generated locally; nothing is downloaded)."""

from fedctl.datasets.synthetic import Shard, make_shard, test_set

__all__ = ["Shard", "make_shard", "test_set"]
