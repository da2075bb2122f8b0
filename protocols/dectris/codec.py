"""DECTRIS pixel-data codecs: the tag-56500 algorithms (V2) and the V1 ``encoding`` strings.

Bitshuffle-LZ4 is the protocol's own ``bslz4`` codec (:mod:`..compression`, the one
implementation, framing walked before bitshuffle sees a block); this module adds the DECTRIS
names around it and the HDF5-filter framing of plain LZ4 (``lz4.block`` per block):
``u64 BE uncompressed bytes, u32 BE block bytes`` then, per block, ``u32 BE length + bytes``.
A truncated or malformed payload is a clear :class:`DecodeError`.
"""

from __future__ import annotations

import math
import struct

import lz4.block
import numpy as np

from .. import compression
from ..errors import ProtocolError
from .schema import DecodeError

try:  # DECTRIS' own decoder, when installed (compression.BSLZ4_DECODER says whether it is used)
    from dectris.compression import decompress as _dectris_decompress
except ImportError:
    _dectris_decompress = None

_HEADER = struct.Struct(">QI")
_BLOCK_LEN = struct.Struct(">I")
_UINT = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}
#: the block size DECTRIS detectors use (bytes); also bitshuffle's default
DEFAULT_BLOCK_BYTES = compression.BLOCK_BYTES


def decompress(algorithm: str, modifier: int, payload: bytes, itemsize: int) -> bytes | np.ndarray:
    """Raw little-endian pixel bytes of a tag-56500 ``[algorithm, modifier, payload]``: bytes,
    or a uint8 array (bslz4, handed over without a copy)."""
    if algorithm == "bslz4":
        if modifier not in (1, 2, 4, 8):
            raise DecodeError(f"bslz4 element size (modifier) must be 1, 2, 4 or 8, got {modifier}")
        return _bslz4_array(payload, modifier, None).view(np.uint8)
    if algorithm == "lz4":
        return lz4_hdf5_decompress(payload)
    raise DecodeError(f"unsupported DECTRIS compression algorithm {algorithm!r} (know bslz4, lz4)")


def _read_header(payload: bytes | memoryview, what: str) -> tuple[int, int]:
    if len(payload) < _HEADER.size:
        raise DecodeError(f"truncated {what} payload: {len(payload)} bytes, header needs 12")
    return _HEADER.unpack_from(payload)


def bslz4_decompress(payload: bytes, elem_size: int, expected_bytes: int | None = None) -> bytes:
    """Bitshuffle-LZ4 with the 12-byte HDF5 header. A zero header (as LiberTEM's simulator
    writes) means ``expected_bytes`` and bitshuffle's default block, as the detectors' own
    readers assume."""
    return _bslz4_array(payload, elem_size, expected_bytes).tobytes()


def bslz4_array(payload: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A bslz4 payload of ``dtype`` elements (the element size) decoded to ``shape``; the
    header's size must match it, or be 0 (as LiberTEM's simulator writes)."""
    try:
        return compression.bslz4_decompress(payload, dtype, shape, "payload", zero_size_ok=True)
    except ProtocolError as exc:
        raise DecodeError(exc.message) from exc


def bslz4_batch_plan(payloads: list[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Which of a job's bslz4 payloads can be decoded together, several frames in one codec
    call (:func:`bslz4_batch`), and the block size in bytes they share: ``(ok (k,) bool,
    block bytes)``. A payload is ok when its framing is whole — header size the frame's bytes
    (or 0, as LiberTEM's simulator writes), the block size of the first payload, every block
    length inside the payload, no byte beyond its blocks — which is what
    :func:`bslz4_array` checks one block at a time in Python, here for all payloads at once,
    one NumPy step per block (a 192×192 uint16 frame has nine). Only frames of whole blocks
    (no short last block, no raw tail) concatenate, so otherwise none is ok. A payload not
    ok goes through :func:`bslz4_array` alone, which names what is wrong with it or decodes it:
    this check may turn away what that one accepts, never the reverse."""
    k, item = len(payloads), dtype.itemsize
    none = np.zeros(k, bool), 0
    if not k:
        return none
    n_elements = math.prod(shape)
    nbytes = n_elements * item
    first = payloads[0]
    if len(first) < _HEADER.size:
        return none
    block_bytes = _HEADER.unpack_from(first)[1] or compression.default_block_elements(item) * item
    if (block_bytes % (8 * item) or block_bytes > 1 << 24 or not nbytes or nbytes % block_bytes):
        return none
    lengths = np.fromiter(map(len, payloads), np.int64, k)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # 16 bytes of padding: every gather below stays inside the buffer, whatever the lengths say
    buf = np.frombuffer(b"".join([*payloads, bytes(16)]), np.uint8)
    ok = lengths >= _HEADER.size
    head = buf[np.where(ok, starts, 0)[:, None] + np.arange(_HEADER.size)]
    declared = head[:, :8].copy().view(">u8")[:, 0]
    blocks = head[:, 8:].copy().view(">u4")[:, 0]
    ok &= (declared == nbytes) | (declared == 0)
    # a 0 in the header is bitshuffle's default block size, which the first may name outright
    ok &= (blocks == block_bytes) | ((blocks == 0) & (block_bytes == compression.default_block_elements(item) * item))
    pos = starts + _HEADER.size
    word = np.arange(4)
    for _ in range(nbytes // block_bytes):
        # (a length field cut off by the end fails the check below: its block would end past it)
        at = np.where(ok, pos, 0)
        pos = pos + 4 + buf[at[:, None] + word].copy().view(">u4")[:, 0]
        ok &= pos <= ends
    ok &= pos == ends
    return ok, block_bytes


def bslz4_batch(payloads: list[bytes], dtype: np.dtype, shape: tuple[int, ...], block_bytes: int) -> np.ndarray:
    """Frames of ``shape`` decoded from bslz4 payloads that :func:`bslz4_batch_plan` found ok,
    in one codec call: bitshuffle compresses each block on its own, so the blocks of frames of
    whole blocks, one after another behind one header, are the bslz4 stream of the frames one
    after another (:func:`..compression.bslz4_concat`). ``(k, *shape)``, maybe read-only. The
    codec releases the GIL for the whole batch, and the per-call costs (Python, the codec's
    set-up, a bytes object and its copy per frame) are paid once. A corrupt LZ4 block is a
    :class:`DecodeError` of the batch (decode its frames alone to find which)."""
    k, item = len(payloads), dtype.itemsize
    nbytes = math.prod(shape) * item
    head = _HEADER.pack(k * nbytes, block_bytes)
    blob = b"".join([head, *(memoryview(p)[_HEADER.size:] for p in payloads)])
    try:
        if compression.BSLZ4_DECODER == "dectris" and _dectris_decompress is not None:
            raw = _dectris_decompress(blob, "bslz4", elem_size=item)
            if len(raw) != k * nbytes:
                raise DecodeError(f"bslz4 batch decoded to {len(raw)} bytes, expected {k * nbytes}")
            return np.frombuffer(raw, dtype).reshape(k, *shape)
        return compression.bslz4_decompress(blob, dtype, (k, *shape), "payload")
    except RuntimeError as exc:
        raise DecodeError(f"corrupt bslz4 stream in a batch of {k}: {exc}") from None
    except ProtocolError as exc:
        raise DecodeError(exc.message) from exc


def _bslz4_array(payload: bytes, elem_size: int, expected_bytes: int | None) -> np.ndarray:
    if expected_bytes is not None and expected_bytes % elem_size:
        raise DecodeError(f"bslz4 size {expected_bytes} is not a multiple of the element size {elem_size}")
    shape = None if expected_bytes is None else (expected_bytes // elem_size,)
    try:
        return compression.bslz4_decompress(
            payload, _UINT[elem_size], shape, "payload", zero_size_ok=True
        )
    except ProtocolError as exc:
        raise DecodeError(exc.message) from exc


def bslz4_compress(array: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes:
    """Inverse of :func:`bslz4_decompress`: the payload a DECTRIS detector would send."""
    return compression.bslz4_compress(array, block_bytes)


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
