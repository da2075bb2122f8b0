"""`cryoptycho bench gpu` runs end to end on NumPy (the GPU figures' command, tested here
without a GPU) and reports the figures it names; on a machine without CuPy it says so."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner
from cryoptycho.daemon.cli import main
from cryoptycho.gpu.backend import cupy_available


def test_bench_gpu_on_numpy_reports_every_figure():
    out = subprocess.run(
        ["cryoptycho", "bench", "gpu", "--backend", "numpy", "--sizes", "16,24", "--frames", "96",
         "--batch", "16", "--chunk", "32", "--refine-s", "0.3", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["backend"] == "numpy"
    for size in ("16", "24"):
        f = figures[size]
        assert f["frames"] == 96 and f["frames_per_s"] > 0
        # every frame folded in once: at least frames ÷ batch steps
        assert f["steps"] >= 96 / 16
        assert f["final_image_finite"] == 1.0 and f["final_image_s"] > 0
        # (tiny frames: thread start-up can make the bare FFT pair the slower one here)
        assert f["objective_ratio"] == pytest.approx(f["objective_s"] / f["fft_pair_s"])
        assert "objective_unfused_ratio" not in f  # the fused kernel exists on CuPy only
    syncs = figures["syncs"]
    assert syncs["syncs_per_step"] == 0.0 and syncs["frame_copies_while_stepping"] == 0.0
    assert syncs["syncs_to_read_step_losses"] == 1.0
    # one per iteration, one more for a secant step, one more per halving of the step (rare)
    assert 1.0 <= syncs["syncs_per_cg_iteration_mean"] <= 2.0
    assert syncs["syncs_per_cg_iteration_max"] <= 3.0


def test_bench_gpu_without_cupy_is_a_clear_error():
    if cupy_available():
        pytest.skip("CuPy is available here: the GPU path is measured, not refused")
    result = CliRunner().invoke(main, ["bench", "gpu", "--backend", "cupy", "--json"])
    assert result.exit_code != 0
    assert "CuPy" in result.output


def test_bench_gpu_rejects_bad_sizes():
    result = CliRunner().invoke(main, ["bench", "gpu", "--backend", "numpy", "--sizes", "8"])
    assert result.exit_code == 2 and "≥ 16" in result.output
