"""Shared fixtures: the ``xp`` fixture runs a test on NumPy and, when present, on CuPy."""

from __future__ import annotations

import os

import pytest

# ptychodus (test extra) pulls in pydantic-ai and with it logfire, whose pydantic plugin is loaded
# by every process that defines a pydantic model: about 1 s more per daemon or CLI subprocess.
# Our tests do not use it; switch it off here, for this process and the subprocesses it starts.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "logfire-plugin")
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
