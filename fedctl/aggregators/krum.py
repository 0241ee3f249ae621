"""Krum and Multi-Krum: keep the update(s) closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent" (NeurIPS 2017). With ``n`` updates of which up to ``f`` may be hostile, each
update gets a score: the sum of squared distances to its ``n - f - 2`` nearest other updates.
**Krum** returns the update with the lowest score; **Multi-Krum** averages the ``m`` updates with
the lowest scores (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed
Learning in Byzantium", ICML 2018). An update far from all others (a poisoned one) gets a high
score and is never selected. Distances run over the floating-point parameters of the whole
model, so every update must carry the same parameter names.

Parameters
----------
f:  faulty sites to tolerate. A round needs ``n ≥ 2f + 3`` results; fewer fails the round with a
    one-line error naming both numbers.
m:  (Multi-Krum only) how many updates to average; default ``n - f``. Needs ``n ≥ m + f``.

Not incremental: keeps every update of the round (memory O(N × model)) and computes the N × N
distances as results arrive (time O(N² × model)); weights are ignored.
Selected with ``{"name": "krum", "f": 1}`` or ``{"name": "multi_krum", "f": 1, "m": 4}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import BufferedAggregator, check_int

if TYPE_CHECKING:
    import torch


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Each update's score from the n × n squared-distance matrix: the sum of its distances to
    its ``n - f - 2`` nearest other updates (at least 1, at most ``n - 1``)."""
    import torch

    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=dist.dtype)
    k = min(max(n - f - 2, 1), n - 1)
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :k].sum(dim=1)


def krum_select(dist: torch.Tensor, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` updates with the lowest Krum scores (ties: the earlier one), sorted."""
    scores = krum_scores(dist, f).tolist()
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:m])


class DistanceAggregator(BufferedAggregator):
    """Keeps updates and their pairwise squared distances (computed as each update arrives)."""

    same_keys = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dist: list[list[float]] = []

    def _keep(self, update: dict[str, torch.Tensor]) -> None:
        import torch

        floats = {name: t.double() for name, t in update.items() if t.is_floating_point()}
        row = []
        for other in self.updates:
            total = 0.0
            for name, t in floats.items():
                total += float(torch.sum((t - other[name].double()) ** 2))
            row.append(total)
        for old, d in zip(self._dist, row, strict=True):
            old.append(d)
        self._dist.append([*row, 0.0])
        self.updates.append(update)

    def _reorder(self, order: list[int]) -> None:
        super()._reorder(order)
        self._dist = [[self._dist[i][j] for j in order] for i in order]

    def distances(self) -> torch.Tensor:
        """The n × n matrix of squared distances between the updates kept so far."""
        import torch

        return torch.tensor(self._dist, dtype=torch.float64).reshape(len(self._dist), -1)

    def mean_of(self, which: list[int]) -> dict[str, torch.Tensor]:
        """Per parameter, the plain mean of the selected updates."""
        out = {}
        for name in self.updates[which[0]]:
            s = self.stack(name, which)
            assert s is not None
            out[name] = s.mean(dim=0)
        return out


class KrumAggregator(DistanceAggregator):
    """Krum: the single update with the lowest score; see the module docstring."""

    name = "krum"

    @classmethod
    def check_params(cls, f: Any = None, **extra: Any) -> int:
        BufferedAggregator.check_params(**extra)
        if f is None:
            raise ValueError(f"{cls.name} needs f, the number of faulty sites to tolerate")
        return 2 * check_int(f"{cls.name} f", f, 0) + 3

    def selected(self) -> list[int]:
        """Indices of the updates Krum keeps this round."""
        return krum_select(self.distances(), int(self.params["f"]), 1)

    def combine(self) -> dict[str, torch.Tensor]:
        return self.mean_of(self.selected())


class MultiKrumAggregator(KrumAggregator):
    """Multi-Krum: the mean of the ``m`` updates with the lowest scores."""

    name = "multi_krum"

    @classmethod
    def check_params(cls, f: Any = None, m: Any = None, **extra: Any) -> int:
        required = super().check_params(f=f, **extra)
        if m is not None:
            required = max(required, check_int("multi_krum m", m, 1) + int(f))
        return required

    def selected(self) -> list[int]:
        f = int(self.params["f"])
        n = len(self.updates)
        m = self.params.get("m")
        return krum_select(self.distances(), f, int(m) if m is not None else n - f)
