"""DECTRIS headers a facility really sends: uncalibrated values, X-ray settings, V2 translations,
a header_appendix scan id that stays set across series, a measured probe file. No header may stop
the converter; each skipped series, rejected scan and set-aside value is a named notice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.dectris.convert import BridgeConfig, SeriesConverter, SeriesNotice
from cryoptycho.protocols.dectris.decode import decode_v2
from cryoptycho.protocols.dectris.schema import DectrisError
from cryoptycho.protocols.dectris.sim import SimSeries, v2_messages
from cryoptycho.protocols.messages import Frames, ScanEnd, ScanStart
from scipy import constants

STEP = 2e-10
USER_SCAN = {"kind": "raster", "shape": [2, 3], "step_m": [STEP, STEP]}
PIXEL = 100e-6  #: the simulator's detector pixel


def _series(user: dict | None = None, frames: np.ndarray | None = None, **kw: Any) -> SimSeries:
    frames = np.random.default_rng(0).poisson(3, (6, 16, 16)).astype(np.uint16) if frames is None else frames
    return SimSeries(frames, user_data=None if user is None else {"cryoptycho": {"scan": USER_SCAN, **user}}, **kw)


def _run(series: list[SimSeries], config: BridgeConfig | None = None) -> tuple[list, list[SeriesNotice]]:
    notices: list[SeriesNotice] = []
    conv = SeriesConverter(config or BridgeConfig(), on_notice=notices.append)
    out: list = []
    for s in series:
        for raw in v2_messages(s):
            out += conv.feed(decode_v2(raw))
    return out, notices


def _starts(out: list) -> list[ScanStart]:
    return [m for m in out if isinstance(m, ScanStart)]


def test_detector_distance_zero_skips_the_series_with_a_named_notice_and_the_next_one_runs():
    # an uncalibrated DCU (and LiberTEM's mocked detector) sends detector_distance = 0: it used to
    # divide by zero and end the bridge
    bad = _series({}, detector_distance_m=0.0)
    good = _series({}, detector_distance_m=0.25, series_id=2, series_unique_id="01SECOND")
    out, notices = _run([bad, good])
    assert [(n.outcome, n.field, n.rule) for n in notices] == [
        ("warning", "detector_distance", "dectris_header_implausible"),
        ("skipped", "detector_distance", "dectris_series_skipped"),
    ]
    assert "detector_distance = 0" in notices[0].message and "camera_length_m" in notices[1].message
    (start,) = _starts(out)
    assert start.detector_pixel_angle_rad == pytest.approx(PIXEL / 0.25)
    assert start.metadata["series_id"] == 2 and sum(isinstance(m, ScanEnd) for m in out) == 1


def test_detector_distance_zero_is_harmless_when_the_config_gives_the_camera_length():
    out, notices = _run([_series({}, detector_distance_m=0.0)], BridgeConfig(camera_length_m=0.5))
    assert [n.outcome for n in notices] == ["warning"]
    (start,) = _starts(out)
    assert start.detector_pixel_angle_rad == pytest.approx(PIXEL / 0.5)
    assert start.metadata["detector_pixel_size_m"] == PIXEL  # travels to the files' NXdetector


def test_v2_detector_translation_gives_the_distance():
    out, notices = _run([_series({}, extra_start={"detector_translation": [0.0, 0.0, 0.4]})])
    assert notices == []
    assert _starts(out)[0].detector_pixel_angle_rad == pytest.approx(PIXEL / 0.4)
    out, notices = _run([_series({}, extra_start={"detector_translation": [0.01, 0.0, 0.0]})])
    assert [(n.outcome, n.field) for n in notices] == [("warning", "detector_translation"),
                                                       ("skipped", "detector_distance")]


def test_beam_centre_at_the_origin_is_set_aside_for_the_frame_centre():
    frames = np.zeros((6, 16, 16), np.uint16)
    frames[:, 8, 8] = 50  # the direct beam, at the frame centre
    cfg = BridgeConfig(crop=4)
    out, notices = _run([_series({}, frames=frames, detector_distance_m=0.2, beam_center_px=(0.0, 0.0))], cfg)
    assert [(n.outcome, n.field) for n in notices] == [("warning", "beam_center")]
    start = _starts(out)[0]
    assert start.metadata["window_corner_px"] == [6, 6]  # about (8, 8), not (0, 0)
    data = np.concatenate([m.data for m in out if isinstance(m, Frames)])
    assert data[:, 2, 2].min() == 50  # the beam sits in the middle of the cropped frames


def test_x_ray_energy_and_wavelength_are_not_taken_for_electrons():
    one_angstrom = {"incident_wavelength": 1.0}  # Å, Cu-Kα-ish: electrons of 150 eV
    out, notices = _run([_series({}, detector_distance_m=0.2, energy_ev=8040.0, extra_start=one_angstrom)])
    assert [(n.outcome, n.field) for n in notices] == [
        ("warning", "incident_energy"), ("warning", "incident_wavelength"), ("skipped", "incident_energy")]
    assert "X-ray" in notices[1].message and _starts(out) == []
    out, notices = _run([_series({}, detector_distance_m=0.2, energy_ev=8040.0, extra_start=one_angstrom)],
                        BridgeConfig(energy_eV=200e3))
    assert _starts(out)[0].energy_eV == 200e3 and [n.outcome for n in notices] == ["warning", "warning"]
    # an electron wavelength is used: 300 keV ↔ 1.9687 pm
    lam = 1.96875e-12
    out, notices = _run([_series({}, detector_distance_m=0.2, energy_ev=None,
                                 extra_start={"incident_wavelength": lam * 1e10})])
    assert notices == [] and _starts(out)[0].energy_eV == pytest.approx(300e3, rel=1e-3)


def test_an_unexpected_error_skips_only_its_series(monkeypatch):
    notices: list[SeriesNotice] = []
    conv = SeriesConverter(BridgeConfig(), on_notice=notices.append)

    def broken(*_: Any) -> None:
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(conv, "_plan", broken)
    out = [m for raw in v2_messages(_series({}, detector_distance_m=0.2)) for m in conv.feed(decode_v2(raw))]
    assert out == [] and [(n.outcome, n.field) for n in notices] == [("skipped", "internal")]
    assert "ZeroDivisionError" in notices[0].message
    monkeypatch.undo()
    out = [m for raw in v2_messages(_series({}, detector_distance_m=0.2, series_id=2, series_unique_id="B"))
           for m in conv.feed(decode_v2(raw))]
    assert len(_starts(out)) == 1


def test_a_wavelength_too_small_for_a_float_square_is_set_aside_and_the_series_runs():
    """1e-190 Å: the energy's (hc/λ)² raised OverflowError out of the header check, which ran
    outside the series' guard, and stopped `serve --source` and the bridge."""
    out, notices = _run([_series({}, detector_distance_m=0.2, energy_ev=300e3,
                                 extra_start={"incident_wavelength": 1e-190})])
    assert [(n.outcome, n.field) for n in notices] == [("warning", "incident_wavelength")]
    assert _starts(out)[0].energy_eV == 300e3


def test_a_header_check_that_fails_skips_only_its_series(monkeypatch):
    from cryoptycho.protocols.dectris import convert

    def broken(*_: Any) -> None:
        raise OverflowError("(34, 'Numerical result out of range')")

    notices: list[SeriesNotice] = []
    conv = SeriesConverter(BridgeConfig(), on_notice=notices.append)
    monkeypatch.setattr(convert, "check_header", broken)
    out = [m for raw in v2_messages(_series({}, detector_distance_m=0.2)) for m in conv.feed(decode_v2(raw))]
    assert out == [] and [(n.outcome, n.field) for n in notices] == [("skipped", "internal")]
    monkeypatch.undo()
    out = [m for raw in v2_messages(_series({}, detector_distance_m=0.2, series_id=2, series_unique_id="B"))
           for m in conv.feed(decode_v2(raw))]
    assert len(_starts(out)) == 1


def test_an_unexpected_error_on_one_image_is_a_dectris_error_for_that_image(monkeypatch):
    conv = SeriesConverter(BridgeConfig())
    start, first, second, *rest = [decode_v2(raw) for raw in v2_messages(_series({}, detector_distance_m=0.2))]
    conv.feed(start)
    conv.feed(first)
    real = conv._slot
    monkeypatch.setattr(conv, "_slot", lambda plan: (_ for _ in ()).throw(KeyError("slot")))
    with pytest.raises(DectrisError, match=r"image 1: KeyError"):
        conv.feed(second)
    monkeypatch.setattr(conv, "_slot", real)
    out = [m for msg in rest for m in conv.feed(msg)]
    assert isinstance(out[-1], ScanEnd)  # the series went on to its end


def test_a_header_appendix_scan_id_repeated_over_series_names_one_scan_per_series():
    user = {"scan_id": "grid3-sq12", "detector_pixel_angle_rad": 1e-3}
    series = [_series(user, series_id=i, series_unique_id=f"U{i}") for i in (7, 8)]
    series.append(_series(user, series_id=7, series_unique_id="AFTER-DCU-RESTART"))
    out, notices = _run(series)
    ids = [s.scan_id for s in _starts(out)]
    assert ids == ["grid3-sq12-series7", "grid3-sq12-series8", "grid3-sq12-series7-AFTER-DCU-RESTART"]
    assert all(s.metadata["user_scan_id"] == "grid3-sq12" for s in _starts(out)) and notices == []


def test_a_refused_scan_is_a_rejected_series():
    notices: list[SeriesNotice] = []
    conv = SeriesConverter(BridgeConfig(), on_notice=notices.append)
    msgs = [decode_v2(raw) for raw in v2_messages(_series({}, detector_distance_m=0.2))]
    out = conv.feed(msgs[0]) + conv.feed(msgs[1])
    scan_id = _starts(out)[0].scan_id
    conv.refused(scan_id, "positions_m", "positions beyond the field limit")
    assert [(n.outcome, n.rule, n.scan_id) for n in notices] == [("rejected", "dectris_series_rejected", scan_id)]
    assert conv.plan is None


# ------------------------------------------------------------------------------- probe file


def _lam(energy_eV: float) -> float:
    e = energy_eV * constants.e
    return constants.h * constants.c / np.sqrt(e * (2 * constants.m_e * constants.c**2 + e))


def test_a_measured_probe_file_is_used_and_scaled_to_the_counts(tmp_path):
    rng = np.random.default_rng(1)
    probe = (rng.normal(size=(16, 16)) + 1j * rng.normal(size=(16, 16))).astype(np.complex64)
    sampling = _lam(300e3) / (16 * PIXEL / 0.2)
    path = tmp_path / "probe.h5"
    with h5py.File(path, "w") as f:  # as a cryoptycho result or ptychodus product stores it
        f["probe"] = probe[None]
        f["probe"].attrs["pixel_width_m"] = sampling
    series = _series({}, detector_distance_m=0.2)
    out, notices = _run([series], BridgeConfig(probe_file=path))
    start = _starts(out)[0]
    assert notices == [] and start.probe_model is None and start.metadata["probe_file"] == str(path)
    first = next(iter(series.frames.values()))[0]
    assert (np.abs(start.probe) ** 2).sum() == pytest.approx(first.sum(), rel=1e-5)
    np.testing.assert_allclose(start.probe / np.abs(start.probe).max(), probe / np.abs(probe).max(), atol=1e-6)
    # a probe of other sampling skips the series, naming the file
    out, notices = _run([_series({}, detector_distance_m=0.4)], BridgeConfig(probe_file=path))
    assert _starts(out) == [] and [(n.outcome, n.field) for n in notices] == [("skipped", "probe_file")]


def test_crop_and_bin_giving_frames_below_2x2_are_refused_at_startup():
    with pytest.raises(ValueError, match=r"crop 2 and bin 2 give 1×1 frames; at least 2×2"):
        BridgeConfig(crop=2, bin=2)
    assert BridgeConfig(crop=4, bin=2).crop == 4


def test_every_check_of_the_smallest_frame_side_names_rule_min_frame_side():
    """A scan_start of 1×1 frames, a [dectris] crop and bin giving 1×1 (at config load, or at
    a series' first image when crop is the detector's side) and a max_frame_side limit below 2
    (which would refuse every scan) are refused with the same rule name; 2×2 passes them all."""
    from cryoptycho.protocols.dectris.binning import FrameReducer
    from cryoptycho.protocols.errors import ProtocolError
    from cryoptycho.protocols.limits import Limits, limits_with
    from cryoptycho.protocols.messages import ProbeModelSpec, ScanStart
    from cryoptycho.protocols.validate import check_scan_start

    def start(side: int) -> ScanStart:
        return ScanStart(scan_id="s", energy_eV=300e3, frame_shape=(side, side), frame_dtype="uint16",
                         expected_frames=2, pixel_size_m=1e-10, positions_m=np.zeros((2, 2)),
                         probe_model=ProbeModelSpec())

    with pytest.raises(ProtocolError) as err:
        check_scan_start(start(1), Limits())
    assert (err.value.field, err.value.rule) == ("frame_shape", "min_frame_side")
    check_scan_start(start(2), Limits())
    with pytest.raises(ValueError, match="rule min_frame_side"):
        BridgeConfig(crop=3, bin=2)
    with pytest.raises(ValueError, match="rule min_frame_side"):
        FrameReducer.build((3, 3), np.uint16, bin=3)
    assert FrameReducer.build((4, 4), np.uint16, bin=2).frame_side == 2
    with pytest.raises(ValueError, match="max_frame_side"):
        limits_with({"max_frame_side": 1})
    assert limits_with({"max_frame_side": 2}).max_frame_side == 2


def test_probe_file_errors_are_named_at_startup(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        BridgeConfig(probe_file=tmp_path / "none.npy")
    np.save(tmp_path / "small.npy", np.ones((16, 16), np.complex64))
    with pytest.raises(ValueError, match=r"16×16 but frames are 32×32"):
        BridgeConfig(probe_file=tmp_path / "small.npy", crop=64, bin=2)
    np.save(tmp_path / "line.npy", np.ones(16))
    with pytest.raises(ValueError, match="square"):
        BridgeConfig(probe_file=tmp_path / "line.npy")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["object"] = np.ones((4, 4))
    with pytest.raises(ValueError, match="no /probe"):
        BridgeConfig(probe_file=tmp_path / "other.h5")
    Path(tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(ValueError, match="cannot read it"):
        BridgeConfig(probe_file=tmp_path / "junk.h5")
    np.save(tmp_path / "nan.npy", np.full((16, 16), np.nan))
    with pytest.raises(ValueError, match="finite"):
        BridgeConfig(probe_file=tmp_path / "nan.npy")
