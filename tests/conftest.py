"""Shared fixtures: the ``xp`` fixture runs a test on NumPy and, when present, on CuPy."""

from __future__ import annotations

import pytest
from cryoptycho.gpu.backend import cupy_available, get_xp


def _backends() -> list:
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param(
            "cupy",
            id="cupy",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is not available"),
            ],
        ),
    ]


@pytest.fixture(params=_backends())
def xp(request):
    """The array module under test: numpy, or cupy (skipped cleanly without a GPU)."""
    return get_xp(request.param)
