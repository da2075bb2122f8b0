"""`cryoptycho bench bm3d --recon`: the BM3D prior against Tikhonov and none on a simulated scan
(tiny: a 1 nm hemoglobin fragment, 32² frames, a few iterations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryoptycho.daemon.bench.bm3d import ReconConfig, recon_rows
from cryoptycho.daemon.cli import main
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim import specimen
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import AtomicModel
from sim_helpers import hemoglobin_fragment

SMALL_SIM = {"semiangle": 4.6e-3, "margin": 0.5e-9}


@pytest.fixture(scope="module")
def fragment() -> AtomicModel:
    return hemoglobin_fragment(1e-9)


def test_recon_rows_cover_every_prior_at_every_dose(fragment: AtomicModel) -> None:
    cfg = ReconConfig(
        doses=[5.0, 20.0], priors=["none", "tikhonov", "sparse"], mu1=[0.08], denoise_every=2,
        iterations=4, frame_size=32, pixel_size=1.6e-10, backend="numpy", seed=0,
        sim_options=SMALL_SIM,
    )
    rows = recon_rows(fragment, cfg)
    for dose in (5.0, 20.0):
        at = {r["prior"]: r for r in rows if r["dose"] == dose}
        assert list(at) == ["none", "tikhonov", "sparse", "quantum limit"]
        for r in at.values():
            assert math.isfinite(r["phase_correlation"]) and math.isfinite(r["nrmse"])
            for key in ("frc_raw_1bit_m", "frc_pooled_1bit_m"):
                # a period of at least two pixels, or ∞ when not resolved: never NaN
                assert r[key] >= 2 * cfg.pixel_size * 0.99
        for prior in ("none", "tikhonov", "sparse"):
            assert math.isfinite(at[prior]["seconds"]) and at[prior]["seconds"] > 0
        # one simulated dataset per dose, shared by all priors
        assert len({r["counts_per_pattern"] for r in at.values()}) == 1
        # μ₀ "auto": the weight the dose decided, a number (gpu/priors.py auto_mu0)
        assert 1e-3 <= at["tikhonov"]["weight"] <= 0.1
        assert at["sparse"]["weight"] == pytest.approx(0.08)
    counts = [r["counts_per_pattern"] for r in rows]
    assert max(counts) == pytest.approx(4 * min(counts), rel=0.05)  # 20 vs 5 e⁻/Å²

    # What the bench promises (gpu/BM3D.md): each row is the reconstruction of the dose's one
    # simulated scan with the same iterations, seed and fixed true probe, only the prior changed,
    # scored by gpu/sim/evaluation.py. Rebuilt here through the public API, each row must match.
    data = simulate_ptychography(fragment, dose=20.0, frame_size=cfg.frame_size, pixel_size=cfg.pixel_size,
                                 seed=cfg.seed, probe_seed=cfg.seed, backend="numpy", **SMALL_SIM)
    at = {r["prior"]: r for r in rows if r["dose"] == 20.0}
    for prior, extra in (("none", {}), ("tikhonov", {}),
                         ("sparse", {"mu1": 0.08, "denoise_every": 2, "denoiser": "bm3d"})):
        state = reconstruct(data, ReconOptions(iterations=cfg.iterations, refine_probe=False, seed=cfg.seed,
                                               prior=prior, **extra))
        ev = evaluate_against_truth(state.object, state.geometry.origin, data.truth_object, data.truth_origin,
                                    cfg.pixel_size, data.positions, pool=3)
        assert at[prior]["phase_correlation"] == pytest.approx(ev.phase_correlation, rel=1e-6), prior
        assert at[prior]["nrmse"] == pytest.approx(ev.nrmse, rel=1e-6), prior
    # the priors act: the same start and data give three different objects
    assert len({at[p]["nrmse"] for p in ("none", "tikhonov", "sparse")}) == 3


def test_cli_recon_writes_json(
    tmp_path: Path, fragment: AtomicModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = []

    def load_fragment(name: str) -> AtomicModel:
        loaded.append(name)
        return fragment

    # the whole protein costs seconds per BM3D refresh; a fragment of it keeps the CLI test fast
    monkeypatch.setattr(specimen, "load_model", load_fragment)
    out = tmp_path / "recon.json"
    args = ["bench", "bm3d", "--recon", "--doses", "20", "--iterations", "2", "--frame-size", "16",
            "--pixel-size", "1.0", "--mu1", "0.02,0.3", "--denoise-every", "1", "--sparse-sigma", "est,0.2",
            "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert loaded == ["hemoglobin"]
    rows = json.loads(out.read_text())
    assert 1e-3 <= rows[1]["weight"] <= 0.1  # μ₀ "auto": the weight the dose decided
    rows[1]["weight"] = "auto"
    assert [(r["prior"], r["weight"], r.get("sigma")) for r in rows] == [
        ("none", None, None), ("tikhonov", "auto", None), ("sparse", 0.02, None), ("sparse", 0.02, 0.2),
        ("sparse", 0.3, None), ("sparse", 0.3, 0.2), ("quantum limit", None, None)]
    assert all(r["denoise_every"] == 1 for r in rows if r["prior"] == "sparse")
    # a fixed σ changes what BM3D removes, hence the result
    sparse = [r["phase_correlation"] for r in rows if r["prior"] == "sparse"]
    assert sparse[0] != sparse[1] and sparse[2] != sparse[3]
    for r in rows:
        assert math.isfinite(r["phase_correlation"])
        assert r["frc_pooled_1bit_m"] is None or r["frc_pooled_1bit_m"] > 0  # null = not resolved


@pytest.mark.parametrize(("args", "message"), [
    (["--recon", "--sizes", "64"], "--sizes: not with --recon"),
    (["--doses", "5"], "--doses: only with --recon"),
    (["--recon", "--priors", "none,bm4d"], "choose from none, tikhonov, sparse"),
    (["--recon", "--doses", "5,-1"], "every dose must be > 0"),
    (["--recon", "--mu1", "a"], "comma-separated numbers"),
    (["--recon", "--sparse-sigma", "est,-0.1"], "σ must be > 0"),
    (["--sparse-sigma", "0.1"], "--sparse-sigma: only with --recon"),
])
def test_cli_recon_rejects_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", "bm3d", *args])
    assert result.exit_code == 2
    assert message in result.output
