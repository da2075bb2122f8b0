"""The CPU fast paths added to gpu/operators.py for the engine benchmark agree with the
generic code they replace: block scatter vs bincount, sorted group sums vs a loop over groups
(including chunks of a batch that lack some groups), separable shift ramps vs the 2-D ramp."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators


@pytest.fixture
def batch():
    rng = np.random.default_rng(4)
    pix = rng.uniform(0, 30, size=(40, 2))
    pix[:10] = np.round(pix[:10])  # a group with no sub-pixel shift, shared by ten positions
    return operators.make_batch(pix, (50, 48), (12, 12))


def _bincount_scatter(windows, batch):
    n = batch.object_shape[0] * batch.object_shape[1]
    idx = batch.flat_index.reshape(-1)
    w = windows.reshape(-1)
    out = np.bincount(idx, weights=w.real, minlength=n) + 1j * np.bincount(idx, weights=w.imag, minlength=n)
    return out.reshape(batch.object_shape)


def test_block_scatter_matches_bincount(batch):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 12, 12)) + 1j * rng.standard_normal((40, 12, 12))
    np.testing.assert_allclose(operators.scatter_add(w, batch), _bincount_scatter(w, batch), atol=1e-12)


def test_block_scatter_refuses_non_block_indices(batch):
    odd = operators.Batch(batch.flat_index[:, ::-1, :], batch.group, batch.shifts, batch.object_shape)
    with pytest.raises(ValueError, match="contiguous blocks"):
        operators.scatter_add(np.ones((40, 12, 12)), odd)


@pytest.mark.parametrize("part", [slice(0, 40), slice(3, 17), slice(25, 26)])
def test_group_sum_matches_loop_on_chunks(batch, part):
    sub = operators.Batch(batch.flat_index[part], batch.group[part], batch.shifts, batch.object_shape)
    rng = np.random.default_rng(6)
    per = rng.standard_normal((sub.size, 12, 12)).astype(np.complex64)
    expected = np.zeros((batch.shifts.shape[0], 12, 12), np.complex64)
    for k in range(sub.size):
        expected[sub.group[k]] += per[k]
    assert batch.shifts.shape[0] > 20
    np.testing.assert_allclose(operators.group_sum(per, sub), expected, rtol=1e-5, atol=1e-5)


def test_separable_ramps_match_two_dimensional_ramp(batch):
    shape = (12, 10)
    ramps = operators._shift_ramps(batch.shifts, shape, np.complex128)
    qy = np.fft.fftfreq(shape[0])[None, :, None]
    qx = np.fft.fftfreq(shape[1])[None, None, :]
    phase = -2 * np.pi * (qy * batch.shifts[:, 0, None, None] + qx * batch.shifts[:, 1, None, None])
    np.testing.assert_allclose(ramps, np.exp(1j * phase), atol=1e-12)


@pytest.mark.parametrize("quantum", [1e-3, 1 / 16])
def test_subpixel_quantum_bounds_position_error(quantum):
    rng = np.random.default_rng(7)
    pix = rng.uniform(2, 20, size=(300, 2))
    pix[0] = [3.0 - quantum / 4, 5.0]  # rounds up to the next whole pixel, no shift
    batch = operators.make_batch(pix, (40, 40), (8, 8), quantum=quantum)
    corner = np.stack(np.divmod(batch.flat_index[:, 0, 0], 40), axis=-1)
    placed = corner + batch.shifts[batch.group]
    assert np.abs(placed - pix).max() <= quantum / 2 + 1e-12
    assert batch.shifts.max() < 1.0
    np.testing.assert_array_equal(corner[0], [3, 5])
    assert batch.shifts.shape[0] <= (round(1 / quantum)) ** 2
    if quantum == 1 / 16:
        assert batch.shifts.shape[0] <= 256  # fewer groups than the 300 positions


def test_bad_quantum_is_refused():
    with pytest.raises(ValueError, match="quantum"):
        operators.make_batch(np.zeros((1, 2)), (10, 10), (4, 4), quantum=0.0)


def test_block_extract_matches_fancy_indexing(batch):
    rng = np.random.default_rng(8)
    obj = rng.standard_normal((50, 48)) + 1j * rng.standard_normal((50, 48))
    np.testing.assert_array_equal(operators.extract(obj, batch), obj.reshape(-1)[batch.flat_index])


def test_sub_batch_keeps_only_its_shifts(batch):
    sub = operators.sub_batch(batch, slice(12, 20))
    assert sub.shifts.shape[0] == 8  # eight jittered positions, eight distinct shifts
    np.testing.assert_array_equal(sub.shifts[sub.group], batch.shifts[batch.group[12:20]])
    np.testing.assert_array_equal(sub.flat_index, batch.flat_index[12:20])
