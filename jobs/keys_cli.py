"""`tidegate keys`: the keyring of field encryption (see docs/encryption.md).

    tidegate keys init                                  [--keyring PATH] [--master-key-env VAR]
    tidegate keys create-tenant TENANT
    tidegate keys rotate TENANT
    tidegate keys revoke TENANT VERSION [--yes]
    tidegate keys list                                  (tenants, versions, states; never a key)
    tidegate keys export --tenant A [--tenant B] --out PATH (--to-master-key-env VAR | --same-master-key)
    tidegate keys api-key create TENANT                 (the online endpoint's API keys; the key is shown once)
    tidegate keys api-key revoke TENANT [--key-id ID]
    tidegate keys api-key list
    tidegate keys reencrypt --table URI [--column C ...] [--storage-option KEY=VALUE ...] [--name NAME]

The keyring is --keyring, else $TIDEGATE_KEYRING, else .tidegate/keyring.json; the master key is
read from the variable --master-key-env names (default TIDEGATE_MASTER_KEY). Heavy imports
(pyarrow, deltalake) happen inside the commands that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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


api_key_app = typer.Typer(no_args_is_help=True, help="API keys of the online endpoint (tidegate serve), hashed in the keyring.")
keys_app.add_typer(api_key_app, name="api-key")


@api_key_app.command("create")
def api_key_create(tenant: str, keyring: KeyringOption = None) -> None:
    """A new API key for TENANT. Printed once, on stdout alone; only its scrypt hash is stored."""
    key_id, token = _keyring_call_plain(keyring, "create_api_key", tenant)
    typer.echo(f"API key {key_id} created for tenant {tenant}; it is shown once, keep it now:", err=True)
    typer.echo(token)


@api_key_app.command("revoke")
def api_key_revoke(
    tenant: str,
    key_id: Annotated[Optional[str], typer.Option("--key-id", help="Only this key (default: all of the tenant's).")] = None,
    keyring: KeyringOption = None,
) -> None:
    """Revoke TENANT's API keys; a running endpoint refuses them from its next request."""
    revoked = _keyring_call_plain(keyring, "revoke_api_keys", tenant, key_id)
    typer.echo(f"tenant {tenant}: API key(s) {', '.join(revoked)} revoked")


@api_key_app.command("list")
def api_key_list(keyring: KeyringOption = None) -> None:
    """Key ids, tenants and states (never a key or its hash)."""
    kr = _keyring_call_plain(keyring, "api_keys")
    for key_id, rec in sorted(kr.items(), key=lambda kv: (kv[1]["tenant"], kv[1].get("created_at", ""))):
        typer.echo(f"{key_id}  {rec['tenant']:<24} {rec['state']:<8} {rec.get('created_at', '')}")
    if not kr:
        typer.echo("no API keys (add one with: tidegate keys api-key create TENANT)")


def _keyring_call_plain(keyring, method: str, *args):
    """A keyring call that needs no master key (API keys are hashed, not wrapped)."""
    from schemas.errors import TidegateError

    try:
        return getattr(_open(keyring, "", needs_master_key=False), method)(*args)
    except TidegateError as e:
        raise _fail(e) from None


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


# keys reencrypt: passes over the table at most, until one finds nothing stale.
REENCRYPT_PASSES = 5


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
    settle_s: Annotated[
        float,
        typer.Option("--settle-s", min=0, help="Wait this long before each pass after one that wrote: the "
                     "longest sink.commit_interval_s of the jobs and endpoints writing the table (rows "
                     "they sealed before the rotation land up to that late)."),
    ] = 0.0,
) -> None:
    """Rewrite values under old key versions with each tenant's current version, in one commit.
    Passes over the table again until one finds nothing stale; exit code 3 if values under old
    versions were still arriving after the last pass (do not revoke then)."""
    import time

    from jobs.logs import reading_store, redact_text
    from jobs.reencrypt import reencrypt_table
    from schemas.errors import TidegateError

    options = {}
    for item in storage_options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError("--storage-option wants KEY=VALUE"))  # no echo: values can be secrets
        options[key] = value
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Steps: read the table, each column, the overwrite commit (column names only: never values).
    with Progress(TextColumn("[bold]re-encrypt"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:  # fmt: skip
        task = bar.add_task("read", total=None)

        def progress(step: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=step)

        # Until a pass finds nothing stale: rows a writer sealed under the old version before it read
        # the rotated keyring, committed after a pass's snapshot (a job's next commit, an online
        # replica's buffered or journaled audit rows), are in the next pass's snapshot.
        reports = []
        for _ in range(REENCRYPT_PASSES):
            if reports and settle_s:
                bar.update(task, description=f"waiting {settle_s:g} s for rows sealed before the rotation")
                time.sleep(settle_s)
            try:
                with reading_store(f"table {table}", "re-encrypt"):  # a store's error: its type, not its message
                    reports.append(reencrypt_table(table, _open(keyring, master_key_env), columns or None,
                                                   options or None, table=name, progress=progress))  # fmt: skip
            except TidegateError as e:
                raise _fail(e) from None
            if reports[-1].written_version is None:
                break
    shown = redact_text(table)  # an object store URI may carry credentials
    # (every pass reads the whole table: the last one says what is left)
    unopened, unopened_values = reports[-1].unopened_tokens, reports[-1].unopened_values
    if reports[0].written_version is None and not unopened and not unopened_values:
        typer.echo(f"{shown}: nothing to re-encrypt (version {reports[0].read_version})")
        return
    for report in reports:
        if report.written_version is not None:
            detail = ", ".join(f"{c}: {k}" for c, k in report.rows_rewritten.items())
            typer.echo(f"{shown}: re-encrypted {report.total} value(s) ({detail}); table version {report.written_version}")
    last = reports[-1]
    if unopened or unopened_values:
        what = [f"{unopened} text(s) in PII columns shaped like a token"] if unopened else []
        what += [f"{unopened_values} value(s) of columns that also hold clear bytes (dead-letter raw) shaped like "
                 "a stored value"] if unopened_values else []  # fmt: skip
        typer.echo(f"{shown}: {' and '.join(what)} under an old key version did not open here, and were left as "
                   "they are: a wrong table label (--name), a keyring without that tenant, or bytes made to look like "
                   "one. Revoking would leave any real ones unreadable: check before revoking", err=True)  # fmt: skip
        raise typer.Exit(3)  # `reencrypt && revoke` must not revoke
    if last.written_version is None:
        typer.echo(f"{shown}: checked again at version {last.read_version}: nothing under an old key version")
    else:
        typer.echo(f"{shown}: values under old key versions were still arriving after {REENCRYPT_PASSES} passes (a "
                   "writer that has not read the rotated keyring yet): run it again before revoking", err=True)  # fmt: skip
        raise typer.Exit(3)  # `reencrypt && revoke` must not revoke
