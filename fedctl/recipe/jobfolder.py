"""Job folders: what ``Recipe.export`` writes and what servers, sites and the simulator load.

Layout (the unit that is zipped, signed and submitted)::

    fedctl-job.yaml              kind, name, arguments, file hashes (declarative, no code)
    model/initial.safetensors    initial weights (safe framing, never a pickle)
    code/                        the recipe folder: client script and its helper modules

A job folder names its recipe *kind*, looked up in the registry of fedctl's own kinds and
installed plugins (:mod:`fedctl.recipe.registry`), never a class path, and carries its model
only as safetensors: loading one imports nothing the job names and unpickles nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import sha256_file
from fedctl._yaml import YAMLInputError, dump_yaml, load_yaml
from fedctl.codec.jsondata import check_json
from fedctl.errors import CodecError, RecipeError
from fedctl.recipe.registry import REGISTRY, check_recipe, lookup

if TYPE_CHECKING:
    import torch

    from fedctl.recipe.base import Recipe

JOB_SPEC = "fedctl-job.yaml"
JOB_FORMAT = 1
MODEL_FILE = "model/initial.safetensors"
#: a job spec (arguments and file hashes) larger than this is refused
MAX_SPEC_BYTES = 4 * 1024 * 1024

__all__ = [
    "JOB_SPEC",
    "MODEL_FILE",
    "REGISTRY",
    "JobSpec",
    "load_job",
    "load_weights",
    "read_job_spec",
    "write_job",
]


def write_job(recipe: Recipe, job_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``recipe`` as a job folder; atomic (a failure leaves nothing behind).

    Refused, before anything is written, when a server could not run it: a kind that is neither
    built in nor from an installed plugin, or a class that is not its kind's class."""
    from fedctl.codec.tensorfiles import save_file_hashed

    check_recipe(recipe)
    job_dir = Path(job_dir).resolve()
    if job_dir.exists() and any(job_dir.iterdir()) and not overwrite:
        raise RecipeError(f"{job_dir} already exists and is not empty")
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job_dir.name}.", dir=job_dir.parent))
    try:
        files: dict[str, str] = {}
        for rel in recipe.code_files():
            dst = tmp / "code" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(recipe.base_dir / rel, dst)
            files[f"code/{rel.as_posix()}"] = sha256_file(dst)
        for name, text in recipe.generated_code().items():  # e.g. a Flower app's client script
            dst = tmp / "code" / name
            dst.write_text(text)
            files[f"code/{name}"] = sha256_file(dst)
        # a .pt model is read here, on the user's machine, and leaves only as safetensors
        _, files[MODEL_FILE] = save_file_hashed(recipe.initial_params(), tmp / MODEL_FILE)
        spec = {
            "fedctl_job": JOB_FORMAT,
            "kind": recipe.kind,
            "name": recipe.name,
            "args": recipe.to_spec(),
            "model": MODEL_FILE,
            "code": "code",
            "files": files,
        }
        (tmp / JOB_SPEC).write_text(dump_yaml(spec))
        if job_dir.exists():
            shutil.rmtree(job_dir)
        os.replace(tmp, job_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return job_dir


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read initial weights: safetensors, or a .pt/.pth state_dict via torch's weights-only loader
    (a user's own file on their own machine; job folders always carry safetensors)."""
    import torch

    from fedctl.codec.tensorfiles import load_file

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
    job_dir = Path(job_dir).resolve()
    spec_path = job_dir / JOB_SPEC
    if not spec_path.is_file():
        raise RecipeError(f"{job_dir}: not a job folder (no {JOB_SPEC})")
    try:
        # no anchors or aliases, bounded size and depth: a job spec cannot be a YAML bomb
        spec = load_yaml(spec_path.read_bytes(), source=str(spec_path), max_bytes=MAX_SPEC_BYTES)
        spec = check_json(spec.data, str(spec_path))  # plain data, 64-bit ints, no NaN
    except (YAMLInputError, CodecError) as exc:
        raise RecipeError(str(exc)) from None
    expected = {"fedctl_job", "kind", "name", "args", "model", "code", "files"}
    if not isinstance(spec, dict) or set(spec) != expected:
        raise RecipeError(f"{spec_path}: expected exactly the keys {sorted(expected)}")
    if spec["fedctl_job"] != JOB_FORMAT:
        raise RecipeError(f"{spec_path}: unsupported job format {spec['fedctl_job']!r}")
    cls = lookup(spec["kind"])  # fedctl's own kinds and installed plugins; the same message
    if not isinstance(spec["args"], dict):
        raise RecipeError(f"{spec_path}: args must be a mapping")
    unknown = set(spec["args"]) - set(cls.arg_names())
    if unknown:
        raise RecipeError(f"{spec_path}: unknown argument {sorted(unknown)[0]!r} for {cls.kind}")
    model = _inside(job_dir, spec["model"], spec_path, "model")
    if model.suffix != ".safetensors":
        # never torch.load (a pickle) what a job brings: export converts .pt on the user's side
        raise RecipeError(f"{spec_path}: model must be a .safetensors file, got {spec['model']!r}")
    code = _inside(job_dir, spec["code"], spec_path, "code")
    script = spec["args"].get("train_script")
    if (
        not isinstance(script, str)
        or "\0" in script  # not a path any system call takes (resolve() raises ValueError)
        or not (code / script).resolve().is_relative_to(code)
    ):
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
    from fedctl.codec.tensorfiles import LazyTensorFile

    js = read_job_spec(job_dir, verify=verify)
    try:
        # the model's header, checked now (sizes, dtypes, shapes, offsets): a hostile model is
        # refused where the job is loaded (a server refuses it at submit), not rounds later
        LazyTensorFile(js.model)
    except (CodecError, OSError) as exc:
        raise RecipeError(
            f"{js.root}: model {js.spec['model']!r} is not a valid tensor file: {exc}"
        ) from None
    try:
        return js.cls(**js.spec["args"], model=js.model, base_dir=js.code)
    except TypeError as exc:
        raise RecipeError(f"{js.root / JOB_SPEC}: {exc}") from None


def _inside(root: Path, rel: Any, spec_path: Path, key: str) -> Path:
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        raise RecipeError(f"{spec_path}: {key} must be a relative path")
    path = (root / rel).resolve()
    if root not in path.parents and path != root:
        raise RecipeError(f"{spec_path}: {key} path {rel!r} escapes the job folder")
    return path


# ---------------------------------------------------------------------- small validators
