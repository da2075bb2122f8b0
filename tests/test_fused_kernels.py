"""The fused CuPy kernels of gpu/likelihood.py agree with their NumPy reference. They exist
only on CuPy: without a CUDA device these tests skip (the reference itself is what every
NumPy test exercises)."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import likelihood
from cryoptycho.gpu.backend import cupy_available, get_xp, to_numpy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is not available")]


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("weight", ["none", "mask", "keep", "keep-mask"])
def test_fused_poisson_matches_the_reference(dtype, rtol, weight):
    cp = get_xp("cupy")
    rng = np.random.default_rng(3)
    inten = rng.gamma(0.5, 3.0, (6, 16, 16)).astype(dtype)
    inten[0, :2] = 0.0  # the floor keeps log finite where the model predicts nothing
    y = rng.poisson(inten * 1.1).astype(np.uint16)
    mask = (rng.random((16, 16)) > 0.1).astype(dtype)
    keep = rng.random(inten.shape) > 0.2
    w = {"none": None, "mask": mask, "keep": keep, "keep-mask": keep * mask}[weight]
    ref_f, ref_t = likelihood.factor_and_term_reference(np, inten.copy(), y, "poisson", w)
    dev_w = None if w is None else cp.asarray(w)
    got_f, got_t = likelihood.fused_poisson(cp.asarray(inten), cp.asarray(y), dev_w)
    assert got_f.dtype == dtype and got_t.dtype == dtype
    np.testing.assert_allclose(to_numpy(got_f), ref_f, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(to_numpy(got_t), ref_t, rtol=rtol, atol=rtol * float(np.abs(ref_t).max()))
    # and the device reference (array operations on CuPy) agrees too
    dev_f, dev_t = likelihood.factor_and_term_reference(cp, cp.asarray(inten), cp.asarray(y), "poisson", dev_w)
    np.testing.assert_allclose(to_numpy(got_f), to_numpy(dev_f), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(to_numpy(got_t), to_numpy(dev_t), rtol=rtol, atol=rtol * float(np.abs(ref_t).max()))


def test_far_field_terms_use_the_fused_kernel_on_cupy():
    cp = get_xp("cupy")
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((4, 8, 8)) + 1j * rng.standard_normal((4, 8, 8))).astype(np.complex64)
    y = rng.poisson(np.abs(z) ** 2).astype(np.uint16)
    host = likelihood.far_field_terms(z, y, "poisson", truncation="poisson-floor", alpha_h=2.0)
    dev = likelihood.far_field_terms(cp.asarray(z), cp.asarray(y), "poisson", truncation="poisson-floor",
                                     alpha_h=2.0)
    assert float(dev.loss) == pytest.approx(host.loss, rel=1e-5)
    np.testing.assert_allclose(to_numpy(dev.grad), host.grad, rtol=1e-4, atol=1e-5)
