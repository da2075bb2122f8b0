"""Where a DECTRIS series' scan geometry comes from: detector streams carry no probe positions.

In order of precedence:

1. a cryoptycho scan description in the ``start`` message's ``user_data`` (the SIMPLON
   ``header_appendix``, V1's header appendix part), under the key ``"cryoptycho"`` — the schema is
   :class:`ScanDescription`, documented in README.md with a SIMPLON REST example;
2. a positions side channel: our own protocol's ``request`` messages with method
   ``dectris_positions`` (image ids → positions), see :func:`positions_message`;
3. the bridge configuration (a raster nx × ny, step, rotation, serpentine).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..messages import RasterScan, Request
from .schema import DecodeError

USER_DATA_KEY = "cryoptycho"
POSITIONS_METHOD = "dectris_positions"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RasterSpec(_Strict):
    """Frame k = row i·nx + j (odd rows reversed when serpentine) at origin + R(rotation)·(i·step_y,
    j·step_x); the same pattern as our protocol's raster scan."""

    kind: Literal["raster"] = "raster"
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    """(ny, nx): rows, then positions per row."""
    step_m: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    """(step_y, step_x) in metres."""
    rotation_rad: float = 0.0
    serpentine: bool = False
    origin_m: tuple[float, float] = (0.0, 0.0)

    def to_raster(self) -> RasterScan:
        return RasterScan(self.shape, self.step_m, self.rotation_rad, self.serpentine, self.origin_m)

    @property
    def count(self) -> int:
        return self.shape[0] * self.shape[1]


class PositionList(_Strict):
    """Explicit probe centres, one (y, x) pair in metres per image id."""

    kind: Literal["positions"] = "positions"
    positions_m: list[tuple[float, float]] = Field(min_length=1)

    @property
    def count(self) -> int:
        return len(self.positions_m)


class ProbeSpec(_Strict):
    """A parametric probe (our protocol's ProbeModelSpec)."""

    kind: Literal["defocused", "fzp", "randomized"] = "defocused"
    semiangle_rad: float = Field(9.2e-3, gt=0)
    defocus_m: float | None = None
    cs_m: float = 0.0
    zones: int = Field(8, ge=1)
    diameter_m: float | None = Field(None, gt=0)
    seed: int = 0
    source_size_m: float | None = Field(None, ge=0, allow_inf_nan=False)
    """rms of the source's image at the sample (partial spatial coherence), as the instrument
    states it; the engine's default ``source_size_m`` "auto" uses it (None: not stated)."""


class ScanDescription(_Strict):
    """``user_data["cryoptycho"]`` of a series' start: what the microscope script knows and the
    detector does not. Only ``scan`` is required; every other field overrides the detector's
    header and the bridge configuration for this series."""

    version: Literal[1] = 1
    scan: RasterSpec | PositionList = Field(discriminator="kind")
    scan_id: str | None = Field(None, min_length=1, max_length=100)
    """Name of the scan in cryoptycho, suffixed ``-series<N>`` per series (the header_appendix
    stays set across series); default ``<prefix>-<series_unique_id or series_id>``."""
    energy_eV: float | None = Field(None, gt=0)
    detector_pixel_angle_rad: float | None = Field(None, gt=0)
    """Scattering angle of one unbinned detector pixel."""
    camera_length_m: float | None = Field(None, gt=0)
    """Effective camera length; angle = detector pixel size / camera length."""
    probe_model: ProbeSpec | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    """ReconOptions overrides for this scan."""
    metadata: dict[str, Any] = Field(default_factory=dict)


def scan_description(user_data: Any) -> ScanDescription | None:
    """The cryoptycho scan description in a start's ``user_data`` (a JSON text or a decoded
    value), None when there is none; a description that is present but invalid is an error
    (falling back to another source would reconstruct with the wrong geometry)."""
    if isinstance(user_data, (bytes, str)):
        try:
            user_data = json.loads(user_data)
        except ValueError:
            return None  # someone else's free-text appendix
    if not isinstance(user_data, dict) or USER_DATA_KEY not in user_data:
        return None
    try:
        return ScanDescription.model_validate(user_data[USER_DATA_KEY])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DecodeError(f"user_data.{USER_DATA_KEY}.{where}: {first['msg']}") from exc


def positions_message(image_ids: Any, positions_m: Any, series_id: int | None = None) -> Request:
    """A side-channel message for the bridge: probe centres (n, 2) m of the given image ids.

    Send it with our protocol's encoder (``cryoptycho.protocols.messages.encode``) to the
    bridge's positions endpoint, before or after the images themselves; ``series_id`` binds it
    to one series (default: the current one)."""
    ids = np.asarray(image_ids, dtype=np.uint32).reshape(-1)
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.shape != (ids.size, 2):
        raise ValueError(f"positions_m must have shape ({ids.size}, 2), got {pos.shape}")
    params: dict[str, Any] = {"image_ids": ids, "positions_m": pos}
    if series_id is not None:
        params["series_id"] = int(series_id)
    return Request(POSITIONS_METHOD, params)


def parse_positions(msg: Request) -> tuple[int | None, np.ndarray, np.ndarray]:
    """(series_id or None, image ids, positions) of a side-channel message; ValueError names
    the bad field."""
    if msg.method != POSITIONS_METHOD:
        raise ValueError(f"method: side-channel messages use {POSITIONS_METHOD!r}, got {msg.method!r}")
    params = msg.params
    try:
        ids = np.asarray(params.get("image_ids", ()), dtype=np.int64).reshape(-1)
    except OverflowError:
        # a msgpack uint64 past 2**63: not an image id; it used to escape as OverflowError and stop
        # the daemon's detector source
        raise ValueError("params.image_ids: image ids must be integers in [0, 2**63)") from None
    if (ids < 0).any():
        raise ValueError(f"params.image_ids: image ids count from 0, got {int(ids.min())}")
    pos = np.asarray(params.get("positions_m", ()), dtype=np.float64)
    if pos.shape != (ids.size, 2):
        raise ValueError(f"params.positions_m: shape {pos.shape}, expected ({ids.size}, 2)")
    if not np.isfinite(pos).all():
        raise ValueError("params.positions_m: NaN or infinite positions")
    series = params.get("series_id")
    if series is not None and not isinstance(series, int):
        raise ValueError(f"params.series_id: must be an integer, got {series!r}")
    return series, ids, pos
