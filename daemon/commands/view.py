"""`cryoptycho view`: a live browser viewer of a running daemon (read-only)."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import click


@click.command()
@click.option("--publish", default="tcp://127.0.0.1:5601", show_default=True,
              help="The daemon's publish endpoint.")
@click.option("--control", default="tcp://127.0.0.1:5602", show_default=True,
              help="The daemon's control endpoint (snapshots for late joiners).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; loopback by default. Set a token before exposing it.")
@click.option("--port", default=8640, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", default=lambda: os.environ.get("CRYOPTYCHO_VIEW_TOKEN"),
              help="Access token required by the page (env CRYOPTYCHO_VIEW_TOKEN).")
@click.option("--max-side", default=512, show_default=True, type=int,
              help="Images are downsampled to at most this many pixels per side.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: this client's .key_secret file (needs --server-key; `cryoptycho keys`).")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: the daemon's public server.key file.")
def command(publish: str, control: str, host: str, port: int, token: str | None, max_side: int,
            client_key: Path | None, server_key: Path | None) -> None:
    """Serve the live viewer: object, probe, coverage, loss and resolution per scan."""
    from cryoptycho.protocols.security import ClientCurve

    if (client_key is None) != (server_key is None):
        raise click.BadParameter("give both --client-key and --server-key, or neither")
    curve = ClientCurve(client_key, server_key) if client_key and server_key else None
    import uvicorn
    from cryoptycho.daemon.web.hub import Hub
    from cryoptycho.daemon.web.server import HeaderTimeoutH11Protocol, create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise click.UsageError(f"refusing to serve on {host} without --token (the viewer shows your data)")
    import zmq
    from cryoptycho.protocols.client import InvalidEndpoint, check_endpoint

    try:  # the hub connects on its own threads, where a typo in an endpoint killed them
        for option, endpoint, kind in (("--publish", publish, zmq.SUB), ("--control", control, zmq.DEALER)):
            check_endpoint(endpoint, kind)
    except InvalidEndpoint as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    # bound here, before the URL is printed: uvicorn bound it itself after "viewer on …" was
    # printed, so a port in use read as serving, then as uvicorn's bare "address already in
    # use"; and --port 0 printed port 0
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    logging.basicConfig(level=logging.INFO)
    app = create_app(Hub(publish, control, max_side=max_side, curve=curve), token=token)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"cryoptycho viewer on {url}  (daemon: publish {publish}, control {control})")
    # timeout_graceful_shutdown: a page's WebSocket handler waits for the next preview and does not
    # see its page go, so without a limit SIGTERM waited for ever for pages closed long ago
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", ws="auto",  # the sans-I/O websockets implementation where uvicorn has it
        timeout_graceful_shutdown=1, http=HeaderTimeoutH11Protocol))
    server.run(sockets=[sock])
    if not server.started:  # (uvicorn.run's exit status for a server that did not start)
        raise SystemExit(3)


def _bind(host: str, port: int) -> socket.socket:
    """The viewer's listening socket, made as uvicorn makes it; or a usage error that names the
    address and, for one in use, what to do."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)  # (uvicorn's backlog) a browser opened at the printed URL waits, not refused
    except OSError as exc:
        sock.close()
        in_use = exc.errno == errno.EADDRINUSE
        hint = " (another viewer there? choose another port; 0 takes any free one, printed)" if in_use else ""
        raise click.BadParameter(f"cannot serve the viewer on {host}:{port}: {exc.strerror or exc}{hint}",
                                 param_hint="--port" if in_use else "--host") from None
    return sock
