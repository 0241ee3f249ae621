"""Compression as filters: fewer bytes on the wire, undone before anyone reads the model.

A recipe's ``compression`` names a codec per direction::

    compression={"result": {"codec": "topk", "ratio": 0.01}, "task": "fp16"}

* ``result`` (sites → server): ``fp16``, ``bf16``, ``int8`` or ``topk`` (``ratio`` of each
  tensor's values kept, ``error_feedback`` on by default: what was not sent is added to the
  site's next update, kept in the site's folder across rounds);
* ``task`` (server → sites, the broadcast): ``fp16``, ``bf16`` or ``int8``. Top-k is refused
  there: a broadcast is a full model, and a sparse model delta only decodes against the
  previous model, which a site sampled in some rounds and not others does not have.

:func:`job_chain` places the codec around the job's privacy filters and a site's own:
``compress`` runs last where a model leaves (``result_out`` on a site, ``aggregate_out`` on the
server), ``decompress`` first where it arrives (``result_in``, ``task_in``). A result travels as
its *update* against the model the site received; the server adds the decoded update to the
model it meant to send (before its own compression), so the broadcast's rounding error never
enters the global model. The meta layout and the forms are in :mod:`fedctl.privacy.codecs`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import TASK_TRAIN, FLModel, ParamsType
from fedctl.codec.tensorfiles import load_file, save_file
from fedctl.codec.tensors import dtype_name
from fedctl.errors import CodecError
from fedctl.privacy import codecs
from fedctl.privacy.codecs import INDEX, META_KEY, SCALE, VERSION
from fedctl.privacy.context import (
    Filter,
    FilterContext,
    FilterError,
    FilterFailed,
    Params,
    _floats,
)
from fedctl.privacy.filters import FilterChain, Placed

if TYPE_CHECKING:
    import torch

#: the codecs a direction may use
CODECS = {"result": ("fp16", "bf16", "int8", "topk"), "task": ("fp16", "bf16", "int8")}
DIRECTIONS = ("result", "task")
#: where a site keeps top-k's residual (its state folder: sites/<site>/ or the job's folder)
RESIDUAL_FILE = "compression-residual.safetensors"


# ---------------------------------------------------------------------- the recipe's option


@dataclass(frozen=True)
class Codec:
    """One direction's codec and its settings (``ratio``, ``error_feedback``: top-k only)."""

    codec: str
    ratio: float | None = None
    error_feedback: bool | None = None

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"codec": self.codec}
        if self.codec == "topk":
            out.update(ratio=self.ratio, error_feedback=self.error_feedback)
        return out


@dataclass(frozen=True)
class Compression:
    """A recipe's ``compression``: the codec of each direction (None: not compressed)."""

    result: Codec | None = None
    task: Codec | None = None

    @classmethod
    def from_spec(cls, spec: Any, where: str = "compression") -> Compression | None:
        """Validate a recipe's ``compression`` (None: none); FilterError with one line."""
        if spec is None:
            return None
        example = "e.g. {'result': {'codec': 'topk', 'ratio': 0.01}, 'task': 'fp16'}"
        if not isinstance(spec, Mapping):
            raise FilterError(f"{where} must be a mapping of 'result' and/or 'task', {example}")
        for key in spec:
            if key not in DIRECTIONS:
                raise FilterError(
                    f"{where} has no direction {key!r}{_hint(key, DIRECTIONS)}; "
                    "the directions are result (sites → server) and task (server → sites)"
                )
        out = {d: _codec(spec[d], d, f"{where}.{d}") for d in DIRECTIONS if spec.get(d)}
        if not out:
            raise FilterError(f"{where} names no codec, {example}")
        return cls(**out)

    def spec(self) -> dict[str, Any]:
        return {d: c.spec() for d in DIRECTIONS if (c := getattr(self, d)) is not None}


def _hint(value: Any, choices: Any) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _codec(spec: Any, direction: str, where: str) -> Codec:
    if isinstance(spec, str):
        spec = {"codec": spec}
    if not isinstance(spec, Mapping) or "codec" not in spec:
        raise FilterError(f"{where} must be a codec name or a mapping with a 'codec'")
    args = dict(spec)
    name = args.pop("codec")
    choices = CODECS[direction]
    if name not in choices:
        why = ""
        if direction == "task" and name == "topk":
            why = (
                ": a broadcast is a full model, and a sparse delta of it decodes only against "
                "the previous one, which sites sampled in some rounds do not have"
            )
            raise FilterError(f"{where}: topk compresses results only{why}; use fp16, bf16 or int8")
        raise FilterError(
            f"{where}: unknown codec {name!r}{_hint(name, choices)}; the codecs are "
            f"{', '.join(choices)}"
        )
    accepted = ("ratio", "error_feedback") if name == "topk" else ()
    for key in args:
        if key not in accepted:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no arguments"
            raise FilterError(f"{where}: {name} has no argument {key!r} ({takes})")
    if name != "topk":
        return Codec(name)
    ratio = args.get("ratio", 0.01)
    ok = isinstance(ratio, int | float) and not isinstance(ratio, bool) and math.isfinite(ratio)
    if not (ok and 0 < ratio <= 1):
        raise FilterError(f"{where}: topk ratio must be a number > 0 and ≤ 1, got {ratio!r}")
    feedback = args.get("error_feedback", True)
    if not isinstance(feedback, bool):
        raise FilterError(f"{where}: topk error_feedback must be true or false, got {feedback!r}")
    return Codec("topk", float(ratio), feedback)


def check_secure(compression: Compression | None, secure: bool) -> None:
    """Refuse compressed results with secure aggregation (FilterError with the reason)."""
    if secure and compression is not None and compression.result is not None:
        raise FilterError(
            "compression of results does not go with secure_aggregation: sites mask their "
            "updates for a sum only the server's unmasking reveals, and compressed updates "
            "cannot be summed masked; compress the task direction only (secure_aggregation's "
            "own 'bits' set how many bits each value takes)"
        )


def job_chain(
    privacy: Any,
    compression: Any,
    *,
    secure: bool = False,
    site: FilterChain | None = None,
) -> FilterChain:
    """The filters of a job where it runs: decoding first, the job's privacy filters, a site's
    own (``site``), encoding last.

    When either direction is compressed, results travel as updates against the model the site
    received (``codec: none`` when results themselves are not compressed) so the server can
    add them to the model it meant to send; with secure aggregation the sites' masked updates
    already are (the server adds their sum to its own model) and only the task direction runs.
    """
    comp = compression if isinstance(compression, Compression) else None
    if comp is None and compression is not None:
        comp = Compression.from_spec(compression)
    check_secure(comp, secure)
    first: list[Placed] = []
    last: list[Placed] = []
    if comp is not None:
        if comp.task is not None:
            first.append(Placed(Decompress(comp.task.codec), "task_in"))
            last.append(Placed(Compress(comp.task.codec), "aggregate_out"))
        if not secure:
            result = comp.result or Codec("none")
            first.append(Placed(Decompress(result.codec), "result_in"))
            last.append(
                Placed(Compress(result.codec, result.ratio, result.error_feedback), "result_out")
            )
    chain = FilterChain(first).then(FilterChain.from_specs(privacy))
    return chain.then(site or FilterChain()).then(FilterChain(last))


def unencoded_nbytes(meta: Mapping[str, Any] | None) -> int:
    """Tensor bytes of a compressed broadcast before encoding (0 if it is not one): what a
    site's result is measured against."""
    info = (meta or {}).get(META_KEY)
    n = info.get("nbytes") if isinstance(info, Mapping) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


# ---------------------------------------------------------------------- the filters


class Compress(Filter):
    """Encode a model for the wire (placed by :func:`job_chain`, never by a privacy spec)."""

    name = "compress"
    points = ("result_out", "aggregate_out")
    summary = "encodes what leaves (fp16, bf16, int8, top-k) for fewer bytes on the wire"

    def __init__(
        self, codec: str, ratio: float | None = None, error_feedback: bool | None = None
    ) -> None:
        if codec not in codecs.FORMS:
            raise FilterError(f"unknown codec {codec!r}")
        self.codec = codec
        self.ratio = ratio if ratio is not None else 0.01
        self.error_feedback = bool(error_feedback) if codec == "topk" else False

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        params = model.params or {}
        meta = dict(model.meta or {})
        if META_KEY in meta:
            raise FilterFailed(f"meta key {META_KEY!r} is reserved for compression")
        reserved = next((k for k in params if codecs.is_companion(k)), None)
        if reserved is not None:
            raise FilterFailed(f"parameter name {reserved!r} is reserved for compression")
        if ctx.point == "aggregate_out":
            params = dict(params)  # computed once: the encoding and the server's reference
            ctx.unencoded = replace(model, params=params)
        base = ctx.base if ctx.point == "result_out" else None
        diff = model.params_type == ParamsType.DIFF
        sparse = self.codec == "topk" and ctx.task in (None, TASK_TRAIN)
        feedback = self.error_feedback and sparse
        residual = _load_residual(ctx) if feedback else {}
        new_residual: dict[str, torch.Tensor] = {}
        out: dict[str, Any] = {}
        entries: dict[str, list[str]] = {}
        kept = total = 0
        for name in params:
            t = params[name]
            if not _floats(t):
                out[name] = t
                continue
            t = t.detach()
            b = base.get(name) if base is not None else None
            if b is not None and not (_floats(b) and b.shape == t.shape):
                b = None
            value = t if diff or b is None else t - b.to(t.dtype)
            basis = "v" if b is None else "u"
            form, encoded = self._encode(name, value, basis, sparse, residual, new_residual)
            if form == "raw" and basis == "v":
                out[name] = t
                continue
            entries[name] = [form, dtype_name(t.dtype), basis]
            out.update(encoded)
            if form == "topk":
                kept += encoded[name + INDEX].numel()
                total += t.numel()
        if feedback:
            _save_residual(ctx, new_residual)
        info: dict[str, Any] = {"codec": self.codec, "version": VERSION, "tensors": entries}
        if ctx.point == "aggregate_out":
            info["nbytes"] = sum(int(t.numel()) * t.element_size() for t in params.values())
        meta[META_KEY] = info
        note: dict[str, Any] = {"codec": self.codec, "encoded": len(entries)}
        if total:
            note.update(kept=kept, of=total)
        ctx.note(self.name, **note)
        return replace(model, params=out, meta=meta)

    def _encode(
        self,
        name: str,
        value: torch.Tensor,
        basis: str,
        sparse: bool,
        residuals: Mapping[str, torch.Tensor],
        new_residual: dict[str, torch.Tensor],
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """(form, the tensors that carry ``value``) for one tensor; top-k adds the residual
        of earlier rounds first and leaves what it did not send in ``new_residual``."""
        import torch

        dtype = value.dtype
        if self.codec in ("fp16", "bf16"):
            half = codecs.encode_half(value, self.codec)
            if half is not None:
                return self.codec, {name: half}
        elif self.codec == "int8":
            q = codecs.encode_int8(value)
            if q is not None:
                return "int8", {name: q[0], name + SCALE: q[1]}
        elif self.codec == "topk" and sparse and basis == "u":
            p = value.to(codecs.work_dtype(dtype))
            residual = residuals.get(name)
            if residual is not None and residual.shape == p.shape and residual.dtype == p.dtype:
                p = p + residual
            n = p.numel()
            k = codecs.topk_count(n, self.ratio)
            if codecs.sparse_pays(n, k, value.element_size()) and bool(torch.isfinite(p).all()):
                values, idx = codecs.encode_topk(p, k, dtype)
                if self.error_feedback:
                    rest = p.reshape(-1).clone()
                    rest[idx.long()] -= values.to(p.dtype)
                    new_residual[name] = rest.reshape(p.shape)
                return "topk", {name: values, name + INDEX: idx}
            sent = p.to(dtype)
            if self.error_feedback and bool(torch.isfinite(p).all()):
                new_residual[name] = p - sent.to(p.dtype)  # the rounding of a dense send
            return "raw", {name: sent}
        return "raw", {name: value}


class Decompress(Filter):
    """Undo :class:`Compress` on arrival, checking everything the sender controls."""

    name = "decompress"
    points = ("task_in", "result_in")
    summary = "decodes what arrives compressed, before any other filter or the script"

    def __init__(self, codec: str) -> None:
        if codec not in codecs.FORMS:
            raise FilterError(f"unknown codec {codec!r}")
        self.codec = codec

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        params = model.params or {}
        meta = dict(model.meta or {})
        info = meta.pop(META_KEY, None)
        what = "result" if ctx.point == "result_in" else "task"
        try:
            entries = self._entries(info, params, what)
            out = self._decode(params, entries, model, ctx)
        except FilterFailed as exc:
            raise FilterFailed(f"compressed {what}: {exc}") from None
        except CodecError as exc:  # a lazily read tensor that went bad
            raise FilterFailed(f"compressed {what}: {exc}") from None
        return replace(model, params=out, meta=meta)

    def _entries(self, info: Any, params: Params, what: str) -> dict[str, tuple[str, str, str]]:
        """The per-tensor entries of the meta, validated against the job's codec."""
        if not isinstance(info, Mapping):
            raise FilterFailed(f"its meta has no {META_KEY!r} (the job compresses every {what})")
        if not set(info) <= {"codec", "version", "tensors", "nbytes"}:
            raise FilterFailed(f"{META_KEY!r} has unknown keys")
        if info.get("codec") != self.codec or info.get("version") != VERSION:
            raise FilterFailed(
                f"encoded as {info.get('codec')!r} (version {info.get('version')!r}); "
                f"the job uses {self.codec!r} (version {VERSION})"
            )
        tensors = info.get("tensors")
        if not isinstance(tensors, Mapping) or len(tensors) > len(params):
            raise FilterFailed(f"{META_KEY!r}.tensors must map at most every tensor sent")
        allowed = codecs.FORMS[self.codec]
        out: dict[str, tuple[str, str, str]] = {}
        for name, entry in tensors.items():
            ok = isinstance(entry, list) and len(entry) == 3
            if not ok or entry[0] not in allowed or entry[2] not in ("u", "v"):
                raise FilterFailed(
                    f"{name!r}: entry must be [form, dtype, basis] with a form of "
                    f"{', '.join(allowed)} and a basis u or v"
                )
            if name not in params:
                raise FilterFailed(f"{name!r} is described but not sent")
            out[name] = (entry[0], entry[1], entry[2])
        companion = {"int8": SCALE, "topk": INDEX}
        expected = {n + companion[e[0]] for n, e in out.items() if e[0] in companion}
        for name in params:
            if codecs.is_companion(name) and name not in expected:
                raise FilterFailed(f"unexpected tensor {name!r}")
        missing = sorted(expected - set(params))
        if missing:
            raise FilterFailed(f"{missing[0]!r} is missing")
        return out

    def _decode(
        self,
        params: Params,
        entries: dict[str, tuple[str, str, str]],
        model: FLModel,
        ctx: FilterContext,
    ) -> dict[str, Any]:
        base = ctx.base if ctx.point == "result_in" else None
        diff = model.params_type == ParamsType.DIFF
        out: dict[str, Any] = {}
        for name in params:
            if codecs.is_companion(name):
                continue
            entry = entries.get(name)
            if entry is None:
                out[name] = params[name]
                continue
            form, declared, basis = entry
            dtype = codecs.restore_dtype(name, declared)
            b = None
            if basis == "u":
                b = base.get(name) if base is not None else None
                if b is None or not _floats(b):
                    raise FilterFailed(
                        f"{name!r} is sent as an update, but the model its task carried has "
                        "no such tensor"
                    )
            if form == "topk":
                assert b is not None  # topk is only ever an update
                value = codecs.decode_topk(
                    name, params[name], params[name + INDEX], tuple(b.shape), dtype
                )
            elif form == "int8":
                value = codecs.decode_int8(name, params[name], params[name + SCALE], dtype)
            elif form in ("fp16", "bf16"):
                value = codecs.decode_half(name, params[name], form, dtype)
            else:
                value = codecs.restore_raw(name, params[name], dtype)
            if b is not None and tuple(value.shape) != tuple(b.shape):
                raise FilterFailed(
                    f"{name!r} has shape {list(value.shape)}, the model has {list(b.shape)}"
                )
            out[name] = value if b is None or diff else b.to(dtype) + value
        return out


# ---------------------------------------------------------------------- error feedback


def _load_residual(ctx: FilterContext) -> Mapping[str, torch.Tensor]:
    """What earlier rounds did not send (empty the first time, or if the file is unreadable:
    noted, never fatal)."""
    if ctx.state_dir is None:
        raise FilterFailed("top-k with error feedback needs the site's folder for its residual")
    path = ctx.state_dir / RESIDUAL_FILE
    if not path.exists():
        return {}
    try:
        return load_file(path)[0]
    except CodecError as exc:
        ctx.note("compress", residual_reset=str(exc))
        return {}


def _save_residual(ctx: FilterContext, residual: dict[str, torch.Tensor]) -> None:
    assert ctx.state_dir is not None
    save_file(residual, ctx.state_dir / RESIDUAL_FILE, durable=False)
