"""A new user's own dataset, written with h5py alone as README "Dataset file" shows, through the
console script: a frame size other than the demo's, float32 frames, a non-square scan off any
raster, a mask with dead pixels, a measured complex probe; and the same file with its positions
in Å instead of metres."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.subprocess


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300, check=False)


def own_dataset(path, m: int = 48, scale: float = 1.0) -> None:
    rng = np.random.default_rng(3)
    ny, nx, step = 5, 7, 2.5e-10
    yy, xx = np.meshgrid(np.arange(ny) * step, np.arange(nx) * step, indexing="ij")
    positions = np.stack([yy.ravel(), xx.ravel()], 1) + rng.normal(0, 0.4e-10, (ny * nx, 2)) + 3e-9
    k = np.fft.fftfreq(m)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    aperture = (np.hypot(ky, kx) < 0.18) * np.exp(30j * (ky**2 + kx**2))
    probe = np.fft.fftshift(np.fft.ifft2(aperture)).astype(np.complex64)
    probe *= np.sqrt(2000 / np.sum(np.abs(probe) ** 2))
    frames = rng.poisson(2000 / m**2, (len(positions), m, m)).astype(np.float32)
    mask = np.ones((m, m), np.uint8)
    mask[5, 7] = 0
    frames[:, 5, 7] = 65535  # a hot pixel, masked
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "cryoptycho-dataset"
        f.attrs["format_version"] = 1
        f["frames"] = frames
        f["positions_m"] = positions * scale
        f["energy_eV"] = 300e3
        f["detector_pixel_angle_rad"] = 1e-3
        f["mask"] = mask
        f["probe"] = probe


def test_own_h5py_dataset_reconstructs_through_the_console_script(tmp_path):
    own_dataset(tmp_path / "scan.h5")
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "2")
    assert out.returncode == 0, out.stderr
    assert "48×48 float32" in out.stdout + out.stderr
    # the auto probe decision names this scan's counts (valid pixels), not only the threshold
    with h5py.File(tmp_path / "scan.h5") as f:
        counts = (f["frames"][()] * f["mask"][()]).sum(axis=(1, 2)).mean()
    said = float(re.search(r"this scan has ([0-9.e+]+)", out.stdout).group(1))
    assert said == pytest.approx(counts, rel=1e-3), out.stdout
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["probe"].shape == (48, 48) and np.isfinite(f["object"][()]).all()
        assert len(f["probe_position_x_m"]) == 35
    assert (tmp_path / "r.phase.png").is_file() and (tmp_path / "r.phase.mrc").is_file()


def test_positions_in_angstrom_are_refused_naming_the_unit(tmp_path):
    """Positions 10^10 times too large (Å written as metres) failed with NumPy's "array is too
    big" from inside the engine."""
    own_dataset(tmp_path / "angstrom.h5", scale=1e10)
    out = cli("reconstruct", str(tmp_path / "angstrom.h5"), "-o", str(tmp_path / "r.h5"), "-n", "2")
    assert out.returncode != 0
    assert "positions reach" in out.stderr and "metres" in out.stderr and "Å" in out.stderr, out.stderr
    assert "too big" not in out.stderr
    assert not (tmp_path / "r.h5").exists()


def test_a_misspelt_probe_model_attribute_is_named(tmp_path):
    """README's snippet with `semiangle=` for `semiangle_rad=` was a KeyError traceback."""
    own_dataset(tmp_path / "scan.h5")
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        del f["probe"]
        f.create_group("probe_model").attrs.update(kind="defocused", semiangle=9.2e-3, defocus_m=40e-9)
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1
    assert "/probe_model: unknown attribute 'semiangle'" in out.stderr and "semiangle_rad" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_positions_a_million_times_too_large_are_refused_before_allocating(tmp_path):
    """Positions in µm written as metres stay within ±1 cm but span 38 million pixels: NumPy
    was asked for 16.6 PiB and the command ended in a traceback."""
    own_dataset(tmp_path / "micro.h5", scale=1e6)
    out = cli("reconstruct", str(tmp_path / "micro.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1
    assert "reconstruction needs" in out.stderr and "positions_m in metres" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_4d_stem_array_is_refused_with_the_reshape_it_needs(tmp_path):
    """py4DSTEM and LiberTEM keep (ny, nx, M, M): written as /frames it was refused without a
    hint of what to do."""
    own_dataset(tmp_path / "scan.h5")
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        frames = f["frames"][()]
        del f["frames"]
        f["frames"] = frames.reshape(5, 7, 48, 48)
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1
    assert "(5, 7, 48, 48)" in out.stderr and "reshaped to (ny·nx, M, M)" in out.stderr, out.stderr
