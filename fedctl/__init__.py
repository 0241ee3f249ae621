"""fedctl: a federated-learning job orchestrator for PyTorch.

Importing this package is cheap on purpose (no torch, no ray): the CLI's start-up time depends
on it. The public APIs live in ``fedctl.client`` (training scripts), ``fedctl.recipe`` (jobs and
environments) and ``fedctl.provision`` (certificates and startup kits).
"""

__version__ = "0.1.0"
