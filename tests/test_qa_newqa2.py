"""Second-wave QA of this session's merged branches (ingest15, lowfreq, realprobe, fieldqa4):
one test per defect found, plus the attacks that held and are cheap enough to keep."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest


def test_a_lowfreq_boost_past_single_precision_is_refused_by_serve_naming_it() -> None:
    """A boost above float32's range (1e39) passed validation (≥ 1, finite), then the filter's
    float32 weight was inf and every scan failed at CG's first iteration with "objective
    became non-finite". It is refused up front now, naming the option; the bound itself keeps
    the weight finite."""
    from cryoptycho.gpu.cg import LowFrequencyPreconditioner
    from cryoptycho.gpu.options import ReconOptions
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lowfreq_boost"):
        ReconOptions(lowfreq_boost=1e39)
    top = ReconOptions(lowfreq_boost=1e6).lowfreq_boost
    weight = LowFrequencyPreconditioner(np.ones((16, 16), np.float32), 0.05, top).weight
    assert weight.dtype == np.float32 and np.isfinite(weight).all()

    # through the console script: serve stops before binding anything, naming the option
    proc = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--set",
                           "options.lowfreq_boost=1e39"], check=False, capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode != 0
    assert "options.lowfreq_boost" in proc.stderr and "less than or equal" in proc.stderr, proc.stderr
