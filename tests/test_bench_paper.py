"""`cryoptycho bench paper`: the oracle reconstruction beside the ideal phase-contrast image at
the same dose (FRC 1-bit / ½-bit, phase correlation, phase NRMSE, dose efficiency, wall time),
the large-particle geometry, and the phase NRMSE the table reports."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
from cryoptycho.gpu.metrics import ice_phase_removed
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth, quantum_limit
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def _bench(tmp_path, *extra: str) -> tuple[list[dict], str]:
    out = tmp_path / "paper"
    run = subprocess.run(
        ["cryoptycho", "bench", "paper", "--samples", "hemoglobin", "--doses", "20", "--average", "0",
         "--iterations", "3", "-o", str(out), *extra],
        check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    return json.loads((out / "paper.json").read_text()), (out / "paper.md").read_text()


@pytest.mark.subprocess
def test_oracle_rows_sit_beside_the_ideal_image_at_the_same_dose(tmp_path) -> None:
    results, md = _bench(tmp_path)
    row = results[0]["doses"]["20.0"]
    for scores in (row["ptychography"], row["quantum_limit"]):
        res = scores["resolution_m"]
        for key in ("particle/raw/1-bit", "particle/pooled/1-bit", "particle/raw/1/2-bit",
                    "particle/pooled/1/2-bit"):
            assert res[key] > 0
        # the ½-bit threshold is below the 1-bit one: the same curve crosses it no earlier
        assert res["particle/pooled/1/2-bit"] <= res["particle/pooled/1-bit"]
        assert -1 <= scores["phase_correlation"] <= 1
        assert 0 < scores["phase_nrmse"] < 5
    # three CG iterations from a random start are far from what the dose allows
    assert row["ptychography"]["phase_correlation"] < row["quantum_limit"]["phase_correlation"]
    assert 0 <= row["dose_efficiency"] <= 2 and row["recon_seconds"] > 0
    table = [ln for ln in md.splitlines() if ln.startswith("| hemoglobin | 20 | ")]
    assert any("| ptychography |" in ln for ln in table) and any("| ideal phase-contrast |" in ln for ln in table)
    assert "multislice" in md and "0.80 Å pixels" in md and "(9.2 mrad)" in md


@pytest.mark.subprocess
def test_large_geometry_is_coarser_thin_and_keeps_the_aperture_on_the_detector(tmp_path) -> None:
    results, md = _bench(tmp_path, "--large")
    assert "48×48 frames, 1.60 Å pixels" in md and "(5 mrad)" in md and "thin object" in md
    small = simulate_ptychography("hemoglobin", dose=20, frame_size=48, pixel_size=1.6e-10, semiangle=5e-3,
                                  multislice=False, seed=0, probe_seed=0)
    assert results[0]["doses"]["20.0"]["positions"] == len(small.positions)


def test_phase_nrmse_is_zero_for_the_truth_one_for_a_flat_image_and_penalises_over_contrast() -> None:
    data = simulate_ptychography("hemoglobin", dose=20, frame_size=48, pixel_size=1.6e-10, semiangle=5e-3,
                                 multislice=False, seed=0, probe_seed=0, noise=False)
    t, org, px, pos = data.truth_object, data.truth_origin, data.real_pixel_size, data.positions

    def score(obj: np.ndarray) -> float:
        return evaluate_against_truth(obj, org, t, org, px, pos, register=False, deramp=False).phase_nrmse

    phase = ice_phase_removed(t)
    assert score(t) == pytest.approx(0.0, abs=1e-9)
    assert score(np.abs(t)) == pytest.approx(1.0, abs=1e-6)  # no phase at all
    assert score(np.abs(t) * np.exp(3j * phase)) == pytest.approx(2.0, rel=1e-3)  # 3× the contrast
    # the correlation cannot tell 3× the contrast from the truth; the NRMSE can
    over = evaluate_against_truth(np.abs(t) * np.exp(3j * phase), org, t, org, px, pos, register=False,
                                  deramp=False)
    assert over.phase_correlation == pytest.approx(1.0, abs=1e-6)
    # the ideal image: noisier at a lower dose, in correlation and in NRMSE
    low, high = (quantum_limit(t, org, px, pos, dose) for dose in (5.0, 500.0))
    assert math.isfinite(low.phase_nrmse) and high.phase_nrmse < low.phase_nrmse
    assert high.phase_correlation > low.phase_correlation


def test_efficiency_is_marked_a_lower_bound_once_the_reconstruction_reaches_nyquist() -> None:
    from cryoptycho.daemon.bench.paper import _efficiency

    def row(resolution_m: float) -> dict:
        return {"dose_efficiency": 0.08,
                "ptychography": {"pixel_size_m": 1.6e-10, "resolution_m": {"particle/pooled/1-bit": resolution_m}}}

    assert _efficiency(row(3.2e-10)) == "≥ 0.08"
    assert _efficiency(row(3.6e-10)) == "0.08"


def test_realistic_rows_add_the_scan_affine_registered_phase_correlation(tmp_path, monkeypatch) -> None:
    """``--realistic``: beside the official (translation-registered) phase correlation, the one
    after mapping the reconstruction through the affine map from the positions it used to the
    true ones. The oracle used the true positions, so its two figures agree; the nominal run
    used positions off by the scan's affine error, which the registered figure takes out."""
    from click.testing import CliRunner
    from cryoptycho.daemon.bench import paper
    from cryoptycho.daemon.cli import main

    # the nominal run only: the refined ones cost minutes and add nothing to this column's check
    monkeypatch.setattr(paper, "REALISTIC_RUNS", [r for r in paper.REALISTIC_RUNS if r[0] == "nominal"])
    out = tmp_path / "paper"
    run = CliRunner().invoke(main, ["bench", "paper", "--samples", "hemoglobin", "--doses", "20", "--average",
                                    "0", "--iterations", "3", "--realistic", "--large", "-o", str(out)])
    assert run.exit_code == 0, run.output
    row = json.loads((out / "paper.json").read_text())[0]["doses"]["20.0"]
    oracle, nominal = row["ptychography"], row["realistic"]["nominal"]
    assert oracle["phase_correlation_scan_affine_registered"] == pytest.approx(oracle["phase_correlation"], abs=2e-3)
    assert nominal["phase_correlation_scan_affine_registered"] > nominal["phase_correlation"] + 0.01
    md = (out / "paper.md").read_text()
    assert "| phase corr. | phase corr. (scan-affine registered) |" in md
    line = next(ln for ln in md.splitlines() if "realistic, nominal probe and positions" in ln)
    assert f"| {nominal['phase_correlation']:.3f} | {nominal['phase_correlation_scan_affine_registered']:.3f} |" in line


def test_realistic_refinement_runs_on_top_of_the_defaults() -> None:
    """``--realistic``'s refinement run is what a user turns on over the defaults: it turns
    options on (positions, the defocus search) and turns off none that the defaults use (it ran
    with the parallax fit off and then sat below the defaults); the nominal run is the one
    without the parallax fit, and the defaults run overrides nothing."""
    from cryoptycho.daemon.bench import paper
    from cryoptycho.gpu.options import ReconOptions

    runs = {key: extra for key, _, extra in paper.REALISTIC_RUNS}
    defaults = ReconOptions()
    assert runs["nominal"] == {"parallax": False}
    assert runs["parallax"] == {}
    refined = defaults.merged(runs["defaults_refined"])
    assert refined.refine_positions and refined.aberration_search
    assert refined.parallax == defaults.parallax
    assert refined.position_residual_auto == defaults.position_residual_auto
    for key, value in runs["defaults_refined"].items():
        assert value is not False, f"the refinement run turns {key} off"
    labels = [label for _, label, _ in paper.REALISTIC_RUNS]
    assert len(set(labels)) == len(labels) and any("defaults + refinement" in label for label in labels)
