"""Re-processing many recorded scans on a Dask cluster (`cryoptycho batch`).

Each input (a dataset file or a daemon spool file) becomes one Dask task that reconstructs it
with :func:`cryoptycho.gpu.reconstruct.reconstruct` and writes a result file; optionally a final
task aligns and averages the results (single-particle averaging). Scheduling, retries on lost
workers and data locality are Dask's: there is no scheduler here.

GPUs: one Dask worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` and advertising the
resource ``GPU=1``; every task asks for ``GPU: 1``, so a GPU never runs two reconstructions at
once however many threads its worker has. On a laptop the same code runs on a ``LocalCluster``
with the NumPy backend. A remote cluster is joined with its scheduler address (workers started
with ``dask worker SCHEDULER --nthreads 1 --resources GPU=1``, one per GPU).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryoptycho.gpu.average import align_and_average
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.state import ReconState

from .storage.open import open_recorded
from .storage.outputs import ALL_FORMATS, save_outputs, stem_of
from .storage.result import read_result

RESULT_SUFFIX = ".result.h5"
DATASET_FORMAT = "cryoptycho-dataset"
SPOOL_FORMAT = "cryoptycho-spool"


@dataclass(frozen=True)
class Job:
    source: str
    output: str


@dataclass
class JobResult:
    source: str
    output: str
    ok: bool
    seconds: float
    iterations: int = 0
    final_loss: float | None = None
    frames: int = 0
    backend: str = ""
    worker: str = ""
    error: str | None = None


@dataclass
class ClusterSpec:
    """Where the tasks run: an existing scheduler, one worker per listed GPU, or local CPU workers."""

    scheduler: str | None = None
    gpus: list[int] = field(default_factory=list)
    workers: int = 1
    processes: bool = True
    """Local workers as processes (True) or threads in this process (False, light, for tests)."""


# --------------------------------------------------------------------------------------- planning


def discover(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files from paths, directories (every ``*.h5`` in them, results excluded) and globs."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            candidates = sorted(p for p in path.glob("*.h5") if not p.name.endswith(RESULT_SUFFIX))
        elif path.exists():
            candidates = [path]
        else:
            candidates = sorted(Path(p) for p in glob.glob(text))
            if not candidates:
                raise FileNotFoundError(f"input {text!r} matches no file")
        found.extend(candidates)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError("no input files (give dataset or spool files, directories or globs)")
    return unique


def plan(inputs: Sequence[Path], out_dir: Path, skip_existing: bool = False) -> list[Job]:
    """One job per input, writing ``out_dir/<name>.result.h5``; two inputs with one name clash.

    Paths are made absolute here, on the client: a relative path would be resolved in each
    worker's own working directory, which on a cluster is not the client's."""
    out_dir = Path(out_dir).resolve()
    jobs: list[Job] = []
    owner: dict[str, Path] = {}
    for path in inputs:
        name = path.name.removesuffix(".h5").removesuffix(".spool")
        if name in owner:
            raise ValueError(f"inputs {owner[name]} and {path} would both write {name}{RESULT_SUFFIX}")
        owner[name] = path
        output = out_dir / f"{name}{RESULT_SUFFIX}"
        if skip_existing and output.exists():
            continue
        jobs.append(Job(str(Path(path).resolve()), str(output)))
    return jobs


def merged_options(overrides: dict[str, Any], scan_overrides: dict[str, Any] | None = None) -> ReconOptions:
    """Defaults < the scan's own overrides (spool files) < the batch's overrides, validated."""
    return ReconOptions().merged(scan_overrides or {}).merged(overrides)


# ------------------------------------------------------------------------------------ on a worker


def load_input(path: str | Path) -> tuple[PtychoData, dict[str, Any]]:
    """(PtychoData, the scan's own option overrides) from a dataset, spool or result file."""
    recorded = open_recorded(path)
    return recorded.data, recorded.options


def run_job(job: Job, overrides: dict[str, Any], formats: Sequence[str] = ("h5",)) -> JobResult:
    """Reconstruct one input and write its result. Failures are returned, not raised, so that
    one bad file is reported with its reason while the rest of the batch goes on."""
    started = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu:
        worker += f":gpu{gpu}"
    try:
        data, scan_overrides = load_input(job.source)
        options = merged_options(overrides, scan_overrides)
        state = reconstruct(data, options)
        save_outputs(stem_of(job.output), state, data, formats=formats, extra={"source": job.source})
    except Exception as exc:  # noqa: BLE001 - reported per job in the summary; the exit code says so
        return JobResult(job.source, job.output, False, time.perf_counter() - started, worker=worker,
                         error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    return JobResult(
        job.source, job.output, True, time.perf_counter() - started, iterations=state.iteration,
        final_loss=state.loss_values[-1] if state.loss_values else None, frames=state.frames_used,
        backend=state.backend, worker=worker,
    )


def average_results(outputs: Sequence[str], path: str, formats: Sequence[str] = ALL_FORMATS) -> dict[str, Any]:
    """Align the results translationally and average them (:func:`cryoptycho.gpu.average.
    align_and_average`); written as a result file whose /extra holds the shifts and sources."""
    if not outputs:
        raise ValueError("nothing to average: no reconstruction succeeded")
    states = [read_result(out).state for out in outputs]
    first = states[0]
    for out, state in zip(outputs, states, strict=True):
        if state.geometry.pixel_size != first.geometry.pixel_size or state.object.shape != first.object.shape:
            raise ValueError(
                f"{out}: object {state.object.shape} at {state.geometry.pixel_size:.4g} m/px cannot be averaged "
                f"with {outputs[0]} ({first.object.shape} at {first.geometry.pixel_size:.4g} m/px)"
            )
    result = align_and_average([s.object for s in states])
    averaged = ReconState(
        object=result.average.astype(np.complex64), probe=first.probe, geometry=first.geometry,
        iteration=0, options=first.options, frames_used=sum(s.frames_used for s in states),
        positions=None, energy=first.energy,  # an average has no single scan pattern
    )
    save_outputs(stem_of(path), averaged, formats=formats,
                 extra={"n_averaged": len(outputs), "shifts_px": result.shifts,
                        "sources": json.dumps(list(outputs))})
    return {"path": path, "n_averaged": len(outputs), "shifts_px": result.shifts.tolist()}


# ------------------------------------------------------------------------------------- the cluster


@contextmanager
def open_client(spec: ClusterSpec) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``spec`` describes; a cluster started here is
    closed on exit (a Client does not close a cluster it was handed)."""
    try:
        from distributed import Client, LocalCluster, Scheduler, SpecCluster
    except ImportError:
        raise RuntimeError('cryoptycho batch needs Dask: pip install "cryoptycho[batch]"') from None
    if spec.scheduler is not None:
        with Client(spec.scheduler, set_as_default=False) as client:
            yield client
        return
    if spec.gpus:
        cluster = SpecCluster(workers=gpu_workers(spec.gpus), silence_logs=logging.WARNING,
                              scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})
    else:
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=spec.processes,
                               dashboard_address=":0", silence_logs=logging.WARNING)
    with cluster, Client(cluster, set_as_default=False) as client:
        yield client


def gpu_workers(gpus: Sequence[int]) -> dict[str, dict[str, Any]]:
    """SpecCluster workers: one process per GPU, pinned by CUDA_VISIBLE_DEVICES before CuPy
    initialises, with one thread and the resource ``GPU=1`` that every task claims."""
    from distributed import Nanny

    return {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}},
        }
        for gpu in gpus
    }


def require_gpu_workers(client: Any, timeout_s: float = 60.0) -> int:
    """Number of workers that advertise the ``GPU`` resource; an error if none does (tasks that
    claim it would otherwise wait forever)."""
    client.wait_for_workers(1, timeout=timeout_s)
    workers = client.scheduler_info()["workers"].values()
    gpus = sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) >= 1)
    if gpus == 0:
        raise RuntimeError(
            f"none of the {len(workers)} Dask workers advertises the GPU resource; start one worker "
            "per GPU with `dask worker SCHEDULER --nthreads 1 --resources GPU=1`"
        )
    return gpus


def run_batch(client: Any, jobs: Sequence[Job], overrides: dict[str, Any], *, gpu: bool = False,
              formats: Sequence[str] = ("h5",), on_done: Callable[[JobResult], None] | None = None,
              ) -> list[JobResult]:
    """Run every job on ``client``'s cluster; results in completion order.

    With ``gpu``, each task claims the ``GPU`` resource (one reconstruction per GPU at a time).
    """
    from distributed import as_completed

    resources = {"GPU": 1} if gpu else None
    futures = [
        client.submit(run_job, job, overrides, tuple(formats), key=f"reconstruct-{i}-{Path(job.source).name}",
                      resources=resources, pure=False)
        for i, job in enumerate(jobs)
    ]
    results: list[JobResult] = []
    for future in as_completed(futures, loop=client.loop):
        result = future.result()  # run_job returns failures; an exception here is Dask's own
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def confirm_outputs(results: Sequence[JobResult]) -> list[JobResult]:
    """Mark as failed every job whose worker reported success but whose result file this
    machine cannot see (a worker without the shared filesystem, or with it mounted elsewhere):
    the summary must not claim a result the user cannot open."""
    checked = []
    for r in results:
        if r.ok and not Path(r.output).is_file():
            r = replace(r, ok=False, error=(
                f"the worker {r.worker} reported writing {r.output}, but that file does not exist here: "
                "inputs and the output folder must be on a filesystem shared by the client and every "
                "worker, at the same path"))
        checked.append(r)
    return checked


def write_summary(path: Path, results: Sequence[JobResult], average: dict[str, Any] | None) -> Path:
    """A JSON record of the batch: one entry per input, plus the average if one was made."""
    ok = sum(r.ok for r in results)
    payload = {
        "inputs": len(results), "succeeded": ok, "failed": len(results) - ok,
        "jobs": [asdict(r) for r in sorted(results, key=lambda r: r.source)],
        "average": average,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
