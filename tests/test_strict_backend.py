"""The strict device backend (gpu/strict.py) and what it proves about the engine: CuPy's
semantics on the CPU (implicit device → host conversions refused), and counted
synchronisations — none in a mini-batch step, one per CG iteration whose first line-search
trial is accepted (two with a secant step), no frame copied between host and device once
stored."""

from __future__ import annotations

import itertools
import signal
import time

import numpy as np
import pytest
from cryoptycho.gpu import strict
from cryoptycho.gpu.backend import array_module, backend_name, get_xp, host_floats, to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import MAX_PENDING_LOSSES, StreamingReconstructor
from cryoptycho.protocols.messages import Result, ScanEvent
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import start_daemon, synthetic_scan, wait_subscribed

XP = get_xp("strict")


def _in_package(code: str, **names: object) -> object:
    """Run ``code`` as if it were a line of the package (module name ``cryoptycho.…``)."""
    scope = {"__name__": "cryoptycho.gpu.example", **names}
    exec(compile(code, "<package>", "exec"), scope)  # noqa: S102 (fixed test snippets)
    return scope.get("out")


@pytest.mark.parametrize("code", [
    "out = float(a.sum())", "out = int(a.max())", "out = bool(a.any())", "if a.all():\n    pass",
    "out = complex(a.sum())", "out = [v for v in a]", "out = range(a.max())", "out = f'{a.sum():.3f}'",
])
def test_implicit_conversions_raise_in_the_package(code):
    a = XP.asarray(np.arange(6.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        _in_package(code, a=a)


def test_host_arrays_never_leak_in_or_out_implicitly():
    a = XP.asarray(np.arange(6.0))
    with pytest.raises(TypeError, match="__array__|np.asarray"):
        np.asarray(a)
    with pytest.raises(TypeError, match="host .*array was mixed"):
        _ = a + np.ones(6)
    with pytest.raises(AttributeError):
        _ = a.__array_interface__
    # device arithmetic stays on the device; reductions are 0-d device arrays, as on CuPy
    b = np.exp(a) * 2 + a
    assert array_module(b) is XP and type(a.sum()) is strict.StrictArray and a.sum().shape == ()
    assert backend_name(XP) == "strict"


def test_explicit_transfers_and_data_dependent_operations_are_counted():
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    with strict.counting() as c:
        a = XP.asarray(host)
        assert [(e.kind, e.shape) for e in c.events] == [("h2d", (3, 4))]
        np.testing.assert_array_equal(to_numpy(a), host)
        assert a[1, 2].item() == 6.0
        assert a[0].tolist() == [0.0, 1.0, 2.0, 3.0]
        np.testing.assert_array_equal(XP.asnumpy(a * 2), 2 * host)
        assert c.syncs == 4 and len(c.d2h) == 4
        XP.unique(a)  # CuPy must read the result's size back: a synchronisation
        _ = a[a > 3]  # boolean masks too
        XP.cuda.get_current_stream().synchronize()
        assert c.syncs == 7
        assert host_floats(a.sum(), a.max(), 2.5) == (66.0, 11.0, 2.5)
        assert c.syncs == 8, "several device scalars come back in ONE transfer"
    assert "test_strict_backend.py" in c.events[0].where


def _engine(scan, **options) -> StreamingReconstructor:
    return StreamingReconstructor(
        frame_shape=scan.frames.shape[1:], frame_dtype=np.uint16, pixel_size=1e-10, probe=scan.probe,
        options=ReconOptions(backend="strict", **options), expected_frames=len(scan.frames),
    )


def _frame_copies(events: list, frame_shape: tuple[int, ...]) -> list:
    return [e for e in events if e.kind in ("h2d", "d2h") and tuple(e.shape[-2:]) == tuple(frame_shape)]


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=10)


@pytest.mark.parametrize("options", [
    {},  # defaults: Tikhonov prior, Poisson model, poisson-floor truncation
    {"refine_probe": True, "stream": {"probe_warmup_steps": 0, "batch_size": 16}},
    {"prior": "none", "truncation": "none", "noise_model": "amplitude"},
    {"stream": {"lowfreq_boost": 10.0}},  # the phase boost's FFTs over the canvas
], ids=["defaults", "probe", "plain-amplitude", "lowfreq-boost"])
def test_no_synchronisation_in_a_mini_batch_step(scan, options):
    engine = _engine(scan, **options)
    half = len(scan.frames) // 2
    with strict.counting() as c:
        engine.add_frames(scan.frames[:half], scan.positions[:half])
    assert c.syncs == 0, c.summary()
    assert len(_frame_copies(c.events, scan.frames.shape[1:])) == 1  # the frames, stored once
    with strict.counting() as c:
        results = [engine.step() for _ in range(12)]
        engine.add_frames(scan.frames[half:], scan.positions[half:])
        results += [engine.step() for _ in range(12)]
    assert c.syncs == 0, c.summary()
    assert len(_frame_copies(c.events, scan.frames.shape[1:])) == 1  # the second half, once
    assert all(r.probe_updated for r in results) == bool(options.get("refine_probe"))
    # a metric is due: all the steps' losses come back in one transfer
    with strict.counting() as c:
        losses = engine.flush_losses()
    assert c.syncs == 1 and len(losses) == 24 and all(np.isfinite(losses))
    assert engine.loss_history == losses  # nothing left to read: no further transfer
    assert c.syncs == 1


def test_pending_losses_are_bounded(scan, monkeypatch):
    from cryoptycho.gpu import stream

    monkeypatch.setattr(stream, "MAX_PENDING_LOSSES", 5)
    engine = _engine(scan)
    engine.add_frames(scan.frames, scan.positions)
    with strict.counting() as c:
        for _ in range(12):
            engine.step()
    assert c.syncs == 2 and len(engine._pending_losses) == 2  # read at 5 and at 10
    assert MAX_PENDING_LOSSES >= 256  # the real bound: far more steps than between two previews


def test_a_diverging_step_is_reported_when_its_loss_is_read(scan):
    engine = _engine(scan)
    engine.add_frames(scan.frames, scan.positions)
    engine.step()
    engine.obj *= float("nan")  # as a diverged update would leave it
    engine.step()  # no check here: it would wait for the device
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        engine.flush_losses()


def test_cg_iterations_synchronise_at_most_twice_and_never_copy_frames(scan):
    engine = _engine(scan)
    engine.add_frames(scan.frames, scan.positions)
    for _ in range(10):
        engine.step()
    engine.flush_losses()
    marks: list[int] = []
    with strict.counting() as c:
        losses = engine.refine(20, callback=lambda i, n, loss: marks.append(len(c.events)))
    assert len(losses) == len(marks) == 20
    per_iteration = [
        sum(1 for e in c.events[a:b] if e.kind in ("sync", "d2h")) for a, b in itertools.pairwise(marks)
    ]
    # one read for the iteration's scalars (the last loss, the dot products) together with the
    # line search's first trial, and one more when the line search needs a secant step
    assert set(per_iteration) <= {1, 2}, (per_iteration, c.summary())
    assert 1 in per_iteration
    assert sum(1 for e in c.events[: marks[0]] if e.kind in ("sync", "d2h")) <= 8, c.summary()
    assert not _frame_copies(c.events, scan.frames.shape[1:]), c.summary()


def test_results_on_the_strict_backend_follow_numpy(scan):
    """The strict backend runs the device code paths (gather/scatter-add instead of block
    copies): the same steps and refinement from the same start agree with NumPy's."""
    out = []
    for backend in ("numpy", "strict"):
        engine = StreamingReconstructor(
            frame_shape=scan.frames.shape[1:], frame_dtype=np.uint16, pixel_size=1e-10, probe=scan.probe,
            options=ReconOptions(backend=backend, init="ones", precision="double"),
            expected_frames=len(scan.frames),
        )
        engine.add_frames(scan.frames, scan.positions)
        for _ in range(10):
            engine.step()
        engine.refine(5)
        out.append((to_numpy(engine.obj), engine.loss_history))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-9)


def test_daemon_scan_end_to_end_on_the_strict_backend(tmp_path):
    """The service (worker, previews, half-set resolution, refinement, result file) on the
    strict backend: any implicit device → host conversion in it would fail the scan."""
    data = synthetic_scan(n_side=10)
    d = start_daemon(tmp_path, "--set", "options.backend=strict", "--set", "options.iterations=5",
                     "--set", "refine_time_budget_s=20", "--set", "preview_hz=10",
                     "--set", "resolution_interval_s=1")
    try:
        sub = Subscriber(d.publish, latest_only=False)
        wait_subscribed(d, sub)  # SUB connects asynchronously: the first events would be lost
        with Producer(d.ingest, control=d.control) as producer:
            producer.start_scan(**data.start_fields("strict"))
            for lo in range(0, len(data.frames), 20):
                producer.send_frames(data.frames[lo : lo + 20])
            producer.end_scan()
        events = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ev = sub.recv(timeout_s=0.5)
            if ev is not None:
                events.append(ev)
                if isinstance(ev, ScanEvent) and ev.event in ("finished", "failed"):
                    break
        sub.close()
        kinds = [getattr(e, "event", type(e).__name__) for e in events]
        assert "finished" in kinds, (kinds, d.log())
        result = next(e for e in events if isinstance(e, Result))
        assert result.object.ndim == 2 and np.all(np.isfinite(result.object))
        assert "rolling back" not in d.log() and "refinement diverged" not in d.log()
    finally:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM)
