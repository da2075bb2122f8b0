"""Field QA round 6: a facility adopting the service — its configuration file as SERVICE.md
describes it, and clients of the daemon that misbehave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import start_daemon


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`cryoptycho serve` with ``args`` on free ports, run until it exits by itself."""
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                           "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                           "--spool-dir", str(cwd / "spool"), "--results-dir", str(cwd / "results"),
                           *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text, key", [("options = 3\n", "options"), ('limits = "none"\n', "limits")])
def test_a_table_given_a_plain_value_in_the_config_file_is_named(tmp_path, text, key):
    """`options = 3` (a table key given a value: a site file written from the flat key list)
    ended `serve` in an AttributeError traceback from the merge of file and environment."""
    config = tmp_path / "site.toml"
    config.write_text(text)
    done = _serve("--config", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"'{key}' must be a table" in done.stderr and str(config) in done.stderr, done.stderr


def test_a_table_given_a_plain_value_with_set_is_named(tmp_path):
    done = _serve("--set", "options=3", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "command line: 'options' must be a table" in done.stderr, done.stderr


def test_a_cryoptycho_table_beside_an_options_table_is_the_documented_layout(tmp_path, monkeypatch):
    """SERVICE.md: the file holds the keys "at top level (or under [cryoptycho]), reconstruction
    defaults under [options]". Written that way — [cryoptycho] then [options] — `serve` refused
    to start: "unknown key 'cryoptycho'". The keys of both apply, under the file's precedence."""
    from cryoptycho.daemon.config import ConfigError, load_config

    config = tmp_path / "site.toml"
    config.write_text("[cryoptycho]\npreview_hz = 2.0\nmax_queued_scans = 3\n\n[options]\niterations = 7\n")
    monkeypatch.setenv("CRYOPTYCHO_PREVIEW_HZ", "4.0")  # the file beats the environment
    monkeypatch.setenv("CRYOPTYCHO_OPTIONS__ITERATIONS", "9")
    settings = load_config(config, {"max_queued_scans": 5})  # and the command line beats the file
    assert (settings.preview_hz, settings.options.iterations, settings.max_queued_scans) == (2.0, 7, 5)

    daemon = start_daemon(tmp_path, "--config", str(config))
    assert daemon.stop() == 0, daemon.log()

    config.write_text("[cryoptycho]\npreview_hz = 2.0\n[cryoptycho.options]\niterations = 7\n[options]\niterations = 8\n")
    with pytest.raises(ConfigError, match="'options' given both under \\[cryoptycho\\] and outside it"):
        load_config(config)
