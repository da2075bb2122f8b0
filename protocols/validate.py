"""Checks that need the configured limits or the scan's declaration (PROTOCOL.md § Validation).

Structural checks (types, required keys, bounds that do not depend on configuration) live in
:mod:`.schema`; this module holds the rest. Producers run the same checks before sending, so a
producer bug fails in the producer, with the same field and rule the daemon would report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ProtocolError
from .limits import MIN_FRAME_SIDE, Limits
from .wire import wire_dtype

if TYPE_CHECKING:
    from .message_types import Frames, ScanEnd, ScanStart


def check(msg: Any, limits: Limits, scan: ScanStart | None = None) -> None:
    """Run the checks of ``msg``'s type; ``scan`` is the declaration frames/scan_end refer to."""
    kind = msg.type
    if (
        hasattr(msg, "scan_id")
        and isinstance(msg.scan_id, str)
        and len(msg.scan_id) > limits.max_scan_id_length
    ):
        raise ProtocolError(
            "scan_id", "max_length", f"longer than {limits.max_scan_id_length} characters"
        )
    if kind == "scan_start":
        check_scan_start(msg, limits)
    elif kind == "frames":
        check_frames(msg, limits, scan)
    elif kind == "scan_end" and scan is not None:
        check_scan_end(msg, scan)


def check_scan_start(msg: ScanStart, limits: Limits) -> None:
    sid = msg.scan_id

    def fail(field: str, rule: str, text: str) -> None:
        raise ProtocolError(field, rule, text, sid)

    m = tuple(msg.frame_shape)
    if len(m) != 2 or m[0] != m[1]:
        fail("frame_shape", "square", f"frames must be square M×M, got {m}")
    if m[0] < MIN_FRAME_SIDE:
        # refused here so no frame is sent for a scan whose worker would fail
        fail("frame_shape", "min_frame_side", f"frames must be at least {MIN_FRAME_SIDE}×{MIN_FRAME_SIDE}, got {m}")
    if m[0] > limits.max_frame_side:
        fail(
            "frame_shape",
            "max_frame_side",
            f"side {m[0]} exceeds the limit of {limits.max_frame_side}",
        )
    if msg.frame_dtype not in limits.frame_dtypes:
        fail(
            "frame_dtype",
            "allowed_dtype",
            f"{msg.frame_dtype!r} is not one of {', '.join(limits.frame_dtypes)}",
        )
    if msg.expected_frames > limits.max_frames_per_scan:
        fail(
            "expected_frames",
            "max_frames_per_scan",
            f"{msg.expected_frames} exceeds {limits.max_frames_per_scan}",
        )
    if (msg.pixel_size_m is None) == (msg.detector_pixel_angle_rad is None):
        fail(
            "pixel_size_m",
            "exactly_one",
            "give exactly one of pixel_size_m and detector_pixel_angle_rad",
        )
    if (msg.probe is None) == (msg.probe_model is None):
        fail("probe", "exactly_one", "give exactly one of probe (array) and probe_model")
    if msg.probe is not None:
        if tuple(msg.probe.shape[-2:]) != m or msg.probe.ndim not in (2, 3) or msg.probe.shape[0] == 0:
            fail(
                "probe",
                "shape",
                f"probe shape {tuple(msg.probe.shape)} differs from frame shape {m} "
                "(give (M, M), or (modes, M, M) for a mixed-state probe)",
            )
        if not np.all(np.isfinite(msg.probe)):
            fail("probe", "finite", "probe contains NaN or infinite values")
        if not np.any(msg.probe):
            fail("probe", "non_zero", "probe is zero everywhere")
    if msg.mask is not None and tuple(msg.mask.shape) != m:
        fail("mask", "shape", f"mask shape {tuple(msg.mask.shape)} differs from frame shape {m}")
    if msg.mask is not None and not np.any(msg.mask):
        # else the scan is streamed whole and fails once its frames are in
        fail("mask", "non_zero", "mask marks no pixel valid (1 = valid pixel, 0 = gap, hot or dead)")
    if msg.positions_m is not None:
        _check_positions(msg.positions_m, msg.expected_frames, "scan.positions_m", limits, sid)
    if msg.raster is not None:
        ny, nx = msg.raster.shape
        if ny * nx != msg.expected_frames:
            fail(
                "scan.shape",
                "count_match",
                f"raster {ny}×{nx} ≠ expected_frames {msg.expected_frames}",
            )
        # an affine grid reaches farthest at its corners: four positions, not ny·nx of them
        corners = msg.raster.positions(np.array([0, nx - 1, (ny - 1) * nx, ny * nx - 1]))
        if np.abs(corners).max() > limits.max_abs_position_m:
            fail(
                "scan",
                "max_abs_position_m",
                f"raster reaches beyond ±{limits.max_abs_position_m} m",
            )


def check_frames(msg: Frames, limits: Limits, scan: ScanStart | None) -> None:
    sid = msg.scan_id

    def fail(field: str, rule: str, text: str) -> None:
        raise ProtocolError(field, rule, text, sid)

    data, idx = msg.data, msg.indices
    if data.ndim != 3:
        fail("data", "ndim", f"data must be (n, M, M), got {data.ndim} dimensions")
    n, my, mx = data.shape
    if n == 0:
        fail("data", "non_empty", "a frames message carries at least one frame")
    if n > limits.max_frames_per_message:
        fail(
            "data",
            "max_frames_per_message",
            f"{n} frames exceed the limit of {limits.max_frames_per_message}",
        )
    if my != mx:
        fail("data", "square", f"frames must be square, got {my}×{mx}")
    # a declared scan's frames must match its declaration (below), which met the limits in force
    # at its start: a scan recovered by a daemon restarted with tighter limits takes the rest of
    # its frames; new scans meet the new limits at their start
    if scan is None and my > limits.max_frame_side:
        fail("data", "max_frame_side", f"side {my} exceeds the limit of {limits.max_frame_side}")
    dtype = wire_dtype(data.dtype)
    if scan is None and dtype not in limits.frame_dtypes:
        fail("data", "allowed_dtype", f"{dtype} is not one of {', '.join(limits.frame_dtypes)}")
    if idx.shape != (n,):
        fail("indices", "shape", f"indices shape {idx.shape} does not match {n} frames")
    if n > 1 and np.unique(idx).size != n:
        fail("indices", "unique", "a frame index appears twice in one message")
    if msg.positions_m is not None:
        _check_positions(msg.positions_m, n, "positions_m", limits, sid)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            fail("data", "finite", "frames contain NaN or infinite counts")
        if data.min() < 0:
            fail("data", "non_negative", "frames contain negative counts")
    if scan is None:
        return
    if (my, mx) != tuple(scan.frame_shape):
        fail(
            "data",
            "frame_shape",
            f"frames are {my}×{mx}, the scan declared {tuple(scan.frame_shape)}",
        )
    if dtype != scan.frame_dtype:
        fail("data", "frame_dtype", f"frames are {dtype}, the scan declared {scan.frame_dtype}")
    if int(idx.max()) >= scan.expected_frames:
        fail(
            "indices",
            "index_range",
            f"index {int(idx.max())} ≥ expected_frames {scan.expected_frames}",
        )
    if scan.positions_streamed and msg.positions_m is None:
        fail(
            "positions_m",
            "required",
            "this scan streams positions: every frames message carries them",
        )
    if not scan.positions_streamed and msg.positions_m is not None:
        fail("positions_m", "declared_by_scan", "this scan declared its positions at scan_start")


def check_scan_end(msg: ScanEnd, scan: ScanStart) -> None:
    if msg.frame_count > scan.expected_frames:
        raise ProtocolError(
            "frame_count",
            "max_expected",
            f"{msg.frame_count} frames sent but the scan expected {scan.expected_frames}",
            msg.scan_id,
        )


def _check_positions(pos: np.ndarray, n: int, field: str, limits: Limits, sid: str) -> None:
    if pos.shape != (n, 2):
        raise ProtocolError(field, "shape", f"positions must be ({n}, 2), got {pos.shape}", sid)
    if not np.isfinite(pos).all():
        raise ProtocolError(field, "finite", "positions contain NaN or infinite values", sid)
    if n and np.abs(pos).max() > limits.max_abs_position_m:
        raise ProtocolError(
            field,
            "max_abs_position_m",
            f"a position lies beyond ±{limits.max_abs_position_m} m (unit error?)",
            sid,
        )
