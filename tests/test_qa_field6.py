"""Second-wave QA of the merges of 2026-12-07 13:30-14:05 (fieldqa6, ingest16).

* spool.open_for_writing: a program holding a spool open for WRITING (HDF5's exclusive lock:
  an operator's ``h5py.File(path, "r+")``) was taken for a reader, and the daemon opened the file
  without the lock beside it: two writers, and the frames of the scan came back unreadable
  ("filter returned failure during read"). A writer now refuses the daemon's open by name
  (SpoolInUse; finish_scan: rule ``spool_in_use``), and while the daemon writes a file beside a
  reader, a writer that comes later is refused too (the daemon holds a shared lock). Even a
  writer that writes nothing garbles it: its close writes back the file's end address as it knew
  it ("addr overflow ... eoa"). The final-status mark of a closed spool (finish_result,
  _mark_spool) was written the same way: beside such a writer the status attribute came back
  unreadable ("len not positive after adjustment for EOA"); it is now not written then (logged).
* rejected-message log (ErrorLogLimiter, kinds by rule): another scan's rejection under a rule
  a flood had logged already (a sender streaming on to its refused scan) was only counted, its
  scan never named in the log; kinds are now (rule, scan), at most 16 a window, the rest counted
  as one. The limiter's flush iterated its kinds unguarded: a kind added meanwhile (another
  thread, or a log handler) raised "dictionary changed size during iteration".
* config: a file saved with a UTF-8 byte-order mark (Windows editors) was "not valid TOML:
  Invalid statement (at line 1, column 1)"; it is read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.storage.spool import SpoolInUse, SpoolWriter, journal_path, read_spool
from spool_support import (
    aborted_scan_on_a_daemon,
    held_open,
    scan_ended,
    scan_state,
    small_spool,
    try_open,
)


@pytest.mark.parametrize("mode", ["r+", "a"])
@pytest.mark.parametrize("status", ["open", "aborted"])
def test_a_spool_another_program_holds_for_writing_is_not_written_beside_it(tmp_path: Path, status: str,
                                                                           mode: str) -> None:
    """open: a recovered or waiting scan's spool (journal ending "closed"); aborted: finish_scan's.
    Before: the open case logged "opened for writing without HDF5's file lock" and appended;
    the operator's close then left the frames unreadable; the aborted case raised a bare
    BlockingIOError (an internal error)."""
    path = small_spool(tmp_path, "w", status)
    jpath = journal_path(path)
    journal_before = jpath.read_bytes() if jpath.exists() else None
    with held_open(path, mode):
        with pytest.raises(SpoolInUse, match="open for writing in another program"):
            SpoolWriter.reopen(path)
        assert (jpath.read_bytes() if jpath.exists() else None) == journal_before
    got = read_spool(path)
    np.testing.assert_array_equal(got.indices, np.arange(5))
    assert (got.frames == 7).all()
    w = SpoolWriter.reopen(path)  # the writer is gone: re-opened as ever
    w.append(np.full((3, 16, 16), 9, np.uint16), np.arange(5, 8), np.zeros((3, 2)))
    w.close()
    got = read_spool(path)
    np.testing.assert_array_equal(got.indices, np.arange(8))
    assert (got.frames[:5] == 7).all() and (got.frames[5:] == 9).all()


def test_cancelling_a_refining_scan_while_an_operator_holds_its_spool_for_writing_is_not_marked_silently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The scan ended (its spool closed, "ended"), then is cancelled while it refines: the mark
    "aborted" (ScanManager._mark_spool). Before: written beside the operator's "r+" handle, whose
    close undid it (here) or left the attribute unreadable (spool.mark_status), the journal
    deleted all the same. Now: not written, said so, the journal kept (the next start recovers it)."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.errors import ControlError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=4, m=32, counts=20)
    cfg = loopback_config(tmp_path, refine_time_budget_s=600, drain_timeout_s=0,
                          options={"iterations": 1000000, "prior": "sparse", "denoise_every": 1})
    bg = BackgroundService(cfg)
    svc = bg.service
    path = cfg.spool_dir / "refining.spool.h5"
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p:
                p.start_scan(**scan.start_fields("refining"))
                p.send_frames(scan.frames)
                p.end_scan()

            def state() -> str:
                return next(s for s in ctl.list_scans() if s["scan_id"] == "refining")["state"]

            wait_for(lambda: state() == "refining", 120, "the scan to refine")
            # its spool is closed once its end was read (the daemon's HDF5 lock let go of)
            wait_for(lambda: try_open(path, "r") == "open", 60, "the ended scan's spool to be closed")
            with held_open(path, "r+"):
                ctl.cancel("refining", reason="wrong sample")
                wait_for(lambda: state() == "aborted", 60, "the scan to be aborted")
                # the mark runs on the closer thread after the cancel; finish_scan's re-open waits
                # for it (one FIFO closer), then finds the file held: its answer comes after the mark
                with pytest.raises(ControlError):
                    ctl.finish_scan("refining")
            got = read_spool(path)
            assert len(got.indices) == len(scan.frames)
            with h5py.File(path, "r") as f:
                status = f.attrs["status"]
            # before: the journal deleted as if marked, the file still "ended", nothing said
            refused = [r for r in caplog.records if "spool not marked aborted" in r.getMessage()]
            assert status == "aborted" or (refused and journal_path(path).exists()), (status, refused)
    finally:
        bg.stop()


def test_while_the_daemon_writes_beside_a_reader_a_writer_is_refused_and_readers_are_not(tmp_path: Path) -> None:
    path = small_spool(tmp_path, "r", "open")
    with held_open(path, "r"):
        w = SpoolWriter.reopen(path)  # beside the reader: without HDF5's lock
    try:
        for i in range(5, 40):
            w.append(np.full((1, 16, 16), i, np.uint16), np.array([i]), np.zeros((1, 2)))
        assert try_open(path, "r+") == "refused"  # before: opened, and it wrote the file too
        assert try_open(path, "r") == "open"  # a reader still may (the file may change under it)
    finally:
        w.close()
    got = read_spool(path)
    np.testing.assert_array_equal(got.indices, np.arange(40))
    np.testing.assert_array_equal(got.frames[:, 0, 0], [7] * 5 + list(range(5, 40)))
    assert try_open(path, "r+") == "open"  # closed: the lock went with the file
    with h5py.File(path, "r") as f:
        assert f.attrs["operator_note"] == "looked at it"


def test_finish_scan_while_an_operator_writes_the_spool_is_refused_by_name_then_works(tmp_path: Path) -> None:
    from cryoptycho.protocols.errors import ControlError

    with aborted_scan_on_a_daemon(tmp_path) as (ctl, path):
        with held_open(path, "r+"):
            with pytest.raises(ControlError) as info:
                ctl.finish_scan("held")
            assert info.value.reply.result["rule"] == "spool_in_use" and "held.spool.h5" in info.value.msg
            assert scan_state(ctl, "held") == "aborted"
        assert ctl.finish_scan("held")["scan_id"] == "held"
        done = scan_ended(ctl, "held")
        assert done["state"] == "finished" and done["frames"]["received"] == 10, done


def test_another_scans_rejection_under_a_flooded_rule_is_named_in_the_log(tmp_path: Path) -> None:
    """Before: "ghost" flooded rule known_scan; "second"'s one rejection, between two halves of
    the flood, was folded into ghost's count and its scan id appeared in no log line."""
    import zmq
    from cryoptycho.protocols.messages import Frames, encode
    from daemon_support import metrics_of, start_daemon, wait_for

    daemon = start_daemon(tmp_path)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(daemon.ingest)
    frame = np.zeros((1, 32, 32), np.uint16)
    sent = 0
    try:
        for scan_id, n in (("ghost", 100), ("second", 1), ("ghost", 100)):
            for _ in range(n):
                push.send_multipart(encode(Frames(scan_id, np.array([sent], np.uint32), frame, None, "none", 0.0)))
                sent += 1
        wait_for(lambda: metrics_of(daemon).get("cryoptycho_messages_rejected_total{rule=known_scan}", 0) >= sent,
                 120, "the daemon to reject every message", daemon)
    finally:
        push.close(linger=0)
        assert daemon.stop() == 0, daemon.log()
    lines = [line for line in daemon.log_lines if "rejected message" in line]
    assert any("second" in line for line in lines), lines
    assert len(lines) <= 10, lines  # still no flood


def _limiter(max_kinds: int | None = None):
    import logging

    from cryoptycho.protocols.dectris.receiver import ErrorLogLimiter

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(f"test_qa_field6.limiter.{id(records)}")
    logger.propagate = False
    logger.addHandler(Keep())
    if max_kinds is None:
        return ErrorLogLimiter(logger, "rejected", 30.0), records, logger
    key = lambda exc: str(exc).split()[0]  # the scan id, as the service's (rule, scan)
    return ErrorLogLimiter(logger, "rejected", 30.0, key=key, max_kinds=max_kinds), records, logger


def _accounted(records) -> int:
    """The errors a log accounts for: one per line in full, N per "N more like it" line."""
    return sum(getattr(r, "repeats", 1) for r in records)


def test_a_sender_inventing_scan_ids_is_logged_in_bounded_lines_each_one_accounted_for() -> None:
    limiter, records, _ = _limiter(max_kinds=16)
    for i in range(1000):
        limiter(ValueError(f"scan-{i} unknown"))
    limiter.flush(force=True)
    assert len(records) <= 16 + 1 + 1, len(records)  # 16 kinds in full, "other" in full and counted
    assert _accounted(records) == 1000


def test_the_limiters_flush_tolerates_a_kind_added_while_it_logs() -> None:
    """A kind added while flush walks the kinds (another thread's rejection; here, a log handler
    reporting one, which makes the moment deterministic)."""
    import logging

    limiter, records, logger = _limiter()

    class Reporter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "repeats", None):
                limiter(KeyError("one of another kind"))

    logger.addHandler(Reporter())
    limiter(ValueError("first"))
    limiter(ValueError("second"))
    limiter.flush(force=True)  # before: RuntimeError: dictionary changed size during iteration
    assert _accounted(records) == 3


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM. Before: "not valid TOML: Invalid statement (at line
    1, column 1)", naming nothing an operator could find in the file."""
    from cryoptycho.daemon.config import ConfigError, load_config

    path = tmp_path / "cryoptycho.toml"
    path.write_bytes("\ufeff[cryoptycho]\nspool_dir = \"/tmp/spöol\"\n[options]\niterations = 7\n".encode())
    cfg = load_config(path)
    assert str(cfg.spool_dir) == "/tmp/spöol" and cfg.options.iterations == 7
    path.write_bytes(b"\xef\xbb\xbfspool_dir = \"caf\xe9\"\n")  # a BOM, then Latin-1: still named
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_a_second_daemon_on_the_same_spool_directory_is_refused_however_it_is_named(tmp_path: Path) -> None:
    """The spool's only writer is what lets the daemon open a spool without HDF5's lock beside a
    reader (spool.open_for_writing): a second daemon on the directory — named another way
    too — must not start. (Checked, no defect: a guard, no test covered the lock.)"""
    import os

    from daemon_support import start_daemon

    first = start_daemon(tmp_path)
    try:
        (tmp_path / "other").mkdir()
        os.symlink(tmp_path / "spool", tmp_path / "link")
        for spool in (tmp_path / "spool", tmp_path / "other" / ".." / "spool", tmp_path / "link"):
            cmd = [sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                   "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                   "--spool-dir", str(spool), "--results-dir", str(tmp_path / "results2")]
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            assert second.returncode != 0 and "in use by another daemon" in second.stderr, (spool, second.stderr)
    finally:
        assert first.stop() == 0, first.log()


def _binning_reference(images: np.ndarray, reducer, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and validity of a FrameReducer, computed plainly in int64 from its geometry."""
    n, (h, w) = images.shape[0], images.shape[1:]
    c, b, m = reducer.window, reducer.bin, reducer.frame_side
    ys, xs = np.arange(c) + reducer.corner[0], np.arange(c) + reducer.corner[1]
    oky, okx = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
    window = np.zeros((n, c, c), np.int64)
    window[:, np.flatnonzero(oky)[:, None], np.flatnonzero(okx)[None, :]] = images[:, ys[oky]][:, :, xs[okx]]
    window *= reducer.window_valid
    over = (window > top).reshape(n, m, b, m, b).any(axis=(2, 4))
    counts = np.minimum(window, top).reshape(n, m, b, m, b).sum(axis=(2, 4))
    return counts, reducer.static_valid[None] & ~over


def test_binning_matches_a_plain_reference_at_the_lane_edges() -> None:
    """ccc4d0c's 16-bit-lane paths (_pairs_in_lanes, quad ≤ 2¹⁴ − 1) and the rest, against a
    plain int64 sum: every dtype, bins 1–4, odd detector sides, windows off the detector, masks,
    saturation values at and around 2¹⁴, 2¹⁵, 255/256, and frames whose largest count is such an
    edge (blocks whole at it). (Checked, no defect; a guard: fails with either lane limit one
    higher, _QUAD_PEAK 2¹⁴ or _PAIR_PEAK 2¹⁵.)"""
    from cryoptycho.protocols.dectris.binning import FrameReducer, saturation_threshold
    from cryoptycho.protocols.limits import MIN_FRAME_SIDE

    rng = np.random.default_rng(6)
    checked = 0
    for _ in range(300):
        # 2×2 of uint16 in 16-bit lanes (the fast paths): a third of the cases
        lanes = rng.random() < 0.35
        dtype = np.dtype("uint16" if lanes else rng.choice(["uint8", "uint16", "uint32"]))
        b = 2 if lanes else int(rng.integers(1, 5))
        m = int(rng.integers(MIN_FRAME_SIDE, MIN_FRAME_SIDE + 5))
        crop = m * b
        h, w = (int(rng.integers(max(4, crop - 9), crop + 10)) for _ in range(2))
        most = int(np.iinfo(dtype).max)
        sat = rng.choice([None, 1, 255, 0x3FFF, 0x4000, 0x7FFF, 0x8000, most - 1, int(rng.integers(1, most))])
        sat = None if sat is None or int(sat) > most else int(sat)
        if lanes:
            sat = rng.choice([None, 0x7FFF, 0x8000, 0xFFFE])
        bad = rng.random((h, w)) < rng.choice([0.0, 0.0, 0.01, 0.3])
        centre = None if rng.random() < 0.3 else (float(rng.uniform(-5, h + 5)), float(rng.uniform(-5, w + 5)))
        try:
            reducer = FrameReducer.build((h, w), dtype, beam_center_px=centre, crop=crop, bin=b, bad_pixels=bad,
                                         saturation_value=sat)
        except ValueError:  # (a window the geometry refuses)
            continue
        top = saturation_threshold(dtype, reducer.saturation_value)
        edges = [v for v in (0, 1, 255, 256, 0x3FFF, 0x4000, 0x7FFF, 0x8000, top, top + 1, most) if v <= most]
        n = int(rng.integers(1, 4))
        kind = 3 if lanes else rng.integers(0, 4)
        if kind == 3:  # blocks whole at one edge, the largest count: each lane path at its limit
            peak = int(rng.choice([v for v in (0x3FFF, 0x4000, 0x7FFF, 0x8000) if v <= top] if lanes else edges))
            images = np.where(rng.random((n, h, w)) < 0.8, peak, rng.integers(0, peak, size=(n, h, w),
                                                                            endpoint=True)).astype(dtype)
        elif kind == 0:
            images = rng.choice(edges, size=(n, h, w)).astype(dtype)
        elif kind == 1:
            high = int(rng.choice([v for v in edges if v > 0]))
            images = rng.integers(0, high, size=(n, h, w), dtype=np.uint64, endpoint=True).astype(dtype)
        else:  # sparse, one pixel at an edge
            images = rng.integers(0, 3, size=(n, h, w)).astype(dtype)
            images.flat[rng.integers(0, images.size)] = rng.choice(edges)
        counts, valid = _binning_reference(images, reducer, top)
        got, got_valid = reducer(images)
        assert got.dtype == reducer.out_dtype
        np.testing.assert_array_equal(got.astype(np.int64), counts)
        np.testing.assert_array_equal(got_valid, valid)
        batch, saturated = reducer.reduce_batch(images.copy())
        np.testing.assert_array_equal(batch.astype(np.int64), counts)
        np.testing.assert_array_equal(saturated, (reducer.static_valid[None] & ~valid).any(axis=(1, 2)))
        for k in range(n):
            one, hit = reducer.reduce_frame(images[k])
            np.testing.assert_array_equal(one.astype(np.int64), counts[k])
            assert hit == bool((reducer.static_valid & ~valid[k]).any())
        checked += 1
    assert checked > 200
