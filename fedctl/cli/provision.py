"""``fedctl provision``, ``fedctl cert ...`` and ``fedctl kit ...``: certificates and startup kits.

Thin wrappers over :mod:`fedctl.provision`; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from fedctl.cli.common import APP_SETTINGS, JSON_OPTION, one_of, print_json

cert_app = typer.Typer(
    help="Site-held keys: make a CSR at the site, sign it with the project CA.",
    **APP_SETTINGS,
)
kit_app = typer.Typer(help="Startup kits: assemble and verify.", **APP_SETTINGS)


def _usage(message: str) -> None:
    from fedctl.errors import UsageError

    raise UsageError(message)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _print_result(result: Any, *, as_json: bool) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    ca_state = "new" if result.ca_created else "existing"
    typer.echo(f"CA       {result.ca_cert} ({ca_state})")
    width = max((len(k.name) for k in result.kits), default=0)
    for k in result.kits:
        where = k.zip_path or k.kit_dir or ""
        typer.echo(f"{k.status:<10}{k.identity.type:<7}{k.name:<{width}}  {where}")
        if k.note:
            typer.echo(f"         {'':<7} {'':<{width}}  {k.note}")
    for w in result.warnings:
        _warn(w)
    if any(k.status in ("created", "rebuilt") for k in result.kits):
        held = "the CA key"
        if result.project.homomorphic_encryption is not None:
            held += " and the sites' HE secret key"
        typer.echo(
            f"Hand each participant its zip; keep {result.workspace / 'state'} private "
            f"(it holds {held})."
        )


def register(app: typer.Typer) -> None:
    """Attach ``provision``, ``cert`` and ``kit`` to the root app."""

    @app.command("provision")
    def provision_cmd(
        project_yml: str = typer.Argument(
            None, metavar="PROJECT_YML", help="Project file (with --init: the file to write)."
        ),
        workspace: Path = typer.Option(
            Path("workspace"), "-o", "-w", "--workspace", help="Workspace folder (CA + kits)."
        ),
        force: bool = typer.Option(
            False, "--force", help="Rebuild every kit (new keys, same CA); with --init overwrite."
        ),
        init: bool = typer.Option(
            False, "--init", help="Write a commented example project.yml and exit."
        ),
        add_site: str = typer.Option(None, "--add-site", metavar="NAME", help="Add one site."),
        add_admin: str = typer.Option(None, "--add-admin", metavar="EMAIL", help="Add one admin."),
        org: str = typer.Option(None, "--org", help="Organisation of the added site/admin."),
        role: str = typer.Option(
            None, "--role", help="Role of the added admin: project_admin, org_admin, lead, member."
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Create a project's CA, certificates and startup kits from PROJECT_YML.

        Re-running reuses the CA and keeps existing kits unless --force.

        --add-site and --add-admin grow an existing workspace under the same CA.
        """
        from fedctl import provision as prov

        if init:
            if add_site or add_admin:
                _usage("--init cannot be combined with --add-site/--add-admin")
            path = prov.write_example(project_yml or "project.yml", force=force)
            if as_json:
                print_json({"written": str(path)})
            else:
                typer.echo(
                    f"wrote {path}; edit it, then run: fedctl provision {path} -o {workspace}"
                )
            return
        if add_site or add_admin:
            if add_site and add_admin:
                _usage("give either --add-site or --add-admin, not both")
            if project_yml:
                _usage(
                    "--add-site/--add-admin take the project from the workspace; "
                    "do not pass PROJECT_YML"
                )
            if force:
                _usage("--force cannot be combined with --add-site/--add-admin")
            if not org:
                _usage(f"--org is required with {'--add-site' if add_site else '--add-admin'}")
            if add_site:
                if role:
                    _usage("--role is for admins; sites have no role")
                result = prov.add_site(workspace, add_site, org)
            else:
                if not role:
                    _usage(f"--role is required with --add-admin (one of {', '.join(prov.ROLES)})")
                result = prov.add_admin(workspace, add_admin, org, role)
            _print_result(result, as_json=as_json)
            return
        if org or role:
            _usage("--org and --role go with --add-site/--add-admin")
        if not project_yml:
            _usage("missing PROJECT_YML (run `fedctl provision --init` to write an example)")
        result = prov.provision(project_yml, workspace, force=force)
        _print_result(result, as_json=as_json)

    app.add_typer(cert_app, name="cert")
    app.add_typer(kit_app, name="kit")


@cert_app.command("request")
def cert_request(
    name: str = typer.Argument(
        ..., metavar="NAME", help="Participant name (a site name, or an admin's e-mail)."
    ),
    org: str = typer.Option(..., "--org", help="Organisation."),
    ptype: str = typer.Option(
        "site", "--type", callback=one_of("site", "admin", "server"), help="site, admin or server."
    ),
    role: str = typer.Option(None, "--role", help="Admin role (admins only)."),
    out_dir: Path = typer.Option(
        Path("."), "-o", "--out", help="Folder for NAME.key and NAME.csr."
    ),
    key_type: str = typer.Option(
        "ecdsa-p256", "--key-type", help="ecdsa-p256, ecdsa-p384 or rsa-3072."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a private key and a certificate signing request here; send only the CSR."""
    from fedctl import provision as prov
    from fedctl.provision.project import KEY_TYPES

    if key_type not in KEY_TYPES:
        _usage(f"--key-type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    req = prov.request_certificate(
        name, org=org, type=ptype, role=role, out_dir=out_dir, key_type=key_type
    )
    if as_json:
        print_json(
            {
                "name": name,
                "org": org,
                "type": ptype,
                "role": role,
                "key": str(req.key_path),
                "csr": str(req.csr_path),
            }
        )
        return
    typer.echo(f"key  {req.key_path} (keep it here, mode 0600)")
    typer.echo(
        f"CSR  {req.csr_path} (send it to the project admin: fedctl cert sign {req.csr_path.name})"
    )


@cert_app.command("sign")
def cert_sign(
    csr: Path = typer.Argument(..., metavar="CSR", help="The CSR made by `fedctl cert request`."),
    workspace: Path = typer.Option(
        Path("workspace"), "-w", "--workspace", help="Workspace folder."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Sign even if the participant or its key already has a live certificate, or its "
        "key was made in the workspace (renewal, re-keying).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Sign a CSR with the project CA and build that participant's kit without its key.

    Signing again for a participant or key with a live certificate needs --force.
    """
    from fedctl import provision as prov

    res = prov.sign_csr(workspace, csr, force=force)
    if as_json:
        print_json(
            {
                **res.identity.to_dict(),
                "kit_dir": str(res.kit_dir),
                "zip": str(res.zip_path),
                "serial": res.serial,
                "not_after": res.not_after,
                "added": res.added,
            }
        )
        return
    added = " (added to the project)" if res.added else ""
    typer.echo(f"signed   {res.identity}{added}, serial {res.serial}, valid until {res.not_after}")
    typer.echo(f"kit      {res.zip_path} (no private key inside)")
    typer.echo(
        f"Send the zip to {res.identity.name}; there, run: "
        f"fedctl kit assemble {res.zip_path.name} --key {res.identity.name}.key"
    )


@kit_app.command("assemble")
def kit_assemble(
    bundle: Path = typer.Argument(
        ..., metavar="BUNDLE", help="Kit zip or folder (from `fedctl cert sign`)."
    ),
    key: Path = typer.Option(None, "--key", help="The private key from `fedctl cert request`."),
    out_dir: Path = typer.Option(
        None, "-o", "--out", help="Kit folder to create (default ./NAME)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Complete a kit with this site's own key (or unpack a full kit zip), then verify it."""
    from fedctl import provision as prov

    kit = prov.assemble_kit(bundle, key=key, out_dir=out_dir)
    if as_json:
        print_json(
            {
                "kit": str(kit.root),
                "project": kit.project,
                **kit.identity.to_dict(),
                "verified": True,
            }
        )
        return
    typer.echo(f"kit      {kit.root} for {kit.identity} in project {kit.project!r}: verified")


@kit_app.command("verify")
def kit_verify(
    kit_dir: Path = typer.Argument(..., metavar="KIT", help="Kit folder."),
    ca: Path = typer.Option(None, "--ca", help="Also require this CA certificate."),
    connect: bool = typer.Option(
        False, "--connect", help="Also try a mutual-TLS handshake with the kit's server."
    ),
    address: str = typer.Option(None, "--address", help="host:port to connect to instead."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Check a kit's signature, files, certificate and key; optionally its connection."""
    from fedctl import provision as prov
    from fedctl.errors import FedctlError

    kit = prov.verify_kit(kit_dir, ca_cert=ca)
    out: dict[str, Any] = {
        "kit": str(kit.root),
        "project": kit.project,
        **kit.identity.to_dict(),
        "server": kit.server_address,
        "valid_until": kit.not_after.strftime("%Y-%m-%d") if kit.not_after else None,
        "verified": True,
    }
    he = kit.he_info()
    if he is not None:
        out["homomorphic_encryption"] = {
            **he.params.to_dict(),
            "key_id": he.key_id,
            "secret_key": he.has_secret_key,
            "file": str(kit.he_context_path),
        }
    check = None
    if connect:
        from fedctl.transport import tls

        check = tls.diagnose_connection(kit, address)
        out["connection"] = {"ok": check.ok, "message": check.message}
    if as_json:
        print_json(out)
    else:
        typer.echo(
            f"ok       {kit.root}: {kit.identity} in project {kit.project!r}, server "
            f"{kit.server_address}, certificate valid until {out['valid_until']}"
        )
        if he is not None:
            typer.echo(f"ok       homomorphic encryption: {he.describe()}")
        if check is not None and check.ok:
            typer.echo(f"ok       {check.message}")
    if check is not None and not check.ok:
        raise FedctlError(check.message)
