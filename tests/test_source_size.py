"""The source size (partial spatial coherence) of a scan: stated by its probe model (dataset file,
wire) and used by the defaults (``source_size_m`` "auto"), or estimated from the frames
(gpu/coherence.py)."""

from __future__ import annotations

import os
import subprocess

import h5py
import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.coherence import estimate_source_size, parabola_vertex
from cryoptycho.gpu.options import ReconOptions
from engine_helpers import ENERGY, PIXEL, weak_phase_object

M = 32


def _scan(source_px: float, seed: int = 0, counts: float = 1e5, probe_model: bool = False):
    """A strong-phase scan (8×8 positions, 3 px steps, 32×32 frames) recorded through a
    Gaussian source of ``source_px`` pixels rms (three modes; 0: the coherent probe); the
    dataset gives the coherent probe (or, with ``probe_model``, its model)."""
    from cryoptycho.gpu.data import ProbeModel, PtychoData
    from cryoptycho.gpu.geometry import fit_geometry
    from cryoptycho.gpu.probes import make_probe, source_modes

    rng = np.random.default_rng(seed)
    probe = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, precision="double",
                       total_intensity=counts)
    true = source_modes(probe, PIXEL, source_px * PIXEL, 3) if source_px else probe[None]
    iy, ix = np.mgrid[0:8, 0:8]
    pos = np.stack([iy.ravel(), ix.ravel()], 1) * 3.0 * PIXEL + rng.uniform(-0.3, 0.3, (64, 2)) * PIXEL
    geo = fit_geometry(pos, PIXEL, (M, M))
    truth = weak_phase_object(geo.object_shape, seed, peak=1.0)
    batch = operators.make_batch(geo.to_pixels(pos), geo.object_shape, (M, M))
    inten = sum(abs(operators.forward(truth, true[m], batch)) ** 2 for m in range(true.shape[0]))
    frames = operators.from_fft_order(rng.poisson(inten).astype(np.uint16))
    if probe_model:
        return PtychoData(frames=frames, positions=pos, energy=ENERGY, pixel_size=PIXEL,
                          probe_model=ProbeModel(kind="defocused", semiangle=8e-3, defocus=60e-9))
    return PtychoData(frames=frames, positions=pos, energy=ENERGY, pixel_size=PIXEL,
                      probe=probe.astype(np.complex64))


def _estimate(data, seed: int = 0):
    from cryoptycho.gpu.reconstruct import prepare

    p = prepare(data, {"refine_probe": False, "init": "ones", "source_size_m": 0.0})
    return estimate_source_size(p.object, p.probe, p.counts_fft, p.batch, p.mask, p.options, PIXEL,
                                p.probe_power, grid=(0.0, 0.75 * PIXEL, 1.5 * PIXEL), iterations=8,
                                seed=seed)


def test_the_estimate_recovers_a_known_source_size():
    """A 1 px source between the trials 0.75 and 1.5 px: both halves put it below a point
    source, and the parabola through the held-out scores finds it (1.00 ± 0.01 px on seeds
    0–2 when this was written)."""
    est = _estimate(_scan(1.0))
    assert est.confident and est.best_m == pytest.approx(0.75 * PIXEL)
    assert est.estimate_m == pytest.approx(1.0 * PIXEL, abs=0.15 * PIXEL)
    assert est.source_size_m == est.estimate_m
    assert all(g > 0 for g in est.gains())
    assert est.record()["source_size_applied_m"] == est.estimate_m


def test_the_estimate_says_zero_for_a_point_source():
    est = _estimate(_scan(0.0))
    assert est.best_m == 0.0 and not est.confident and est.source_size_m == 0.0
    # every finite source fits the held-out half worse, in both directions
    zero = est.scores[0.0]
    assert all(s[0] > zero[0] and s[1] > zero[1] for size, s in est.scores.items() if size > 0)


def test_parabola_vertex():
    x = [0.0, 0.5, 1.0, 1.5]
    assert parabola_vertex(x, [(v - 0.8) ** 2 for v in x]) == pytest.approx(0.8)
    assert parabola_vertex(x, [v for v in x]) == 0.0  # minimum at an end: that end
    assert parabola_vertex(x, [-v for v in x]) == 1.5
    # a vertex beyond the neighbours is kept between them
    assert 0.5 <= parabola_vertex([0.0, 0.5, 1.0, 10.0], [1.0, 0.0, 0.1, 50.0]) <= 1.0


def test_estimate_refuses_negative_trials():
    with pytest.raises(ValueError, match="trial source sizes"):
        estimate_source_size(None, np.zeros((2, 2)), np.zeros((1, 2, 2), np.uint16), None, None,
                             ReconOptions(), PIXEL, 1.0, grid=(0.0, -1e-10))


def test_defaults_use_a_stated_source_size_and_a_point_source_otherwise():
    """``source_size_m`` "auto": the probe model's stated size makes three modes and is saved as
    the number used; a scan that states none, or states 0, reconstructs a coherent probe; an
    explicit number wins over the stated one."""
    from cryoptycho.gpu.reconstruct import prepare

    data = _scan(1.0, probe_model=True)
    assert ReconOptions().source_size_m == "auto"
    none = prepare(data, {"parallax": False})
    assert none.probe.ndim == 2 and none.options.source_size_m == 0.0
    data.probe_model.source_size = 1.0 * PIXEL
    stated = prepare(data, {"parallax": False})
    assert stated.probe.shape == (3, M, M) and stated.options.source_size_m == pytest.approx(PIXEL)
    assert prepare(data, {"source_size_m": 0.0, "parallax": False}).probe.ndim == 2
    data.probe_model.source_size = 0.0
    assert prepare(data, {"parallax": False}).probe.ndim == 2


def test_source_estimate_option_applies_a_confident_estimate():
    """``source_estimate`` on and nothing stated: the offline reconstruction estimates the size,
    reconstructs with its modes and records the estimate with the result."""
    from cryoptycho.gpu.reconstruct import reconstruct

    state = reconstruct(_scan(1.0), {"iterations": 2, "source_estimate": True, "source_estimate_iterations": 8,
                                     "refine_probe": False, "init": "ones"})
    assert state.probe.shape == (3, M, M)
    assert state.options["source_size_m"] == pytest.approx(state.probe_estimate["source_size_applied_m"])
    assert 0.5 * PIXEL < state.options["source_size_m"] <= 2 * PIXEL


def test_live_engine_uses_the_stated_source_size():
    from cryoptycho.gpu.stream import StreamingReconstructor

    data = _scan(0.0)
    kw = {"frame_shape": (M, M), "frame_dtype": np.uint16, "pixel_size": PIXEL, "probe": data.probe}
    stated = StreamingReconstructor(**kw, options=ReconOptions(), source_size_m=PIXEL)
    assert stated.probe.shape == (3, M, M) and stated.options.source_size_m == pytest.approx(PIXEL)
    plain = StreamingReconstructor(**kw, options=ReconOptions())
    assert plain.probe.ndim == 2 and plain.options.source_size_m == 0.0
    with pytest.raises(ValueError, match="source_size_m"):
        StreamingReconstructor(**kw, options=ReconOptions(), source_size_m=-1.0)


def test_options_refuse_a_negative_source_size():
    for bad in (-1e-10, float("nan"), float("inf"), "big"):
        with pytest.raises(ValueError, match="source_size_m"):
            ReconOptions(source_size_m=bad)


def test_wire_probe_model_states_the_source_size():
    """scan_start's probe_model carries ``source_size_m``: encoded, decoded, turned into the
    scan's metadata and the engine's stated size; left out of the header when not stated (a
    daemon before the key refuses it)."""
    from cryoptycho.daemon.scan import engine_spec, spec_from_scan_start, start_from_data
    from cryoptycho.protocols import codec

    data = _scan(0.0, probe_model=True)
    data.probe_model.source_size = 0.8e-10
    start = start_from_data(data, "s1")
    assert start.probe_model.source_size_m == pytest.approx(0.8e-10)
    back = codec.decode(codec.encode(start))
    assert back.probe_model.source_size_m == pytest.approx(0.8e-10)
    spec = spec_from_scan_start(back)
    assert spec.metadata["source_size_m"] == pytest.approx(0.8e-10)
    assert engine_spec(spec).source_size_m == pytest.approx(0.8e-10)
    data.probe_model.source_size = None
    start = start_from_data(data, "s2")
    assert b"source_size_m" not in b"".join(bytes(p) for p in codec.encode(start))
    assert engine_spec(spec_from_scan_start(codec.decode(codec.encode(start)))).source_size_m is None



def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cryoptycho", *args], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=300, check=False)


def test_simulate_stated_source_size_values():
    """``--stated-source-size``: the true size by default, another number, or none (Å → m)."""
    from cryoptycho.daemon.commands.simulate import _stated_source

    assert _stated_source(None, 1.0) == pytest.approx(1e-10)
    assert _stated_source(None, None) is None
    assert _stated_source("0.8", 1.0) == pytest.approx(0.8e-10)
    assert _stated_source("None", 1.0) is None
    assert _stated_source("0", None) == 0.0


@pytest.mark.subprocess
def test_a_stated_source_size_round_trips_through_the_dataset_and_reconstruct(tmp_path):
    """A dataset whose probe model states ``source_size_m``: read back as written, and
    ``cryoptycho reconstruct`` with no flags reconstructs with that size's three modes and saves
    the size used; without the attribute the probe is coherent; a negative one is refused by
    name."""
    from cryoptycho.daemon.storage.dataset import read_dataset, write_dataset
    from cryoptycho.daemon.storage.result import read_result

    data = _scan(1.0, probe_model=True)
    data.probe_model.source_size = 0.8 * PIXEL
    ds = write_dataset(tmp_path / "src.h5", data)
    assert read_dataset(ds).probe_model.source_size == pytest.approx(0.8 * PIXEL)
    res = tmp_path / "res.h5"
    out = _cli("reconstruct", str(ds), "-o", str(res), "-n", "2", "--no-export", "-q")
    assert out.returncode == 0, out.stderr
    state = read_result(res).state
    assert state.probe.shape == (3, M, M) and state.options["source_size_m"] == pytest.approx(0.8 * PIXEL)

    with h5py.File(ds, "a") as f:  # as `--stated-source-size none` writes it
        del f["probe_model"].attrs["source_size_m"]
    assert read_dataset(ds).probe_model.source_size is None
    out = _cli("reconstruct", str(ds), "-o", str(res), "-n", "2", "--no-export", "-q")
    assert out.returncode == 0, out.stderr
    state = read_result(res).state
    assert state.probe.shape == (M, M) and state.options["source_size_m"] == 0.0

    with h5py.File(ds, "a") as f:
        f["probe_model"].attrs["source_size_m"] = -1e-10
    out = _cli("reconstruct", str(ds), "-o", str(res), "-n", "2", "--no-export", "-q")
    assert out.returncode != 0 and "source_size_m" in out.stderr and "Traceback" not in out.stderr
    out = _cli("simulate", "--stated-source-size", "big", "-o", str(tmp_path / "x.h5"))
    assert out.returncode == 2 and "--stated-source-size" in out.stderr
