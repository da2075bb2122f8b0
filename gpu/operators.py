"""The ptychographic forward model and its adjoints, for a batch of (sub-pixel) positions.

Exit wave of position k:  z_k = F[ S_{δk} ψ · R_{k} T ]
    R_k   extracts the M×M window of the object T whose top-left pixel is floor(p_k),
    S_δ   shifts the probe by the fractional part δ_k = p_k − floor(p_k) (Fourier shift),
    F     is the unitary 2-D FFT (zero frequency at index 0, "FFT order").

Every linear piece has an adjoint here, checked by the adjoint tests. Detector frames arrive
with zero frequency at the centre: :func:`to_fft_order` converts them once on arrival.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import ThreadpoolController

from .backend import array_module, asarray, complex_of, fft2, ifft2, index_sum, to_numpy

#: Fractional offsets closer than this (pixels) share one shifted probe.
SUBPIXEL_QUANTUM = 1e-3


def to_fft_order(frames: Any) -> Any:
    """Detector order (zero frequency at index M//2) → FFT order (zero frequency at 0)."""
    xp = array_module(frames)
    return xp.fft.ifftshift(frames, axes=(-2, -1))


def from_fft_order(frames: Any) -> Any:
    """FFT order → detector order (zero frequency at the centre, index M//2)."""
    xp = array_module(frames)
    return xp.fft.fftshift(frames, axes=(-2, -1))


class Batch:
    """Index bookkeeping for one batch of positions, computed once and reused by the adjoints.

    :func:`make_batch` keeps only the top-left corner of each window (``corners``, (B, 2)) and
    the window shape: the per-pixel linear index ``flat_index`` (B, M, M) is made on demand
    (CuPy's gather and scatter use it per chunk; NumPy's block copies need only the corners).
    An index kept for every position cost 8 bytes per detector pixel of the scan — four
    times a uint16 frame store — during full-batch refinement. A batch can also be built
    from an explicit ``flat_index`` (any windows, e.g. in tests)."""

    def __init__(
        self,
        flat_index: Any | None,
        group: Any,
        shifts: Any,
        object_shape: tuple[int, int],
        *,
        corners: Any | None = None,
        window: tuple[int, int] | None = None,
    ) -> None:
        if flat_index is None and (corners is None or window is None):
            raise ValueError("a Batch needs flat_index, or corners and the window shape")
        self._flat = flat_index
        self.corners = corners  #: (B, 2) int top-left pixel of each window, or None
        self.window = window  #: (My, Mx) window shape when built from corners
        self.group = group  #: (B,) int: which shifted probe each position uses
        self.shifts = shifts  #: (G, 2) float: fractional shift of each group's probe
        self.object_shape = object_shape
        #: host copies of ``group`` and ``shifts`` (made with the batch by make_batch): the
        #: decisions taken per evaluation (shifted or not, which groups) read them, not the
        #: device arrays, so they cost no device synchronisation
        self.host: tuple[np.ndarray, np.ndarray] | None = None
        #: host copy of ``corners`` (make_batch, sub_batch): :func:`place_kernel` plans on it
        self.host_corners: np.ndarray | None = None

    def host_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(group, shifts) on the host: kept from make_batch, else copied once."""
        if self.host is None:
            self.host = (to_numpy(self.group), to_numpy(self.shifts))
        return self.host

    @property
    def flat_index(self) -> Any:
        """(B, M, M) int: linear index into the object of each window pixel."""
        if self._flat is not None:
            return self._flat
        xp = array_module(self.corners)
        my, mx = self.window
        rows = self.corners[:, 0, None] + xp.arange(my)[None, :]
        cols = self.corners[:, 1, None] + xp.arange(mx)[None, :]
        return rows[:, :, None] * self.object_shape[1] + cols[:, None, :]

    @property
    def size(self) -> int:
        return int((self.corners if self._flat is None else self._flat).shape[0])

    def __repr__(self) -> str:
        return (f"Batch(size={self.size}, groups={int(self.shifts.shape[0])}, "
                f"object_shape={self.object_shape})")

    @functools.cached_property
    def distinct_groups(self) -> bool:
        """Every position has a probe shift of its own (a jittered scan). The shifted probes
        are then made directly in position order — no gather of G probes to B positions and
        no group sum back — as the G FFTs are the same B FFTs either way."""
        g = int(self.shifts.shape[0])
        if self.size < 2 or g < self.size:
            return False
        return int(np.unique(self.host_index()[0]).size) == self.size

    @functools.cached_property
    def unshifted(self) -> bool:
        """One probe for every position, not shifted (an integer-pixel scan)."""
        shifts = self.host_index()[1]
        return shifts.shape[0] == 1 and not shifts.any()

    @functools.cached_property
    def present_groups(self) -> np.ndarray:
        """The probe-shift groups this batch's positions use (host, sorted)."""
        return np.unique(self.host_index()[0])


def make_batch(
    pixels: Any,
    object_shape: tuple[int, int],
    probe_shape: tuple[int, int],
    quantum: float = SUBPIXEL_QUANTUM,
    xp: Any = None,
) -> Batch:
    """Prepare the gather/scatter indices for probe windows with top-left corners ``pixels``
    (K, 2) in fractional object pixels. Windows must lie inside the object.

    Fractional offsets are rounded to multiples of ``quantum`` pixels; each distinct offset
    costs an FFT pair per evaluation (shifted probe, and its adjoint), so a coarser quantum
    (e.g. 1/16 px, ≤ 0.03 px position error) bounds that cost for jittered scans.

    The index bookkeeping is done on the host (positions are a few numbers per frame; a device
    would synchronise to check the bounds and to size ``unique``'s result) and the arrays are
    placed on ``xp`` (default: the backend of ``pixels``)."""
    if not 0 < quantum <= 0.5:
        raise ValueError(f"sub-pixel quantum must be in (0, 0.5] pixels, got {quantum}")
    dest = array_module(pixels) if xp is None else xp
    xp = np
    pix = np.asarray(to_numpy(pixels), dtype=np.float64).reshape(-1, 2)
    ny, nx = object_shape
    my, mx = probe_shape
    corner = xp.floor(pix)
    steps = round(1.0 / quantum)
    key = xp.round((pix - corner) / quantum).astype(np.int64)
    # A fraction that rounds to 1 means the next pixel, with no shift.
    roll = key >= steps
    corner = (corner + roll).astype(np.int64)
    key = xp.where(roll, 0, key)
    if pix.shape[0]:
        bad = (corner[:, 0] < 0) | (corner[:, 1] < 0) | (corner[:, 0] + my > ny) | (corner[:, 1] + mx > nx)
        if bool(xp.any(bad)):
            first = int(xp.argmax(bad))
            raise ValueError(
                f"position {first} (window at pixel {corner[first].tolist()}) lies outside the "
                f"object canvas {object_shape} for a {probe_shape} probe"
            )
    scale = steps + 1
    uniq, group = xp.unique(key[:, 0] * scale + key[:, 1], return_inverse=True)
    shifts = xp.stack([uniq // scale, uniq % scale], axis=-1).astype(np.float64) * quantum
    group = group.reshape(-1)
    if dest is np:
        batch = Batch(None, group, shifts, object_shape, corners=corner, window=(my, mx))
    else:
        batch = Batch(None, dest.asarray(group), dest.asarray(shifts), object_shape,
                      corners=dest.asarray(corner), window=(my, mx))
    batch.host = (group, shifts)
    batch.host_corners = corner
    return batch


def sub_batch(batch: Batch, part: slice) -> Batch:
    """The positions ``part`` of ``batch`` as a batch of their own, keeping only the probe
    shifts they use: a chunk that kept all of its parent's G shifts would shift (FFT) the
    probe G times per chunk instead of once per distinct shift."""
    xp = array_module(batch.group)
    host_group, host_shifts = batch.host_index()
    used, group = np.unique(host_group[part], return_inverse=True)
    group = group.reshape(-1)
    shifts = host_shifts[used]
    dev_group, dev_shifts = (group, shifts) if xp is np else (xp.asarray(group), xp.asarray(shifts))
    if batch.corners is not None:
        sub = Batch(None, dev_group, dev_shifts, batch.object_shape,
                    corners=batch.corners[part], window=batch.window)
    else:
        sub = Batch(batch.flat_index[part], dev_group, dev_shifts, batch.object_shape)
    sub.host = (group, shifts)
    if batch.host_corners is not None:
        sub.host_corners = batch.host_corners[part]
    return sub


def _shift_factors(shifts: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
    """The separable factors exp(-2πi qy δy) (G, My, 1) and exp(-2πi qx δx) (G, 1, Mx) of
    the shift ramp: G·(My + Mx) complex exponentials instead of G·My·Mx."""
    xp = array_module(shifts)
    qy = xp.fft.fftfreq(shape[0])[None, :]
    qx = xp.fft.fftfreq(shape[1])[None, :]
    ey = xp.exp(-2j * np.pi * qy * shifts[:, 0, None]).astype(dtype)
    ex = xp.exp(-2j * np.pi * qx * shifts[:, 1, None]).astype(dtype)
    return ey[:, :, None], ex[:, None, :]


def _shift_ramps(shifts: Any, shape: tuple[int, int], dtype: Any) -> Any:
    """exp(-2πi q·δ) for each shift δ (G, 2): multiplying a spectrum by it shifts by +δ."""
    ey, ex = _shift_factors(shifts, shape, dtype)
    return ey * ex


def _unshifted(batch: Batch) -> bool:
    return batch.unshifted


def _factors(batch: Batch, per_position: bool, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
    """:func:`_shift_factors` of the batch's shifts (per group, or per position), made once
    per batch and kept on it: a batch is evaluated many times (CG, line searches)."""
    key = (per_position, tuple(shape), np.dtype(dtype).str)
    cache = batch.__dict__.setdefault("_factor_cache", {})
    if key not in cache:
        shifts = batch.shifts[batch.group] if per_position else batch.shifts
        cache[key] = _shift_factors(shifts, shape, dtype)
    return cache[key]


def _shift(probe: Any, factors: tuple[Any, Any]) -> Any:
    """S_δ ψ for each shift δ of ``factors`` → (G, M, M). The ramp is applied as its two
    separable factors in place: no (G, M, M) ramp array is built."""
    ey, ex = factors
    spec = fft2(probe)[None] * ey
    spec *= ex
    return ifft2(spec)


def _shift_back_sum(per_group: Any, factors: tuple[Any, Any]) -> Any:
    """Σ_g S_{δg}^H a_g for a_g (G, M, M); ``per_group`` is overwritten."""
    xp = array_module(per_group)
    ey, ex = factors
    spec = fft2(per_group)
    spec *= xp.conj(ey)
    spec *= xp.conj(ex)
    return ifft2(spec.sum(axis=0))


def shifted_probes(probe: Any, batch: Batch) -> Any:
    """The G distinct shifted probes S_δ ψ, shape (G, M, M)."""
    if _unshifted(batch):
        return probe[None]
    return _shift(probe, _factors(batch, False, probe.shape, complex_of(probe.dtype)))


def shift_back(per_group: Any, batch: Batch) -> Any:
    """Adjoint of :func:`shifted_probes`: Σ_g S_{δg}^H a_g for a_g of shape (G, M, M)."""
    if _unshifted(batch):
        return per_group[0]
    factors = _factors(batch, False, per_group.shape[-2:], complex_of(per_group.dtype))
    return _shift_back_sum(per_group.copy(), factors)


def position_probes(probe: Any, batch: Batch) -> Any:
    """S_{δk} ψ for every position k: (B, M, M), or (1, M, M) when all share one probe."""
    if _unshifted(batch):
        return probe[None]
    distinct = batch.distinct_groups
    probes = _shift(probe, _factors(batch, distinct, probe.shape, complex_of(probe.dtype)))
    if distinct or probes.shape[0] == 1:
        return probes
    return probes[batch.group]


def probe_adjoint(per_position: Any, batch: Batch) -> Any:
    """Adjoint of :func:`position_probes`: Σ_k S_{δk}^H a_k for a_k (B, M, M). ``per_position``
    may be overwritten (it is the caller's temporary)."""
    if _unshifted(batch):
        return per_position.sum(axis=0)
    distinct = batch.distinct_groups
    factors = _factors(batch, distinct, per_position.shape[-2:], complex_of(per_position.dtype))
    if distinct:
        return _shift_back_sum(per_position, factors)
    return _shift_back_sum(group_sum(per_position, batch), factors)


def extract(obj: Any, batch: Batch) -> Any:
    """R_k T for every position: (B, M, M) windows of the object."""
    if array_module(obj) is np and (batch.corners is not None or batch.flat_index.ndim == 3):
        rows, cols, my, mx = _blocks(batch)
        # Block copies out of a strided view of all windows: no index per pixel (≈ 10× faster
        # than the flat gather) and no Python loop over positions (≈ 2× faster than slices).
        return sliding_window_view(obj, (my, mx))[rows, cols]
    return obj.reshape(-1)[batch.flat_index]


def _blocks(batch: Batch) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Top-left (row, col) of every window and the window shape, checking that each window
    is the contiguous block ``make_batch`` builds."""
    if batch.corners is not None:
        corners = np.asarray(batch.corners)
        return corners[:, 0], corners[:, 1], batch.window[0], batch.window[1]
    flat = np.asarray(batch.flat_index)
    _, my, mx = flat.shape
    nx = batch.object_shape[1]
    rows, cols = np.divmod(flat[:, 0, 0], nx)
    if not np.array_equal(flat[:, -1, -1], (rows + my - 1) * nx + cols + mx - 1):
        raise ValueError("batch windows are not contiguous blocks of the object canvas")
    return rows, cols, my, mx


def scatter_add(windows: Any, batch: Batch) -> Any:
    """Adjoint of :func:`extract`: Σ_k R_k^H w_k onto a zero object canvas."""
    xp = array_module(windows)
    if xp is np and windows.ndim == 3:
        return _scatter_blocks(windows, batch)
    n = batch.object_shape[0] * batch.object_shape[1]
    idx = batch.flat_index.reshape(-1)
    w = windows.reshape(-1)
    # A scatter-add, not bincount: CuPy's bincount reads max(index) on the host (a device
    # synchronisation per call); the sums are float64, as bincount's were.
    return index_sum(idx, w, n).reshape(batch.object_shape)


def _scatter_blocks(windows: Any, batch: Batch) -> np.ndarray:
    """NumPy path of :func:`scatter_add`: every window is a contiguous block of the canvas
    (``make_batch`` builds them so), and one in-place slice add per position is ~20× faster
    on a CPU than ``bincount`` over all window pixels (which also widens to float64). On the
    GPU a Python loop per position would be launch-bound, so CuPy keeps ``bincount``."""
    rows, cols, my, mx = _blocks(batch)
    out = np.zeros(batch.object_shape, dtype=windows.dtype)
    for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        out[r : r + my, c : c + mx] += windows[k]
    return out


#: A row of windows is placed by one matrix product when its positions × this ≥ the row's
#: width in pixels: per window pixel the product does ``width / positions`` multiply-adds
#: instead of one add. Measured on a (loaded) 2-core CPU, 64×64 and 96×96 windows, CPU
#: time: the product breaks even with a slice add per window at positions / width ≈ 0.25 (a raster
#: row at a 3-pixel step), wins 2× at ≈ 0.34 (2 px) and by far where windows pile up
#: (repeated positions: the row's histogram counts them); see MEASUREMENTS.md 2026-12-06.
DENSE_ROW_GAIN = 3
_blas_threads: ThreadpoolController | None = None


def _one_blas_thread() -> Any:
    """A context with BLAS on one thread. The row products are small (≈ 10 MFLOP): on a
    loaded 2-core box OpenBLAS's threads made them 60× slower (20 ms instead of 0.3 ms)."""
    global _blas_threads
    if _blas_threads is None:
        _blas_threads = ThreadpoolController()  # inspects the loaded libraries once
    return _blas_threads.limit(limits=1, user_api="blas")


#: widest row whose Toeplitz gather index :func:`_toeplitz_index` keeps (an add_frames batch's
#: rows; a sweep's whole-canvas rows are rarer and would keep megabytes)
_KEEP_TOEPLITZ_WIDTH = 1024


@functools.lru_cache(maxsize=8)
def _toeplitz_index(width: int, mx: int) -> np.ndarray:
    """[dx, x] → x − dx + mx − 1: the gather of :func:`place_kernel`'s Toeplitz matrices from a
    padded row histogram (kept: a live scan's batches repeat a few widths)."""
    index = (np.arange(width)[None, :] - np.arange(mx)[:, None]) + (mx - 1)
    index.flags.writeable = False
    return index


def place_kernel(out: Any, kernel: Any, corners: np.ndarray, device_corners: Any = None) -> None:
    """``out[r:r+My, c:c+Mx] += kernel`` for every row (r, c) of the host int ``corners``
    (K, 2), in place — Σ_k R_k^H kernel, the same (My, Mx) window at every position (the
    unshifted illumination). Repeated corners add.

    Windows whose corners share a row and are dense along it (a raster scan's row) are summed
    by one matrix product, ``kernel @ C_r`` with C_r[dx, x] = #{k in row r: c_k = x − dx}
    (a Toeplitz matrix of the row's corner histogram), all rows in one batched product: the
    work per row scales with its width, not with its positions × M². The remaining windows
    are added one by one on NumPy (a block add is the fastest there) and by one scatter-add
    on a device (a kernel launch per window would be launch-bound). Everything is planned on
    the host from ``corners``; the device gets only the dense rows' corner histograms, and
    the other windows' corners unless ``device_corners`` (the same corners, already on the
    device, e.g. a batch's) serve them all. The BLAS thread limit is process-wide while it
    lasts (≈ 0.5 ms): the engine is driven from one thread."""
    xp = array_module(out)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    if corners.shape[0] == 0:
        return
    my, mx = (int(s) for s in kernel.shape)
    rows, cols = corners[:, 0], corners[:, 1]
    if rows.min() == rows.max():
        # one scan row (a raster's frames arrive row by row): no sort (np.unique's ≈ 20 µs
        # per call were a sixth of an engine's add_frames of 64 frames)
        uniq, row_of, counts = rows[:1], np.zeros(rows.shape[0], np.intp), np.array([rows.shape[0]])
    else:
        uniq, row_of, counts = np.unique(rows, return_inverse=True, return_counts=True)
        row_of = row_of.reshape(-1)
    c0 = int(cols.min())
    width = int(cols.max()) - c0 + mx
    dense = counts * DENSE_ROW_GAIN >= width
    in_dense = dense[row_of]
    if dense.any():
        slot = np.cumsum(dense) - 1
        # histogram of each dense row's corners, padded by mx − 1 zeros on both sides so that
        # the Toeplitz gather below needs no bounds
        span = width + mx - 1
        where = slot[row_of[in_dense]] * span + (cols[in_dense] - c0 + mx - 1)
        hist = np.bincount(where, minlength=int(dense.sum()) * span).reshape(-1, span).astype(kernel.dtype)
        hist_dev = asarray(hist, xp)
        toeplitz = _toeplitz_index(width, mx) if xp is np and width <= _KEEP_TOEPLITZ_WIDTH else (
            (xp.arange(width)[None, :] - xp.arange(mx)[:, None]) + (mx - 1))
        if xp is np:
            with _one_blas_thread():
                strips = np.matmul(kernel, hist_dev[:, toeplitz])
        else:
            strips = xp.matmul(kernel, hist_dev[:, toeplitz])  # (rows, My, width)
        for i, r in enumerate(uniq[dense].tolist()):
            out[r : r + my, c0 : c0 + width] += strips[i]
    rest = corners[~in_dense]
    if rest.shape[0] == 0:
        return
    if xp is np:
        for r, c in rest.tolist():
            out[r : r + my, c : c + mx] += kernel
        return
    nx = out.shape[1]
    if device_corners is not None and rest.shape[0] == corners.shape[0]:
        start = device_corners[:, 0] * nx + device_corners[:, 1]  # no transfer
    else:
        start = asarray(rest[:, 0] * nx + rest[:, 1], xp)
    window = xp.arange(my)[:, None] * nx + xp.arange(mx)[None, :]
    index = (start[:, None, None] + window[None]).reshape(-1)
    values = xp.broadcast_to(kernel, (rest.shape[0], my, mx)).reshape(-1)
    out += index_sum(index, values, out.size).reshape(out.shape)


def group_sum(per_position: Any, batch: Batch) -> Any:
    """Sum (B, M, M) arrays over the positions of each probe-shift group → (G, M, M)."""
    xp = array_module(per_position)
    g = batch.shifts.shape[0]
    if g == 1:
        return per_position.sum(axis=0)[None]
    if xp is np:
        # Sort positions by group and sum runs: O(B) whatever G is (with jittered positions
        # every position is its own group, and a loop over groups would be O(B·G)).
        # A sub-batch (a chunk of a larger batch) keeps all G shifts but may lack groups.
        if g >= batch.size and np.unique(batch.group).size == batch.size:
            # Every position its own group (jittered scans): a scatter, not a sum.
            out = np.zeros((g,) + per_position.shape[1:], dtype=per_position.dtype)
            out[batch.group] = per_position
            return out
        order = np.argsort(batch.group, kind="stable")
        ordered = batch.group[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        out = np.zeros((g,) + per_position.shape[1:], dtype=per_position.dtype)
        out[ordered[starts]] = np.add.reduceat(per_position[order], starts, axis=0)
        return out
    if batch.present_groups.size == batch.size:  # each position its own group: a scatter
        out = xp.zeros((g,) + per_position.shape[1:], dtype=per_position.dtype)
        out[batch.group] = per_position
        return out
    # One scatter-add over all positions (no loop over groups, no boolean masks: each
    # would be a kernel launch and a device synchronisation)
    return index_sum(batch.group, per_position, g)


def exit_waves(obj: Any, probe: Any, batch: Batch) -> tuple[Any, Any, Any]:
    """Real-space exit waves (B, M, M), plus the windows and the per-position probes
    (:func:`position_probes`, (B, M, M) or (1, M, M)) for reuse."""
    windows = extract(obj, batch)
    psi = position_probes(probe, batch)
    return psi * windows, windows, psi


def forward(obj: Any, probe: Any, batch: Batch) -> Any:
    """Far-field waves z_k = F[S_δ ψ · R_k T], (B, M, M), FFT order."""
    waves, _, _ = exit_waves(obj, probe, batch)
    return fft2(waves)


def adjoint_object(far: Any, probe: Any, batch: Batch, probes: Any | None = None) -> Any:
    """Adjoint of T ↦ forward(T, ψ): Σ_k R_k^H [ conj(S_δ ψ) · F^H g_k ].
    ``probes``: :func:`position_probes` of ``probe`` when the caller has them."""
    psi = position_probes(probe, batch) if probes is None else probes
    return scatter_add(psi.conj() * ifft2(far), batch)


def adjoint_probe(far: Any, obj: Any, batch: Batch, windows: Any | None = None) -> Any:
    """Adjoint of ψ ↦ forward(T, ψ): Σ_g S_g^H Σ_{k∈g} conj(R_k T) · F^H g_k."""
    if windows is None:
        windows = extract(obj, batch)
    return probe_adjoint(windows.conj() * ifft2(far), batch)


def mode_intensity(obj: Any, probe: Any, batch: Batch) -> Any:
    """Σ_m |F[S_δ ψ_m · R_k T]|² (B, M, M), FFT order: the measured intensity model of a
    probe with P incoherent modes ``probe`` (P, M, M), or |z|² of a single (M, M) probe."""
    modes = probe[None] if probe.ndim == 2 else probe
    windows = extract(obj, batch)
    total = None
    for m in range(modes.shape[0]):  # (iterating a device array would read it back)
        far = fft2(position_probes(modes[m], batch) * windows)
        inten = far.real * far.real
        inten += far.imag * far.imag
        total = inten if total is None else total + inten
    return total


#: Positions per chunk of :func:`illumination`: bounds its work memory on a full scan.
ILLUMINATION_CHUNK = 512


def illumination(probe: Any, batch: Batch) -> Any:
    """Σ_k R_k^H |S_δ ψ|² — the total probe intensity at each object pixel (for step scaling
    and coverage maps). In chunks: the shifted probes of a whole jittered scan at once would
    take 8 bytes per detector pixel of the scan. A mixed-state probe (P, M, M) gives the sum
    over its modes (the intensity of incoherent modes adds)."""
    if probe.ndim == 3:
        total = illumination(probe[0], batch)
        for m in range(1, probe.shape[0]):  # (iterating a device array would read it back)
            total = total + illumination(probe[m], batch)
        return total
    xp = array_module(probe)
    total = None
    for lo in range(0, max(batch.size, 1), ILLUMINATION_CHUNK):
        part = batch if batch.size <= ILLUMINATION_CHUNK else sub_batch(batch, slice(lo, lo + ILLUMINATION_CHUNK))
        probes = shifted_probes(probe, part)
        inten = probes.real**2 + probes.imag**2
        per_pos = inten[part.group] if probes.shape[0] > 1 else xp.broadcast_to(
            inten, (part.size,) + inten.shape[1:]
        )
        chunk = scatter_add(per_pos, part)
        total = chunk if total is None else total + chunk
    return total
