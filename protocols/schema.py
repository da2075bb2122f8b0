"""Header schemas of every message type (pydantic, strict): the non-array half of PROTOCOL.md.

A schema violation becomes ``ProtocolError(field, rule)`` with the dotted path of the key and
pydantic's error type as the rule (``missing``, ``extra_forbidden``, ``greater_than``,
``finite_number``, ``string_pattern_mismatch``, …). Checks that need the configured limits or
the scan's declaration live in :mod:`.validate`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProtocolError

#: what a scan id may hold (its length is a limit: ``Limits.max_scan_id_length``)
SCAN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"
ScanId = Annotated[str, Field(min_length=1, pattern=SCAN_ID_PATTERN)]
Positive = Annotated[float, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]

SCAN_EVENTS = ("accepted", "rejected", "acquiring", "ended", "finished", "failed", "aborted")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _Header(_Strict):
    type: str
    time_s: float | None = None
    """Sender's wall clock (Unix seconds) when the message was made; for latency figures."""


class ProbeModelHeader(_Strict):
    kind: Literal["defocused", "fzp", "randomized"] = "defocused"
    semiangle_rad: Positive = 9.2e-3
    defocus_m: float | None = None
    cs_m: float = 0.0
    zones: Annotated[int, Field(ge=1, le=1024)] = 8
    diameter_m: Positive | None = None
    seed: NonNegInt = 0
    source_size_m: Annotated[float, Field(ge=0)] | None = None


class PositionsScanHeader(_Strict):
    kind: Literal["positions"]


class RasterScanHeader(_Strict):
    kind: Literal["raster"]
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
    step_m: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    rotation_rad: float = 0.0
    serpentine: bool = False
    origin_m: Pair = [0.0, 0.0]


class StreamedScanHeader(_Strict):
    kind: Literal["streamed"]


ScanPattern = Annotated[
    PositionsScanHeader | RasterScanHeader | StreamedScanHeader, Field(discriminator="kind")
]


class ScanStartHeader(_Header):
    type: Literal["scan_start"]
    scan_id: ScanId
    energy_eV: Positive
    pixel_size_m: Positive | None = None
    detector_pixel_angle_rad: Positive | None = None
    frame_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
    frame_dtype: str
    expected_frames: Annotated[int, Field(ge=1)]
    probe_model: ProbeModelHeader | None = None
    scan: ScanPattern
    options: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


class FramesHeader(_Header):
    type: Literal["frames"]
    scan_id: ScanId


class ScanEndHeader(_Header):
    type: Literal["scan_end"]
    scan_id: ScanId
    frame_count: NonNegInt


class AbortHeader(_Header):
    type: Literal["abort"]
    scan_id: ScanId
    reason: Annotated[str, Field(max_length=4096)] = ""


class ScanEventHeader(_Header):
    type: Literal["scan_event"]
    scan_id: ScanId
    event: Literal[SCAN_EVENTS]  # type: ignore[valid-type]
    reason: str = ""
    info: dict[str, Any] = {}


class PreviewHeader(_Header):
    type: Literal["preview"]
    scan_id: ScanId
    iteration: NonNegInt
    frames_used: NonNegInt
    pixel_size_m: Positive
    origin_m: Pair


class MetricsHeader(_Header):
    type: Literal["metrics"]
    scan_id: ScanId
    frames_received: NonNegInt
    frames_used: NonNegInt
    frames_dropped: NonNegInt = 0
    iteration: NonNegInt = 0
    loss: Annotated[float, Field(allow_inf_nan=True)] | None = None
    """NaN or ∞ report a diverged reconstruction."""
    resolution_m: Positive | None = None
    latency_s: Annotated[float, Field(ge=0)] | None = None
    state: str = ""


class ResultHeader(_Header):
    type: Literal["result"]
    scan_id: ScanId
    iterations: NonNegInt
    loss: Annotated[float, Field(allow_inf_nan=True)] | None = None
    pixel_size_m: Positive
    origin_m: Pair
    files: dict[str, str] = {}
    metadata: dict[str, Any] = {}


class ErrorHeader(_Header):
    type: Literal["error"]
    scan_id: str | None = None
    field: str
    rule: str
    message: str


class RequestHeader(_Header):
    type: Literal["request"]
    method: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
    params: dict[str, Any] = {}


class ReplyHeader(_Header):
    type: Literal["reply"]
    success: bool
    msg: str = ""
    result: dict[str, Any] = {}


HEADERS: dict[str, type[_Header]] = {
    "scan_start": ScanStartHeader,
    "frames": FramesHeader,
    "scan_end": ScanEndHeader,
    "abort": AbortHeader,
    "scan_event": ScanEventHeader,
    "preview": PreviewHeader,
    "metrics": MetricsHeader,
    "result": ResultHeader,
    "error": ErrorHeader,
    "request": RequestHeader,
    "reply": ReplyHeader,
}


def parse_header(header: dict[str, Any]) -> _Header:
    """Validate a decoded header (``protocol``/``version``/``arrays`` already removed)."""
    header = {k: v for k, v in header.items() if k not in ("protocol", "version")}
    kind = header.get("type")
    model = HEADERS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(
            "type", "known_type", f"unknown message type {kind!r}; known: {', '.join(HEADERS)}"
        )
    try:
        return model.model_validate(header)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "header"
        raise ProtocolError(field, err["type"], err["msg"], scan_id=_scan_id(header)) from None


def _scan_id(header: dict[str, Any]) -> str | None:
    sid = header.get("scan_id")
    return sid if isinstance(sid, str) else None
