"""Shared fixtures: the ``xp`` fixture runs a test on NumPy, on the strict device backend
(gpu/strict.py: CuPy's semantics on the CPU — implicit device→host conversions raise) and, when
present, on CuPy."""

from __future__ import annotations

import os

import pytest

# ptychodus (test extra) pulls in pydantic-ai and with it logfire, whose pydantic plugin is loaded
# by every process that defines a pydantic model: about 1 s more per daemon or CLI subprocess.
# Our tests do not use it; switch it off here, for this process and the subprocesses it starts.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "logfire-plugin")
# The service's settings come from CRYOPTYCHO_* variables too (ServiceConfig, in this process and
# in every daemon a test starts): one left in a developer's or a runner's environment (say
# CRYOPTYCHO_ACQUISITION_TIMEOUT_S) would change what the tests run. A test that needs one sets
# it itself; only the variables that locate tools and data are kept.
for _name in [n for n in os.environ if n.upper().startswith("CRYOPTYCHO_") and not n.upper().startswith(
        ("CRYOPTYCHO_STRUCTURES", "CRYOPTYCHO_CHROMIUM", "CRYOPTYCHO_CHROMEDRIVER", "CRYOPTYCHO_TEST_"))]:
    del os.environ[_name]
from cryoptycho.gpu.backend import cupy_available, get_xp


def _backends() -> list:
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param("strict", id="strict"),
        pytest.param(
            "cupy",
            id="cupy",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is not available"),
            ],
        ),
    ]


#: Test modules whose code is not yet free of implicit device → host conversions: the strict
#: backend would only repeat what it already reports for them.
_NOT_YET_STRICT: dict[str, str] = {}


@pytest.fixture(params=_backends())
def xp(request):
    """The array module under test: numpy, strict, or cupy (skipped cleanly without a GPU)."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    if request.param == "strict" and module in _NOT_YET_STRICT:
        pytest.skip(f"strict backend: {_NOT_YET_STRICT[module]}")
    return get_xp(request.param)


@pytest.fixture(autouse=True)
def _no_frame_store_memory_kept_between_tests():
    """A service started in this process (BackgroundService) sets the process-wide frame-store
    pool to keep up to frame_store_reuse_bytes (4 GiB); left so, a later test's store would be
    made in an earlier test's memory and its outcome would depend on the order of the tests.
    Back to the library default after every test (which also unmaps what was kept)."""
    yield
    from cryoptycho.gpu import framestore

    framestore.MAPPINGS.set_keep_bytes(0)
    framestore.MAPPINGS.set_warm_bytes(0)
