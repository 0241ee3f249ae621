"""``fedctl he decrypt``: read a model that holds homomorphically encrypted parameters."""

from __future__ import annotations

from pathlib import Path

import typer

from fedctl.cli.common import APP_SETTINGS, JSON_OPTION, print_json

he_app = typer.Typer(
    help="Homomorphic encryption: read encrypted models (docs/he.md).", **APP_SETTINGS
)


@he_app.command("decrypt")
def decrypt(
    model: Path = typer.Argument(
        ..., help="A model file with encrypted parameters (final.safetensors, a checkpoint)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The plain model file to write."),
    kit: Path | None = typer.Option(
        None, "--kit", help="A site's startup kit (its startup/he_context.secret)."
    ),
    context: Path | None = typer.Option(
        None, "--context", help="A secret context file (a simulated run's RUN_DIR/he/...)."
    ),
    as_json: bool = JSON_OPTION,
) -> int:
    """Decrypt MODEL with the project's secret context and write the plain model to --out."""
    from fedctl.codec.tensorfiles import load_file, save_file
    from fedctl.errors import NotFound, UsageError
    from fedctl.privacy.he import HEError, load_context
    from fedctl.privacy.he.model import extract, open_params

    if (kit is None) == (context is None):
        raise UsageError("give the secret context with exactly one of --kit and --context")
    if kit is not None:
        from fedctl.provision.kit import load_kit

        path = load_kit(kit).he_context_path
        if path is None:
            raise NotFound(f"{kit}: the kit has no HE context (provisioned without it)")
    else:
        assert context is not None
        path = context
    if not path.is_file():
        raise NotFound(f"{path}: no such context file")
    if not model.is_file():
        raise NotFound(f"{model}: no such model file")
    params = load_file(model)[0]
    try:
        encrypted = extract(params)[1]
        if encrypted is None:
            raise UsageError(f"{model}: holds no encrypted parameters")
        ctx = load_context(path.read_bytes(), need_secret=True, source=str(path))
        plain = open_params(params, ctx)
    except HEError as exc:  # the wrong file or key for this model: bad input
        raise UsageError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(plain, out)  # atomic: a temporary file and a rename
    names = sorted(encrypted["tensors"])
    if as_json:
        print_json({"model": str(model), "out": str(out), "decrypted": names})
    else:
        print(f"decrypted {len(names)} parameters of {model} into {out}")
    return 0


def register(app: typer.Typer) -> None:
    """Attach the ``he`` group to the root app."""
    app.add_typer(he_app, name="he")
