"""``Recipe``: a federated job described once, run anywhere, exported as a job folder.

A recipe holds only declarative values (numbers, strings, lists, dicts), the initial model, and
the folder its client script lives in. Every constructor argument is kept as an attribute of the
same name, which is what makes a recipe exportable: ``to_spec()`` reads them back, and loading a
job folder (:mod:`fedctl.recipe.jobfolder`) calls the constructor again with them (so validation
runs in both directions). ``recipe.run(env)`` hands the recipe to an environment (anything with
a ``run(recipe) -> Run`` method, the :class:`ExecEnv` protocol): the recipe does not know the
simulator or the runtime, they know it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from fedctl.aggregators.select import aggregator_label, min_results, parse_aggregator
from fedctl.codec.model import check_json
from fedctl.constants import MAX_CODE_BYTES
from fedctl.errors import CodecError, RecipeError
from fedctl.recipe.checks import (
    check_bool,
    check_int,
    check_name,
    check_opt_nonneg,
    check_opt_pos,
    check_str,
    size_text,
)
from fedctl.recipe.jobfolder import JOB_SPEC, load_weights, write_job
from fedctl.recipe.registry import register_builtin
from fedctl.sampling import check_sample_spec

if TYPE_CHECKING:
    import torch

    from fedctl.tracking.run import Run
    from fedctl.workflows.base import Workflow

_SKIP_DIRS = {"__pycache__", "fedctl-runs", "fedctl-workspace", "node_modules", "venv"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}
_FEDCTL_DIR = Path(__file__).resolve().parent.parent


@runtime_checkable
class ExecEnv(Protocol):
    """Where a recipe runs: ``SimEnv``, ``PocEnv``, ``ProdEnv`` or your own."""

    def run(self, recipe: Recipe) -> Run:
        """Run ``recipe`` to its end and describe how it went."""
        ...


def _caller_dir() -> Path:
    """Folder of the first calling frame outside the fedctl package and outside any recipe
    class's ``__init__`` (a plugin's recipe class calls ours): the recipe file's folder."""
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        in_recipe_init = frame.f_code.co_name == "__init__" and isinstance(
            frame.f_locals.get("self"), Recipe
        )
        if not filename.startswith("<") and not in_recipe_init:
            path = Path(filename).resolve()
            if _FEDCTL_DIR not in path.parents:
                return path.parent
        frame = frame.f_back
    return Path.cwd()


#: recipe arguments that mean FedAvg-style aggregation on the server: kinds whose server does not
#: aggregate so (cyclic, swarm, Flower apps; asynchronous ones in part) refuse them (``refuse``)
AGGREGATION_ARGS = (
    "aggregator",
    "sample_clients",
    "federated_eval",
    "server_eval",
    "cross_site_eval",
    "central_dp",
    "secure_aggregation",
    "homomorphic_encryption",
)


class Recipe:
    """Base class of all recipes. Subclasses set ``kind``, take their own keyword arguments
    (stored under the same names) and build their workflow in :meth:`build_workflow`."""

    kind: ClassVar[str] = ""
    #: one line for ``fedctl recipe list``
    summary: ClassVar[str] = ""
    #: the paper the algorithm comes from (``fedctl recipe show``)
    paper: ClassVar[str] = ""
    #: a runnable example folder in the repository, e.g. ``recipes/fedprox``
    example: ClassVar[str] = ""
    #: argument → one-line meaning; merged along the class hierarchy by :meth:`parameters`
    param_docs: ClassVar[dict[str, str]] = {
        "name": "job name: letters, digits, '-', '_', '.'; at most 64",
        "min_clients": "results each round needs (fewer by the deadline fails the job)",
        "num_rounds": "rounds to run",
        "model": "initial model: nn.Module, state_dict, or .safetensors/.pt path",
        "train_script": "client script, relative to the recipe's folder",
        "train_args": "the client script's command line",
        "round_timeout": "seconds a round may take (None: no deadline)",
        "wait_after_min": "once min_clients results are in, wait at most this long for the rest",
        "key_metric": "metric that picks the best global model",
        "key_metric_mode": "'max' or 'min' for key_metric",
        "precision": "aggregation accumulator: auto, float64 or float32",
        "task_meta": "JSON values every site receives in FLModel.meta",
        "aggregator": "'mean' (default), 'median', or {'name': 'trimmed_mean'|'krum'|"
        "'multi_krum'|'bulyan', ...}",
        "sample_clients": "sites per round: None (all), a fraction in (0, 1], or a count",
        "federated_eval": "evaluate each new global model on the sites (is_evaluate tasks)",
        "eval_every": "evaluate every k rounds (and after the last)",
        "server_eval": "'file.py:function' in the recipe folder, run on the server each "
        "evaluation with (params, current_round) -> metrics",
        "cross_site_eval": "after the last round, evaluate every site's model and the global "
        "model on every site",
        "privacy": "privacy filters: [{'name': 'clip_update', 'max_norm': 1.0, 'at': "
        "'result_out'}, ...] (docs/privacy.md)",
        "central_dp": "DP-FedAvg: {'noise_multiplier': z, 'clip': C, 'target_epsilon': ..., "
        "'delta': ..., 'adaptive': ...} (docs/privacy.md)",
        "secure_aggregation": "true or {'clip': 8.0, 'bits': 32, 'max_weight': ..., "
        "'neighbours': ..., 'threshold': ...}: the server sees only the sum of the updates "
        "(docs/secagg.md)",
        "homomorphic_encryption": "true or {'keys': [parameter names]}: those parameters travel "
        "and are summed as CKKS ciphertexts the server cannot read (docs/he.md)",
        "compression": "fewer bytes on the wire: {'result': 'fp16'|'bf16'|'int8'|{'codec': "
        "'topk', 'ratio': 0.01}, 'task': 'fp16'|'bf16'|'int8'} (docs/compression.md)",
        "tracking": "metrics sinks of this job: {'tensorboard': bool, 'mlflow': bool or "
        "{'tracking_uri': ..., 'experiment': ...}}; None: the environment's (docs/tracking.md)",
    }
    #: whether the kind's workflow can run with central_dp (its aggregation is a plain mean)
    supports_central_dp: ClassVar[bool] = True
    #: whether the kind's new global model is the plain weighted mean (FedAvg, FedProx); not
    #: inherited: a subclass that changes the aggregate must not get it by accident
    supports_homomorphic_encryption: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "supports_homomorphic_encryption" not in cls.__dict__:
            cls.supports_homomorphic_encryption = False
        register_builtin(cls)  # fedctl's own kinds; plugins register through their entry point

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        round_timeout: float | None = 3600.0,
        wait_after_min: float | None = None,
        key_metric: str | None = "accuracy",
        key_metric_mode: str = "max",
        precision: str = "auto",
        task_meta: dict[str, Any] | None = None,
        aggregator: str | dict[str, Any] | None = None,
        sample_clients: int | float | None = None,
        federated_eval: bool = False,
        eval_every: int = 1,
        server_eval: str | None = None,
        cross_site_eval: bool = False,
        privacy: list[Any] | None = None,
        central_dp: dict[str, Any] | None = None,
        secure_aggregation: bool | dict[str, Any] | None = None,
        homomorphic_encryption: bool | dict[str, Any] | None = None,
        compression: dict[str, Any] | None = None,
        tracking: dict[str, Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else _caller_dir()
        check_name(name)
        self.name = name
        self.min_clients = check_int("min_clients", min_clients, 1)
        self.num_rounds = check_int("num_rounds", num_rounds, 1)
        self.train_args = check_str("train_args", train_args)
        self.round_timeout = check_opt_pos("round_timeout", round_timeout)
        self.wait_after_min = check_opt_nonneg("wait_after_min", wait_after_min)
        if key_metric is not None:
            check_str("key_metric", key_metric)
        self.key_metric = key_metric
        if key_metric_mode not in ("max", "min"):
            raise RecipeError(f"key_metric_mode must be 'max' or 'min', got {key_metric_mode!r}")
        self.key_metric_mode = key_metric_mode
        if precision not in ("auto", "float64", "float32"):
            raise RecipeError(f"precision must be auto, float64 or float32, got {precision!r}")
        self.precision = precision
        try:
            self.task_meta = dict(check_json(task_meta or {}, "task_meta"))
        except CodecError as exc:
            raise RecipeError(str(exc)) from None
        self.train_script = self._check_script(train_script)
        self.model = self._check_model(model)
        self.aggregator = self._check_aggregator(aggregator)
        try:
            check_sample_spec(sample_clients, self.min_clients)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        self.sample_clients = sample_clients
        self.federated_eval = check_bool("federated_eval", federated_eval)
        self.eval_every = check_int("eval_every", eval_every, 1)
        self.server_eval = self._check_function("server_eval", server_eval)
        self.cross_site_eval = check_bool("cross_site_eval", cross_site_eval)
        self.privacy = self._check_privacy(privacy)
        self.central_dp = self._check_central_dp(central_dp)
        self.secure_aggregation = self._check_secure_aggregation(secure_aggregation)
        self.homomorphic_encryption = self._check_he(homomorphic_encryption)
        self.compression = self._check_compression(compression)
        self.tracking = self._check_tracking(tracking)

    # ------------------------------------------------------------------ validation

    def _check_script(self, train_script: str) -> str:
        if not isinstance(train_script, str) or not train_script or "\0" in train_script:
            raise RecipeError("train_script must be the path of the client script")
        path = (self.base_dir / train_script).resolve()
        if self.base_dir != path and self.base_dir not in path.parents:
            raise RecipeError(f"train_script {train_script!r} must be inside {self.base_dir}")
        if not path.is_file():
            raise RecipeError(f"train_script {train_script!r} not found in {self.base_dir}")
        return path.relative_to(self.base_dir).as_posix()

    def _check_model(self, model: Any) -> Any:
        import torch

        if isinstance(model, torch.nn.Module):
            return model
        if isinstance(model, Mapping):
            if not model or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
            ):
                raise RecipeError("model given as a dict must map parameter names to tensors")
            return dict(model)
        if isinstance(model, str | os.PathLike):
            path = Path(model)
            if not path.is_absolute():
                path = (self.base_dir / path).resolve()
            if not path.is_file():
                raise RecipeError(f"model file {str(model)!r} not found")
            if path.suffix not in (".safetensors", ".pt", ".pth"):
                raise RecipeError(
                    f"model file {path.name}: use .safetensors (or a .pt/.pth state_dict)"
                )
            return path
        raise RecipeError(
            f"model must be an nn.Module, a state_dict or a path to weights, "
            f"got {type(model).__name__}"
        )

    def _check_aggregator(self, spec: Any) -> Any:
        try:
            check_json(spec, "aggregator")
            required = min_results(spec)
        except (ValueError, CodecError) as exc:
            raise RecipeError(str(exc)) from None
        if self.min_clients < required:
            raise RecipeError(
                f"aggregator {aggregator_label(spec)} needs at least {required} results per "
                f"round, but min_clients is {self.min_clients}"
            )
        return spec

    def _check_privacy(self, specs: Any) -> list[Any] | None:
        """The job's privacy filters, validated (names from the registry, arguments, points)."""
        from fedctl.privacy.filters import FilterChain, FilterError

        if specs is None:
            return None
        try:
            chain = FilterChain.from_specs(specs)
        except FilterError as exc:
            raise RecipeError(str(exc)) from None
        return chain.specs()

    def _check_central_dp(self, spec: Any) -> dict[str, Any] | None:
        from fedctl.privacy.dp import CentralDP, DPError

        try:
            dp = CentralDP.from_spec(spec)
        except DPError as exc:
            raise RecipeError(str(exc)) from None
        if dp is None:
            return None
        if not self.supports_central_dp:
            raise RecipeError(
                f"{self.kind} does not support central_dp (its aggregation is not a plain mean); "
                "use fedavg, fedprox, fedavgm or a fedopt recipe"
            )
        if parse_aggregator(self.aggregator)[0] != "mean":
            raise RecipeError("central_dp sums clipped updates: it takes no robust aggregator")
        return dp.spec()

    def _check_secure_aggregation(self, spec: Any) -> dict[str, Any] | None:
        from fedctl.errors import FedctlError
        from fedctl.privacy.filters import FilterChain
        from fedctl.workflows.secure import SecureAggregation, check_compatible

        try:
            sa = SecureAggregation.from_spec(spec)
        except (FedctlError, TypeError) as exc:
            raise RecipeError(str(exc)) from None
        if sa is None:
            return None
        if not self.supports_central_dp:
            raise RecipeError(
                f"{self.kind} does not support secure_aggregation (its aggregation is not a "
                "plain mean); use fedavg, fedprox, fedavgm or a fedopt recipe"
            )
        if self.central_dp is not None and self.central_dp.get("adaptive"):
            raise RecipeError(
                "adaptive clipping needs every update's norm: it does not go with "
                "secure_aggregation (give central_dp a fixed clip)"
            )
        try:
            check_compatible(
                sa,
                aggregator_name=parse_aggregator(self.aggregator)[0],
                result_in=bool(FilterChain.from_specs(self.privacy).at("result_in")),
                cross_site_eval=self.cross_site_eval,
            )
        except FedctlError as exc:
            raise RecipeError(str(exc)) from None
        return sa.spec()

    def _check_he(self, spec: Any) -> dict[str, Any] | None:
        from fedctl.errors import FedctlError
        from fedctl.privacy.filters import FilterChain
        from fedctl.workflows.he import HomomorphicEncryption, check_compatible

        try:
            he = HomomorphicEncryption.from_spec(spec)
            if he is None:
                return None
            if not self.supports_homomorphic_encryption:
                raise RecipeError(
                    f"{self.kind} does not support homomorphic_encryption (its server changes "
                    "the aggregate); use a fedavg or fedprox recipe"
                )
            chain = FilterChain.from_specs(self.privacy)
            check_compatible(
                he,
                aggregator_name=parse_aggregator(self.aggregator)[0],
                central_dp=self.central_dp is not None,
                secure_aggregation=self.secure_aggregation is not None,
                server_filters=bool(chain.at("result_in") or chain.at("aggregate_out")),
                server_eval=self.server_eval is not None,
                cross_site_eval=self.cross_site_eval,
            )
            if he.keys is not None and not isinstance(self.model, Path):
                from fedctl.privacy.he import select_keys

                select_keys(self.initial_params(), list(he.keys))
        except FedctlError as exc:
            msg = str(exc)
            if not msg.startswith("homomorphic_encryption"):
                msg = f"homomorphic_encryption: {msg}"
            raise RecipeError(msg) from None
        return he.spec()

    def _check_compression(self, spec: Any) -> dict[str, Any] | None:
        from fedctl.privacy.compression import Compression, check_secure
        from fedctl.privacy.filters import FilterError

        try:
            check_json(spec, "compression")
            comp = Compression.from_spec(spec)
            check_secure(comp, self.secure_aggregation is not None)
        except (FilterError, CodecError) as exc:
            raise RecipeError(str(exc)) from None
        if comp is None:
            return None
        if self.homomorphic_encryption is not None:
            raise RecipeError(
                "compression does not go with homomorphic_encryption: ciphertexts do not compress "
                "and the server cannot decode what it cannot read"
            )
        return comp.spec()

    def _check_tracking(self, spec: Any) -> dict[str, Any] | None:
        from fedctl.tracking.sinks import check_job_tracking

        try:
            check_json(spec, "tracking")
            return check_job_tracking(spec)
        except (ValueError, CodecError) as exc:
            raise RecipeError(str(exc)) from None

    def _check_function(self, what: str, ref: Any) -> str | None:
        """A ``file.py:function`` reference to a file inside the recipe folder (or None)."""
        if ref is None:
            return None
        if not isinstance(ref, str) or ref.count(":") != 1 or "\0" in ref:
            raise RecipeError(f"{what} must be 'file.py:function', got {ref!r}")
        file, func = ref.split(":")
        if not file.endswith(".py") or not func.isidentifier():
            raise RecipeError(f"{what} must be 'file.py:function', got {ref!r}")
        path = (self.base_dir / file).resolve()
        if self.base_dir not in path.parents:
            raise RecipeError(f"{what} file {file!r} must be inside {self.base_dir}")
        if not path.is_file():
            raise RecipeError(f"{what} file {file!r} not found in {self.base_dir}")
        return ref

    # ------------------------------------------------------------------ declarative view

    @classmethod
    def parameters(cls) -> list[dict[str, Any]]:
        """Each argument's name, whether it is required, its default and its meaning."""
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            docs.update(getattr(klass, "__dict__", {}).get("param_docs", {}))
        out = []
        for name in ["model", *cls.arg_names()]:
            default: Any = inspect.Parameter.empty
            for klass in cls.__mro__:
                init = klass.__dict__.get("__init__")
                if init is None or klass is object:
                    continue
                p = inspect.signature(init).parameters.get(name)
                if p is not None:
                    default = p.default
                    break
            required = default is inspect.Parameter.empty
            out.append(
                {
                    "name": name,
                    "required": required,
                    "default": None if required else default,
                    "doc": docs.get(name, ""),
                }
            )
        order = {"name": 0, "min_clients": 1, "num_rounds": 2, "model": 3}
        return sorted(out, key=lambda p: order.get(p["name"], 4))

    @classmethod
    def arg_names(cls) -> list[str]:
        """The constructor arguments that make up the declarative spec."""
        names: list[str] = []
        skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind not in skip and p.name not in ("self", "model", "base_dir", *names):
                    names.append(p.name)
        return names

    def to_spec(self) -> dict[str, Any]:
        """The recipe's arguments as plain data (everything except the model and folder)."""
        return {name: getattr(self, name) for name in self.arg_names()}

    def with_overrides(self, **changes: Any) -> Recipe:
        """A copy with some arguments changed (validated like a new recipe)."""
        args = {**self.to_spec(), **{k: v for k, v in changes.items() if v is not None}}
        unknown = set(changes) - set(args) - {"model"}
        if unknown:
            raise RecipeError(f"{self.kind} recipe has no argument {sorted(unknown)[0]!r}")
        return type(self)(**args, model=changes.get("model") or self.model, base_dir=self.base_dir)

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The initial global model as a state_dict of CPU tensors."""
        import torch

        if isinstance(self.model, torch.nn.Module):
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if isinstance(self.model, dict):
            return {k: v.detach().cpu() for k, v in self.model.items()}
        return load_weights(self.model)

    def build_workflow(self) -> Workflow:
        """The server-side workflow that runs this recipe."""
        raise NotImplementedError

    def workflow_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every FedAvg-family workflow takes, from this recipe.

        ``server_eval`` is loaded here, on the side that runs the workflow: it is code from the
        job's folder (the user's own in simulation; a server may refuse jobs that use it).
        """
        server_eval = None
        if self.server_eval is not None:
            from fedctl.recipe.hooks import load_function

            server_eval = load_function(self.base_dir, self.server_eval, "server_eval")
        return {
            "round_timeout": self.round_timeout,
            "wait_after_min": self.wait_after_min,
            "precision": self.precision,
            "task_meta": self.task_meta,
            "sample_clients": self.sample_clients,
            "aggregator": self.aggregator,
            "federated_eval": self.federated_eval,
            "eval_every": self.eval_every,
            "server_eval": server_eval,
            "cross_site_eval": self.cross_site_eval,
            **({"central_dp": self.central_dp} if self.central_dp is not None else {}),
            **(
                {"secure_aggregation": self.secure_aggregation}
                if self.secure_aggregation is not None
                else {}
            ),
            **(
                {"homomorphic_encryption": self.homomorphic_encryption}
                if self.homomorphic_encryption is not None
                else {}
            ),
        }

    # ------------------------------------------------------------------ running

    def run(self, env: ExecEnv) -> Run:
        """Run the recipe in ``env`` (SimEnv, PocEnv, ProdEnv) and return the Run."""
        if not isinstance(env, ExecEnv):
            raise RecipeError(f"{type(env).__name__} is not an environment (SimEnv, PocEnv, ...)")
        return env.run(self)

    execute = run

    # ------------------------------------------------------------------ job folders

    @classmethod
    def refuse(cls, kwargs: Mapping[str, Any], names: Sequence[str], why: str) -> None:
        """One line for the first of ``names`` set in ``kwargs``: arguments a kind whose
        server does not aggregate as FedAvg's does cannot honour (``why``)."""
        used = [k for k in names if kwargs.get(k) not in (None, False)]
        if used:
            raise RecipeError(f"{cls.kind} does not take {used[0]}: {why}")

    def generated_code(self) -> dict[str, str]:
        """Files fedctl writes into the job's code besides the recipe folder's (name → text)."""
        return {}

    def code_files(self) -> list[Path]:
        """Files of the recipe folder that go into a job (relative paths), size-checked."""
        files: list[Path] = []
        total = 0
        for root, dirs, names in os.walk(self.base_dir):
            rootp = Path(root)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and d not in _SKIP_DIRS
                and not (rootp / d).is_symlink()
                and not (rootp / d / "result.json").exists()
                and not (rootp / d / JOB_SPEC).exists()
            )
            for n in sorted(names):
                p = rootp / n
                if n.startswith(".") or p.suffix in _SKIP_SUFFIXES or not p.is_file():
                    continue
                total += p.stat().st_size
                files.append(p.relative_to(self.base_dir))
        if total > MAX_CODE_BYTES:
            biggest = max(files, key=lambda f: (self.base_dir / f).stat().st_size)
            raise RecipeError(
                f"recipe folder {self.base_dir} holds {size_text(total)} of files "
                f"(limit {size_text(MAX_CODE_BYTES)}; largest: {biggest}); keep data out of it"
            )
        return files

    def export(self, job_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write this recipe as a job folder (see :mod:`fedctl.recipe.jobfolder`); atomic."""
        return write_job(self, job_dir, overwrite=overwrite)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Recipe)
        if self.to_spec() != other.to_spec():
            return False
        a, b = self.initial_params(), other.initial_params()
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all())
            for k in a
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_spec().items())
        return f"{type(self).__name__}({args})"
