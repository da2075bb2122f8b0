"""The one place that chooses between NumPy and CuPy.

CuPy is imported lazily and only on request; asking for the GPU without CuPy is a clear error.
CuPy is never aliased to NumPy: code asks :func:`array_module` for the module of its inputs.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

BackendName = Literal["numpy", "cupy", "strict"]

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


def _strict() -> ModuleType:
    from . import strict

    return strict.xp


def get_xp(name: BackendName | str = "numpy") -> ModuleType:
    """The array module for a backend name: ``"numpy"`` or ``"cupy"`` (alias ``"gpu"``);
    ``"strict"`` is the test backend of :mod:`cryoptycho.gpu.strict` (CuPy's semantics on the
    CPU, with every synchronisation counted)."""
    key = str(name).lower()
    if key in ("numpy", "cpu", "np"):
        return np
    if key in ("cupy", "gpu", "cuda", "cp"):
        return _cupy()
    if key == "strict":
        return _strict()
    raise ValueError(f"unknown backend {name!r}: choose 'numpy' or 'cupy'")


def _is_strict(arr: Any) -> bool:
    return type(arr).__name__ == "StrictArray" and type(arr).__module__.endswith("gpu.strict")


def array_module(*arrays: Any) -> ModuleType:
    """The array module (numpy, cupy or the strict test backend) of the given arrays; NumPy
    for non-arrays."""
    for arr in arrays:
        mod = type(arr).__module__
        if mod.startswith("cupy"):
            return _cupy()
        if _is_strict(arr):
            return _strict()
    return np


def backend_name(xp: ModuleType) -> BackendName:
    if xp.__name__.startswith("cupy"):
        return "cupy"
    return "strict" if xp.__name__.endswith("gpu.strict.xp") else "numpy"


def to_numpy(arr: Any) -> np.ndarray:
    """A host (NumPy) copy or view of ``arr``, whatever its backend (from a device: one
    transfer, a synchronisation)."""
    if type(arr).__module__.startswith("cupy") or _is_strict(arr):
        return arr.get()
    return np.asarray(arr)


def on_device(value: Any) -> bool:
    """``value`` lives on a device backend (CuPy or the strict test backend)."""
    mod = type(value).__module__
    return mod.startswith("cupy") or _is_strict(value)


def dev_float(value: Any) -> Any:
    """``value`` (a 0-d array, scalar or number) as a float *where it lives*: a float64 0-d
    device array on a device (no synchronisation), a Python ``float`` on the host (exactly
    what ``float(value)`` gave). What the engine keeps instead of ``float(x)`` until a host
    value is really needed (:func:`host_floats`)."""
    if on_device(value):
        return value.astype(np.float64)
    return float(value)


def scalar_as(value: Any, dtype: Any) -> Any:
    """A scalar from :func:`dev_float` ready to scale arrays of ``dtype``: host floats as they
    are (Python floats do not widen float32 arrays), device scalars cast to ``dtype`` (a
    float64 0-d array would widen the result)."""
    if on_device(value):
        return value.astype(dtype)
    return value


def host_floats(*values: Any) -> tuple[float, ...]:
    """Python floats of ``values`` (device 0-d arrays, host scalars or numbers), with ONE
    device → host transfer for all the device ones: one synchronisation instead of one per
    value."""
    device = [i for i, v in enumerate(values) if on_device(v)]
    out = [0.0 if i in device else float(v) for i, v in enumerate(values)]
    if device:
        xp = array_module(values[device[0]])
        host = to_numpy(xp.stack([values[i].astype(np.float64).reshape(()) for i in device]))
        for i, v in zip(device, host.tolist()):
            out[i] = float(v)
    return tuple(out)


def index_sum(index: Any, values: Any, n: int) -> Any:
    """``out[i] = Σ_{k: index[k] = i} values[k]`` for i < n — a scatter-add along the first axis,
    summed in float64 (real and imaginary parts apart) and returned in ``values``' precision,
    without a host round trip on a device."""
    xp = array_module(values)
    rdt = real_of(values.dtype)
    shape = (n,) + tuple(values.shape[1:])
    parts = (values.real, values.imag) if values.dtype.kind == "c" else (values,)
    sums = []
    for part in parts:
        acc = xp.zeros(shape, dtype=np.float64)
        scatter_add_flat(acc, index, part)
        sums.append(acc.astype(rdt, copy=False))
    if len(sums) == 1:
        return sums[0]
    out = xp.empty(shape, dtype=complex_of(rdt))
    out.real[...] = sums[0]
    out.imag[...] = sums[1]
    return out


def scatter_add_flat(out: Any, index: Any, values: Any) -> None:
    """``out[index] += values`` with repeated indices summed, in place and without a host
    round trip (CuPy's ``bincount`` reads ``max(index)`` on the host: a synchronisation)."""
    xp = array_module(out)
    if xp is np:
        np.add.at(out, index, values)
    elif xp.__name__.startswith("cupy"):
        import cupyx

        cupyx.scatter_add(out, index, values)
    else:
        xp.scatter_add(out, index, values)


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


def rfft2(x: Any) -> Any:
    """The 2-D FFT of a real array, its last axis halved (about half a complex FFT's work)."""
    xp = array_module(x)
    if xp is np:
        import scipy.fft as sfft

        return sfft.rfft2(x, norm="ortho", workers=-1, overwrite_x=False)
    return xp.fft.rfft2(x, norm="ortho")


def irfft2(x: Any, shape: tuple[int, int]) -> Any:
    """The inverse of :func:`rfft2` for a real array of ``shape``."""
    xp = array_module(x)
    if xp is np:
        import scipy.fft as sfft

        return sfft.irfft2(x, s=shape, norm="ortho", workers=-1, overwrite_x=False)
    return xp.fft.irfft2(x, s=shape, norm="ortho")


def fast_fft_length(n: int) -> int:
    """The smallest length ≥ n whose FFT is fast (only factors 2, 3 and 5): a canvas of
    prime side (223 pixels on the thin-geometry ribosome) costs pocketfft and cuFFT several
    times a 5-smooth one."""
    import scipy.fft as sfft

    return int(sfft.next_fast_len(int(n), real=True))


def ndimage(xp: ModuleType) -> ModuleType:
    """scipy.ndimage for ``xp``: SciPy's on NumPy, cupyx's on CuPy."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    if xp.__name__.startswith("cupy"):
        import cupyx.scipy.ndimage

        return cupyx.scipy.ndimage
    return xp.ndimage


def fftfreq(n: int, d: float, xp: ModuleType = np) -> Any:
    return xp.fft.fftfreq(n, d)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued device work (no-op on NumPy) — for honest timings."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def free_device_bytes(xp: ModuleType) -> int | None:
    """Free device memory in bytes (the driver's free memory and what CuPy's memory pool holds
    unused), or None on the host backend."""
    if xp is np:
        return None
    free, _total = xp.cuda.runtime.memGetInfo()
    # arrays freed go back to CuPy's memory pool, which keeps them from the driver and hands
    # them out again: without these, every ended scan's engine would count as used for good
    pool = getattr(xp, "get_default_memory_pool", None)
    cached = int(pool().free_bytes()) if pool is not None else 0
    return int(free) + cached
