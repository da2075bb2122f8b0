"""How often the two parallax gates together open with the nominal probe exactly right (not a
test; gpu/MEASUREMENTS.md, "The two parallax gates' family-wise rate"):

    python tests/measure/parallax_fwer_measure.py --seeds 200-299 [--out rows.jsonl]

Each seed is one synthetic scan (a weak phase object, seeded, on a 12 × 12 raster of 3-pixel
steps, 32 × 32 frames, the nominal defocused probe exactly right); its counts per pattern cycle
through 10³, 10⁴, 10⁵ and its Gaussian jitter through 0 and 0.3 Å (rms per axis) with the seed.
Both fits are made on every scan (reach 0.9 and 1.8, the defaults' prior, range and
coefficients), whatever the first finds, so that any rule combining their χ² can be scored on
the same fits. Each row: the seed, the scan's counts and jitter, both fits' χ² (``chi2_first``,
``chi2_wide``, the gate's sandwich significance) and estimates, CPU seconds. ``--null-draws B``: also each fit's p-value under the search's null
(``null_p_first``, ``null_p_wide``: None where its χ² gate stays shut)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from cryoptycho.gpu import operators
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.probes import make_probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' synthetic object and geometry
from engine_helpers import ENERGY, PIXEL, fit_geometry, weak_phase_object

M = 32
COUNTS = (1e3, 1e4, 1e5)
JITTER = (0.0, 0.3e-10)


def scan(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(frames in detector order, nominal positions, nominal probe, counts, jitter) of ``seed``."""
    counts, jitter = COUNTS[seed % 3], JITTER[(seed // 3) % 2]
    rng = np.random.default_rng(seed)
    nominal = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, precision="double",
                         total_intensity=counts)
    iy, ix = np.mgrid[0:12, 0:12]
    positions = np.stack([iy.ravel(), ix.ravel()], axis=1) * 3.0 * PIXEL
    true_positions = positions + rng.normal(0.0, jitter, positions.shape) if jitter else positions
    geometry = fit_geometry(true_positions, PIXEL, (M, M))
    obj = weak_phase_object(geometry.object_shape, seed, peak=0.5)
    batch = operators.make_batch(geometry.to_pixels(true_positions), geometry.object_shape, (M, M))
    inten = np.abs(operators.forward(obj, nominal, batch)) ** 2
    frames = rng.poisson(inten).astype(np.float64)
    return operators.from_fft_order(frames), positions, nominal, counts, jitter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="200-299", help="first-last")
    ap.add_argument("--out", default=None)
    ap.add_argument("--counts", type=float, default=None, help="only the seeds at these counts a pattern")
    ap.add_argument("--null-draws", type=int, default=0,
                    help="also the search's null (estimate_aberrations(null_draws=…)) where a gate opens")
    a = ap.parse_args()
    first, last = (int(v) for v in a.seeds.split("-"))
    opts = ReconOptions()
    for seed in range(first, last + 1):
        if a.counts is not None and COUNTS[seed % 3] != a.counts:
            continue
        frames, positions, nominal, counts, jitter = scan(seed)
        row: dict[str, object] = {"seed": seed, "counts": counts, "jitter_A": jitter * 1e10}
        t = time.process_time()
        for key, reach in (("first", opts.parallax_reach), ("wide", opts.parallax_wide_reach)):
            fit = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY,
                                       names=tuple(opts.parallax_aberrations),
                                       search_range_m=opts.parallax_range_m, nyquist_fraction=reach,
                                       null_draws=a.null_draws, null_confidence=opts.parallax_confidence)
            row[f"chi2_{key}"] = round(fit.significance, 3)
            row[f"null_p_{key}"] = fit.null_p_value
            row[f"estimate_{key}_nm"] = {k: round(v * 1e9, 2) for k, v in fit.coefficients.items()}
        row["cpu_s"] = round(time.process_time() - t, 1)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
