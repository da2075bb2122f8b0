"""`cryoptycho demo`: the whole product in one command, on a laptop, without a microscope.

Starts the service in-process (loopback, random ports, spool and results under the output
directory), simulates hemoglobin at 20 e⁻/Å² with the randomized probe, streams the frames to the
service at a microscope's pace with the SDK Producer, shows live progress from the publish socket,
and writes the final images and an FRC report against the ground truth.

The simulation's probe is known exactly, so the demo reconstructs with it fixed: at 20 e⁻/Å²
(≈ 340 counts per pattern) refining the probe fits the shot noise — the exact probe's overlap
with the truth fell from 1.00 to 0.40 and the phase correlation from 0.38 to 0.09
(gpu/MEASUREMENTS.md, "Low-dose quality at 20 e⁻/Å²"). ``--refine-probe`` shows that effect. The report
sets the figures beside the quantum limit: an ideal phase-contrast image at the same dose,
scored the same way.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table


def _stream(source: Any, endpoint: str, control: str, rate: float, errors: list[Exception]) -> None:
    from cryoptycho.daemon.replay import replay
    from cryoptycho.protocols.producer import Producer

    try:
        with Producer(endpoint, control=control) as producer:
            replay(source, producer, rate=rate, batch=16)
    except Exception as exc:  # noqa: BLE001 — surfaced by the main thread
        errors.append(exc)


def _progress_table(state: dict[str, Any], total: int) -> Table:
    table = Table(title="cryoptycho demo — live reconstruction", show_header=False)
    received = state.get("frames_received", 0)
    table.add_row("state", state.get("state", "waiting"))
    table.add_row("frames received", f"{received} / {total}")
    table.add_row("frames used", str(state.get("frames_used", 0)))
    table.add_row("iteration", str(state.get("iteration", 0)))
    loss = state.get("loss")
    table.add_row("loss / position", "—" if loss is None else f"{loss:.2f}")
    res = state.get("resolution_m")
    table.add_row("live half-set resolution", "—" if res is None else f"{res * 1e10:.1f} Å")
    lat = state.get("latency_s")
    table.add_row("frame → preview latency", "—" if lat is None else f"{lat * 1e3:.0f} ms")
    return table


@click.command()
@click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("cryoptycho-demo"), show_default=True, help="Output directory.")
@click.option("--sample", default="hemoglobin", show_default=True)
@click.option("--dose", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True, help="e⁻/Å².")
@click.option("--probe", type=click.Choice(["randomized", "defocused", "fzp"]), default="randomized",
              show_default=True)
@click.option("--rate", type=float, default=200.0, show_default=True, help="Frames per second streamed.")
@click.option("--refine-s", type=float, default=60.0, show_default=True,
              help="Time budget of the refinement after the last frame.")
@click.option("--refine-probe/--fixed-probe", default=False, show_default=True,
              help="Refine the probe (the simulation's probe is exact; refining it fits noise at low dose).")
@click.option("--seed", type=int, default=0, show_default=True)
def command(out: Path, sample: str, dose: float, probe: str, rate: float, refine_s: float, refine_probe: bool,
            seed: int) -> None:
    """Simulate a low-dose scan, reconstruct it live, and report its resolution."""
    from cryoptycho.daemon.config import load_config
    from cryoptycho.daemon.replay import ReplaySource
    from cryoptycho.daemon.scan import start_from_data
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography
    from cryoptycho.protocols.messages import Result, ScanEvent
    from cryoptycho.protocols.subscriber import Subscriber

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with console.status(f"Simulating {sample} at {dose:g} e⁻/Å² with the {probe} probe…"):
        data = simulate_ptychography(sample=sample, dose=dose, probe=probe, seed=seed)
        write_dataset(out / "dataset.h5", data)
    n = len(data.frames)
    console.print(f"simulated {n} frames of {data.frame_shape[0]}×{data.frame_shape[1]} "
                  f"({time.monotonic() - t0:.1f} s) → {out / 'dataset.h5'}", soft_wrap=True)

    config = load_config(overrides={
        "ingest": "tcp://127.0.0.1:*", "publish": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
        "metrics_port": 0, "spool_dir": str(out / "spool"), "results_dir": str(out / "results"),
        "refine_time_budget_s": refine_s, "resolution_interval_s": 5.0, "recover": False,
    })
    scan_id = f"demo-{sample}-{int(time.time())}"
    start = start_from_data(
        data, scan_id,
        metadata={"sample": sample, "dose_e_per_A2": dose, "probe": probe, "demo": True},
        options={"refine_probe": refine_probe},
    )
    source = ReplaySource(start, data.frames, np.asarray(data.positions, np.float64))

    service = BackgroundService(config)
    endpoints = service.service.endpoints
    console.print(f"daemon up: ingest {endpoints['ingest']}, publish {endpoints['publish']}, "
                  f"control {endpoints['control']}, metrics http://127.0.0.1:{service.service.metrics_port}/metrics")
    sub = Subscriber(endpoints["publish"])
    time.sleep(0.2)  # let the subscription reach the publisher before the scan's first event
    errors: list[Exception] = []
    producer = threading.Thread(target=_stream, args=(source, endpoints["ingest"], endpoints["control"], rate, errors), daemon=True)
    state: dict[str, Any] = {}
    result: Result | None = None
    t_stream = time.monotonic()
    producer.start()
    try:
        with Live(_progress_table(state, n), console=console, refresh_per_second=8) as live:
            while result is None:
                if errors:
                    raise click.ClickException(f"streaming failed: {errors[0]}")
                if service.error is not None:
                    raise click.ClickException(f"the service stopped: {service.error}")
                ev = sub.recv(timeout_s=0.25)
                if ev is None:
                    continue
                if getattr(ev, "scan_id", None) != scan_id:
                    continue
                if isinstance(ev, ScanEvent):
                    state["state"] = ev.event
                    if ev.event in ("failed", "aborted", "rejected"):
                        raise click.ClickException(f"scan {ev.event}: {ev.reason}")
                elif type(ev).__name__ == "Metrics":
                    state.update({k: getattr(ev, k) for k in ("frames_received", "frames_used", "iteration",
                                                              "loss", "resolution_m", "latency_s", "state")})
                elif isinstance(ev, Result):
                    result = ev
                live.update(_progress_table(state, n))
    finally:
        sub.close()
        service.stop()
    elapsed = time.monotonic() - t_stream
    report = _report(out, data, result, state, elapsed, dose, seed)
    report["refine_probe"] = refine_probe
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    # paths whole on one line each (soft_wrap): rich folds a long one at the console's width (80
    # columns when piped), and a path cut in two cannot be copied or grepped
    console.print(f"\n[bold]done in {time.monotonic() - t0:.0f} s[/bold] — results in {out.resolve()}:",
                  soft_wrap=True)
    for label, path in report["files"].items():
        console.print(f"  {label:<22} {path}", soft_wrap=True)
    for line in summary_lines(report, sample, dose):
        console.print(line)


def _angstrom(value: float | None) -> str:
    if value is None:
        return "—"
    return "not resolved" if not np.isfinite(value) else f"{value * 1e10:.1f} Å"


def summary_lines(report: dict[str, Any], sample: str, dose: float) -> list[str]:
    """What the user is told about the result's quality, beside what the dose allows."""
    res, lim = report["resolutions_m"], report["quantum_limit"]["resolutions_m"]
    lines = [
        (f"{sample} at {dose:g} e⁻/Å² against the ground truth, FRC 1-bit inside the particle "
         f"(the paper's criterion): {_angstrom(res['particle/raw/1-bit'])} raw rings, "
         f"{_angstrom(res['particle/pooled/1-bit'])} pooled; phase correlation {report['phase_correlation']:.2f}"),
        (f"dose limit — a perfect phase-contrast image at {dose:g} e⁻/Å², scored the same way: "
         f"{_angstrom(lim['particle/raw/1-bit'])} raw, {_angstrom(lim['particle/pooled/1-bit'])} pooled; "
         f"phase correlation {report['quantum_limit']['phase_correlation']:.2f} (best low-pass)"),
    ]
    half = report["live_half_set_resolution_m"]
    if half is not None:
        lines.append(f"live half-set estimate (no ground truth, half dose each): {_angstrom(half)}")
    return lines


def _report(out: Path, data: Any, result: Any, state: dict[str, Any], elapsed: float, dose: float,
            seed: int) -> dict[str, Any]:
    """Score the live result against the ground truth: FRC plot, phase images, JSON report."""
    from cryoptycho.daemon.plots import plot_frc
    from cryoptycho.gpu.sim.evaluation import evaluate_against_truth, quantum_limit

    ev = evaluate_against_truth(np.asarray(result.object), result.origin_m, data.truth_object,
                                data.truth_origin, data.real_pixel_size, np.asarray(data.positions))
    frc_png = plot_frc({"particle": ev.frc_particle, "scanned area": ev.frc_area}, out / "frc.png",
                       "live reconstruction vs ground truth", ev.pool)
    limit = quantum_limit(data.truth_object, data.truth_origin, data.real_pixel_size,
                          np.asarray(data.positions), dose, seed=seed, pool=ev.pool)
    compare_png = _compare_figure(out / "phase_vs_truth.png", np.asarray(result.object), result.origin_m, data,
                                  dose, seed, limit.lowpass_px)
    labels = {"result": "result (HDF5)", "phase_mrc": "phase (MRC)", "phase_png": "phase (PNG)"}
    files = {labels.get(kind, kind): str(path) for kind, path in result.files.items()}
    files.update({"phase vs truth": str(compare_png), "FRC plot": str(frc_png),
                  "report (JSON)": str(out / "report.json"), "dataset (HDF5)": str(out / "dataset.h5")})
    prefix = "particle/pooled/"
    thr = {k[len(prefix):]: v for k, v in ev.resolutions.items() if k.startswith(prefix)}
    lim = {k[len(prefix):]: v for k, v in limit.resolutions.items() if k.startswith(prefix)}
    report = {
        "scan_id": result.scan_id,
        "frames": len(data.frames),
        "stream_to_result_s": elapsed,
        "iterations": result.iterations,
        "resolution_vs_truth_m": thr,
        "resolutions_m": ev.resolutions,
        "phase_correlation": ev.phase_correlation,
        "nrmse": ev.nrmse,
        "live_half_set_resolution_m": result.metadata.get("resolution_m"),
        "quantum_limit": {"resolution_m": lim, "resolutions_m": limit.resolutions,
                          "phase_correlation": limit.phase_correlation, "nrmse": limit.nrmse},
        "metadata": data.metadata,
        "files": files,
    }
    return report


def _compare_figure(path: Path, recon: np.ndarray, origin: tuple[float, float], data: Any, dose: float,
                    seed: int, lowpass_px: float) -> Path:
    """Reconstruction, the dose limit and the truth on one grid: the scanned box of the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cryoptycho.gpu.metrics import ice_phase_removed, particle_footprint
    from cryoptycho.gpu.sim.evaluation import ideal_phase_image, resample, scanned_box
    from scipy import ndimage

    px = data.real_pixel_size
    sy, sx = scanned_box(data.positions, data.truth_origin, px, data.truth_object.shape)
    truth = data.truth_object[sy, sx].astype(np.complex128)
    box_origin = (data.truth_origin[0] + sy.start * px, data.truth_origin[1] + sx.start * px)
    foot = particle_footprint(ice_phase_removed(truth))
    ours = ice_phase_removed(resample(recon.astype(np.complex128), origin, px, box_origin, truth.shape), foot)
    ideal = ideal_phase_image(data.truth_object, dose, px, np.random.default_rng(seed))
    ideal = ndimage.gaussian_filter(ideal, lowpass_px)[sy, sx] if lowpass_px > 0 else ideal[sy, sx]
    panels = ((ours, "live reconstruction"),
              (ideal, f"dose limit: ideal phase contrast\n(low-pass σ = {lowpass_px:g} px)"),
              (ice_phase_removed(truth, foot), "ground truth (noiseless)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), constrained_layout=True)
    for ax, (img, title) in zip(axes, panels):
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set(title=f"{title}, phase at {dose:g} e⁻/Å²" if "truth" not in title else title, xticks=[], yticks=[])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
