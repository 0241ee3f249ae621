"""Client sampling: which sites take part in a round, reproducible from the run's seed (a base
module: the workflows sample, and a site's privacy policy projects a job's budget with it).

``sample_clients`` is None (every available site), a fraction in (0, 1] (``ceil(fraction × N)``
of the N available sites) or a count ≥ 1. Never fewer than the round's minimum, never more
than N. The draw is a pure function of (seed, round, purpose, the available site names), so the
same seed gives the same sites in simulation, after a resume, and in every process layout.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any


def check_sample_spec(spec: Any, min_clients: int) -> None:
    """ValueError with the reason unless ``spec`` is None, a fraction in (0, 1] or a count."""
    if spec is None:
        return
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise ValueError(
            f"sample_clients must be a fraction in (0, 1], a count ≥ 1 or None, got {spec!r}"
        )
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise ValueError(f"sample_clients as a fraction must be in (0, 1], got {spec}")
    elif spec < min_clients:
        raise ValueError(
            f"sample_clients={spec} sites per round is below min_clients={min_clients}"
        )


def sample_count(spec: int | float | None, available: int, min_count: int) -> int:
    """How many of ``available`` sites a round samples."""
    if spec is None:
        return available
    k = math.ceil(spec * available - 1e-9) if isinstance(spec, float) else int(spec)
    return min(available, max(k, min_count))


def round_rng(seed: int, rnd: int, purpose: str) -> random.Random:
    """A generator that depends only on (seed, round, purpose)."""
    key = f"fedctl-sample:{seed}:{rnd}:{purpose}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def sample_sites(
    sites: Sequence[str],
    spec: int | float | None,
    min_count: int,
    seed: int,
    rnd: int,
    purpose: str = "train",
) -> list[str]:
    """The sites of round ``rnd`` (in the order of ``sites``)."""
    ordered = sorted(sites)
    k = sample_count(spec, len(ordered), min_count)
    if k >= len(ordered):
        return list(sites)
    chosen = set(round_rng(seed, rnd, purpose).sample(ordered, k))
    return [s for s in sites if s in chosen]
