"""What a daemon start imports. Every `cryoptycho serve` (and each of the suite's ~94 real
daemons) paid for modules it does not use until a scan runs, or never: SciPy's ndimage (through
gpu.metrics, 0.2 s) and the whole engine (gpu.reconstruct) for two option helpers; and, where
pydantic-ai is installed (ptychodus), logfire's pydantic plugin (0.3 s). A module named here that
comes back is a regression of the start-up time (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: imported by none of a daemon start's modules (scans run them: the engine, its SciPy; or only
#: other commands: the viewer, plots, simulation)
NOT_AT_START = ("scipy", "cryoptycho.gpu.reconstruct", "cryoptycho.gpu.cg", "cryoptycho.gpu.parallax",
                "matplotlib", "PIL", "rich", "starlette", "uvicorn", "mrcfile", "gemmi", "click")


def _imported(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    return out.stdout.split()


def test_importing_the_service_imports_no_engine_scipy_or_viewer() -> None:
    mods = set(_imported("import cryoptycho.daemon.service", dict(os.environ)))
    assert "cryoptycho.daemon.service" in mods
    assert [m for m in NOT_AT_START if m in mods] == []


def test_the_command_line_keeps_logfires_pydantic_plugin_out_of_a_daemon_start() -> None:
    pytest.importorskip("logfire")  # (installed with the test extra's ptychodus)
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}  # (conftest sets it)
    assert "logfire" in _imported("import cryoptycho.daemon.service", env)  # the plugin is loaded by default
    mods = _imported("import cryoptycho.daemon.cli, cryoptycho.daemon.commands.serve, cryoptycho.daemon.service", env)
    assert "cryoptycho.daemon.service" in mods and "logfire" not in mods
