"""Configured limits a receiver enforces on every message (PROTOCOL.md § Limits).

The daemon takes them from its configuration (``[limits]`` table, ``CRYOPTYCHO_LIMITS__<KEY>``,
``--limit KEY=VALUE``; daemon/SERVICE.md), the broker from ``--limit KEY=VALUE``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import NoDecode

MiB = 1 << 20

#: the smallest frame side M (frames are M×M) a scan may have, rule ``min_frame_side`` wherever
#: it is checked (a scan_start, a DECTRIS crop and bin): the engine's Fourier grid needs M ≥ 2
#: (gpu/stream.py checks the same for its own callers; gpu/ imports nothing of protocols/)
MIN_FRAME_SIDE = 2
#: wire names of the frame dtypes a scan may declare (all little-endian)
FRAME_DTYPES = ("uint8", "uint16", "uint32", "float32")
#: codecs of array parts; "none" = the raw little-endian bytes
COMPRESSIONS = ("none", "lz4", "bslz4")

#: a list-valued limit; the daemon's environment source passes its text on as it is (NoDecode:
#: pydantic-settings would refuse a text that is not JSON), for :meth:`Limits._list_from_text`
_NameList = Annotated[tuple[str, ...], NoDecode]


class Limits(BaseModel):
    """Receiver-side limits. Defaults suit a 1k×1k detector at full frame rate on one host;
    the daemon exposes every field in its configuration (e.g. ``max_frame_side = 2048`` for a
    2k detector read out whole)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_frame_side: int = Field(1024, ge=MIN_FRAME_SIDE, le=16384)
    """Largest frame side M (frames are M×M)."""
    max_frames_per_message: int = Field(4096, ge=1)
    """Most frames one ``frames`` message may carry."""
    max_message_bytes: int = Field(512 * MiB, ge=1024)
    """Most bytes of one multipart message, all parts, as received; also caps the decoded size
    of every compressed array, so a compression bomb cannot allocate more than this."""
    max_header_bytes: int = Field(1 * MiB, ge=256)
    """Most bytes of the msgpack header part (metadata and option overrides live there)."""
    max_header_values: int = Field(65536, ge=256)
    """Most values (maps, lists, strings, numbers, each counted once) one header may hold. Every
    Python object msgpack builds costs the receiver's thread CPU while it holds the interpreter
    lock: a 1 MiB header of a million one-byte values took the daemon's manager loop 1.1–1.6 s
    of CPU per message (0.3–0.4 s of it msgpack's decode alone), no other peer served meanwhile. Real headers hold a few hundred (scan_start
    with every option and a 200-key metadata map: 627), replies far fewer than the limit (the
    largest, list_scans: 512 summaries of a few dozen values); a reply that would hold more is
    answered as a failure that says so (protocols/control.py, encode_reply)."""
    max_frames_per_scan: int = Field(16 * MiB, ge=1)
    """Largest ``expected_frames`` a scan may declare."""
    max_scan_id_length: int = Field(128, ge=1, le=1024)
    max_abs_position_m: float = Field(1e-2, gt=0)
    """Largest |y| or |x| of a probe position; a scan field beyond 1 cm is a unit error."""
    frame_dtypes: _NameList = FRAME_DTYPES
    """Wire dtypes accepted for frames (a subset of FRAME_DTYPES)."""
    compressions: _NameList = COMPRESSIONS
    """Codecs accepted for array parts (a subset of COMPRESSIONS)."""

    @field_validator("frame_dtypes", "compressions", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        """A list-valued limit given as text, wherever it comes from (TOML, ``CRYOPTYCHO_LIMITS__*``,
        ``--limit``, ``--set``): a JSON list, or the shell's form, a comma-separated list
        (``uint8,uint16``; ``--limit frame_dtypes=uint8`` was refused as "not a valid tuple")."""
        if not isinstance(value, str):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if not isinstance(parsed, str):
            return parsed
        return [item.strip() for item in parsed.split(",") if item.strip()]

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


#: bytes CURVE adds to a message part on the wire (its MESSAGE command: name, nonce, MAC; 33 in
#: libzmq 4.3), with a margin: ZMQ_MAXMSGSIZE counts a part as it arrives, encrypted
CURVE_FRAME_OVERHEAD = 4096


def ingest_max_part_bytes(limits: Limits) -> int:
    """The ingest socket's ZMQ_MAXMSGSIZE: no part of a message within ``max_message_bytes`` is
    larger, so a sender of a larger part is disconnected as its length arrives, before its bytes
    are held (they would be refused once whole anyway)."""
    return limits.max_message_bytes + CURVE_FRAME_OVERHEAD


def control_max_part_bytes(limits: Limits) -> int:
    """The largest message part a control socket takes unless configured otherwise (its
    ZMQ_MAXMSGSIZE; a peer that sends a larger part is disconnected, unanswered). No standard
    control request carries an array (PROTOCOL.md § 6), so a request is its header part,
    which ``max_header_bytes`` caps; the set_options of every option, the largest request the
    SDK makes, is under 2 kB. Twice the header limit leaves headroom, so that a header just over
    the limit is still answered with its error (rule ``max_header_bytes``) rather than cut off."""
    return 2 * limits.max_header_bytes


def parse_limit_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``("max_frame_side=2048", "compressions=[\"lz4\"]")`` → overrides (values parsed as
    JSON when they parse; a list-valued limit also takes a bare comma-separated list,
    ``frame_dtypes=uint8,uint16``, as :class:`Limits` does from any source); ValueError naming
    the pair or the unknown key."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        if key not in Limits.model_fields:
            raise ValueError(f"unknown limit {key!r} (known: {', '.join(Limits.model_fields)})")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    return out


def limits_with(overrides: dict[str, Any], base: Limits | None = None) -> Limits:
    """``base`` (default limits) with ``overrides``; ValueError naming each bad key."""
    try:
        return Limits.model_validate({**(base or Limits()).model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid limits: {problems}") from None
