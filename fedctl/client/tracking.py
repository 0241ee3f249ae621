"""``SummaryWriter`` for training scripts: metrics stream to the server, not to local files.

Drop-in for the common part of ``torch.utils.tensorboard.SummaryWriter``: what a script records
reaches the server, which writes it, tagged with site and round, to the run's
``metrics/tracking.jsonl`` (a TensorBoard or MLflow sink is not built yet).
"""

from __future__ import annotations

from typing import Any

from fedctl.client import api


class SummaryWriter:
    """Records scalars through the running job's channel (``fedctl.client.init`` first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments of TensorBoard's writer (log_dir, comment, …) are accepted and ignored:
        # where metrics land is the server's decision.
        self._closed = False

    def add_scalar(
        self, tag: str, scalar_value: Any, global_step: int | None = None, **kwargs: Any
    ) -> None:
        """Record one number under ``tag`` at ``global_step``."""
        api.log(tag, scalar_value, "SCALAR", global_step)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: dict[str, Any],
        global_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Record several numbers under ``main_tag/<key>`` at ``global_step``."""
        api.log(main_tag, tag_scalar_dict, "SCALARS", global_step)

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        """Record a text note."""
        api.log(tag, text_string, "TEXT", global_step)

    def flush(self) -> None:
        """Records are already forwarded; nothing to flush."""

    def close(self) -> None:
        """Nothing to release; present for API compatibility."""
        self._closed = True
