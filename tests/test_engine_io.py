"""Bad input, state and result-file round trips, the `reconstruct` command, κ and denoisers."""

from __future__ import annotations

import json

import h5py
import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner
from cryoptycho.daemon.cli import main
from cryoptycho.daemon.storage.dataset import write_dataset
from cryoptycho.daemon.storage.result import read_result, write_result
from cryoptycho.gpu import operators
from cryoptycho.gpu.backend import cupy_available, to_numpy
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.denoise import denoise_complex, get_denoiser
from cryoptycho.gpu.init import random_object
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.priors import kappa
from cryoptycho.gpu.reconstruct import prepare, reconstruct, refine_full_batch
from engine_helpers import synthetic_dataset
from PIL import Image


@pytest.fixture(scope="module")
def tiny():
    return synthetic_dataset(2e3, grid=4, seed=3)


# --- bad input ---------------------------------------------------------------------------


def _kwargs(data: PtychoData) -> dict:
    return {"frames": data.frames, "positions": data.positions, "energy": data.energy,
            "pixel_size": data.pixel_size, "probe": data.probe}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda k: k.update(frames=np.where(k["frames"] > 0, np.nan, 0.0)), "NaN"),
        (lambda k: k.update(frames=k["frames"].astype(np.int32) - 1), "negative"),
        (lambda k: k.update(positions=k["positions"][:-1]), "positions must have shape"),
        (lambda k: k.update(frames=k["frames"][:0], positions=k["positions"][:0]), "empty"),
        (lambda k: k.update(probe=np.ones((8, 8), np.complex64)), "probe shape"),
    ],
)
def test_bad_dataset_is_a_clear_error(tiny, change, message):
    kw = _kwargs(tiny)
    change(kw)
    with pytest.raises(ValueError, match=message):
        PtychoData(**kw)


def test_engine_revalidates_data_changed_after_construction(tiny):
    data = PtychoData(**_kwargs(tiny))
    data.frames = data.frames.astype(np.float32)
    data.frames[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare(data)


def test_no_counts_and_fully_masked_detector_are_errors(tiny):
    kw = _kwargs(tiny)
    kw["frames"] = np.zeros_like(tiny.frames)
    with pytest.raises(ValueError, match="no counts"):
        prepare(PtychoData(**kw))
    kw = _kwargs(tiny)
    kw["mask"] = np.zeros(tiny.frame_shape, bool)
    with pytest.raises(ValueError, match="mask marks every detector pixel invalid"):
        prepare(PtychoData(**kw))


def test_positions_outside_the_object_are_rejected(tiny):
    problem = prepare(tiny)
    far = problem.geometry.to_pixels(tiny.positions) + 1000.0
    with pytest.raises(ValueError, match="outside the object canvas"):
        operators.make_batch(far, problem.geometry.object_shape, tiny.frame_shape)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="alpha_h"):
        ReconOptions(alpha_h=-1)
    with pytest.raises(ValueError, match="truncaton"):
        ReconOptions.from_dict({"truncaton": "none"})


# --- κ and denoisers ---------------------------------------------------------------------


def test_kappa_scaling_and_errors():
    base = kappa(10_000, 0.5, 400)
    # Doubling the dose doubles the likelihood's curvature, and κ with it.
    assert np.isclose(kappa(10_000, 1.0, 400), 2 * base)
    # Twice the measurements at the same dose: data curvature ×2 and redundancy ×2.
    assert np.isclose(kappa(20_000, 0.5, 400), 4 * base)
    for args, field in (((0, 0.5, 400), "n_valid"), ((10, 0.0, 400), "mean_counts"),
                        ((10, 0.5, 0), "n_object_pixels")):
        with pytest.raises(ValueError, match=field):
            kappa(*args)


def test_denoise_complex_keeps_mean_phase_and_removes_noise(xp):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    clean = 0.3 * np.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / 40.0)
    noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    t = xp.asarray(np.exp(1j * (1.3 + noisy)))  # 1.3 rad of "ice" on top
    out = to_numpy(denoise_complex(t, get_denoiser("gaussian", width_px=1.5)))
    phase = np.angle(out)
    assert abs(np.mean(phase) - np.mean(1.3 + noisy)) < 0.01
    assert np.sqrt(np.mean((phase - 1.3 - clean) ** 2)) < 0.5 * np.sqrt(np.mean((noisy - clean) ** 2))
    assert np.allclose(np.abs(out), 1.0, atol=1e-6)


def test_bm3d_package_adapter():
    pytest.importorskip("bm3d")
    rng = np.random.default_rng(1)
    clean = np.zeros((40, 40), np.float32)
    clean[10:30, 12:28] = 1.0
    noisy = (clean + 0.2 * rng.standard_normal(clean.shape)).astype(np.float32)
    out = get_denoiser("bm3d-package")(noisy, 0.2)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert np.abs(out - clean).mean() < 0.5 * np.abs(noisy - clean).mean()


def test_unknown_denoiser_lists_the_known_ones():
    with pytest.raises(ValueError, match="gaussian"):
        get_denoiser("no-such-denoiser")


def test_sparse_prior_runs_its_whole_budget():
    """CG converges on each fixed T_sparse within a few iterations; the engine must then refresh
    the target early rather than stop (on this dataset it once stopped after 8 of 25)."""
    data = synthetic_dataset(180, grid=8, seed=0)
    state = reconstruct(data, {"prior": "sparse", "denoiser": "gaussian", "denoise_every": 10,
                               "mu1": 0.08, "iterations": 25, "refine_probe": False})
    assert state.iteration == 25 and np.all(np.isfinite(state.object))


# --- state, result file and the command ----------------------------------------------------


def test_state_snapshot_and_dict_round_trip(tiny):
    state = reconstruct(tiny, {"iterations": 3})
    snap = state.snapshot()
    snap.object[0, 0] = 123.0  # a copy: the engine's state is untouched
    assert state.object[0, 0] != 123.0
    back = type(state).from_dict(state.to_dict())
    assert np.array_equal(back.object, state.object) and np.array_equal(back.probe, state.probe)
    assert back.geometry == state.geometry and back.loss_values == state.loss_values
    assert back.options == state.options


def test_result_file_round_trip(tmp_path, tiny):
    state = reconstruct(tiny, {"iterations": 3, "mu0": 0.05})
    path = write_result(tmp_path / "r.h5", state, tiny, extra={"note": "hi", "frc": np.arange(3)},
                        raw=lambda g: g.create_dataset("frames", data=tiny.frames[:2]))
    res = read_result(path)
    assert np.allclose(res.state.object, state.object) and np.allclose(res.state.probe, state.probe)
    assert res.state.geometry == state.geometry
    assert res.state.loss_epochs == [1, 2, 3] and np.allclose(res.state.loss_values, state.loss_values)
    assert res.state.options == state.options and res.state.options["mu0"] == 0.05
    assert np.allclose(res.state.positions, tiny.positions) and res.state.energy == tiny.energy
    assert res.provenance["backend"] == "numpy" and res.provenance["cryoptycho_version"]
    assert res.extra["note"] == "hi" and list(res.extra["frc"]) == [0, 1, 2]
    with h5py.File(path) as f:  # ptychodus names and units
        px = tiny.pixel_size
        assert f["object"].attrs["pixel_width_m"] == px == f["probe"].attrs["pixel_height_m"]
        nx = f["object"].shape[1]
        origin = state.geometry.origin
        assert np.isclose(f["object"].attrs["center_x_m"], origin[1] + (nx - 1) / 2 * px)
        assert np.allclose(f["probe_position_x_m"][()], tiny.positions[:, 1])
        assert f.attrs["probe_energy_eV"] == tiny.energy
        assert json.loads(f.attrs["options"])["mu0"] == 0.05
        assert f["raw/frames"].shape[0] == 2


def test_the_probe_estimate_comes_back_from_the_result_file(tmp_path, tiny):
    """Every scalar the engine records about the probe (parallax fit, refined and searched
    aberrations, source size) is read back as the probe estimate, so a result can be
    compared with the run that made it (the search's ``search_<name>_m`` was written to /extra
    but not read back)."""
    state = reconstruct(tiny, {"iterations": 1})
    state.probe_estimate = {"parallax_applied": 1.0, "aberration_C10_m": 2e-9,
                            "search_C10_m": -3e-9, "source_size_m": 1e-10}
    res = read_result(write_result(tmp_path / "r.h5", state, tiny))
    assert res.state.probe_estimate == state.probe_estimate


def test_read_result_rejects_other_files(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="not a cryoptycho result"):
        read_result(path)


def test_reconstruct_command(tmp_path, tiny):
    dataset = write_dataset(tmp_path / "d.h5", tiny)
    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"mu0": 0.02, "seed": 5}))
    out = tmp_path / "out" / "r.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(out), "-n", "3", "-q",
                                  "--options", str(opts), "--fixed-probe", "--set", "mu0=0.04",
                                  "--set", "stream.batch_size=8"])
    assert result.exit_code == 0, result.output
    res = read_result(out)
    assert res.state.iteration == 3
    assert res.state.options["mu0"] == 0.04 and res.state.options["seed"] == 5
    assert res.state.options["refine_probe"] is False
    assert res.state.options["stream"]["batch_size"] == 8
    with mrcfile.open(tmp_path / "out" / "r.phase.mrc") as mrc:
        assert mrc.data.shape == res.state.object.shape
        assert np.isclose(float(mrc.voxel_size.x), tiny.pixel_size * 1e10)
    assert Image.open(tmp_path / "out" / "r.phase.png").size == res.state.object.shape[::-1]
    bad = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(out), "--set", "mu0=-1"])
    assert bad.exit_code != 0 and "mu0" in bad.output
    bad = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(out), "--set", "nokey"])
    assert bad.exit_code != 0 and "key=value" in bad.output


@pytest.mark.skipif(cupy_available(), reason="needs a machine without a usable CuPy")
def test_reconstruct_command_without_gpu_is_a_clear_error(tmp_path, tiny):
    dataset = write_dataset(tmp_path / "d.h5", tiny)
    result = CliRunner().invoke(main, ["reconstruct", str(dataset), "-o", str(tmp_path / "r.h5"),
                                       "-n", "1", "-q", "--backend", "cupy"])
    assert result.exit_code == 1 and "CuPy" in result.output


def test_random_object_follows_options():
    opts = ReconOptions(init_phase_mean=0.1, init_phase_std=0.1, seed=4)
    obj = random_object((200, 200), opts)
    assert np.allclose(np.abs(obj), 1.0, atol=1e-6)
    phase = np.angle(obj)
    assert abs(phase.mean() - 0.1) < 0.005 and abs(phase.std() - 0.1) < 0.005
    assert np.array_equal(obj, random_object((200, 200), opts))


def test_refine_rejects_mismatched_frames(tiny):
    problem = prepare(tiny)
    with pytest.raises(ValueError, match="does not match probe"):
        refine_full_batch(problem.object, problem.probe[:-1, :-1], problem.counts_fft,
                          problem.batch, problem.mask, problem.options, iterations=1)
