"""`cryoptycho` subcommands given wrong arguments, as a new user types them: each is a click
error naming the argument (exit status 1 or 2), never a traceback, and never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.subprocess


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=120, check=False)


def tiny_dataset(path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "cryoptycho-dataset"
        f["frames"] = np.ones((4, 16, 16), np.uint16)
        f["positions_m"] = np.array([[0, 0], [0, 2e-10], [2e-10, 0], [2e-10, 2e-10]])
        f["energy_eV"] = 300e3
        f["pixel_size_m"] = 1e-10
        f.create_group("probe_model").attrs.update(kind="defocused", semiangle_rad=9.2e-3)


@pytest.mark.parametrize("args", [
    ("watch", "--control", "bogus"),
    ("watch", "--publish", "localhost:5601"),
    ("view", "--publish", "bogus"),
    ("view", "--control", "127.0.0.1:5602"),
])
def test_an_endpoint_without_its_transport_is_named(args):
    """ZeroMQ's "Invalid argument" came as a traceback (watch at once, view from its hub's
    threads, leaving a page that never updated)."""
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    assert f"Invalid value for {args[1]}: cannot connect to {args[2]!r}" in out.stderr, out.stderr
    assert "tcp://HOST:PORT" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_replay_with_a_control_endpoint_typo_says_so_instead_of_hanging(tmp_path):
    """The SDK's control socket failed to connect and was left open: the Producer's context
    then waited for it for ever at exit, so `replay --control bogus` hung without a word."""
    tiny_dataset(tmp_path / "scan.h5")
    out = cli("replay", str(tmp_path / "scan.h5"), "--ingest", "tcp://127.0.0.1:9", "--control", "bogus",
              "--timeout", "5")
    assert out.returncode == 1, out.stderr
    assert "cannot connect to 'bogus'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_replay_and_watch_with_no_daemon_ask_whether_one_is_running(tmp_path):
    """A new user's likeliest slip, replay or watch before `serve` is up, was told about CURVE
    keys and --no-confirm (replay, after 30 s) or only "no reply" (watch), never about the daemon."""
    tiny_dataset(tmp_path / "scan.h5")
    with socket.socket() as hold:  # takes connections, never speaks ZeroMQ: nobody answers
        hold.bind(("127.0.0.1", 0))
        hold.listen()
        control = f"tcp://127.0.0.1:{hold.getsockname()[1]}"
        replay = cli("replay", str(tmp_path / "scan.h5"), "--endpoint", "tcp://127.0.0.1:9", "--control", control,
                     "--timeout", "1")
        watch = cli("watch", "--control", control, "--publish", "tcp://127.0.0.1:9", "--timeout", "1")
    assert replay.returncode == 1, replay.stderr
    assert "is a daemon running there (`cryoptycho serve`)?" in " ".join(replay.stderr.split()), replay.stderr
    assert "is `cryoptycho serve` running?" in " ".join(watch.stdout.split()), watch.stdout


def test_serve_on_a_port_in_use_says_how_to_choose_another(tmp_path):
    """A second `serve` at the default ports said only "Address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("serve", "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*", "--control",
                  f"tcp://127.0.0.1:{port}", "--metrics-port", "0", "--spool-dir", str(tmp_path / "spool"),
                  "--results-dir", str(tmp_path / "results"))
    said = " ".join(out.stderr.split())
    assert out.returncode != 0 and "Traceback" not in said, out.stderr
    assert f"cannot bind control socket to tcp://127.0.0.1:{port}" in said, out.stderr
    assert "another daemon there?" in said and "--control" in said and "tcp://127.0.0.1:*" in said, out.stderr


def test_view_on_a_port_in_use_says_so_and_port_zero_prints_the_port_it_took():
    """`view` printed "viewer on http://…" before uvicorn bound the port: a port in use read as
    serving, then as uvicorn's bare "address already in use" (exit 3); `--port 0` printed port 0."""
    import urllib.request

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("view", "--port", str(port))
    said = " ".join(out.stderr.split())
    assert out.returncode == 2 and "viewer on" not in out.stdout, (out.stdout, out.stderr)
    assert f"Invalid value for --port: cannot serve the viewer on 127.0.0.1:{port}" in said, out.stderr
    assert "choose another port; 0 takes any free one" in said, out.stderr

    view = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "view", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = view.stdout.readline()
        url = line.split(" viewer on ")[1].split()[0]
        assert not url.endswith(":0/"), line
        with urllib.request.urlopen(f"{url}healthz", timeout=30) as reply:  # bound before it was printed
            assert reply.status == 200
    finally:
        view.terminate()
        view.wait(60)


@pytest.mark.parametrize(("args", "said"), [
    (("view", "--port", "99999"), "Invalid value for '--port': 99999 is not in the range 0<=x<=65535"),
    (("demo", "--dose", "-1"), "Invalid value for '--dose': -1.0 is not in the range x>0"),
])
def test_out_of_range_numbers_are_usage_errors(args, said):
    out = cli(*args)
    assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_keys_in_a_directory_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    where = tmp_path / "a-file" / "keys"
    out = cli("keys", str(where), "--client", "beamline")
    assert out.returncode == 1, out.stderr
    assert f"cannot write keys in {where}" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_batch_without_its_dask_extra_names_the_extra(tmp_path):
    """Without `cryoptycho[batch]` the command read every input, then ended in a RuntimeError
    traceback."""
    hide = tmp_path / "no-dask"
    (hide / "distributed").mkdir(parents=True)
    (hide / "distributed" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hide), env.get("PYTHONPATH")) if p)
    tiny_dataset(tmp_path / "scan.h5")
    out = cli("batch", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "out"), env=env)
    assert out.returncode == 1, out.stderr
    assert 'needs Dask: pip install "cryoptycho[batch]"' in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_list_in_the_environment_that_is_not_json_is_named(tmp_path):
    """CRYOPTYCHO_OUTPUT_FORMATS=h5,png (a list as a shell user writes one) ended `serve` in
    pydantic-settings' traceback about an "EnvSettingsSource"."""
    env = {**os.environ, "CRYOPTYCHO_OUTPUT_FORMATS": "h5,png"}
    out = cli("serve", "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*", "--control",
              "tcp://127.0.0.1:*", "--metrics-port", "0", "--spool-dir", str(tmp_path / "s"), "--results-dir",
              str(tmp_path / "r"), env=env)
    assert out.returncode == 1, out.stderr
    assert "CRYOPTYCHO_OUTPUT_FORMATS is not valid JSON" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_list_setting_given_a_bare_value_says_how_to_write_a_list(tmp_path):
    """`serve --limit frame_dtypes=uint8` answered only "Input should be a valid tuple": the limits'
    lists now take the comma-separated form from the command line and the environment alike, and
    --set of another list, which cannot know a list from a string, says how."""
    endpoints = ("--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*", "--control",
                 "tcp://127.0.0.1:*", "--metrics-port", "0", "--spool-dir", str(tmp_path / "s"),
                 "--results-dir", str(tmp_path / "r"))
    out = cli("serve", *endpoints, "--set", "output_formats=h5")
    assert out.returncode == 1, out.stderr
    assert "output_formats: Input should be a valid tuple (a list:" in out.stderr, out.stderr
    assert "'output_formats=[\"h5\"]'" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # the comma-separated list is taken: only the other (invalid) limit is named
    for taken in (("--limit", "frame_dtypes=uint8,uint16"), ("--set", "limits.frame_dtypes=uint8")):
        out = cli("serve", *endpoints, *taken, "--limit", "max_frame_side=0")
        assert out.returncode == 1, out.stderr
        assert "limits.max_frame_side" in out.stderr and "frame_dtypes" not in out.stderr, out.stderr
    env = {**os.environ, "CRYOPTYCHO_LIMITS__FRAME_DTYPES": "uint8,uint16"}
    out = cli("serve", *endpoints, "--limit", "max_frame_side=0", env=env)
    assert out.returncode == 1, out.stderr
    assert "limits.max_frame_side" in out.stderr and "frame_dtypes" not in out.stderr, out.stderr
    assert "not valid JSON" not in out.stderr, out.stderr


def test_simulate_with_a_sample_file_gemmi_cannot_read_names_it(tmp_path):
    """`simulate --sample model.xyz` ended in gemmi's RuntimeError traceback ("Unknown format")."""
    (tmp_path / "model.xyz").write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    out = cli("simulate", "--sample", str(tmp_path / "model.xyz"), "-o", str(tmp_path / "sim.h5"))
    assert out.returncode == 2, out.stderr
    assert "model.xyz: not a PDB or mmCIF file" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "said"), [
    (("bench", "paper", "--samples", "hemoglobn"), "Invalid value for --samples: unknown sample 'hemoglobn'"),
    (("bench", "fuzz", "--examples", "0"), "Invalid value for '--examples': 0 is not in the range x>=1"),
    (("replay", "{scan}", "--drop", "2"), "Invalid value for '--drop': 2.0 is not in the range 0<=x<=1"),
    (("bench", "live", "--dataset", "{text}"), "Invalid value for --dataset: cannot read"),
])
def test_bench_and_drill_arguments_out_of_range_are_usage_errors(tmp_path, args, said):
    """Each was a traceback (gemmi's sample lookup, Hypothesis, the fault drill, h5py)."""
    tiny_dataset(tmp_path / "scan.h5")
    (tmp_path / "notes.txt").write_text("not HDF5")
    args = tuple(a.format(scan=tmp_path / "scan.h5", text=tmp_path / "notes.txt") for a in args)
    out = cli(*args)
    assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, out.stderr
