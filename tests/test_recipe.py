"""Recipes: construction checks, job-folder export/load, recipe-file discovery, CLI errors."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from fedctl.cli.main import main
from fedctl.errors import RecipeError
from fedctl.recipe import FedAvgRecipe, load_job, load_recipe
from fedctl.recipe import base as recipe_base


def test_export_and_load_give_an_equal_recipe(toy_recipe, tmp_path: Path) -> None:
    job = toy_recipe.export(tmp_path / "job")
    spec = yaml.safe_load((job / "fedctl-job.yaml").read_text())
    assert spec["kind"] == "fedavg" and spec["args"]["num_rounds"] == 3
    assert sorted(p.name for p in (job / "code").iterdir()) == [
        "client.py",
        "model.py",
        "recipe.py",
    ]
    loaded = load_job(job)
    assert loaded == toy_recipe
    assert loaded.train_script == "client.py" and loaded.base_dir == job / "code"
    assert loaded != toy_recipe.with_overrides(num_rounds=4)
    # the initial weights are plain safetensors that the reference library reads
    from safetensors.torch import load_file

    weights = load_file(job / "model" / "initial.safetensors")
    assert torch.equal(weights["fc.weight"], toy_recipe.initial_params()["fc.weight"])


def test_export_is_atomic_and_refuses_to_overwrite(toy_recipe, tmp_path: Path) -> None:
    target = tmp_path / "job"
    toy_recipe.export(target)
    with pytest.raises(RecipeError, match="already exists"):
        toy_recipe.export(target)
    toy_recipe.export(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job", "toy"]  # no temp folders


def test_export_keeps_data_and_run_folders_out(toy_recipe, monkeypatch, tmp_path: Path) -> None:
    base = toy_recipe.base_dir
    (base / "__pycache__").mkdir()
    (base / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (base / ".git").mkdir()
    (base / "fedctl-runs" / "old").mkdir(parents=True)
    (base / "fedctl-runs" / "old" / "result.json").write_text("{}")
    assert sorted(map(str, toy_recipe.code_files())) == ["client.py", "model.py", "recipe.py"]
    (base / "data.bin").write_bytes(b"\0" * 20_000)
    monkeypatch.setattr(recipe_base, "MAX_CODE_BYTES", 16_000)
    with pytest.raises(RecipeError, match="largest: data.bin"):
        toy_recipe.export(tmp_path / "job2")
    assert not (tmp_path / "job2").exists()


def test_tampered_job_is_refused(toy_recipe, tmp_path: Path) -> None:
    job = toy_recipe.export(tmp_path / "job")
    (job / "code" / "client.py").write_text("import os\n")
    with pytest.raises(RecipeError, match="code/client.py does not match its hash"):
        load_job(job)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "../../etc/passwd"}, "escapes the job folder"),
        ({"model": "/etc/passwd"}, "must be a relative path"),
        ({"kind": "os.system"}, "unknown recipe kind"),
        ({"fedctl_job": 99}, "unsupported job format"),
        ({"extra": 1}, "expected exactly the keys"),
        # found by tests/test_fuzz.py: a NUL made resolve() raise ValueError, a lone surrogate
        # in a key UnicodeEncodeError
        ({"model": "model/initial\0.safetensors"}, "model must be a relative path"),
        ({"code": "co\0de"}, "code must be a relative path"),
        ({"args": {"train_script": "client\0.py"}}, "train_script must be a path inside"),
        ({"args": {"server_eval": "x\0.py:f"}}, "server_eval must be 'file.py:function'"),
        ({"files": {"code/\ud800": "0" * 64}}, "string is not valid Unicode text"),
        ({"files": {"code/a\0b": "0" * 64}}, "files must be a relative path"),
    ],
)
def test_bad_job_specs(toy_recipe, tmp_path: Path, change, message) -> None:
    job = toy_recipe.export(tmp_path / "job")
    spec = yaml.safe_load((job / "fedctl-job.yaml").read_text())
    if "args" in change:
        change = {"args": {**spec["args"], **change["args"]}}
    spec.update(change)
    (job / "fedctl-job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError, match=message):
        load_job(job)


def test_job_spec_arguments_are_validated_by_the_recipe(toy_recipe, tmp_path: Path) -> None:
    job = toy_recipe.export(tmp_path / "job")
    spec = yaml.safe_load((job / "fedctl-job.yaml").read_text())
    spec["args"]["min_clients"] = 0
    (job / "fedctl-job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError, match="min_clients must be an integer ≥ 1, got 0"):
        load_job(job)
    spec["args"] = {**spec["args"], "min_clients": 2, "bogus": 1}
    (job / "fedctl-job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError, match="unknown argument 'bogus'"):
        load_job(job)


def test_model_from_weight_files(toy_dir: Path) -> None:
    from fedctl.codec.tensorfiles import save_file

    weights = {"fc.weight": torch.ones(1, 4), "fc.bias": torch.zeros(1)}
    save_file(weights, toy_dir / "w.safetensors")
    torch.save(weights, toy_dir / "w.pt")
    a = FedAvgRecipe("a", 1, 1, "w.safetensors", "client.py", base_dir=toy_dir)
    b = FedAvgRecipe("a", 1, 1, "w.pt", "client.py", base_dir=toy_dir)
    c = FedAvgRecipe("a", 1, 1, weights, "client.py", base_dir=toy_dir)
    assert a == b == c
    (toy_dir / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    with pytest.raises(RecipeError, match="weights-only"):
        FedAvgRecipe("a", 1, 1, "evil.pt", "client.py", base_dir=toy_dir).initial_params()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_script": "nope.py"}, "train_script 'nope.py' not found"),
        ({"train_script": "../x.py"}, "must be inside"),
        ({"model": 42}, "model must be an nn.Module"),
        ({"model": "missing.safetensors"}, "model file 'missing.safetensors' not found"),
        ({"name": "bad name!"}, "may contain only"),
        ({"num_rounds": 0}, "num_rounds must be an integer ≥ 1"),
        ({"round_timeout": -1}, "round_timeout must be a positive number"),
        ({"task_meta": {"f": object()}}, "not JSON data"),
        ({"precision": "half"}, "precision must be"),
    ],
)
def test_constructor_checks(toy_dir: Path, kwargs, message) -> None:
    args = {
        "name": "t",
        "min_clients": 1,
        "num_rounds": 1,
        "model": {"w": torch.ones(1)},
        "train_script": "client.py",
        **kwargs,
    }
    with pytest.raises(RecipeError, match=message):
        FedAvgRecipe(**args, base_dir=toy_dir)


def test_recipe_folders_import_their_own_modules(tmp_path: Path) -> None:
    for name, size in (("a", 3), ("b", 5)):
        d = tmp_path / name
        d.mkdir()
        (d / "client.py").write_text("")
        (d / "model.py").write_text(
            f"import torch\ndef make():\n    return torch.nn.Linear({size}, 1)\n"
        )
        (d / "recipe.py").write_text(
            "from model import make\nfrom fedctl.recipe import FedAvgRecipe\n"
            f"recipe = FedAvgRecipe('{name}', 1, 1, make(), 'client.py')\n"
        )
    a = load_recipe(tmp_path / "a").recipe
    b = load_recipe(tmp_path / "b").recipe
    assert a.initial_params()["weight"].shape == (1, 3)
    assert b.initial_params()["weight"].shape == (1, 5)
    assert a.base_dir == tmp_path / "a"


def test_a_folders_modules_are_dropped_afterwards_however_their_files_reach_it(
    tmp_path: Path,
) -> None:
    """isolated_imports drops exactly the modules whose files resolve into the folder: through a
    symlinked file, a symlinked folder or '..' too (it caches each folder's answer)."""
    import sys
    from types import ModuleType

    from fedctl._imports import _module_in, isolated_imports

    job, outside = tmp_path / "job", tmp_path / "outside"
    (job / "pkg").mkdir(parents=True)
    outside.mkdir()
    for f in (job / "helper.py", job / "pkg" / "inner.py", outside / "elsewhere.py"):
        f.write_text("")
    (outside / "linked.py").symlink_to(job / "helper.py")
    (tmp_path / "door").symlink_to(job)
    files = {
        "fx_in": job / "helper.py",
        "fx_inner": job / "pkg" / "inner.py",
        "fx_link": outside / "linked.py",
        "fx_door": tmp_path / "door" / "helper.py",
        "fx_dotdot": f"{job / 'pkg'}/../helper.py",
        "fx_out": outside / "elsewhere.py",
        "fx_out2": outside / "other.py",
        "fx_nofile": None,
    }
    inside = {"fx_in", "fx_inner", "fx_link", "fx_door", "fx_dotdot"}
    modules = {}
    for name, f in files.items():
        modules[name] = m = ModuleType(name)
        if f is not None:
            m.__file__ = str(f)
    folder = job.resolve()
    try:
        with isolated_imports(job):
            sys.modules.update(modules)
        assert {n for n in files if n in sys.modules} == set(files) - inside
        cache: dict[str, bool] = {}
        for name, m in modules.items():
            assert _module_in(m, folder, cache) == _module_in(m, folder) == (name in inside)
    finally:
        for name in files:
            sys.modules.pop(name, None)


def _bad_recipe(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "client.py").write_text("print('hi')\n")
    (d / "recipe.py").write_text(body)
    return d


CASES = [
    ("missing", None, "recipe not found"),
    ("no-recipe-py", "", "no recipe.py"),
    ("no-variable", "x = 1\n", "defines no module-level `recipe`"),
    ("wrong-type", "recipe = {'name': 'x'}\n", "`recipe` is a dict, expected a fedctl Recipe"),
    (
        "missing-script",
        "import torch\nfrom fedctl.recipe import FedAvgRecipe\n"
        "recipe = FedAvgRecipe('x', 1, 1, torch.nn.Linear(1, 1), 'nope.py')\n",
        "train_script 'nope.py' not found",
    ),
    ("syntax", "recipe = (\n", "recipe.py:1:"),
    ("raises", "import os\nrecipe = undefined_name\n", "recipe.py:2: NameError"),
]


@pytest.mark.parametrize(("case", "body", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_recipes_get_one_clear_line(tmp_path: Path, capsys, case, body, message) -> None:
    if case == "missing":
        target = tmp_path / "nowhere"
    elif case == "no-recipe-py":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        target = _bad_recipe(tmp_path, body)
    code = main(["simulate", str(target), "--backend", "local"])
    err = capsys.readouterr().err.strip()
    assert code == (4 if case == "missing" else 2)  # a path that does not exist: 4
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("backend", ["local", "process"])
def test_client_script_syntax_error_is_one_line(
    toy_dir: Path, tmp_path: Path, capsys, backend: str
) -> None:
    (toy_dir / "client.py").write_text("import fedctl.client as flare\nwhile True print(1)\n")
    workspace = tmp_path / "w"
    code = main(["simulate", str(toy_dir), "--backend", backend, "--workspace", str(workspace)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "client.py:2:" in err and len(err.splitlines()) == 1
    # nothing is left: no run folder, and (process) the zygote started early has ended
    assert list(workspace.glob("*")) == []
    assert not [
        p for p in psutil.Process().children() if "fedctl.sim.zygote" in " ".join(p.cmdline())
    ]
    assert list(Path("/dev/shm").glob(f"fedctl-{os.getpid()}-*")) == []


@pytest.mark.parametrize("backend", ["local", "process"])
def test_a_workspace_that_cannot_hold_a_run_is_one_line(
    toy_dir: Path, tmp_path: Path, capsys, backend: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    workspace = blocker / "runs"  # under a file: no folder can be made there
    code = main(["simulate", str(toy_dir), "--backend", backend, "--workspace", str(workspace)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        err.startswith(f"error: cannot create the run folder {workspace}/") and "Not a dir" in err
    )
    assert list(Path("/dev/shm").glob(f"fedctl-{os.getpid()}-*")) == []  # nothing started


def test_recipe_file_can_be_given_directly(toy_dir: Path) -> None:
    loaded = load_recipe(toy_dir / "recipe.py")
    assert loaded.recipe.name == "toy"
    (toy_dir / "notes.txt").write_text("hello")
    with pytest.raises(RecipeError, match="a recipe is a .py file"):
        load_recipe(toy_dir / "notes.txt")


def test_a_shadowed_module_whose_own_folder_closed_meanwhile_is_not_brought_back(
    tmp_path: Path,
) -> None:
    """Two jobs' folders open at once (a script's worker and a workflow's hook, in two threads of
    the in-process simulator), closed in the other order: the second must not put back the first
    job's ``model`` when it ends, or a later job's ``from model import …`` finds the stale one."""
    import importlib
    import sys

    from fedctl._imports import isolated_imports

    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.py").write_text(f"VALUE = {value}\n")
    sys.modules.pop("model", None)
    try:
        first, second = isolated_imports(tmp_path / "a"), isolated_imports(tmp_path / "b")
        first.__enter__()
        assert importlib.import_module("model").VALUE == 1
        second.__enter__()  # shadows a's model
        assert importlib.import_module("model").VALUE == 2
        first.__exit__(None, None, None)  # a's job ends while b's is open
        second.__exit__(None, None, None)
        assert "model" not in sys.modules
        # a module from outside any such folder is still put back
        outside = type(sys)("model")
        outside.__file__ = str(tmp_path / "elsewhere" / "model.py")
        sys.modules["model"] = outside
        with isolated_imports(tmp_path / "b"):
            assert importlib.import_module("model").VALUE == 2
        assert sys.modules["model"] is outside
        # and one whose folder is still open when the shadowing ends, too
        with isolated_imports(tmp_path / "a"):
            mine = importlib.import_module("model")
            with isolated_imports(tmp_path / "b"):
                assert importlib.import_module("model").VALUE == 2
            assert sys.modules["model"] is mine
    finally:
        sys.modules.pop("model", None)
