"""fedctl.provision's modules: no import cycles, none oversized, old import paths kept."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedctl" / "provision"


def modules() -> dict[str, Path]:
    out = {f"fedctl.provision.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    out["fedctl._yaml"] = ROOT / "fedctl" / "_yaml.py"
    return out


def imported(path: Path) -> set[str]:
    """fedctl modules a file imports anywhere (in functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    known = modules()
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m.startswith("fedctl")}


def test_no_import_cycles_inside_the_package() -> None:
    known = modules()
    graph = {m: sorted(imported(p) & known.keys()) for m, p in known.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        for n in graph[m]:
            visit(n, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_yaml_helper_imports_only_errors_from_fedctl() -> None:
    assert imported(ROOT / "fedctl" / "_yaml.py") <= {"fedctl.errors"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_modules_stay_small_and_say_what_they_own(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 500
    assert ast.get_docstring(ast.parse(text))


# Names defined in the modules before they were split; code elsewhere imports them from here.
OLD_NAMES = {
    "kit": "KIT_VERSION STARTUP LOCAL TRANSFER CONFIG_FILE CERT_FILE KEY_FILE CA_FILE "
    "MANIFEST_FILE SIGNATURE_FILE UNLISTED MAX_KIT_ZIP_BYTES MAX_KIT_ZIP_FILES KitError KitFile "
    "Kit kit_config build_kit_files write_kit_dir write_kit_zip read_kit_zip read_kit_folder "
    "verify_kit load_kit atomic_write_dir atomic_write_zip",
    "project": "API_VERSION DEFAULT_PORT DEFAULT_CA_VALID_DAYS DEFAULT_CERT_VALID_DAYS "
    "MAX_VALID_DAYS KEY_TYPES DEFAULT_KEY_TYPE MAX_PROJECT_FILE_BYTES ProjectError Server Site "
    "Admin Participant Project poc_project load_project parse_project is_ip validate_participant",
    "provisioner": "STATE KITS CA_KEY CA_CERT PROJECT_FILE ISSUED_FILE ISSUED_DIR CREATED REBUILT "
    "UNCHANGED STALE SITE_KEY KitRecord ProvisionResult provision add_participant add_site "
    "add_admin CertRequest request_certificate SignedRequest sign_csr assemble_kit "
    "example_project_yaml write_example",
}


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_old_import_paths_still_work(module: str) -> None:
    mod = importlib.import_module(f"fedctl.provision.{module}")
    assert [n for n in OLD_NAMES[module].split() if not hasattr(mod, n)] == []
    package = importlib.import_module("fedctl.provision")
    assert [n for n in package.__all__ if not hasattr(package, n)] == []
