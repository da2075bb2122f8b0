"""Second-wave QA of this session's new code: hostile detectors, racing control requests and
unlucky operators, each a defect found and fixed (the test failed before its fix)."""

from __future__ import annotations

import cbor2
import pytest
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


def test_finish_scan_reopens_an_aborted_scans_spool_after_its_stale_mark(tmp_path) -> None:
    """A running scan aborted: its spool is marked "aborted" on the spool-close thread
    (_after_close), behind whatever that thread is closing. A finish_scan re-opened the spool on
    the spool thread without waiting for that mark, which then wrote "aborted" over the
    re-opened scan's "ended" (a kill before its result then left it unrecovered)."""
    import threading

    import h5py
    from cryoptycho.daemon import scans as scans_module
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import spool_path
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=8, m=32)
    release, spool_thread_waits, marked = threading.Event(), threading.Event(), []
    real_mark, real_wait = scans_module.ScanManager._mark_spool, scans_module.ScanManager._wait_closed

    def gated_mark(self, scan_id: str, status: str) -> None:  # the closer busy until released
        assert release.wait(120), "the test never released the spool-close thread"
        with h5py.File(spool_path(self.config.spool_dir, scan_id), "r") as f:
            marked.append((str(f.attrs["status"]), status))
        real_mark(self, scan_id, status)

    def observed_wait(self, scan_id: str) -> None:
        pending = self._closing.get(scan_id)
        if pending is not None and not pending.is_set():
            spool_thread_waits.set()
        real_wait(self, scan_id)

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        resolution_interval_s=0, refine_time_budget_s=5, options={"iterations": 2})
    bg = BackgroundService(cfg)
    svc = bg.service
    scans_module.ScanManager._mark_spool, scans_module.ScanManager._wait_closed = gated_mark, observed_wait
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=60) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as producer):
            producer.start_scan(**scan.start_fields("a"))
            producer.send_frames(scan.frames)
            wait_for(lambda: ctl.status()["running"] == ["a"], 120, "the scan to run")
            producer.abort("operator stop")
            wait_for(lambda: any(s["scan_id"] == "a" and s["state"] == "aborted" for s in ctl.list_scans()),
                     120, "the scan to be aborted")
            answer: list = []
            asker = threading.Thread(target=lambda: answer.append(ctl.finish_scan("a")), daemon=True)
            asker.start()
            # the re-open answered without the mark (the defect), or waiting for it (fixed)
            wait_for(lambda: answer or spool_thread_waits.is_set(), 120, "the re-open to answer or wait")
            release.set()
            asker.join(120)
            assert answer and answer[0]["scan_id"] == "a", answer
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "a"
                                          and s["state"] in ("finished", "failed", "aborted")), None),
                            120, "the re-opened scan to end")
            assert info["state"] == "finished", info
        # the aborted scan's own status was marked, never the re-opened scan's "ended"
        assert marked == [("aborted", "aborted")], marked
    finally:
        release.set()
        scans_module.ScanManager._mark_spool, scans_module.ScanManager._wait_closed = real_mark, real_wait
        bg.stop()


def test_a_scan_cancelled_after_its_end_leaves_no_journal_the_stop_calls_recoverable(tmp_path) -> None:
    """A scan cancelled while it refines (after its scan_end): its spool, closed at the end with
    its journal kept, was marked "aborted" and the journal left beside it. At SIGTERM the daemon
    then listed it among the "unfinished spool files ... the next start rebuilds and recovers
    them", which the next start does not (it drops an aborted spool's journal)."""
    from cryoptycho.daemon.storage.journal import journal_path
    from cryoptycho.daemon.storage.spool import spool_path
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import start_daemon, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=8, m=32)
    # refines until cancelled
    daemon = start_daemon(tmp_path, "--set", "options.iterations=100000", "--set", "refine_time_budget_s=3600",
                          "--set", "resolution_interval_s=0")
    try:
        with (ControlClient(daemon.control, timeout_s=60) as ctl,
              Producer(daemon.ingest, control=daemon.control) as producer):
            producer.start_scan(**scan.start_fields("late-cancel"))
            producer.send_frames(scan.frames)
            assert producer.end_scan().acknowledged == len(scan.frames)
            wait_for(lambda: ctl.list_scans()[0]["state"] == "refining", 120, "the scan to refine", daemon)
            ctl.cancel("late-cancel", "operator")
            wait_for(lambda: ctl.list_scans()[0]["state"] == "aborted", 120, "the scan to be aborted", daemon)
        assert daemon.stop() == 0  # (the stop waits for the spool-close thread: the mark is done)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    spool = spool_path(tmp_path / "spool", "late-cancel")
    assert spool.exists() and not journal_path(spool).exists()  # its frames are kept, marked aborted
    assert "unfinished spool files" not in daemon.log() and "recovers them" not in daemon.log(), daemon.log()


def test_options_set_twice_and_a_kill_inside_the_second_record_give_the_first(tmp_path) -> None:
    """Held (no defect): a queued scan's options changed twice, the daemon killed while the
    second `options` record was written (torn): the rebuild drops the torn record (never
    answered) and keeps the first options and every frame; the re-opened spool goes on."""
    import shutil

    import numpy as np
    from cryoptycho.daemon.storage.journal import journal_path
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, repair_spool
    from test_spool_journal import _append, _spec

    frames = np.random.default_rng(5).poisson(0.5, (9, 24, 24)).astype(np.uint16)
    for journal_only in (True, False):
        live, killed = tmp_path / f"live{journal_only}", tmp_path / f"killed{journal_only}"
        killed.mkdir()
        w = SpoolWriter.create(live, _spec("twice"), journal_only=journal_only)
        _append(w, frames, 0, 5)
        w.set_options({"seed": 1})
        before = journal_path(w.path).stat().st_size
        w.set_options({"seed": 2})
        torn = (before + journal_path(w.path).stat().st_size) // 2
        for name in (w.path, journal_path(w.path)):  # the files as a kill left them
            shutil.copy(name, killed / name.name)
        w.close()
        path = killed / w.path.name
        with open(journal_path(path), "r+b") as f:
            f.truncate(torn)
        assert "cut short" in repair_spool(path)
        got = read_spool(path)
        assert got.spec.options == {"seed": 1} and got.indices.tolist() == list(range(5))
        again = SpoolWriter.reopen(path)
        _append(again, frames, 5, 9)
        again.set_options({"seed": 3})
        again.set_status("ended")
        again.close()
        got = read_spool(path)
        assert got.spec.options == {"seed": 3} and got.indices.tolist() == list(range(9))
        np.testing.assert_array_equal(got.frames, frames)


def _tagged(shape: str) -> bytes:
    import numpy as np
    from cryoptycho.protocols.dectris.decode import V2_MAGIC

    T = cbor2.CBORTag
    typed = T(69, np.arange(6, dtype="<u2").tobytes())  # uint16 little-endian, 2×3
    arr = T(40, [[2, 3], typed])
    msg = {"type": "image", "series_id": 7, "series_unique_id": "u", "image_id": 3, "data": {"c": arr}}
    if shape == "whole_message":
        msg = T(60001, msg)
    elif shape == "type":
        msg["type"] = T(60001, T(60002, "image"))
    elif shape == "data":
        msg["data"] = T(60001, {"c": arr})
    elif shape == "channel":
        msg["data"] = {"c": T(60001, T(60002, arr))}
    elif shape == "dims":
        msg["data"] = {"c": T(40, [T(60001, [2, 3]), typed])}
    elif shape == "typed_array":
        msg["data"] = {"c": T(40, [[2, 3], T(60001, typed)])}
    elif shape == "ids":
        msg["image_id"], msg["series_id"] = T(60001, 3), T(60002, 7)
    elif shape == "column_major":
        msg["data"] = {"c": T(1040, [[3, 2], typed])}
    return V2_MAGIC + cbor2.dumps(msg)


@pytest.mark.parametrize("shape", ["plain", "whole_message", "type", "data", "channel", "dims", "typed_array",
                                   "ids", "column_major"])
def test_unknown_tags_anywhere_in_an_image_give_the_same_image_on_both_decoding_paths(shape: str) -> None:
    """Held (no defect): unknown tags around the message, a field, the channel, the array's dims
    or its typed array, nested: the workers' image path (split_v2_image: hook-less load, then
    the checked reload) and decode_v2 read the same ids and pixels."""
    import numpy as np
    from cryoptycho.protocols.dectris.decode import decode_v2, split_v2_image

    raw = _tagged(shape)
    parts = split_v2_image(raw, None)
    image = decode_v2(raw)
    assert (parts.series_id, parts.series_unique_id, parts.image_id) == (7, "u", 3)
    assert (image.series_id, image.image_id) == (7, 3)
    want = np.arange(6, dtype=np.uint16).reshape(2, 3)
    if shape == "column_major":  # dims [3, 2] of column-major data: element (i, j) is data[i + 3 j]
        want = np.arange(6, dtype=np.uint16).reshape(3, 2, order="F")
    np.testing.assert_array_equal(parts.payload.array, want)
    np.testing.assert_array_equal(image.data["c"], want)


def test_a_bridge_series_without_a_number_of_images_rejects_an_id_beyond_64_bits_as_out_of_range() -> None:
    """A V1 ``header_detail none`` series (no number of images) whose scan has positions: an
    image id of 2**64 reached the new images-past-the-positions rule, whose int64 ids raised
    OverflowError; the bridge logged an "unexpected error" traceback and counted a series error.
    It is an id outside the series' range again (rule image_id_range), and the rest arrive."""
    import numpy as np
    from cryoptycho.protocols.dectris.bridge import BridgeConfig
    from cryoptycho.protocols.dectris.convert import SeriesConverter
    from cryoptycho.protocols.dectris.schema import Image, SeriesEnd, SeriesStart
    from cryoptycho.protocols.messages import Frames
    from test_dectris_source import ANGLE, CHANNEL, SIDE

    frames = _frames(8, seed=3)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 8], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": "huge"}}
    conv = SeriesConverter(BridgeConfig(crop=SIDE, bin=2, energy_eV=300e3, channel=CHANNEL))
    out = conv.feed(SeriesStart(version=1, series_id=5, channels=(CHANNEL,), image_shape=(SIDE, SIDE),
                                user_data=user))
    for i in (0, 1, 2**64, 2, 3, 4, 5, 6, 7):
        out += conv.feed(Image(1, 5, None, i, {CHANNEL: frames[i % 8]}))  # raised DectrisError at 2**64
    out += conv.feed(SeriesEnd(version=1, series_id=5)) + conv.flush(0)
    assert conv.tracker.rejected == {"image_id_range": 1}
    assert np.concatenate([m.indices for m in out if isinstance(m, Frames)]).tolist() == list(range(8))
