"""DECTRIS pixel-data codecs: the tag-56500 algorithms (V2) and the V1 ``encoding`` strings.

The block codecs come from libraries (``bitshuffle`` for bitshuffle-LZ4, ``lz4.block`` for LZ4);
this module only reads and writes the HDF5-filter framing around them, which DECTRIS re-uses:
``u64 BE uncompressed bytes, u32 BE block bytes`` then, per block, ``u32 BE length + bytes``.
The framing is walked before any block is handed to a library, so a truncated payload is a
clear :class:`DecodeError` rather than whatever the C code makes of it.
"""

from __future__ import annotations

import struct
import threading

import bitshuffle
import lz4.block
import numpy as np
from threadpoolctl import ThreadpoolController

from .schema import DecodeError

_HEADER = struct.Struct(">QI")
_BLOCK_LEN = struct.Struct(">I")
#: the block size DECTRIS detectors use (bytes); also bitshuffle's default for 2-byte pixels
DEFAULT_BLOCK_BYTES = 8192


_thread_state = threading.local()


def _bitshuffle_single_threaded() -> None:
    """Run bitshuffle's OpenMP loop on one thread (set once per calling thread: OpenMP thread
    counts are per thread). One frame is a few blocks, so extra threads cannot help, and their
    spin-waiting made decoding 10-50x slower whenever other work shared the cores."""
    if getattr(_thread_state, "limited", False):
        return
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "openmp" and "bitshuffle" in lib.filepath:
            lib.set_num_threads(1)
    _thread_state.limited = True


def decompress(algorithm: str, modifier: int, payload: bytes, itemsize: int) -> bytes:
    """Raw little-endian pixel bytes of a tag-56500 ``[algorithm, modifier, payload]``."""
    if algorithm == "bslz4":
        if modifier not in (1, 2, 4, 8):
            raise DecodeError(f"bslz4 element size (modifier) must be 1, 2, 4 or 8, got {modifier}")
        return bslz4_decompress(payload, modifier)
    if algorithm == "lz4":
        return lz4_hdf5_decompress(payload)
    raise DecodeError(f"unsupported DECTRIS compression algorithm {algorithm!r} (know bslz4, lz4)")


def _read_header(payload: bytes | memoryview, what: str) -> tuple[int, int]:
    if len(payload) < _HEADER.size:
        raise DecodeError(f"truncated {what} payload: {len(payload)} bytes, header needs 12")
    return _HEADER.unpack_from(payload)


def bslz4_decompress(payload: bytes, elem_size: int, expected_bytes: int | None = None) -> bytes:
    """Bitshuffle-LZ4 with the 12-byte HDF5 header. A block size of 0 (as written by some
    simulators) means bitshuffle's default, which is what the detectors' own readers assume."""
    view = memoryview(payload)
    nbytes, block_bytes = _read_header(view, "bslz4")
    if nbytes == 0 and expected_bytes:
        nbytes = expected_bytes  # LiberTEM's simulator leaves the whole header zero
    if expected_bytes is not None and nbytes != expected_bytes:
        raise DecodeError(f"bslz4 header says {nbytes} bytes, the image needs {expected_bytes}")
    if nbytes % elem_size:
        raise DecodeError(f"bslz4 size {nbytes} is not a multiple of the element size {elem_size}")
    if block_bytes % (8 * elem_size):
        raise DecodeError(f"bslz4 block size {block_bytes} is not a multiple of 8 elements")
    block_elems = block_bytes // elem_size
    _check_bslz4_framing(view[_HEADER.size :], nbytes // elem_size, elem_size, block_elems)
    _bitshuffle_single_threaded()
    try:
        out = bitshuffle.decompress_lz4(
            np.frombuffer(view, np.uint8, offset=_HEADER.size),
            (nbytes // elem_size,),
            np.dtype(f"u{elem_size}"),
            block_elems,
        )
    except (RuntimeError, ValueError) as exc:
        raise DecodeError(f"corrupt bslz4 payload: {exc}") from exc
    return out.tobytes()


def _check_bslz4_framing(body: memoryview, n_elems: int, elem_size: int, block_elems: int) -> None:
    # Mirror of bitshuffle's block layout: full blocks, one shorter block rounded down to a
    # multiple of 8 elements, then the remaining (< 8) elements stored raw.
    if block_elems == 0:
        block_elems = _bitshuffle_default_block(elem_size)
    sizes = [block_elems] * (n_elems // block_elems)
    last = (n_elems % block_elems) // 8 * 8
    if last:
        sizes.append(last)
    pos = 0
    for i, _ in enumerate(sizes):
        if pos + 4 > len(body):
            raise DecodeError(f"truncated bslz4 payload: block {i} of {len(sizes)} is missing")
        (clen,) = _BLOCK_LEN.unpack_from(body, pos)
        pos += 4 + clen
        if pos > len(body):
            raise DecodeError(f"truncated bslz4 payload: block {i} needs {pos} bytes, have {len(body)}")
    raw_tail = (n_elems % 8) * elem_size
    if len(body) - pos != raw_tail:
        raise DecodeError(
            f"bslz4 payload has {len(body) - pos} bytes after its blocks, expected {raw_tail}"
        )


def _bitshuffle_default_block(elem_size: int) -> int:
    # bitshuffle's BSHUF_TARGET_BLOCK_SIZE_B = 8192 bytes, at least 128 elements, multiple of 8.
    return max(128, 8192 // elem_size) // 8 * 8


def bslz4_compress(array: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes:
    """Inverse of :func:`bslz4_decompress`: the payload a DECTRIS detector would send."""
    flat = np.ascontiguousarray(array).reshape(-1)
    elem = flat.dtype.itemsize
    if block_bytes <= 0 or block_bytes % (8 * elem):
        raise ValueError(f"block_bytes must be a positive multiple of {8 * elem}, got {block_bytes}")
    _bitshuffle_single_threaded()
    body = bitshuffle.compress_lz4(flat, block_bytes // elem)
    return _HEADER.pack(flat.nbytes, block_bytes) + body.tobytes()


def lz4_hdf5_decompress(payload: bytes, expected_bytes: int | None = None) -> bytes:
    """LZ4 blocks in HDF5-filter framing; a block whose stored length equals its size is raw."""
    view = memoryview(payload)
    nbytes, block_bytes = _read_header(view, "lz4")
    if expected_bytes is not None and nbytes != expected_bytes:
        raise DecodeError(f"lz4 header says {nbytes} bytes, the image needs {expected_bytes}")
    if nbytes and block_bytes == 0:
        raise DecodeError("lz4 header has block size 0")
    out = bytearray()
    pos = _HEADER.size
    while len(out) < nbytes:
        want = min(block_bytes, nbytes - len(out))
        if pos + 4 > len(view):
            raise DecodeError(f"truncated lz4 payload: {len(out)} of {nbytes} bytes decoded")
        (clen,) = _BLOCK_LEN.unpack_from(view, pos)
        pos += 4
        chunk = view[pos : pos + clen]
        if len(chunk) != clen:
            raise DecodeError(f"truncated lz4 payload: block needs {clen} bytes, have {len(chunk)}")
        pos += clen
        if clen == want:
            out += chunk
            continue
        try:
            block = lz4.block.decompress(chunk, uncompressed_size=want)
        except lz4.block.LZ4BlockError as exc:
            raise DecodeError(f"corrupt lz4 block at byte {pos - clen}: {exc}") from exc
        if len(block) != want:
            raise DecodeError(f"lz4 block decoded to {len(block)} bytes, expected {want}")
        out += block
    if pos != len(view):
        raise DecodeError(f"lz4 payload has {len(view) - pos} unexpected trailing bytes")
    return bytes(out)


def lz4_hdf5_compress(array: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes:
    """Inverse of :func:`lz4_hdf5_decompress`."""
    raw = np.ascontiguousarray(array).tobytes()
    parts = [_HEADER.pack(len(raw), block_bytes)]
    for start in range(0, len(raw), block_bytes):
        chunk = raw[start : start + block_bytes]
        packed = lz4.block.compress(chunk, store_size=False)
        if len(packed) >= len(chunk):
            packed = chunk  # incompressible: the framing stores it raw
        parts += [_BLOCK_LEN.pack(len(packed)), packed]
    return b"".join(parts)


# --- Stream V1 `encoding` strings: "<", "lz4<", "bs<N>-lz4<" (grammar [bs<N>][[-]lz4][<|>]) ---


def v1_decode(encoding: str, blob: bytes, dtype: np.dtype, n_elems: int) -> np.ndarray:
    """Pixels of a V1 ``dimage_d`` data part as a flat array of ``dtype`` (native order)."""
    if not encoding or encoding[-1] not in "<>":
        raise DecodeError(f"V1 encoding {encoding!r} must end with '<' or '>' (byte order)")
    order, scheme = encoding[-1], encoding[:-1]
    expected = n_elems * dtype.itemsize
    if scheme == "":
        raw = bytes(blob)
    elif scheme == "lz4":
        # V1 'lz4<' is one bare LZ4 block, not HDF5-framed.
        try:
            raw = lz4.block.decompress(blob, uncompressed_size=expected)
        except lz4.block.LZ4BlockError as exc:
            raise DecodeError(f"corrupt V1 lz4 data: {exc}") from exc
    elif scheme.startswith("bs") and scheme.endswith("lz4"):
        # The shuffle width in the name need not match the pixel type; the type decides.
        raw = bslz4_decompress(blob, dtype.itemsize, expected)
    else:
        raise DecodeError(f"unsupported V1 encoding {encoding!r}")
    if len(raw) != expected:
        raise DecodeError(f"V1 image data is {len(raw)} bytes, shape and type need {expected}")
    return np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype.newbyteorder("="), copy=False)


def v1_encode(encoding: str, array: np.ndarray) -> bytes:
    """Data part for a V1 image in ``encoding`` (little-endian only, as the detectors send)."""
    le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if encoding == "<":
        return le.tobytes()
    if encoding == "lz4<":
        return lz4.block.compress(le.tobytes(), store_size=False)
    if encoding.startswith("bs") and encoding.endswith("-lz4<"):
        return bslz4_compress(le)
    raise ValueError(f"unsupported V1 encoding {encoding!r} (use '<', 'lz4<' or 'bs<N>-lz4<')")
