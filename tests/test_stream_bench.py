"""`cryoptycho bench engine` runs end to end on a tiny problem and reports what it claims."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from cryoptycho.daemon.cli import main


def test_bench_engine_json_figures():
    args = ["bench", "engine", "--frames", "32", "--size", "16", "--stream-frames", "128",
            "--batch", "16", "--steps", "2", "--repeats", "1", "--cg-iterations", "1", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    full = figures["full_batch"]
    assert full["frames"] == 32 and full["groups"] > 1  # jittered: distinct sub-pixel shifts
    assert figures["full_batch_on_grid"]["groups"] == 1
    # the ratios are the times they are said to divide (never a timing assertion: noise decides)
    for name in ("evaluation", "cg_iteration", "cg_direct_iteration"):
        assert math.isfinite(full[f"{name}_s"]) and full[f"{name}_s"] > 0
        assert full[f"{name}_ratio"] == pytest.approx(full[f"{name}_s"] / full["fft_pair_s"])
    # the line model keeps its trial-step arrays: it buys fewer FFTs with memory (gpu/MEASUREMENTS.md, "Speed":
    # 22.1× raw with it, 9.1× without); tracemalloc counts bytes, so this is no timing figure
    assert full["refine_peak_over_raw"] > full["refine_direct_peak_over_raw"] > 1.0
    for size in ("64", "128"):
        live = figures["mini_batch"][size]
        assert math.isfinite(live["frames_per_s"]) and live["frames_per_s"] > 0
        assert 1.0 <= live["store_over_raw"] <= 1.05  # frame count declared: exact allocation
        assert 0.0 < live["held_over_raw"] <= 1.0  # (uint8 rows where the counts fit: FrameStore narrow)
        assert live["peak_over_raw"] >= live["store_over_raw"]
    assert figures["store_growth"]["reallocations"] >= 1


def test_bench_engine_profile_shares():
    args = ["bench", "engine", "--frames", "32", "--size", "16", "--stream-frames", "64",
            "--batch", "16", "--steps", "1", "--repeats", "1", "--cg-iterations", "1", "--json",
            "--profile"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    full = json.loads(result.output)["full_batch"]
    for key in ("profile_evaluation", "profile_cg_iteration"):
        shares = full[key]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert shares["fft"] > 0 and shares["likelihood"] > 0 and shares["gather_scatter"] > 0
