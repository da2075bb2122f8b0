"""Is the scan's affine map identifiable at cryo doses, and which part of it costs the score?
(not a test; gpu/MEASUREMENTS.md "The scan's affine map on the proteasome at 20 e⁻/Å²"):

    python tests/measure/scan_identify_measure.py proteasome 20 [--seed 0] --part crb [--lowpass 15,8]
    python tests/measure/scan_identify_measure.py proteasome 20 [--seed 0] --part cost

The frames of ``cryoptycho bench paper --realistic --seed S`` (64×64, 0.8 Å, multislice,
``ExperimentErrors.realistic(S)``).

``crb``: Cramér–Rao bounds of the four entries of E = A − I (positions p = p₀ + (I + E)(p_nom − c),
c the scan's centre) for the full-dose counts at the truth (object, positions, probe: thin-object
intensities), from the Fisher information Σ (∂λ/∂θ)² / λ; ∂λ/∂p by a central difference of the
probe's sub-pixel shift (±0.05 px), ∂λ/∂E_ab = ∂λ/∂p_a (p_nom − c)_b. Three cases: the object
known; the object known only below each ``--lowpass`` resolution (a reconstruction exact to that
resolution: what an update of the map at such an object could be given); the object unknown
(profiled: I_eff = I_θθ − I_θo I_oo⁻¹ I_oθ, I_oo⁻¹ by preconditioned CG, no prior), optionally
with the probe's C10 / C12a / C12b unknown too (``--aberrations``). Also in the parametrisation
(isotropic scale, anisotropic scale, symmetric shear, rotation): the similarity's near-gauge.

``cost``: one reconstruction from the nominal positions (the probe corrected by the defaults'
parallax fit, 40 CG, the probe fixed; what ``scan_affine_measure.py``'s ``nominal`` run does),
scored after registering it through parts of the nominal → true map: translation only (the
official score), the rotation, the isotropic scale, the similarity (both), the symmetric part
(scale and shear, no rotation), the full affine map.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
from cryoptycho.gpu.backend import fft2, ifft2, to_numpy
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.operators import extract, illumination, make_batch, position_probes, scatter_add
from cryoptycho.gpu.probes import aberrate, normalise_probe
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model

# entries (Eyy, Eyx, Exy, Exx) = G @ (iso, aniso, shear, rot)
G = np.array([[1, 1, 0, 0], [0, 0, 1, -1], [0, 0, 1, 1], [1, -1, 0, 0]], dtype=np.float64)
PARTS = ("iso_scale", "aniso_scale", "shear", "rotation")


def intensities(obj, psi, batch):  # type: ignore[no-untyped-def]
    z = fft2(position_probes(psi, batch) * extract(obj, batch))
    return to_numpy(z.real * z.real + z.imag * z.imag).astype(np.float64)


def bounds(info: np.ndarray) -> dict:
    """1σ bounds (per cent) of the entries and of the four parts, each alone and jointly."""
    cov = np.linalg.inv(info)
    info_p = G.T @ info @ G
    cov_p = np.linalg.inv(info_p)
    return {"entries_joint_pct": [round(100 * math.sqrt(cov[i, i]), 4) for i in range(4)],
            "entries_alone_pct": [round(100 / math.sqrt(info[i, i]), 4) for i in range(4)],
            "parts_joint_pct": {n: round(100 * math.sqrt(cov_p[i, i]), 4) for i, n in enumerate(PARTS)},
            "parts_alone_pct": {n: round(100 / math.sqrt(info_p[i, i]), 4) for i, n in enumerate(PARTS)}}


def crb(data, args) -> None:  # type: ignore[no-untyped-def]
    px = data.real_pixel_size
    true_pos = np.asarray(data.truth_positions)
    geo = fit_geometry(true_pos, px, data.frame_shape, margin_px=4)
    pix = np.asarray(geo.to_pixels(true_pos), dtype=np.float64)
    nom = np.asarray(geo.to_pixels(np.asarray(data.positions)), dtype=np.float64)
    lever = nom - nom.mean(axis=0)
    q = 1e-4
    batch = make_batch(pix, geo.object_shape, data.frame_shape, quantum=q, xp=np)
    obj_true = np.ones(geo.object_shape, dtype=np.complex128)
    tobj = np.asarray(data.truth_object)
    oy = round((data.truth_origin[0] - geo.origin[0]) / px)
    ox = round((data.truth_origin[1] - geo.origin[1]) / px)
    ys, xs = max(oy, 0), max(ox, 0)
    ye, xe = min(oy + tobj.shape[0], geo.object_shape[0]), min(ox + tobj.shape[1], geo.object_shape[1])
    obj_true[ys:ye, xs:xe] = tobj[ys - oy:ye - oy, xs - ox:xe - ox]
    scale = float(np.asarray(data.frames, dtype=np.float64).sum()) / len(data.positions)
    probe0 = normalise_probe(np.asarray(data.truth_probe).astype(np.complex128), scale)
    mask = 1.0 if data.mask is None else np.asarray(data.mask, dtype=np.float64)
    psi_k = position_probes(probe0, batch)
    trans: list = []  # ∂λ/∂(a global translation), the check: the object absorbs it all

    def jacobian(obj):  # type: ignore[no-untyped-def]
        """Object perturbation → intensity perturbation at ``obj`` (all positions), and its adjoint."""
        z = fft2(psi_k * extract(obj, batch))

        def jac(v):  # type: ignore[no-untyped-def]
            return 2.0 * (z.conj() * fft2(psi_k * extract(v, batch))).real

        def jac_t(r):  # type: ignore[no-untyped-def]
            return scatter_add(psi_k.conj() * ifft2(2.0 * r * z), batch)

        return jac, jac_t, to_numpy(z.real * z.real + z.imag * z.imag).astype(np.float64)

    def derivs_at(obj):  # type: ignore[no-untyped-def]
        # moving the probe by δ against the object = moving the object by −δ (the exit wave's
        # translation leaves the intensities unchanged): ∂λ_k/∂p_a = −J_k ∂_a O, exact, where a
        # finite difference of the engine's sub-pixel probe shift is not (its window wraps)
        jac = jacobian(obj)[0]
        fy = np.fft.fftfreq(obj.shape[0])[:, None]
        fx = np.fft.fftfreq(obj.shape[1])[None, :]
        spec = np.fft.fft2(obj - 1.0)
        out = []
        for a, f in enumerate((fy, fx)):
            dp = -jac(np.fft.ifft2(2j * np.pi * f * spec))
            trans.append(dp)
            for b in (0, 1):
                out.append(dp * lever[:, b][:, None, None])
        return out  # order (yy, yx, xy, xx): E_ab moves p_a by E_ab lever_b

    t = time.perf_counter()
    jac, jac_t, inten0 = jacobian(obj_true)
    w = mask / (inten0 + 1e-9)
    derivs = derivs_at(obj_true)
    t_derivs = trans[:2]
    names = ("C10", "C12a", "C12b") if args.aberrations else ()
    for name in names:
        hh = 1e-9
        plus = intensities(obj_true, aberrate(probe0, px, data.energy, {name: hh}), batch)
        minus = intensities(obj_true, aberrate(probe0, px, data.energy, {name: -hh}), batch)
        derivs.append((plus - minus) / (2 * hh) * 1e-9)  # per nm
    n = len(derivs)
    known = np.array([[float((w * a * b).sum()) for b in derivs] for a in derivs])
    print(json.dumps({"case": "object known", **bounds(known[:4, :4]), "seconds": round(time.perf_counter() - t)}),
          flush=True)
    for cut in [float(c) for c in args.lowpass.split(",") if c]:
        fy = np.fft.fftfreq(obj_true.shape[0], d=px * 1e10)[:, None]
        fx = np.fft.fftfreq(obj_true.shape[1], d=px * 1e10)[None, :]
        smooth = 1.0 + np.fft.ifft2(np.fft.fft2(obj_true - 1.0) * (np.hypot(fy, fx) <= 1.0 / cut))
        i0 = jacobian(smooth)[2]
        dd = derivs_at(smooth)
        info = np.array([[float((mask / (i0 + 1e-9) * a * b).sum()) for b in dd] for a in dd])
        print(json.dumps({"case": f"object known below {cut:g} A", **bounds(info)}), flush=True)
    # the object unknown (no prior)
    rng = np.random.default_rng(0)
    v = rng.normal(size=obj_true.shape) + 1j * rng.normal(size=obj_true.shape)
    r = rng.normal(size=inten0.shape)
    lhs, rhs_ = float((r * jac(v)).sum()), float(np.vdot(jac_t(r), v).real)
    assert abs(lhs - rhs_) < 1e-8 * abs(lhs), ("adjoint", lhs, rhs_)
    diag = 2.0 * np.asarray(illumination(probe0, batch)) + 1e-6 * float(np.max(illumination(probe0, batch)))

    def fisher_oo(v):  # type: ignore[no-untyped-def]
        return jac_t(w * jac(v)) + 1e-6 * float(diag.max()) * v

    def cg(b):  # type: ignore[no-untyped-def]
        x = np.zeros_like(b)
        r = b.copy()
        zz = r / diag
        p = zz.copy()
        rz = float(np.vdot(r, zz).real)
        ref = math.sqrt(abs(float(np.vdot(b, b / diag).real)))
        for it in range(args.crb_iterations):
            ap_ = fisher_oo(p)
            alpha = rz / float(np.vdot(p, ap_).real)
            x += alpha * p
            r -= alpha * ap_
            zz = r / diag
            rz_new = float(np.vdot(r, zz).real)
            if math.sqrt(abs(rz_new)) < 1e-6 * ref:
                break
            p = zz + (rz_new / rz) * p
            rz = rz_new
        return x, it + 1

    rhs = [jac_t(w * d) for d in derivs]
    sols = [cg(b) for b in rhs]
    cross = np.array([[float(np.vdot(rhs[i], sols[j][0]).real) for j in range(n)] for i in range(n)])
    eff = known - 0.5 * (cross + cross.T)
    out = {"case": "object unknown (profiled), probe known", **bounds(eff[:4, :4]),
           "cg_iterations": [it for _, it in sols], "seconds": round(time.perf_counter() - t)}
    # the share of each part's information the object absorbs (1 = a gauge)
    info_p_known, info_p_eff = G.T @ known[:4, :4] @ G, G.T @ eff[:4, :4] @ G
    out["absorbed_by_object"] = {nm: round(1 - info_p_eff[i, i] / info_p_known[i, i], 5) for i, nm in enumerate(PARTS)}
    print(json.dumps(out), flush=True)
    for a, d in enumerate(t_derivs):
        b = jac_t(w * d)
        x, its = cg(b)
        i_known = float((w * d * d).sum())
        print(json.dumps({"check": f"global translation axis {a}", "absorbed_by_object":
                          round(float(np.vdot(b, x).real) / i_known, 5), "cg_iterations": its}), flush=True)
    if names:
        cov = np.linalg.inv(eff)[:4, :4]
        print(json.dumps({"case": "object and C10/C12a/C12b unknown", **bounds(np.linalg.inv(cov)),
                          "aberration_bounds_nm": [round(math.sqrt(np.linalg.inv(eff)[i, i]), 3) for i in range(4, n)]}),
              flush=True)


def cost(data, args) -> None:  # type: ignore[no-untyped-def]
    from cryoptycho.gpu.metrics import affine_registered, fit_affine
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import _initial_probe, _parallax_corrected, reconstruct
    from cryoptycho.gpu.sim.evaluation import evaluate_against_truth

    base = ReconOptions(iterations=args.iterations, refine_probe=False, parallax=False)
    probe = to_numpy(_parallax_corrected(_initial_probe(data, base, np, None), data, base.merged({"parallax": "auto"}),
                                         np.asarray(data.positions))[0])
    nominal = dataclasses.replace(data, probe=probe, probe_model=None)
    t = time.perf_counter()
    state = reconstruct(nominal, base)
    px = data.real_pixel_size
    obj, origin = to_numpy(state.object), state.geometry.origin
    used = np.asarray(state.positions)
    b, off, c = fit_affine(used, np.asarray(data.truth_positions))
    # polar decomposition B = R S (R a rotation, S symmetric positive)
    u, sv, vt = np.linalg.svd(b)
    rot = u @ vt
    sym = vt.T @ np.diag(sv) @ vt
    iso = math.sqrt(abs(np.linalg.det(b)))
    parts = {"translation (official)": np.eye(2), "rotation": rot, "iso_scale": iso * np.eye(2),
             "similarity": iso * rot, "symmetric (scale+shear)": sym, "rotation+aniso (no iso)": rot @ sym / iso,
             "full affine": b}
    print(json.dumps({"map_used_to_true": [round(float(x), 5) for x in b.ravel()],
                      "rotation_deg": round(math.degrees(math.atan2(rot[1, 0], rot[0, 0])), 3),
                      "iso_scale_pct": round(100 * (iso - 1), 3),
                      "recon_seconds": round(time.perf_counter() - t)}), flush=True)
    for name, m in parts.items():
        target = c + (used - c) @ m.T + off
        o = affine_registered(obj, origin, px, used, target)
        ev = evaluate_against_truth(o, origin, data.truth_object, data.truth_origin, px, data.truth_positions)
        print(json.dumps({"registered": name, "phase_corr": round(ev.phase_correlation, 4),
                          "phase_nrmse": round(ev.phase_nrmse, 4),
                          "res_1bit_A": round(ev.resolutions["particle/pooled/1-bit"] * 1e10, 2)}), flush=True)


def halves(data, args) -> None:  # type: ignore[no-untyped-def]
    """The two halves' score (as ``aberration_search_halves`` scores a probe) of trial scan maps
    against the nominal positions: the object fitted to one binomial half at each trial's
    positions (``--iterations`` CG, the bench's prior at half the dose), the mean of both halves'
    data terms position by position; gain G > 0 when the trial explains the counts better, its
    standard error √(K var d) from the paired per-position differences, z = G / se."""
    from cryoptycho.gpu.metrics import fit_affine
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import (
        _halves,
        _initial_probe,
        _parallax_corrected,
        counts_per_object_pixel,
        measured_probe_power,
        prepare,
    )

    base = ReconOptions(iterations=args.iterations, refine_probe=False, parallax=False)
    probe = to_numpy(_parallax_corrected(_initial_probe(data, base, np, None), data, base.merged({"parallax": "auto"}),
                                         np.asarray(data.positions))[0])
    # scan_search=True: prepare leaves the canvas room for a few per cent of scan map (it does not search)
    problem = prepare(dataclasses.replace(data, probe=probe, probe_model=None), base.merged({"scan_search": True}))
    opts = problem.options.with_probe_decision(measured_probe_power(problem.counts_fft, problem.mask), True)
    if opts.mu0 == "auto":
        opts = opts.with_mu0_decision(counts_per_object_pixel(problem.counts_fft, problem.mask, problem.probe,
                                                              problem.batch))
    fit_counts, test_counts, fixed, kappa, power = _halves(problem, opts, 15)
    geo = problem.geometry
    nom = np.asarray(geo.to_pixels(problem.positions), dtype=np.float64)
    true = np.asarray(geo.to_pixels(np.asarray(data.truth_positions)), dtype=np.float64)
    b, _, c = fit_affine(nom, true)
    u, _, vt = np.linalg.svd(b)
    rot = u @ vt
    iso = math.sqrt(abs(np.linalg.det(b)))
    if args.part == "estimate":
        estimate(args, geo, nom, b, c, lambda m: _score(m, problem, opts, fit_counts, test_counts, fixed, kappa, power))
        return
    trials = {"nominal": np.eye(2), "true affine": b, "mirrored (2I - B)": 2 * np.eye(2) - b,
              "true similarity": iso * rot}
    rows = {}
    for name, m in trials.items():
        t = time.perf_counter()
        got = _score(m, problem, opts, fit_counts, test_counts, fixed, kappa, power, nom, c)
        if got is None:
            print(json.dumps({"trial": name, "skipped": "off the canvas"}), flush=True)
            continue
        rows[name] = got
        print(f"#   {name}: {time.perf_counter() - t:.0f} s", flush=True)
    s0, t0_, f0 = rows["nominal"]
    k = len(s0)
    for name, (s_, te, fi) in rows.items():
        if name == "nominal":
            continue
        d = s0 - s_
        se = math.sqrt(k * float(np.var(d, ddof=1)))
        dt, df = t0_ - te, f0 - fi
        print(json.dumps({"trial": name, "map": [round(float(x), 5) for x in trials[name].ravel()],
                          "gain_halves": round(float(d.sum()), 1), "se": round(se, 1),
                          "z": round(float(d.sum()) / se, 2),
                          "gain_held_out": round(float(dt.sum()), 1),
                          "z_held_out": round(float(dt.sum()) / math.sqrt(k * float(np.var(dt, ddof=1))), 2),
                          "gain_fitted": round(float(df.sum()), 1)}), flush=True)


def _score(m, problem, opts, fit_counts, test_counts, fixed, kappa, power, nom=None, c=None):  # type: ignore[no-untyped-def]
    """Per-position (halves' mean, held-out, fitted) data terms at the positions c + m (nom − c)."""
    from cryoptycho.gpu.reconstruct import _data_terms, refine_full_batch

    geo = problem.geometry
    if nom is None:
        nom = np.asarray(geo.to_pixels(problem.positions), dtype=np.float64)
        c = nom.mean(axis=0)
    hi = np.asarray(geo.object_shape, dtype=np.float64) - np.asarray(geo.probe_shape) - 1.0
    pos = c + (nom - c) @ m.T
    if np.any(pos < 0) or np.any(pos > hi):
        return None
    batch = make_batch(pos, geo.object_shape, geo.probe_shape, xp=problem.xp)
    obj, fitted, _ = refine_full_batch(problem.object, problem.probe, fit_counts, batch, problem.mask, fixed,
                                       opts.iterations, kappa=kappa, probe_power=power)
    te = _data_terms(obj, fitted, test_counts, batch, problem, opts)
    fi = _data_terms(obj, fitted, fit_counts, batch, problem, opts)
    return 0.5 * (te + fi), te, fi


def estimate(args, geo, nom, b, c, score) -> None:  # type: ignore[no-untyped-def]
    """The map from the halves' score, one part at a time: trials at ±δ along each part
    (isotropic scale, anisotropic scale, shear, rotation) about the nominal scan, the vertex of
    the parabola through the three scores per part (the parts' information is nearly
    uncorrelated: the bounds alone and jointly agree to 2 %), its standard error from the paired
    per-position differences."""
    delta = args.step / 100.0
    t = time.perf_counter()
    s0 = score(np.eye(2))[0]
    k = len(s0)
    truth = G.T @ np.array([b[0, 0] - 1, b[0, 1], b[1, 0], b[1, 1] - 1]) / np.diag(G.T @ G)
    found = np.zeros(4)
    for i, name in enumerate(PARTS):
        e = G[:, i] * delta
        m = np.eye(2) + e.reshape(2, 2)
        mm = np.eye(2) - e.reshape(2, 2)
        sp, sm = score(m), score(mm)
        if sp is None or sm is None:
            print(json.dumps({"part": name, "skipped": "off the canvas"}), flush=True)
            continue
        dp, dm = sp[0] - s0, sm[0] - s0  # per position
        curv = float((dp + dm).sum())
        slope = float((dp - dm).sum()) / 2
        vertex = -delta * slope / curv if curv > 0 else math.nan
        se_slope = math.sqrt(k * float(np.var((dp - dm) / 2, ddof=1)))
        found[i] = vertex if math.isfinite(vertex) else 0.0
        print(json.dumps({"part": name, "truth_pct": round(100 * truth[i], 3), "vertex_pct": round(100 * vertex, 3),
                          "se_pct": round(100 * delta * se_slope / curv, 3) if curv > 0 else None,
                          "gain_plus": round(-float(dp.sum()), 1), "gain_minus": round(-float(dm.sum()), 1),
                          "curvature_nats_per_pct2": round(curv / (100 * delta) ** 2, 2),
                          "seconds": round(time.perf_counter() - t)}), flush=True)
    e = (G @ found).reshape(2, 2)
    pos_true_rel = (nom - c) @ (b - np.eye(2)).T
    pos_found_rel = (nom - c) @ e.T
    rms = lambda x: float(np.sqrt((x ** 2).sum(axis=1).mean()))
    print(json.dumps({"found_entries_pct": [round(100 * float(x), 3) for x in e.ravel()],
                      "truth_entries_pct": [round(100 * float(x), 3) for x in (b - np.eye(2)).ravel()],
                      "affine_error_rms_px_before": round(rms(pos_true_rel), 3),
                      "affine_error_rms_px_after": round(rms(pos_true_rel - pos_found_rel), 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=["crb", "cost", "halves", "estimate"], default="crb")
    ap.add_argument("--lowpass", default="")
    ap.add_argument("--aberrations", action="store_true")
    ap.add_argument("--true-positions", action="store_true",
                    help="halves / estimate: about the true positions (the map left is 0: the vertices are the bias)")
    ap.add_argument("--step", type=float, default=1.5, help="estimate: the trials' step along each part, per cent")
    ap.add_argument("--crb-iterations", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=None, help="CG (default: cost 40, halves 30)")
    args = ap.parse_args()
    if args.iterations is None:
        args.iterations = 30 if args.part in ("halves", "estimate") else 40
    t0 = time.perf_counter()
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=0.8e-10, seed=args.seed, probe_seed=args.seed,
                                 errors=ExperimentErrors.realistic(args.seed))
    if args.true_positions:
        data = dataclasses.replace(data, positions=data.truth_positions)
    print(f"# {args.sample} {args.dose:g} seed {args.seed}: {len(data.positions)} positions, "
          f"simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    {"crb": crb, "cost": cost, "halves": halves, "estimate": halves}[args.part](data, args)
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
