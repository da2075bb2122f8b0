"""`cryoptycho keys DIR`: CURVE key pairs for the daemon and its clients (zmq.auth certificates)."""

from __future__ import annotations

from pathlib import Path

import click
from cryoptycho.protocols.security import (
    SERVER_NAME,
    generate_client_keys,
    generate_server_keys,
)


@click.command()
@click.argument("keys_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME",
    help="Also make a key pair for client NAME and admit it (repeatable).",
)
@click.option("--no-server", is_flag=True, help="Only add clients to an existing key directory.")
def command(keys_dir: Path, clients: tuple[str, ...], no_server: bool) -> None:
    """Create the server key pair in KEYS_DIR and admit clients.

    Start the daemon with this directory (CURVE on); give each client
    KEYS_DIR/private/NAME.key_secret and KEYS_DIR/server.key. Removing
    KEYS_DIR/clients/NAME.key revokes a client when the daemon restarts.
    """
    try:
        if not no_server:
            public = generate_server_keys(keys_dir)
            click.echo(f"server public key: {public}")
        elif not (keys_dir / f"{SERVER_NAME}.key_secret").exists():
            raise click.ClickException(
                f"{keys_dir} has no server key; run without --no-server first"
            )
        for name in clients:
            secret = generate_client_keys(keys_dir, name)
            click.echo(f"client {name}: {secret} (give it with {keys_dir / SERVER_NAME}.key)")
    except (FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # a directory that cannot be made or written: named, not a traceback
        raise click.ClickException(f"cannot write keys in {keys_dir}: {exc.strerror or exc} "
                                   f"({exc.filename or keys_dir})") from None
