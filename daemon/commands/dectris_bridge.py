"""`cryoptycho dectris-bridge`: a DECTRIS detector's stream → a daemon's ingest socket elsewhere.

The command around :func:`cryoptycho.protocols.dectris.bridge.run_bridge`, for a daemon on
another host than the detector's reader (``serve --source`` reads the detector itself). Its exit
status says whether every series reached the daemon: a facility script or systemd sees a series
the daemon refused, or one the bridge had to drop, without reading the log.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

#: exit status when a series did not reach the daemon whole (refused, lost, skipped, rejected)
SERIES_FAILED = 1


@click.command()
@click.argument("source")
@click.option("--ingest", default="tcp://127.0.0.1:5600", show_default=True, help="The daemon's ingest endpoint.")
@click.option("--control", default=None,
              help="The daemon's control endpoint, which says whether it accepted each series (default: the "
                   "ingest port + 2, serve's layout).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON file of bridge settings (BridgeConfig: crop, bin, raster, max_held_bytes, ...).")
@click.option("--series", type=click.IntRange(min=1), default=None,
              help="Stop once this many series have ended and the daemon took them (default: until SIGINT/SIGTERM).")
@click.option("--no-confirm", is_flag=True,
              help="Send without asking the daemon whether it accepted a series (a relay without control): a "
                   "refused series is then lost unseen.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: this client's .key_secret file (needs --server-key; `cryoptycho keys`), for a daemon "
                   "that runs with CURVE.")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: the daemon's public server.key file.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def command(source: str, ingest: str, control: str | None, config_file: Path | None, series: int | None,
            no_confirm: bool, client_key: Path | None, server_key: Path | None, log_level: str) -> None:
    """Bridge a DECTRIS detector stream (SOURCE: dectris2://HOST[:PORT] or dectris1://...) to a daemon.

    Each series becomes a scan; a series the daemon refuses is logged with its reason, one refused
    because its scan queue is full waits in memory (max_held_bytes) until the daemon has room. The
    counters are printed as JSON at the end; the exit status is 1 when a series did not reach the
    daemon whole (refused, lost, skipped or rejected), 0 otherwise.
    """
    from cryoptycho.daemon.logs import setup_logging
    from cryoptycho.protocols.dectris.bridge import BridgeConfig, run_bridge
    from cryoptycho.protocols.security import ClientCurve

    if (client_key is None) != (server_key is None):
        raise click.BadParameter("give both --client-key and --server-key, or neither")
    curve = ClientCurve(client_key, server_key) if client_key and server_key else None
    setup_logging("text", log_level.upper())
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{config_file}: {exc}", param_hint="--config") from None
    try:
        cfg = BridgeConfig.model_validate(config)
    except ValueError as exc:
        raise click.BadParameter(f"{config_file}: {exc}", param_hint="--config") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stats = run_bridge(source, ingest, cfg, stop, max_series=series, control=control, confirm=not no_confirm,
                       curve=curve)
    click.echo(json.dumps(stats.to_dict()))
    conv = stats.converter
    failed = {"refused by the daemon": stats.series_refused, "lost": stats.series_lost,
              "skipped": conv.get("failed_series", 0), "rejected": conv.get("rejected_series", 0) - stats.series_refused
              - stats.series_lost}
    failed = {why: n for why, n in failed.items() if n > 0}
    if failed:
        click.echo("series that did not reach the daemon whole: "
                   + ", ".join(f"{n} {why}" for why, n in failed.items()), err=True)
        sys.exit(SERIES_FAILED)
