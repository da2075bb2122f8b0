"""Position correction: the probe positions refined from the data.

A real scan's positions are nominal: scan coils add a few per cent of affine error (scale,
rotation, shear), the stage jitters and drifts. The exit wave of position k depends on its
sub-pixel offset δ_k through the Fourier shift theorem (operators.py),

    z_k = F[ S_{δk} ψ · R_k T ],   S_δ ψ = F⁻¹[ F ψ · e^{−2πi q·δ} ],

so ∂z_k/∂δ_a = F[ F⁻¹(F ψ · e^{−2πi q·δ} · (−2πi q_a)) · R_k T ] (the window R_k stays where it
is for an infinitesimal move), and with the noise model's ∂L/∂z̄ = f·z (likelihood.py)

    ∂L/∂δ_a = Σ f · ∂I/∂δ_a,   ∂I/∂δ_a = 2 Re(z̄ ∂z/∂δ_a),
    H_ab   = Σ w ∂I/∂δ_a ∂I/∂δ_b / I          (the Fisher information of the position).

One Gauss–Newton step of the positions then fits a *model* of the scan rather than K free
shifts: p_k = c + A (u_k − ū) + b + r_k, u_k the nominal positions, A and b an affine scan
error (6 parameters shared by every position: the data of the whole scan decide them) and r_k
small residuals (jitter) with a Gaussian prior of rms ``position_residual_px``: a position with
little information (a flat region, low dose) stays on the affine model, one with much follows
its own data. The mean shift is held fixed: a common translation of all positions is an exact
gauge of ptychography (the object moves with it). Steps are capped, and an update that raises
the data term is halved (up to three times) or dropped.

Updates alternate with the object/probe CG (reconstruct.py): after
``position_start_iteration`` CG iterations, every ``position_every`` iterations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import array_module, complex_of, fft2, host_floats, ifft2, to_numpy
from .likelihood import INTENSITY_FLOOR, far_field_terms, loss_per_pattern
from .operators import (
    Batch,
    _factors,
    extract,
    make_batch,
    mode_intensity,
    position_probes,
    sub_batch,
)

log = logging.getLogger(__name__)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def position_terms(
    obj: Any, probe: Any, counts: Any, batch: Batch, *, model: str = "poisson",
    mask: Any | None = None, scale: float = 1.0,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Data term, its gradient with respect to each position (B, 2) — loss per pixel of
    (y, x) shift — and the 2×2 Fisher information of each position (B, 2, 2), on the host.
    ``probe`` is the normalised probe ψ̂; ``scale`` the noise model's loss scale
    (FullBatchObjective.scale). No truncation: the rule's keep-mask would make the loss of a
    moved position jump."""
    loss, grad, fisher = position_terms_device(obj, probe, counts, batch, model=model, mask=mask,
                                               scale=scale)
    return float(to_numpy(loss)), to_numpy(grad).astype(np.float64), to_numpy(fisher).astype(np.float64)


def position_terms_device(
    obj: Any, probe: Any, counts: Any, batch: Batch, *, model: str = "poisson",
    mask: Any | None = None, scale: float = 1.0,
) -> tuple[Any, Any, Any]:
    """:func:`position_terms` where the arrays live (loss, gradient (B, 2) and Fisher
    information (B, 2, 2), float64 on a device): what the live engine keeps until its next
    read-back, so that a mini-batch step does not wait for the device."""
    xp = array_module(obj)
    cdt = complex_of(probe.dtype)
    modes = probe[None] if probe.ndim == 2 else probe
    m = tuple(modes.shape[-2:])
    ey, ex = _factors(batch, True, m, cdt)
    windows = extract(obj, batch)
    qy = xp.fft.fftfreq(m[0]).astype(np.float64)
    qx = xp.fft.fftfreq(m[1]).astype(np.float64)
    ramps = ((-2j * np.pi * qy)[:, None].astype(cdt), (-2j * np.pi * qx)[None, :].astype(cdt))
    # incoherent modes: I = Σ_m |z_m|², so ∂I/∂δ = Σ_m 2 Re(z̄_m ∂z_m/∂δ) — every mode is
    # shifted by the same δ (the whole illumination moves)
    inten = None
    d_inten: list[Any] = [None, None]
    z = None
    for k in range(modes.shape[0]):  # (iterating a device array would read it back)
        spec = fft2(modes[k])[None] * ey
        spec *= ex
        z = fft2(ifft2(spec) * windows)
        for a, ramp in enumerate(ramps):
            dz = fft2(ifft2(spec * ramp) * windows)
            dz *= z.conj()
            part = 2.0 * dz.real
            d_inten[a] = part if d_inten[a] is None else d_inten[a] + part
        del spec
        part = z.real * z.real + z.imag * z.imag
        inten = part if inten is None else inten + part
    del windows
    fisher_w = 1.0 / (inten + INTENSITY_FLOOR)
    if mask is not None:
        fisher_w *= mask
    # the likelihood needs only I (want_grad=False): ``z`` stands in for the far field's dtype
    terms = far_field_terms(z, counts, model, mask, "none", math.inf, want_grad=False, inten=inten)
    f = terms.factor
    axes = (-2, -1)
    grad = xp.stack([(f * d).sum(axis=axes) for d in d_inten], axis=-1) * scale
    hyy = (fisher_w * d_inten[0] * d_inten[0]).sum(axis=axes)
    hxx = (fisher_w * d_inten[1] * d_inten[1]).sum(axis=axes)
    hxy = (fisher_w * d_inten[0] * d_inten[1]).sum(axis=axes)
    fisher = xp.stack([xp.stack([hyy, hxy], -1), xp.stack([hxy, hxx], -1)], -2) * scale
    return scale * terms.loss, grad.astype(np.float64), fisher.astype(np.float64)


def data_loss(
    obj: Any, probe: Any, counts: Any, batch: Batch, *, model: str = "poisson",
    mask: Any | None = None, scale: float = 1.0,
) -> float:
    """The data term (no truncation) at the batch's positions: the test of a position step."""
    if probe.ndim == 3:  # incoherent modes: their intensities add
        inten = mode_intensity(obj, probe, batch)
        terms = far_field_terms(inten, counts, model, mask, "none", math.inf, want_grad=False, inten=inten)
        return scale * terms.loss
    windows = extract(obj, batch)
    z = fft2(position_probes(probe, batch) * windows)
    terms = far_field_terms(z, counts, model, mask, "none", math.inf, want_grad=False, overwrite=True)
    return scale * terms.loss


def data_loss_per_position(
    obj: Any, probe: Any, counts: Any, batch: Batch, *, model: str = "poisson",
    mask: Any | None = None, scale: float = 1.0,
) -> Any:
    """:func:`data_loss` of each position (B,), where the arrays live (their sum is
    :func:`data_loss`)."""
    if probe.ndim == 3:  # incoherent modes: their intensities add
        inten = mode_intensity(obj, probe, batch)
    else:
        z = fft2(position_probes(probe, batch) * extract(obj, batch))
        inten = z.real * z.real
        inten += z.imag * z.imag
        del z
    return scale * loss_per_pattern(inten, counts, model, mask)


@dataclass
class ScanModel:
    """Positions (top-left window corners, object pixels) as an affine map of the nominal ones
    plus per-position residuals."""

    nominal: np.ndarray  #: (K, 2) nominal pixels
    matrix: np.ndarray = field(default_factory=lambda: np.eye(2))  #: A
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2))  #: b
    residual: np.ndarray | None = None  #: (K, 2) r_k
    #: the residuals' prior rms the last :meth:`gauss_newton` estimated (``residual_auto``), px
    residual_estimate_px: float = field(default=math.nan, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.nominal = np.asarray(self.nominal, dtype=np.float64).reshape(-1, 2)
        self.centre = self.nominal.mean(axis=0)
        if self.residual is None:
            self.residual = np.zeros_like(self.nominal)

    def affine_part(self, matrix: np.ndarray | None = None, offset: np.ndarray | None = None) -> np.ndarray:
        a = self.matrix if matrix is None else matrix
        b = self.offset if offset is None else offset
        return self.centre + (self.nominal - self.centre) @ a.T + b

    @property
    def positions(self) -> np.ndarray:
        assert self.residual is not None
        return self.affine_part() + self.residual

    def gauss_newton(
        self, grad: np.ndarray, fisher: np.ndarray, residual_px: float, model: str = "affine",
        damping: float = 1e-3, keep_residual: bool = False, matrix_prior: float = 0.0,
        residual_auto: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's Gauss–Newton update from the per-position gradient and Fisher
        information: (matrix, offset, residual) of the new positions. The targets are the
        per-position Newton points in information form, H_k t_k = H_k p_k − g_k (no inverse of a
        possibly singular H_k); the affine part is their H-weighted least-squares fit and the
        residuals their shrinkage towards it under the prior ½|r|²/σ². ``matrix_prior``: the
        precision of a Gaussian prior of the matrix's entries around the identity (a scan seen
        in part — the first rows of a raster — does not pin every entry). ``residual_auto``: the
        residuals' prior rms estimated from the data (:func:`residual_rms_from_scatter`), at
        most ``residual_px``; kept in ``self.residual_estimate_px``."""
        p = self.positions
        k = len(p)
        h = fisher + damping * (np.trace(fisher, axis1=1, axis2=2).mean() / 2 + 1e-12) * np.eye(2)
        info_target = np.einsum("kab,kb->ka", h, p) - grad
        if residual_auto and residual_px > 0 and model == "affine":
            affine_only = ScanModel(self.nominal, self.matrix, self.offset, np.zeros_like(p))
            m0, b0, _ = affine_only.gauss_newton(grad - np.einsum("kab,kb->ka", h, self.residual), fisher, 0.0,
                                                 damping=damping, matrix_prior=matrix_prior)
            targets = np.linalg.solve(h, info_target[..., None])[..., 0]
            # a frame without information (the live scan's frames not yet measured) says
            # nothing of the scatter: its "target" is where it stands
            informed = np.trace(fisher, axis1=1, axis2=2) > 0
            estimate = residual_rms_from_scatter((targets - self.affine_part(m0, b0))[informed], h[informed])
            self.residual_estimate_px = estimate
            residual_px = min(residual_px, estimate)
            if residual_px <= 0:
                keep_residual = False
        lam = 0.0 if residual_px <= 0 else 1.0 / residual_px**2
        if model == "free":
            new = np.linalg.solve(h, info_target[..., None])[..., 0]
            return self.matrix, self.offset, new - self.affine_part()
        u = self.nominal - self.centre
        # a_k = centre + A u_k + b  =  J_k θ + centre,  θ = (A_yy, A_yx, b_y, A_xy, A_xx, b_x)
        jac = np.zeros((k, 2, 6))
        jac[:, 0, 0], jac[:, 0, 1], jac[:, 0, 2] = u[:, 0], u[:, 1], 1.0
        jac[:, 1, 3], jac[:, 1, 4], jac[:, 1, 5] = u[:, 0], u[:, 1], 1.0
        residual = self.residual.copy() if residual_px > 0 or keep_residual else np.zeros_like(p)
        theta = np.array([*self.matrix[0], self.offset[0], *self.matrix[1], self.offset[1]])
        for _ in range(3):
            rhs_k = info_target - np.einsum("kab,kb->ka", h, self.centre + residual)
            normal = np.einsum("kai,kab,kbj->ij", jac, h, jac)
            rhs = np.einsum("kai,ka->i", jac, rhs_k)
            ridge = 1e-9 * np.trace(normal) / 6 + 1e-30
            prior = np.diag([matrix_prior, matrix_prior, 0.0, matrix_prior, matrix_prior, 0.0])
            identity = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
            theta = np.linalg.solve(normal + ridge * np.eye(6) + prior,
                                    rhs + ridge * theta + prior @ identity)
            if lam == 0 or keep_residual:
                break
            affine = self.centre + np.einsum("kai,i->ka", jac, theta)
            residual = np.linalg.solve(
                h + lam * np.eye(2), (info_target - np.einsum("kab,kb->ka", h, affine))[..., None]
            )[..., 0]
        matrix = np.array([[theta[0], theta[1]], [theta[3], theta[4]]])
        offset = np.array([theta[2], theta[5]])
        return matrix, offset, residual


def residual_rms_from_scatter(deviation: np.ndarray, information: np.ndarray) -> float:
    """The rms per axis (pixels) of the positions' true residuals from the affine scan, by the
    method of moments: the per-position Newton points scatter about the affine fit
    (``deviation``, (K, 2)) by the residuals plus their own counting noise, whose covariance is
    the inverse of the Fisher information (``information``, (K, 2, 2)); what the scatter holds
    beyond that noise is the residuals'. 0 when the scatter is no larger than the noise: the
    data then cannot tell a residual from noise, and a fixed prior (0.5 px at 20 e⁻/Å², where
    one position's Cramér–Rao bound is ≈ 1 px) fits the noise instead
    (MEASUREMENTS.md, "Realistic scans: the gap, one error at a time")."""
    d = np.asarray(deviation, dtype=np.float64).reshape(-1, 2)
    if len(d) == 0:
        return 0.0
    noise = np.trace(np.linalg.inv(information), axis1=1, axis2=2)
    # a few badly determined positions (scan edge, little signal) must not swamp the mean
    ok = np.isfinite(noise) & (noise < 100.0 * np.median(noise))
    if not np.any(ok):
        return 0.0
    excess = float(np.mean(np.sum(d[ok] ** 2, axis=1) - noise[ok]))
    return math.sqrt(max(excess, 0.0) / 2.0)


@dataclass
class PositionUpdate:
    accepted: bool
    loss_before: float
    loss_after: float
    max_shift_px: float  #: largest move of this update
    matrix: np.ndarray  #: the scan model's affine matrix after the update


def update_positions(
    obj: Any, probe: Any, counts_fft: Any, scan: ScanModel, object_shape: tuple[int, int],
    mask: Any | None, options: Any, scale: float = 1.0, chunk: int = 256,
) -> PositionUpdate:
    """One Gauss–Newton update of ``scan`` (in place when accepted) at object ``obj`` and
    normalised probe ``probe``."""
    xp = array_module(obj)
    m = tuple(probe.shape[-2:])
    old = scan.positions
    batch = make_batch(old, object_shape, m, xp=xp)
    grads, fishers, before = [], [], 0.0
    for sl in _chunks(batch.size, chunk):
        loss, g, h = position_terms(obj, probe, counts_fft[sl], sub_batch(batch, sl),
                                    model=options.noise_model, mask=mask, scale=scale)
        before += loss
        grads.append(g)
        fishers.append(h)
    grad = np.concatenate(grads)
    fisher = np.concatenate(fishers)
    matrix, offset, residual = scan.gauss_newton(
        grad, fisher, options.position_residual_px, options.position_model,
        residual_auto=options.position_residual_auto)
    trial = ScanModel(scan.nominal, matrix, offset, residual)
    new = trial.positions
    # a common translation is a gauge (the object would move with it): keep the mean
    shift = (new - old).mean(axis=0)
    offset = offset - shift
    step = new - shift - old
    biggest = float(np.abs(step).max()) if len(step) else 0.0
    cap = float(options.position_max_step_px)
    factor = min(1.0, cap / biggest) if biggest > 0 else 1.0
    hi = np.asarray(object_shape, dtype=np.float64) - np.asarray(m, dtype=np.float64) - 1.0
    for _ in range(4):
        mat_t = scan.matrix + factor * (matrix - scan.matrix)
        off_t = scan.offset + factor * (offset - scan.offset)
        res_t = scan.residual + factor * (residual - scan.residual)
        cand = ScanModel(scan.nominal, mat_t, off_t, res_t)
        pos = cand.positions
        if np.all(pos >= 0) and np.all(pos <= hi):
            cand_batch = make_batch(pos, object_shape, m, xp=xp)
            after = sum(host_floats(*(  # one read-back for all chunks
                data_loss(obj, probe, counts_fft[sl], sub_batch(cand_batch, sl),
                          model=options.noise_model, mask=mask, scale=scale)
                for sl in _chunks(cand_batch.size, chunk)
            )))
            if after < before:
                scan.matrix, scan.offset, scan.residual = mat_t, off_t, res_t
                moved = float(np.abs(pos - old).max())
                return PositionUpdate(True, before, after, moved, mat_t)
        factor *= 0.5
    return PositionUpdate(False, before, before, 0.0, scan.matrix)


@dataclass
class ScanSearch:
    """What :func:`search_scan_matrix` found."""

    matrix: np.ndarray  #: A (2, 2): positions c + A (u − c)
    loss_before: float  #: the reduced objective at the starting matrix
    loss_after: float  #: … at ``matrix``
    evaluations: int
    values: dict[tuple[float, float, float, float], float]  #: every trial: E entries → loss


def search_scan_matrix(
    reduced_loss: Any, step: float = 0.02, rounds: int = 1, start: np.ndarray | None = None,
) -> ScanSearch:
    """Search the scan's global 2×2 matrix A on the *reduced* objective ``reduced_loss(A)`` —
    the data term after a short object reconstruction at the positions c + A (u − c), from a
    common start — as ``aberrations.search_aberrations`` does for the probe.

    Why a search and not steps at a reconstructed object (:func:`update_positions`): the object
    reconstructed at the nominal positions is the true one warped by the scan error, so the
    positions' gradient there is small and its curvature that of moving them under a held
    object; the updates crawl (proteasome, 100 e⁻/Å²: 0.07 % of a 2.5 % scale error after five
    updates; MEASUREMENTS.md). Each round: central differences of the reduced objective along
    the four entries E = A − I (± h: 8 short reconstructions), then a line search along their
    descent direction (at h and 2h, the parabola's vertex within 4h tried too): on the
    realistic preset the reduced objective's slopes point at the true matrix while its
    curvature per entry is lost in the noise of the short reconstructions. The best point
    evaluated is kept; h halves for the next round. Without descent (a flat or noisy
    objective) the start stays."""
    e = np.zeros(4) if start is None else (np.asarray(start, dtype=np.float64) - np.eye(2)).ravel()
    values: dict[tuple[float, float, float, float], float] = {}

    def f(v: np.ndarray) -> float:
        key = tuple(float(round(x, 12)) for x in v)
        if key not in values:
            values[key] = float(reduced_loss(np.eye(2) + np.asarray(v).reshape(2, 2)))
        return values[key]

    before = best = f(e)
    h = float(step)
    for _ in range(rounds):
        slope = np.zeros(4)
        for j in range(4):
            up, down = e.copy(), e.copy()
            up[j] += h
            down[j] -= h
            slope[j] = (f(up) - f(down)) / (2 * h)
        norm = float(np.linalg.norm(slope))
        if norm > 0 and np.isfinite(norm):
            direction = -slope / norm
            f0, f1, f2 = best, f(e + h * direction), f(e + 2 * h * direction)
            curvature = f0 - 2 * f1 + f2
            if curvature > 0 and np.isfinite(curvature):
                t = float(np.clip((3 * f0 - 4 * f1 + f2) / (2 * curvature), 0.0, 4.0))
                f(e + t * h * direction)
        key = min(values, key=values.get)
        e, best = np.asarray(key, dtype=np.float64), values[key]
        h *= 0.5
    return ScanSearch(np.eye(2) + e.reshape(2, 2), before, best, len(values), values)


#: Frames with position information before the live scan model is first fitted (6 affine
#: parameters; fewer frames would fit their noise).
LIVE_MIN_MEASURED = 12
#: Prior precision of the live model's matrix entries around the identity, per px² of Fisher
#: units: σ = 5 % (scan errors are "a few per cent"), so the first rows of a raster, which
#: barely constrain the y scale, do not extrapolate a wild one to the rows still to come.
LIVE_MATRIX_PRIOR = 1.0 / 0.05**2
#: Live residuals are bounded at this many prior rms (``position_residual_px``): a position
#: whose information came from an object still far from converged must not run away.
LIVE_RESIDUAL_BOUND = 3.0


class LiveScanModel:
    """The scan model of a scan still being recorded: the live engine's position refinement.

    Positions are in pixels of a fixed frame (metres ÷ pixel size: independent of the canvas,
    which grows). Each measured frame keeps its latest Newton target in information form,
    H_k p_k − g_k, and its Fisher information H_k, from the object of its measurement; a
    frame never measured has none. :meth:`update` fits the affine model to every target so far
    (one Gauss–Newton step of :meth:`ScanModel.gauss_newton`, with a weak prior of the matrix
    around the identity), shrinks the measured frames' residuals towards it and bounds them,
    holds the mean position (the gauge) and caps each move. A frame that arrives later starts on
    the affine model (:meth:`add`)."""

    def __init__(self, nominal_px: np.ndarray, positions_px: np.ndarray | None = None) -> None:
        self.nominal = np.asarray(nominal_px, dtype=np.float64).reshape(-1, 2).copy()
        self.matrix = np.eye(2)
        self.offset = np.zeros(2)
        self.centre = self.nominal.mean(axis=0) if len(self.nominal) else np.zeros(2)
        self.residual = np.zeros_like(self.nominal)
        if positions_px is not None:  # positions moved before (a refinement): residuals keep them
            self.residual = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2) - self.nominal
        self.fisher = np.zeros((len(self.nominal), 2, 2))
        self.info = np.zeros((len(self.nominal), 2))  #: H_k p_k − g_k at the measurement
        self.measured = np.zeros(len(self.nominal), dtype=bool)
        self.updates = 0
        #: the residuals' prior rms the last update estimated (``residual_auto``), px
        self.residual_estimate_px = math.nan

    def _scan(self) -> ScanModel:
        scan = ScanModel(self.nominal, self.matrix, self.offset, self.residual)
        scan.centre = self.centre
        return scan

    @property
    def positions(self) -> np.ndarray:
        return self._scan().positions

    def add(self, nominal_px: np.ndarray) -> np.ndarray:
        """Append frames at their nominal positions; returns where the model puts them."""
        nominal_px = np.asarray(nominal_px, dtype=np.float64).reshape(-1, 2)
        k = len(nominal_px)
        self.nominal = np.concatenate([self.nominal, nominal_px])
        self.residual = np.concatenate([self.residual, np.zeros((k, 2))])
        self.fisher = np.concatenate([self.fisher, np.zeros((k, 2, 2))])
        self.info = np.concatenate([self.info, np.zeros((k, 2))])
        self.measured = np.concatenate([self.measured, np.zeros(k, dtype=bool)])
        return self.positions[-k:]

    def record(self, which: np.ndarray, at_px: np.ndarray, grad: np.ndarray, fisher: np.ndarray) -> int:
        """Keep the gradient and Fisher information of frames ``which``, measured at positions
        ``at_px``; returns how many were kept (non-finite ones are not)."""
        ok = np.isfinite(grad).all(axis=1) & np.isfinite(fisher).all(axis=(1, 2))
        which = np.asarray(which)[ok]
        self.fisher[which] = fisher[ok]
        self.info[which] = np.einsum("kab,kb->ka", fisher[ok], at_px[ok]) - grad[ok]
        self.measured[which] = True
        return int(ok.sum())

    def forget(self, positions_px: np.ndarray) -> None:
        """The positions were set from elsewhere (a full-batch refinement): the residuals take
        them, the targets measured before are stale."""
        self.residual = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2) - self._scan().affine_part()
        self.fisher[...] = 0
        self.info[...] = 0
        self.measured[...] = False

    def update(self, residual_px: float, max_step_px: float, model: str = "affine",
               residual_auto: bool = False) -> np.ndarray | None:
        """One update of the model from the targets so far: the new positions (all frames,
        pixels), or None while too few frames were measured. ``residual_auto``: the residuals'
        prior rms estimated from the measured frames' scatter (at most ``residual_px``, as
        offline; kept in ``residual_estimate_px``) — the fixed prior fits the counting noise."""
        if int(self.measured.sum()) < LIVE_MIN_MEASURED:
            return None
        scan = self._scan()
        old = scan.positions
        # the gradient of each frame's quadratic model at the current positions
        grad = np.einsum("kab,kb->ka", self.fisher, old) - self.info
        matrix, offset, residual = scan.gauss_newton(
            grad, self.fisher, residual_px, model, matrix_prior=LIVE_MATRIX_PRIOR, residual_auto=residual_auto)
        if residual_auto and model == "affine" and np.isfinite(scan.residual_estimate_px):
            self.residual_estimate_px = scan.residual_estimate_px
            residual_px = min(residual_px, scan.residual_estimate_px)
        if residual_px > 0 and model == "affine":
            norm = np.linalg.norm(residual, axis=1, keepdims=True)
            bound = LIVE_RESIDUAL_BOUND * residual_px
            residual = residual * np.minimum(1.0, bound / np.maximum(norm, 1e-30))
        trial = ScanModel(self.nominal, matrix, offset, residual)
        trial.centre = self.centre
        new = trial.positions
        shift = (new - old).mean(axis=0)  # a common translation is a gauge: hold the mean
        offset = offset - shift
        biggest = float(np.abs(new - shift - old).max()) if len(old) else 0.0
        factor = min(1.0, max_step_px / biggest) if biggest > 0 else 1.0
        self.matrix = self.matrix + factor * (matrix - self.matrix)
        self.offset = self.offset + factor * (offset - self.offset)
        self.residual = self.residual + factor * (residual - self.residual)
        self.updates += 1
        return self.positions


def margin_px(positions_px_extent: float) -> int:
    """Spare canvas pixels on each side for positions that may move: 3 % of the scan's extent
    (a scale error of a few per cent moves the edge positions by that much) plus 4."""
    return 2 + math.ceil(0.03 * positions_px_extent) + 4


__all__ = [
    "LiveScanModel",
    "PositionUpdate",
    "ScanModel",
    "ScanSearch",
    "data_loss",
    "data_loss_per_position",
    "margin_px",
    "position_terms",
    "position_terms_device",
    "search_scan_matrix",
    "update_positions",
]
