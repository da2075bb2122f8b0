"""The small linear transforms of BM3D, as matrices applied with batched matmuls.

BM3D's 3-D transform is separable: a 2-D transform of every B×B patch (a matrix ``M`` applied on
both sides, ``M P Mᵀ``) followed by a 1-D transform along the group. Building the transforms as
explicit matrices lets NumPy and CuPy run the same ``matmul``/``einsum`` code, and for patches of
8×8 and groups of ≤ 32 a dense matrix is as fast as any fast transform.

All matrices are built in float64 on the host and cast once per call.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n×n): ``dct_matrix(n) @ x`` is ``scipy.fft.dct(x, norm='ortho')``."""
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    m.setflags(write=False)
    return m


@functools.cache
def haar_matrix(n: int) -> np.ndarray:
    """Orthonormal Haar wavelet matrix with full decomposition (n a power of two).

    Row 0 is the mean (DC) of the group; the other rows are the Haar details from coarsest to
    finest. Orthonormality keeps the noise standard deviation σ unchanged per coefficient, which
    is what makes one threshold λ₃D·σ valid for every coefficient.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Haar transform size must be a power of two, got {n}")
    if n == 1:
        m = np.ones((1, 1))
    else:
        half = haar_matrix(n // 2)
        top = np.kron(half, [1.0, 1.0])
        bottom = np.kron(np.eye(n // 2), [1.0, -1.0])
        m = np.vstack([top, bottom]) / np.sqrt(2.0)
    m = np.ascontiguousarray(m)
    m.setflags(write=False)
    return m


@functools.cache
def kaiser_window(n: int, beta: float) -> np.ndarray:
    """2-D Kaiser window (outer product of 1-D windows) used to weight aggregated patches.

    It down-weights patch borders, where the blocking artefacts of the patch transform live.
    """
    w = np.kaiser(n, beta)
    k = np.outer(w, w)
    k.setflags(write=False)
    return k


def power_of_two_floor(counts: np.ndarray | object) -> object:
    """Largest power of two ≤ each (positive integer) count, element-wise, on either backend."""
    from .backend import array_module

    xp = array_module(counts)
    c = xp.maximum(xp.asarray(counts), 1)
    # floor(log2) via the float exponent is exact for integers below 2**53.
    return (2 ** xp.floor(xp.log2(c.astype(np.float64)))).astype(np.int64)


#: Biorthogonal 1.5 analysis filters (Cohen–Daubechies–Feauveau spline wavelet with a Haar
#: synthesis side), in units of 1/128 and scaled by 1/√2. The detail filter is plain Haar.
_BIOR15_LO = np.array([3, -3, -22, 22, 128, 128, 22, -22, -3, 3], dtype=np.float64) / (
    128 * np.sqrt(2)
)
_BIOR15_HI = np.array([0, 0, 0, 0, -1, 1, 0, 0, 0, 0], dtype=np.float64) / np.sqrt(2)


def _analysis_step(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """One periodised two-channel analysis step as an (n×n) matrix: rows = [approx; detail]."""
    m = np.zeros((n, n))
    half = n // 2
    # Shift 5 centres the 10-tap filters on the sample pair (2k, 2k+1).
    for k in range(half):
        for j in range(lo.size):
            col = (2 * k + 5 - j) % n
            m[k, col] += lo[j]
            m[half + k, col] += hi[j]
    return m


@functools.cache
def bior15_matrix(n: int) -> np.ndarray:
    """Biorthogonal 1.5 wavelet analysis matrix with full dyadic decomposition (n a power of 2).

    This is the 2-D block transform of the hard-thresholding stage in Dabov et al. 2007: its
    short Haar-like synthesis functions suit the sharp structure of the noisy blocks. Rows are
    normalised to unit norm so that white noise of std σ has std σ on every coefficient (the
    transform is near-orthogonal, so one threshold λ₃D·σ stays valid); invert with ``inv``.
    """
    if n < 2 or n & (n - 1):
        raise ValueError(f"bior1.5 transform size must be a power of two >= 2, got {n}")
    total = np.eye(n)
    size = n
    while size > 1:
        step = np.eye(n)
        step[:size, :size] = _analysis_step(size, _BIOR15_LO, _BIOR15_HI)
        total = step @ total
        size //= 2
    total /= np.linalg.norm(total, axis=1, keepdims=True)
    total.setflags(write=False)
    return total


@functools.cache
def block_transform(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(forward, inverse) matrices of the named 1-D block transform: 'dct' or 'bior1.5'."""
    if name == "dct":
        fwd = dct_matrix(n)
        return fwd, fwd.T
    if name == "bior1.5":
        fwd = bior15_matrix(n)
        inv = np.linalg.inv(fwd)
        inv.setflags(write=False)
        return fwd, inv
    raise ValueError(f"unknown block transform {name!r}: choose 'dct' or 'bior1.5'")
