"""`driverd keys ...` commands: Ed25519 signing keys for schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from driverd.cli.output import EXIT_OK, emit_json, fail
from driverd.signing import KeyFileError, generate_keypair, key_id, load_public_key

app = typer.Typer(help="Signing keys for schedules.", no_args_is_help=True)


@app.command()
def generate(
    dir: Annotated[
        Path, typer.Argument(help="Directory for the key pair (created if missing).", show_default=False, metavar="DIR")
    ],
    name: Annotated[str, typer.Option("--name", help="File name stem: NAME.key and NAME.pub.")] = "schedule-signer",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Create an Ed25519 key pair: NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub (copy it to trust stores)."""
    try:
        priv, pub = generate_keypair(dir, name)
        kid = key_id(load_public_key(pub))
    except KeyFileError as exc:
        fail(str(exc), as_json=as_json)
    except OSError as exc:
        fail(f"cannot create keys in {ascii(str(dir))[1:-1]}: {exc.strerror or exc}", as_json=as_json)
    if as_json:
        emit_json({"ok": True, "key_id": kid, "private_key": str(priv), "public_key": str(pub)})
    else:
        typer.echo(f"key id {kid}")
        typer.echo(f"  private {priv} (keep secret; mode 0600)")
        typer.echo(f"  public  {pub} (copy into the daemon's trust directory)")
    raise typer.Exit(EXIT_OK)
