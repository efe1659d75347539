"""`tidegate keys`: the keyring of field encryption (see docs/encryption.md).

    tidegate keys init                                  [--keyring PATH] [--master-key-env VAR]
    tidegate keys create-tenant TENANT
    tidegate keys rotate TENANT
    tidegate keys revoke TENANT VERSION [--yes]
    tidegate keys list                                  (tenants, versions, states; never a key)
    tidegate keys export --tenant A [--tenant B] --out PATH (--to-master-key-env VAR | --same-master-key)
    tidegate keys reencrypt --table URI [--column C ...] [--storage-option KEY=VALUE ...] [--name NAME]

The keyring is --keyring, else $TIDEGATE_KEYRING, else .tidegate/keyring.json; the master key is
read from the variable --master-key-env names (default TIDEGATE_MASTER_KEY). Heavy imports
(pyarrow, deltalake) happen inside the commands that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(
    no_args_is_help=True, help="Field-encryption keys: per-tenant data keys wrapped by a master key."
)

KeyringOption = Annotated[
    Path | None,
    typer.Option("--keyring", envvar="TIDEGATE_KEYRING", help="Keyring file (default: .tidegate/keyring.json)."),
]
MasterKeyEnvOption = Annotated[
    str, typer.Option("--master-key-env", help="Environment variable holding the master key (base64 or hex).")
]


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _provider(env_var: str):
    from crypto.keyring import LocalMasterKeyProvider

    return LocalMasterKeyProvider(env_var)


def _open(keyring: Path | None, master_key_env: str, *, needs_master_key: bool = True):
    from crypto.keyring import Keyring

    return Keyring.open(keyring, _provider(master_key_env) if needs_master_key else None)


@keys_app.command("init")
def init(keyring: KeyringOption = None, master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY") -> None:
    """Create an empty keyring bound to the master key (refuses to overwrite an existing file)."""
    from crypto.keyring import Keyring
    from schemas.errors import TidegateError

    try:
        kr = Keyring.init(keyring, _provider(master_key_env))
    except TidegateError as e:
        raise _fail(e) from None
    typer.echo(f"keyring {kr.path} created (master key {kr.master_key_id})")


@keys_app.command("create-tenant")
def create_tenant(
    tenant: Annotated[str, typer.Argument(help="Tenant id: 1-64 letters, digits, '.', '_' or '-'.")],
    keyring: KeyringOption = None,
    master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY",
) -> None:
    """Add a tenant with a fresh data key (version 1)."""
    version = _keyring_call(keyring, master_key_env, "create_tenant", tenant)
    typer.echo(f"tenant {tenant} created, key version {version}")


@keys_app.command("rotate")
def rotate(
    tenant: str, keyring: KeyringOption = None, master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY"
) -> None:
    """Add a key version for TENANT and make it current; older versions still decrypt."""
    version = _keyring_call(keyring, master_key_env, "rotate", tenant)
    typer.echo(f"tenant {tenant}: key version {version} is now current")


def _keyring_call(keyring, master_key_env: str, method: str, *args):
    """Open the keyring and call one of its methods; a Tidegate error exits 2 with its message."""
    from schemas.errors import TidegateError

    try:
        return getattr(_open(keyring, master_key_env), method)(*args)
    except TidegateError as e:
        raise _fail(e) from None


@keys_app.command("revoke")
def revoke(
    tenant: str,
    version: int,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    keyring: KeyringOption = None,
    master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY",
) -> None:
    """Revoke one key version: its key is deleted; values it encrypted can never be decrypted again."""
    from schemas.errors import TidegateError

    if not yes:
        typer.confirm(
            f"Revoke key version {version} of tenant {tenant}? Data still under it becomes unreadable for good",
            abort=True,
        )
    try:
        _open(keyring, master_key_env, needs_master_key=False).revoke(tenant, version)
    except TidegateError as e:
        raise _fail(e) from None
    typer.echo(f"tenant {tenant}: key version {version} revoked")


@keys_app.command("list")
def list_keys(keyring: KeyringOption = None) -> None:
    """Show tenants, key versions and their states (no master key needed; never shows a key)."""
    from rich.console import Console
    from rich.table import Table

    from schemas.errors import TidegateError

    try:
        kr = _open(keyring, "", needs_master_key=False)
        rows = [(t, kr.versions(t)) for t in kr.tenants()]
    except TidegateError as e:
        raise _fail(e) from None
    table = Table("tenant", "version", "state", "created at", "current", title=f"{kr.path} ({kr.master_key_id})")
    for tenant, versions in rows:
        active = [v.version for v in versions if v.state == "active"]
        for v in versions:
            table.add_row(
                tenant, str(v.version), v.state, v.created_at, "*" if active and v.version == max(active) else ""
            )
    Console(width=120).print(table)
    if not rows:
        typer.echo("no tenants (add one with: tidegate keys create-tenant TENANT)")


@keys_app.command("export")
def export(
    tenants: Annotated[list[str], typer.Option("--tenant", help="A tenant to include (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="The new keyring file (must not exist).")],
    to_master_key_env: Annotated[
        str | None,
        typer.Option(
            "--to-master-key-env", help="Re-wrap the keys for the recipient's master key, held in this variable."
        ),
    ] = None,
    same_master_key: Annotated[
        bool,
        typer.Option(
            "--same-master-key",
            help="Copy the keys still wrapped by the production master key (the reader needs that key, "
            "which opens every tenant).",
        ),
    ] = False,
    keyring: KeyringOption = None,
    master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY",
) -> None:
    """Write a keyring holding only some tenants, re-wrapped for the recipient's master key."""
    from schemas.errors import TidegateError

    if to_master_key_env and same_master_key:
        raise _fail(ValueError("--to-master-key-env and --same-master-key exclude each other"))
    if not to_master_key_env and not same_master_key:
        raise _fail(
            ValueError(
                "keys export re-wraps the keys for the recipient: pass --to-master-key-env VAR (the variable "
                "holding the recipient's master key), or --same-master-key to knowingly keep the production "
                "master key (whoever holds it opens every tenant)"
            )
        )
    try:
        kr = _open(keyring, master_key_env, needs_master_key=not same_master_key)
        if same_master_key:
            sub = kr.export(out, tenants, same_master_key=True)
        else:
            sub = kr.export(out, tenants, _provider(to_master_key_env))
    except TidegateError as e:
        raise _fail(e) from None
    typer.echo(f"keyring {sub.path} written with tenant(s) {', '.join(sub.tenants())} (master key {sub.master_key_id})")


@keys_app.command("reencrypt")
def reencrypt(
    table: Annotated[str, typer.Option("--table", help="Delta table URI.")],
    columns: Annotated[
        list[str] | None, typer.Option("--column", help="Column to re-encrypt (repeat; default: all).")
    ] = None,
    storage_options: Annotated[
        list[str] | None, typer.Option("--storage-option", help="KEY=VALUE for the Delta storage (repeat).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Logical table name bound into the values (default: Delta name).")
    ] = None,
    keyring: KeyringOption = None,
    master_key_env: MasterKeyEnvOption = "TIDEGATE_MASTER_KEY",
) -> None:
    """Rewrite values under old key versions with each tenant's current version, in one commit."""
    from jobs.reencrypt import reencrypt_table
    from schemas.errors import TidegateError

    options = {}
    for item in storage_options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError("--storage-option wants KEY=VALUE"))  # no echo: values can be secrets
        options[key] = value
    try:
        report = reencrypt_table(table, _open(keyring, master_key_env), columns or None, options or None, table=name)
    except TidegateError as e:
        raise _fail(e) from None
    if report.written_version is None:
        typer.echo(f"{table}: nothing to re-encrypt (version {report.read_version})")
        return
    detail = ", ".join(f"{c}: {k}" for c, k in report.rows_rewritten.items())
    typer.echo(f"{table}: re-encrypted {report.total} value(s) ({detail}); table version {report.written_version}")
