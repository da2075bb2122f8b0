"""daemon/scan.py is the one home of the scan description: every ScanSpec field travels through
each conversion it owns. A field added to ScanSpec that a conversion drops fails here, and so
does one the fixture below does not set (so the round trips cannot pass on a default)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryoptycho.daemon.scan import (
    ScanSpec,
    data_from_spec,
    spec_from_scan_start,
    spec_from_spool_header,
    spool_header,
    start_from_spec,
)
from cryoptycho.daemon.storage.open import open_recorded
from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool
from cryoptycho.protocols.messages import ScanStart, decode, encode
from hypothesis import given, settings
from hypothesis import strategies as st

M = 16


def _declaration(**change: Any) -> ScanStart:
    """A declaration that gives every ScanSpec field a value other than its default."""
    rng = np.random.default_rng(3)
    probe = (rng.normal(size=(M, M)) + 1j * rng.normal(size=(M, M))).astype(np.complex64)
    mask = np.ones((M, M), np.uint8)
    mask[0, :3] = 0
    positions = np.array([[0.0, 0.0], [0.0, 2e-10], [1e-10, 3e-10], [2e-10, 0.0], [2e-10, 1e-10], [3e-10, 4e-10]])
    fields: dict[str, Any] = {
        "scan_id": "s-desc", "energy_eV": 300e3, "frame_shape": (M, M), "frame_dtype": "uint16",
        "expected_frames": 6, "pixel_size_m": 1.25e-11, "probe": probe, "mask": mask, "positions_m": positions,
        "options": {"iterations": 3, "refine_probe": True}, "metadata": {"sample": "apoferritin", "tilt_deg": [0, 1.5]},
    }
    fields.update(change)
    return decode(encode(ScanStart(**fields)))  # as a producer sends it


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _assert_same_spec(got: ScanSpec, want: ScanSpec, via: str) -> None:
    for f in dataclasses.fields(ScanSpec):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert _same(a, b), f"ScanSpec.{f.name} is not carried {via}: {a!r} != {b!r}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_fixture_sets_every_scanspec_field():
    spec = spec_from_scan_start(_declaration())
    unset = [f.name for f in dataclasses.fields(ScanSpec)
             if _default(f) is not dataclasses.MISSING and _same(getattr(spec, f.name), _default(f))]
    assert not unset, f"give these ScanSpec fields a value in _declaration: {unset}"


def test_every_field_round_trips_through_the_spool_header():
    spec = spec_from_scan_start(_declaration())
    header, arrays = spool_header(spec)
    _assert_same_spec(spec_from_spool_header(header, arrays), spec, "through spool_header")


def test_every_field_round_trips_through_a_spool_file(tmp_path: Path):
    spec = spec_from_scan_start(_declaration())
    SpoolWriter.create(tmp_path, spec).close()
    _assert_same_spec(read_spool(next(tmp_path.glob("*.spool.h5"))).spec, spec, "through a spool file")


def test_every_field_round_trips_through_a_recovered_declaration():
    """Recovery rebuilds the declaration from the spooled spec (start_from_spec)."""
    spec = spec_from_scan_start(_declaration())
    back = spec_from_scan_start(decode(encode(start_from_spec(spec))))
    _assert_same_spec(back, spec, "through start_from_spec")


def test_spooled_scan_reaches_the_offline_engine(tmp_path: Path):
    spec = spec_from_scan_start(_declaration())
    writer = SpoolWriter.create(tmp_path, spec)
    frames = np.arange(2 * M * M, dtype=np.uint16).reshape(2, M, M)
    writer.append(frames, np.array([1, 0]), spec.positions_m[[1, 0]])
    writer.close()
    rec = open_recorded(writer.path)
    want = data_from_spec(spec, frames[::-1], spec.positions_m[:2])
    assert rec.options == spec.options and rec.scan_id == spec.scan_id
    np.testing.assert_array_equal(rec.data.frames, want.frames)  # in frame-index order
    np.testing.assert_array_equal(rec.data.positions, spec.positions_m[:2])
    np.testing.assert_array_equal(rec.data.probe, spec.probe)
    np.testing.assert_array_equal(rec.data.mask, spec.mask)
    assert (rec.data.energy, rec.data.pixel_size) == (spec.energy_eV, spec.pixel_size_m)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**31, 2**31) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    energy=st.floats(1e3, 1e6), pixel=st.floats(1e-12, 1e-9), m=st.integers(4, 12),
    expected=st.none() | st.integers(1, 10**6), dtype=st.sampled_from(["uint8", "uint16", "uint32", "float32"]),
    with_mask=st.booleans(), with_positions=st.booleans(),
    metadata=st.dictionaries(st.text(min_size=1, max_size=6), _json, max_size=4),
)
def test_spool_header_round_trips_any_scan(energy, pixel, m, expected, dtype, with_mask, with_positions, metadata):
    rng = np.random.default_rng(m)
    positions = rng.uniform(-1e-9, 1e-9, (5, 2)) if with_positions else None
    spec = ScanSpec(
        scan_id="h", frame_shape=(m, m), frame_dtype=dtype, pixel_size_m=pixel, energy_eV=energy,
        probe=rng.normal(size=(m, m)).astype(np.complex64), expected_frames=expected, positions_m=positions,
        extent_m=None if positions is None else ((float(positions[:, 0].min()), float(positions[:, 0].max())),
                                                 (float(positions[:, 1].min()), float(positions[:, 1].max()))),
        mask=rng.random((m, m)) > 0.3 if with_mask else None, options={"iterations": m}, metadata=metadata,
    )
    header, arrays = spool_header(spec)
    _assert_same_spec(spec_from_spool_header(header, arrays), spec, "through spool_header")



def test_recorded_data_declares_the_scan_it_holds():
    """Replay (start_from_data): a measured probe, its mask and positions, and the data's geometry
    reach the ScanSpec the daemon builds; a probe known only by its model is built and marked."""
    from cryoptycho.daemon.scan import MODEL_PROBE, start_from_data
    from cryoptycho.gpu.data import ProbeModel, PtychoData

    spec = spec_from_scan_start(_declaration())
    frames = np.ones((len(spec.positions_m), M, M), np.uint16)
    data = data_from_spec(spec, frames, spec.positions_m)
    back = spec_from_scan_start(decode(encode(start_from_data(data, spec.scan_id, options=spec.options))))
    for name in ("frame_shape", "frame_dtype", "pixel_size_m", "energy_eV", "probe", "expected_frames",
                 "positions_m", "extent_m", "mask", "options"):
        assert _same(getattr(back, name), getattr(spec, name)), name

    modelled = PtychoData(frames=frames, positions=spec.positions_m, energy=300e3, detector_pixel_angle=1e-3,
                          probe_model=ProbeModel(kind="defocused", semiangle=4e-3, defocus=20e-9))
    start = decode(encode(start_from_data(modelled, "m", stream_positions=True)))
    assert start.positions_streamed and start.probe is None
    built = spec_from_scan_start(start)
    assert built.metadata[MODEL_PROBE] and built.probe.shape == (M, M)
    assert built.pixel_size_m == pytest.approx(modelled.real_pixel_size, rel=1e-12)
