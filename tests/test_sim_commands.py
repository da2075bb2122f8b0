"""`cryoptycho simulate` and `cryoptycho evaluate`, in process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from cryoptycho.daemon.cli import main
from cryoptycho.daemon.storage.dataset import read_dataset
from cryoptycho.daemon.storage.result import write_result
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.state import ReconState


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> object:
    path = tmp_path_factory.mktemp("sim") / "data.h5"
    res = CliRunner().invoke(main, [
        "simulate", "--dose", "10", "--frame-size", "32", "--pixel-size", "1.6", "--semiangle", "4.6",
        "--overlap", "0.5", "--detector", "ideal", "-o", str(path),
    ])
    assert res.exit_code == 0, res.output
    return path


def _result(tmp_path, data, obj, name: str):
    geometry = fit_geometry(data.positions, data.pixel_size, data.frame_shape)
    state = ReconState(object=obj, probe=data.truth_probe, geometry=geometry,
                       positions=data.positions, energy=data.energy)
    return write_result(tmp_path / name, state)


def test_simulate_writes_a_dataset_with_truth(dataset) -> None:
    data = read_dataset(dataset)
    assert data.frames.dtype.kind == "u"
    assert data.truth_object is not None and data.truth_origin is not None
    assert data.metadata["sample"] == "4HHB" and data.metadata["dose_e_per_A2"] == 10.0
    assert data.frames.sum(axis=(1, 2)).mean() == pytest.approx(
        data.metadata["counts_per_pattern"] * np.exp(-50 / 350), rel=0.05)


def test_evaluate_scores_a_perfect_and_a_noisy_result(tmp_path, dataset) -> None:
    data = read_dataset(dataset)
    rng = np.random.default_rng(0)
    perfect = _result(tmp_path, data, data.truth_object, "perfect.h5")
    noisy = _result(tmp_path, data, data.truth_object * np.exp(1j * rng.normal(0, 1.0, data.truth_object.shape)), "noisy.h5")
    runner = CliRunner()
    out = {}
    for path in (perfect, noisy):
        res = runner.invoke(main, ["evaluate", str(path), "--truth", str(dataset)])
        assert res.exit_code == 0, res.output
        out[path.stem] = json.loads(path.with_suffix(".json").read_text())
        assert path.with_suffix(".frc.png").stat().st_size > 1000
    assert out["perfect"]["resolution_m"]["particle/raw/1-bit"] == pytest.approx(2 * data.pixel_size)
    assert out["perfect"]["phase_correlation"] == pytest.approx(1.0)
    assert out["noisy"]["resolution_m"]["particle/raw/1-bit"] > 3 * data.pixel_size
    assert out["noisy"]["phase_correlation"] < 0.5


def test_evaluate_half_sets_and_errors(tmp_path, dataset) -> None:
    data = read_dataset(dataset)
    a = _result(tmp_path, data, data.truth_object, "a.h5")
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(a), "--half", str(a)])
    assert res.exit_code == 0, res.output
    half = json.loads(a.with_suffix(".json").read_text())["half_set_resolution_m"]
    assert half["1/2-bit"] == pytest.approx(2 * data.pixel_size)
    res = runner.invoke(main, ["evaluate", str(a)])
    assert res.exit_code != 0 and "--truth" in res.output
    res = runner.invoke(main, ["simulate", "--sample", "unobtainium", "-o", str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "unknown sample" in res.output
