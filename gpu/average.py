"""Averaging of N reconstructions of identical particles in identical orientation.

Each reconstruction has an arbitrary global phase and may sit a few pixels off (the position of
the particle in its field, a drifting probe): the global phase is rotated out with the mean
(ice) phase, the images are aligned to a reference by cross-correlation of their phases
(sub-pixel), and the complex transmissions are averaged. With no reference given the first
image starts as the reference and the alignment is repeated once against the first average
(so that no single noisy map biases the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import to_numpy
from .metrics import fourier_shift, register_translation, tukey_window, unwrapped_phase


@dataclass
class AverageResult:
    average: np.ndarray  #: complex mean transmission, global phase removed
    shifts: np.ndarray  #: (N, 2) pixel shifts applied to each input


def _phase_normalised(obj: Any) -> np.ndarray:
    t = np.asarray(to_numpy(obj)).astype(np.complex128)
    m = t.mean()
    if abs(m) == 0:
        raise ValueError("cannot average an object whose mean transmission is zero")
    return t * np.conj(m) / abs(m)


def align_and_average(
    objects: Sequence[Any], reference: Any | None = None, max_shift_px: float | None = None,
    passes: int = 2,
) -> AverageResult:
    """Align ``objects`` (same shape) translationally and average them.

    ``max_shift_px`` bounds the accepted shift (default: a quarter of the smaller side); a peak
    further away is treated as no credible match and the image is averaged unshifted."""
    if len(objects) == 0:
        raise ValueError("nothing to average: the list of objects is empty")
    imgs = [_phase_normalised(o) for o in objects]
    shape = imgs[0].shape
    for i, im in enumerate(imgs):
        if im.shape != shape:
            raise ValueError(f"object {i} has shape {im.shape}, expected {shape} like object 0")
    limit = 0.25 * min(shape) if max_shift_px is None else max_shift_px
    win = tukey_window(shape)
    ref = _phase_normalised(reference) if reference is not None else imgs[0]
    shifts = np.zeros((len(imgs), 2))
    avg = ref
    for _ in range(max(1, passes if reference is None else 1)):
        ref_ph = (unwrapped_phase(ref) - unwrapped_phase(ref).mean()) * win
        aligned = []
        for i, im in enumerate(imgs):
            ph = unwrapped_phase(im)
            s = register_translation(ref_ph, (ph - ph.mean()) * win)
            if max(abs(s[0]), abs(s[1])) > limit:
                s = (0.0, 0.0)
            shifts[i] = s
            aligned.append(fourier_shift(im, s) if s != (0.0, 0.0) else im)
        avg = np.mean(aligned, axis=0)
        ref = avg
    return AverageResult(average=avg, shifts=shifts)
