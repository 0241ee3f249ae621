"""The Ray-backed simulator: N virtual sites multiplexed onto a pool of worker processes."""

from fedctl.sim.env import SimEnv

__all__ = ["SimEnv"]
