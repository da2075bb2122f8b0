"""`cryoptycho broker`: place scans on a fleet of daemons (one per GPU), one scan on one daemon."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import click
from cryoptycho.protocols.limits import limits_with, parse_limit_pairs
from cryoptycho.protocols.security import ClientCurve

from ..broker import Broker, BrokerOptions, parse_backend
from ..logs import setup_logging
from ..notify import SystemdNotifier


def _backends(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Any]:
    try:
        return [parse_backend(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


#: what click prefixes an option's environment variable with (CRYOPTYCHO_BROKER_BACKENDS)
ENV_PREFIX = "CRYOPTYCHO_BROKER_"


@click.command(context_settings={"auto_envvar_prefix": ENV_PREFIX.rstrip("_")})
@click.option("--ingest", default=BrokerOptions.ingest, show_default=True,
              help="Endpoint producers PUSH to (the broker's PULL socket binds it).")
@click.option("--control", default=BrokerOptions.control, show_default=True,
              help="Control ROUTER endpoint: ping, status, register, unregister.")
@click.option("--backend", "backends", multiple=True, callback=_backends,
              metavar="INGEST[,control=ENDPOINT][,slots=N]",
              help="A daemon: its ingest endpoint, optionally its control endpoint (polled for "
                   "status and liveness) and the scans it takes at once (default: its reported "
                   "max_concurrent_scans, else 1). Repeat per daemon; env CRYOPTYCHO_BROKER_BACKENDS "
                   "takes a space-separated list.")
@click.option("--hold-bytes", type=click.IntRange(min=1), default=BrokerOptions.hold_bytes,
              show_default=True, help="Memory for scans waiting for a free daemon; beyond it "
                                      "producers block.")
@click.option("--poll-interval", "poll_interval_s", type=click.FloatRange(min=0.05),
              default=BrokerOptions.poll_interval_s, show_default=True,
              help="Seconds between status requests to each daemon's control socket.")
@click.option("--dead-after", "dead_after_s", type=click.FloatRange(min=0.1),
              default=BrokerOptions.dead_after_s, show_default=True,
              help="A daemon silent this long (seconds) gets no new scans.")
@click.option("--curve-keys-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Daemons run with CURVE: the key directory holding server.key and "
                   "private/<--curve-client>.key_secret (`cryoptycho keys DIR --client broker`).")
@click.option("--curve-client", default="broker", show_default=True,
              help="Client name of the broker's key pair in --curve-keys-dir.")
@click.option("--limit", "limit_pairs", multiple=True, metavar="KEY=VALUE",
              help="A protocol limit, as the daemons' [limits] table (e.g. max_frame_side=2048). Repeatable.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO",
              show_default=True)
def command(ingest: str, control: str, backends: list[Any], hold_bytes: int, poll_interval_s: float,
            dead_after_s: float, curve_keys_dir: Path | None, curve_client: str, limit_pairs: tuple[str, ...],
            log_format: str, log_level: str) -> None:
    """Route each scan to a free daemon and keep all of its frames there.

    Producers send to the broker exactly as to a daemon. Daemons are listed with --backend or
    register themselves on the control socket. See deploy/README.md, "Scale-out".
    """
    setup_logging(log_format, log_level)
    # click ignores a misspelt variable in silence (CRYOPTYCHO_BROKER_BACKEND: no daemons at all)
    ctx = click.get_current_context()
    taken = {f"{ENV_PREFIX}{param.name.upper()}" for param in ctx.command.params if param.name}
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name not in taken:
            logging.getLogger("cryoptycho.broker").warning(
                "environment variable %s sets no option of the broker and is ignored (options: "
                "cryoptycho broker --help; %s<OPTION>)", name, ENV_PREFIX)
    if "://" not in ingest or (control and "://" not in control):
        raise click.BadParameter("endpoints look like tcp://127.0.0.1:5590", param_hint="--ingest/--control")
    curve = None
    if curve_keys_dir is not None:
        curve = ClientCurve.from_keys_dir(curve_keys_dir, curve_client)
        for needed in (curve.secret_file, curve.server_public_file):
            if not needed.is_file():
                raise click.BadParameter(f"{needed} does not exist", param_hint="--curve-keys-dir")
    try:
        limits = limits_with(parse_limit_pairs(limit_pairs))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limit") from None
    options = BrokerOptions(ingest=ingest, control=control or None, hold_bytes=hold_bytes,
                            poll_interval_s=poll_interval_s, dead_after_s=dead_after_s, limits=limits,
                            curve=curve)
    broker = Broker(options, backends)
    notifier = SystemdNotifier()

    def stop(signum: int, frame: Any) -> None:
        logging.getLogger("cryoptycho.broker").info("signal %d: stopping", signum)
        notifier.stopping()
        broker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not backends:
        click.echo("no --backend given: waiting for daemons to register on the control socket", err=True)
    broker.run(
        on_ready=lambda: notifier.ready(f"routing {broker.ingest_endpoint} to {len(broker.backends)} daemons"),
        on_tick=notifier.watchdog,
    )
