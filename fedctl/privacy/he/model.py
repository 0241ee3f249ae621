"""HE in a running job: the self-describing encrypted global model, and a site's two steps.

Once a round has been aggregated under encryption the global model holds, for each encrypted
parameter, a uint8 tensor of ciphertexts of Σ w·x, and one more tensor, :data:`HE_MODEL_KEY`,
with the JSON description that reads them back (divisor Σ w). The model is therefore
self-describing wherever it goes: in a task, a checkpoint, ``final.safetensors``; whoever holds
the secret context (a site, or the user in simulation) decrypts it with :func:`open_params`.

A training task's meta carries :data:`HE_TASK_KEY` = ``{"keys": [...]}``, the parameters to
encrypt. A site's runtime (never the script) does two things:

* :func:`open_params` on the task's model before anything else sees it (the script receives
  the plain weighted mean, as under plain FedAvg);
* :func:`seal_result` on the script's (filtered) result: FULL weights (a DIFF is added to the
  model the script started from), each listed tensor encrypted as ``w · x`` with the result's
  aggregation weight ``w`` (its ``NUM_STEPS_CURRENT_ROUND``, else 1, the rule the server uses),
  and the description in ``meta["he"]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import NUM_STEPS_KEY, FLModel, ParamsType
from fedctl.privacy.he.params import HEConfigError, HEError
from fedctl.privacy.he.tensors import HE_META_KEY, decrypt_params, encrypt_params

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.he.context import HEContext

#: the tensor of an encrypted global model that holds its description (uint8 JSON)
HE_MODEL_KEY = "fedctl.he"
#: the training task's meta entry that asks a site to encrypt: {"keys": [names]}
HE_TASK_KEY = "fedctl.he"
#: the most bytes a description may have (100,000 tensors of long names fit)
MAX_DESCRIPTION_BYTES = 32 * 1024 * 1024


def embed(params: Mapping[str, torch.Tensor], description: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the description added under :data:`HE_MODEL_KEY`."""
    import torch

    data = json.dumps(description, sort_keys=True, allow_nan=False).encode()
    return {**params, HE_MODEL_KEY: torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def extract(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``params`` without :data:`HE_MODEL_KEY`, and the description it held (None: plain)."""
    import torch

    rest = {k: v for k, v in params.items() if k != HE_MODEL_KEY}
    if HE_MODEL_KEY not in params:
        return rest, None
    t = params[HE_MODEL_KEY]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise HEError(f"{HE_MODEL_KEY!r} must be a 1-D uint8 tensor (the HE description)")
    if t.numel() > MAX_DESCRIPTION_BYTES:
        raise HEError(f"{HE_MODEL_KEY!r}: a description of more than {MAX_DESCRIPTION_BYTES} bytes")
    try:
        value = json.loads(t.numpy().tobytes())
    except (ValueError, RecursionError):
        raise HEError(f"{HE_MODEL_KEY!r} does not hold a JSON description") from None
    if not isinstance(value, dict):
        raise HEError(f"{HE_MODEL_KEY!r} must hold a JSON object")
    return rest, value


def is_encrypted(params: Mapping[str, Any] | None) -> bool:
    """Whether a model holds ciphertexts (it carries :data:`HE_MODEL_KEY`)."""
    return params is not None and HE_MODEL_KEY in params


def open_params(params: Mapping[str, Any], ctx: HEContext) -> dict[str, Any]:
    """The plain model of an encrypted one (a plain one passes unchanged). Needs the secret."""
    rest, description = extract(params)
    if description is None:
        return rest
    return decrypt_params(rest, description, ctx)


def task_request(meta: Mapping[str, Any] | None) -> list[str] | None:
    """The names a training task asks this site to encrypt (None: the task does not ask)."""
    value = (meta or {}).get(HE_TASK_KEY)
    if value is None:
        return None
    keys = value.get("keys") if isinstance(value, Mapping) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise HEError(f"the task's meta[{HE_TASK_KEY!r}] must be {{'keys': [names]}}")
    return keys


def strip_request(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``meta`` without the HE request (what the script sees)."""
    return {k: v for k, v in (meta or {}).items() if k != HE_TASK_KEY}


def without_params(model: FLModel) -> FLModel:
    """A result with its parameters dropped: what a site sends for a task whose model came
    encrypted but that asks for no encryption (an evaluation): the server must never receive
    plain weights of an HE job. Metrics and meta pass."""
    return replace(model, params=None, params_type=None, optimizer_params=None)


def result_weight(meta: Mapping[str, Any] | None) -> float:
    """The aggregation weight the server gives a result: its NUM_STEPS_CURRENT_ROUND, else 1."""
    value = (meta or {}).get(NUM_STEPS_KEY, 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HEConfigError(
            f"meta[{NUM_STEPS_KEY!r}] must be a finite number to weight an encrypted update, "
            f"got {value!r}"
        )
    return float(value)


def seal_result(
    model: FLModel, keys: list[str], base: Mapping[str, Any] | None, ctx: HEContext
) -> FLModel:
    """The script's result with ``keys`` encrypted as ``w · x`` (FULL weights; see the module
    docstring). ``base`` is the plain model the script started from (for a DIFF)."""
    if model.params is None:
        raise HEError("the result has no parameters to encrypt")
    params = {k: v for k, v in model.params.items() if k != HE_MODEL_KEY}
    if model.params_type == ParamsType.DIFF:
        if base is None:
            raise HEError("a DIFF result needs the task's model to become FULL weights")
        missing = [k for k in params if k not in base]
        if missing:
            raise HEError(f"the DIFF result has {missing[0]!r}, which the task's model has not")
        params = {k: (base[k] + v).to(base[k].dtype) for k, v in params.items()}
    absent = [k for k in keys if k not in params]
    if absent:
        raise HEError(f"the result has no {absent[0]!r}, which the job encrypts")
    weight = result_weight(model.meta)
    sealed, description = encrypt_params(params, keys, ctx, weight)
    return replace(
        model,
        params=sealed,
        params_type=ParamsType.FULL,
        meta={**(model.meta or {}), HE_META_KEY: description},
    )
