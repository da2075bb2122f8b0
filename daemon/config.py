"""Configuration of `cryoptycho serve`: one validated settings object.

Precedence (lowest first): built-in defaults < environment (``CRYOPTYCHO_<KEY>``, nested keys with
``__``, e.g. ``CRYOPTYCHO_OPTIONS__ITERATIONS=50``) < TOML file (``--config``) < command line.
The TOML file is read here rather than by pydantic-settings' own TOML source so that an unknown key
is reported with the file it came from (the model itself forbids unknown keys too).
"""

from __future__ import annotations

import codecs
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryoptycho.daemon.storage.outputs import ALL_FORMATS, OutputFormat, check_formats
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.protocols.dectris.convert import BridgeConfig
from cryoptycho.protocols.limits import Limits
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "CRYOPTYCHO_"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


class ServiceConfig(BaseSettings):
    """Every setting of the live service. Units are in the names (``_s``, ``_bytes``, ``_hz``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    ingest: str = "tcp://127.0.0.1:5600"
    """Endpoint the ingest PULL socket binds (producers PUSH scans here)."""
    publish: str = "tcp://127.0.0.1:5601"
    """Endpoint the PUB socket binds (previews, metrics, results, events)."""
    control: str = "tcp://127.0.0.1:5602"
    """Endpoint the control ROUTER socket binds."""
    metrics_host: str = "127.0.0.1"
    """Address the Prometheus HTTP endpoint binds (0.0.0.0 to expose it)."""
    metrics_port: int = Field(9640, ge=0, le=65535)
    """Prometheus HTTP port; 0 picks a free port (reported by the control `status` reply)."""
    metrics_enabled: bool = True
    """Serve the Prometheus endpoint at all."""
    curve_keys_dir: Path | None = None
    """CURVE on all three sockets: the key directory of ``cryoptycho keys`` (``server.key_secret``
    and ``clients/*.key``, the admitted clients). Unset: no encryption or authentication."""

    spool_dir: Path = Path("cryoptycho-spool")
    """Every received frame is written here before it counts as received."""
    results_dir: Path = Path("cryoptycho-results")
    """One result file per scan (HDF5 + phase MRC/PNG) is written here."""
    spool_fsync: bool = False
    """fsync the spool after every message (survives power loss, not only a process crash)."""
    disk_reserve_bytes: int = Field(64 * 2**20, ge=0)
    """Spool appends and result files that would leave less free space on their file system are
    refused before HDF5 writes (HDF5 corrupts or crashes on a full disk): the scan fails with an
    error naming the directory, its spool file intact (``storage/diskspace.py``)."""
    numpy_hugepages: bool = False
    """Let NumPy ask the kernel for transparent huge pages on large arrays (its default). Off by
    default: where the kernel compacts memory for such requests (THP ``defrag = madvise``, common),
    the frame store's first writes stall on it (see SERVICE.md, "Process settings")."""
    frame_store_reuse_bytes: int = Field(4 * 2**30, ge=0)
    """Host memory of finished scans' frame stores that the daemon keeps mapped for the next
    scans' stores (in use or idle, at most this many bytes): a store in memory faulted in
    before needs no fresh pages (SERVICE.md, "Process settings"). 0 = every store maps fresh
    memory and unmaps it when it goes."""
    frame_store_warm_bytes: int = Field(0, ge=0)
    """Host memory the daemon faults in at start, on a thread of its own, for the frame stores
    of its first scans: a store takes pages of it instead of fresh ones, whatever its size
    (SERVICE.md, "Process settings"). Resident from start whether or not a scan uses it. 0 =
    none: a daemon's first scans fault their stores' memory in as they fill them."""
    output_formats: tuple[OutputFormat, ...] = ALL_FORMATS
    """What each scan's outputs are (``storage/outputs.py``): the HDF5 result (always) and the
    phase exports ``mrc`` and ``png``."""
    keep_spool: bool = False
    """Keep a finished scan's spool file (its raw frames are copied into the result file anyway)."""
    recover: bool = True
    """At start, finish the unfinished scans found in the spool directory."""
    recover_wait_s: float = Field(30.0, ge=0)
    """A recovered scan whose producer never sent scan_end waits this long for more frames."""
    recover_finish_partial: bool = False
    """A recovered scan that still lacks frames after ``recover_wait_s`` (its producer did not
    return after the restart) is ended and reconstructed from what it holds, its result marked
    ``partial`` (``end_reason: "recover_finish_partial"``), instead of being aborted to wait for
    an operator's ``finish_scan``: for an unattended facility that wants every scan's result."""
    acquisition_timeout_s: float = Field(600.0, gt=0)
    """A scan that receives nothing for this long while acquiring is ended with what it has."""

    drain_timeout_s: float = Field(20.0, ge=0)
    """On SIGTERM, how long workers get to checkpoint before the service exits anyway."""

    max_concurrent_scans: int = Field(2, ge=1)
    """Scans reconstructed at the same time; further scans are spooled and queued."""
    max_queued_scans: int = Field(8, ge=0)
    """Accepted scans that may wait for a free slot (their frames are spooled meanwhile)."""
    host_memory_budget_bytes: int = Field(8 * 2**30, gt=0)
    """Host memory all running scans together may use (engine estimate)."""
    device_memory_budget_bytes: int | None = Field(None, gt=0)
    """GPU memory budget (CuPy backend); None = the device's free memory at scan start."""
    queue_capacity_frames: int = Field(65536, ge=1)
    """Frames waiting for a scan's worker; beyond this the service stops reading the ingest
    socket until the worker catches up (producers block: backpressure, not loss)."""
    ingest_queue_bytes: int = Field(256 * 2**20, ge=1)
    """Bytes of received messages the ingest socket may hold that the service has not read (they
    are outside its backpressure). ZeroMQ counts that queue in messages (ZMQ_RCVHWM), fixed per
    connection when a producer connects, before any scan declares its frame size: the socket
    holds this ÷ ``limits.max_message_bytes`` messages, at least four (with one, libzmq never
    delivered a CURVE producer's messages)."""
    release_memory_idle_s: float = Field(60.0, ge=0, allow_inf_nan=False)
    """Seconds the daemon has had no live scan (none receiving, waiting or reconstructing) and
    read no ingest message (a refused scan's frames are read into memory too) after which it gives the memory it kept for the next messages back to the kernel (glibc's
    ``malloc_trim``; daemon/ingest.py ``keep_message_memory``), once per idle spell; 0 = never."""
    control_max_part_bytes: int | None = Field(None, ge=1024)
    """Largest message part the control socket takes (ZMQ_MAXMSGSIZE): a client that sends a
    larger one is disconnected by ZeroMQ as soon as the part's length arrives, before its bytes
    are held. None = twice ``limits.max_header_bytes`` (2 MiB): no standard request carries
    more than its header part (protocols/limits.py, control_max_part_bytes)."""
    control_queue_messages: int = Field(16, ge=4)
    """Requests one control client may have queued unread (ZMQ_RCVHWM of the control socket;
    ZeroMQ's default is 1000): with ``control_max_part_bytes`` it bounds what a client can make
    the daemon hold (PROTOCOL.md § 1, Message size)."""
    control_pending_replies: int = Field(64, ge=1)
    """Replies one control client may have waiting to be sent (behind a reply made later, e.g. a
    receipt's look at a hung file system: replies keep request order); a request past it is
    answered ``control_busy`` without being handled, so a client that pipelines requests without
    end cannot grow the daemon's memory (each reply is up to ``max_header_bytes``)."""

    preview_hz: float = Field(5.0, gt=0, le=100)
    """Live previews per second per scan (latest-only)."""
    resolution_interval_s: float = Field(20.0, ge=0)
    """Period of the live half-set FRC resolution estimate; 0 disables it."""
    resolution_share: float = Field(0.25, gt=0, le=1)
    """Share of a worker's compute the two half-set reconstructions may take."""
    refine_time_budget_s: float = Field(60.0, gt=0)
    """Budget of the full-batch refinement after scan_end (options.time_budget_s wins if smaller)."""
    divergence_factor: float = Field(1e3, gt=1)
    """A loss this many times above the best so far counts as divergence (rolled back)."""
    max_rollbacks: int = Field(3, ge=0)
    """Rollbacks a scan may take before it is marked failed."""

    options: ReconOptions = Field(default_factory=ReconOptions)
    """Default reconstruction options; a scan's overrides are merged on top."""

    source: str | None = None
    """Also read a detector stream directly, by URL scheme (protocols/sources.py): a DECTRIS
    detector at ``dectris2://HOST:31001`` or ``dectris1://…``; its frames enter the scans
    without passing the ingest socket."""
    source_workers: int = Field(2, ge=1, le=64)
    """Threads (worker processes with ``[dectris] worker_processes = true``) that decode and
    bin the source's frames (about one per core)."""
    dectris: BridgeConfig = Field(default_factory=BridgeConfig)
    """How DECTRIS series become scans (``[dectris]`` table: crop, bin, raster, energy, …)."""

    limits: Limits = Field(default_factory=Limits)
    """What one message may hold (``[limits]`` table: max_frame_side, max_message_bytes, …;
    protocols/limits.py). Raise ``max_frame_side`` for detectors read out beyond 1024²."""

    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (ts, level, logger, msg, thread, scan_id, …)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    watchdog: bool = True
    """Send WATCHDOG=1 to systemd from the main loop when $WATCHDOG_USEC is set."""

    @field_validator("ingest", "publish", "control")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"must be a ZeroMQ endpoint like tcp://127.0.0.1:5600, got {value!r}")
        return value

    @field_validator("output_formats")
    @classmethod
    def _formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_formats(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (TOML merged with CLI by load_config) beats the environment; no dotenv/secret files.
        return (init_settings, env_settings)


def _check_keys(table: dict[str, Any], model: type, where: str, prefix: str = "") -> None:
    fields = model.model_fields  # type: ignore[attr-defined]
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(sorted(fields))})")
        sub = fields[key].annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            if not isinstance(value, dict):
                # `options = 3` reached the merge below and died there with an AttributeError
                raise ConfigError(f"{where}: '{prefix}{key}' must be a table of keys ([{prefix}{key}] in "
                                  f"TOML, '{prefix}{key}.KEY=VALUE' with --set), got {value!r}")
            _check_keys(value, sub, where, f"{prefix}{key}.")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings table of a TOML file (top level, or a ``[cryoptycho]`` table if present)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        # Notepad and other Windows editors save UTF-8 with a byte-order mark, which tomllib
        # took for a statement: "not valid TOML: Invalid statement (at line 1, column 1)"
        table = tomllib.loads(data.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; an editor's Latin-1 comment was a traceback
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start}: "
                          f"{exc.object[exc.start:exc.start + 1]!r}); save the file as UTF-8") from None
    except OSError as exc:  # a unit's User= that cannot read a root-owned 0600 file was a traceback
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    table = _unwrap_cryoptycho_table(table, path)
    _check_keys(table, ServiceConfig, str(path))
    return table


def _unwrap_cryoptycho_table(table: dict[str, Any], path: Path) -> dict[str, Any]:
    """The keys of a ``[cryoptycho]`` table, with the file's other tables beside it: SERVICE.md's
    "keys at top level (or under [cryoptycho]), reconstruction defaults under [options]" reads
    as ``[cryoptycho]`` followed by ``[options]``, which was refused as an unknown key
    'cryoptycho'. A key given both inside and outside ``[cryoptycho]`` is named, not chosen."""
    inner = table.get("cryoptycho")
    if not isinstance(inner, dict):
        return table
    rest = {key: value for key, value in table.items() if key != "cryoptycho"}
    both = sorted(set(rest) & set(inner))
    if both:
        raise ConfigError(f"{path}: {', '.join(repr(k) for k in both)} given both under [cryoptycho] "
                          "and outside it; keep one")
    return {**inner, **rest}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Build the configuration: defaults < environment < ``path`` (TOML) < ``overrides`` (CLI).

    ``overrides`` may hold nested dicts (``{"options": {"iterations": 5}}``); ``None`` values are
    ignored so that unset command-line flags do not mask the file or the environment.
    """
    try:
        return _load_config(path, overrides)
    except SettingsError as exc:
        # a list or table given in the environment must be JSON: CRYOPTYCHO_OUTPUT_FORMATS=h5,png
        # was pydantic-settings' traceback, naming a "field" and an "EnvSettingsSource"
        found = re.search(r'field "([^"]+)"', str(exc))
        var = f"{ENV_PREFIX}{found.group(1).upper()}" if found else f"a {ENV_PREFIX}* variable"
        raise ConfigError(f"invalid configuration (environment): {var} is not valid JSON; a list or a "
                          f"table in the environment is written as JSON, e.g. {ENV_PREFIX}OUTPUT_FORMATS="
                          "'[\"h5\", \"png\"]'") from None


def _load_config(path: str | Path | None, overrides: dict[str, Any] | None) -> ServiceConfig:
    init: dict[str, Any] = read_toml(path) if path is not None else {}
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(cli, ServiceConfig, "command line")
    init = _deep_merge(init, cli)
    nested = [key for key in ("options", "limits", "dectris") if key in init]
    if nested:
        # nested models are plain models: merge the environment's nested keys below the file's
        env_cfg = _env_only()
        for key in nested:
            below = env_cfg.options.to_dict() if key == "options" else getattr(env_cfg, key).model_dump(
                exclude_unset=True)
            init[key] = _deep_merge(below, init[key])
    try:
        return ServiceConfig(**init)
    except ValidationError as exc:
        source = f"{path} / environment / command line" if path else "environment / command line"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{_list_hint(e)}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({source}): {problems}") from None


def _list_hint(error: Any) -> str:
    """How to write a list, for a list-valued setting given a bare string (``--set
    output_formats=h5`` said only "Input should be a valid tuple"; the limits' lists also take
    a comma-separated one, protocols/limits.py)."""
    if error["type"] in ("tuple_type", "list_type") and isinstance(error.get("input"), str):
        return (" (a list: in TOML [\"a\", \"b\"], with --set a JSON list such as "
                "'output_formats=[\"h5\"]')")
    return ""


#: CRYOPTYCHO_* variables that other commands read (view, broker, simulate, the tests)
OTHER_COMMANDS_ENV = ("VIEW_", "BROKER_", "STRUCTURES", "CHROMIUM", "CHROMEDRIVER", "TEST_")


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """``CRYOPTYCHO_*`` variables that set no key of the service (a typo such as
    ``CRYOPTYCHO_SPOOL_DIRR``): the environment source ignores them, so the default applies
    silently unless someone says so. Nested keys (``__``) are checked by the model itself."""
    environ = os.environ if environ is None else environ
    fields = {name.upper() for name in ServiceConfig.model_fields}
    unknown = []
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].upper()
        if key.split("__", 1)[0] not in fields and not key.startswith(OTHER_COMMANDS_ENV):
            unknown.append(name)
    return sorted(unknown)


def _env_only() -> ServiceConfig:
    try:
        return ServiceConfig()
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid environment configuration: {problems}") from None
