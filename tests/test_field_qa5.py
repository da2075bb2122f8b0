"""Field QA, round 5: the package as a facility installs and drives it from outside — the oldest
dependency versions pyproject.toml allows, third-party senders written from the public protocol
documents, result files read by a downstream pipeline."""
from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # the tomli backport, a dependency before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

#: The oldest release of a dependency that has what the code calls, found by installing the lower
#: bounds (uv pip install --resolution lowest-direct) and running the suite and the daemon on them.
NEEDED = {
    # cbor2 6.0.x's loads() takes bytes only: protocols/dectris/decode.py hands it a memoryview, and
    # with 6.0.0 the first Stream V2 message raised TypeError in the source thread and stopped `serve`
    "cbor2": ("6.1", "cbor2.loads(memoryview) in protocols/dectris/decode.py"),
    "pydantic-settings": ("2.7", "NoDecode in protocols/limits.py"),
    "pydantic": ("2.7", "the pydantic that pydantic-settings 2.7 requires (a lower bound no install can reach)"),
    "starlette": ("0.37.2", "a TestClient that works with httpx 0.28 (tests/test_view.py)"),
}


def _lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for raw in project["dependencies"]:
        req = Requirement(raw)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            bounds[canonicalize_name(req.name)] = max(lows)
    return bounds


def test_declared_lower_bounds_have_the_apis_the_code_calls() -> None:
    bounds = _lower_bounds()
    short = [f"{name}>={bounds.get(name)} allows a release without {why} (needs >= {least})"
             for name, (least, why) in NEEDED.items() if bounds.get(name, Version("0")) < Version(least)]
    assert not short, "\n".join(short)


def test_the_dectris_bridge_command_reaches_a_daemon_that_runs_with_curve(tmp_path: Path) -> None:
    """The bridge is for a daemon on another host, and a daemon on a network runs with CURVE
    (deploy/README.md); `cryoptycho dectris-bridge` had no way to give it keys: the daemon never
    heard its series. It takes --client-key/--server-key as `replay` and `watch` do."""
    import subprocess
    import sys

    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.security import ClientCurve
    from daemon_support import start_daemon, start_dectris_sim, wait_for

    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "keys", str(keys), "--client", "bridge"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    curve = ClientCurve.from_keys_dir(keys, "bridge")
    daemon = start_daemon(tmp_path, "--set", f"curve_keys_dir={keys}")
    sim, url = start_dectris_sim("--frames", "16", "--size", "32")
    try:
        bridge = subprocess.run(
            [sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-bridge", url, "--ingest", daemon.ingest,
             "--control", daemon.control, "--series", "1", "--client-key", str(curve.secret_file),
             "--server-key", str(curve.server_public_file)],
            check=False, capture_output=True, text=True, timeout=240)
        assert bridge.returncode == 0, (bridge.stdout, bridge.stderr)
        with ControlClient(daemon.control, timeout_s=5, curve=curve) as ctl:
            scans = wait_for(lambda: [s for s in ctl.list_scans() if s["state"] == "finished"] or None,
                             180, "the bridged series finished", daemon)
        assert scans[0]["frames"]["received"] == 16
    finally:
        sim.kill()
        sim.wait(10)
        daemon.stop()


def test_a_side_channel_image_id_past_int64_is_named_and_the_detector_source_goes_on() -> None:
    """One `dectris_positions` message with an image id of 2**63 or more (msgpack's uint64)
    raised OverflowError out of the side channel's drain: `serve --source` logged "detector
    source failed; stopping the service" and stopped. It is a position error like any other."""
    import zmq
    from cryoptycho.protocols.dectris.bridge import BridgeStats, _drain_side_channel
    from cryoptycho.protocols.dectris.convert import BridgeConfig, SeriesConverter
    from cryoptycho.protocols.messages import Request, encode

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://side")
        push.connect("inproc://side")
        bad = [{"image_ids": [2**63 + 5], "positions_m": [[0.0, 0.0]]},
               {"image_ids": [-1], "positions_m": [[0.0, 0.0]]}]
        for params in bad:
            push.send_multipart(encode(Request("dectris_positions", params)))
        push.send_multipart(encode(Request("dectris_positions", {"image_ids": [3], "positions_m": [[1e-10, 2e-10]]})))
        conv, stats = SeriesConverter(BridgeConfig(), side_channel=True), BridgeStats()
        got = []
        for _ in range(50):  # inproc delivers at once; a few drains leave room for a slow thread
            got += _drain_side_channel(pull, conv, stats)
            if stats.position_errors == len(bad) and 3 in conv._positions.get(None, {}):
                break
        assert stats.position_errors == len(bad)
        assert 3 in conv._positions.get(None, {}), "the good message after the bad ones is taken"
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def _formats_cube_snippet() -> str:
    text = (ROOT / "daemon" / "storage" / "FORMATS.md").read_text(encoding="utf-8")
    section = text.split("## Reading our files with other tools", 1)[1].split("\n## ", 1)[0]
    assert "```python" in section, "FORMATS.md says how to read a spool's or result's frames as a 4D-STEM cube"
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_formats_recipe_gives_the_raster_cube_of_frames_that_arrived_out_of_order(tmp_path: Path) -> None:
    """A result's /raw rows are in arrival order; a downstream 4D-STEM reader that reshapes them by
    /raw/nav_shape, as FORMATS.md's one recipe (for dataset files) suggested, gets a scrambled
    cube when the producer sent frames out of index order (allowed: PROTOCOL.md §4.2).
    FORMATS.md now gives the recipe for spool and result files; here it is run as written."""
    import numpy as np
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.messages import ProbeModelSpec, RasterScan
    from cryoptycho.protocols.producer import Producer
    from daemon_support import start_daemon, wait_for

    ny, nx, m = 4, 5, 32
    frames = np.random.default_rng(1).poisson(3.0, (ny * nx, m, m)).astype(np.uint16)
    frames[:, 0, 0] = np.arange(ny * nx)  # each frame says which it is
    daemon = start_daemon(tmp_path)
    try:
        with Producer(daemon.ingest, control=daemon.control) as p:
            p.start_scan(scan_id="ooo", energy_eV=300e3, frame_shape=(m, m), frame_dtype="uint16",
                         expected_frames=ny * nx, pixel_size_m=1e-10, options={"iterations": 2},
                         probe_model=ProbeModelSpec(semiangle_rad=9.2e-3, defocus_m=40e-9),
                         raster=RasterScan((ny, nx), (2e-10, 2e-10)))
            for lo in range(ny * nx - 4, -1, -4):  # the last frames first
                p.send_frames(frames[lo:lo + 4], indices=np.arange(lo, lo + 4))
            p.end_scan()
        with ControlClient(daemon.control, timeout_s=5) as ctl:
            path = wait_for(lambda: ctl.call("receipt", scan_id="ooo").get("state") == "finished"
                            and next(s["result_path"] for s in ctl.list_scans() if s["scan_id"] == "ooo"),
                            120, "scan ooo finished", daemon)
    finally:
        daemon.stop()
    import h5py
    import hdf5plugin  # noqa: F401 (the frames' filter)

    with h5py.File(path, "r") as f:
        naive = f["raw/entry_1/data_1/data"][()].reshape(ny, nx, m, m)
    assert not np.array_equal(naive, frames.reshape(ny, nx, m, m)), "the frames were stored in index order"
    scope: dict = {"path": path}
    exec(compile(_formats_cube_snippet(), "FORMATS.md", "exec"), scope)  # noqa: S102 (the doc's own code)
    np.testing.assert_array_equal(scope["cube"], frames.reshape(ny, nx, m, m))


def test_an_image_count_below_one_is_set_aside_and_the_series_reconstructed() -> None:
    """A start whose number_of_images (V1: ntrigger × nimages) is below 1 bounded the image ids:
    every image was refused as out of range and the series skipped ("it ended without any usable
    image"). Like the other header values a detector cannot mean, it is set aside with a warning
    and the scan's positions give the count."""
    import numpy as np
    from cryoptycho.protocols.dectris.convert import BridgeConfig, SeriesConverter
    from cryoptycho.protocols.dectris.decode import decode_v2
    from cryoptycho.protocols.dectris.sim import SimSeries, v2_messages
    from cryoptycho.protocols.messages import Frames, ScanEnd

    for count in (-5, 0):
        frames = np.random.default_rng(0).poisson(3, (6, 16, 16)).astype(np.uint16)
        user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [2, 3], "step_m": [2e-10, 2e-10]}}}
        series = SimSeries(frames, user_data=user, detector_distance_m=0.25, extra_start={"number_of_images": count})
        notices: list = []
        conv = SeriesConverter(BridgeConfig(), on_notice=notices.append)
        out: list = []
        for raw in v2_messages(series):
            out += conv.feed(decode_v2(raw))
        sent = sorted(int(i) for m in out if isinstance(m, Frames) for i in m.indices)
        assert sent == list(range(6)), (count, notices)
        assert sum(isinstance(m, ScanEnd) for m in out) == 1
        assert [(n.outcome, n.field) for n in notices] == [("warning", "number_of_images")], notices
