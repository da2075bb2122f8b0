"""Can the data see the probe's defocus? (not a test; gpu/MEASUREMENTS.md "What the data hold of
the defocus at 20 e⁻/Å²"):

    python tests/measure/defocus_power_measure.py hemoglobin 20 [--seed 0] [--exact-probe]
        [--offsets -20,10,20,30] [--iterations 30]

The frames of ``cryoptycho bench paper --realistic --seed S`` (all of ``ExperimentErrors.realistic``,
or its scan errors alone with ``--exact-probe``), prepared with the parallax fit off (the nominal
probe). The two halves' score of ``aberration_search_halves`` (the object fitted to one binomial
half by ``--iterations`` CG at each trial probe, the mean of both halves' data terms position by
position) at the nominal probe, at C10 offsets (nm) from it, and at the true aberrations
(``truth``: C10, C12a, C12b of the preset). For each trial against the nominal probe: the gain
G (positive: the trial explains the counts better), its standard error three ways and z = G/se:

* ``emp``: the paired per-position differences' spread, √(K var d) — the search's test today;
* ``pois``: the counting noise of the two halves' score for the objects held, ½ √(Σ n ℓ²) with
  ℓ = log(I_trial / I_nominal) per detector pixel and n both halves' counts (Var n = λ);
* ``ho``: the held-out half's data term alone, its gain and its Poisson se √(Σ n_test ℓ_test²).

And a Cramér–Rao bound of C10 for the full-dose data with the object, the positions and the
other aberrations known (``--crb``: the Fisher information Σ (∂λ/∂C10)² / λ at the truth, by a
central difference of ±1 nm): no estimator from these counts can be more precise."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
from cryoptycho.gpu.aberrations import ParametricProbe
from cryoptycho.gpu.backend import fft2, ifft2, to_numpy
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.operators import extract, illumination, make_batch, position_probes, scatter_add
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import aberrate, normalise_probe
from cryoptycho.gpu.reconstruct import (
    _data_terms,
    _halves,
    measured_probe_power,
    prepare,
    refine_full_batch,
)
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model


def intensities(obj, psi, batch):  # type: ignore[no-untyped-def]
    z = fft2(position_probes(psi, batch) * extract(obj, batch))
    return to_numpy(z.real * z.real + z.imag * z.imag).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--offsets", default="-20,10,20,30")
    ap.add_argument("--exact-probe", action="store_true")
    ap.add_argument("--crb", action="store_true")
    ap.add_argument("--mu0", type=float, default=None,
                    help="the trial objects' prior weight (default: the bench's, μ₀ auto for half the dose)")
    ap.add_argument("--warm", type=int, default=0,
                    help="every trial's object from the nominal probe's object (fitted by --iterations CG) by this "
                         "many more CG: the trials share the object's fitted noise")
    ap.add_argument("--crb-only", action="store_true", help="the bounds alone (no halves' trials)")
    ap.add_argument("--crb-iterations", type=int, default=300)
    ap.add_argument("--lowpass", default="",
                    help="Å, comma-separated: C10's bound with the object known only below each resolution "
                         "(1 + the low-passed T − 1; what a reconstruction exact to that resolution could give)")
    ap.add_argument("--true-positions", action="store_true",
                    help="the engine given the true positions (the probe error alone left)")
    args = ap.parse_args()
    errors = ExperimentErrors.realistic(args.seed)
    if args.exact_probe:
        errors = dataclasses.replace(errors, defocus=0.0, astigmatism=0.0)
    px = 0.8e-10
    t0 = time.perf_counter()
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=px, seed=args.seed, probe_seed=args.seed, errors=errors)
    if args.true_positions:
        data = dataclasses.replace(data, positions=data.truth_positions)
    opts = ReconOptions(iterations=args.iterations, refine_probe=False, parallax=False,
                        aberration_search_iterations=args.iterations)
    problem = prepare(data, opts)
    opts = problem.options.with_probe_decision(measured_probe_power(problem.counts_fft, problem.mask), True)
    if opts.mu0 == "auto":
        from cryoptycho.gpu.reconstruct import counts_per_object_pixel

        opts = opts.with_mu0_decision(counts_per_object_pixel(problem.counts_fft, problem.mask, problem.probe,
                                                              problem.batch))
    fit_counts, test_counts, fixed, kappa, power = _halves(problem, opts, 15)
    if args.mu0 is not None:
        fixed = fixed.model_copy(update={"mu0": args.mu0})
    n_test = to_numpy(test_counts).astype(np.float64)
    n_all = n_test + to_numpy(fit_counts).astype(np.float64)
    mask = 1.0 if problem.mask is None else to_numpy(problem.mask)
    names = ("C10", "C12a", "C12b")
    model = ParametricProbe(problem.probe, problem.geometry.pixel_size, problem.energy, names)
    truth = errors.probe_errors
    trials = {"nominal": {}}
    for o in args.offsets.split(","):
        trials[f"C10{float(o):+g}"] = {"C10": float(o) * 1e-9}
    if truth:
        trials["truth"] = truth
    print(f"# {args.sample} {args.dose:g} seed {args.seed} exact_probe={args.exact_probe}: "
          f"{problem.batch.size} positions, truth {({k: round(v * 1e9, 2) for k, v in truth.items()})}", flush=True)
    rows = {}
    if args.crb_only:
        trials = {}
        args.crb = True
    start = problem.object
    if args.warm and trials:
        start, _, _ = refine_full_batch(problem.object, model.probe(), fit_counts, problem.batch, problem.mask,
                                        fixed, args.iterations, kappa=kappa, probe_power=power)
    for name, coeffs in trials.items():
        t = time.perf_counter()
        x = np.array([coeffs.get(n, 0.0) for n in names]) * model.unit
        psi = model.probe(x)
        obj, fitted, _ = refine_full_batch(start, psi, fit_counts, problem.batch, problem.mask, fixed,
                                           args.warm or args.iterations, kappa=kappa, probe_power=power)
        test = _data_terms(obj, fitted, test_counts, problem.batch, problem, opts)
        fit = _data_terms(obj, fitted, fit_counts, problem.batch, problem, opts)
        rows[name] = (0.5 * (test + fit), test, np.log(intensities(obj, fitted, problem.batch) + 1e-9))
        print(f"#   {name}: {time.perf_counter() - t:.0f} s", flush=True)
    s0, t0_, l0 = rows.get("nominal", (None, None, None))
    k = 0 if s0 is None else len(s0)
    for name in trials:
        if name == "nominal":
            continue
        s, te, ll = rows[name]
        d = s0 - s
        gain = float(d.sum())
        se_emp = math.sqrt(k * float(np.var(d, ddof=1)))
        ell = (ll - l0) * mask
        se_pois = 0.5 * math.sqrt(float((n_all * ell**2).sum()))
        g_ho = float((t0_ - te).sum())
        se_ho = math.sqrt(float((n_test * ell**2).sum()))
        se_ho_emp = math.sqrt(k * float(np.var(t0_ - te, ddof=1)))
        print(json.dumps({"seed": args.seed, "exact": args.exact_probe, "true_pos": args.true_positions,
                          "cg": args.iterations, "warm": args.warm, "mu0": args.mu0, "trial": name, "gain": round(gain, 1),
                          "se_emp": round(se_emp, 1), "z_emp": round(gain / se_emp, 2),
                          "se_pois": round(se_pois, 1), "z_pois": round(gain / se_pois, 2),
                          "gain_ho": round(g_ho, 1), "se_ho_pois": round(se_ho, 1), "z_ho_pois": round(g_ho / se_ho, 2),
                          "z_ho_emp": round(g_ho / se_ho_emp, 2)}), flush=True)
    if args.crb:
        # full dose, the truth: object, positions, probe (C10 moved by ±1 nm around it)
        geo = fit_geometry(np.asarray(data.truth_positions), px, data.frame_shape, margin_px=4)
        batch = make_batch(geo.to_pixels(np.asarray(data.truth_positions)), geo.object_shape,
                           data.frame_shape, xp=np)
        obj_true = np.ones(geo.object_shape, dtype=np.complex128)
        # the truth object on the engine's canvas: the simulation's transmission (thin projection)
        tobj = np.asarray(data.truth_object)
        oy = round((data.truth_origin[0] - geo.origin[0]) / px)
        ox = round((data.truth_origin[1] - geo.origin[1]) / px)
        ys, xs = max(oy, 0), max(ox, 0)
        ye, xe = min(oy + tobj.shape[0], geo.object_shape[0]), min(ox + tobj.shape[1], geo.object_shape[1])
        obj_true[ys:ye, xs:xe] = tobj[ys - oy:ye - oy, xs - ox:xe - ox]
        scale = float(np.asarray(data.frames, dtype=np.float64).sum()) / len(data.positions)
        h = 1e-9
        probe0 = normalise_probe(np.asarray(data.truth_probe).astype(np.complex128), scale)
        inten0 = intensities(obj_true, probe0, batch)
        w = mask / (inten0 + 1e-9)
        derivs = []
        for name in names:
            plus = intensities(obj_true, aberrate(probe0, px, data.energy, {name: h}), batch)
            minus = intensities(obj_true, aberrate(probe0, px, data.energy, {name: -h}), batch)
            derivs.append((plus - minus) / (2 * h) * 1e-9)  # per nm
        known = np.array([[float((w * a * b).sum()) for b in derivs] for a in derivs])
        crb_known = math.sqrt(1.0 / known[0, 0])
        crb_known3 = math.sqrt(np.linalg.inv(known)[0, 0])
        # the object unknown (no prior): I_eff = I_cc − I_co I_oo⁻¹ I_oc, I_oo by CG (matrix-free)
        z0 = fft2(position_probes(probe0, batch) * extract(obj_true, batch))
        psi_k = position_probes(probe0, batch)

        def jac(v):  # object perturbation → intensity perturbation
            return 2.0 * (z0.conj() * fft2(psi_k * extract(v, batch))).real

        def jac_t(r):  # its adjoint (real inner product over the object's real and imaginary parts)
            return scatter_add(psi_k.conj() * ifft2(2.0 * r * z0), batch)

        for cut in [float(c) for c in args.lowpass.split(",") if c]:
            fy = np.fft.fftfreq(obj_true.shape[0], d=px * 1e10)[:, None]
            fx = np.fft.fftfreq(obj_true.shape[1], d=px * 1e10)[None, :]
            keep = np.hypot(fy, fx) <= 1.0 / cut
            smooth = 1.0 + np.fft.ifft2(np.fft.fft2(obj_true - 1.0) * keep)
            i0 = intensities(smooth, probe0, batch)
            dd = [(intensities(smooth, aberrate(probe0, px, data.energy, {"C10": h}), batch)
                   - intensities(smooth, aberrate(probe0, px, data.energy, {"C10": -h}), batch)) / (2 * h) * 1e-9]
            info = float((mask / (i0 + 1e-9) * dd[0] ** 2).sum())
            print(json.dumps({"seed": args.seed, "dose": args.dose, "object_known_to_A": cut,
                              "crb_C10_nm": round(1.0 / math.sqrt(info), 3)}), flush=True)
        rng = np.random.default_rng(0)
        v = rng.normal(size=obj_true.shape) + 1j * rng.normal(size=obj_true.shape)
        r = rng.normal(size=z0.shape)
        lhs, rhs_ = float((r * jac(v)).sum()), float(np.vdot(jac_t(r), v).real)
        fd = (intensities(obj_true + 1e-6 * v, probe0, batch) - intensities(obj_true - 1e-6 * v, probe0, batch)) / 2e-6
        assert abs(lhs - rhs_) < 1e-8 * abs(lhs), ("adjoint", lhs, rhs_)
        assert np.abs(fd - jac(v)).max() < 1e-5 * np.abs(fd).max(), "finite difference"
        diag = 2.0 * np.asarray(illumination(probe0, batch)) + 1e-6 * float(np.max(illumination(probe0, batch)))

        def fisher_oo(v):
            return jac_t(w * jac(v)) + 1e-6 * float(diag.max()) * v

        def cg(b):
            x = np.zeros_like(b)
            r = b.copy()
            zz = r / diag
            p = zz.copy()
            rz = float(np.vdot(r, zz).real)
            for it in range(args.crb_iterations):
                ap_ = fisher_oo(p)
                alpha = rz / float(np.vdot(p, ap_).real)
                x += alpha * p
                r -= alpha * ap_
                zz = r / diag
                rz_new = float(np.vdot(r, zz).real)
                if math.sqrt(abs(rz_new)) < 1e-6 * math.sqrt(abs(float(np.vdot(b, b / diag).real))):
                    break
                p = zz + (rz_new / rz) * p
                rz = rz_new
            return x, it + 1

        rhs = [jac_t(w * d) for d in derivs]
        sols = [cg(b) for b in rhs]
        cross = np.array([[float(np.vdot(rhs[i], sols[j][0]).real) for j in range(3)] for i in range(3)])
        eff = known - 0.5 * (cross + cross.T)
        crb_prof = math.sqrt(1.0 / eff[0, 0]) if eff[0, 0] > 0 else math.inf
        crb_prof3 = math.sqrt(np.linalg.inv(eff)[0, 0])
        print(json.dumps({"seed": args.seed, "dose": args.dose,
                          "crb_C10_nm_object_known": round(crb_known, 3),
                          "crb_C10_nm_object_known_astig_unknown": round(crb_known3, 3),
                          "crb_C10_nm_object_unknown": round(crb_prof, 3),
                          "crb_C10_nm_object_and_astig_unknown": round(crb_prof3, 3),
                          "crb_C12a_C12b_nm_object_unknown": [round(math.sqrt(np.linalg.inv(eff)[i, i]), 3) for i in (1, 2)],
                          "cg_iterations": [it for _, it in sols],
                          "note": "positions known; thin-object intensities at the truth; no object prior"}))
    print(f"# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
