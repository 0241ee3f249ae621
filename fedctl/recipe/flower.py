"""``FlowerRecipe``: an existing Flower app (``ServerApp`` + ``ClientApp``), unmodified, run
by fedctl in simulation, on a POC and on provisioned sites (docs/flower.md)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from fedctl.errors import RecipeError
from fedctl.recipe.base import AGGREGATION_ARGS, Recipe
from fedctl.workflows.base import Workflow

#: the client script fedctl writes into a Flower job: the app's ClientApp behind fedctl's API
RUNNER = "fedctl_flower_client.py"
RUNNER_CODE = (
    '"""Written by fedctl: the Flower app\'s ClientApp serves this site."""\n\n'
    "from fedctl.client.flower import main\n\nmain()\n"
)
#: recipe arguments a Flower app decides itself (its strategy) or that need fedctl's models
_NOT_FOR_FLOWER = (*AGGREGATION_ARGS, "wait_after_min", "compression", "privacy")


def app_config(app_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (its default run_config); a one-line error when
    the folder is not a Flower app."""
    path = app_dir / "pyproject.toml"
    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except FileNotFoundError:
        raise RecipeError(f"{app_dir} is not a Flower app: it has no pyproject.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    app = spec.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    for which in ("serverapp", "clientapp"):
        ref = components.get(which)
        if not isinstance(ref, str) or ":" not in ref:
            raise RecipeError(
                f"{path} names no [tool.flwr.app.components] {which} (module:attribute)"
            )
    config = app.get("config", {})
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: [tool.flwr.app.config] must be a table")
    return dict(config)


class FlowerRecipe(Recipe):
    """An existing Flower app, unmodified: its ``ServerApp`` runs where fedctl's workflows run,
    with a Flower ``Grid`` over fedctl's sites, and its ``ClientApp`` runs on each site behind
    fedctl's client API. ``app_dir``: the app's folder (its ``pyproject.toml`` names the two
    components); ``run_config``: overrides of its ``[tool.flwr.app.config]``. Needs the
    ``flower`` extra. See docs/flower.md for the bridge and what it does not carry."""

    kind = "flower"
    supports_central_dp = False
    summary = "An existing Flower app (ServerApp + ClientApp), unmodified, on fedctl's sites."
    paper = "Beutel et al., Flower: A Friendly Federated Learning Research Framework (2020)"
    example = "tests_flower/app"
    param_docs = {
        "run_config": "overrides of the app's [tool.flwr.app.config] (its context.run_config)",
    }

    def __init__(
        self,
        app_dir: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        min_clients: int = 2,
        run_config: dict[str, Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.refuse(
            kwargs, _NOT_FOR_FLOWER, "the Flower app's own strategy decides what its server does"
        )
        for k in ("num_rounds", "model", "train_script", "train_args"):
            kwargs.pop(k, None)  # decided by the app (a job folder's spec carries them back)
        folder = Path(base_dir if base_dir is not None else app_dir or "").resolve()
        if app_dir is None and base_dir is None:
            raise RecipeError("FlowerRecipe needs the Flower app's folder (app_dir)")
        config = app_config(folder)
        if run_config is not None and not isinstance(run_config, dict):
            raise RecipeError("run_config must be a mapping of the app's config keys to values")
        unknown = sorted(set(run_config or {}) - set(config))
        if unknown:
            raise RecipeError(
                f"run_config sets {unknown[0]!r}, which the app's [tool.flwr.app.config] lacks"
            )
        self.run_config = dict(run_config or {})
        rounds = {**config, **self.run_config}.get("num-server-rounds", 1)
        kwargs.setdefault("key_metric", None)
        super().__init__(
            name or folder.name,
            min_clients,
            rounds if isinstance(rounds, int) and rounds > 0 else 1,
            {},
            RUNNER,
            base_dir=folder,
            **kwargs,
        )
        self.app_dir = None  # the job's code is the app: nothing machine-specific is kept

    @classmethod
    def arg_names(cls) -> list[str]:
        drop = {"app_dir", "num_rounds"}
        return [n for n in super().arg_names() if n not in drop]

    def _check_model(self, model: Any) -> Any:
        return {}  # the ServerApp makes its own initial model

    def _check_script(self, train_script: str) -> str:
        return RUNNER  # written into the job by fedctl (generated_code)

    def generated_code(self) -> dict[str, str]:
        return {RUNNER: RUNNER_CODE}

    def code_files(self) -> list[Path]:
        return [f for f in super().code_files() if f.as_posix() != RUNNER]

    def full_run_config(self) -> dict[str, Any]:
        """The app's config with this recipe's overrides."""
        return {**app_config(self.base_dir), **self.run_config}

    def server_code(self) -> str:
        """What the server runs of the job's code (a production server refuses it unless
        allowed): the app's ServerApp."""
        return "the Flower app's ServerApp"

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.flower import FlowerWorkflow

        return FlowerWorkflow(
            self.base_dir,
            self.min_clients,
            self.full_run_config(),
            num_rounds=self.num_rounds,
            round_timeout=self.round_timeout,
        )
