"""`cryoptycho bench live`: the live service measured end to end, in one process run.

A simulated scan is streamed to an in-process service over real loopback sockets with the SDK
Producer; the figures come from the publish socket and the control socket, as any client sees
them:

* frames/s folded into the model while streaming: slope of ``frames_used`` (frames visited by at
  least one mini-batch step) over the acquiring phase, from the published metrics;
* frame-to-preview latency p50/p95: per frame, arrival on the ingest socket → the first preview
  that contains it (the service's own per-frame record, read through ``list_scans``);
* time from the last frame sent to the final result received;
* NRMSE (vs the ground truth) of the live result at scan end ÷ that of a converged offline
  reconstruction (:func:`cryoptycho.gpu.reconstruct.reconstruct`) of the same frames, with the
  same options (``--set``), and both phase correlations in the particle (scored as
  ``bench paper`` scores: registered, phase ramp removed);
* on a realistic scan (``--realistic``, or a ``--dataset`` file written by ``cryoptycho
  simulate --realistic``) whose true positions are known: the rms error of the nominal, the
  live and the offline positions against them (the mean translation, a gauge, removed).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table


def _simulate(frame_size: int, margin_m: float, dose: float, seed: int, realistic: bool = False,
              sample: str = "hemoglobin") -> Any:
    from cryoptycho.gpu.sim.errors import ExperimentErrors
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

    errors = ExperimentErrors.realistic(seed) if realistic else None
    return simulate_ptychography(sample=sample, frame_size=frame_size, margin=margin_m, dose=dose, seed=seed,
                                 errors=errors)


def _true_positions(data: Any) -> np.ndarray:
    """Where the frames were recorded (the truth of a realistic scan, else the positions given)."""
    truth = getattr(data, "truth_positions", None)
    return np.asarray(data.positions if truth is None else truth, dtype=np.float64)


def _scores(obj: np.ndarray, origin: tuple[float, float], data: Any) -> tuple[float, float]:
    """(NRMSE, phase correlation in the particle) against the ground truth."""
    from cryoptycho.gpu.sim.evaluation import evaluate_against_truth

    ev = evaluate_against_truth(obj, origin, data.truth_object, data.truth_origin, data.real_pixel_size,
                                _true_positions(data))
    return ev.nrmse, ev.phase_correlation


def _nrmse(obj: np.ndarray, origin: tuple[float, float], data: Any) -> float:
    return _scores(obj, origin, data)[0]


def position_error_m(positions: Any, data: Any) -> float | None:
    """Rms distance (m) of ``positions`` from the true ones, the mean translation removed (a
    common translation of all positions is a gauge: the object moves with it); None when the
    data know no truth of their positions or the counts differ."""
    truth = getattr(data, "truth_positions", None)
    if truth is None or positions is None:
        return None
    d = np.asarray(positions, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    if d.shape != np.shape(truth):
        return None
    d -= d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=1).mean()))


def run_live(data: Any, rate: float, refine_s: float, iterations: int, workdir: Path,
             on_ready: Callable[[dict[str, str]], None] | None = None,
             options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stream ``data`` at ``rate`` frames/s to an in-process service; the live figures.
    ``on_ready(endpoints)`` runs once the service is bound, before the first frame (e.g. to
    attach viewers whose cost is measured); ``options`` are the service's reconstruction
    options (over its defaults; ``iterations`` is set apart)."""
    from cryoptycho.daemon.config import load_config
    from cryoptycho.daemon.replay import ReplaySource, replay
    from cryoptycho.daemon.scan import start_from_data
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.messages import Metrics, Preview, Result, ScanEvent
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber

    config = load_config(overrides={
        "ingest": "tcp://127.0.0.1:*", "publish": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
        "metrics_port": 0, "spool_dir": str(workdir / "spool"), "results_dir": str(workdir / "results"),
        "refine_time_budget_s": refine_s, "recover": False,
        "options": {**(options or {}), "iterations": iterations},
    })
    n = len(data.frames)
    start = start_from_data(data, "bench-live")
    source = ReplaySource(start, data.frames, np.asarray(data.positions, np.float64))
    bg = BackgroundService(config)
    ep = bg.service.endpoints
    sub = Subscriber(ep["publish"], latest_only=False)
    if on_ready is not None:
        try:
            on_ready(dict(ep))
        except BaseException:
            sub.close()
            bg.stop()
            raise
    time.sleep(0.3)
    sent: dict[str, float] = {}
    errors: list[Exception] = []

    def stream() -> None:
        try:
            with Producer(ep["ingest"], control=ep["control"]) as producer:
                sent["t0"] = time.monotonic()
                replay(source, producer, rate=rate, batch=32)
                sent["t1"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 — re-raised in the main thread
            errors.append(exc)

    used: list[tuple[float, int]] = []  # (receive time, frames_used) while acquiring
    last_preview: Preview | None = None  # refinement publishes no previews: the last one before
    result: Result | None = None  # the result is the live state at scan end
    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 600 + refine_s
        while result is None and time.monotonic() < deadline:
            if errors or bg.error is not None:
                raise click.ClickException(f"benchmark run failed: {errors[0] if errors else bg.error}")
            ev = sub.recv(timeout_s=0.5)
            if isinstance(ev, Metrics) and ev.state == "acquiring":
                used.append((time.monotonic(), ev.frames_used))
            elif isinstance(ev, Preview):
                last_preview = ev
            elif isinstance(ev, ScanEvent) and ev.event in ("failed", "aborted"):
                raise click.ClickException(f"scan {ev.event}: {ev.reason}")
            elif isinstance(ev, Result):
                result = ev
        if result is None:
            raise click.ClickException("no result within the benchmark's deadline")
        t_result = time.monotonic()
        with ControlClient(ep["control"]) as ctl:
            info = next(s for s in ctl.list_scans() if s["scan_id"] == "bench-live")
    finally:
        sub.close()
        bg.stop()
    thread.join(10)
    live_nrmse, live_corr = _scores(np.asarray(result.object), result.origin_m, data)
    estimate = _probe_estimate_of(result.files.get("result"))
    at_end: tuple[float | None, float | None] = (None, None)
    if last_preview is not None:
        at_end = _scores(
            np.asarray(last_preview.object_amplitude) * np.exp(1j * np.asarray(last_preview.object_phase)),
            last_preview.origin_m, data)
    return {
        "frames": n,
        "ingest_frames_per_s": n / max(sent["t1"] - sent["t0"], 1e-9),
        "fold_frames_per_s": _slope(used, n),
        "frames_used_at_scan_end": max((u for _, u in used), default=0),
        "latency_p50_s": info["latency_p50_s"],
        "latency_p95_s": info["latency_p95_s"],
        "last_frame_to_result_s": t_result - sent["t1"],
        "live_nrmse": live_nrmse,
        "live_phase_correlation": live_corr,
        "live_at_scan_end_nrmse": at_end[0],
        "live_at_scan_end_phase_correlation": at_end[1],
        "live_position_error_m": position_error_m(result.positions_m, data),
        "live_probe_estimate": estimate,
        "iterations": result.iterations,
        # the service's own clock, from scan_end's arrival (the budget's start) to the result,
        # and its phases: what is left of last_frame_to_result_s is ingest lag
        "scan_end_to_result_s": info.get("final_image_s"),
        "refine_phase_s": info.get("refine_s"),
        # full-batch CG iterations the refinement ran in its budget (a budget-bound result
        # scores a low phase correlation long before its NRMSE shows it)
        "refine_iterations": info.get("refine_iterations"),
        "halves_phase_s": info.get("halves_refine_s"),
        "finish_phase_s": info.get("finish_s"),
    }


def _probe_estimate_of(path: str | None) -> dict[str, float]:
    """The probe estimate (the parallax fit's record) the service saved in its result file."""
    import h5py

    if not path or not Path(path).exists():
        return {}
    with h5py.File(path, "r") as f:
        attrs = f["extra"].attrs if "extra" in f else {}
        return {k: float(v) for k, v in attrs.items() if k.startswith("parallax_")}


def _slope(points: list[tuple[float, int]], n: int) -> float | None:
    """Frames folded per second: least-squares slope of frames_used over the acquiring phase,
    from 10 % of the frames to the last point before the scan ended."""
    pts = [(t, u) for t, u in points if u >= 0.1 * n]
    if len(pts) < 2:
        return None
    t, u = np.asarray(pts, dtype=float).T
    return float(np.polyfit(t - t[0], u, 1)[0])


def run_offline(data: Any, iterations: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """NRMSE, phase correlation, position error and seconds of a converged offline reconstruction
    with the service's default options and ``options`` over them."""
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import reconstruct

    t0 = time.perf_counter()
    state = reconstruct(data, ReconOptions().merged({**(options or {}), "iterations": iterations}))
    seconds = time.perf_counter() - t0
    nrmse, corr = _scores(np.asarray(state.object), state.geometry.origin, data)
    return {"offline_nrmse": nrmse, "offline_phase_correlation": corr, "offline_s": seconds,
            "offline_position_error_m": position_error_m(state.positions, data),
            "offline_probe_estimate": dict(state.probe_estimate)}


@click.command()
@click.option("--sample", default="hemoglobin", show_default=True,
              help="Sample to simulate (as `cryoptycho simulate --sample`: a name or a PDB/mmCIF path; "
                   "proteasome and ribosome need $CRYOPTYCHO_STRUCTURES).")
@click.option("--frame-size", type=int, default=64, show_default=True)
@click.option("--margin", "margin_m", type=float, default=6e-9, show_default=True,
              help="Ice around the particle, m (sets the number of positions).")
@click.option("--dose", type=float, default=20.0, show_default=True, help="e⁻/Å².")
@click.option("--rate", type=float, default=500.0, show_default=True,
              help="Frames/s the producer streams (the target rate): the fold rate shows whether the "
                   "model keeps up with it.")
@click.option("--refine-s", type=float, default=30.0, show_default=True, help="Refinement budget after scan end.")
@click.option("--iterations", type=int, default=100, show_default=True, help="Refinement CG iterations.")
@click.option("--offline-iterations", type=int, default=100, show_default=True,
              help="Iterations of the converged offline reference.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--realistic", is_flag=True,
              help="Simulate a realistic experiment (cryoptycho simulate --realistic): the service and the "
                   "offline reference get the nominal probe and positions; position errors are scored "
                   "against the true ones.")
@click.option("--dataset", "dataset_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Stream this dataset file (e.g. written by `cryoptycho simulate`; it must hold the "
                   "ground truth) instead of simulating one.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Reconstruction option for both the service and the offline reference "
                   "(repeatable; dotted keys nest, e.g. stream.refine_positions=false).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def command(sample: str, frame_size: int, margin_m: float, dose: float, rate: float, refine_s: float, iterations: int,
            offline_iterations: int, seed: int, realistic: bool, dataset_path: str | None,
            sets: tuple[str, ...], as_json: bool) -> None:
    """Live service: fold rate, preview latency, time to final image, live/offline NRMSE."""
    import tempfile

    from cryoptycho.gpu.options import ReconOptions

    from ..overrides import parse_set

    options = parse_set(sets)
    try:
        ReconOptions().merged(options)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    console = Console()
    if dataset_path is not None:
        from ..storage.dataset import read_dataset

        if realistic:
            raise click.BadParameter("--realistic simulates a scan; a --dataset file already is one",
                                     param_hint="--realistic")
        if sample != "hemoglobin":
            raise click.BadParameter("--sample simulates a scan; a --dataset file already is one",
                                     param_hint="--sample")
        try:
            data = read_dataset(dataset_path)
        except (ValueError, OSError) as exc:
            raise click.BadParameter(f"cannot read {dataset_path}: {exc}", param_hint="--dataset") from None
        if data.truth_object is None:
            raise click.BadParameter(f"{dataset_path} holds no ground truth (/truth): nothing to score "
                                     "against", param_hint="--dataset")
        dose = float(data.metadata.get("dose_e_per_A2", float("nan")))
        frame_size = int(data.frame_shape[0])
    else:
        with console.status("simulating…"):
            try:
                data = _simulate(frame_size, margin_m, dose, seed, realistic, sample)
            except (ValueError, FileNotFoundError) as exc:
                raise click.BadParameter(str(exc), param_hint="--sample") from None
    with tempfile.TemporaryDirectory() as tmp, console.status(f"streaming {len(data.frames)} frames…"):
        live = run_live(data, rate, refine_s, iterations, Path(tmp), options=options)
    with console.status(f"offline reference ({offline_iterations} iterations)…"):
        offline = run_offline(data, offline_iterations, options)
    offline_nrmse = offline["offline_nrmse"]
    figures = {**live, **offline,
               "nominal_position_error_m": position_error_m(data.positions, data),
               "nrmse_ratio": live["live_nrmse"] / offline_nrmse,
               "nrmse_ratio_at_scan_end": None if live["live_at_scan_end_nrmse"] is None
               else live["live_at_scan_end_nrmse"] / offline_nrmse,
               "frame_size": frame_size, "dose": dose, "refine_s": refine_s, "options": options}
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title=f"bench live — {len(data.frames)} frames of {frame_size}×{frame_size}, {dose:g} e⁻/Å²")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")

    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    table.add_row("frames/s folded while streaming", fmt(figures["fold_frames_per_s"], ".0f"), "≥ 500")
    table.add_row("frames/s ingested", fmt(figures["ingest_frames_per_s"], ".0f"), "")
    table.add_row("frames folded by scan end", f"{figures['frames_used_at_scan_end']} / {figures['frames']}", "")
    table.add_row("frame→preview latency p50 (s)", fmt(figures["latency_p50_s"], ".3f"), "")
    table.add_row("frame→preview latency p95 (s)", fmt(figures["latency_p95_s"], ".3f"), "≤ 0.5")
    table.add_row("last frame → final image (s)", fmt(figures["last_frame_to_result_s"], ".1f"),
                  f"budget {refine_s:g} s")
    table.add_row("  of which scan_end received → final image (s)", fmt(figures["scan_end_to_result_s"], ".1f"),
                  f"≤ {refine_s + 1:g}")
    table.add_row("  refinement / half sets / result writing (s)",
                  " / ".join(fmt(figures[k], ".1f") for k in ("refine_phase_s", "halves_phase_s", "finish_phase_s")),
                  "")
    table.add_row("  refinement CG iterations in the budget", fmt(figures["refine_iterations"], "d"), "")
    table.add_row("NRMSE live (final) ÷ offline", fmt(figures["nrmse_ratio"], ".3f"), "≤ 1.10")
    table.add_row("NRMSE live (at scan end, before refinement) ÷ offline",
                  fmt(figures["nrmse_ratio_at_scan_end"], ".3f"), "")
    table.add_row("NRMSE offline (converged)", fmt(offline_nrmse, ".4f"), "")
    table.add_row("phase correlation live (final) / offline",
                  f"{fmt(figures['live_phase_correlation'], '.3f')} / "
                  f"{fmt(figures['offline_phase_correlation'], '.3f')}", "")
    if figures["nominal_position_error_m"] is not None:
        table.add_row("position error rms nominal / live / offline (Å)", " / ".join(
            fmt(None if figures[k] is None else figures[k] * 1e10, ".2f")
            for k in ("nominal_position_error_m", "live_position_error_m", "offline_position_error_m")), "")
    for who in ("live", "offline"):
        est = figures[f"{who}_probe_estimate"]
        if est:
            names = [k[len("parallax_"):-2] for k in est if k.endswith("_m") and not k.endswith("_se_m")]
            table.add_row(f"probe estimate {who}: " + " / ".join(names) + " (nm)",
                          " / ".join(f"{est[f'parallax_{k}_m'] * 1e9:.1f}" for k in names),
                          f"{'applied' if est.get('parallax_applied') else 'not applied'}, "
                          f"χ² {est.get('parallax_significance', float('nan')):.1f}")
    console.print(table)
