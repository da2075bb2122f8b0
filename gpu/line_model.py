"""Line searches of the full-batch objective at elementwise cost.

Along a CG direction (dT, dψ) the exit wave of position k is a quadratic polynomial in the step:

    S ψ_t · R T_t = S ψ · R T  +  t (S ψ · R dT + S dψ · R T)  +  t² S dψ · R dT,

and F, S and R are linear, so the far field is z(t) = s(t) [A + t B + t² C] with A, B, C the
FFTs of the three terms (C = 0 while the probe is fixed) and s(t) = √P / ‖ψ + t dψ‖ the probe
normalisation (:class:`~cryoptycho.gpu.reconstruct.FullBatchObjective`). After B and C are made
once per direction (A is the far field of the last accepted point), every trial step of the line
search costs no FFT: the loss and φ'(t) = 2 Re⟨∂L/∂z̄, z'(t)⟩ are elementwise in z(t) and z'(t).
Only the accepted step pays for the gradient (one inverse FFT per position and the adjoints).
A probe of P incoherent modes (P, M, M) carries a leading mode axis through A, B and C; the
intensity is the sum over it.

The three far fields are held for every position, so the model is used only when they fit the
memory budget (:func:`line_budget_bytes`); otherwise CG evaluates the objective at each trial.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import (
    array_module,
    dev_float,
    fft2,
    free_device_bytes,
    host_floats,
    on_device,
    real_of,
    scalar_as,
)
from .likelihood import far_field_terms, intensity_sums
from .objective import back_propagate, back_propagate_modes
from .operators import extract, position_probes
from .priors import prior_term

#: Share of the free memory (device, or host RAM on NumPy) the stored far fields may take: a
#: quarter, as a daemon may refine one scan while others stream on the same device.
LINE_MEMORY_SHARE = 0.25
#: The far field carried over from accepted steps is recomputed after this many reuses, so
#: float rounding of A ← A + tB + t²C cannot build up over a long run.
REFRESH_EVERY = 20


def line_budget_bytes(xp: Any) -> int:
    """Bytes the stored far fields may take: a share of the free device memory (CuPy) or of
    the available host memory (NumPy, Linux ``sysconf``; 2 GiB where that is unknown)."""
    free = free_device_bytes(xp)
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 2 << 30
    return int(LINE_MEMORY_SHARE * free)


def _position_probes(probe: Any, sub: Any) -> Any:
    """:func:`position_probes`, with a leading mode axis for a mixed-state probe."""
    if probe.ndim == 2:
        return position_probes(probe, sub)
    xp = array_module(probe)
    return xp.stack([position_probes(probe[m], sub) for m in range(probe.shape[0])])


@dataclass
class _Carry:
    """The far fields (unnormalised probe) of the last accepted point, per chunk. Matched to
    the next line's start by identity: CG makes new arrays for every point and never changes
    one in place, and a position update gives the objective a new list of batches (never
    changes it in place) — the far fields are those of the positions too, and CG goes on from
    the same object and probe arrays after an update (``_cached_for``)."""

    obj: Any
    probe: Any
    batches: list[Any]
    far: list[Any]
    reuses: int


class FullBatchLine:
    """φ(t) = f(x + t d) of a FullBatchObjective, with ``value(t) -> (φ, φ')`` at elementwise
    cost and ``point(t) -> (x_t, f, gradient)`` for the accepted step."""

    def __init__(self, fun: Any, x: dict[str, Any], d: dict[str, Any], keys: set[str]) -> None:
        self.fun = fun
        self.x = x
        self.t_obj = x["object"]
        self.d_obj = d["object"] if "object" in keys else None
        self.d_probe = d["probe"] if "probe" in keys else None
        probe = x["probe"]
        xp = array_module(self.t_obj)
        self.xp = xp
        self.root_p = math.sqrt(fun.power)
        # ‖ψ + t dψ‖² = n0 + 2 t a + t² b (device scalars on a device: not read back)
        self.n0 = dev_float(xp.vdot(probe.ravel(), probe.ravel()).real)
        self.a = self.b = 0.0
        if self.d_probe is not None:
            self.a = dev_float(xp.vdot(probe.ravel(), self.d_probe.ravel()).real)
            self.b = dev_float(xp.vdot(self.d_probe.ravel(), self.d_probe.ravel()).real)
        self.rdt = real_of(self.t_obj.dtype)
        self.modes = probe.ndim == 3
        carry: _Carry | None = getattr(fun, "_line_carry", None)
        reuse = (
            carry is not None and carry.obj is x["object"] and carry.probe is probe
            and carry.batches is fun.batches and carry.reuses < REFRESH_EVERY
        )
        # The shifted probes S ψ of every position: kept on ``fun`` while the probe and the
        # positions are fixed (the same arrays from one iteration to the next), as a jittered
        # scan pays an FFT per position to make them. Keyed by the batches as well: CG goes on
        # from the same probe array after a position update, and the old positions' shifted
        # probes (and far fields, _Carry) under the new windows made a function that was
        # neither objective (1.6% off the true loss one iteration after the update in
        # tests/test_refine_budget.py): CG descended it, or found no descent on it at all —
        # "CG stalled on the truncation rule" right after an accepted position update.
        kept = getattr(fun, "_line_probes", None)
        if kept is not None and kept[0] is probe and kept[1] is fun.batches:
            self.p0s = kept[2]
        else:
            self.p0s = [_position_probes(probe, sub) for sub in fun.batches]
        fun._line_probes = (probe, fun.batches, self.p0s) if self.d_probe is None else None
        self.terms: list[tuple[Any, Any, Any]] = []
        for i, sub in enumerate(fun.batches):
            p0 = self.p0s[i]
            p1 = _position_probes(self.d_probe, sub) if self.d_probe is not None else None
            w0 = extract(self.t_obj, sub) if p1 is not None or not reuse else None
            far_a = carry.far[i] if reuse else fft2(p0 * w0)
            far_b = far_c = None
            if self.d_obj is not None:
                w1 = extract(self.d_obj, sub)
                wave = p0 * w1
                if p1 is not None:
                    wave += p1 * w0
                    far_c = fft2(p1 * w1)
                far_b = fft2(wave)
            elif p1 is not None:
                far_b = fft2(p1 * w0)
            self.terms.append((far_a, far_b, far_c))
        self.reuses = carry.reuses + 1 if reuse else 0
        self.d, self.keys = d, keys
        self._first: float | None = None
        self._points: dict[float, tuple[dict[str, Any], float, dict[str, Any]]] = {}

    # --- the scalar probe normalisation along the line ------------------------------------

    def _scale(self, t: float) -> tuple[Any, Any]:
        """s(t) = √P/‖ψ + t dψ‖ and s'(t) (on a device: device scalars, and a zero probe shows
        as a non-finite loss instead of being read back here)."""
        n = self.n0 + 2.0 * t * self.a + t * t * self.b
        if on_device(n):
            root = self.xp.sqrt(n)
            return self.root_p / root, -self.root_p * (self.a + t * self.b) / (n * root)
        if n <= 0 or not math.isfinite(n):
            raise FloatingPointError("probe became zero or non-finite")
        return self.root_p / math.sqrt(n), -self.root_p * (self.a + t * self.b) / n**1.5

    def _unscaled(self, i: int, t: float) -> Any:
        far_a, far_b, far_c = self.terms[i]
        u = far_a.copy() if far_b is None else far_b * t
        if far_b is not None:
            u += far_a
        if far_c is not None:
            u += far_c * (t * t)
        return u

    def _truncating(self) -> bool:
        opts = self.fun.options
        return opts.truncation != "none" and math.isfinite(opts.alpha_h)

    def _first_pass(self, t: float, s: Any, ds: Any | None) -> tuple[list[Any], list[Any], Any]:
        """Per chunk: |z(t)|² and (with ``ds``) the real weights h with Re(z̄ z') = h, and the
        scan-wide truncation sums. z' = s' u + s v with v = B + 2tC, so h = (s'/s)|z|² +
        s·Re(z̄ v): real arithmetic only, the complex gradient f·z is never formed."""
        fun = self.fun
        intens, weights = [], []
        total: list[Any] = [0.0, 0.0, 0.0]
        s_r = scalar_as(s, self.rdt)
        ratio = None if ds is None else scalar_as(ds / s, self.rdt)
        for i, sl in enumerate(fun.slices):
            _, far_b, far_c = self.terms[i]
            z = self._unscaled(i, t)
            z *= s_r
            inten = z.real * z.real
            inten += z.imag * z.imag
            if ds is not None:
                if far_b is None:
                    h = inten * ratio
                else:
                    v = far_b if far_c is None else far_b + far_c * (2.0 * t)
                    h = z.real * v.real
                    h += z.imag * v.imag
                    del v
                    h *= s_r
                    if self.d_probe is not None and (on_device(ds) or ds != 0.0):
                        h += inten * ratio  # s is constant while the probe is fixed
                weights.append(h.sum(axis=0) if self.modes else h)
            del z
            if self.modes:
                inten = inten.sum(axis=0)  # incoherent modes: intensities add
            if self._truncating():
                part = intensity_sums(inten, self._counts(sl, inten), fun.mask)
                total = [p + q for p, q in zip(total, part)]
            intens.append(inten)
        sums = (total[0], total[1], total[2]) if self._truncating() else None
        return intens, weights, sums

    def _counts(self, sl: slice, like: Any) -> Any:
        y = self.fun.counts_fft[sl]
        rdt = like.dtype
        return y if np.can_cast(y.dtype, rdt, casting="safe") else y.astype(rdt)

    def _object_at(self, t: float) -> Any:
        return self.t_obj if self.d_obj is None else self.t_obj + t * self.d_obj

    def value(self, t: float, read: bool = True) -> tuple[Any, Any]:
        """(φ(t), φ'(t)) without an FFT (but see :meth:`_speculate`): host floats (one
        read-back), or with ``read=False`` as they are (device scalars on a device)."""
        fun, opts, xp = self.fun, self.fun.options, self.xp
        if self._first is None:
            self._first = t
            if getattr(fun, "_line_first_accepted", False):
                return self._speculate(t, read)
        s, ds = self._scale(t)
        intens, weights, sums = self._first_pass(t, s, ds)
        loss = slope = 0.0
        for sl, inten, h in zip(fun.slices, intens, weights):
            terms = far_field_terms(
                None, fun.counts_fft[sl], opts.noise_model, fun.mask, opts.truncation,
                opts.alpha_h, sums, want_grad=False, inten=inten,
            )
            loss += terms.loss
            slope += 2.0 * dev_float(xp.vdot(terms.factor.ravel(), h.ravel()))
        del intens, weights
        obj_t = self._object_at(t)
        p_loss, p_grad = prior_term(obj_t, opts, fun.kappa, None, fun.sparse)
        p_slope = 0.0
        if self.d_obj is not None:
            p_slope = 2.0 * dev_float(xp.vdot(p_grad.ravel(), self.d_obj.ravel()).real)
        f_t, slope_t = fun.scale * loss + p_loss, fun.scale * slope + p_slope
        return host_floats(f_t, slope_t) if read else (f_t, slope_t)

    def _speculate(self, t: float, read: bool = True) -> tuple[Any, Any]:
        """(φ(t), φ'(t)) through the full gradient at t, kept for :meth:`point`. Once CG has
        settled, the first trial (its last step length) is usually accepted (≈ 1.3 trials per
        iteration): its gradient is then already there, as with direct evaluations, but
        without their forward FFTs. Used when the previous line accepted its first trial."""
        x_t, f_t, g_t = self._evaluate(t)
        xp = self.xp
        slope = sum(2.0 * dev_float(xp.vdot(g_t[k].ravel(), self.d[k].ravel()).real)
                    for k in self.keys)
        self._points[t] = (x_t, f_t, g_t)
        return host_floats(f_t, slope) if read else (f_t, slope)

    def point(self, t: float) -> tuple[dict[str, Any], float, dict[str, Any]]:
        """x + t d, the objective there and its gradient (as ``fun(x + t d)`` returns them):
        the accepted step."""
        self.fun._line_first_accepted = t == self._first
        if t in self._points:
            return self._points[t]
        # the loss may stay on the device: CG reads it with its next dot products
        return self._evaluate(t)

    def _evaluate(self, t: float) -> tuple[dict[str, Any], float, dict[str, Any]]:
        fun, opts, xp = self.fun, self.fun.options, self.xp
        x_t = dict(self.x)
        obj_t = self._object_at(t)
        x_t["object"] = obj_t
        probe_t = self.x["probe"] if self.d_probe is None else self.x["probe"] + t * self.d_probe
        x_t["probe"] = probe_t
        norm = dev_float(xp.sqrt((probe_t.real**2 + probe_t.imag**2).sum()))
        if not on_device(norm) and (norm == 0 or not math.isfinite(norm)):
            raise FloatingPointError("probe became zero or non-finite")
        s = self.root_p / norm
        s_r = scalar_as(s, self.rdt)
        psi = probe_t * s_r
        intens, _, sums = self._first_pass(t, s, None)
        loss = 0.0
        g_obj = xp.zeros_like(obj_t)
        g_psi = xp.zeros_like(psi)
        carried = []
        for i, (sl, sub) in enumerate(zip(fun.slices, fun.batches)):
            u = self._unscaled(i, t)
            carried.append(u)
            z = u * s_r
            # S(sψ) = s·Sψ: with the probe fixed its shifted copies need no FFT
            psi_k = self.p0s[i] * s_r if self.d_probe is None else _position_probes(psi, sub)
            if self.modes:
                terms = far_field_terms(
                    None, fun.counts_fft[sl], opts.noise_model, fun.mask, opts.truncation,
                    opts.alpha_h, sums, want_grad=False, inten=intens[i],
                )
                intens[i] = None
                z *= terms.factor
                terms.factor = None
                dt = back_propagate_modes(terms, z, extract(obj_t, sub), psi_k, sub, fun.want_probe)
            else:
                terms = far_field_terms(
                    z, fun.counts_fft[sl], opts.noise_model, fun.mask, opts.truncation,
                    opts.alpha_h, sums, overwrite=True, inten=intens[i],
                )
                intens[i] = None
                dt = back_propagate(terms, extract(obj_t, sub), psi_k, sub, fun.want_probe)
            loss += dt.loss
            g_obj += dt.grad_object
            if fun.want_probe:
                g_psi += dt.grad_probe
        fun._line_carry = _Carry(obj_t, probe_t, fun.batches, carried, self.reuses)
        total, grads = fun.finish(obj_t, psi, s, loss, g_obj, g_psi)
        return x_t, total, grads


def full_batch_line(fun: Any, x: dict[str, Any], d: dict[str, Any], keys: set[str]) -> FullBatchLine | None:
    """The line model of ``fun`` (a FullBatchObjective) along ``d``, or None when its far
    fields (up to three complex arrays the size of all frames) exceed the memory budget."""
    t_obj = x["object"]
    xp = array_module(t_obj)
    frames = int(fun.counts_fft.shape[0]) * int(np.prod(fun.counts_fft.shape[1:]))
    item = np.dtype(t_obj.dtype).itemsize
    arrays = 1 + ("object" in keys) + ("object" in keys and "probe" in keys)
    # + the carried far field of the last point, alive while the new ones are made, a
    # trial's |z|² and slope weights (two real arrays = one complex) for every frame, and
    # the shifted probes of every position (jittered scans)
    modes = int(x["probe"].shape[0]) if x["probe"].ndim == 3 else 1
    need = modes * (arrays + 3) * frames * item
    if need > line_budget_bytes(xp):
        fun._line_carry = None
        return None
    return FullBatchLine(fun, x, d, keys)
