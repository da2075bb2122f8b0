"""The scan's global matrix searched on the reduced objective (gpu/positions.py,
``search_scan_matrix``; ``scan_search`` in reconstruct.py): the search itself on a known
objective, and the offline reconstruction's bookkeeping (the nominal positions kept beside the
searched ones, the positions an exact affine image of the nominal scan)."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.positions import search_scan_matrix
from cryoptycho.gpu.reconstruct import reconstruct
from engine_helpers import ENERGY, PIXEL, distorted_scan

M = 32


def test_search_finds_the_minimum_of_a_separable_quadratic() -> None:
    target = np.array([[0.025, 0.009], [-0.002, -0.01]])
    weights = np.array([[3.0, 1.0], [2.0, 5.0]])
    calls = []

    def reduced(matrix: np.ndarray) -> float:
        calls.append(matrix.copy())
        return float((weights * (matrix - np.eye(2) - target) ** 2).sum()) + 7.0

    found = search_scan_matrix(reduced, step=0.02, rounds=1)
    np.testing.assert_allclose(found.matrix, np.eye(2) + target, atol=1e-12)
    assert found.loss_before == pytest.approx(reduced(np.eye(2)))
    assert found.loss_after == pytest.approx(7.0)
    assert found.evaluations == 10 == len(calls) - 1  # centre, ±h on four entries, the vertex


def test_search_clips_the_vertex_and_refines_in_a_second_round() -> None:
    """An error beyond 2h is reached in steps: the first round's vertex is clipped at 2h, the
    second (h halved) goes on from there."""
    target = np.array([[0.05, 0.0], [0.0, 0.0]])

    def reduced(matrix: np.ndarray) -> float:
        return float(((matrix - np.eye(2) - target) ** 2).sum())

    one = search_scan_matrix(reduced, step=0.02, rounds=1)
    assert one.matrix[0, 0] - 1 == pytest.approx(0.04)
    two = search_scan_matrix(reduced, step=0.02, rounds=2)
    assert two.matrix[0, 0] - 1 == pytest.approx(0.05, abs=1e-12)


def test_search_keeps_an_entry_without_curvature() -> None:
    """Entries the reduced objective does not depend on (no information) stay where they were
    instead of jumping to an extrapolated vertex."""

    def reduced(matrix: np.ndarray) -> float:
        return (matrix[0, 0] - 1.01) ** 2

    found = search_scan_matrix(reduced, step=0.02, rounds=1)
    np.testing.assert_allclose(found.matrix, [[1.01, 0.0], [0.0, 1.0]], atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "strict"])
def test_scan_search_reconstruction_keeps_nominal_and_affine_positions(backend: str) -> None:
    nominal, _true, frames, _truth, _geo, probe = distorted_scan(3e3, grid=6, m=M)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    state = reconstruct(data, {"iterations": 4, "mu0": 1e-3, "scan_search": True,
                               "scan_search_iterations": 2, "backend": backend})
    np.testing.assert_array_equal(state.nominal_positions, nominal)
    pos = np.asarray(state.positions)
    centre = nominal.mean(axis=0)
    design = np.c_[nominal - centre, np.ones(len(nominal))]
    coef, *_ = np.linalg.lstsq(design, pos - centre, rcond=None)
    np.testing.assert_allclose(design @ coef + centre, pos, rtol=0, atol=1e-6 * PIXEL)
    np.testing.assert_allclose(coef[2], 0.0, atol=1e-9 * PIXEL)  # the mean is held: a gauge
    assert np.isfinite(state.loss_values).all() and len(state.loss_values) == 4
