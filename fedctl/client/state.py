"""Per-site state that outlives one round of a training script.

When the simulator runs many more sites than it has worker processes, a script runs once per
round and its Python variables do not survive; what the script keeps in its
:class:`SiteState` does (tensors and JSON values), for that site only. The same object works in
POC and production, where the site agent saves it in the site's job folder after every task,
so it also survives a site restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from fedctl.codec.model import check_json
from fedctl.errors import ClientAPIError

_VALUES_KEY = "fedctl.state.values"


class SiteState(MutableMapping[str, Any]):
    """A dict of str → torch.Tensor or JSON value, persisted by the runtime between rounds."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._data: dict[str, Any] = {}
        self.path = Path(path) if path is not None else None
        if self.path is not None and self.path.exists():
            self.load(self.path)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        import torch

        if not isinstance(key, str) or not key:
            raise ClientAPIError(f"site state keys must be non-empty strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            check_json(value, f"site state[{key!r}]")
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write the state atomically (tensors in the safe framing, values as JSON metadata)."""
        import torch

        from fedctl.codec.tensorfiles import save_file

        target = Path(path) if path is not None else self.path
        if target is None:
            return
        tensors = {k: v for k, v in self._data.items() if isinstance(v, torch.Tensor)}
        values = {k: v for k, v in self._data.items() if not isinstance(v, torch.Tensor)}
        save_file(tensors, target, {_VALUES_KEY: json.dumps(values)})

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the contents with what :meth:`save` wrote."""
        from fedctl.codec.tensorfiles import load_file

        tensors, meta = load_file(path)
        values = json.loads(meta.get(_VALUES_KEY, "{}"))
        if not isinstance(values, dict):
            raise ClientAPIError(f"{path}: site state values are not an object")
        self._data = {**values, **tensors}
