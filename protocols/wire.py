"""The multipart envelope shared by every message (PROTOCOL.md § Envelope).

A message is ``[header, part_1, …, part_n]``: ``header`` is a msgpack map with ``protocol``,
``version``, ``type`` and ``arrays`` (one descriptor per following part, in order); each part is
one array's little-endian bytes, raw or compressed. Array names are dotted paths into the header
tree (``"scan.positions_m"``), so any message can carry arrays wherever its schema puts them.
Receiving never copies a raw array: it is ``np.frombuffer`` over the zmq frame's own buffer.
"""

from __future__ import annotations

import gc
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from .compression import compress, decompress
from .errors import ProtocolError
from .limits import Limits

PROTOCOL = "cryoptycho"
VERSION = 1
#: nesting depth of maps and lists a header may have (free-form ``metadata``/``options`` included);
#: receivers store headers as JSON, and deeper trees would exhaust the recursion of its encoder
MAX_DEPTH = 32

#: wire dtype name → little-endian numpy dtype (bool is one byte, 0 or 1)
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_NAMES = {np.dtype(name).newbyteorder("="): name for name in DTYPES}
MAX_NDIM = 4
#: what msgpack's ValueError says of a list or map longer than max_array_len / max_map_len
_OVER_LENGTH = re.compile(r"exceeds max_(array|map)_len")


def wire_dtype(dtype: Any) -> str:
    """The wire name of a numpy dtype; a dtype the protocol lacks is a ValueError naming it."""
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in _NAMES:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot travel; wire dtypes: {', '.join(DTYPES)}")
    return _NAMES[dt]


def pack(
    header: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    codecs: Mapping[str, str] | None = None,
    checksum: bool = False,
) -> list[Any]:
    """Header and named arrays → message parts (arrays ≥ 64 kB go out without a copy).

    ``header`` must already hold ``type``; ``protocol``, ``version`` and ``arrays`` are added.
    ``checksum`` adds the CRC-32 of each part's wire bytes, which receivers then verify.
    """
    descriptors = []
    parts: list[Any] = [b""]
    for name, array in arrays.items():
        codec = (codecs or {}).get(name, "none")
        arr = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
        if arr.ndim > MAX_NDIM:
            raise ValueError(f"array {name!r} has {arr.ndim} dimensions; at most {MAX_NDIM} travel")
        buf = compress(arr, codec)
        desc = {
            "name": name,
            "dtype": wire_dtype(arr.dtype),
            "shape": list(arr.shape),
            "compression": codec,
            "nbytes": memoryview(buf).nbytes,
        }
        if checksum:
            desc["crc32"] = zlib.crc32(byte_view(buf))
        descriptors.append(desc)
        parts.append(buf)
    head = {"protocol": PROTOCOL, "version": VERSION, **header, "arrays": descriptors}
    parts[0] = msgpack.packb(head, use_bin_type=True)
    return parts


def encodable(value: Any) -> Any:
    """``value`` (a str, or a tree of dicts and lists) with every string UTF-8 can carry: a
    path's undecodable bytes, which Python holds as lone surrogates (``surrogateescape``: a
    non-UTF-8 ``--spool-dir``), are written as ``\\xff``, any other lone surrogate as
    ``\\udxxx``. msgpack refused such a string, and the daemon's event quoting it (a result
    path, an error naming a spool) was lost. Only strings that need it are rebuilt."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate no undecodable byte became
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v) for v in value]
    return value


class _Extension:
    """A msgpack extension value as decoded (``ext_hook``), refused by :func:`_check_tree`
    where it sits: raised from the hook, the refusal named only ``header`` for a value deep
    in ``metadata`` (PROTOCOL.md names the path of the value)."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


#: one per code (−128…127): a header of 350,000 three-byte extension values holds references only
_EXTENSIONS = tuple(_Extension(code) for code in range(-128, 128))


def _no_ext(code: int, data: bytes) -> Any:
    return _EXTENSIONS[code + 128]


def _ext_refusal(path: str, code: int) -> ProtocolError:
    return ProtocolError(path, "no_ext_types", f"msgpack extension type {code} is not allowed")


def _check_tree(header: dict[str, Any], max_values: int | None = None) -> None:
    """Values msgpack can carry but the protocol cannot store: the timestamp extension (which
    msgpack decodes itself, past ``ext_hook``), binary strings (headers hold text; bytes travel
    as array parts), binary map keys, and trees nested deeper than :data:`MAX_DEPTH`.

    One level at a time, holding only references: a header within ``max_header_bytes`` may be
    a million one-byte values (``[[], [], …]``), and naming each one's path as it was visited
    cost 1.2 s of the manager loop and 150 MB per such message. The path of a value refused is
    found by a second walk, :func:`_refuse_in_tree`, only then. ``max_values``: more values
    than this in the whole tree are refused (rule ``max_header_values``) as soon as a level
    takes the count past it, before the rest is walked."""
    level: list[Any] = [header]
    depth = 0
    values = 0
    while level:
        values += len(level)
        if max_values is not None and values > max_values:
            raise ProtocolError("header", "max_header_values", f"more than {max_values} values (maps, lists, "
                                "strings, numbers) in one header: the limit max_header_values")
        if depth > MAX_DEPTH:
            _refuse_in_tree(header)
        below: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                if not all(isinstance(key, str) for key in node):
                    _refuse_in_tree(header)
                below.extend(node.values())
            elif isinstance(node, list):
                below.extend(node)
            elif isinstance(node, (msgpack.Timestamp, _Extension, bytes, bytearray)):
                _refuse_in_tree(header)
        level = below
        depth += 1


def values_over(head: Any, max_values: int) -> int | None:
    """How many values (maps, lists, strings, numbers: as :func:`read_header` counts them for
    ``max_header_values``) the packed header ``head`` holds, where more than ``max_values``;
    None where not. A header of no more bytes than ``max_values`` is not decoded: every value
    takes at least one byte."""
    view = byte_view(head)
    if view.nbytes <= max_values:
        return None
    level: list[Any] = [msgpack.unpackb(view, raw=False, strict_map_key=False)]
    values = 0
    while level:
        values += len(level)
        below: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                below.extend(node.values())
            elif isinstance(node, list):
                below.extend(node)
        level = below
    return values if values > max_values else None


def _refuse_in_tree(header: dict[str, Any]) -> None:
    """Raise the :class:`ProtocolError` naming the first value :func:`_check_tree` found wrong.
    Depth first, the path kept as one list of keys: its text is made for the value refused only
    (one string per value visited cost as much as the first walk saves, the bomb plus one bad
    value at its end)."""
    keys: list[str | int] = []  #: the path to the node being entered
    stack: list[Iterator[tuple[Any, Any]]] = []

    def path() -> str:
        text = ""
        for key in keys:
            text += f"[{key}]" if isinstance(key, int) else f"{text and '.'}{key}"
        return text

    def enter(node: Any) -> bool:
        """Check ``node``; True when it is a map or list whose children come next."""
        if len(keys) > MAX_DEPTH:
            raise ProtocolError(path(), "max_depth", f"maps and lists nest deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise ProtocolError(path() or "header", "string_key",
                                        f"map key {key!r} is not a UTF-8 string")
            stack.append(iter(node.items()))
            return True
        if isinstance(node, list):
            stack.append(enumerate(node))
            return True
        if isinstance(node, msgpack.Timestamp):
            raise ProtocolError(path(), "no_ext_types", "msgpack extension type -1 (timestamp) is not allowed")
        if isinstance(node, _Extension):
            raise _ext_refusal(path(), node.code)
        if isinstance(node, (bytes, bytearray)):
            raise ProtocolError(path(), "no_binary", "binary values are not allowed in headers (send an array)")
        return False

    enter(header)
    while stack:
        item = next(stack[-1], None)
        if item is None:  # this map or list is done: back to its parent
            stack.pop()
            if keys:
                keys.pop()
            continue
        keys.append(item[0])
        if not enter(item[1]):
            keys.pop()
    raise AssertionError("_refuse_in_tree found nothing _check_tree refused")  # the two walks disagree


def byte_view(part: Any) -> memoryview:
    """A flat byte view of a message part (bytes, array, or zmq.Frame), without copying."""
    # zmq.Frame (received with copy=False) exposes its bytes without a copy via .buffer
    buf = getattr(part, "buffer", part)
    if isinstance(buf, np.ndarray):
        # memoryview.cast refuses empty arrays; a flat byte view of a contiguous array does not
        return memoryview(buf.reshape(-1).view(np.uint8))
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def read_header(parts: Sequence[Any], limits: Limits) -> dict[str, Any]:
    """Check the envelope (sizes, msgpack, protocol, version) and return the header map."""
    if len(parts) == 0:
        raise ProtocolError("message", "part_count", "empty message (no header part)")
    total = sum(byte_view(p).nbytes for p in parts)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            "message",
            "max_message_bytes",
            f"{total} bytes exceed the limit of {limits.max_message_bytes}",
        )
    head = byte_view(parts[0])
    if head.nbytes > limits.max_header_bytes:
        raise ProtocolError(
            "header",
            "max_header_bytes",
            f"{head.nbytes} bytes exceed the limit of {limits.max_header_bytes}",
        )
    budget = limits.max_header_values
    # msgpack builds one Python object per value, lists and maps tracked by the cyclic garbage
    # collector: a header of a million empty lists set off hundreds of collections, each walking
    # every container built so far (200 ms of the 270 ms such a header took to build and free).
    # Nothing collectable is made while msgpack runs (it holds the interpreter lock throughout,
    # so no other thread allocates meanwhile either), and the collector is on again after it.
    # With max_header_values refusing flat bombs at their length, this still buys the most at
    # the largest nested bomb within max_header_bytes (1,045 lists of 1,000 empty lists):
    # 0.50 s of CPU to build and free with the collector on, 0.08 s with it off.
    # The flag is the process's, and other threads read headers too: a reader turns it off
    # only where it found it on, and so always turns it on again after. One that found it off
    # (another reader's pause, or the program's own choice) leaves it as it is — turning it off
    # then, as every reader once did, let the reader that had paused it turn it on first and
    # left it off for good.
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        # no list or map longer than the whole header's budget of values: msgpack refuses it at
        # its length, before building one of its values (a flat bomb costs microseconds)
        header = msgpack.unpackb(
            head, raw=False, strict_map_key=True, ext_hook=_no_ext, timestamp=0,
            max_array_len=budget, max_map_len=budget,
        )
    except ProtocolError:
        raise
    except msgpack.StackError:  # says nothing itself: the error read "header is not valid msgpack: "
        raise ProtocolError("header", "max_depth", f"maps and lists nest deeper than {MAX_DEPTH} levels "
                            "(deeper than the msgpack decoder goes)") from None
    except msgpack.FormatError:  # likewise silent
        raise ProtocolError("header", "msgpack", "header is not valid msgpack: it holds the byte 0xc1, "
                            "which msgpack never uses") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if str(exc).startswith(f"{_Extension.__name__} is not allowed for map key"):  # (strict_map_key's words)
            raise ProtocolError("header", "no_ext_types", "a map key is a msgpack extension type, which is "
                                "not allowed") from None
        if _OVER_LENGTH.search(str(exc)):
            raise ProtocolError("header", "max_header_values", f"a list or map of more than {budget} values "
                                f"(msgpack: {exc}): the limit max_header_values") from None
        raise ProtocolError("header", "msgpack", f"header is not valid msgpack: {exc}") from None
    finally:
        if collecting:
            gc.enable()
    if isinstance(header, _Extension):
        raise _ext_refusal("header", header.code)
    if not isinstance(header, dict):
        raise ProtocolError(
            "header", "map", f"header must be a msgpack map, got {type(header).__name__}"
        )
    try:
        _check_tree(header, budget)
    except ProtocolError as exc:
        sid, kind = header.get("scan_id"), header.get("type")
        exc.scan_id = sid if isinstance(sid, str) else None
        # a scan_start refused here is still one (its producer's receipt says why)
        exc.message_type = kind if isinstance(kind, str) else ""
        raise
    if header.get("protocol") != PROTOCOL:
        raise ProtocolError(
            "protocol", "value", f"expected {PROTOCOL!r}, got {header.get('protocol')!r}"
        )
    version = header.get("version")
    if type(version) is not int or version != VERSION:  # 1.0 and True are not the integer 1
        raise ProtocolError(
            "version",
            "supported",
            f"version {version!r} is not supported; this side speaks {VERSION}",
        )
    return header


def unpack(
    parts: Sequence[Any], limits: Limits
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Check the envelope of a received message and decode its arrays (raw ones zero-copy).

    Returns the header (with ``arrays`` removed), ``{name: array}`` and ``{name: codec}``; arrays
    keep their wire dtype and raw ones are views of the received buffers, never copies.
    """
    header = read_header(parts, limits)
    try:
        arrays, codecs = _decode_arrays(header, parts, limits)
    except ProtocolError as exc:
        # the header was readable: name the scan, so the error can be routed to its producer
        sid, kind = header.get("scan_id"), header.get("type")
        if exc.scan_id is None and isinstance(sid, str):
            exc.scan_id = sid
        exc.message_type = kind if isinstance(kind, str) else ""
        raise
    return header, arrays, codecs


def _decode_arrays(
    header: dict[str, Any], parts: Sequence[Any], limits: Limits
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    views = [byte_view(p) for p in parts]
    descriptors = header.pop("arrays", [])
    if not isinstance(descriptors, list):
        raise ProtocolError("arrays", "list", "arrays must be a list of descriptors")
    if len(parts) != 1 + len(descriptors):
        raise ProtocolError(
            "message",
            "part_count",
            f"{len(parts)} parts, but the header describes {len(descriptors)} arrays "
            f"({1 + len(descriptors)} parts expected)",
        )
    arrays: dict[str, np.ndarray] = {}
    codecs: dict[str, str] = {}
    for i, (desc, view) in enumerate(zip(descriptors, views[1:])):
        name, array = _decode_array(i, desc, view, limits)
        if name in arrays:
            raise ProtocolError(f"arrays[{i}].name", "unique", f"array {name!r} appears twice")
        arrays[name] = array
        codecs[name] = desc.get("compression", "none")
    return arrays, codecs


def _decode_array(i: int, desc: Any, view: memoryview, limits: Limits) -> tuple[str, np.ndarray]:
    where = f"arrays[{i}]"
    if not isinstance(desc, dict):
        raise ProtocolError(where, "map", "an array descriptor must be a map")
    unknown = set(desc) - {"name", "dtype", "shape", "compression", "nbytes", "crc32"}
    if unknown:
        raise ProtocolError(f"{where}.{min(unknown)}", "extra_forbidden", "unknown descriptor key")
    name = desc.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise ProtocolError(
            f"{where}.name", "string_type", "name must be a non-empty string (≤ 256 chars)"
        )
    dtype_name = desc.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(
            f"{where}.dtype",
            "allowed_dtype",
            f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}",
        )
    shape = desc.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(
            f"{where}.shape",
            "shape",
            f"shape must be ≤ {MAX_NDIM} non-negative integers, got {shape!r}",
        )
    codec = desc.get("compression", "none")
    if codec not in limits.compressions:
        raise ProtocolError(
            f"{where}.compression",
            "allowed_compression",
            f"{codec!r} is not one of {', '.join(limits.compressions)}",
        )
    nbytes = desc.get("nbytes", view.nbytes)
    if type(nbytes) is not int or nbytes != view.nbytes:  # a float 100.0 is not an int
        raise ProtocolError(
            f"{where}.nbytes",
            "size_match",
            f"descriptor says {nbytes} bytes, part has {view.nbytes}",
        )
    crc = desc.get("crc32")
    if crc is not None and (type(crc) is not int or crc != zlib.crc32(view)):
        raise ProtocolError(
            f"{where}.crc32", "checksum", f"part of {name!r} does not match its CRC-32"
        )
    dtype = DTYPES[dtype_name]
    # Python integers: a forged shape must not overflow into a small product
    decoded = math.prod(shape) * dtype.itemsize
    if decoded > limits.max_message_bytes:
        raise ProtocolError(
            f"{where}.shape",
            "max_message_bytes",
            f"{name!r} would decode to {decoded} bytes, over the limit",
        )
    if codec == "none":
        if view.nbytes != decoded:
            raise ProtocolError(
                f"{where}.nbytes",
                "size_match",
                f"{name!r}: {view.nbytes} bytes for shape {shape} {dtype_name} ({decoded})",
            )
        array = np.frombuffer(view, dtype=dtype).reshape(shape)
    else:
        array = decompress(view, codec, dtype, tuple(shape), f"{where}.data")
    return name, array


def nest(tree: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Put arrays back into the header tree at their dotted paths (for free-form messages)."""
    for name, array in arrays.items():
        node = tree
        *path, leaf = name.split(".")
        for key in path:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ProtocolError(
                    name, "array_path", f"array path {name!r} crosses a non-map value"
                )
        node[leaf] = array
    return tree


def flatten(
    tree: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a tree into its msgpack-native part and its arrays (dotted path → array).

    Arrays may be map values at any depth, not list items (a list has no path to name them).
    NumPy scalars become Python numbers, tuples become lists.
    """
    plain: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or "." in key:
            raise ValueError(f"map keys must be strings without dots, got {key!r}")
        if type(value) in _NATIVE:  # most leaves: skip the ABC checks below (a reply of 256 scans has ~4k)
            plain[key] = value
            continue
        path = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            arrays[path] = value
        elif isinstance(value, Mapping):
            sub, sub_arrays = flatten(value, f"{path}.")
            plain[key] = sub
            arrays.update(sub_arrays)
        else:
            plain[key] = _plain(value, path)
    return plain, arrays


#: leaf types msgpack takes as they are
_NATIVE = frozenset({str, int, float, bool, bytes, type(None)})


def _plain(value: Any, path: str) -> Any:
    if type(value) in _NATIVE:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        sub, arrays = flatten(value, f"{path}.")
        if arrays:
            raise ValueError(f"{path}: arrays inside lists cannot travel; put them in a map")
        return sub
    if isinstance(value, np.ndarray):
        raise ValueError(f"{path}: arrays inside lists cannot travel; put them in a map")  # noqa: TRY004 (a message error)
    return value
