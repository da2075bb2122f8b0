"""Detectors and configuration as a facility sets them up: protocol limits raised in the service's
configuration, DECTRIS series that cannot become scans counted and published (never fatal), the
SERVICE.md configuration table in step with the code."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from cryoptycho.daemon.config import ServiceConfig, load_config
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.dectris.convert import BridgeConfig
from cryoptycho.protocols.dectris.scan import ProbeSpec, RasterSpec
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import ErrorEvent, ScanEvent, ScanStart, encode
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import metrics_of, start_daemon, wait_for

SERVICE_MD = Path(__file__).resolve().parents[1] / "daemon" / "SERVICE.md"


# ------------------------------------------------------------------------- configuration table


def _documented_rows() -> dict[str, str]:
    """key → default cell of the tables in SERVICE.md's "## Configuration" section."""
    text = SERVICE_MD.read_text()
    section = text[text.index("## Configuration"):]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|([^|]*)\|", line)
        if m and m.group(1) != "key":
            rows[m.group(1)] = m.group(2).strip()
    return rows


def _expected_fields() -> dict[str, Any]:
    """Every configuration key of the code, dotted, with its field."""
    out: dict[str, Any] = dict(ServiceConfig.model_fields)
    for prefix, model in (("dectris", BridgeConfig), ("dectris.raster", RasterSpec),
                          ("dectris.probe_model", ProbeSpec), ("limits", Limits)):
        out.update({f"{prefix}.{k}": f for k, f in model.model_fields.items()})
    return out


def _as_documented(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def test_service_md_documents_every_configuration_key():
    rows = _documented_rows()
    fields = _expected_fields()
    assert sorted(set(fields) - set(rows)) == [], "daemon/SERVICE.md lacks these configuration keys"
    assert sorted(set(rows) - set(fields)) == [], "daemon/SERVICE.md documents keys the code does not have"
    for key, cell in rows.items():
        field = fields[key]
        if field.default_factory is not None or field.is_required():
            continue
        if field.default is None:
            assert cell == "—", f"{key}: default is unset, SERVICE.md says {cell!r}"
            continue
        literal = re.fullmatch(r"`([^`]*)`", cell)
        assert literal, f"{key}: SERVICE.md gives no default (code: {field.default!r})"
        text = literal.group(1)
        try:
            documented = json.loads(text)
        except json.JSONDecodeError:
            documented = text
        assert documented == _as_documented(field.default), f"{key}: SERVICE.md {text!r}, code {field.default!r}"


def test_limits_come_from_toml_environment_and_command_line(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text("[limits]\nmax_frame_side = 2048\n")
    monkeypatch.setenv("CRYOPTYCHO_LIMITS__MAX_FRAMES_PER_MESSAGE", "128")
    cfg = load_config(toml)
    assert cfg.limits.max_frame_side == 2048 and cfg.limits.max_frames_per_message == 128
    cfg = load_config(toml, {"limits": {"max_frame_side": 4096}})
    assert cfg.limits.max_frame_side == 4096 and cfg.limits.max_frames_per_message == 128
    toml.write_text("[limits]\nmax_frame_sides = 2048\n")
    with pytest.raises(ValueError, match="unknown key 'limits.max_frame_sides'"):
        load_config(toml)


def test_list_limits_take_a_comma_separated_list_or_json():
    """`--limit frame_dtypes=uint8` (the shell form of a list) was refused as not a tuple."""
    from cryoptycho.protocols.limits import parse_limit_pairs

    for raw in ("uint8", "uint8, uint16", '["uint8", "uint16"]', '"uint8"'):
        want = tuple(v.strip(' "[]') for v in raw.split(","))
        cfg = load_config(None, {"limits": parse_limit_pairs([f"frame_dtypes={raw}"])})
        assert cfg.limits.frame_dtypes == want, raw
    assert parse_limit_pairs(["max_frame_side=2048"]) == {"max_frame_side": 2048}
    with pytest.raises(ValueError, match="frame_dtypes must be a non-empty subset"):
        load_config(None, {"limits": parse_limit_pairs(["frame_dtypes=uint8,int7"])})


def test_list_limits_are_read_alike_from_environment_file_and_command_line(tmp_path, monkeypatch):
    """A comma-separated list was taken by --limit alone: CRYOPTYCHO_LIMITS__FRAME_DTYPES=uint8,uint16
    was pydantic-settings' "error parsing value", a TOML string "uint8" and --set's bare uint8
    "not a valid tuple". Every source now takes JSON and comma lists, with the precedence
    defaults < environment < file < command line."""
    from cryoptycho.protocols.limits import parse_limit_pairs

    monkeypatch.setenv("CRYOPTYCHO_LIMITS__FRAME_DTYPES", "uint8, uint16")
    monkeypatch.setenv("CRYOPTYCHO_LIMITS__COMPRESSIONS", '["lz4"]')
    cfg = load_config()
    assert (cfg.limits.frame_dtypes, cfg.limits.compressions) == (("uint8", "uint16"), ("lz4",))
    toml = tmp_path / "c.toml"
    toml.write_text('[limits]\nframe_dtypes = "uint16,float32"\n')
    cfg = load_config(toml)  # the file beats the environment, key by key
    assert (cfg.limits.frame_dtypes, cfg.limits.compressions) == (("uint16", "float32"), ("lz4",))
    cfg = load_config(toml, {"limits": parse_limit_pairs(["frame_dtypes=uint32"])})
    assert (cfg.limits.frame_dtypes, cfg.limits.compressions) == (("uint32",), ("lz4",))
    cfg = load_config(toml, {"limits": {"frame_dtypes": "uint8,uint32"}})  # (--set limits.frame_dtypes=…)
    assert cfg.limits.frame_dtypes == ("uint8", "uint32")
    monkeypatch.setenv("CRYOPTYCHO_LIMITS__FRAME_DTYPES", "uint8,int7")
    with pytest.raises(ValueError, match="frame_dtypes must be a non-empty subset"):
        load_config()


# ------------------------------------------------------------------------------- protocol limits


def _wide_scan(scan_id: str, m: int = 2048) -> ScanStart:
    return ScanStart(scan_id=scan_id, energy_eV=300e3, frame_shape=(m, m), frame_dtype="uint8", expected_frames=2,
                     pixel_size_m=2e-11, probe=None, positions_m=np.array([[0.0, 0.0], [1e-10, 0.0]]),
                     probe_model=_probe_model())


def _probe_model():
    from cryoptycho.protocols.messages import ProbeModelSpec

    return ProbeModelSpec("defocused", 20e-3, 5e-9)


def _subscribed(daemon) -> Subscriber:
    """A subscriber that is known to receive: an invalid message is sent until its error event
    arrives (a PUB socket drops what it publishes before a subscription has reached it)."""
    sub = Subscriber(daemon.publish, latest_only=False)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(daemon.ingest)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            push.send_multipart([b"\x00probe"])
            ev = sub.recv(timeout_s=0.2)
            if isinstance(ev, ErrorEvent):
                return sub
        raise AssertionError("the subscriber never received an event")
    finally:
        push.close(linger=1000)


@pytest.mark.subprocess
def test_a_2k_detector_needs_only_configuration(tmp_path):
    frames = np.random.default_rng(0).integers(0, 3, (2, 2048, 2048), dtype=np.uint8)
    config = tmp_path / "daemon.toml"
    config.write_text("host_memory_budget_bytes = 16000000000\nresolution_interval_s = 0\n\n"
                      "[options]\niterations = 1\n\n[limits]\nmax_frame_side = 2048\n")
    daemon = start_daemon(tmp_path, "--config", str(config))
    try:
        sub = _subscribed(daemon)
        with Producer(daemon.ingest, control=daemon.control, limits=Limits(max_frame_side=2048)) as producer:
            producer.start_scan(_wide_scan("wide"))
            producer.send_frames(frames)
            producer.abort("the test has seen what it needed")
        events = []
        while not any(isinstance(e, ScanEvent) and e.scan_id == "wide" and e.event in ("aborted", "rejected")
                      for e in events):
            ev = sub.recv(timeout_s=60)
            assert ev is not None, daemon.log()
            events.append(ev)
        kinds = [e.event for e in events if isinstance(e, ScanEvent) and e.scan_id == "wide"]
        assert "accepted" in kinds and "rejected" not in kinds, (kinds, daemon.log())
        assert wait_for(lambda: metrics_of(daemon).get("cryoptycho_frames_received_total") == 2, 120,
                        "both 2048² frames received", daemon)
        sub.close()
    finally:
        daemon.stop(signal.SIGKILL)
    # the same scan at the default limits: refused, naming the limit
    daemon = start_daemon(tmp_path / "default")
    try:
        sub = _subscribed(daemon)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(daemon.ingest)
        push.send_multipart(encode(_wide_scan("wide-default")))
        push.close(linger=5000)
        ev = sub.recv(timeout_s=30)
        while ev is not None and not (isinstance(ev, ErrorEvent) and ev.rule == "max_frame_side"):
            ev = sub.recv(timeout_s=30)
        assert ev is not None and ev.field == "frame_shape" and "1024" in ev.message, daemon.log()
        sub.close()
    finally:
        daemon.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------ DECTRIS notices


@pytest.mark.subprocess
def test_bad_dectris_series_are_counted_published_and_never_fatal(tmp_path):
    from cryoptycho.protocols.dectris.sim import SimSender, SimSeries

    frames = np.random.default_rng(0).poisson(3, (6, 16, 16)).astype(np.uint16)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [2, 3], "step_m": [2e-10, 2e-10]},
                           "scan_id": "grid3"}}
    angle = {"cryoptycho": {**user["cryoptycho"], "detector_pixel_angle_rad": 1.2e-3}}
    sender = SimSender(2)
    try:
        daemon = start_daemon(tmp_path, "--source", sender.url, "--set", "options.iterations=2",
                              "--set", "resolution_interval_s=0", "--set", "refine_time_budget_s=5",
                              "--set", "keep_spool=true",
                              # the frames are Poisson noise, not a ptychogram: a step's loss may
                              # swing far from its best, which is not what this test is about
                              "--set", "divergence_factor=1e9")
        try:
            sub = _subscribed(daemon)
            # 1: an uncalibrated DCU (distance 0) and no camera length anywhere: skipped
            sender.send_series(SimSeries(frames, series_id=1, series_unique_id="S1", detector_distance_m=0.0,
                                         user_data=user))
            # 2, 3: the same header_appendix scan id, the camera length from user_data, an X-ray
            # wavelength and a beam centre of (0, 0) in the header: both scans run, one each
            for n in (2, 3):
                sender.send_series(SimSeries(frames, series_id=n, series_unique_id=f"S{n}", detector_distance_m=0.0,
                                             beam_center_px=(0.0, 0.0), extra_start={"incident_wavelength": 1.0},
                                             user_data=angle))
            events: list = []
            done: set[str] = set()
            deadline = time.monotonic() + 120
            while done != {"grid3-series2", "grid3-series3"} and time.monotonic() < deadline:
                ev = sub.recv(timeout_s=0.5)
                if ev is None:
                    assert daemon.proc.poll() is None, daemon.log()
                    continue
                events.append(ev)
                if isinstance(ev, ScanEvent) and ev.event in ("finished", "failed"):
                    assert ev.event == "finished", (ev, daemon.log())
                    done.add(ev.scan_id)
            assert done == {"grid3-series2", "grid3-series3"}, daemon.log()
            errors = [(e.field, e.rule) for e in events if isinstance(e, ErrorEvent)]
            assert ("dectris.detector_distance", "dectris_series_skipped") in errors, errors
            for key in ("detector_distance", "beam_center", "incident_wavelength"):
                assert (f"dectris.{key}", "dectris_header_implausible") in errors, errors
            m = metrics_of(daemon)
            assert m["cryoptycho_dectris_series_total{field=detector_distance,outcome=skipped}"] == 1
            assert m["cryoptycho_dectris_header_warnings_total{field=detector_distance}"] == 3
            assert m["cryoptycho_dectris_header_warnings_total{field=beam_center}"] == 2
            with ControlClient(daemon.control) as ctl:
                assert ctl.ping() is not None
                scans = {s["scan_id"]: s for s in ctl.list_scans()}
            sub.close()
            _check_files_of_a_dectris_scan(tmp_path, scans["grid3-series2"]["result_path"])
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        sender.close(linger_s=0)


def _check_files_of_a_dectris_scan(workdir: Path, result_path: str) -> None:
    """The daemon's spool and result files carry the detector the DECTRIS header and user_data
    described (100 µm pixels at a pixel angle of 1.2 mrad), as ptychodus reads them."""
    ptychodus_io = pytest.importorskip("ptychodus.api.io")
    from ptychodus.plugins.cxi_file import CXIDiffractionFileReader

    camera_length = 100e-6 / 1.2e-3
    spool = next((workdir / "spool").glob("grid3-series2*.spool.h5"))
    md = CXIDiffractionFileReader().read(spool).get_metadata()
    assert md.detector_pixel_geometry.width_m == pytest.approx(100e-6)
    assert md.detector_distance_m == pytest.approx(camera_length)
    import h5py

    for path in (spool, Path(result_path)):  # the declared raster's grid, for LiberTEM / py4DSTEM
        with h5py.File(path, "r") as f:
            assert list(f["nav_shape"][()]) == [2, 3]
    product = ptychodus_io.load_product(Path(result_path))
    assert product.metadata.detector_distance_m == pytest.approx(camera_length)
    assert len(product.probe_positions) == 6
    np.testing.assert_array_equal(product.probe_positions.get_indexes(), np.arange(6))
