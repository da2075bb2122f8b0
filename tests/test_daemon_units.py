"""Unit tests of the daemon's parts that need no running service."""

from __future__ import annotations

import socket

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.config import ConfigError, load_config
from cryoptycho.daemon.notify import SystemdNotifier
from cryoptycho.daemon.publisher import Outbox
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.session import FrameLedger, Session, State, TransitionError
from cryoptycho.daemon.storage.spool import (
    DATA,
    SpoolWriter,
    read_spool,
    spool_path,
    unfinished_spools,
)
from cryoptycho.gpu.probes import scale_probe


# -- configuration -------------------------------------------------------------------------------
def test_config_precedence_default_env_file_cli(tmp_path, monkeypatch):
    assert load_config().max_concurrent_scans == 2  # default
    monkeypatch.setenv("CRYOPTYCHO_MAX_CONCURRENT_SCANS", "3")
    monkeypatch.setenv("CRYOPTYCHO_PREVIEW_HZ", "7")
    monkeypatch.setenv("CRYOPTYCHO_OPTIONS__ITERATIONS", "11")
    cfg = load_config()
    assert (cfg.max_concurrent_scans, cfg.preview_hz, cfg.options.iterations) == (3, 7.0, 11)
    toml = tmp_path / "c.toml"
    toml.write_text('max_concurrent_scans = 4\n[options]\nseed = 5\n')
    cfg = load_config(toml)
    assert (cfg.max_concurrent_scans, cfg.preview_hz) == (4, 7.0)  # file beats env; env kept
    assert (cfg.options.iterations, cfg.options.seed) == (11, 5)  # nested: env below file
    cfg = load_config(toml, {"max_concurrent_scans": 6, "preview_hz": None})
    assert (cfg.max_concurrent_scans, cfg.preview_hz) == (6, 7.0)  # CLI beats file; None = unset


def test_config_errors_name_the_key_and_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_concurent_scans = 4\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*unknown key 'max_concurent_scans'"):
        load_config(bad)
    bad.write_text("[options]\nbogus = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'options\.bogus'"):
        load_config(bad)
    bad.write_text("preview_hz = -1\n")
    with pytest.raises(ConfigError, match="preview_hz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="ZeroMQ endpoint"):
        load_config(overrides={"ingest": "localhost:5600"})
    monkeypatch.setenv("CRYOPTYCHO_OPTIONS__ITERATIONS", "many")
    with pytest.raises(ConfigError, match="ITERATIONS"):
        load_config(overrides={"options": {"seed": 1}})


# -- sessions ------------------------------------------------------------------------------------
def test_ledger_counts_duplicates_reordering_and_gaps():
    ledger = FrameLedger(expected=10)
    keep = ledger.admit(np.array([0, 1, 2, 2]))  # a duplicate inside one message
    assert keep.tolist() == [True, True, True, False]
    assert ledger.admit(np.array([5, 3, 1])).tolist() == [True, True, False]
    assert ledger.admit(np.array([2000])).tolist() == [True]  # beyond the table: it grows
    assert ledger.as_dict()["received"] == 0  # admitted, not yet on disk: not received
    ledger.stored(6)
    d = ledger.as_dict()
    assert d == {"received": 6, "duplicates": 2, "reordered": 1, "gaps": 5, "highest_index": 2000}
    assert ledger.missing() == [4, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="non-negative"):
        ledger.admit(np.array([-1]))


def _spec(scan_id: str = "s1", m: int = 8) -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(m, m), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((m, m), np.complex64), expected_frames=20,
                    extent_m=((0.0, 1e-9), (0.0, 2e-9)), options={"iterations": 3}, metadata={"who": "t"})


def test_session_state_machine():
    s = Session(_spec(), {"host": 1})
    s.transition(State.ACQUIRING)
    with pytest.raises(TransitionError, match="acquiring to finished"):
        s.transition(State.FINISHED)
    s.transition(State.REFINING)
    assert s.transition(State.FAILED, error="boom")
    assert not s.transition(State.ABORTED)  # final states are final
    assert s.summary()["state"] == "failed" and s.summary()["error"] == "boom"


# -- spool ---------------------------------------------------------------------------------------
def test_spool_round_trip_cxi_layout_and_uncommitted_rows(tmp_path):
    spec = _spec()
    w = SpoolWriter.create(tmp_path, spec, journal_only=False)  # (rows written as they come: the crash below)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 50, (12, 8, 8)).astype(np.uint16)
    pos = rng.normal(size=(12, 2)) * 1e-9
    w.append(frames[:7], np.arange(7), pos[:7])
    w.append(frames[7:], np.arange(7, 12)[::-1], pos[7:])
    # a crash in the middle of an append: rows written, count not yet committed
    w._data.resize(15, axis=0)
    w._data[12:] = 999
    w.close()
    got = read_spool(spool_path(tmp_path, "s1"))
    assert got.status == "open" and got.spec.options == {"iterations": 3} and got.spec.metadata == {"who": "t"}
    np.testing.assert_array_equal(got.frames, frames)
    np.testing.assert_array_equal(got.indices, np.r_[np.arange(7), np.arange(7, 12)[::-1]])
    np.testing.assert_allclose(got.positions_m, pos)
    with h5py.File(spool_path(tmp_path, "s1")) as f:
        assert f["entry_1/definition"][()] == b"NXcxi_ptycho"
        np.testing.assert_allclose(f["entry_1/sample_1/geometry_1/translation"][:, :2], pos[:, ::-1])
        assert f["entry_1/instrument_1/detector_1/data"].shape == (15, 8, 8)  # same dataset (hard link)
        assert f[DATA]["data"].id.get_create_plist().get_filter(0)[0] == 32008  # bitshuffle(-LZ4)
    assert unfinished_spools(tmp_path) == [spool_path(tmp_path, "s1")]
    w = SpoolWriter.reopen(spool_path(tmp_path, "s1"))  # recovery drops the uncommitted rows
    assert w.count == 12 and w.read()[0].shape == (12, 8, 8)
    w.set_status("finished")
    w.close()
    assert unfinished_spools(tmp_path) == []
    with pytest.raises(FileExistsError):
        SpoolWriter.create(tmp_path, spec)
    with pytest.raises(ValueError, match="scan_id"):
        spool_path(tmp_path, "../evil")


def test_replay_reads_spool_files(tmp_path):
    from cryoptycho.daemon.replay import read_source

    w = SpoolWriter.create(tmp_path, _spec("rep"))
    frames = np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8)
    w.append(frames, np.array([2, 0, 1]), np.array([[2.0, 0], [0, 0], [1, 0]]) * 1e-10)
    w.close()
    src = read_source(spool_path(tmp_path, "rep"))
    assert src.start.scan_id == "rep" and src.start.expected_frames == 3
    np.testing.assert_array_equal(src.frames, frames[[1, 2, 0]])  # back in frame-index order
    np.testing.assert_allclose(src.positions_m[:, 0], [0, 1e-10, 2e-10])


# -- publisher hand-over, notify, probe power ------------------------------------------------------
def test_outbox_keeps_events_and_only_the_latest_preview():
    box = Outbox()
    box.post("scan.accepted", {"scan_id": "a"})
    for i in range(5):
        box.offer("a", "preview", {"i": i})
    box.offer("b", "preview", {"i": 9})
    box.post("scan.ended", {"scan_id": "a"})
    assert socket.socket(fileno=socket.dup(box.fd)).recv(1, socket.MSG_PEEK)  # readable: wakes poll
    got = box.take()
    # in the order they were posted, the replaced previews left out: a preview offered before
    # "ended" is published before it (the viewer took the last metrics' "refining", published
    # after "finished", as the scan's state)
    assert [(t, p.get("i")) for t, p in got] == [("scan.accepted", None), ("preview", 4), ("preview", 9),
                                                 ("scan.ended", None)]
    assert box.replaced == 4
    box.offer("a", "metrics", {"state": "refining"})
    box.post("scan.finished", {"scan_id": "a"})
    box.offer("b", "preview", {"i": 10})
    assert [t for t, _ in box.take()] == ["metrics", "scan.finished", "preview"]
    assert box.take() == []
    box.close()
    # a worker that outlived the shutdown's join exits after the close: its wake is a no-op
    # (it raised EBADF in the worker thread, or wrote into whatever reused the fd)
    box.post("scan.aborted", {"scan_id": "late"})
    box.wake()


def test_systemd_notify_datagrams(tmp_path, monkeypatch):
    addr = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(addr)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = SystemdNotifier()
    assert n.enabled and n.watchdog_interval_s == 1.0
    n.ready("up")
    n.watchdog()
    n.watchdog()  # within the interval: not sent again
    n.stopping()
    server.settimeout(1)
    got = [server.recv(100) for _ in range(3)]
    assert got == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STOPPING=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert SystemdNotifier().notify("READY=1") is False  # not under systemd: a no-op


def test_model_probe_scaled_to_the_measured_counts():
    probe = np.zeros((16, 16), np.complex64)
    probe[6:10, 6:10] = 1
    frames = np.full((4, 16, 16), 3, np.uint16)
    scaled = scale_probe(probe, frames, None)
    assert np.isclose((np.abs(scaled) ** 2).sum(), 3 * 256, rtol=1e-5)
    mask = np.ones((16, 16), bool)
    mask[0] = False  # a masked detector row: the target counts only the valid pixels' share
    far = np.abs(np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))) ** 2
    share = far[mask].sum() / far.sum()
    scaled = scale_probe(probe, frames, mask)
    assert np.isclose((np.abs(scaled) ** 2).sum(), 3 * 240 / share, rtol=1e-5)



@pytest.mark.parametrize("dtype, value", [(np.uint8, 200), (np.uint16, 60_000), (np.uint32, 2**31 + 7),
                                          (np.int32, 5), (np.float32, 2.5)])
def test_model_probe_counts_every_frame_exactly_in_its_own_kind(dtype, value):
    # the frames are summed per pixel before the mask: sums beyond the frames' own dtype
    # (4 × 2³¹ in uint32) must not wrap, and the masked pixels must not count
    probe = np.zeros((16, 16), np.complex64)
    probe[6:10, 6:10] = 1
    frames = np.full((4, 16, 16), value, dtype)
    frames[:, 0] = np.array(value // 2 if np.dtype(dtype).kind in "ui" else value / 2, dtype)  # the masked row differs
    mask = np.ones((16, 16), bool)
    mask[0] = False
    far = np.abs(np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))) ** 2
    share = far[mask].sum() / far.sum()
    scaled = scale_probe(probe, frames, mask)
    assert np.isclose((np.abs(scaled) ** 2).sum(), float(value) * 240 / share, rtol=1e-5)

# -- typed live outputs --------------------------------------------------------------------------
def _recon_state(seed: int = 0):
    from cryoptycho.gpu.geometry import ScanGeometry
    from cryoptycho.gpu.state import ReconState

    rng = np.random.default_rng(seed)
    obj = (rng.uniform(0.5, 1.5, (12, 20)) * np.exp(1j * rng.uniform(-3, 3, (12, 20)))).astype(np.complex64)
    geometry = ScanGeometry(pixel_size=1.5e-10, origin=(-2e-10, 3e-10), object_shape=obj.shape, probe_shape=(8, 8))
    return ReconState(object=obj, probe=(1 + 1j) * np.ones((8, 8), np.complex64), geometry=geometry,
                      iteration=4, energy=300e3)


def test_worker_builds_typed_previews_and_results_that_go_on_the_wire_unchanged():
    from cryoptycho.daemon.publisher import preview_message, result_message, to_message
    from cryoptycho.protocols.messages import Preview, Result, decode, encode

    state = _recon_state()
    cov = np.arange(240, dtype=np.float64).reshape(12, 20)
    preview = preview_message("s1", state, 17, cov)
    assert isinstance(preview, Preview) and (preview.iteration, preview.frames_used) == (4, 17)
    assert preview.origin_m == (-2e-10, 3e-10) and preview.pixel_size_m == 1.5e-10
    np.testing.assert_allclose(preview.object_phase, np.angle(state.object), atol=1e-6)
    np.testing.assert_allclose(preview.object_amplitude, np.abs(state.object), rtol=1e-6)
    assert preview.coverage.dtype == np.float32 and preview.probe.dtype == np.complex64
    result = result_message("s1", state, np.zeros((5, 2)), {"result": "/x/s1.h5"}, float("nan"), 2e-10)
    assert isinstance(result, Result) and result.loss is None and result.metadata == {"resolution_m": 2e-10}
    for message in (preview, result):
        assert to_message(message.type, message) is message  # the manager thread only encodes
        back = decode(encode(message))
        assert type(back) is type(message) and back.scan_id == "s1"
    np.testing.assert_array_equal(decode(encode(preview)).object_phase, preview.object_phase)
    with pytest.raises(ValueError, match="posted typed"):
        to_message("preview", {"scan_id": "s1"})


def test_snapshot_serves_the_last_typed_preview():
    from types import SimpleNamespace

    from cryoptycho.daemon.handlers import build_table
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import preview_message

    session = Session(_spec(), {"host": 1})
    service = SimpleNamespace(scans=SimpleNamespace(sessions={"s1": session}), metrics=ServiceMetrics())
    snapshot = build_table(service)["snapshot"]
    assert "object" not in snapshot("s1")  # no preview yet: the summary only
    state = _recon_state(1)
    session.update_figures(last_preview=preview_message("s1", state, 9, np.ones((12, 20))))
    reply = snapshot("s1")
    assert reply["scan"]["scan_id"] == "s1" and reply["iteration"] == 4
    assert reply["object"].dtype == np.complex64
    np.testing.assert_allclose(reply["object"], state.object, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reply["probe"], state.probe)
    assert reply["origin_m"] == [-2e-10, 3e-10] and reply["pixel_size_m"] == 1.5e-10


def test_a_stated_source_size_reserves_the_memory_of_its_modes():
    """A coherent probe with a finite source runs as three incoherent modes (gpu/reconstruct.py
    source_modes_in_force); admission counted one, a third of the engine's far-field work."""
    from dataclasses import replace

    from cryoptycho.daemon.scans import ScanManager, estimate_bytes
    from cryoptycho.gpu.options import ReconOptions

    options = ReconOptions()
    coherent = _spec(m=64)
    with_source = replace(coherent, metadata={"source_size_m": 1e-10})
    point_source = replace(coherent, metadata={"source_size_m": 0.0})
    assert ScanManager._with_declared_modes(coherent, options).probe_modes == 1
    assert ScanManager._with_declared_modes(point_source, options).probe_modes == 1
    assert ScanManager._with_declared_modes(with_source, options).probe_modes == 3
    assert ScanManager._with_declared_modes(with_source, options.merged({"probe_modes": 5})).probe_modes == 5
    # the options' own size counts like a stated one
    given = options.merged({"source_size_m": 2e-10})
    assert ScanManager._with_declared_modes(coherent, given).probe_modes == 3
    one = estimate_bytes(coherent, ScanManager._with_declared_modes(coherent, options))
    three = estimate_bytes(with_source, ScanManager._with_declared_modes(with_source, options))
    assert three > one
