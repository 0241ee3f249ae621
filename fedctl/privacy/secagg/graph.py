"""Who shares with and masks against whom: everyone (SecAgg) or a sparse k-regular graph
(SecAgg+).

The sparse graph is a Harary graph ``H(d, n)`` for an even degree ``d``: the parties are put on
a ring in a pseudo-random order and each is joined to the ``d/2`` nearest on either side. The
order sorts the parties by ``SHA-256(seed || id)``; the seed is a hash of the session and the
whole signed roster (:func:`roster_seed`), so every party computes the same graph from the
roster it received and the server does not choose it (it can only choose whom to leave out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fedctl.privacy.secagg.errors import SecAggConfigError
from fedctl.privacy.secagg.masking import encode_fields


def roster_seed(session: str, entries: Sequence[tuple[str, bytes, bytes]]) -> bytes:
    """The graph's seed: SHA-256 of the session and each ``(party, c_pk, s_pk)``, by party."""
    h = hashlib.sha256(encode_fields("fedctl-secagg/v1/graph", session))
    for party, c_pk, s_pk in sorted(entries):
        h.update(encode_fields(party, c_pk, s_pk))
    return h.digest()


def neighbourhoods(
    parties: Sequence[str], degree: int | None, seed: bytes
) -> dict[str, frozenset[str]]:
    """Each party's neighbours (itself excluded). ``degree`` None, or at least ``n - 1``:
    everyone; otherwise an even number ≥ 2, and every party gets exactly that many."""
    n = len(parties)
    if len(set(parties)) != n:
        raise SecAggConfigError("neighbourhoods: a party appears twice")
    if degree is None or degree >= n - 1:
        everyone = frozenset(parties)
        return {p: everyone - {p} for p in parties}
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 2 or degree % 2:
        raise SecAggConfigError(f"neighbourhood degree must be an even number ≥ 2, got {degree!r}")
    ring = sorted(parties, key=lambda p: hashlib.sha256(seed + encode_fields(p)).digest())
    half = degree // 2
    out = {}
    for i, p in enumerate(ring):
        out[p] = frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d)
    return out


def components(neighbours: dict[str, frozenset[str]], members: Sequence[str]) -> list[list[str]]:
    """The connected components of the graph restricted to ``members`` (sorted, largest
    first). Pairwise masks join only neighbours, so from the masked inputs of ``members`` a
    server can unmask the sum of each component, not only their total."""
    left = set(members)
    out = []
    while left:
        start = min(left)
        seen, todo = {start}, [start]
        while todo:
            for q in neighbours[todo.pop()]:
                if q in left and q not in seen:
                    seen.add(q)
                    todo.append(q)
        left -= seen
        out.append(sorted(seen))
    return sorted(out, key=lambda c: (-len(c), c))
