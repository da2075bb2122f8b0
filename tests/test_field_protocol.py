"""A third-party client of our protocol written from protocols/PROTOCOL.md alone, with raw pyzmq
and msgpack (no SDK), against the real daemon: values the SDK would never send but msgpack
carries without complaint."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zmq
from daemon_support import start_daemon, wait_for

pytestmark = pytest.mark.subprocess

M = 16


def _request(endpoint: str, method: str, **params) -> dict:
    """One REQ round trip (PROTOCOL.md §6), a new socket each time as the Lazy Pirate pattern does."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "request", "method": method,
                                 "params": params}))
        return msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()


def _scan_start(scan_id: str, **extra) -> list[bytes]:
    header = {"protocol": "cryoptycho", "version": 1, "type": "scan_start", "scan_id": scan_id,
              "energy_eV": 300e3, "pixel_size_m": 1e-10, "frame_shape": [M, M], "frame_dtype": "uint16",
              "expected_frames": 4, "probe_model": {"semiangle_rad": 9.2e-3, "defocus_m": 40e-9},
              "scan": {"kind": "raster", "shape": [2, 2], "step_m": [2e-10, 2e-10]}, **extra}
    return [msgpack.packb(header)]


NON_FINITE = [("mu0", math.inf), ("alpha_h", math.inf), ("mu1", math.inf), ("init_phase_mean", math.nan),
              ("stream", {"momentum": -math.inf})]


def test_non_finite_reconstruction_options_are_refused_by_name(tmp_path):
    """§2.1: floats must be finite. `set_options {"mu0": inf}` (the defaults of every later scan)
    was answered ok, and from then on every scan the facility ran failed at its first step with
    "engine diverged … lower stream.step_size", which named neither the option nor the request;
    a scan_start whose options held inf or NaN was accepted and failed once its frames were in."""
    daemon = start_daemon(tmp_path)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    try:
        for key, value in NON_FINITE:
            reply = _request(daemon.control, "set_options", options={key: value})
            assert reply["success"] is False, (key, reply)
            assert reply["result"]["field"].startswith(f"params.options.{key}"), reply
            assert reply["result"]["rule"] == "finite_number", reply
        defaults = _request(daemon.control, "set_options", options={"iterations": 2})
        assert defaults["success"] and defaults["result"]["options"]["mu0"] == "auto", defaults

        push.connect(daemon.ingest)
        for i, (key, value) in enumerate(NON_FINITE):
            push.send_multipart(_scan_start(f"nf{i}", options={key: value}))
        for i, (key, _) in enumerate(NON_FINITE):
            receipt = wait_for(lambda i=i: (r := _request(daemon.control, "receipt", scan_id=f"nf{i}"))["result"]
                               ["state"] != "unknown" and r, 60, f"the verdict on scan nf{i}", daemon)
            assert receipt["result"]["state"] == "refused", (key, receipt)
            assert f"options.{key}" in receipt["result"]["error"], receipt
        # a finite scan goes on as before
        push.send_multipart(_scan_start("finite", options={"mu0": 0.002}))
        frames = np.ones((4, M, M), np.uint16)
        header = {"protocol": "cryoptycho", "version": 1, "type": "frames", "scan_id": "finite",
                  "arrays": [{"name": "indices", "dtype": "uint32", "shape": [4]},
                             {"name": "data", "dtype": "uint16", "shape": [4, M, M]}]}
        push.send_multipart([msgpack.packb(header), np.arange(4, dtype=np.uint32).tobytes(), frames.tobytes()])
        wait_for(lambda: _request(daemon.control, "receipt", scan_id="finite")["result"]["frames"]["received"] == 4,
                 60, "the finite scan's frames", daemon)
        assert _request(daemon.control, "ping")["success"]
        assert daemon.stop() == 0
    finally:
        push.close()
        if daemon.proc.poll() is None:
            daemon.proc.kill()


BAD_STARTS = [({"frame_dtype": "uint16"}, "frame_dtype"), ({"energy_eV": "300 keV"}, "energy_eV"),
              ({"options": {"iterations": 5}, "mu0": 0.1}, "mu0")]


def test_a_scan_start_refused_at_its_checks_is_refused_in_its_receipt(tmp_path):
    """§4.5: "After a refusal it (`receipt`) answers state: refused, with the reason in error".
    It did so only for the daemon's own decisions (memory, options); a scan_start refused by the
    message checks (a frame dtype the daemon's limits do not accept, a wrong type, an unknown
    key) left `receipt` answering "unknown" for good: a producer that polls it, as §4.5 tells it
    to, waited out its timeout and was told the start may still be queued (the SDK's
    DeliveryTimeout), and the reason reached only subscribers of the publish socket."""
    daemon = start_daemon(tmp_path, "--limit", 'frame_dtypes=["uint8"]')
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    try:
        push.connect(daemon.ingest)
        for i, (extra, _) in enumerate(BAD_STARTS):
            push.send_multipart(_scan_start(f"bad-start-{i}", **{"frame_dtype": "uint8", **extra}))
        push.send_multipart(_scan_start("marker", frame_dtype="uint8"))  # read after the bad ones
        wait_for(lambda: _request(daemon.control, "receipt", scan_id="marker")["result"]["state"] != "unknown",
                 60, "the scan after the refused ones", daemon)
        for i, (_, field) in enumerate(BAD_STARTS):
            receipt = _request(daemon.control, "receipt", scan_id=f"bad-start-{i}")["result"]
            assert receipt["state"] == "refused", receipt
            assert receipt["error"].startswith(f"{field}:") and receipt["refused_at"] is not None, receipt
            assert receipt["max_message_bytes"] > 0, receipt
        # a second start of an existing scan is refused without touching the scan's receipt
        push.send_multipart(_scan_start("marker", frame_dtype="uint8"))
        push.send_multipart(_scan_start("marker-2", frame_dtype="uint8"))
        wait_for(lambda: _request(daemon.control, "receipt", scan_id="marker-2")["result"]["state"] != "unknown",
                 60, "the second marker", daemon)
        assert _request(daemon.control, "receipt", scan_id="marker")["result"]["state"] == "announced"
        assert daemon.stop() == 0
    finally:
        push.close()
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_a_mask_without_a_valid_pixel_is_refused_at_scan_start(tmp_path):
    """A mask of zeros (1 = valid: a client that inverted the convention, or sent a gap map)
    was accepted; the producer streamed the whole scan, and once its frames were in the scan
    failed with "mask marks no detector pixel as valid", which named neither the field nor the
    message. It is refused at scan_start, as an all-zero probe is."""
    daemon = start_daemon(tmp_path)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    try:
        push.connect(daemon.ingest)
        for scan_id, mask in (("zero-mask", np.zeros((M, M), np.uint8)), ("one-pixel", np.eye(1, M * M, 0, np.uint8))):
            header = msgpack.unpackb(_scan_start(scan_id)[0])
            header["arrays"] = [{"name": "mask", "dtype": "uint8", "shape": [M, M]}]
            push.send_multipart([msgpack.packb(header), mask.reshape(M, M).tobytes()])
        wait_for(lambda: _request(daemon.control, "receipt", scan_id="one-pixel")["result"]["state"] != "unknown",
                 60, "the verdict on the second scan", daemon)
        assert _request(daemon.control, "receipt", scan_id="one-pixel")["result"]["state"] == "announced"
        receipt = _request(daemon.control, "receipt", scan_id="zero-mask")["result"]
        assert receipt["state"] == "refused", receipt
        assert receipt["error"].startswith("mask:") and "[rule non_zero]" in receipt["error"], receipt
        assert daemon.stop() == 0
    finally:
        push.close()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
