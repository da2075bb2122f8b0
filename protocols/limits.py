"""Configured limits a receiver enforces on every message (PROTOCOL.md § Limits)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MiB = 1 << 20

#: wire names of the frame dtypes a scan may declare (all little-endian)
FRAME_DTYPES = ("uint8", "uint16", "uint32", "float32")
#: codecs of array parts; "none" = the raw little-endian bytes
COMPRESSIONS = ("none", "lz4", "bslz4")


class Limits(BaseModel):
    """Receiver-side limits. Defaults suit a 1k×1k detector at full frame rate on one host;
    the daemon exposes every field in its configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_frame_side: int = Field(1024, ge=1, le=16384)
    """Largest frame side M (frames are M×M)."""
    max_frames_per_message: int = Field(4096, ge=1)
    """Most frames one ``frames`` message may carry."""
    max_message_bytes: int = Field(512 * MiB, ge=1024)
    """Most bytes of one multipart message, all parts, as received; also caps the decoded size
    of every compressed array, so a compression bomb cannot allocate more than this."""
    max_header_bytes: int = Field(1 * MiB, ge=256)
    """Most bytes of the msgpack header part (metadata and option overrides live there)."""
    max_frames_per_scan: int = Field(16 * MiB, ge=1)
    """Largest ``expected_frames`` a scan may declare."""
    max_scan_id_length: int = Field(128, ge=1, le=1024)
    max_abs_position_m: float = Field(1e-2, gt=0)
    """Largest |y| or |x| of a probe position; a scan field beyond 1 cm is a unit error."""
    frame_dtypes: tuple[str, ...] = FRAME_DTYPES
    """Wire dtypes accepted for frames (a subset of FRAME_DTYPES)."""
    compressions: tuple[str, ...] = COMPRESSIONS
    """Codecs accepted for array parts (a subset of COMPRESSIONS)."""

    @field_validator("frame_dtypes", "compressions")
    @classmethod
    def _known_subset(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = _KNOWN[info.field_name]
        if not value or set(value) - set(known):
            raise ValueError(
                f"{info.field_name} must be a non-empty subset of {known}, got {value}"
            )
        return value


_KNOWN = {"frame_dtypes": FRAME_DTYPES, "compressions": COMPRESSIONS}
