"""Decoded DECTRIS stream messages, version-neutral (Stream V1 and V2 map onto the same records).

Units are converted on decoding so that nothing downstream needs to know the detector's:
energies in eV, lengths in metres, times in seconds, pixel coordinates as (y, x).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any

import numpy as np


class DectrisError(Exception):
    """Anything wrong with a DECTRIS stream."""


class DecodeError(DectrisError):
    """A message that cannot be decoded: truncated, malformed, or using an unknown encoding."""


class WrongStreamVersion(DecodeError):
    """A message of the other Stream version than the source URL names: the detector sends
    ``sent`` (1 or 2) and the socket was opened for the other one. ``field`` is what the
    daemon counts it by (``stream_version``)."""

    field = "stream_version"

    def __init__(self, sent: int, endpoint: str, what: str) -> None:
        hostport = endpoint.split("://", 1)[-1]
        super().__init__(
            f"{what} arrived on a Stream V{3 - sent} socket: the detector sends Stream V{sent}. "
            f"Use the source URL dectris{sent}://{hostport} (not dectris{3 - sent}://), or set the "
            f"detector's stream to V{3 - sent}; until then no message of this detector can be decoded")
        self.sent = sent


class SeriesError(DectrisError):
    """Messages out of order: an image or end without its start, a duplicate image, …"""


class HeaderError(DectrisError):
    """A series that cannot become a scan: ``field`` names the header key (or configuration or
    user_data key) that is missing or unusable."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SeriesStart:
    """``start`` (V2) / ``dheader-1.0`` + config parts (V1): one per arm."""

    version: int
    series_id: int
    series_unique_id: str | None = None
    channels: tuple[str, ...] = ()
    image_shape: tuple[int, int] | None = None  #: (height, width) pixels
    image_dtype: np.dtype | None = None
    number_of_images: int | None = None
    energy_ev: float | None = None
    wavelength_m: float | None = None
    beam_center_px: tuple[float, float] | None = None  #: (y, x), detector pixels
    pixel_size_m: tuple[float, float] | None = None  #: (y, x)
    detector_distance_m: float | None = None
    #: (x, y, z) metres; V2 headers may give the distance only as its z
    detector_translation_m: tuple[float, float, float] | None = None
    count_time_s: float | None = None
    frame_time_s: float | None = None
    saturation_value: int | None = None
    #: channel → uint32 DECTRIS mask (0 = good pixel, bits flag gap / dead / hot / …)
    pixel_mask: dict[str, np.ndarray] = field(default_factory=dict)
    user_data: Any = None
    arm_date: datetime | None = None
    detector_description: str | None = None
    header_detail: str | None = None  #: V1 only: all / basic / none
    #: every decoded key of the message (unknown keys included) for callers that need more
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Image:
    """``image`` (V2) / ``dimage-1.0`` parts (V1): one exposure, every channel."""

    version: int
    series_id: int
    series_unique_id: str | None
    image_id: int
    data: dict[str, np.ndarray] = field(repr=False)  #: channel → (height, width) pixels
    real_time_s: Fraction | None = None
    start_time_s: Fraction | None = None
    stop_time_s: Fraction | None = None
    user_data: Any = None


@dataclass(frozen=True)
class SeriesEnd:
    """``end`` (V2) / ``dseries_end-1.0`` (V1)."""

    version: int
    series_id: int
    series_unique_id: str | None = None


Message = SeriesStart | Image | SeriesEnd

#: V2 typed-array tags (RFC 8746) → numpy dtype; 68 is uint8 "clamped", same bytes
TYPED_ARRAY_DTYPES: dict[int, str] = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
}
DTYPE_TYPED_ARRAY_TAGS: dict[str, int] = {"uint8": 64, "uint16": 69, "uint32": 70, "float32": 85}


def parse_dtype(name: str, field_name: str) -> np.dtype:
    """A pixel dtype named in a header; DecodeError naming the field otherwise."""
    if name not in ("uint8", "uint16", "uint32", "float32"):
        raise DecodeError(f"{field_name} {name!r} is not one of uint8, uint16, uint32, float32")
    return np.dtype(name)
