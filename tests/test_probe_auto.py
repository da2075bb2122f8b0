"""refine_probe "auto": probe fixed at low counts per pattern, refined at high counts, in the
offline and the live engine; explicit true/false still win; the decision is saved; bad values
are rejected with the field named."""

from __future__ import annotations

import logging

import click
import numpy as np
import pytest
from click.testing import CliRunner
from cryoptycho.daemon.cli import main
from cryoptycho.daemon.commands.reconstruct import build_options
from cryoptycho.daemon.storage.dataset import write_dataset
from cryoptycho.daemon.storage.result import read_result
from cryoptycho.gpu.backend import backend_name, to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import prepare, reconstruct, refine_full_batch
from cryoptycho.gpu.stream import StreamingReconstructor
from engine_helpers import synthetic_dataset
from pydantic import ValidationError

M = 16


def _data(counts: float, noiseless: bool = False):  # type: ignore[no-untyped-def]
    return synthetic_dataset(counts, m=M, grid=4, step_px=3.0, seed=3, noiseless=noiseless)


def _moved(probe, start) -> float:  # type: ignore[no-untyped-def]
    """1 − overlap of the final probe with the start probe (0: untouched up to its power)."""
    a, b = np.asarray(to_numpy(probe)).ravel(), np.asarray(start).ravel()
    return 1.0 - abs(np.vdot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b)


def _offline(xp, data, **kw):  # type: ignore[no-untyped-def]
    opts = {"backend": backend_name(xp), "iterations": 8, "probe_start_iteration": 1, **kw}
    return reconstruct(data, opts)


@pytest.mark.parametrize(
    ("counts", "noiseless", "options", "refined"),
    [
        (300.0, False, {}, False),  # the product's regime, default threshold: fixed
        (2e7, True, {}, True),  # above the default threshold: refined
        (300.0, False, {"probe_refine_min_counts": 200.0}, True),
        (3000.0, False, {"probe_refine_min_counts": 5000.0}, False),
        (300.0, False, {"refine_probe": True}, True),  # explicit values win at any count
        (2e7, True, {"refine_probe": False}, False),
    ],
)
def test_offline_decision(xp, counts, noiseless, options, refined) -> None:  # type: ignore[no-untyped-def]
    data = _data(counts, noiseless)
    state = _offline(xp, data, **options)
    assert state.options["refine_probe"] is refined
    assert ReconOptions.from_dict(state.options).refine_probe is refined  # the saved file reloads
    if refined:
        # (≥ 4.9e-5 here: the default low-frequency boost fits the object sooner, leaving the
        # probe less to absorb than the 1e-4 the diagonal preconditioner's runs moved it by)
        assert _moved(state.probe, data.probe) > 1e-5
    else:
        assert _moved(state.probe, data.probe) < 1e-6


def test_offline_auto_refines_when_there_is_no_probe_to_keep(xp, caplog) -> None:  # type: ignore[no-untyped-def]
    data = _data(300.0)
    data.probe = None  # nor a probe model: the engine guesses a flat-phase probe
    with caplog.at_level(logging.INFO, logger="cryoptycho.gpu.options"):
        state = _offline(xp, data)
    assert state.options["refine_probe"] is True
    assert "no probe given" in caplog.text and "refined" in caplog.text


def test_offline_decision_is_logged(xp, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="cryoptycho.gpu.options"):
        _offline(xp, _data(300.0), iterations=1)
    line = next(r.getMessage() for r in caplog.records if "refine_probe auto" in r.getMessage())
    assert "probe fixed" in line and "< probe_refine_min_counts" in line


@pytest.mark.parametrize(("threshold", "refined"), [(250.0, True), (400.0, False)])
def test_refine_full_batch_decides_auto_itself(xp, threshold, refined) -> None:  # type: ignore[no-untyped-def]
    """Called directly (as the live engine and scripts do), the full-batch refinement decides
    "auto" from the counts it is given (300 per pattern here)."""
    p = prepare(_data(300.0), {"backend": backend_name(xp), "probe_refine_min_counts": threshold,
                               "probe_start_iteration": 0})
    _, probe, _ = refine_full_batch(p.object, p.probe, p.counts_fft, p.batch, p.mask, p.options, 3)
    assert bool(_moved(probe, to_numpy(p.probe)) > 1e-6) is refined


def _engine(xp, data, **kw) -> StreamingReconstructor:  # type: ignore[no-untyped-def]
    stream = {"batch_size": 8, "probe_warmup_steps": 3, **kw.pop("stream", {})}
    opts = ReconOptions(backend=backend_name(xp), init="ones", stream=stream, **kw)
    engine = StreamingReconstructor(
        frame_shape=(M, M), frame_dtype=data.frames.dtype, pixel_size=data.real_pixel_size, probe=data.probe,
        options=opts,
    )
    engine.add_frames(data.frames, data.positions)
    return engine


@pytest.mark.parametrize(
    ("counts", "noiseless", "options", "refined"),
    [
        (300.0, False, {}, False),
        (2e7, True, {}, True),
        (300.0, False, {"probe_refine_min_counts": 200.0}, True),
        (300.0, False, {"refine_probe": True}, True),
        (2e7, True, {"refine_probe": False}, False),
    ],
)
def test_stream_decides_at_warmup(xp, counts, noiseless, options, refined) -> None:  # type: ignore[no-untyped-def]
    data = _data(counts, noiseless)
    engine = _engine(xp, data, **options)
    early = [engine.step() for _ in range(3)]
    assert not any(r.probe_updated for r in early)  # the warm-up keeps the probe fixed
    if options.get("refine_probe", "auto") == "auto":
        assert engine.snapshot().options["refine_probe"] == "auto"  # not decided yet
    late = [engine.step() for _ in range(3)]
    assert all(r.probe_updated is refined for r in late)
    assert engine.refines_probe() is refined
    assert engine.snapshot().options["refine_probe"] is refined
    before = np.array(to_numpy(engine.probe))
    engine.refine(3)
    assert bool(_moved(engine.probe, before) > 1e-6) is refined


def test_stream_refine_before_warmup_decides_from_all_frames(xp) -> None:  # type: ignore[no-untyped-def]
    data = _data(300.0)
    engine = _engine(xp, data, probe_refine_min_counts=250.0, stream={"probe_warmup_steps": 100})
    engine.step()
    assert engine.snapshot().options["refine_probe"] == "auto"
    engine.refine(2)
    assert engine.snapshot().options["refine_probe"] is True


def test_stream_decision_is_kept_once_made(xp) -> None:  # type: ignore[no-untyped-def]
    """Decided once at warm-up: frames of other brightness arriving later do not flip it (a probe
    that flickered between fixed and refined would serve neither); an explicit value set live
    (the daemon's option updates) does."""
    low, high = _data(300.0), _data(3000.0)
    engine = _engine(xp, low, probe_refine_min_counts=1000.0, stream={"probe_warmup_steps": 1})
    assert [engine.step().probe_updated for _ in range(2)] == [False, False]
    engine.add_frames(high.frames, high.positions)
    assert engine.mean_counts > 1000.0
    assert engine.step().probe_updated is False
    engine.options = engine.options.merged({"refine_probe": True})
    assert engine.step().probe_updated is True


@pytest.mark.parametrize(
    ("field", "value"),
    [("refine_probe", "sometimes"), ("refine_probe", 2), ("probe_refine_min_counts", 0),
     ("probe_refine_min_counts", -5.0), ("probe_refine_min_counts", "many")],
)
def test_options_reject_bad_values_naming_the_field(field, value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match=field):
        ReconOptions(**{field: value})
    with pytest.raises(ValidationError, match=field):
        ReconOptions().merged({field: value})


def test_options_values_and_rule() -> None:
    assert ReconOptions().refine_probe == "auto"
    assert ReconOptions(refine_probe="auto").refine_probe == "auto"
    assert ReconOptions(refine_probe="false").refine_probe is False
    opts = ReconOptions(probe_refine_min_counts=1000.0)
    assert opts.refines_probe(999.0) is False and opts.refines_probe(1000.0) is True
    assert opts.refines_probe(0.0, has_probe=False) is True
    assert ReconOptions(refine_probe=False).refines_probe(1e9) is False
    assert opts.with_probe_decision(5.0).refine_probe is False
    with pytest.raises(ValueError, match="mean counts"):
        opts.refines_probe(float("nan"))


def test_cli_defaults_to_auto_and_flags_force_either_way() -> None:
    assert build_options(None, {"refine_probe": None}, ()).refine_probe == "auto"
    assert build_options(None, {"refine_probe": True}, ()).refine_probe is True
    assert build_options(None, {"refine_probe": False}, ()).refine_probe is False
    assert build_options(None, {}, ("refine_probe=auto", "probe_refine_min_counts=5e4")).probe_refine_min_counts == 5e4
    with pytest.raises(click.UsageError, match="refine_probe"):
        build_options(None, {}, ("refine_probe=sometimes",))


@pytest.mark.parametrize(("flags", "refined"), [((), False), (("--refine-probe",), True),
                                                (("--set", "probe_refine_min_counts=100"), True)])
def test_cli_result_file_records_the_decision(tmp_path, flags, refined) -> None:  # type: ignore[no-untyped-def]
    dataset = write_dataset(tmp_path / "d.h5", _data(300.0))
    out = tmp_path / "r.h5"
    result = CliRunner().invoke(main, ["reconstruct", str(dataset), "-o", str(out), "-n", "2", "-q",
                                       "--no-export", *flags])
    assert result.exit_code == 0, result.output
    assert read_result(out).state.options["refine_probe"] is refined
    assert f"probe {'refined' if refined else 'fixed'}" in result.output
    assert ("(auto: refined from" in result.output) is (not flags or flags[0] == "--set")
