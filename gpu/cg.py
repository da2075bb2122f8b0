"""Full-batch nonlinear conjugate gradients for complex variables (object, probe).

Polak–Ribière+ with a diagonal preconditioner and restarts (β < 0, Powell's orthogonality test,
a change of the active variables, or an objective change signalled by the callback). The line
search suits the Poisson objective, which is smooth but far from quadratic at low counts: an
analytic first step (the last accepted step, 1 for the first — the Newton step of the
preconditioned quadratic model), then one secant step on φ'(t) = 2 Re⟨∇f(x + t d), d⟩ when the
first trial is not already good (strong-Wolfe-like test |φ'(t)| ≤ 0.3 |φ'(0)|), then halving.
A trial needs φ(t) and φ'(t) only. By default each trial evaluates loss *and* gradient and the
accepted trial's gradient is reused (1–2 evaluations per typical iteration); an objective with
a ``line(x, d, keys)`` method supplies a cheaper model of φ (the full-batch objective's far field
is quadratic in t: trials cost no FFT, see ``line_model.py``) and is asked for the gradient at
the accepted step only.

Gradients are conjugate Wirtinger derivatives (CONVENTIONS.md): f(x + t d) ≈ f(x) + 2t Re⟨g, d⟩.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backend import (
    array_module,
    dev_float,
    fast_fft_length,
    fft2,
    host_floats,
    ifft2,
    irfft2,
    on_device,
    real_of,
    rfft2,
    scalar_as,
)

Vars = dict[str, Any]
Fun = Callable[[Vars], tuple[float, Vars]]


#: Plain iterations (without the callback's updates) whose longest predicts the next one's time:
#: an iteration's evaluations vary (one trial accepted, a secant step, halvings; 0.2–1.1 s on
#: the same problem in `bench live`), so the last one alone said "fits" for a longer one.
PACE_WINDOW = 4


class IterationPace:
    """The time budget's estimate of CG's next iteration: the longest of the last
    :data:`PACE_WINDOW` plain iterations (an update between iterations timed apart, predicted by
    its own guard), and the last full evaluation (the restart after an objective change).
    One pace may be shared by consecutive CG runs (:func:`minimize`'s ``pace``): a new run's
    first iteration is then predicted by the iterations before it, and the caller's guards
    (``refine_alternating``'s updates) predict from the same figures CG stops by."""

    def __init__(self, first_evaluation_s: float = 0.0) -> None:
        self.plain: deque[float] = deque(maxlen=PACE_WINDOW)
        self.evaluation_s = first_evaluation_s
        #: when the iteration being timed started (``None``: no CG run is iterating), and the
        #: seconds in it that are not its own (updates, fresh evaluations after one)
        self.started: float | None = None
        self.aside_s = 0.0

    def add(self, seconds: float) -> None:
        self.plain.append(max(0.0, seconds))

    def begin(self, now: float) -> None:
        """An iteration starts at ``now`` (the previous one, if any, not counted)."""
        self.started, self.aside_s = now, 0.0

    def lap(self, now: float, count: bool = True) -> None:
        """The iteration being timed ends at ``now``: its plain time to the window (``count``),
        and the next one starts."""
        if count and self.started is not None:
            self.add(now - self.started - self.aside_s)
        self.begin(now)

    def end(self) -> None:
        """The CG run stopped: nothing is being timed until the next run begins."""
        self.started, self.aside_s = None, 0.0

    def set_aside(self, seconds: float) -> None:
        """``seconds`` of the current iteration were not its own work."""
        self.aside_s += max(0.0, seconds)

    def next_s(self) -> float:
        """The next iteration's predicted seconds (before any: the first evaluation's)."""
        return max(self.plain) if self.plain else self.evaluation_s

    def ahead_s(self, now: float) -> float:
        """The iteration after ``now``'s predicted seconds: :meth:`next_s`, or the plain time of
        the iteration being timed so far when that is longer — CG reports an iteration (and an
        update runs) before it times it, so a long one would otherwise be missed."""
        running = 0.0 if self.started is None else now - self.started - self.aside_s
        return max(self.next_s(), running)


@dataclass
class CGResult:
    x: Vars
    losses: list[float] = field(default_factory=list)  #: loss after each iteration
    iterations: int = 0
    evaluations: int = 0
    stopped: str = "max_iter"  #: max_iter | time_budget | converged | no_descent
    pace: IterationPace | None = None  #: the estimate CG stopped by (None: no evaluation ran)


def _dot(a: Vars, b: Vars, keys: set[str]) -> Any:
    """Re⟨a, b⟩ over ``keys``: a float on the host, a float64 0-d array on a device (read back
    with the iteration's other scalars in one transfer, :func:`host_floats`)."""
    total = 0.0
    for k in keys:
        xp = array_module(a[k])
        total += dev_float(xp.vdot(a[k].ravel(), b[k].ravel()).real)
    return total


def _scaled(g: Vars, precond: dict[str, Any], keys: set[str]) -> Vars:
    out = {}
    for k in keys:
        p = precond.get(k)
        out[k] = g[k] if p is None else p(g[k]) if callable(p) else g[k] * p
    return out


class LowFrequencyPreconditioner:
    """P g = s · u · (Re h + i F⁻¹[W(q) · F(Im h)]), h = u* · s · g, with s = √diag (the
    diagonal preconditioner ``diag``, (illumination + damping)⁻¹, split symmetrically) and
    u = reference / |reference| (the object's local phase factor): a Fourier filter that boosts
    the spatial frequencies below ``q_c`` by up to ``boost`` in the object's *phase* direction
    only,

        W(q) = 1 / max(1 / boost, min(1, |q|² / q_c²)).

    Why: the data term constrains a phase pattern of frequency q ≪ 1/w (w the probe's extent)
    only through its gradient across each probe window, and the Tikhonov prior's curvature is
    ∝ q² too, so the Hessian's eigenvalues at low q fall as q² — the slow modes of the diagonally
    preconditioned gradient (gpu/STREAMING.md "The update rule" measured the same on the live
    steps). W cancels that q² (an H⁻¹/Sobolev gradient), the cap keeping the gauge (q = 0)
    bounded. Only the phase: the data see a slowly varying *amplitude* directly (it scales
    each pattern's counts), so its curvature does not fall at low q; boosting it too (the first
    version, ``reference=None`` here) put those modes' preconditioned curvature ≈ ``boost``
    times the rest, CG's step shrank to suit them and every other band was held back for the
    first iterations (it lost phase correlation at 10–20 CG on the proteasome at 100 e⁻/Å²:
    MEASUREMENTS.md, "The boost on the phase only, and by default"). u is taken once, when the preconditioner is
    built, so P stays fixed during a CG run. W > 0, u unitary and the split keep P symmetric
    positive definite (in Re⟨·,·⟩), as CG requires. The field is zero-padded to at least twice
    its size (a fast FFT length) so the filter does not couple opposite edges of the canvas; the
    phase is a real field, filtered with real FFTs. ``q_c`` is in cycles per pixel."""

    def __init__(self, diag: Any, q_c: float, boost: float, reference: Any = None, coarsen: int = 1) -> None:
        if not (q_c > 0 and math.isfinite(q_c)):
            raise ValueError(f"the low-frequency preconditioner needs a cut-off q_c > 0, got {q_c!r}")
        if not (boost >= 1 and math.isfinite(boost)):
            raise ValueError(f"the low-frequency boost must be a finite number ≥ 1, got {boost!r}")
        xp = array_module(diag)
        self.sqrt_diag = xp.sqrt(diag)
        self.shape = tuple(diag.shape)
        if reference is not None and tuple(reference.shape) != self.shape:
            raise ValueError(f"the reference object's shape {tuple(reference.shape)} is not the "
                             f"preconditioner's {self.shape}")
        self.padded = tuple(fast_fft_length(2 * n) for n in self.shape)
        qy = xp.fft.fftfreq(self.padded[0])[:, None]
        qx = xp.fft.fftfreq(self.padded[1])[None, :]
        ratio = (qy**2 + qx**2) / q_c**2
        self.weight = (1.0 / xp.maximum(1.0 / boost, xp.minimum(1.0, ratio))).astype(self.sqrt_diag.dtype)
        #: W on rfft2's half plane (W depends on q² only: the +/− Nyquist columns agree)
        self.half_weight = self.weight[:, : self.padded[1] // 2 + 1]
        if not (isinstance(coarsen, int) and coarsen >= 1):
            raise ValueError(f"coarsen must be an integer ≥ 1, got {coarsen!r}")
        if coarsen > 1 and reference is None:
            raise ValueError("coarsen > 1 filters the phase only: it needs the reference object")
        #: ``coarsen`` f > 1 (the live steps): W − 1, zero above q_c, is applied on a grid f
        #: times coarser — Im h block-averaged, filtered, replicated back and added to Im h.
        #: With A = block sum / f that is Aᵀ K A with K ⪰ 0 (W ≥ 1), so P stays symmetric
        #: positive definite; the FFTs shrink by f² (the full grid cost 1.2–2.5× a live step)
        self.coarsen = coarsen
        if coarsen > 1:
            self.coarse = tuple(-(-n // coarsen) for n in self.shape)
            self.coarse_padded = tuple(fast_fft_length(2 * n) for n in self.coarse)
            cy = xp.fft.fftfreq(self.coarse_padded[0])[:, None]
            cx = xp.fft.rfftfreq(self.coarse_padded[1])[None, :]
            cratio = (cy**2 + cx**2) / (q_c * coarsen) ** 2
            self.coarse_excess = (1.0 / xp.maximum(1.0 / boost, xp.minimum(1.0, cratio)) - 1.0).astype(
                self.sqrt_diag.dtype)
        self.phase: Any = None
        if reference is not None:
            mag = abs(reference)
            # a zero pixel has no phase direction: any unit factor keeps P symmetric positive definite
            self.phase = xp.where(mag > 0, reference / xp.where(mag > 0, mag, 1), 1).astype(reference.dtype)

    def rebased(self, diag: Any, reference: Any) -> LowFrequencyPreconditioner:
        """The same filter (its weights shared, not rebuilt) about another diagonal and
        reference object of this shape: the live steps' normaliser and object change every
        step, the canvas (and so the weights) only when it grows."""
        if tuple(diag.shape) != self.shape or tuple(reference.shape) != self.shape:
            raise ValueError(f"rebased on shapes {tuple(diag.shape)}, {tuple(reference.shape)}; "
                             f"the filter is built for {self.shape}")
        xp = array_module(diag)
        out = copy.copy(self)
        out.sqrt_diag = xp.sqrt(diag)
        mag = abs(reference)
        out.phase = xp.where(mag > 0, reference / xp.where(mag > 0, mag, 1), 1).astype(reference.dtype)
        return out

    def _filtered(self, h: Any) -> Any:
        xp = array_module(h)
        ny, nx = self.shape
        pad = xp.zeros(self.padded, dtype=h.dtype)
        pad[:ny, :nx] = h
        return ifft2(fft2(pad) * self.weight)[:ny, :nx]

    def __call__(self, g: Any) -> Any:
        if self.phase is None:
            return (self._filtered(g * self.sqrt_diag) * self.sqrt_diag).astype(g.dtype, copy=False)
        xp = array_module(g)
        ny, nx = self.shape
        h = self.phase.conj() * (g * self.sqrt_diag)
        if self.coarsen > 1:
            f = self.coarsen
            (cy, cx), (py, px) = self.coarse, self.coarse_padded
            blocks = xp.zeros((cy * f, cx * f), dtype=self.sqrt_diag.dtype)
            blocks[:ny, :nx] = h.imag
            pad = xp.zeros((py, px), dtype=self.sqrt_diag.dtype)
            pad[:cy, :cx] = blocks.reshape(cy, f, cx, f).mean(axis=(1, 3))
            low = irfft2(rfft2(pad) * self.coarse_excess, (py, px))[:cy, :cx]
            im = h.imag + xp.repeat(xp.repeat(low, f, axis=0), f, axis=1)[:ny, :nx]
            return (self.phase * (h.real + 1j * im) * self.sqrt_diag).astype(g.dtype, copy=False)
        pad = xp.zeros(self.padded, dtype=self.sqrt_diag.dtype)
        pad[:ny, :nx] = h.imag
        im = irfft2(rfft2(pad) * self.half_weight, self.padded)[:ny, :nx]
        return (self.phase * (h.real + 1j * im) * self.sqrt_diag).astype(g.dtype, copy=False)


def probe_cutoff(probe: Any) -> float:
    """1 / the probe's extent (cycles per pixel): the extent taken as twice the rms radius of
    its intensity (all modes) about its centroid — the scale below which the data see a phase
    pattern only through its gradient across a window."""
    xp = array_module(probe)
    inten = abs(probe) ** 2
    if inten.ndim == 3:
        inten = inten.sum(axis=0)
    ny, nx = inten.shape
    y = xp.arange(ny, dtype=inten.dtype)[:, None]
    x = xp.arange(nx, dtype=inten.dtype)[None, :]
    total, my, mx = host_floats(inten.sum(), (inten * y).sum(), (inten * x).sum())
    if not total > 0:
        raise ValueError("the probe has no intensity")
    my, mx = my / total, mx / total
    (r2,) = host_floats((inten * ((y - my) ** 2 + (x - mx) ** 2)).sum())
    return 1.0 / max(2.0 * math.sqrt(r2 / total), 1.0)


def minimize(
    fun: Fun,
    x0: Vars,
    max_iter: int,
    time_budget_s: float | None = None,
    callback: Callable[[int, Vars, float], bool | None] | None = None,
    active: Callable[[int], set[str]] | None = None,
    precondition: dict[str, Any] | None = None,
    start_iteration: int = 0,
    restart_every: int = 50,
    rtol: float = 1e-10,
    clock: Callable[[], float] = time.perf_counter,
    update: Callable[[int, Vars], bool] | None = None,
    pace: IterationPace | None = None,
) -> CGResult:
    """Minimise ``fun`` over the complex arrays of ``x0`` (dict; updated copies returned).

    ``active(iteration)`` names the keys being optimised (others held fixed; default all);
    ``fun`` may leave inactive keys out of its gradient dict.
    ``precondition`` maps keys to positive scalars or arrays multiplying their gradients, or to
    a symmetric positive definite linear map (a callable, e.g. :class:`LowFrequencyPreconditioner`).
    ``callback(iteration, x, loss)`` runs after each iteration; returning True means "the
    objective changed" (e.g. a prior's target was refreshed): loss and gradient are recomputed
    and CG restarts from steepest descent.
    ``time_budget_s`` is a promise, not a start deadline: an iteration starts only when the
    longest of the last :data:`PACE_WINDOW` plain iterations still fits in what is left, and
    the fresh evaluation after an objective change only when the last full evaluation's time
    does, so the run ends within the budget up to the spread of iteration times.
    ``update(iteration, x)`` runs after the callback of an iteration CG goes on from — never
    after the last one reported (an update that no iteration follows would leave x fitted to
    the old state: positions moved under an object fitted at the old ones) — and returns True
    when it changed the objective (as the callback's True). Its time is its own guard's to
    predict (a position update): it is taken out of the iteration it falls in, so that neither
    an iteration holding an update counts as a long one nor the update as a plain iteration's
    time. ``pace``: the estimate of the next iteration to use (and keep up to date), when the
    caller shares it with the runs before and after (else a new one). ``clock`` (seconds) is
    injectable for tests.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be ≥ 0, got {max_iter}")
    t_start = clock()
    precond = precondition or {}
    x = {k: v.copy() for k, v in x0.items()}
    all_keys = set(x)
    result = CGResult(x=x)
    if max_iter == 0:
        return result
    if time_budget_s is not None and time_budget_s <= 0:
        result.stopped = "time_budget"  # not even the first evaluation fits
        return result
    f, g = fun(x)
    result.evaluations += 1
    # (on a device the evaluation is queued, not done: its time shows in the first iteration's)
    if pace is None:
        pace = IterationPace()
    pace.evaluation_s = clock() - t_start
    pace.begin(t_start)  # (the first lap is the initial evaluation: already the pace's)
    result.pace = pace
    d: Vars | None = None
    pg_old: Vars | None = None
    g_old: Vars | None = None
    gpg_old = 0.0  # ⟨g_old, P g_old⟩, the last iteration's gpg
    keys_old: set[str] = set()
    step = 1.0
    since_restart = 0
    # The loss of an accepted step is read back with the next iteration's dot products (one
    # device synchronisation for both); until then the iteration's report (losses, callback)
    # waits in ``report``.
    report: int | None = None

    def read(*extra: Any, final: bool = False) -> tuple[bool, tuple[float, ...]]:
        """Host values of f and ``extra`` in one transfer; reports a pending iteration (and runs
        ``update`` after it unless it is the ``final`` one). Returns (the callback or the update
        said the objective changed, the extra values)."""
        nonlocal f, report
        values = host_floats(f, *extra)
        f = values[0]
        changed = False
        if report is not None:
            done, report = report, None
            result.losses.append(f)
            changed = bool(callback is not None and callback(done, x, f))
            if update is not None and not final:
                t0 = clock()
                changed = bool(update(done, x)) or changed
                pace.set_aside(clock() - t0)
        return changed, values[1:]

    def lap(now: float) -> None:
        """The iteration that ends at ``now``: its plain time to the pace; the next starts."""
        pace.lap(now, count=it > start_iteration)

    def over(now: float, ahead_s: float) -> bool:
        return time_budget_s is not None and (now - t_start >= time_budget_s
                                              or now - t_start + ahead_s > time_budget_s)

    for it in range(start_iteration, start_iteration + max_iter):
        keys = set(active(it)) if active is not None else all_keys
        unknown = keys - all_keys
        if unknown:
            raise ValueError(f"active() named unknown variables {sorted(unknown)}")
        if not keys <= set(g):
            # A variable just joined and ``fun`` did not return its gradient until now.
            changed, _ = read()
            f, g = fun(x)
            result.evaluations += 1
            missing = keys - set(g)
            if missing:
                raise ValueError(f"fun() returned no gradient for active {sorted(missing)}")
            if changed:
                d = None
        device = on_device(f) or any(on_device(g[k]) for k in keys)
        if device:
            # The budget is checked before any work of the iteration: on a device the
            # previous iteration is reported (read back) together with this one's first trial.
            now = clock()
            lap(now)
            if over(now, pace.next_s()):
                result.stopped = "time_budget"
                break
        first: tuple[float, float] | None = None
        line: Any = None
        while True:
            pg = _scaled(g, precond, keys)
            restart = (
                d is None or keys != keys_old or since_restart >= restart_every
                or pg_old is None or g_old is None
            )
            if device:
                # One synchronisation per iteration: β, the restart tests and the direction are
                # formed on the device, and the line search's first trial is evaluated before
                # anything is read; its loss and slope come back with the iteration's scalars.
                d_new, gpg_d, slope_d, restarted_d = _direction_on_device(
                    g, pg, d, pg_old, gpg_old, keys, restart)
                line = _line(fun, x, d_new, keys)
                f1_d, s1_d = line.value(step, read=False)
                changed, (gpg, slope0, restarted, f1, s1) = read(gpg_d, slope_d, restarted_d, f1_d, s1_d)
                first = (f1, s1)
            elif restart:
                changed, (gpg,) = read(_dot(g, pg, keys))
                g_pgo = 0.0
            else:
                changed, (gpg, g_pgo) = read(_dot(g, pg, keys), _dot(g, pg_old, keys))
            if not changed:
                break
            # the callback changed the objective: new loss and gradient, steepest descent —
            # if that evaluation (and on a device the rest of this iteration) still fits
            t0 = clock()
            if over(t0, pace.evaluation_s + (pace.next_s() if device else 0.0)):
                result.stopped = "time_budget"
                break
            f, g = fun(x)
            result.evaluations += 1
            d = None
            pace.evaluation_s = clock() - t0
            pace.set_aside(pace.evaluation_s)
        if result.stopped == "time_budget":
            break
        if not device:
            # After the last iteration's report (its callback's plain work is part of its time).
            now = clock()
            lap(now)
            if over(now, pace.next_s()):
                result.stopped = "time_budget"
                break
        if not math.isfinite(f) or not math.isfinite(gpg):
            raise FloatingPointError(f"objective became non-finite at iteration {it} (loss {f})")
        if gpg <= rtol * max(abs(f), 1e-300):
            result.stopped = "converged"
            break
        if device:
            d = d_new
            if restart or restarted:
                since_restart = 0
        else:
            # Powell: successive gradients far from orthogonal → conjugacy is lost.
            if not restart and abs(g_pgo) >= 0.2 * gpg:
                restart = True
            if restart:
                d = {k: -pg[k] for k in keys}
                since_restart = 0
                slope0 = -2.0 * gpg
            else:
                beta = max(0.0, (gpg - g_pgo) / gpg_old)
                d = {k: -pg[k] + beta * d[k] for k in keys}
                slope0 = 2.0 * _dot(g, d, keys)
            if slope0 >= 0:  # not a descent direction: fall back to steepest descent
                d = {k: -pg[k] for k in keys}
                slope0 = -2.0 * gpg
                since_restart = 0
        accepted = _line_search(fun, x, f, d, keys, slope0, step, line=line, first=first)
        result.evaluations += accepted.evaluations
        if accepted.t is None:
            if since_restart == 0:
                result.stopped = "no_descent"
                break
            d = None  # retry from steepest descent next round
            keys_old = keys
            continue
        step = accepted.t
        x = accepted.x
        g_old, pg_old, keys_old, gpg_old = g, pg, keys, gpg
        f, g = accepted.f, accepted.g
        since_restart += 1
        result.iterations += 1
        result.x = x
        report = it
    else:
        if report is not None:
            # the last iteration's loss and callback, and its time (laps are taken when the
            # next iteration starts: this one's would be lost to a run after this one)
            read(final=True)
            pace.lap(clock())
    if report is not None:
        read(final=True)  # stopped after a device iteration was timed, before it was reported
    pace.end()
    result.x = x
    return result


def _direction_on_device(
    g: Vars, pg: Vars, d: Vars | None, pg_old: Vars | None, gpg_old: float, keys: set[str],
    restart: bool,
) -> tuple[Vars, Any, Any, Any]:
    """The host path's direction rule (PR+ β, Powell's test, the descent fallback) with
    device scalars: (direction, ⟨g, Pg⟩, slope along it φ'(0), restarted flag)."""
    gpg = _dot(g, pg, keys)
    if restart or d is None or pg_old is None:
        return {k: -pg[k] for k in keys}, gpg, -2.0 * gpg, 1.0
    xp = array_module(gpg)
    g_pgo = _dot(g, pg_old, keys)
    g_d = _dot(g, d, keys)
    powell = abs(g_pgo) >= 0.2 * gpg  # successive gradients far from orthogonal
    beta = xp.where(powell, 0.0, xp.maximum(0.0, (gpg - g_pgo) / gpg_old))
    # ⟨g, -Pg + βd⟩ = -⟨g, Pg⟩ + β⟨g, d⟩; not a descent direction → steepest descent
    slope = 2.0 * (beta * g_d - gpg)
    uphill = slope >= 0
    beta = xp.where(uphill, 0.0, beta)
    slope = xp.where(uphill, -2.0 * gpg, slope)
    direction = {k: -pg[k] + scalar_as(beta, real_of(pg[k].dtype)) * d[k] for k in keys}
    return direction, gpg, slope, powell | uphill


@dataclass
class _Trial:
    t: float | None
    x: Vars
    f: Any  #: the loss at the accepted step: a float, or a device scalar not read yet
    g: Vars
    evaluations: int


class _Direct:
    """Trial steps by evaluating ``fun`` at x + t d (loss and gradient each time); the
    accepted trial's gradient is kept, so accepting costs nothing more."""

    def __init__(self, fun: Fun, x: Vars, d: Vars, keys: set[str]) -> None:
        self.fun, self.x, self.d, self.keys = fun, x, d, keys
        self.seen: dict[float, tuple[Vars, float, Vars]] = {}

    def value(self, t: float, read: bool = True) -> tuple[Any, Any]:
        """(φ(t), φ'(t)): host floats (one read), or with ``read=False`` as they are."""
        xt = dict(self.x)
        for k in self.keys:
            xt[k] = self.x[k] + t * self.d[k]
        ft, gt = self.fun(xt)
        slope = 2.0 * _dot(gt, self.d, self.keys)
        self.seen[t] = (xt, ft, gt)
        return host_floats(ft, slope) if read else (ft, slope)

    def point(self, t: float) -> tuple[Vars, float, Vars]:
        return self.seen[t]


def _line(fun: Fun, x: Vars, d: Vars, keys: set[str]) -> Any:
    """``fun.line(x, d, keys)`` when the objective offers a cheaper model of f along the line
    (an object with ``value(t) -> (f, f')`` and ``point(t) -> (x_t, f, g)``, e.g. the
    full-batch objective, whose far field is quadratic in t), else direct evaluations."""
    make = getattr(fun, "line", None)
    line = make(x, d, keys) if make is not None else None
    return line if line is not None else _Direct(fun, x, d, keys)


def _line_search(
    fun: Fun, x: Vars, f0: float, d: Vars, keys: set[str], slope0: float, t0: float,
    max_halvings: int = 6, line: Any = None, first: tuple[float, float] | None = None,
) -> _Trial:
    """``line`` and ``first`` (φ(t0), φ'(t0)): the line and its first trial when the caller
    has evaluated them already."""
    if line is None:
        line = _line(fun, x, d, keys)

    def accept(t: float, evals: int) -> _Trial:
        xt, ft, gt = line.point(t)
        return _Trial(t, xt, ft, gt, evals)

    evals = 1
    t1 = t0
    f1, s1 = line.value(t1) if first is None else first
    best = (t1, f1) if f1 < f0 else None
    if best is not None and abs(s1) <= 0.3 * abs(slope0):
        return accept(t1, evals)
    # Secant step on φ'(t): exact for a quadratic φ; bounded to [t/10, 10 t] for safety.
    if s1 > slope0 and math.isfinite(f1):
        t2 = t1 * slope0 / (slope0 - s1)
        t2 = min(max(t2, 0.1 * t1), 10.0 * t1)
    else:
        t2 = 4.0 * t1 if best is not None else 0.25 * t1
    f2, _ = line.value(t2)
    evals += 1
    if f2 < f0 and (best is None or f2 < best[1]):
        best = (t2, f2)
    if best is not None:
        return accept(best[0], evals)
    t = min(t1, t2)
    for _ in range(max_halvings):
        t *= 0.5
        ft, _ = line.value(t)
        evals += 1
        if ft < f0:
            return accept(t, evals)
    return _Trial(None, x, f0, {}, evals)
