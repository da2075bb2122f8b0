"""`cryoptycho bench bm3d --recon`: the BM3D prior's effect on a low-dose reconstruction.

For each dose one simulated scan of hemoglobin (as `bench paper` simulates it) is reconstructed
with the same iterations, seed and fixed true probe under each prior — none, Tikhonov (default
μ₀) and the sparse prior with our BM3D (default μ₁, refresh interval and σ estimated from the
iterate, or the ``--mu1`` / ``--denoise-every`` / ``--sparse-sigma`` values given) — and scored
against the truth like `bench paper` (gpu/sim/evaluation.py), beside the dose's quantum limit.
See gpu/BM3D.md, "Effect on a low-dose reconstruction".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
from cryoptycho.gpu.backend import BackendUnavailable, get_xp, to_numpy
from rich.console import Console
from rich.table import Table

_RESOLUTIONS = {
    "frc_raw_1bit_m": "particle/raw/1-bit",
    "frc_pooled_1bit_m": "particle/pooled/1-bit",
}


@dataclass
class ReconConfig:
    """One `--recon` run: the same simulated data per dose under every prior."""

    doses: list[float]
    priors: list[str]
    mu1: list[float]  #: sparse-prior weights (one sparse reconstruction per weight and σ)
    denoise_every: int
    iterations: int
    frame_size: int
    pixel_size: float  #: m
    backend: str
    seed: int
    #: BM3D noise σ (rad) of the sparse prior; None: estimated from each iterate (the engine)
    sigmas: list[float | None] = field(default_factory=lambda: [None])
    #: extra simulate_ptychography keywords
    sim_options: dict[str, Any] = field(default_factory=dict)


def _scores(ev: Any) -> dict[str, float]:
    summary = ev.summary()
    row = {key: summary["resolution_m"][name] for key, name in _RESOLUTIONS.items()}
    row.update(phase_correlation=summary["phase_correlation"], nrmse=summary["nrmse"])
    return row


def _reconstruct(data: Any, opts: Any, sigma: float | None) -> tuple[np.ndarray, Any, Any]:
    """The object, its origin and the options it ran with (μ₀ "auto" decided) after
    ``opts.iterations`` CG iterations (probe fixed)."""
    from cryoptycho.gpu.priors import SparsePrior
    from cryoptycho.gpu.reconstruct import prepare, reconstruct, refine_full_batch

    if sigma is None:
        state = reconstruct(data, opts)
        return to_numpy(state.object), state.geometry.origin, state.options
    # The engine's sparse prior estimates σ from each iterate; a fixed σ needs the prior built
    # here and handed to the same CG loop reconstruct() runs.
    problem = prepare(data, opts)
    sparse = SparsePrior(opts.denoiser, opts.mu1, opts.denoise_every, sigma=sigma)
    obj, _, _ = refine_full_batch(
        problem.object,
        problem.probe,
        problem.counts_fft,
        problem.batch,
        problem.mask,
        opts,
        opts.iterations,
        sparse=sparse,
        kappa=problem.kappa,
        probe_power=problem.probe_power,
    )
    return to_numpy(obj), problem.geometry.origin, opts.to_dict()


def recon_rows(model: Any, cfg: ReconConfig, report: Any = None) -> list[dict[str, Any]]:
    """Per dose: one row per prior (the sparse prior once per μ₁ and σ), then the quantum
    limit. ``report(row)`` is called as each row is done."""
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.sim.evaluation import evaluate_against_truth, quantum_limit
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

    runs: list[tuple[str, dict[str, Any], float | None]] = []
    for prior in cfg.priors:
        if prior != "sparse":
            runs.append((prior, {}, None))
            continue
        runs += [
            (prior, {"mu1": mu1, "denoise_every": cfg.denoise_every, "denoiser": "bm3d"}, sigma)
            for mu1 in cfg.mu1
            for sigma in cfg.sigmas
        ]
    rows = []
    pool = 3
    for dose in cfg.doses:
        data = simulate_ptychography(
            model,
            dose=dose,
            frame_size=cfg.frame_size,
            pixel_size=cfg.pixel_size,
            seed=cfg.seed,
            probe_seed=cfg.seed,
            backend=cfg.backend,
            **cfg.sim_options,
        )
        common = {"dose": dose, "counts_per_pattern": float(data.metadata["counts_per_pattern"])}
        for prior, extra, sigma in runs:
            # Same data, iterations, seed (random start) and fixed true probe: only the prior differs.
            opts = ReconOptions(
                iterations=cfg.iterations,
                refine_probe=False,
                backend=cfg.backend,  # type: ignore[arg-type]
                seed=cfg.seed,
                prior=prior,
                **extra,
            )  # type: ignore[arg-type]
            start = time.perf_counter()
            obj, origin, used = _reconstruct(data, opts, sigma)
            seconds = time.perf_counter() - start
            ev = evaluate_against_truth(
                obj,
                origin,
                data.truth_object,
                data.truth_origin,
                cfg.pixel_size,
                data.positions,
                pool=pool,
            )
            weight = {"sparse": opts.mu1, "tikhonov": used["mu0"]}.get(prior)
            row = {**common, "prior": prior, "weight": weight, **_scores(ev), "seconds": seconds}
            if prior == "sparse":
                row.update(denoise_every=opts.denoise_every, sigma=sigma)
            rows.append(row)
            if report is not None:
                report(row)
        limit = quantum_limit(
            data.truth_object,
            data.truth_origin,
            cfg.pixel_size,
            data.positions,
            dose,
            seed=cfg.seed,
            pool=pool,
        )
        rows.append(
            {**common, "prior": "quantum limit", "weight": None, **_scores(limit), "seconds": None}
        )
    return rows


def _angstrom(v: float) -> str:
    return f"{v * 1e10:.1f}" if np.isfinite(v) else "n/r"  # n/r: below threshold from ring 1


def _sigma(row: dict[str, Any]) -> str:
    if row["prior"] != "sparse":
        return "–"
    return "est." if row.get("sigma") is None else f"{row['sigma']:g}"


def recon_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    for col in (
        "dose [e⁻/Å²]",
        "prior",
        "μ",
        "σ [rad]",
        "1-bit raw [Å]",
        "1-bit pooled [Å]",
        "phase corr.",
        "NRMSE",
        "time [s]",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['dose']:g}",
            r["prior"],
            "–" if r["weight"] is None else f"{r['weight']:g}",
            _sigma(r),
            _angstrom(r["frc_raw_1bit_m"]),
            _angstrom(r["frc_pooled_1bit_m"]),
            f"{r['phase_correlation']:.3f}",
            f"{r['nrmse']:.3f}",
            "–" if r["seconds"] is None else f"{r['seconds']:.1f}",
        )
    return table


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unresolved (∞) resolutions as null: JSON has no infinity."""
    return [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]


def _numbers(text: str, kind: type, hint: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(
            f"must be comma-separated numbers ({exc})", param_hint=hint
        ) from exc
    if not values:
        raise click.BadParameter("needs at least one value", param_hint=hint)
    return values


def _sigmas(text: str) -> list[float | None]:
    values: list[float | None] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item == "est":
            values.append(None)
            continue
        try:
            value = float(item)
        except ValueError as exc:
            raise click.BadParameter(
                f"each value must be a number (rad) or est, got {item!r}",
                param_hint="--sparse-sigma",
            ) from exc
        if not value > 0:
            raise click.BadParameter(f"σ must be > 0, got {item!r}", param_hint="--sparse-sigma")
        values.append(value)
    if not values:
        raise click.BadParameter("needs at least one value", param_hint="--sparse-sigma")
    return values


def _recon_command(params: dict[str, Any]) -> None:
    """``--recon``: parse the command's ``params``, run :func:`recon_rows`, print and save."""
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.sim.specimen import load_model

    dose_list = _numbers(params["doses"], float, "--doses")
    if min(dose_list) <= 0:
        raise click.BadParameter("every dose must be > 0", param_hint="--doses")
    prior_list = [p.strip() for p in params["priors"].split(",") if p.strip()]
    if not prior_list or set(prior_list) - {"none", "tikhonov", "sparse"}:
        raise click.BadParameter(
            f"choose from none, tikhonov, sparse (got {params['priors']!r})", param_hint="--priors"
        )
    defaults = ReconOptions()
    mu1 = params["mu1"]
    mu1_list = _numbers(mu1, float, "--mu1") if mu1 is not None else [defaults.mu1]
    if min(mu1_list) < 0:
        raise click.BadParameter("every weight must be >= 0", param_hint="--mu1")
    backend = params["backend"]
    try:
        get_xp(backend)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        model = load_model(params["sample"]).centred()
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="--sample") from exc
    every = params["denoise_every"]
    cfg = ReconConfig(
        doses=dose_list,
        priors=prior_list,
        mu1=mu1_list,
        denoise_every=every if every is not None else defaults.denoise_every,
        iterations=params["iterations"],
        frame_size=params["frame_size"],
        pixel_size=params["pixel_size"] * 1e-10,
        backend=backend,
        seed=params["seed"],
        sigmas=_sigmas(params["sparse_sigma"]),
    )
    console = Console()

    def report(r: dict[str, Any]) -> None:
        weight = "" if r["weight"] is None else f" μ={r['weight']:g}"
        sigma = f" σ={_sigma(r)}" if r["prior"] == "sparse" else ""
        console.print(
            f"{r['dose']:g} e⁻/Å² {r['prior']}{weight}{sigma}: phase corr. "
            f"{r['phase_correlation']:.3f}, 1-bit pooled {_angstrom(r['frc_pooled_1bit_m'])} Å "
            f"in {r['seconds']:.1f} s"
        )

    start = time.perf_counter()
    rows = recon_rows(model, cfg, report)
    title = (
        f"{params['sample']}: {cfg.iterations} CG iterations, {cfg.frame_size}² frames, "
        f"{params['pixel_size']:g} Å pixels, true probe fixed, sparse = open BM3D every "
        f"{cfg.denoise_every} it., {backend}"
    )
    console.print(recon_table(rows, title=title))
    console.print(f"wall time {time.perf_counter() - start:.0f} s")
    if params["json_path"]:
        with open(params["json_path"], "w", encoding="utf-8") as fh:
            json.dump(_json_safe(rows), fh, indent=2)
