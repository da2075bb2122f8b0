"""Codecs of array parts (PROTOCOL.md § Compression), from libraries, never hand-written.

``bslz4`` is the HDF5 bitshuffle-filter framing that DECTRIS Stream V2 also uses: a 12-byte
big-endian header (u64 decoded size in bytes, u32 block size in bytes, 0 = default) followed by
bitshuffle's LZ4 blocks (each a u32 big-endian compressed length, then an LZ4 block), and the
``n_elements % 8`` trailing elements raw. A detector's bslz4 blob is therefore accepted as is.
``lz4`` is one raw LZ4 block with no framing; its decoded size follows from shape and dtype.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from pathlib import Path
from typing import Any

import bitshuffle
import lz4.block
import numpy as np

from .errors import ProtocolError

_HEADER = struct.Struct(">QI")
#: bitshuffle's own default (BSHUF_TARGET_BLOCK_SIZE_B); 8192 B is also what DECTRIS detectors send
BLOCK_BYTES = 8192


def _openmp_setter() -> Any:
    """``omp_set_num_threads`` of the OpenMP runtime bitshuffle uses, or None."""
    libs = sorted(
        (Path(bitshuffle.__file__).parent.parent / "bitshuffle.libs").glob("libgomp*.so*")
    )
    name = str(libs[0]) if libs else ctypes.util.find_library("gomp")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).omp_set_num_threads
    except (OSError, AttributeError):
        return None


_SET_OMP_THREADS = _openmp_setter()
_serial = threading.local()


def _one_openmp_thread() -> None:
    # bitshuffle parallelises over blocks with OpenMP. On a shared host its spinning threads
    # made decoding 3-5x slower (measured: 130 vs 410 MB/s under load, 2 cores), and they would
    # compete with the engine. The OpenMP thread count is a per-thread setting, so this limits
    # only the thread that encodes or decodes (e.g. the daemon's socket thread).
    if _SET_OMP_THREADS is not None and not getattr(_serial, "done", False):
        _SET_OMP_THREADS(1)
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
        _one_openmp_thread()
        flat = array.reshape(-1)
        block = default_block_elements(array.itemsize)
        body = bitshuffle.compress_lz4(flat, block)
        return _HEADER.pack(array.nbytes, block * array.itemsize) + body.tobytes()
    raise ValueError(f"unknown codec {codec!r}; known: none, lz4, bslz4")


def decompress(
    buf: Any, codec: str, dtype: np.dtype, shape: tuple[int, ...], field: str
) -> np.ndarray:
    """Decode one part to an array of ``shape``/``dtype``; any inconsistency is a ProtocolError.

    The decoded size is known before anything is allocated (shape × itemsize, already checked
    against the limits by the caller), so a crafted part cannot inflate beyond it.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if codec == "lz4":
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
        return _decompress_bslz4(memoryview(buf).cast("B"), dtype, shape, nbytes, field)
    raise ProtocolError(field, "allowed_compression", f"unknown codec {codec!r}")


def _decompress_bslz4(
    view: memoryview, dtype: np.dtype, shape: tuple[int, ...], nbytes: int, field: str
) -> np.ndarray:
    if len(view) < _HEADER.size:
        raise ProtocolError(
            field, "decompress", f"bslz4 part of {len(view)} bytes has no 12-byte header"
        )
    declared, block_bytes = _HEADER.unpack_from(view)
    if declared != nbytes:
        raise ProtocolError(
            field,
            "decoded_size",
            f"bslz4 header says {declared} bytes, shape and dtype say {nbytes}",
        )
    item = dtype.itemsize
    if block_bytes == 0:  # the LiberTEM simulator writes a zero header; 0 means "default"
        block = default_block_elements(item)
    elif block_bytes % (8 * item) or block_bytes > (1 << 24):
        raise ProtocolError(
            field,
            "decompress",
            f"bslz4 block size {block_bytes} B is not a multiple of 8×{item} up to 16 MiB",
        )
    else:
        block = block_bytes // item
    body = np.frombuffer(view, dtype=np.uint8, offset=_HEADER.size)
    # bitshuffle's C decoder trusts the block lengths in the stream and does not know the input
    # length, so a truncated or forged stream must be walked here before it may read past the end.
    _check_bslz4_blocks(body, nbytes // item, block, item, field)
    _one_openmp_thread()
    try:
        out = bitshuffle.decompress_lz4(body, shape, dtype, block)
    except (RuntimeError, ValueError) as exc:
        raise ProtocolError(field, "decompress", f"corrupt bslz4 stream: {exc}") from None
    return out


def _check_bslz4_blocks(
    body: np.ndarray, n_elements: int, block: int, item: int, field: str
) -> None:
    full, rem = divmod(n_elements, block)
    last = rem - rem % 8
    n_blocks = full + (1 if last else 0)
    tail = (rem % 8) * item
    size = body.shape[0]
    pos = 0
    data = body.data
    for _ in range(n_blocks):
        if pos + 4 > size:
            raise ProtocolError(
                field, "decompress", "bslz4 stream is truncated (block header past the end)"
            )
        pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
        if pos > size:
            raise ProtocolError(
                field, "decompress", "bslz4 stream is truncated (block past the end)"
            )
    if pos + tail != size:
        raise ProtocolError(
            field, "decompress", f"bslz4 stream has {size - pos - tail:+d} bytes beyond its blocks"
        )
