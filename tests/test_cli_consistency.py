"""The command line, as a script or a log reads it.

* `cryoptycho watch` off a terminal (a pipe, a log file, the journal) printed one line per event
  and, at its exit, the progress bars as they last were: a stale bar ("3/16 acquiring") for a
  scan long over. Off a terminal there is no live display now; the scans it finds at its start
  are lines too.
* `cryoptycho replay --endpoint` named what `serve`, `broker` and `dectris-bridge` call
  `--ingest`: `replay --ingest` now, `--endpoint` still works, with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner


class _Listing:
    """The daemon's control socket, as far as `watch` asks it at its start (list_scans)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> _Listing:  # noqa: PYI034 - (typing.Self: Python 3.11)
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def list_scans(self) -> list[dict[str, Any]]:
        return [{"scan_id": "grid-7", "state": "acquiring", "expected_frames": 16, "frames": {"received": 3}}]


def test_watch_off_a_terminal_prints_lines_and_no_stale_bar_at_its_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryoptycho.daemon.commands import watch

    monkeypatch.setattr(watch, "ControlClient", _Listing)
    out = CliRunner().invoke(watch.command, ["--publish", "tcp://127.0.0.1:9", "--control", "tcp://127.0.0.1:9",
                                             "--timeout", "0.2"])
    assert out.exit_code == 0, out.output
    assert "grid-7: acquiring (3 of 16 frames received)" in out.output, out.output
    assert "3/16" not in out.output and "━" not in out.output, out.output  # before: the bar, at the exit


@pytest.fixture
def pull() -> Any:
    """A bare PULL socket (as a relay's) that takes what replay sends: its endpoint."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:*")
    try:
        yield sock.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        sock.close(linger=0)
        ctx.term()


def _replay(tmp_path: Path, *args: str) -> Any:
    from cryoptycho.daemon.cli import main
    from test_field_cli import tiny_dataset

    path = tmp_path / "scan.h5"
    if not path.exists():
        tiny_dataset(path)
    return CliRunner().invoke(main, ["replay", str(path), "--no-confirm", "--timeout", "60", *args])


def test_replay_takes_the_ingest_endpoint_as_serve_names_it(tmp_path: Path, pull: str) -> None:
    out = _replay(tmp_path, "--ingest", pull)
    assert out.exit_code == 0, out.output
    assert "4 frames in" in out.output and f"to {pull}" in out.output and "deprecated" not in out.output, out.output


def test_replays_old_endpoint_option_still_works_and_warns(tmp_path: Path, pull: str) -> None:
    out = _replay(tmp_path, "--endpoint", pull)
    assert out.exit_code == 0, out.output
    assert f"to {pull}" in out.output, out.output
    assert "--endpoint is deprecated, use --ingest" in out.stderr, out.stderr
    both = _replay(tmp_path, "--endpoint", pull, "--ingest", "tcp://127.0.0.1:18")
    assert both.exit_code == 2 and "name different endpoints" in both.output, both.output


def test_an_empty_ingest_endpoint_is_an_error_not_the_default(tmp_path: Path) -> None:
    """``replay --ingest "$ENDPOINT"`` with the variable unset: before, the scan went to the
    default endpoint (a daemon on this host, or nobody: exit 0 with --no-confirm); now it is
    refused, as the old --endpoint "" was."""
    out = _replay(tmp_path, "--ingest", "")
    assert out.exit_code == 1 and "cannot connect to ''" in out.output, out.output
    assert "sent scan" not in out.output, out.output
