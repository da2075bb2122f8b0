"""Field-tester defects: oversized messages held in the daemon's memory, and a detector source
URL without a host that failed only after the daemon said it was ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryoptycho.protocols.sources import source_schemes


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cryoptycho serve`` (the console script) with loopback ports and ``args``."""
    cmd = [sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
           "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
           "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results"),
           "--log-format", "json", *args]
    # a daemon that started despite the bad URL is killed by the timeout, and the test fails
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize(("scheme", "rest", "said"), [
    *((scheme, "", "names no host") for scheme in source_schemes()),  # the field report: every scheme
    ("dectris2", ":31001", "names no host"),
    ("dectris1", "detector:99999", "bad port"),
])
def test_serve_refuses_an_incomplete_source_url_before_it_starts(tmp_path: Path, scheme: str, rest: str,
                                                                 said: str) -> None:
    url = f"{scheme}://{rest}"
    done = _serve(tmp_path, "--source", url)
    assert done.returncode == 1, done.stderr
    assert f"source {url!r}" in done.stderr and said in done.stderr, done.stderr
    assert f"{scheme}://HOST[:PORT]" in done.stderr
    # refused before anything started: no ready line, no "service ready" in the log
    assert "service ready" not in done.stderr and '"event": "ready"' not in done.stdout


def test_serve_refuses_a_source_url_without_slashes(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--source", "dectris2:detector")
    assert done.returncode == 1
    assert "source 'dectris2:detector'" in done.stderr and "'//' is missing" in done.stderr
    assert "service ready" not in done.stderr
