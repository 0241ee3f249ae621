"""``Recipe``: a federated job described once, run anywhere, exported as a job folder.

A recipe holds only declarative values (numbers, strings, lists, dicts), the initial model, and
the folder its client script lives in. Every constructor argument is kept as an attribute of the
same name, which is what makes a recipe exportable: ``to_spec()`` reads them back, and loading a
job folder calls the constructor again with them (so validation runs in both directions).

Job folder layout (the unit that is zipped, signed and submitted)::

    fedctl-job.yaml              kind, name, arguments, file hashes (declarative, no code)
    model/initial.safetensors    initial weights (safe framing, no pickle)
    code/                        the recipe folder: client script and its helper modules
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedctl._fs import sha256_file
from fedctl.aggregators.select import aggregator_label, min_results
from fedctl.codec.model import check_json
from fedctl.constants import MAX_CODE_BYTES
from fedctl.errors import CodecError, RecipeError
from fedctl.workflows.sampling import check_sample_spec

if TYPE_CHECKING:
    import torch

    from fedctl.recipe.run import Run
    from fedctl.workflows.base import Workflow

JOB_SPEC = "fedctl-job.yaml"
JOB_FORMAT = 1
_SKIP_DIRS = {"__pycache__", "fedctl-runs", "fedctl-workspace", "node_modules", "venv"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}
_FEDCTL_DIR = Path(__file__).resolve().parent.parent

#: kind → recipe class; job folders name a kind, never a class path (nothing is imported by name).
REGISTRY: dict[str, type[Recipe]] = {}


def _caller_dir() -> Path:
    """Folder of the first calling frame outside the fedctl package (the recipe file)."""
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith("<"):
            path = Path(filename).resolve()
            if _FEDCTL_DIR not in path.parents:
                return path.parent
        frame = frame.f_back
    return Path.cwd()


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
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            REGISTRY[cls.kind] = cls

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
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else _caller_dir()
        _check_name(name)
        self.name = name
        self.min_clients = _int("min_clients", min_clients, 1)
        self.num_rounds = _int("num_rounds", num_rounds, 1)
        self.train_args = _str("train_args", train_args)
        self.round_timeout = _opt_pos("round_timeout", round_timeout)
        self.wait_after_min = _opt_nonneg("wait_after_min", wait_after_min)
        if key_metric is not None:
            _str("key_metric", key_metric)
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
        self.federated_eval = _bool("federated_eval", federated_eval)
        self.eval_every = _int("eval_every", eval_every, 1)
        self.server_eval = self._check_function("server_eval", server_eval)
        self.cross_site_eval = _bool("cross_site_eval", cross_site_eval)

    # ------------------------------------------------------------------ validation

    def _check_script(self, train_script: str) -> str:
        if not isinstance(train_script, str) or not train_script:
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

    def _check_function(self, what: str, ref: Any) -> str | None:
        """A ``file.py:function`` reference to a file inside the recipe folder (or None)."""
        if ref is None:
            return None
        if not isinstance(ref, str) or ref.count(":") != 1:
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
        }

    # ------------------------------------------------------------------ running

    def run(self, env: Any) -> Run:
        """Run the recipe in ``env`` (SimEnv, PocEnv, ProdEnv) and return the Run."""
        runner = getattr(env, "run", None)
        if runner is None:
            raise RecipeError(f"{type(env).__name__} is not an environment (SimEnv, PocEnv, ...)")
        return runner(self)

    execute = run

    # ------------------------------------------------------------------ job folders

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
                f"recipe folder {self.base_dir} holds {_size(total)} of files "
                f"(limit {_size(MAX_CODE_BYTES)}; largest: {biggest}); keep data out of it"
            )
        return files

    def export(self, job_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write this recipe as a job folder; atomic (a failure leaves nothing behind)."""
        import yaml

        from fedctl.codec.tensors import save_file_hashed

        job_dir = Path(job_dir).resolve()
        if job_dir.exists() and any(job_dir.iterdir()) and not overwrite:
            raise RecipeError(f"{job_dir} already exists and is not empty")
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{job_dir.name}.", dir=job_dir.parent))
        try:
            files: dict[str, str] = {}
            for rel in self.code_files():
                dst = tmp / "code" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.base_dir / rel, dst)
                files[f"code/{rel.as_posix()}"] = sha256_file(dst)
            model_rel = "model/initial.safetensors"
            _, files[model_rel] = save_file_hashed(self.initial_params(), tmp / model_rel)
            spec = {
                "fedctl_job": JOB_FORMAT,
                "kind": self.kind,
                "name": self.name,
                "args": self.to_spec(),
                "model": model_rel,
                "code": "code",
                "files": files,
            }
            (tmp / JOB_SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
            if job_dir.exists():
                shutil.rmtree(job_dir)
            os.replace(tmp, job_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return job_dir

    # ------------------------------------------------------------------ comparison

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


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read initial weights: safetensors, or a .pt/.pth state_dict via torch's weights-only loader
    (a user's own file on their own machine; job folders always carry safetensors)."""
    import torch

    from fedctl.codec.tensors import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)[0]
        except CodecError as exc:
            raise RecipeError(str(exc)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RecipeError(f"{path}: cannot read as a weights-only state_dict: {exc}") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RecipeError(f"{path}: expected a state_dict (names → tensors)")
    return dict(obj)


@dataclass
class JobSpec:
    """A validated job folder: its spec, its recipe class, where its model and code are."""

    root: Path
    spec: dict[str, Any]
    cls: type[Recipe]
    model: Path
    code: Path

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def train_script(self) -> str:
        return str(self.spec["args"]["train_script"])

    @property
    def train_args(self) -> str:
        return str(self.spec["args"].get("train_args", ""))


def read_job_spec(
    job_dir: str | os.PathLike[str], *, verify: bool = True, need_model: bool = True
) -> JobSpec:
    """Read and validate a job folder's spec without building the recipe.

    Checks the format, the recipe kind (from fedctl's registry, never a class path), argument
    names, that every path stays inside the folder, and every file's hash. ``need_model=False``
    accepts a folder without the initial model (what sites receive: each task carries the
    current model, so they never need the initial one).
    """
    import yaml

    job_dir = Path(job_dir).resolve()
    spec_path = job_dir / JOB_SPEC
    if not spec_path.is_file():
        raise RecipeError(f"{job_dir}: not a job folder (no {JOB_SPEC})")
    try:
        spec = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{spec_path}: invalid YAML: {exc}") from None
    expected = {"fedctl_job", "kind", "name", "args", "model", "code", "files"}
    if not isinstance(spec, dict) or set(spec) != expected:
        raise RecipeError(f"{spec_path}: expected exactly the keys {sorted(expected)}")
    if spec["fedctl_job"] != JOB_FORMAT:
        raise RecipeError(f"{spec_path}: unsupported job format {spec['fedctl_job']!r}")
    cls = REGISTRY.get(spec["kind"]) if isinstance(spec["kind"], str) else None
    if cls is None:
        raise RecipeError(f"{spec_path}: unknown recipe kind {spec['kind']!r}")
    if not isinstance(spec["args"], dict):
        raise RecipeError(f"{spec_path}: args must be a mapping")
    unknown = set(spec["args"]) - set(cls.arg_names())
    if unknown:
        raise RecipeError(f"{spec_path}: unknown argument {sorted(unknown)[0]!r} for {cls.kind}")
    model = _inside(job_dir, spec["model"], spec_path, "model")
    code = _inside(job_dir, spec["code"], spec_path, "code")
    script = spec["args"].get("train_script")
    if not isinstance(script, str) or not (code / script).resolve().is_relative_to(code):
        raise RecipeError(f"{spec_path}: train_script must be a path inside {spec['code']}")
    files = spec["files"]
    if not isinstance(files, dict):
        raise RecipeError(f"{spec_path}: files must map paths to SHA-256 hashes")
    if verify:
        for rel, digest in files.items():
            path = _inside(job_dir, rel, spec_path, "files")
            if not need_model and path == model:
                continue
            if not path.is_file():
                raise RecipeError(f"{job_dir}: {rel} is listed in {JOB_SPEC} but missing")
            if sha256_file(path) != digest:
                raise RecipeError(f"{job_dir}: {rel} does not match its hash in {JOB_SPEC}")
    if not (code / script).is_file():
        raise RecipeError(f"{job_dir}: train_script {script!r} is missing")
    return JobSpec(job_dir, spec, cls, model, code)


def load_job(job_dir: str | os.PathLike[str], *, verify: bool = True) -> Recipe:
    """Load a job folder written by :meth:`Recipe.export` back into an equal recipe.

    The spec is validated strictly (see :func:`read_job_spec`), then the arguments once more by
    the recipe's own constructor; nothing in the folder is executed.
    """
    js = read_job_spec(job_dir, verify=verify)
    try:
        return js.cls(**js.spec["args"], model=js.model, base_dir=js.code)
    except TypeError as exc:
        raise RecipeError(f"{js.root / JOB_SPEC}: {exc}") from None


def _inside(root: Path, rel: Any, spec_path: Path, key: str) -> Path:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise RecipeError(f"{spec_path}: {key} must be a relative path")
    path = (root / rel).resolve()
    if root not in path.parents and path != root:
        raise RecipeError(f"{spec_path}: {key} path {rel!r} escapes the job folder")
    return path


# ---------------------------------------------------------------------- small validators


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise RecipeError("name must be a non-empty string of at most 64 characters")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise RecipeError(f"name {name!r} may contain only letters, digits, '-', '_' and '.'")


def _int(what: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _bool(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{what} must be true or false, got {value!r}")
    return value


def check_number(
    what: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a float if it is a number within the bounds, else a RecipeError."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        bounds = [
            f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<", lt), ("<=", le)) if b is not None
        ]
        where = f" ({' and '.join(bounds)})" if bounds else ""
        raise RecipeError(f"{what} must be a number{where}, got {value!r}")
    return float(value)


def _str(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RecipeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _opt_pos(what: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RecipeError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def _opt_nonneg(what: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise RecipeError(f"{what} must be a number of seconds ≥ 0 or None, got {value!r}")
    return float(value)
