"""`cryoptycho serve`: run the live reconstruction service until SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("cryoptycho.serve")
#: how long a stopping daemon waits for its detector source to finish (its decoding jobs, the
#: abort of a series still open, its log lines)
SOURCE_STOP_S = 30.0
#: in the spool directory: held (flock) by the daemon that owns the directory, for its lifetime
SPOOL_LOCK = ".cryoptycho-serve.lock"


def _set_pairs(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--set options.iterations=50`` → nested dict; values parsed as JSON when they parse."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML configuration file (keys as in daemon/SERVICE.md).")
@click.option("--ingest", help="Ingest PULL endpoint [tcp://127.0.0.1:5600].")
@click.option("--publish", help="Publish PUB endpoint [tcp://127.0.0.1:5601].")
@click.option("--control", help="Control ROUTER endpoint [tcp://127.0.0.1:5602].")
@click.option("--metrics-port", type=int, help="Prometheus HTTP port [9640]; 0 = any free port.")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-concurrent-scans", type=int)
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), help="Engine backend of new scans.")
@click.option("--recover/--no-recover", default=None, help="Finish unfinished scans found in the spool.")
@click.option("--log-format", type=click.Choice(["text", "json"]))
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any setting, dotted for nested ones (e.g. options.iterations=50). Repeatable.")
@click.option("--source", metavar="URL",
              help="Also read a detector stream directly, e.g. dectris2://HOST:31001 (frames enter the scans "
                   "without the ingest socket).")
@click.option("--limit", "limit_pairs", multiple=True, metavar="KEY=VALUE",
              help="A protocol limit (the [limits] table), e.g. max_frame_side=2048. Repeatable.")
def command(config_path: Path | None, sets: tuple[str, ...], backend: str | None,
            limit_pairs: tuple[str, ...], **flags: Any) -> None:
    """Run the live reconstruction service (ZeroMQ ingest/publish/control + Prometheus).

    On start it prints one JSON line with the bound endpoints (useful with port 0).
    """
    # imported here, not at the top: `serve --help` need not build the settings' models (0.6 s)
    from cryoptycho.daemon.config import ConfigError, load_config, unknown_environment

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides = _merge(overrides, _set_pairs(sets))
    if backend is not None:
        overrides = _merge(overrides, {"options": {"backend": backend}})
    if limit_pairs:
        from cryoptycho.protocols.limits import parse_limit_pairs

        try:
            overrides = _merge(overrides, {"limits": parse_limit_pairs(limit_pairs)})
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--limit") from None
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    from cryoptycho.daemon.logs import setup_logging
    from cryoptycho.daemon.service import Service
    from cryoptycho.protocols.sources import check_source

    if config.source is not None:
        try:
            check_source(config.source)  # an unknown scheme or a missing host fails before anything is bound
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None

    _check_writable(config)
    setup_logging(config.log_format, config.log_level)
    _check_open_files(config)
    spool_lock = _lock_spool_dir(Path(config.spool_dir))  # noqa: F841 - held until the process exits
    for name in unknown_environment():
        log.warning("environment variable %s sets no setting of the service and is ignored "
                    "(keys: daemon/SERVICE.md, Configuration)", name)
    service = Service(config)
    try:
        service.start()
    except RuntimeError as exc:
        service.close()
        raise click.ClickException(str(exc)) from None
    # SIGHUP too: the terminal of an interactive `serve` closed; there is no configuration
    # reload, and draining keeps every scan for the next start where the default would kill
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: service.request_stop(signal.Signals(signum).name,
                                                                       again_hurries=True))
    bridge_stop = threading.Event()
    source_thread: threading.Thread | None = None
    if config.source is not None:
        try:
            source_thread = _start_source(config, bridge_stop, service)
        except (ValueError, TypeError) as exc:
            service.close()
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"event": "ready", **service.endpoints, "metrics_port": service.metrics_port}))
    sys.stdout.flush()
    try:
        service.run()
    finally:
        bridge_stop.set()
        if source_thread is not None:
            # the daemon's drain waited for the source already (its images are spooled); this
            # join is for a run() that raised, whose drain did not: the source's last words
            # (its stop line, the count of errors it held back) come after it sees the stop, and
            # a daemon thread not waited for was cut off by the exit. Closing the sink frees a
            # put() held by back-pressure.
            service.direct.close()
            source_thread.join(SOURCE_STOP_S)
            if source_thread.is_alive():
                log.warning("the detector source did not stop within %.0f s", SOURCE_STOP_S)
        service.close()
    log.info("stopped")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dectris_notice_handler(service: Any) -> Any:
    """What the service does with a DECTRIS series notice (protocols/dectris/convert.SeriesNotice):
    count it (``cryoptycho_dectris_series_total`` by outcome and field, or
    ``cryoptycho_dectris_header_warnings_total`` by field, or
    ``cryoptycho_dectris_decoding_degraded_total``; ``cryoptycho_dectris_decoding_fallback`` is 1
    from a ``degraded`` notice to a ``restored`` one) and publish it as an ``error`` event
    (field ``dectris.<key>``, rule ``dectris_series_skipped`` / ``_rejected`` /
    ``dectris_header_implausible`` / ``dectris_decoding_restored`` …). Called on the source's
    thread: both are thread-safe."""
    import time

    from cryoptycho.protocols.messages import ErrorEvent

    def handle(notice: Any) -> None:
        if notice.outcome == "warning":
            service.metrics.dectris_header_warnings.labels(field=notice.field).inc()
        elif notice.outcome == "undecodable":
            service.metrics.dectris_undecodable.labels(field=notice.field).inc()
        elif notice.outcome == "degraded":
            service.metrics.dectris_decoding_degraded.inc()
            service.metrics.dectris_decoding_fallback.set(1)
        elif notice.outcome == "restored":
            service.metrics.dectris_decoding_fallback.set(0)
        else:
            service.metrics.dectris_series.labels(outcome=notice.outcome, field=notice.field).inc()
        # through the service's error path: rate-limited, clipped, a bad scan id kept out of scan_id
        service.publish_error(ErrorEvent(f"dectris.{notice.field}", notice.rule, notice.message,
                                         notice.scan_id, time.time()))

    return handle


def _start_source(config: Any, stop: threading.Event, service: Any) -> threading.Thread:
    """Run the detector source named by ``config.source`` on its own thread, delivering into
    the service's direct sink; its failure is logged and stops the service (a daemon started
    for one detector stream is of no use once that stream is gone)."""
    from cryoptycho.protocols.sources import source_class

    url = config.source
    cls = source_class(url)
    settings = getattr(config, cls.config_section) if cls.config_section else None
    source = cls(url, settings, workers=config.source_workers, on_notice=dectris_notice_handler(service))

    # the daemon's stop sets ``stop`` and takes what the source still delivers until ``ended``
    # (Service._drain_sources): the images it holds reach the spool before the sink closes
    ended = service.direct.attach(stop)

    def target() -> None:
        try:
            _say_if_unreachable(url)
            stats = source.run(service.direct, stop)
            log.info("source %s stopped: %s", url, stats)
        except Exception:
            log.exception("detector source failed; stopping the service", extra={"source": url})
            service.request_stop()
        finally:
            ended.set()

    thread = threading.Thread(target=target, name="source", daemon=True)
    thread.start()
    return thread


def _say_if_unreachable(url: str, timeout_s: float = 3.0) -> None:
    """Warn when nothing listens at the source's host and port. ZeroMQ connects in the
    background and retries for ever, so a mistyped or switched-off DCU otherwise looked exactly
    like a detector that is not acquiring yet. A bare TCP connect, closed before any ZeroMQ
    handshake: the detector's PUSH socket never counts it as a peer."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        log.warning("cannot reach the detector at %s:%s (%s); the daemon keeps trying: check the "
                    "address and that the detector's stream is enabled", host, port, exc,
                    extra={"source": url})


def _lock_spool_dir(spool_dir: Path) -> Any:
    """The spool directory, locked for this daemon: a second daemon given the same directory
    took the first one's open scans for scans left by a crash, rebuilt their spool files from
    the journals and renamed the copies over the files the first was writing. The lock is the
    kernel's (flock), so it goes with the process, even after kill -9."""
    import fcntl
    import os
    import socket

    handle = open(spool_dir / SPOOL_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - open for the process' life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise click.ClickException(
            f"spool_dir {spool_dir} is in use by another daemon ({holder}): each daemon needs a spool "
            "directory of its own; stop that daemon or give this one another spool_dir") from None
    except OSError as exc:  # a file system without locks (some network mounts): the start goes on
        log.warning("cannot lock spool_dir %s (%s): a second daemon given the same directory would not be "
                    "stopped", spool_dir, exc.strerror or exc)
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _check_open_files(config: Any) -> None:
    """Raise the open-file limit to the hard one and refuse to start below the daemon's floor
    (daemon/openfiles.py): a daemon that runs out of descriptors is aborted by ZeroMQ."""
    from cryoptycho.daemon.openfiles import raise_soft_limit, refusal

    why = refusal(raise_soft_limit(), config)
    if why is not None:
        raise click.ClickException(why)


def _check_writable(config: Any) -> None:
    """Fail at start, naming the key, when the spool or results directory cannot be created or
    written (a path under a file, no permission for the service's user, a read-only mount): it
    was a traceback at start, or — for a directory that exists but is not writable — every
    scan failing only when its result was due."""
    import tempfile

    for key in ("spool_dir", "results_dir"):
        path = Path(getattr(config, key))
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise click.ClickException(f"{key} {path} is not a writable directory: {exc.strerror or exc}") from None
