"""``SummaryWriter`` for training scripts: what they record streams to the server.

Drop-in for the common calls of ``torch.utils.tensorboard.SummaryWriter`` (same names, same
arguments): ``add_scalar``, ``add_scalars``, ``add_histogram``, ``add_text``, ``flush``,
``close``. Nothing is written on the site: each call becomes a record, tagged with the site and
the round, that the server writes to the run's ``metrics/tracking.jsonl`` and hands to the job's
sinks (TensorBoard under ``tb/<site>``, MLflow in the site's child run; docs/tracking.md).
Histograms are computed here, so only their buckets travel, never the values.
"""

from __future__ import annotations

import time
from typing import Any

from fedctl.client import api
from fedctl.errors import ClientAPIError

#: buckets of a histogram (more are refused: the server keeps at most 1024)
MAX_BINS = 1024
#: bins used for torch's default ``bins="tensorflow"`` (TensorBoard draws about 30)
DEFAULT_BINS = 30


class SummaryWriter:
    """Records through the running job's channel (``fedctl.client.init`` first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments of TensorBoard's writer (log_dir, comment, flush_secs, …) are accepted and
        # ignored: where metrics land is the server's decision.
        self._closed = False

    def _record(
        self,
        kind: str,
        tag: str,
        value: Any,
        global_step: int | None,
        walltime: float | None,
        *,
        multi: bool = False,
    ) -> None:
        ch = api._channel(f"SummaryWriter.add_{kind}")
        if not isinstance(tag, str) or not tag:
            raise ClientAPIError(f"add_{kind}(): tag must be a non-empty string")
        if global_step is not None:
            global_step = int(_number(global_step, f"{tag} global_step"))
        ch.record(
            {
                "kind": kind,
                "multi": multi,
                "tag": tag,
                "value": value,
                "step": global_step,
                "round": ch.task.model.current_round if ch.task is not None else None,
                "time": float(walltime) if walltime is not None else time.time(),
            }
        )

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """Record one number under ``tag`` at ``global_step`` (a NaN is recorded as null)."""
        ch = api._channel("SummaryWriter.add_scalar")
        value = api._finite(ch, {tag: _number(scalar_value, tag)})[tag]
        self._record("scalar", tag, value, global_step, walltime)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: dict[str, Any],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Record several numbers under ``main_tag/<key>`` at ``global_step``."""
        if not isinstance(tag_scalar_dict, dict):
            raise ClientAPIError(f"add_scalars(): {main_tag}: needs a dict of numbers")
        ch = api._channel("SummaryWriter.add_scalars")
        named = {
            f"{main_tag}/{k}": _number(v, f"{main_tag}/{k}") for k, v in tag_scalar_dict.items()
        }
        finite = api._finite(ch, named)
        value = {str(k): finite[f"{main_tag}/{k}"] for k in tag_scalar_dict}
        self._record("scalar", main_tag, value, global_step, walltime, multi=True)

    def add_histogram(
        self,
        tag: str,
        values: Any,
        global_step: int | None = None,
        bins: Any = "tensorflow",
        walltime: float | None = None,
        max_bins: int | None = None,
    ) -> None:
        """Record the histogram of ``values`` (a tensor, array or list of numbers).

        ``bins`` is a number of equal-width bins or a NumPy rule (``"auto"``, ``"fd"``, …);
        torch's default ``"tensorflow"`` gives 30 equal-width bins. ``max_bins`` caps the count.
        """
        self._record(
            "histogram", tag, histogram(values, bins, max_bins, tag), global_step, walltime
        )

    def add_text(
        self,
        tag: str,
        text_string: str,
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Record a text note."""
        self._record("text", tag, str(text_string), global_step, walltime)

    def flush(self) -> None:
        """Records are forwarded as they are made; nothing to flush."""

    def close(self) -> None:
        """Nothing to release; present for API compatibility."""
        self._closed = True

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _number(value: Any, what: str) -> float:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise ClientAPIError(f"{what}: expected one number, got several") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientAPIError(f"{what}: expected a number, got {type(value).__name__}")
    return float(value)


def histogram(values: Any, bins: Any, max_bins: int | None, tag: str) -> dict[str, Any]:
    """TensorBoard's histogram of ``values``: min, max, count, sum, sum of squares and buckets
    (each bucket's right edge and count). NaN and infinite values are left out."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ClientAPIError(f"add_histogram(): {tag}: values must be numbers") from None
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ClientAPIError(f"add_histogram(): {tag}: no finite values")
    if bins == "tensorflow":
        bins = DEFAULT_BINS
    if isinstance(bins, bool) or not isinstance(bins, int | str):
        raise ClientAPIError(f"add_histogram(): {tag}: bins must be a count or a NumPy rule")
    cap = MAX_BINS if max_bins is None else max(1, min(int(max_bins), MAX_BINS))
    try:
        counts, edges = np.histogram(arr, bins=min(bins, cap) if isinstance(bins, int) else bins)
    except ValueError as exc:
        raise ClientAPIError(f"add_histogram(): {tag}: {exc}") from None
    if len(counts) > cap:  # a NumPy rule asked for more: equal-width bins at the cap
        counts, edges = np.histogram(arr, bins=cap)
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "num": float(arr.size),
        "sum": float(arr.sum()),
        "sum_squares": float(np.dot(arr, arr)),
        "bucket_limits": [float(e) for e in edges[1:]],
        "bucket_counts": [float(c) for c in counts],
    }
