"""Codecs of array parts (PROTOCOL.md § Compression), from libraries, never hand-written.

``bslz4`` is the HDF5 bitshuffle-filter framing that DECTRIS Stream V2 also uses: a 12-byte
big-endian header (u64 decoded size in bytes, u32 block size in bytes, 0 = default) followed by
bitshuffle's LZ4 blocks (each a u32 big-endian compressed length, then an LZ4 block), and the
``n_elements % 8`` trailing elements raw. A detector's bslz4 blob is therefore accepted as is,
and :func:`bslz4_compress` / :func:`bslz4_decompress` serve the DECTRIS decoder as well.
``lz4`` is one raw LZ4 block with no framing; its decoded size follows from shape and dtype.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence
from typing import Any

import bitshuffle
import lz4.block
import numpy as np
from threadpoolctl import ThreadpoolController

from .errors import ProtocolError

try:  # DECTRIS' own decoder: MIT, but published as a source distribution only, so optional
    from dectris.compression import decompress as _dectris_decompress
except ImportError:
    _dectris_decompress = None

_HEADER = struct.Struct(">QI")
_U32 = struct.Struct(">I")
#: bitshuffle's own default (BSHUF_TARGET_BLOCK_SIZE_B); 8192 B is also what DECTRIS detectors send
BLOCK_BYTES = 8192
_MAX_BLOCK_BYTES = 1 << 24
_serial = threading.local()
#: bslz4 decoders; ``dectris`` (the ``dectris-compression`` package) decodes 192×192 uint16
#: frames 2.2x faster than bitshuffle's Python binding (``cryoptycho bench dectris``) and is
#: used whenever it is installed. Both give the same bytes; the block walk below checks the
#: framing first for either.
BSLZ4_DECODERS = ("dectris", "bitshuffle")
BSLZ4_DECODER = "dectris" if _dectris_decompress is not None else "bitshuffle"


def _one_openmp_thread() -> None:
    # bitshuffle parallelises over blocks with OpenMP. On a shared host its spinning threads
    # made decoding 3-50x slower (measured: 130 vs 410 MB/s under load, 2 cores), and a frame is
    # only a few blocks anyway. The OpenMP thread count is a per-thread setting, so this limits
    # only the thread that encodes or decodes (e.g. the daemon's socket thread).
    if getattr(_serial, "done", False):
        return
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "openmp" and "bitshuffle" in lib.filepath:
            lib.set_num_threads(1)
    _serial.done = True


def default_block_elements(itemsize: int) -> int:
    """bitshuffle's automatic block size in elements (what a 0 in the header means)."""
    return max(128, (BLOCK_BYTES // itemsize) // 8 * 8)


def compress(array: np.ndarray, codec: str) -> Any:
    """Encode a C-contiguous little-endian array; returns a buffer for one message part."""
    if codec == "none":
        return array
    if codec == "lz4":
        return lz4.block.compress(array.reshape(-1).view(np.uint8), store_size=False)
    if codec == "bslz4":
        return bslz4_compress(array)
    raise ValueError(f"unknown codec {codec!r}; known: none, lz4, bslz4")


def decompress(
    buf: Any, codec: str, dtype: np.dtype, shape: tuple[int, ...], field: str
) -> np.ndarray:
    """Decode one part to an array of ``shape``/``dtype``; any inconsistency is a ProtocolError.

    The decoded size is known before anything is allocated (shape × itemsize, already checked
    against the limits by the caller), so a crafted part cannot inflate beyond it.
    """
    if codec == "lz4":
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            raw = lz4.block.decompress(buf, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError as exc:
            raise ProtocolError(field, "decompress", f"corrupt lz4 block: {exc}") from None
        if len(raw) != nbytes:
            raise ProtocolError(
                field, "decoded_size", f"lz4 block decodes to {len(raw)} bytes, expected {nbytes}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if codec == "bslz4":
        return bslz4_decompress(buf, dtype, shape, field)
    raise ProtocolError(field, "allowed_compression", f"unknown codec {codec!r}")


def bslz4_compress(array: np.ndarray, block_bytes: int = BLOCK_BYTES) -> bytes:
    """The 12-byte-header bslz4 blob of an array's bytes (what a DECTRIS detector sends)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    item = flat.dtype.itemsize
    if block_bytes <= 0 or block_bytes % (8 * item) or block_bytes > _MAX_BLOCK_BYTES:
        raise ValueError(
            f"block_bytes must be a positive multiple of {8 * item} up to 16 MiB, got {block_bytes}"
        )
    _one_openmp_thread()
    body = bitshuffle.compress_lz4(flat, block_bytes // item)
    return _HEADER.pack(flat.nbytes, block_bytes) + body.tobytes()


def bslz4_decompress(
    buf: Any,
    dtype: np.dtype,
    shape: tuple[int, ...] | None = None,
    field: str = "data",
    *,
    zero_size_ok: bool = False,
    decoder: str | None = None,
) -> np.ndarray:
    """Decode a bslz4 blob to ``shape``/``dtype`` (shape None: 1-D, sized by the header).

    Any inconsistency is a ProtocolError on ``field`` (rule ``decompress`` or
    ``decoded_size``). ``zero_size_ok`` accepts a header size of 0 when ``shape`` is given, as
    LiberTEM's DECTRIS simulator writes; the protocol itself requires the true size.
    ``decoder`` is one of :data:`BSLZ4_DECODERS` (None: :data:`BSLZ4_DECODER`, the fastest
    installed). The array may be read-only (the dectris decoder returns immutable bytes).
    """
    if decoder is None:
        decoder = BSLZ4_DECODER
    elif decoder not in BSLZ4_DECODERS or (decoder == "dectris" and _dectris_decompress is None):
        raise ValueError(f"decoder must be one of {BSLZ4_DECODERS} (dectris needs the "
                         f"dectris-compression package), got {decoder!r}")
    view = memoryview(buf).cast("B")
    if len(view) < _HEADER.size:
        raise ProtocolError(
            field, "decompress", f"truncated bslz4 stream: {len(view)} bytes, the header needs 12"
        )
    declared, block_bytes = _HEADER.unpack_from(view)
    item = dtype.itemsize
    if shape is None:
        if declared % item:
            raise ProtocolError(
                field,
                "decoded_size",
                f"bslz4 header says {declared} bytes, not a whole number of {item}-byte elements",
            )
        shape = (declared // item,)
    nbytes = math.prod(shape) * item
    if declared != nbytes and not (zero_size_ok and declared == 0):
        raise ProtocolError(
            field,
            "decoded_size",
            f"bslz4 header says {declared} bytes, shape and dtype say {nbytes}",
        )
    if block_bytes == 0:  # 0 means bitshuffle's default (simulators write it)
        block = default_block_elements(item)
    elif block_bytes % (8 * item) or block_bytes > _MAX_BLOCK_BYTES:
        raise ProtocolError(
            field,
            "decompress",
            f"bslz4 block size {block_bytes} B is not a multiple of 8×{item} up to 16 MiB",
        )
    else:
        block = block_bytes // item
    # bitshuffle's C decoder trusts the block lengths in the stream and does not know the input
    # length, so a truncated or forged stream must be walked here before it may read past the end.
    # (The dectris decoder is bounds-checked, but ignores bytes beyond the last block and has
    # no message saying where a stream broke off; the walk gives both.)
    _check_bslz4_blocks(view, nbytes // item, block, item, field)
    # the dectris decoder reads the block size from the header, so a 0 there (bitshuffle's
    # default) is left to bitshuffle, as is a header size of 0
    if decoder == "dectris" and declared and block_bytes:
        try:
            raw = _dectris_decompress(view, "bslz4", elem_size=item)
        except RuntimeError as exc:
            raise ProtocolError(field, "decompress", f"corrupt bslz4 stream: {exc}") from None
        return np.frombuffer(raw, dtype).reshape(shape)
    body = np.frombuffer(view, dtype=np.uint8, offset=_HEADER.size)
    _one_openmp_thread()
    try:
        return bitshuffle.decompress_lz4(body, shape, dtype, block)
    except (RuntimeError, ValueError) as exc:
        raise ProtocolError(field, "decompress", f"corrupt bslz4 stream: {exc}") from None


def bslz4_block_elements(buf: Any, itemsize: int) -> int:
    """The block size in elements of a bslz4 blob (its header's, or bitshuffle's default for 0)."""
    block_bytes = _HEADER.unpack_from(memoryview(buf).cast("B"))[1]
    return block_bytes // itemsize if block_bytes else default_block_elements(itemsize)


def bslz4_header(buf: Any, itemsize: int) -> tuple[int, int]:
    """(decoded bytes, block size in bytes) of a bslz4 blob's header; a 0 block size (bitshuffle's
    default) is given as the default's bytes."""
    declared, block_bytes = _HEADER.unpack_from(memoryview(buf).cast("B"))
    return declared, block_bytes or default_block_elements(itemsize) * itemsize


def bslz4_concat(blobs: Sequence[Any], itemsize: int, blob_bytes: int | None = None) -> bytes | None:
    """One bslz4 blob of the elements of several, without decompressing anything, or None when
    that is not exact. bitshuffle compresses each block on its own, so when every blob has the
    same block size and holds a whole number of blocks (no short last block, no raw tail),
    their blocks one after the other, behind one header, are byte for byte what
    :func:`bslz4_compress` of the concatenated elements gives: an HDF5 bitshuffle chunk of
    several frames (a 192×192 uint16 DECTRIS frame is nine 8 KiB blocks). ``blob_bytes``: None
    unless every blob decodes to that many bytes. The blobs must be whole
    (:func:`bslz4_decompress` accepted them)."""
    if not blobs:
        return None
    total, block = 0, None
    unpack = _HEADER.unpack_from  # any buffer: no memoryview per blob (the spool joins 8 a chunk)
    for blob in blobs:
        declared, block_bytes = unpack(blob)
        block_bytes = block_bytes or default_block_elements(itemsize) * itemsize
        if (declared == 0 or declared % block_bytes or block not in (None, block_bytes)
                or blob_bytes not in (None, declared)):
            return None
        block = block_bytes
        total += declared
    return b"".join([_HEADER.pack(total, block), *(memoryview(b)[_HEADER.size:] for b in blobs)])


def bslz4_slices(buf: Any, itemsize: int, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
    """Element ranges ``[lo, hi)`` of one bslz4 blob as standalone bslz4 blobs, without
    decompressing or recompressing anything: bitshuffle compresses each block on its own, so
    the blocks of a range that starts on a block boundary and ends on one (or at the blob's end,
    short last block and raw tail included) are, behind a header of their own, byte for byte
    what :func:`bslz4_compress` of those elements gives, and an HDF5 bitshuffle chunk (filter
    32008) when the range is one. A range off the block grid gives None.

    The blob must be whole (:func:`bslz4_decompress` accepted it); a truncated one is a
    ProtocolError of ``data``, as there.
    """
    view = memoryview(buf).cast("B")
    declared = _HEADER.unpack_from(view)[0]
    n_elements = declared // itemsize
    block = bslz4_block_elements(view, itemsize)
    offsets = _bslz4_block_offsets(view, n_elements, block, itemsize, "data")
    out: list[bytes | None] = []
    for lo, hi in spans:
        if not 0 <= lo < hi <= n_elements or lo % block or (hi % block and hi != n_elements):
            out.append(None)
            continue
        end = len(view) if hi == n_elements else offsets[hi // block]
        head = _HEADER.pack((hi - lo) * itemsize, block * itemsize)
        out.append(b"".join((head, view[offsets[lo // block] : end])))
    return out


def _check_bslz4_blocks(
    view: memoryview, n_elements: int, block: int, item: int, field: str
) -> None:
    _bslz4_block_offsets(view, n_elements, block, item, field)


def _bslz4_block_offsets(
    view: memoryview, n_elements: int, block: int, item: int, field: str
) -> list[int]:
    """Byte offset of every block (and of the end of the last one), checking the framing."""
    # bitshuffle's layout: full blocks, one shorter block rounded down to a multiple of 8
    # elements, then the remaining (< 8) elements stored raw
    full, rem = divmod(n_elements, block)
    n_blocks = full + (1 if rem // 8 else 0)
    tail = (rem % 8) * item
    size = len(view)
    pos = _HEADER.size
    read = _U32.unpack_from
    offsets = [pos]
    for i in range(n_blocks):
        if pos + 4 > size:
            raise ProtocolError(
                field, "decompress", f"truncated bslz4 stream: block {i} of {n_blocks} is missing"
            )
        pos += 4 + read(view, pos)[0]
        if pos > size:
            raise ProtocolError(
                field,
                "decompress",
                f"truncated bslz4 stream: block {i} ends at byte {pos - _HEADER.size}, "
                f"the stream has {size - _HEADER.size}",
            )
        offsets.append(pos)
    if pos + tail != size:
        raise ProtocolError(
            field,
            "decompress",
            f"bslz4 stream has {size - pos - tail:+d} bytes beyond its blocks and raw tail",
        )
    return offsets
