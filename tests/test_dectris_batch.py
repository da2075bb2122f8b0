"""DECTRIS decoding several frames per codec call (codec.bslz4_batch_plan / bslz4_batch inside the
decoding job): for ANY payloads — whole or cut, dense or sparse, other block sizes, forged block
lengths, bytes beyond the blocks — a job gives exactly what decoding each image alone gives:
the same images refused, the same detector chunks, byte-identical binned (or unbinned) frames."""

from __future__ import annotations

import struct
import threading
from unittest import mock

import cbor2
import numpy as np
import pytest
from cryoptycho.protocols import compression
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.dectris.codec import bslz4_array, bslz4_batch, bslz4_batch_plan
from cryoptycho.protocols.dectris.decode import V2_MAGIC, decode_v2
from cryoptycho.protocols.dectris.schema import DecodeError
from cryoptycho.protocols.dectris.source import SUB_BATCH, decode_job, spool_chunk
from hypothesis import given, settings
from hypothesis import strategies as st

CHANNEL = "threshold_1"
_TAG = {np.dtype(np.uint16): 69, np.dtype(np.uint32): 70}
_HEADER = struct.Struct(">QI")


def _image(image_id: int, payload: bytes, shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """A Stream V2 image message carrying ``payload`` as its bslz4 channel, whatever it holds."""
    typed = cbor2.CBORTag(_TAG[dtype], cbor2.CBORTag(56500, ["bslz4", dtype.itemsize, payload]))
    return V2_MAGIC + cbor2.dumps({"type": "image", "series_id": 1, "series_unique_id": "batch",
                                   "image_id": image_id, "data": {CHANNEL: cbor2.CBORTag(40, [list(shape), typed])}})


def _mutate(payload: bytes, how: str, where: int) -> bytes:
    """One defect (or harmless variant) of a good bslz4 payload."""
    size, block = _HEADER.unpack_from(payload)
    body = payload[_HEADER.size:]
    if how == "size_zero":  # LiberTEM's simulator: accepted, the size comes from the shape
        return _HEADER.pack(0, block) + body
    if how == "block_zero":  # bitshuffle's default block size
        return _HEADER.pack(size, 0) + body
    if how == "size_wrong":
        return _HEADER.pack(size + 8, block) + body
    if how == "truncate":
        return payload[: max(0, len(payload) - 1 - where % len(payload))]
    if how == "extra":
        return payload + b"\x00" * (1 + where % 7)
    if how == "forge_length":  # the first block's length says more (or less) than it holds
        (length,) = struct.unpack_from(">I", body)
        delta = 1 + where % 5
        return payload[:_HEADER.size] + struct.pack(">I", max(0, length + (delta if where % 2 else -delta))) + body[4:]
    if how == "flip":  # a byte inside the blocks changed: LZ4 may refuse it or decode other pixels
        pos = _HEADER.size + 4 + where % max(1, len(body) - 4)
        return payload[:pos] + bytes([payload[pos] ^ 0x5A]) + payload[pos + 1:]
    return payload


@st.composite
def _jobs(draw: st.DrawFn) -> tuple[list[bytes], tuple[int, int], np.dtype, np.ndarray]:
    dtype = np.dtype(draw(st.sampled_from([np.uint16, np.uint32])))
    # 64×64: whole 8 KiB blocks (uint16: one, uint32: two); 32×64 uint16: one short block;
    # 24×24: a short block and no whole one; 96×96 uint32: 4.5 blocks
    shape = draw(st.sampled_from([(64, 64), (32, 64), (128, 64), (24, 24), (96, 96)]))
    n = draw(st.integers(1, 2 * SUB_BATCH + 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    dose = draw(st.sampled_from([0.02, 0.5, 20.0, 3000.0]))
    frames = np.minimum(rng.poisson(dose, (n, *shape)), np.iinfo(dtype).max).astype(dtype)
    if draw(st.booleans()):  # flagged pixels (65535 / 2³²-1) and counts past a saturation value
        frames[rng.integers(0, n), rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.iinfo(dtype).max
    block_bytes = draw(st.sampled_from([8192, 8192, 4096, 512]))
    payloads = [compression.bslz4_compress(f, block_bytes) for f in frames]
    kinds = ["none", "size_zero", "block_zero", "size_wrong", "truncate", "extra", "forge_length", "flip", "other_block"]
    for i in range(n):
        how = draw(st.sampled_from(kinds)) if draw(st.integers(0, 3)) == 0 else "none"
        if how == "other_block":  # this frame alone in another block size: a batch of its own kind
            payloads[i] = compression.bslz4_compress(frames[i], 1024 if block_bytes != 1024 else 2048)
        else:
            payloads[i] = _mutate(payloads[i], how, draw(st.integers(0, 10**6)))
    return payloads, shape, dtype, frames


def _alone(image: bytes) -> np.ndarray | None:
    """The image decoded on its own (the plain path), None when that refuses it."""
    try:
        return decode_v2(image, (CHANNEL,)).data[CHANNEL]
    except DecodeError:
        return None


#: the codecs a batch may go through: DECTRIS' decoder when installed, bitshuffle without it
DECODERS = ["bitshuffle"] + (["dectris"] if compression.BSLZ4_DECODER == "dectris" else [])


@settings(max_examples=80, deadline=None)
@given(job=_jobs(), saturation=st.sampled_from([None, 3, 40]), decoder=st.sampled_from(DECODERS))
def test_a_job_decodes_exactly_as_each_image_alone(job: tuple, saturation: int | None, decoder: str) -> None:
    with mock.patch.object(compression, "BSLZ4_DECODER", decoder):
        _job_as_alone(job, saturation)


def _job_as_alone(job: tuple, saturation: int | None) -> None:
    payloads, shape, dtype, _ = job
    images = [_image(i, p, shape, dtype) for i, p in enumerate(payloads)]
    alone = [_alone(im) for im in images]
    good = [i for i, a in enumerate(alone) if a is not None]
    if saturation is None and dtype == np.uint32:  # (sums of 2×2 uint32 counts need a bound)
        saturation = 2**29
    reducer = FrameReducer.build(shape, dtype, crop=min(shape), bin=2, saturation_value=saturation)
    for binned in (reducer, None):
        batch = decode_job(images, CHANNEL, binned)
        assert batch.image_ids.tolist() == good
        assert len(batch.errors) == len(images) - len(good)
        assert batch.raw == [spool_chunk(payloads[i], int(np.prod(shape)) * dtype.itemsize) for i in good]
        if binned is None:
            if good:
                assert batch.frames.dtype == dtype
                np.testing.assert_array_equal(batch.frames, np.stack([alone[i] for i in good]))
            continue
        for row, i in enumerate(good):
            counts, saturated = reducer.reduce_frame(alone[i])
            assert batch.counts.dtype == counts.dtype
            assert batch.counts[row].tobytes() == counts.tobytes()
            assert bool(batch.saturated[row]) == saturated
        # the job's peak (the engine's narrow store trusts it): not below any count, exact past a byte
        true = int(batch.counts.max()) if len(good) else 0
        assert batch.peak >= true and (batch.peak <= 255) == (true <= 255)


@settings(max_examples=80, deadline=None)
@given(job=_jobs(), decoder=st.sampled_from(DECODERS))
def test_the_plan_never_takes_a_payload_the_plain_path_refuses(job: tuple, decoder: str) -> None:
    """What the vectorised framing check lets into a batch, the one-frame check accepts, and a
    batch decodes to the frames one by one give (or fails, when one of them does)."""
    with mock.patch.object(compression, "BSLZ4_DECODER", decoder):
        _plan_as_alone(job)


def _plan_as_alone(job: tuple) -> None:
    payloads, shape, dtype, _ = job
    ok, block = bslz4_batch_plan(payloads, dtype, shape)
    assert ok.shape == (len(payloads),)
    together = [payloads[i] for i in np.flatnonzero(ok)]
    singles = []
    for p in together:
        try:
            singles.append(bslz4_array(p, dtype, shape))
        except DecodeError as exc:  # only an LZ4 block that will not decode: the framing was whole
            assert "corrupt" in str(exc), exc
            singles.append(None)
    if not together:
        return
    if any(s is None for s in singles):
        with pytest.raises(DecodeError):
            bslz4_batch(together, dtype, shape, block)
        return
    stack = bslz4_batch(together, dtype, shape, block)
    assert stack.shape == (len(together), *shape) and stack.dtype == dtype
    assert stack.tobytes() == np.stack(singles).tobytes()


@pytest.mark.parametrize("decoder", DECODERS)
def test_whole_frames_of_a_detector_go_together(decoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """192×192 uint16 (nine 8 KiB blocks), as an ARINA sends them: all in the batch plan, and a
    flagged pixel or a dense frame changes nothing."""
    monkeypatch.setattr(compression, "BSLZ4_DECODER", decoder)
    rng = np.random.default_rng(3)
    frames = rng.poisson(0.5, (40, 192, 192)).astype(np.uint16)
    frames[5] = rng.poisson(300, (192, 192)).astype(np.uint16)
    frames[7, 3, 4] = 65535
    payloads = [compression.bslz4_compress(f) for f in frames]
    ok, block = bslz4_batch_plan(payloads, frames.dtype, (192, 192))
    assert ok.all() and block == 8192
    np.testing.assert_array_equal(bslz4_batch(payloads, frames.dtype, (192, 192), block), frames)
    reducer = FrameReducer.build((192, 192), np.uint16, bin=2)
    batch = decode_job([_image(i, p, (192, 192), frames.dtype) for i, p in enumerate(payloads)], CHANNEL, reducer)
    expected, saturated = reducer.reduce_batch(frames)
    np.testing.assert_array_equal(batch.counts, expected)
    assert batch.saturated.tolist() == saturated.tolist() and saturated[7]


def test_a_jobs_results_are_its_own() -> None:
    """Jobs reuse their thread's work arrays: a result is never one of them, so a later job (in
    this thread or another) leaves it as it was."""
    rng = np.random.default_rng(4)
    reducer = FrameReducer.build((64, 64), np.uint16, bin=2)

    def job(seed: int) -> tuple:
        frames = np.random.default_rng(seed).poisson(2.0, (SUB_BATCH + 3, 64, 64)).astype(np.uint16)
        images = [_image(i, compression.bslz4_compress(f), (64, 64), frames.dtype) for i, f in enumerate(frames)]
        return frames, decode_job(images, CHANNEL, reducer), decode_job(images[:2], CHANNEL, None)

    frames, first, unbinned = job(int(rng.integers(1 << 16)))
    counts, kept = first.counts.copy(), unbinned.frames.copy()
    job(1)
    other = threading.Thread(target=job, args=(2,))
    other.start()
    other.join()
    np.testing.assert_array_equal(first.counts, counts)
    np.testing.assert_array_equal(first.counts, reducer.reduce_batch(frames)[0])
    np.testing.assert_array_equal(unbinned.frames, kept)
