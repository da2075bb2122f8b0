"""The denoiser interface behind the sparse prior (eq. 13): T_sparse = D(T).

A denoiser maps a real 2-D image (NumPy or CuPy, float) and a noise level σ (None = estimate
from the image) to a denoised image of the same shape, module and dtype. Denoisers register by
name; ``get_denoiser("bm3d")`` is the open BM3D of :mod:`cryoptycho.gpu.bm3d` once registered,
``"bm3d-package"`` the optional non-commercial reference implementation (extra ``[bm3d]``).

Complex fields are denoised through :func:`denoise_complex` (one convention for the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .backend import array_module, host_floats


class Denoiser(Protocol):
    def __call__(self, image: Any, sigma: float | None = None) -> Any: ...


_REGISTRY: dict[str, Callable[..., Denoiser]] = {}


def register_denoiser(name: str, factory: Callable[..., Denoiser]) -> None:
    """Register ``factory(**params) -> Denoiser`` under ``name`` (later registrations win)."""
    _REGISTRY[name] = factory


def available_denoisers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_denoiser(name: str, **params: Any) -> Denoiser:
    """The denoiser registered as ``name``; a clear error lists the known names."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown denoiser {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)


def _load_builtin() -> None:
    # Import for the side effect of registration; modules that are not written yet are absent.
    import importlib.util

    for mod in ("cryoptycho.gpu.bm3d", "cryoptycho.gpu.denoisers"):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def denoise_complex(t: Any, denoiser: Denoiser, sigma: float | None = None) -> Any:
    """Denoise a complex transmission function T with a real-image denoiser.

    Convention: rotate out the mean (ice) phase, denoise the phase and the log-amplitude as two
    real images, recombine, rotate the mean phase back. Why phase & log-amplitude rather than
    real & imaginary parts: for a weak-phase object T ≈ exp(iφ − a) the two are the physical
    signals (projected potential and absorption) with separate noise levels, and they are linear
    in the potential, whereas Re/Im mix both and carry the ice phase's cos/sin. Removing the
    mean phase first keeps φ small so the phase does not wrap inside the particle.
    ``sigma`` (the noise level of the phase image) is passed to the denoiser for the phase; the
    log-amplitude gets its own estimate (None).
    """
    xp = array_module(t)
    re, im = host_floats(t.mean().real, t.mean().imag)  # one read-back per denoising
    mean = complex(re, im)
    rot = mean / abs(mean) if abs(mean) > 0 else 1.0 + 0.0j
    centred = t * xp.asarray(rot, dtype=t.dtype).conj()
    real_dtype = t.real.dtype
    phase = xp.angle(centred).astype(real_dtype, copy=False)
    logamp = xp.log(xp.maximum(xp.abs(centred), 1e-6)).astype(real_dtype, copy=False)
    phase_d = denoiser(phase, sigma)
    logamp_d = denoiser(logamp, None)
    out = xp.exp(logamp_d + 1j * phase_d).astype(t.dtype, copy=False)
    return out * xp.asarray(rot, dtype=t.dtype)
