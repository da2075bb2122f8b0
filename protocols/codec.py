"""Encode and decode of every message type: dataclass ↔ multipart parts (PROTOCOL.md §2–§7).

``encode(msg)`` gives the parts; ``decode(parts, limits, scans)`` checks every header key and
array against the schema, the limits and (with ``scans``) the scan's declaration, and raises
:class:`~.errors.ProtocolError` naming field and rule. Decoded arrays are views of the
received buffers (not copies), in their wire dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from . import schema, validate
from .errors import ProtocolError
from .limits import FRAME_DTYPES, Limits
from .message_types import (
    CLASSES,
    EVENT_TYPES,
    INGEST_TYPES,
    Frames,
    Message,
    ProbeModelSpec,
    RasterScan,
    Reply,
    Request,
    ScanStart,
)
from .wire import byte_view, flatten, nest, pack, read_header, unpack, wire_dtype

_DEFAULT_LIMITS = Limits()
INGEST_TYPE_NAMES = tuple(cls.type for cls in INGEST_TYPES)

#: type → {array name: (wire dtypes, allowed ndims, required)}; None = free-form (control)
ARRAYS: dict[str, dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] | None] = {
    "scan_start": {
        "probe": (("complex64",), (2, 3), False),
        "mask": (("uint8",), (2,), False),
        "scan.positions_m": (("float64",), (2,), False),
    },
    "frames": {
        "indices": (("uint32",), (1,), True),
        "data": (FRAME_DTYPES, (3,), True),
        "positions_m": (("float64",), (2,), False),
    },
    "scan_end": {},
    "abort": {},
    "scan_event": {},
    "preview": {
        "object_phase": (("float32",), (2,), True),
        "probe": (("complex64",), (2, 3), True),
        "object_amplitude": (("float32",), (2,), False),
        "coverage": (("float32",), (2,), False),
    },
    "metrics": {},
    "result": {
        "object": (("complex64", "complex128"), (2,), True),
        "probe": (("complex64", "complex128"), (2, 3), True),
        "positions_m": (("float64",), (2,), True),
    },
    "error": {},
    "request": None,
    "reply": None,
}


# ---------------------------------------------------------------------------------------- encode


def encode(msg: Message, checksum: bool = False) -> list[Any]:
    """Message → multipart parts ``[header, arrays…]`` (buffers, not copies, for large arrays).

    The header is checked against the schema (ProtocolError); array checks that depend on
    limits or on the scan are :func:`.validate.check`'s (the Producer runs them).
    ``checksum`` adds a CRC-32 per array part (raw counts have no other integrity check).
    """
    header, arrays, codecs = _to_wire(msg)
    header = {"type": msg.type, **header}
    if msg.time_s is not None:
        header["time_s"] = float(msg.time_s)
    # refuse here what every receiver would refuse, so the sender sees the field and rule
    schema.parse_header(header)
    spec = ARRAYS[msg.type]
    if spec is not None and isinstance(msg, EVENT_TYPES):
        # published images travel in their declared dtype (a float64 phase map becomes float32);
        # ingest arrays are never converted: counts must arrive exactly as measured
        for name, array in arrays.items():
            dtypes = spec[name][0]
            if wire_dtype(np.asarray(array).dtype) not in dtypes:
                arrays[name] = np.asarray(array).astype(dtypes[0])
    return pack(header, arrays, codecs, checksum)


def _to_wire(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    if isinstance(msg, ScanStart):
        return _scan_start_to_wire(msg)
    if isinstance(msg, Frames):
        arrays = {"indices": np.asarray(msg.indices, dtype=np.uint32), "data": msg.data}
        if msg.positions_m is not None:
            arrays["positions_m"] = np.asarray(msg.positions_m, dtype=np.float64)
        return {"scan_id": msg.scan_id}, arrays, {"data": msg.compression}
    if isinstance(msg, (Request, Reply)):
        key = "params" if isinstance(msg, Request) else "result"
        tree, arrays = flatten(getattr(msg, key), f"{key}.")
        head = (
            {"method": msg.method, "params": tree}
            if isinstance(msg, Request)
            else {"success": bool(msg.success), "msg": msg.msg, "result": tree}
        )
        return head, arrays, {}
    names = ARRAYS[msg.type] or {}
    values = {k: v for k, v in _fields(msg).items() if k not in ("time_s",)}
    arrays = {k: values.pop(k) for k in list(values) if k in names and values[k] is not None}
    for k in [k for k in values if k in names]:
        values.pop(k)  # an optional array left out
    if "origin_m" in values:
        values["origin_m"] = [float(v) for v in values["origin_m"]]
    return _native(values), arrays, {}


def _scan_start_to_wire(
    msg: ScanStart,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    head: dict[str, Any] = {
        "scan_id": msg.scan_id,
        "energy_eV": float(msg.energy_eV),
        "frame_shape": [int(v) for v in msg.frame_shape],
        "frame_dtype": msg.frame_dtype,
        "expected_frames": int(msg.expected_frames),
        "options": msg.options,
        "metadata": msg.metadata,
    }
    if msg.pixel_size_m is not None:
        head["pixel_size_m"] = float(msg.pixel_size_m)
    if msg.detector_pixel_angle_rad is not None:
        head["detector_pixel_angle_rad"] = float(msg.detector_pixel_angle_rad)
    if msg.probe_model is not None:
        # an unstated source size is left out: daemons before it refuse the key
        head["probe_model"] = {k: v for k, v in asdict(msg.probe_model).items()
                               if not (k == "source_size_m" and v is None)}
    arrays: dict[str, np.ndarray] = {}
    if msg.probe is not None:
        arrays["probe"] = np.asarray(msg.probe, dtype=np.complex64)
    if msg.mask is not None:
        arrays["mask"] = np.asarray(msg.mask, dtype=np.uint8)
    if msg.positions_m is not None:
        head["scan"] = {"kind": "positions"}
        arrays["scan.positions_m"] = np.asarray(msg.positions_m, dtype=np.float64)
    elif msg.raster is not None:
        r = msg.raster
        head["scan"] = {
            "kind": "raster",
            "shape": [int(v) for v in r.shape],
            "step_m": [float(v) for v in r.step_m],
            "rotation_rad": float(r.rotation_rad),
            "serpentine": bool(r.serpentine),
            "origin_m": [float(v) for v in r.origin_m],
        }
    else:
        head["scan"] = {"kind": "streamed"}
    return _native(head), arrays, {}


def _fields(msg: Any) -> dict[str, Any]:
    return {k: getattr(msg, k) for k in msg.__dataclass_fields__}


def _native(value: Any) -> Any:
    """NumPy scalars → Python (msgpack packs only native types)."""
    if isinstance(value, dict):
        return {k: _native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_native(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------- decode


def decode(
    parts: Sequence[Any], limits: Limits | None = None, scans: Mapping[str, ScanStart] | None = None
) -> Message:
    """Parts (bytes or zmq.Frame) → validated message, or ProtocolError naming field and rule.

    With ``scans`` (scan id → its ScanStart) the message must be an ingest type,
    frames/scan_end/abort must name a known scan and
    are checked against its declaration (frame shape, dtype, index range, positions), and a
    scan_start must not reuse a known id.
    """
    limits = limits or _DEFAULT_LIMITS
    raw_header, arrays, codecs = unpack(parts, limits)
    try:
        return _decode_read(raw_header, arrays, codecs, parts, limits, scans)
    except ProtocolError as exc:
        # what the receiver's accounting of a refused message needs, from this one reading of
        # its header (reading a 1 MiB header again cost as much as the first time, twice)
        kind = raw_header.get("type")
        exc.message_type = kind if isinstance(kind, str) else ""
        indices = arrays.get("indices") if kind == "frames" else None
        exc.frames = int(np.size(indices)) if indices is not None else 0
        raise


def _decode_read(raw_header: dict[str, Any], arrays: dict[str, np.ndarray], codecs: dict[str, str],
                 parts: Sequence[Any], limits: Limits, scans: Mapping[str, ScanStart] | None) -> Message:
    """:func:`decode` of a message whose envelope and arrays were read."""
    header = schema.parse_header(raw_header)
    sid = getattr(header, "scan_id", None)
    if scans is not None and header.type not in INGEST_TYPE_NAMES:
        # with session state this is the ingest socket: a reply, request or event sent here is
        # a peer wired to the wrong socket, refused by name like any other bad message
        raise ProtocolError(
            "type",
            "ingest_expected",
            f"the ingest socket takes {', '.join(INGEST_TYPE_NAMES)}, not {header.type!r}",
            sid,
        )
    _check_arrays(header.type, arrays, sid)
    msg = _from_wire(header, arrays, codecs.get("data", "none"))
    if isinstance(msg, Frames) and msg.compression == "bslz4":
        # parts follow the array descriptors, in the order unpack kept them
        msg.wire_data = byte_view(parts[1 + list(arrays).index("data")])
    scan = None
    if scans is not None and isinstance(msg, INGEST_TYPES):
        known = msg.scan_id in scans
        if isinstance(msg, ScanStart) and known:
            raise ProtocolError(
                "scan_id", "unique_scan", f"scan {msg.scan_id!r} was already started", sid
            )
        if not isinstance(msg, ScanStart):
            if not known:
                raise ProtocolError(
                    "scan_id", "known_scan", f"no scan {msg.scan_id!r} was started", sid
                )
            scan = scans[msg.scan_id]
    validate.check(msg, limits, scan)
    return msg


def _check_arrays(kind: str, arrays: Mapping[str, np.ndarray], sid: str | None) -> None:
    spec = ARRAYS[kind]
    if spec is None:
        return
    for name, array in arrays.items():
        if name not in spec:
            raise ProtocolError(name, "known_array", f"a {kind} message has no array {name!r}", sid)
        dtypes, ndims, _ = spec[name]
        if wire_dtype(array.dtype) not in dtypes:
            raise ProtocolError(
                name, "array_dtype", f"dtype {array.dtype} is not {' or '.join(dtypes)}", sid
            )
        if array.ndim not in ndims:
            raise ProtocolError(name, "ndim", f"{array.ndim} dimensions, expected {ndims}", sid)
    for name, (_, _, required) in spec.items():
        if required and name not in arrays:
            raise ProtocolError(name, "missing", f"a {kind} message needs array {name!r}", sid)


def _from_wire(h: Any, arrays: dict[str, np.ndarray], codec: str) -> Message:
    kind = h.type
    if kind == "scan_start":
        raster = None
        if h.scan.kind == "raster":
            s = h.scan
            raster = RasterScan(
                tuple(s.shape), tuple(s.step_m), s.rotation_rad, s.serpentine, tuple(s.origin_m)
            )
        if h.scan.kind == "positions" and "scan.positions_m" not in arrays:
            raise ProtocolError(
                "scan.positions_m", "missing", "scan kind 'positions' needs the array", h.scan_id
            )
        if h.scan.kind != "positions" and "scan.positions_m" in arrays:
            raise ProtocolError(
                "scan.positions_m",
                "known_array",
                f"scan kind {h.scan.kind!r} carries no positions",
                h.scan_id,
            )
        pm = h.probe_model
        return ScanStart(
            scan_id=h.scan_id,
            energy_eV=h.energy_eV,
            frame_shape=tuple(h.frame_shape),
            frame_dtype=h.frame_dtype,
            expected_frames=h.expected_frames,
            pixel_size_m=h.pixel_size_m,
            detector_pixel_angle_rad=h.detector_pixel_angle_rad,
            probe=arrays.get("probe"),
            probe_model=ProbeModelSpec(**pm.model_dump()) if pm is not None else None,
            positions_m=arrays.get("scan.positions_m"),
            raster=raster,
            mask=arrays.get("mask"),
            options=h.options,
            metadata=h.metadata,
            time_s=h.time_s,
        )
    if kind == "frames":
        return Frames(
            h.scan_id, arrays["indices"], arrays["data"], arrays.get("positions_m"), codec, h.time_s
        )
    if kind == "request":
        return Request(h.method, nest(dict(h.params), _strip(arrays, "params.")), h.time_s)
    if kind == "reply":
        return Reply(h.success, h.msg, nest(dict(h.result), _strip(arrays, "result.")), h.time_s)
    cls = CLASSES[kind]
    values = h.model_dump(exclude={"type"})
    if "origin_m" in values:
        values["origin_m"] = tuple(values["origin_m"])
    return cls(**values, **arrays)


def _strip(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for name, array in arrays.items():
        if not name.startswith(prefix):
            raise ProtocolError(name, "array_path", f"array names here must start with {prefix!r}")
        out[name[len(prefix) :]] = array
    return out


def peek(parts: Sequence[Any], limits: Limits | None = None) -> tuple[str, str | None]:
    """(type, scan_id) from the header alone, for routers that must not decode payloads.

    Only the envelope checks of the header run (sizes, msgpack, protocol, version).
    """
    header = read_header(parts, limits or _DEFAULT_LIMITS)
    kind, sid = header.get("type"), header.get("scan_id")
    return (kind if isinstance(kind, str) else "", sid if isinstance(sid, str) else None)
