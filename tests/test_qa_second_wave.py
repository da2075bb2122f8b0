"""Second-wave QA of this session's new code: hostile detectors, racing control requests and
unlucky operators, each a defect found and fixed (the test failed before its fix)."""

from __future__ import annotations

import cbor2
from test_dectris_source import _ended, _frames, _run, _series, service  # noqa: F401 - its fixture


def test_an_image_id_beyond_64_bits_is_a_bad_image_not_a_failed_scan(service) -> None:  # noqa: F811
    """A V2 image whose id is a CBOR bignum (2**64): the decoding job raised OverflowError
    building its int64 ids, which failed the whole scan ("DECTRIS decoding failed:
    OverflowError: Python int too large to convert to C long") and lost the batch's good images."""
    frames = _frames(24, seed=1)
    messages = _series(frames, "direct-huge-id")
    images = messages[1:-1]
    msg = cbor2.loads(images[5][3:])
    msg["image_id"] = 2**64
    bad = images[5][:3] + cbor2.dumps(msg)
    _, stats = _run(service, [messages[0], *images[:5], bad, *images[6:], messages[-1]])
    assert stats.decode_errors == 1 and stats.frames_sent == 23
    session = _ended(service, "direct-huge-id-series1")
    assert session.ledger.as_dict()["received"] == 23
    assert session.error is None and service.thread.is_alive() and service.error is None
