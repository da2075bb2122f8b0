"""DECTRIS series → our ingest protocol's messages (ScanStart / Frames / ScanEnd / Abort).

:class:`SeriesConverter` is pure (decoded DECTRIS messages in, ingest messages out; no sockets);
:func:`bridge_messages` wraps it as a generator. The runner with sockets is :mod:`.bridge`.
Geometry precedence is documented in :mod:`.scan` and README.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..messages import Abort, Frames, ProbeModelSpec, ScanEnd, ScanStart
from .binning import FrameReducer, binned_side, saturation_threshold
from .header import (
    ELECTRON_MASS_KG,
    ELEMENTARY_CHARGE_C,
    LIGHT_M_S,
    PLANCK_J_S,
    check_header,
    electron_energy,
)
from .receiver import SeriesTracker
from .scan import PositionList, ProbeSpec, RasterSpec, ScanDescription, scan_description
from .schema import DectrisError, HeaderError, Image, Message, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

#: series whose side-channel positions are kept before their images come: a scan system sends
#: a series' positions ahead of it or beside it, rarely more than one or two series ahead
MAX_POSITION_SERIES = 16

IngestMessage = ScanStart | Frames | ScanEnd | Abort


class BridgeConfig(BaseModel):
    """How to turn a detector's series into scans (the daemon's ``dectris`` settings).

    ``energy_eV``, ``beam_center_px``, ``pixel_size_m`` and ``saturation_value`` only fill gaps
    in the detector's header; a ``user_data`` scan description wins over both. The pixel angle
    (or camera length) given here wins over the header's ``detector_distance``, which is the
    physical distance, not the effective camera length of a microscope's projector system."""

    model_config = ConfigDict(extra="forbid")

    channel: str | None = None
    """Image channel to use (e.g. ``threshold_1``); default: the series' first channel."""
    crop: int | None = Field(None, ge=1)
    """Side of the square window about the beam centre, detector pixels (None: whole frame)."""
    bin: int = Field(1, ge=1)
    """Sum bin × bin detector pixels into one (crop must be a multiple)."""
    raster: RasterSpec | None = None
    """Scan pattern when neither user_data nor the side channel gives one."""
    positions_endpoint: str | None = None
    """Side channel: the bridge binds PULL here for ``dectris_positions`` messages."""
    energy_eV: float | None = Field(None, gt=0)
    beam_center_px: tuple[float, float] | None = None
    """(y, x) detector pixels."""
    detector_pixel_angle_rad: float | None = Field(None, gt=0)
    """Scattering angle of one unbinned pixel; or give camera_length_m."""
    camera_length_m: float | None = Field(None, gt=0)
    pixel_size_m: float | None = Field(None, gt=0)
    """Physical detector pixel size, when the header lacks it."""
    saturation_value: int | None = Field(None, ge=1)
    probe_model: ProbeSpec = Field(default_factory=ProbeSpec)
    """Parametric probe, when neither user_data nor ``probe_file`` gives one."""
    probe_file: Path | None = None
    """Measured probe (sample plane, centred, M × M after crop and bin): ``.npy``, or HDF5 whose
    ``/probe`` is it (a cryoptycho dataset or result file, a ptychodus product: first mode).
    Read and checked when the configuration loads; scaled to each series' first image counts."""
    options: dict[str, Any] = Field(default_factory=dict)
    """ReconOptions overrides for every scan (user_data ``options`` are applied on top)."""
    scan_id_prefix: str = Field("dectris", min_length=1, max_length=64)
    worker_processes: bool = False
    """The daemon's DECTRIS source decodes and bins in worker processes (``source_workers`` of
    them, binned frames returned through shared memory) instead of threads. Processes take the
    parsing, which holds the GIL, off the daemon's process (its CPU per frame halves), which pays
    where cores are free; on a 2-core host they were mostly ahead with the engine paused, and
    threads always with it running (README § Benchmarks). Stream V2 only (V1 images are decoded
    by the receiver)."""
    frames_per_message: int = Field(64, ge=1, le=4096)
    flush_interval_s: float = Field(0.05, gt=0)
    """A partial batch leaves after this long, so the live view does not wait for a full one."""
    position_wait_s: float = Field(5.0, ge=0)
    """After a series' end, how long images still wait for side-channel positions."""
    max_held_bytes: int = Field(1 << 30, ge=0)
    """:func:`~.bridge.run_bridge` only: the detector frames it holds in memory while the
    daemon's scan queue is full (refused ``max_queued_scans``), sent once it has room, or while
    its verdict on a series is awaited (a daemon in back-pressure reads nothing); a series
    beyond this is dropped, logged and counted (``BridgeStats.series_lost``)."""

    _probe: np.ndarray | None = PrivateAttr(None)
    _probe_pixel_m: float | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _load_probe(self) -> BridgeConfig:
        # refused when the configuration loads, not at a series' first image
        side = binned_side(self.crop, self.bin) if self.crop is not None else None
        if self.probe_file is not None:
            self._probe, self._probe_pixel_m = load_probe_file(self.probe_file)
            if side is not None and self._probe.shape != (side, side):
                raise ValueError(f"probe_file {self.probe_file}: the probe is {self._probe.shape[0]}×"
                                 f"{self._probe.shape[1]} but frames are {side}×{side} (crop {self.crop}, "
                                 f"bin {self.bin})")
        return self

    @property
    def measured_probe(self) -> tuple[np.ndarray, float | None] | None:
        """(probe, its real-space pixel in m when the file says) read from ``probe_file``."""
        return None if self._probe is None else (self._probe, self._probe_pixel_m)


def load_probe_file(path: Path) -> tuple[np.ndarray, float | None]:
    """(M × M complex64 probe, real-space pixel size or None) from ``.npy`` or HDF5 ``/probe``;
    ValueError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"probe_file {path} does not exist")
    pixel = None
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            import h5py
            import hdf5plugin  # noqa: F401 - registers the compression filters a probe may use

            with h5py.File(path, "r") as f:
                if "probe" not in f or not isinstance(f["probe"], h5py.Dataset):
                    raise ValueError(f"probe_file {path}: no /probe dataset (an HDF5 probe file holds "
                                     "the probe at /probe, as cryoptycho and ptychodus files do)")
                arr = f["probe"][()]
                if "pixel_width_m" in f["probe"].attrs:
                    pixel = float(f["probe"].attrs["pixel_width_m"])
    except (OSError, ValueError) as exc:
        if str(exc).startswith("probe_file"):
            raise
        raise ValueError(f"probe_file {path}: cannot read it as .npy or HDF5 ({exc})") from None
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[0] >= 1:
        arr = arr[0]  # ptychodus stores (modes, M, M) or (opr, modes, M, M): the first mode
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 8:
        raise ValueError(f"probe_file {path}: expected a square M × M probe (M ≥ 8), got shape {arr.shape}")
    if arr.dtype.kind not in "fciu" or not np.isfinite(arr).all() or not np.abs(arr).any():
        raise ValueError(f"probe_file {path}: the probe must be finite numbers, not all zero")
    return arr.astype(np.complex64), pixel


@dataclass(frozen=True)
class SeriesNotice:
    """A series that did not become a scan (skipped), one whose scan our protocol refused
    (rejected), a header value that was set aside (warning), or a detector message that could
    not be decoded at all (undecodable). Published by the daemon as an ``error`` event with rule
    :attr:`rule` and field ``dectris.<field>``, and counted."""

    outcome: Literal["skipped", "rejected", "warning", "undecodable", "degraded", "restored", "lost"]
    series_id: int | None
    field: str  #: the header, configuration or user_data key concerned
    message: str
    scan_id: str | None = None

    @property
    def rule(self) -> str:
        return RULES[self.outcome]


RULES = {"skipped": "dectris_series_skipped", "rejected": "dectris_series_rejected",
         "warning": "dectris_header_implausible", "undecodable": "dectris_message_undecodable",
         # the source's worker processes could not start: it decodes on threads (source.DecodePool)
         "degraded": "dectris_decoding_degraded",
         # and started again at a later series start: the fallback is over
         "restored": "dectris_decoding_restored",
         # images of a decoding job a stopping daemon could not wait for (a hung worker; source.STOP_JOBS_S)
         "lost": "dectris_images_lost"}


@dataclass
class _Plan:
    start: SeriesStart
    scan_id: str
    channel: str
    expected: int
    energy_ev: float
    angle_rad: float
    description: ScanDescription | None
    streamed: bool
    detector: dict[str, float]  #: detector_pixel_size_m / camera_length_m when known (unbinned)
    scan_start: ScanStart | None = None
    reducer: FrameReducer | None = None
    sent: int = 0
    saturated_frames: int = 0
    batch: list[int] = field(default_factory=list)  #: image ids of the batch being filled
    batch_data: np.ndarray | None = None  #: (frames_per_message, M, M), rows filled in order
    batch_since: float = 0.0
    waiting: dict[int, np.ndarray] = field(default_factory=dict)  #: image id → frame, no position yet
    unpositioned: int = 0  #: images kept without a position (the daemon's own source)
    resumed: bool = False  #: the series of a scan recovered after a restart (:meth:`SeriesConverter.resume`)


class SeriesConverter:
    """DECTRIS messages → ingest messages. Errors in a series are logged, counted in ``stats``
    and reported to ``on_notice`` (:class:`SeriesNotice`), and skip that series — whatever the
    error, a header never stops the converter; an end without its start raises
    :class:`SeriesError`."""

    #: images past the scan's positions leave as UnpositionedFrames (the daemon's own source)
    #: instead of being refused one by one (our ingest protocol has no place for them)
    keeps_unpositioned = False

    def __init__(self, config: BridgeConfig | None = None, side_channel: bool = False,
                 on_notice: Callable[[SeriesNotice], None] | None = None,
                 taken: Callable[[str], bool] | None = None) -> None:
        self.config = config or BridgeConfig()
        self.side_channel = side_channel
        self.on_notice = on_notice
        #: whether the daemon already holds a scan of an id (its spool or result files): after
        #: a restart of the detector and the daemon the series counter starts again, and a
        #: series under an old name would be refused — its frames lost
        self.taken = taken
        self._used_ids: set[str] = set()
        self.tracker = SeriesTracker()
        self.plan: _Plan | None = None
        #: side-channel positions by series id (None: any series), then image id; series in the
        #: order their positions last arrived, oldest first (see add_positions)
        self._positions: dict[int | None, dict[int, np.ndarray]] = {}
        self._closing: _Plan | None = None  # ended, still waiting for side-channel positions
        self._closing_deadline = 0.0
        self.stats: dict[str, int] = {"series": 0, "frames_sent": 0, "failed_series": 0,
                                      "rejected_series": 0, "header_warnings": 0,
                                      "skipped_images": 0, "missing_images": 0,
                                      "images_without_position": 0, "saturated_frames": 0,
                                      "unpositioned_images": 0}

    def report(self, notice: SeriesNotice) -> None:
        """Log, count and hand on a notice about a series (the bridge's: the daemon refused it)."""
        self._notice(notice)

    def _notice(self, notice: SeriesNotice) -> None:
        if notice.outcome == "warning":
            self.stats["header_warnings"] += 1
            log.warning("DECTRIS series %s: %s", notice.series_id, notice.message)
        else:
            self.stats["failed_series" if notice.outcome == "skipped" else "rejected_series"] += 1
            log.error("DECTRIS series %s %s (%s): %s", notice.series_id, notice.outcome, notice.field,
                      notice.message)
        if self.on_notice is not None:
            try:
                self.on_notice(notice)
            except Exception:  # the listener's failure must not stop the stream
                log.exception("DECTRIS notice listener failed on %s", notice)

    def _skip(self, start: SeriesStart, exc: BaseException) -> None:
        """Report a series that cannot become a scan; ``exc`` names why."""
        if isinstance(exc, HeaderError):
            fld, text = exc.field, str(exc)
        elif isinstance(exc, (DectrisError, ValueError)):
            fld, text = "header", str(exc)
        else:
            fld, text = "internal", f"{type(exc).__name__}: {exc}"
            log.error("DECTRIS series %s: unexpected error", start.series_id, exc_info=exc)
        self._notice(SeriesNotice("skipped", start.series_id, fld, f"series skipped: {text}"))

    def refused(self, scan_id: str, field: str, reason: str) -> list[IngestMessage]:
        """Our ingest protocol refused the scan's message (the bridge's producer said so):
        reported as a rejected series, and the scan in progress is dropped."""
        series = self.plan.start.series_id if self.plan is not None and self.plan.scan_id == scan_id else None
        self._notice(SeriesNotice("rejected", series, field, f"scan {scan_id} refused by the ingest "
                                  f"protocol: {reason}", scan_id))
        return self.stop(reason, keep=False)

    @property
    def rejected(self) -> dict[str, int]:
        return self.tracker.rejected

    def feed(self, msg: Message) -> list[IngestMessage]:
        """The ingest messages ``msg`` completes. Raises only :class:`DectrisError` (or
        ValueError) for one message the caller logs and counts; the series goes on."""
        if isinstance(msg, SeriesStart):
            return self._start(msg)
        if isinstance(msg, Image):
            try:
                return self._image(msg)
            except (DectrisError, ValueError):
                raise
            except Exception as exc:  # one image must not end the stream, whatever it holds
                log.error("DECTRIS image %s of series %s: unexpected error", msg.image_id, msg.series_id,
                          exc_info=exc)
                raise DectrisError(f"image {msg.image_id}: {type(exc).__name__}: {exc}") from exc
        return self._end(msg)

    def _start(self, start: SeriesStart) -> list[IngestMessage]:
        out = self._finish(self._closing) if self._closing is not None else []
        old = self.plan
        if old is not None and old.scan_start is not None and not old.waiting \
                and old.sent + len(old.batch) >= old.expected:
            # every image of the series arrived, only its end was lost (a detector restarted
            # after its last image): reconstructed, as the daemon does with a scan that holds
            # every expected frame when its acquisition times out
            log.warning("DECTRIS series %s never ended but all its %d images arrived: scan %s is "
                        "reconstructed", old.start.series_id, old.expected, old.scan_id)
            out += self._finish(old)
        elif old is not None and old.scan_start is not None and old.resumed:
            # a detector streams one series at a time, in order: the rest of the series resumed
            # after the restart will not come (the detector moved on while the daemon was down).
            # The scan is partial: aborted with its frames kept in the spool, as the daemon stops
            # any recovered scan whose sender does not return (recover_wait_s) and a live one whose
            # sender went silent — a partial scan is never reported finished on its own
            # (PROTOCOL.md § 4.5); control `finish_scan` reconstructs it on request
            out += self._abort(old, f"detector series {old.start.series_id}, resumed in recovered scan "
                                    f"{old.scan_id} after the daemon's restart, was replaced by series "
                                    f"{start.series_id} before its end", log_level=logging.WARNING)
        elif old is not None and old.scan_start is not None:
            # the detector began another series (an acquisition cancelled and restarted): the
            # images this series sent are kept like a resumed one's, its batch not yet sent first
            out += self._abort(old, f"detector series {old.start.series_id} was replaced by series "
                                    f"{start.series_id} before its end", log_level=logging.WARNING)
        # checked before the tracker takes the start: an image count it sets aside must not bound the ids
        try:
            start, warnings = check_header(start)
        except Exception as exc:  # noqa: BLE001 - a header the check cannot read skips its series, never the bridge
            checked: Exception | None = exc
            warnings = []
        else:
            checked = None
        self.tracker.begin(start)
        self.stats["series"] += 1
        self.plan = None
        try:
            if checked is not None:
                raise checked
            for key, text in warnings:
                self._notice(SeriesNotice("warning", start.series_id, key, text))
            self.plan = self._plan(start)
            self.tracker.expect(self.plan.expected, keep_past=self.keeps_unpositioned)
        except Exception as exc:  # noqa: BLE001 - any header fault skips its series, never the bridge
            self._skip(start, exc)
        return out

    def resume(self, recovered: Iterable[Any], version: int) -> SeriesStart | None:
        """Take up the series of a scan the daemon recovered open after a restart (a
        :class:`cryoptycho.protocols.sources.RecoveredScan`): its images keep coming from the
        detector, without their start message, which the daemon before the restart received.
        The series' ids, channel and number of images come from the scan's metadata, its
        binning from the reducer its spool stored; the image ids the scan already holds are
        duplicates if they come again. The newest DECTRIS scan is taken (a detector has one
        series open at a time); returns the start message that stands for its own, or None."""
        cfg = self.config
        found = [r for r in recovered if r.start.metadata.get("source") == "dectris" and r.reducer is not None
                 and isinstance(r.start.metadata.get("series_id"), int)
                 and cfg.channel in (None, r.start.metadata.get("channel"))]
        if not found:
            return None
        rec = found[-1]
        meta, scan = rec.start.metadata, rec.start
        expected = int(scan.expected_frames)
        images = meta.get("number_of_images")
        start = SeriesStart(version=version, series_id=int(meta["series_id"]),
                            series_unique_id=meta.get("series_unique_id"),
                            channels=(str(meta["channel"]),) if meta.get("channel") else (),
                            image_shape=tuple(rec.reducer.detector_shape),
                            number_of_images=images if isinstance(images, int) and images >= 0 else None)
        channel = str(meta.get("channel") or cfg.channel)
        # (the energy and pixel angle served to open the scan: it is open, they are not used again)
        plan = _Plan(start, scan.scan_id, channel, expected, scan.energy_eV, 0.0, None,
                     meta.get("geometry_from") == "side_channel", {}, scan_start=scan, reducer=rec.reducer,
                     sent=len(rec.received), resumed=True)
        # images past the positions: the same rule as before the restart (a V1 series without
        # number_of_images had them rejected as out of range here, and so lost)
        self.tracker.resume(start, rec.received, expected, keep_past=self.keeps_unpositioned)
        self._used_ids.add(scan.scan_id)
        self.plan = plan
        log.warning("resuming DECTRIS series %s/%s in recovered scan %s (%d of %d images received before "
                    "the restart)", start.series_id, start.series_unique_id, scan.scan_id, len(rec.received),
                    expected)
        return start

    def _plan(self, start: SeriesStart) -> _Plan:
        cfg = self.config
        desc = scan_description(start.user_data)
        channel = cfg.channel or (start.channels[0] if start.channels else None)
        if channel is None:
            raise HeaderError("channels", "the start message lists no channels: set the bridge's channel")
        if start.channels and channel not in start.channels:
            raise HeaderError("channels", f"channel {channel!r} is not among the series' channels "
                              f"{list(start.channels)}")
        streamed = desc is None and self.side_channel
        if desc is not None:
            expected = desc.scan.count
        elif streamed:
            if start.number_of_images is None:
                raise HeaderError("number_of_images", "positions come from the side channel but the "
                                  "start message gives no number_of_images")
            expected = start.number_of_images
        elif cfg.raster is not None:
            expected = cfg.raster.count
        else:
            # names the settings themselves: "a raster in the config" left a facility guessing the key
            raise HeaderError("user_data", "no scan geometry: put a cryoptycho scan description in the "
                              "start message's user_data (SIMPLON header_appendix; schema: `cryoptycho "
                              "dectris-sim --print-schema`), send positions to a side channel "
                              "([dectris] positions_endpoint), or set a raster in the daemon's config "
                              "([dectris.raster] shape and step_m)")
        images = start.number_of_images
        if images is not None and images != expected:
            # the detector took another number of images than the scan has positions (a trigger
            # count set apart from the scan generator's): nothing it sends is thrown away
            if images > expected:
                text = (f"the detector series has {images} images, the scan {expected} positions: "
                        f"images 0–{expected - 1} are reconstructed; the {images - expected} images from "
                        f"id {expected} on have no position and are kept unbinned in the scan's spool and "
                        "result (unpositioned_detector_frames), not reconstructed")
            else:
                text = (f"the detector series has {images} images, the scan {expected} positions: the "
                        f"scan ends with the images that come, positions {images}–{expected - 1} "
                        "unmeasured")
            self._notice(SeriesNotice("warning", start.series_id, "number_of_images", text))
        energy = _first(desc and desc.energy_eV, start.energy_ev,
                        electron_energy(start.wavelength_m), cfg.energy_eV)
        if energy is None:
            raise HeaderError("incident_energy", "no beam energy: set incident_energy on the detector, "
                              "energy_eV in user_data, or energy_eV in the bridge config")
        angle, detector = self._pixel_angle(start, desc)
        return _Plan(start, self._scan_id(start, desc), channel, expected, energy, angle, desc, streamed,
                     detector)

    def _scan_id(self, start: SeriesStart, desc: ScanDescription | None) -> str:
        """``<user_data scan_id>-series<N>``: a scan id set in the SIMPLON header_appendix stays
        on the detector for every later series, and each series must be a scan of its own.
        Without one, ``<prefix>-<series_unique_id>`` (or the series id and the time)."""
        if desc is not None and desc.scan_id:
            scan_id = f"{desc.scan_id}-series{start.series_id}"
            if self._is_used(scan_id):  # the detector's series counter restarted
                scan_id += f"-{start.series_unique_id or time.strftime('%Y%m%dT%H%M%S')}"
        else:
            unique = start.series_unique_id or f"{start.series_id}-{time.strftime('%Y%m%dT%H%M%S')}"
            scan_id = f"{self.config.scan_id_prefix}-{unique}"
        base, n = scan_id, 1
        while self._is_used(scan_id):  # the same second, or a unique id seen before a restart
            n += 1
            scan_id = f"{base}-{n}"
        self._used_ids.add(scan_id)
        return scan_id

    def _is_used(self, scan_id: str) -> bool:
        return scan_id in self._used_ids or (self.taken is not None and self.taken(scan_id))

    def _pixel_angle(self, start: SeriesStart, desc: ScanDescription | None) -> tuple[float, dict[str, float]]:
        """The unbinned pixel's scattering angle, and what is known of the detector (its pixel,
        the camera length) for the files' geometry. Precedence: user_data, the config, the
        header's detector_distance, then the z of its detector_translation (V2)."""
        cfg = self.config
        size = start.pixel_size_m[0] if start.pixel_size_m else cfg.pixel_size_m
        translation = start.detector_translation_m
        sources = [(cfg.detector_pixel_angle_rad, cfg.camera_length_m), (None, start.detector_distance_m),
                   (None, translation[2] if translation is not None else None)]
        if desc is not None:
            sources.insert(0, (desc.detector_pixel_angle_rad, desc.camera_length_m))
        for angle, length in sources:
            if angle is None and length is not None and length > 0 and size is not None:
                angle = size / length
            if angle is not None and math.isfinite(angle) and angle > 0:
                detector = {"detector_pixel_size_m": size} if size else {}
                if size is None and length is not None:
                    detector["camera_length_m"] = length
                return angle, detector
        raise HeaderError("detector_distance", "no detector pixel angle: give detector_pixel_angle_rad, or "
                          "camera_length_m and a pixel size, in user_data or the [dectris] config (the header "
                          "has no usable detector_distance or detector_translation)")

    def _open_scan(self, plan: _Plan, first: np.ndarray) -> ScanStart:
        cfg, start = self.config, plan.start
        mask = start.pixel_mask.get(plan.channel)
        bad = np.zeros(first.shape, bool) if mask is None else mask != 0
        saturation = _first(start.saturation_value, cfg.saturation_value)
        # Pixels flagged in the first image are gaps or dead pixels when the header had no mask.
        bad |= first > saturation_threshold(first.dtype, saturation)
        plan.reducer = reducer = FrameReducer.build(
            first.shape, first.dtype, beam_center_px=_first(start.beam_center_px, cfg.beam_center_px),
            crop=cfg.crop, bin=cfg.bin, bad_pixels=bad, saturation_value=saturation,
        )
        desc = plan.description
        probe = desc.probe_model if desc and desc.probe_model else cfg.probe_model
        measured = None
        if not (desc and desc.probe_model) and cfg.measured_probe is not None:
            measured = self._measured_probe(plan, reducer, first)
        positions = raster = None
        if desc is not None:
            scan = desc.scan
            if isinstance(scan, PositionList):
                positions = np.asarray(scan.positions_m, dtype=np.float64)
            else:
                raster = scan.to_raster()
        elif not plan.streamed:
            assert cfg.raster is not None
            raster = cfg.raster.to_raster()
        metadata = {
            "source": "dectris", "stream_version": start.version, "series_id": start.series_id,
            "series_unique_id": start.series_unique_id, "detector": start.detector_description,
            "channel": plan.channel, "crop": reducer.window, "bin": reducer.bin,
            **({"number_of_images": start.number_of_images} if start.number_of_images is not None else {}),
            "window_corner_px": list(reducer.corner),
            "geometry_from": "user_data" if desc else ("side_channel" if plan.streamed else "config"),
            **({"user_scan_id": desc.scan_id} if desc and desc.scan_id else {}),
            **({"detector_pixel_size_m": plan.detector["detector_pixel_size_m"] * reducer.bin}
               if "detector_pixel_size_m" in plan.detector else plan.detector),
            **({"probe_file": str(cfg.probe_file)} if measured is not None else {}),
            **(desc.metadata if desc else {}),
        }
        return ScanStart(
            scan_id=plan.scan_id, energy_eV=plan.energy_ev,
            frame_shape=(reducer.frame_side, reducer.frame_side), frame_dtype=reducer.out_dtype.name,
            expected_frames=plan.expected, detector_pixel_angle_rad=plan.angle_rad * reducer.bin,
            probe=measured,
            probe_model=None if measured is not None else ProbeModelSpec(**probe.model_dump()),
            positions_m=positions, raster=raster, mask=reducer.static_valid.astype(np.uint8),
            options={**cfg.options, **(desc.options if desc else {})}, metadata=metadata,
        )

    def _measured_probe(self, plan: _Plan, reducer: FrameReducer, first: np.ndarray) -> np.ndarray:
        """The config's probe file for this series: its side and sampling must be the frames',
        its power is set to the counts of the series' first image (Σ|ψ|² = counts per pattern)."""
        cfg = self.config
        probe, pixel = cfg.measured_probe  # type: ignore[misc]
        m = reducer.frame_side
        if probe.shape != (m, m):
            raise HeaderError("probe_file", f"probe_file {cfg.probe_file} is {probe.shape[0]}×{probe.shape[1]}, "
                              f"the frames {m}×{m} (crop {reducer.window}, bin {reducer.bin})")
        e = plan.energy_ev * ELEMENTARY_CHARGE_C
        lam = PLANCK_J_S * LIGHT_M_S / math.sqrt(e * (2 * ELECTRON_MASS_KG * LIGHT_M_S**2 + e))
        sampling = lam / (m * plan.angle_rad * reducer.bin)
        if pixel is not None and abs(pixel - sampling) > 1e-3 * sampling:
            raise HeaderError("probe_file", f"probe_file {cfg.probe_file} is sampled at {pixel:.4g} m/px, "
                              f"this series at {sampling:.4g} m/px")
        counts = float(reducer.reduce_frame(first, out=np.empty((m, m), reducer.out_dtype))[0].sum())
        power = float((np.abs(probe) ** 2).sum())
        if counts > 0:
            probe = probe * np.float32(math.sqrt(counts / power))
        else:
            log.warning("scan %s: the first image has no counts; the probe file is used at its own scale",
                        plan.scan_id)
        return probe.astype(np.complex64)

    def _image(self, image: Image) -> list[IngestMessage]:
        if not self.tracker.accept(image):
            return []
        plan = self.plan
        if plan is None:
            self.stats["skipped_images"] += 1
            return []
        if plan.channel not in image.data:
            raise DectrisError(f"image {image.image_id} lacks channel {plan.channel!r}")
        frame = image.data[plan.channel]
        out: list[IngestMessage] = []
        if plan.scan_start is None:
            unlike = unlike_start(plan.start, frame.shape, frame.dtype)
            if unlike is not None:  # not the detector's images: the next one opens the scan
                self.stats["skipped_images"] += 1
                log.error("scan %s: image %d is %s: refused (the scan opens with the next image as the start "
                          "message describes)", plan.scan_id, image.image_id, unlike)
                return []
            try:
                plan.scan_start = self._open_scan(plan, frame)
            except Exception as exc:  # noqa: BLE001 - skips the series, never the bridge
                self.plan = None
                self._skip(plan.start, exc)
                return []
            out.append(plan.scan_start)
        assert plan.reducer is not None
        counts, saturated = plan.reducer.reduce_frame(frame, out=self._slot(plan))
        if saturated:
            plan.saturated_frames += 1
            self.stats["saturated_frames"] += 1
            if plan.saturated_frames == 1:
                log.warning("scan %s: saturated pixels outside the mask in image %d; they count as "
                            "the saturation value (our protocol carries no per-frame mask)",
                            plan.scan_id, image.image_id)
        if plan.streamed and self._position(plan, image.image_id) is None:
            plan.waiting[image.image_id] = counts.copy()  # the slot is the next image's
            return out
        self._commit(plan, image.image_id, out)
        return out

    def _slot(self, plan: _Plan) -> np.ndarray:
        """The batch row the next frame goes to; a batch gets a fresh buffer, since the
        Producer may still hold the last one (it sends large arrays without a copy)."""
        if plan.batch_data is None:
            assert plan.reducer is not None
            m = plan.reducer.frame_side
            plan.batch_data = np.empty((self.config.frames_per_message, m, m), plan.reducer.out_dtype)
        return plan.batch_data[len(plan.batch)]

    def _queue(self, plan: _Plan, image_id: int, counts: np.ndarray, out: list[IngestMessage]) -> None:
        self._slot(plan)[...] = counts
        self._commit(plan, image_id, out)

    def _commit(self, plan: _Plan, image_id: int, out: list[IngestMessage]) -> None:
        """The frame in the current slot belongs to ``image_id``; a full batch leaves."""
        if not plan.batch:
            plan.batch_since = time.monotonic()
        plan.batch.append(image_id)
        if len(plan.batch) >= self.config.frames_per_message:
            out.extend(self._take_batch(plan))

    def _take_batch(self, plan: _Plan) -> list[IngestMessage]:
        if not plan.batch:
            return []
        assert plan.batch_data is not None
        ids = np.array(plan.batch, dtype=np.uint32)
        data = plan.batch_data[: len(ids)]
        positions = None
        if plan.streamed:
            positions = np.stack([self._position(plan, int(i)) for i in ids])  # type: ignore[misc]
        plan.batch, plan.batch_data = [], None
        plan.sent += len(ids)
        self.stats["frames_sent"] += len(ids)
        return [Frames(plan.scan_id, ids, data, positions)]

    def _position(self, plan: _Plan, image_id: int) -> np.ndarray | None:
        found = self._positions.get(plan.start.series_id, {}).get(image_id)
        return found if found is not None else self._positions.get(None, {}).get(image_id)

    def add_positions(self, series_id: int | None, image_ids: np.ndarray,
                      positions_m: np.ndarray) -> list[IngestMessage]:
        """Side-channel positions; releases images that were waiting for them."""
        series = self._positions.pop(series_id, {})
        self._positions[series_id] = series  # now the newest
        for i, p in zip(image_ids, positions_m):
            series[int(i)] = np.asarray(p, dtype=np.float64)
        self._forget_unclaimed_positions()
        out: list[IngestMessage] = []
        for plan in (self._closing, self.plan):
            if plan is not None and plan.streamed:
                for i in [i for i in plan.waiting if self._position(plan, i) is not None]:
                    self._queue(plan, i, plan.waiting.pop(i), out)
        if self._closing is not None and not self._closing.waiting:
            out += self._finish(self._closing)
        return out

    def flush(self, min_age_s: float = 0.0) -> list[IngestMessage]:
        """The partial batch when it is at least ``min_age_s`` old, and the end of a series
        whose wait for side-channel positions has run out."""
        out: list[IngestMessage] = []
        self.tracker.flush_log()
        if self._closing is not None and time.monotonic() >= self._closing_deadline:
            out += self._finish(self._closing)
        for plan in (self._closing, self.plan):
            if plan is not None and plan.batch and time.monotonic() - plan.batch_since >= min_age_s:
                out += self._take_batch(plan)
        return out

    @property
    def closing(self) -> bool:
        """A series has ended but waits for side-channel positions of some of its images."""
        return self._closing is not None

    def _end(self, end: SeriesEnd) -> list[IngestMessage]:
        summary = self.tracker.end(end)
        plan, self.plan = self.plan, None
        if plan is None:
            return []
        if summary.missing_count:
            self.stats["missing_images"] += summary.missing_count
            ids = summary.missing_image_ids
            log.error("scan %s: %d of %d images never arrived (ids %s%s)", plan.scan_id, summary.missing_count,
                      plan.expected, ids[:20], " …" if summary.missing_count > 20 else "")
        if plan.scan_start is None:
            self._notice(SeriesNotice("skipped", plan.start.series_id, "images",
                                      "series skipped: it ended without any usable image"))
            return []
        out = self._finish(self._closing) if self._closing is not None else []
        if plan.waiting and self.config.position_wait_s > 0:
            # positions travel on another socket and may lag the images
            self._closing = plan
            self._closing_deadline = time.monotonic() + self.config.position_wait_s
            return out + self._take_batch(plan)
        return out + self._finish(plan)

    def _finish(self, plan: _Plan) -> list[IngestMessage]:
        if plan is self._closing:
            self._closing = None
        out = self._take_batch(plan)
        if plan.waiting:
            self.stats["images_without_position"] += len(plan.waiting)
            log.error("scan %s: %d images never got a position on the side channel (ids %s)",
                      plan.scan_id, len(plan.waiting), sorted(plan.waiting)[:20])
        self._drop_positions({None, plan.start.series_id})
        out.append(ScanEnd(plan.scan_id, plan.sent))
        return out

    def _drop_positions(self, series_ids: set[int | None]) -> None:
        for series_id in series_ids:
            self._positions.pop(series_id, None)

    def _forget_unclaimed_positions(self) -> None:
        """Positions are kept for at most :data:`MAX_POSITION_SERIES` series: positions sent for a
        series that never comes (a wrong series id, an acquisition cancelled before arming) were
        kept for the life of the process, one array per image. The series being received or
        finished are never dropped; the oldest others go, named in the log."""
        active = {plan.start.series_id for plan in (self.plan, self._closing) if plan is not None}
        spare = [s for s in self._positions if s not in active]
        excess = len(self._positions) - MAX_POSITION_SERIES
        if excess <= 0 or not spare:
            return
        dropped = set(spare[:excess])
        log.error("positions side channel: positions for %d series arrived that no series has claimed; "
                  "dropping those of the oldest (series ids %s) — a series with such an id arriving "
                  "later waits for its positions again", len(self._positions), sorted(dropped, key=str))
        self._drop_positions(dropped)

    def stop(self, reason: str, keep: bool = True) -> list[IngestMessage]:
        """End a series still waiting for positions, abort the scan in progress (shutdown, a
        stream that stopped, a decoding failure). With ``keep`` the images the scan holds and
        has not sent yet (its partial batch) leave before the abort, so that they reach the
        spool; without (a scan its receiver refused) they are dropped with it."""
        out = self._finish(self._closing) if self._closing is not None else []
        plan, self.plan = self.plan, None
        if plan is not None and plan.scan_start is not None:
            if keep:
                out += self._abort(plan, reason)
            else:
                plan.batch, plan.batch_data = [], None
                out.append(Abort(plan.scan_id, reason))
        return out

    def checkpoint(self, reason: str) -> list[IngestMessage]:
        """The daemon stops in the middle of a series: every image held leaves — the series
        ended and waiting for side-channel positions is finished, the scan in progress sends its
        partial batch and (where the receiver keeps them) the images waiting for positions as
        unpositioned frames — but that scan is not aborted: it stays open in the spool, and the
        restarted daemon's source resumes the series in it (:meth:`resume`; its images come on).
        :meth:`stop` aborted it, which a resumed series cannot go on in."""
        out = self._finish(self._closing) if self._closing is not None else []
        plan, self.plan = self.plan, None
        if plan is not None and plan.scan_start is not None:
            out += self._take_batch(plan)
            out += self._release_waiting(plan)
            log.info("DECTRIS scan %s left open (%s): %d of its %d images held, kept in the spool for the next "
                     "start to resume", plan.scan_id, reason, plan.sent + plan.unpositioned, plan.expected)
        return out

    def _abort(self, plan: _Plan, reason: str, log_level: int = logging.ERROR) -> list[IngestMessage]:
        """Abort ``plan``'s scan before its series ended. Every image it received goes first —
        the partial batch, and what waits for side-channel positions where the receiver keeps
        frames without one — and the reason says how many images the scan holds: an aborted
        scan keeps its frames in the spool (control `finish_scan` reconstructs them). Until
        this, a series replaced by the next start, or a stream stopped, lost the batch not yet
        sent (up to ``frames_per_message`` images the detector had sent)."""
        out = self._take_batch(plan)
        out += self._release_waiting(plan)
        dropped = len(plan.waiting)
        if dropped:
            self.stats["images_without_position"] += dropped
        plan.waiting = {}
        self._drop_positions({None, plan.start.series_id})
        kept = plan.sent + plan.unpositioned
        why = (f"{reason}: {kept} of its {plan.expected} images held; the frames are kept in the spool: "
               "control `finish_scan` reconstructs them")
        if dropped:
            why += (f" ({dropped} more images still waiting for a side-channel position are dropped: "
                    "our ingest protocol carries no frame without a position)")
        log.log(log_level, "DECTRIS scan %s aborted: %s", plan.scan_id, why)
        out.append(Abort(plan.scan_id, why))
        return out

    def _release_waiting(self, plan: _Plan) -> list[IngestMessage]:
        """The images of an aborted scan still waiting for side-channel positions, as messages
        that keep them (none here: a frame of our ingest protocol needs a position)."""
        return []


def unlike_start(start: SeriesStart, shape: tuple[int, ...], dtype: Any) -> str | None:
    """Why an image of ``shape`` and ``dtype`` cannot be the first of its series' scan, or None.
    A Stream V2 start states the images' size and dtype (``image_size_y``/``image_size_x``,
    ``image_dtype``); the scan's binning is built from its first image, so a first image of
    another size (the same bytes as 32 × 128, say) was taken as the detector's, and every
    image as the start said was then refused as unlike it: the series lost. (Not V1, whose
    ``x/y_pixels_in_detector`` are not read as the size of a region of interest.)"""
    if start.version != 2:
        return None
    if start.image_shape is not None and tuple(shape) != tuple(start.image_shape):
        return (f"{shape[0]} × {shape[1]} pixels where the start message says image_size_y × "
                f"image_size_x = {start.image_shape[0]} × {start.image_shape[1]}")
    if start.image_dtype is not None and np.dtype(dtype) != np.dtype(start.image_dtype):
        return f"{np.dtype(dtype)} where the start message says image_dtype {np.dtype(start.image_dtype)}"
    return None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v is not False and v != ""), None)


def bridge_messages(
    messages: Iterable[Message], config: BridgeConfig | None = None
) -> Iterator[IngestMessage]:
    """Ingest messages for a stream of decoded DECTRIS messages (geometry from user_data or
    the config; the side channel needs :func:`run_bridge`)."""
    converter = SeriesConverter(config)
    for msg in messages:
        yield from converter.feed(msg)
