"""`cryoptycho batch` on a LocalCluster (threads), planning, spool inputs and particle averaging."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from cryoptycho.daemon.batch import Job, average_results, load_input, plan
from cryoptycho.daemon.commands.batch import command as batch_command
from cryoptycho.daemon.storage.dataset import write_dataset
from cryoptycho.daemon.storage.result import centred_phase, read_result, write_result
from cryoptycho.gpu.geometry import ScanGeometry
from cryoptycho.gpu.metrics import fourier_shift
from cryoptycho.gpu.state import ReconState
from engine_helpers import synthetic_dataset


def tiny(path: Path, seed: int) -> Path:
    return write_dataset(path, synthetic_dataset(2000.0, m=16, grid=4, step_px=3.0, seed=seed))


def test_batch_reconstructs_every_dataset_and_reports_failures(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    tiny(inputs / "particle_a.h5", 1)
    tiny(inputs / "particle_b.h5", 2)
    with h5py.File(inputs / "broken.h5", "w") as f:
        f.attrs["format"] = "something-else"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        batch_command,
        [str(inputs), "-o", str(out), "--threads", "-j", "2", "--set", "iterations=3", "-q"],
    )
    assert result.exit_code == 1, result.output  # one input is not a dataset
    summary = json.loads((out / "batch-summary.json").read_text())
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    by_name = {Path(j["source"]).name: j for j in summary["jobs"]}
    assert "not a cryoptycho dataset, spool or result file" in by_name["broken.h5"]["error"]
    for name in ("particle_a", "particle_b"):
        job = by_name[f"{name}.h5"]
        assert job["ok"] and job["iterations"] == 3 and job["frames"] == 16
        state = read_result(out / f"{name}.result.h5").state
        assert state.iteration == 3
        assert np.isfinite(state.object).all()

    # resuming skips what exists; the average then covers both particles
    again = CliRunner().invoke(
        batch_command,
        [str(inputs / "particle_*.h5"), "-o", str(out), "--threads", "--skip-existing", "-q"],
    )
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_batch_average_on_the_cluster(tmp_path: Path) -> None:
    tiny(tmp_path / "p1.h5", 3)
    tiny(tmp_path / "p2.h5", 3)  # the same particle twice: the average equals each result
    out = tmp_path / "out"
    result = CliRunner().invoke(
        batch_command,
        [str(tmp_path / "p1.h5"), str(tmp_path / "p2.h5"), "-o", str(out), "--threads", "--average",
         "--set", "iterations=2", "--set", "seed=5", "-q"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["average"]["n_averaged"] == 2
    avg = read_result(out / "average.result.h5")
    one = read_result(out / "p1.result.h5").state
    np.testing.assert_allclose(np.angle(avg.state.object), centred_phase(one.object), atol=1e-5)
    assert avg.extra["n_averaged"] == 2


def test_average_aligns_translated_particles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    blob = 0.4 * np.exp(-((yy - 20) ** 2 + (xx - 26) ** 2) / 18.0) + 0.05 * rng.standard_normal((48, 48))
    geometry = ScanGeometry(pixel_size=1e-10, origin=(0.0, 0.0), object_shape=(48, 48), probe_shape=(8, 8))
    outputs = []
    applied = [(0.0, 0.0), (3.0, -2.0), (-4.5, 1.25)]
    for i, shift in enumerate(applied):
        phase = fourier_shift(blob, shift)
        state = ReconState(object=np.exp(1j * phase), probe=np.ones((8, 8), np.complex64), geometry=geometry,
                           energy=300e3)
        outputs.append(str(write_result(tmp_path / f"r{i}.result.h5", state)))
    report = average_results(outputs, str(tmp_path / "avg.result.h5"), formats=("h5",))
    found = np.asarray(report["shifts_px"])
    # shifts are relative to the running reference: compare them to the first image's; the
    # parabolic sub-pixel peak interpolation is biased by up to ~0.15 px between grid points
    np.testing.assert_allclose(found - found[0], -(np.asarray(applied) - applied[0]), atol=0.2)
    avg_phase = np.angle(read_result(tmp_path / "avg.result.h5").state.object)
    ref = blob - blob.mean()
    got = avg_phase - avg_phase.mean()
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99

    other = ReconState(object=np.ones((40, 40), np.complex64), probe=np.ones((8, 8), np.complex64),
                       geometry=ScanGeometry(1e-10, (0.0, 0.0), (40, 40), (8, 8)), energy=300e3)
    outputs.append(str(write_result(tmp_path / "odd.result.h5", other)))
    with pytest.raises(ValueError, match="cannot be averaged"):
        average_results(outputs, str(tmp_path / "bad.result.h5"), formats=("h5",))


def test_plan_names_outputs_and_refuses_clashes(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "scan1.h5", tmp_path / "y" / "scan1.spool.h5"
    jobs = plan([a], tmp_path / "out")
    assert jobs == [Job(str(a), str(tmp_path / "out" / "scan1.result.h5"))]
    with pytest.raises(ValueError, match="would both write scan1.result.h5"):
        plan([a, b], tmp_path / "out")


def test_spool_files_are_inputs_too(tmp_path: Path) -> None:
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage.spool import SpoolWriter

    data = synthetic_dataset(500.0, m=16, grid=3, seed=4)
    spec = ScanSpec(scan_id="live-7", frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=data.probe, expected_frames=9, options={"iterations": 7})
    writer = SpoolWriter.create(tmp_path, spec)
    writer.append(data.frames, np.arange(9), data.positions)
    writer.close()
    loaded, scan_options = load_input(next(tmp_path.glob("*.spool.h5")))
    np.testing.assert_array_equal(loaded.frames, data.frames)
    np.testing.assert_allclose(loaded.positions, data.positions)
    assert scan_options == {"iterations": 7}
    assert loaded.metadata["scan_id"] == "live-7"



def test_gpu_cluster_spec_has_one_pinned_worker_per_gpu() -> None:
    from cryoptycho.daemon.batch import gpu_workers
    from distributed import Nanny

    # Starting the worker processes costs ~10 s on 2 cores; the spec is what cryoptycho decides.
    spec = gpu_workers([0, 3])
    assert set(spec) == {"gpu-0", "gpu-3"}
    for gpu, worker in zip((0, 3), spec.values(), strict=True):
        assert worker["cls"] is Nanny  # a process of its own, so the pin precedes CUDA's start-up
        assert worker["options"]["env"] == {"CUDA_VISIBLE_DEVICES": str(gpu)}
        assert worker["options"]["resources"] == {"GPU": 1} and worker["options"]["nthreads"] == 1


def test_gpu_tasks_refuse_a_cluster_without_gpu_workers() -> None:
    from cryoptycho.daemon.batch import ClusterSpec, open_client, require_gpu_workers

    with open_client(ClusterSpec(workers=1, processes=False)) as client, \
            pytest.raises(RuntimeError, match="advertises the GPU resource"):
        require_gpu_workers(client, timeout_s=10)


def test_relative_output_goes_where_the_client_is_not_the_workers_cwd(tmp_path: Path, monkeypatch) -> None:
    """A worker in another working directory (as on any cluster) still writes into the folder
    the user named relative to *their* shell: the client resolves paths before submitting."""
    import os
    import subprocess
    import sys

    from distributed import LocalCluster

    client_dir, worker_dir = tmp_path / "client", tmp_path / "worker"
    worker_dir.mkdir()
    tiny(client_dir / "data" / "scan.h5", 6)
    monkeypatch.chdir(client_dir)
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as cluster:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--no-dashboard"],
            cwd=worker_dir, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = CliRunner().invoke(batch_command, [
                "data/scan.h5", "-o", "out", "--scheduler", cluster.scheduler_address,
                "--set", "iterations=2", "-q"])
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    assert result.exit_code == 0, result.output
    assert (client_dir / "out" / "scan.result.h5").is_file()
    assert not (worker_dir / "out").exists()
    job = json.loads((client_dir / "out" / "batch-summary.json").read_text())["jobs"][0]
    assert job["output"] == str(client_dir.resolve() / "out" / "scan.result.h5")
    assert job["source"] == str(client_dir.resolve() / "data" / "scan.h5")


def test_success_is_claimed_only_for_results_visible_to_the_client(tmp_path: Path, monkeypatch) -> None:
    """A worker that writes somewhere the client cannot see (no shared filesystem) fails its job
    in the summary and the exit status, with the reason."""
    from cryoptycho.daemon import batch

    elsewhere = tmp_path / "worker-local-disk"
    real_save = batch.save_outputs
    monkeypatch.setattr(batch, "save_outputs",
                        lambda stem, *a, **k: real_save(elsewhere / Path(stem).name, *a, **k))
    tiny(tmp_path / "p.h5", 7)
    result = CliRunner().invoke(batch_command, [str(tmp_path / "p.h5"), "-o", str(tmp_path / "out"),
                                                "--threads", "--set", "iterations=2", "-q"])
    assert result.exit_code == 1, result.output
    assert (elsewhere / "p.result.h5").is_file()  # the worker did write, just not here
    job = json.loads((tmp_path / "out" / "batch-summary.json").read_text())["jobs"][0]
    assert not job["ok"] and "does not exist here" in job["error"] and "shared" in job["error"]
    assert "0/1 reconstructed" in result.output
