"""Reserved names that server-side algorithms and client helpers agree on.

They live here, in the codec, because both sides import them and neither may import the other:
workflows put them into tasks, ``fedctl.client`` helpers read them from what a script received.
"""

from __future__ import annotations

#: ``FLModel.meta`` key of an evaluation result: how many samples the metrics were computed on
#: (the weight of that site's metrics in the federated average). FedNova also reads it from
#: training results as the site's data weight.
NUM_SAMPLES_KEY = "NUM_SAMPLES"

#: ``FLModel.meta`` key of a training task: FedProx's proximal coefficient mu.
FEDPROX_MU_KEY = "fedprox_mu"

#: ``FLModel.meta`` key of a training task: present (True) when the server runs SCAFFOLD.
SCAFFOLD_KEY = "scaffold"
#: Prefix of params entries holding the server control variate ``c`` (server → site).
SCAFFOLD_C_PREFIX = "scaffold.c:"
#: Prefix of params entries holding a site's control-variate change ``Δc_i`` (site → server).
SCAFFOLD_DC_PREFIX = "scaffold.dc:"

#: ``FLModel.meta`` key of every task under personalization (FedBN, partial sharing):
#: ``{"fedbn": bool, "shared": [patterns] | None, "local": [patterns]}``.
PERSONAL_KEY = "personalization"

#: ``FLModel.meta`` key of an evaluation task: ``"federated"`` (the round's global model) or
#: ``"cross_site"`` (with ``MODEL_OWNER_KEY`` naming whose model it is).
EVAL_KIND_KEY = "evaluation"
MODEL_OWNER_KEY = "model_owner"

#: Names of state_dict entries that are running statistics, not trained parameters: server
#: optimizers and FedNova's rescaling leave them as the plain aggregate.
STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str) -> bool:
    """True for a batch-norm running statistic (by its state_dict name)."""
    return name.rsplit(".", 1)[-1] in STAT_SUFFIXES


def matches(name: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    """True when ``name`` matches one of the glob ``patterns`` (``*``, ``?``, ``[...]``)."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, p) for p in patterns or ())


def stays_local(
    name: str, spec: dict | None, bn_prefixes: set[str] | frozenset[str] = frozenset()
) -> bool:
    """Whether a state_dict entry stays on the site under a personalization ``spec``
    (the ``PERSONAL_KEY`` meta): it matches a ``local`` pattern, or ``shared`` patterns are given
    and it matches none, or FedBN is on and it belongs to a batch-norm layer (``bn_prefixes``
    holds those layers' module names)."""
    if not spec:
        return False
    if matches(name, spec.get("local")):
        return True
    shared = spec.get("shared")
    if shared is not None and not matches(name, shared):
        return True
    return bool(spec.get("fedbn")) and name.rpartition(".")[0] in bn_prefixes


def bn_prefixes_from_names(names: list[str] | set[str]) -> set[str]:
    """Module names of batch-norm layers, recognised in a state_dict by their running mean."""
    return {n[: -len(".running_mean")] for n in names if n.endswith(".running_mean")}
