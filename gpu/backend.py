"""The one place that chooses between NumPy and CuPy.

CuPy is imported lazily and only on request; asking for the GPU without CuPy is a clear error.
CuPy is never aliased to NumPy: code asks :func:`array_module` for the module of its inputs.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

BackendName = Literal["numpy", "cupy"]

#: Default precision: single, as detectors give < 24 bits of signal and GPUs are fastest there.
DEFAULT_PRECISION: Literal["single", "double"] = "single"


class BackendUnavailable(RuntimeError):
    """The requested array backend cannot be used on this machine."""


@functools.cache
def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            "backend 'cupy' requested but CuPy is not installed; install the extra that matches "
            "your CUDA driver: pip install 'cryoptycho[cuda12]' or 'cryoptycho[cuda13]'"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA raises its own error types when the driver is missing
        raise BackendUnavailable(f"CuPy is installed but no CUDA device is usable: {exc}") from exc
    if count < 1:
        raise BackendUnavailable("CuPy is installed but no CUDA device is visible")
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        _cupy()
    except BackendUnavailable:
        return False
    return True


def get_xp(name: BackendName | str = "numpy") -> ModuleType:
    """The array module for a backend name: ``"numpy"`` or ``"cupy"`` (alias ``"gpu"``)."""
    key = str(name).lower()
    if key in ("numpy", "cpu", "np"):
        return np
    if key in ("cupy", "gpu", "cuda", "cp"):
        return _cupy()
    raise ValueError(f"unknown backend {name!r}: choose 'numpy' or 'cupy'")


def array_module(*arrays: Any) -> ModuleType:
    """The array module (numpy or cupy) of the given arrays; NumPy for non-arrays."""
    for arr in arrays:
        mod = type(arr).__module__
        if mod.startswith("cupy"):
            return _cupy()
    return np


def backend_name(xp: ModuleType) -> BackendName:
    return "cupy" if xp.__name__.startswith("cupy") else "numpy"


def to_numpy(arr: Any) -> np.ndarray:
    """A host (NumPy) copy or view of ``arr``, whatever its backend."""
    if type(arr).__module__.startswith("cupy"):
        return arr.get()
    return np.asarray(arr)


def asarray(arr: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """``arr`` on the backend ``xp`` (copies across host/device only when needed)."""
    if xp is np:
        return np.asarray(to_numpy(arr), dtype=dtype)
    return xp.asarray(arr, dtype=dtype)


def real_dtype(precision: str = DEFAULT_PRECISION) -> np.dtype:
    if precision == "single":
        return np.dtype(np.float32)
    if precision == "double":
        return np.dtype(np.float64)
    raise ValueError(f"precision must be 'single' or 'double', got {precision!r}")


def complex_dtype(precision: str = DEFAULT_PRECISION) -> np.dtype:
    return np.dtype(np.complex64) if real_dtype(precision) == np.float32 else np.dtype(np.complex128)


def complex_of(dtype: Any) -> np.dtype:
    """The complex dtype with the precision of ``dtype`` (float32 → complex64)."""
    d = np.dtype(dtype)
    return np.dtype(np.complex128) if d in (np.float64, np.complex128) else np.dtype(np.complex64)


def real_of(dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    return np.dtype(np.float64) if d in (np.float64, np.complex128) else np.dtype(np.float32)


# --- FFTs --------------------------------------------------------------------------------------
# All engine FFTs are unitary ("ortho") over the last two axes, so that the total intensity of a
# far-field frame equals the total intensity of its exit wave (Parseval): probe power = counts.


def fft2(x: Any) -> Any:
    xp = array_module(x)
    if xp is np:
        import scipy.fft as sfft

        return sfft.fft2(x, norm="ortho", workers=-1, overwrite_x=False)
    return xp.fft.fft2(x, norm="ortho")


def ifft2(x: Any) -> Any:
    xp = array_module(x)
    if xp is np:
        import scipy.fft as sfft

        return sfft.ifft2(x, norm="ortho", workers=-1, overwrite_x=False)
    return xp.fft.ifft2(x, norm="ortho")


def fftfreq(n: int, d: float, xp: ModuleType = np) -> Any:
    return xp.fft.fftfreq(n, d)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued device work (no-op on NumPy) — for honest timings."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def free_device_bytes(xp: ModuleType) -> int | None:
    """Free device memory in bytes, or None on the host backend."""
    if xp is np:
        return None
    free, _total = xp.cuda.runtime.memGetInfo()
    return int(free)
