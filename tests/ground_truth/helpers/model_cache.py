"""A per-process model cache in a helper module outside any job folder, as a user's shared
utilities package would have it: the model is built once per process and reused."""

import functools

from model import Net


@functools.lru_cache(maxsize=1)
def get_model() -> Net:
    return Net()
