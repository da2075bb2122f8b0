"""Optional CURVE encryption and client authentication for all three sockets (``zmq.auth``).

Key directory layout written by ``cryoptycho keys DIR`` (zmq certificate files, Z85 text):

    DIR/server.key            server public key: give it to every client
    DIR/server.key_secret     server key pair: stays on the daemon host
    DIR/clients/NAME.key      public keys of the clients the daemon admits
    DIR/private/NAME.key_secret  a client's key pair: hand it to that client only

The daemon applies :func:`apply_server_curve` to each socket and runs one
:func:`start_authenticator` per context; clients pass a :class:`ClientCurve` to the SDK.
An unknown client key fails the handshake: the client's sends queue, nothing arrives.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
PRIVATE_DIR = "private"


@dataclass(frozen=True)
class ClientCurve:
    """What a client needs: its own key pair file and the server's public key file."""

    secret_file: Path
    server_public_file: Path

    @classmethod
    def from_keys_dir(cls, keys_dir: str | Path, name: str) -> ClientCurve:
        """The pair ``cryoptycho keys`` wrote for client ``name`` in ``keys_dir``."""
        d = Path(keys_dir)
        return cls(d / PRIVATE_DIR / f"{name}.key_secret", d / f"{SERVER_NAME}.key")


def generate_server_keys(keys_dir: str | Path) -> Path:
    """Create the server key pair in ``keys_dir`` (never overwrites); returns the public file."""
    d = Path(keys_dir)
    if (d / f"{SERVER_NAME}.key_secret").exists():
        raise FileExistsError(
            f"{d / SERVER_NAME}.key_secret exists; remove it first to make a new server key"
        )
    d.mkdir(parents=True, exist_ok=True)
    (d / CLIENTS_DIR).mkdir(exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(d), SERVER_NAME)
    Path(secret).chmod(0o600)
    return Path(public)


def generate_client_keys(keys_dir: str | Path, name: str) -> Path:
    """Create client ``name``'s key pair under ``private/`` and admit its public key
    (copied to ``clients/``); returns the secret file to hand to the client."""
    if not name or "/" in name or name.startswith(".") or name == SERVER_NAME:
        raise ValueError(
            f"client name {name!r} must be a plain file name other than {SERVER_NAME!r}"
        )
    d = Path(keys_dir)
    private = d / PRIVATE_DIR
    if (private / f"{name}.key_secret").exists():
        raise FileExistsError(f"client key {private / name}.key_secret exists")
    private.mkdir(parents=True, exist_ok=True)
    private.chmod(0o700)
    (d / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(private), name)
    Path(secret).chmod(0o600)
    shutil.copy(public, d / CLIENTS_DIR / f"{name}.key")
    return Path(secret)


def apply_server_curve(socket: zmq.Socket, keys_dir: str | Path) -> None:
    """Make ``socket`` a CURVE server with the key pair in ``keys_dir`` (before bind)."""
    public, secret = _load(Path(keys_dir) / f"{SERVER_NAME}.key_secret", need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def start_authenticator(
    context: zmq.Context, keys_dir: str | Path, allow_ips: tuple[str, ...] = ()
) -> ThreadAuthenticator:
    """Start the ZAP handler admitting the public keys in ``keys_dir/clients`` (call ``.stop()``).

    One per context, before its sockets bind. ``allow_ips`` adds an IP allow-list on top.
    """
    clients = Path(keys_dir) / CLIENTS_DIR
    if not clients.is_dir():
        raise FileNotFoundError(
            f"no allowed-clients directory {clients} (run `cryoptycho keys {keys_dir}`)"
        )
    auth = ThreadAuthenticator(context)
    auth.start()
    if allow_ips:
        auth.allow(*allow_ips)
    auth.configure_curve(domain="*", location=str(clients))
    return auth


def apply_client_curve(
    socket: zmq.Socket,
    client_keys: str | Path | tuple[bytes, bytes],
    server_public: str | Path | bytes,
) -> None:
    """Make ``socket`` a CURVE client (before connect).

    ``client_keys`` is the client's ``.key_secret`` file or a ``(public, secret)`` Z85 pair;
    ``server_public`` the server's ``.key`` file or its Z85 public key.
    """
    if isinstance(client_keys, tuple):
        public, secret = client_keys
    else:
        public, secret = _load(Path(client_keys), need_secret=True)
    if isinstance(server_public, bytes):
        server_key = server_public
    else:
        server_key, _ = _load(Path(server_public), need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_key


def apply_curve(socket: zmq.Socket, curve: ClientCurve | None) -> None:
    """SDK helper: no-op without ``curve``."""
    if curve is not None:
        apply_client_curve(socket, curve.secret_file, curve.server_public_file)


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CURVE key file {path} does not exist (make keys with `cryoptycho keys`)"
        )
    public, secret = zmq.auth.load_certificate(str(path))
    if need_secret and not secret:
        raise ValueError(f"{path} holds no secret key; pass the .key_secret file")
    return public, secret
