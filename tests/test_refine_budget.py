"""The refinement budget is a promise (issue 15): CG starts an iteration only when the last
one's duration still fits, refinement set-up counts against the budget, and the service's
post-scan budget covers the half sets and the result file. Time is injected: no wall clock."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryoptycho.daemon.worker import split_budget
from cryoptycho.gpu import operators
from cryoptycho.gpu import reconstruct as reconstruct_module
from cryoptycho.gpu.cg import minimize
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import StreamingReconstructor
from daemon_support import synthetic_scan
from engine_helpers import ENERGY, PIXEL, distorted_scan


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _quadratic(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    diag = rng.uniform(1.0, 50.0, n)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)

    def fun(x):
        r = diag * x["v"] - b
        return float(np.vdot(x["v"], diag * x["v"]).real - 2 * np.vdot(b, x["v"]).real), {"v": r}

    return fun, {"v": np.zeros(n, complex)}


@pytest.mark.parametrize("budget, cost, expected", [(5.5, 1.0, 4), (5.0, 1.0, 4), (1.5, 1.0, 0), (10.0, 3.0, 2)])
def test_cg_stops_before_an_iteration_that_would_overrun(budget, cost, expected):
    """The initial evaluation and each iteration cost ``cost`` seconds of the injected clock:
    CG runs the iterations that fit and ends within the budget (the former start-deadline
    check ran one more and overran, e.g. to 6 s of a 5.5 s budget)."""
    fun, x0 = _quadratic()
    clock = FakeClock()

    def callback(it, x, loss):
        clock.t += cost

    # the first estimate is the initial evaluation's cost: make it one iteration's too
    def timed(x):
        if not timed.started:
            clock.t += cost
            timed.started = True
        return fun(x)

    timed.started = False
    t0 = clock()
    result = minimize(timed, x0, 100, time_budget_s=budget, callback=callback, clock=clock, rtol=0.0)
    assert result.stopped == "time_budget"
    assert result.iterations == expected
    assert clock() - t0 <= budget + 1e-12


def test_cg_predicts_the_next_iteration_by_the_longest_of_the_recent_ones():
    """Iteration times vary (every third costs 2.5 s, the others 1 s, as a secant step or a
    halving adds evaluations): predicted by the last one alone, a 2.5 s iteration was started
    with 1.5 s left and the run ended 1 s past its 9 s budget."""
    fun, x0 = _quadratic()
    clock = FakeClock()

    def callback(it, x, loss):
        clock.t += 2.5 if it % 3 == 2 else 1.0

    def timed(x):
        if not timed.started:
            clock.t += 1.0  # the initial evaluation
            timed.started = True
        return fun(x)

    timed.started = False
    t0 = clock()
    result = minimize(timed, x0, 100, time_budget_s=9.0, callback=callback, clock=clock, rtol=0.0)
    assert result.stopped == "time_budget"
    assert clock() - t0 <= 9.0
    # 1 + (1 + 1 + 2.5) + (1 + 1) = 7.5 s: the next, predicted at 2.5 s, is not started
    assert result.iterations == 5


def _small_problem():
    from cryoptycho.gpu import reconstruct as rec
    from cryoptycho.gpu.data import PtychoData

    nominal, _true, frames, _truth, _geo, probe = distorted_scan(seed=1, m=32)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    opts = ReconOptions(iterations=20, mu0=1e-3, precision="double")
    return rec.prepare(data, opts), opts


@pytest.mark.parametrize("accepted", [False, True])
def test_an_update_inside_an_iteration_does_not_count_as_iteration_time(accepted: bool) -> None:
    """A position update in CG's callback (3 s here, iterations 1 s: the clock is advanced by
    the work only) is predicted by its own guard: the iteration it falls in is no longer taken
    for a 4 s one, which stopped CG with 3.5 s of its budget left (2 iterations instead of 4)."""
    problem, opts = _small_problem()
    clock = _WorkClock()

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        clock.now += 1.0

    def update_at_two(done: int, x):  # type: ignore[no-untyped-def]
        if done != 2:
            return None
        clock.now += 3.0
        return problem.batch if accepted else None  # (moved to where they were: CG restarts)

    budget = 7.5
    _obj, _probe, losses = reconstruct_module.refine_full_batch(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts, 20, budget,
        kappa=problem.kappa, probe_power=problem.probe_power, progress=one_second_per_iteration,
        clock=clock, between=update_at_two)
    # 1 + (1 + 3) + 1 + 1 = 7 s; a fifth iteration (1 s) would end past 7.5
    assert len(losses) == 4
    assert clock.now <= budget


def test_the_fresh_evaluation_after_an_update_is_not_started_past_the_budget() -> None:
    """An accepted update changes the objective: CG evaluates loss and gradient afresh before
    going on. That evaluation (here 2 s, as the first one) is started only if it still fits."""
    fun, x0 = _quadratic()
    clock = FakeClock()
    evaluations = []

    def timed(x):
        evaluations.append(clock.t)
        clock.t += 2.0 if len(evaluations) == 1 or moved else 0.0  # full evaluations; line trials free
        return fun(x)

    moved = False

    def callback(it, x, loss):
        nonlocal moved
        clock.t += 1.0
        if it == 2:
            clock.t += 3.0  # the update, guarded by its own prediction
            moved = True
            return True
        moved = False
        return False

    t0 = clock()
    result = minimize(timed, x0, 100, time_budget_s=8.5, callback=callback, clock=clock, rtol=0.0)
    # 2 (first evaluation) + 1 + 1 + (1 + 3) = 8 s at the update: 0.5 s left, the fresh
    # evaluation needs 2 s
    assert result.stopped == "time_budget"
    assert result.iterations == 3
    assert clock() - t0 <= 8.5


def test_cg_goes_on_the_new_objective_after_an_accepted_position_update() -> None:
    """After the update at iteration 10 moves the positions (to the true ones), CG goes on from
    the same object and probe arrays, and its line model went on with the far fields and
    shifted probes of the old positions: the losses it reported from iteration 11 on were not
    the objective at its iterates (18116 reported at iteration 11, the objective there 17832),
    and at iteration 21 it found no descent ("CG stalled on the truncation rule", α_h widened
    for the rest of the run). Now every iteration runs, each reported loss is the objective
    at its iterate and the current positions, and CG descends it."""
    from cryoptycho.gpu import reconstruct as rec
    from cryoptycho.gpu.data import PtychoData

    nominal, true, frames, _truth, _geo, probe = distorted_scan(seed=1, m=32)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    opts = ReconOptions(iterations=30, mu0=1e-3, precision="double", refine_probe=False)
    problem = rec.prepare(data, opts)
    geo = problem.geometry
    moved = operators.make_batch(geo.to_pixels(true), geo.object_shape, geo.probe_shape)
    iterates = {}

    def move_at_ten(done: int, x):  # type: ignore[no-untyped-def]
        iterates[done] = dict(x)  # (CG makes new arrays for every point: no copy needed)
        return moved if done == 10 else None

    stopped: list[str] = []
    _obj, _probe, losses = rec.refine_full_batch(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts, 30,
        kappa=problem.kappa, probe_power=problem.probe_power, between=move_at_ten, stopped=stopped)
    before, after = (rec.FullBatchObjective(problem.counts_fft, batch, problem.mask, opts, problem.kappa,
                                            problem.probe_power) for batch in (problem.batch, moved))
    for done in range(8, 16):
        objective = before if done <= 10 else after
        assert losses[done - 1] == pytest.approx(objective(iterates[done])[0], rel=1e-9), done
    assert stopped == ["max_iter"] and len(losses) == 30
    assert all(b <= a for a, b in itertools.pairwise(losses[10:]))  # descent on the new objective


def test_stream_refine_counts_its_set_up_against_the_budget():
    """Work done before CG starts (batches, κ, probe power) comes out of the budget: a clock
    that jumps past the budget during the set-up leaves no iteration to run."""
    scan = synthetic_scan(n_side=6)
    engine = StreamingReconstructor(frame_shape=scan.frames.shape[1:], frame_dtype=np.uint16,
                                    pixel_size=1e-10, probe=scan.probe, options=ReconOptions())
    engine.add_frames(scan.frames, scan.positions)
    engine.step()
    calls = []

    def clock() -> float:
        calls.append(None)
        return 0.0 if len(calls) == 1 else 10.0  # the set-up "took" 10 s

    assert engine.refine(20, time_budget_s=5.0, clock=clock) == []
    free = engine.refine(3, time_budget_s=5.0, clock=lambda: 0.0)
    assert len(free) == 3


def test_refine_is_not_started_when_its_first_evaluation_cannot_fit():
    """The steps' pace (seconds per frame visited) predicts a refinement's set-up and first
    evaluation: a budget shorter than that leaves the streamed state as it is."""
    scan = synthetic_scan(n_side=6)
    engine = StreamingReconstructor(frame_shape=scan.frames.shape[1:], frame_dtype=np.uint16,
                                    pixel_size=1e-10, probe=scan.probe, options=ReconOptions())
    engine.add_frames(scan.frames, scan.positions)
    engine.step()
    assert engine.step_seconds_per_frame > 0  # measured by the step
    engine.step_seconds_per_frame = 0.1  # 36 frames: ≈ 7 s for set-up and a first evaluation
    before = engine.obj.copy()
    assert engine.refine(20, time_budget_s=5.0, clock=lambda: 0.0) == []
    np.testing.assert_array_equal(engine.obj, before)
    assert len(engine.refine(2, time_budget_s=8.0, clock=lambda: 0.0)) == 2
    assert len(engine.refine(2)) == 2  # no budget, no limit


def test_split_budget_keeps_the_promise():
    main, halves = split_budget(30.0, spent_s=2.0, reserve_s=1.0, halves_share=0.25)
    assert (main, halves) == (pytest.approx(20.25), pytest.approx(6.75))
    assert main + halves + 2.0 + 1.0 == pytest.approx(30.0)
    assert split_budget(30.0, 2.0, 1.0, 0.0) == (pytest.approx(27.0), 0.0)
    # already over: nothing left to refine with, never a negative budget
    assert split_budget(5.0, spent_s=4.0, reserve_s=2.0, halves_share=0.25) == (0.0, 0.0)


class _WorkClock:
    """Seconds of work done so far: advanced by the work itself, never by the host."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_position_update_predicted_to_overrun_is_not_started(monkeypatch, caplog) -> None:
    """A position update whose predicted cost (the last one's, else one mean CG iteration) no
    longer fits is not started; CG goes on with the time and the refined object is kept. The
    clock here is advanced by the work only: 1 s per CG iteration, 3 s per position update."""
    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    frames = operators.from_fft_order(frames_fft)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=2, position_every=2,
                        stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(frames, nominal)
    for _ in range(20):
        engine.step()
    engine.flush_losses()
    streamed = engine.snapshot().object.copy()

    clock = _WorkClock()
    updates = []
    real_update = reconstruct_module.update_positions

    def costly_update(*args, **kwargs):
        updates.append(clock.now)
        clock.now += 3.0  # a position update: three CG iterations' work
        return real_update(*args, **kwargs)

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        clock.now += 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", costly_update)
    budget = 9.5
    with caplog.at_level("INFO", logger="cryoptycho"):
        losses = engine.refine(10, time_budget_s=budget, callback=one_second_per_iteration, clock=clock)
    # the first update (after 2 iterations, predicted at one mean iteration) fits and runs; the
    # next one, after 4 iterations at 7 s, is predicted at the first one's 3 s: not started
    assert updates == [2.0]
    assert "positions update at iteration 4 skipped" in caplog.text
    assert len(losses) > 4  # CG went on with the time the update would have taken
    assert clock.now <= budget  # (work-clock seconds: the budget held)
    assert np.isfinite(engine.snapshot().object).all()
    assert not np.allclose(engine.snapshot().object, streamed)  # the refined object is the result


def test_a_position_update_no_cg_iteration_could_follow_is_not_started(monkeypatch) -> None:
    """An update needs CG after it (the object follows the moved positions): with 2.5 s left,
    an update predicted at two mean iterations (2 s) fits, but no iteration after it would —
    the positions would move away from the object they were fitted at. It is not started, and
    CG takes the time instead."""
    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=2, position_every=2,
                        stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames_fft), nominal)
    for _ in range(4):
        engine.step()
    clock = _WorkClock()
    updates = []
    real_update = reconstruct_module.update_positions

    def costly_update(*args, **kwargs):
        updates.append(clock.now)
        clock.now += 1.0
        return real_update(*args, **kwargs)

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        clock.now += 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", costly_update)
    losses = engine.refine(4, time_budget_s=4.5, callback=one_second_per_iteration, clock=clock)
    assert updates == []
    assert len(losses) == 4  # the update's time went to CG: every iteration asked for
    assert clock.now <= 4.5


def test_an_update_after_cg_stopped_early_is_predicted_from_the_iterations_run(monkeypatch) -> None:
    """CG stopped for the budget after 3 iterations (the third took 3 s), short of the next
    update point (10): the update's cost is predicted from the 3 iterations run (5 s / 3), not
    from the schedule's 10 (0.5 s), which started a 2 s update with 2 s left."""
    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=10, position_every=5,
                        stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames_fft), nominal)
    for _ in range(4):
        engine.step()
    clock = _WorkClock()
    updates = []
    real_update = reconstruct_module.update_positions

    def costly_update(*args, **kwargs):
        updates.append(clock.now)
        clock.now += 2.0
        return real_update(*args, **kwargs)

    def third_is_slow(iteration: int, total: int, loss: float) -> None:
        clock.now += 3.0 if iteration == 3 else 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", costly_update)
    losses = engine.refine(20, time_budget_s=7.0, callback=third_is_slow, clock=clock)
    assert len(losses) == 3  # 1 + 1 + 3 s; a fourth, predicted at 3 s, would end at 8
    assert updates == []
    assert clock.now <= 7.0


def test_the_second_half_set_gets_only_what_the_first_left() -> None:
    """The half sets share their part of the post-scan budget: a first half that overran (here
    7 s of its 5) leaves the second 3 s, not another 5, so the halves end within their 10 s."""
    from cryoptycho.daemon.resolution import HalfSetEstimator

    clock = _WorkClock()

    class Half:
        n_frames = 10

        def __init__(self, cost: float) -> None:
            self.cost, self.budgets = cost, []

        def add_frames(self, frames, positions) -> None:
            pass

        def refine(self, iterations: int, time_budget_s: float) -> None:
            self.budgets.append(time_budget_s)
            clock.now += self.cost  # (the first one ignores its budget)

    halves = iter([Half(7.0), Half(1.0)])
    est = HalfSetEstimator(lambda: next(halves), 1e-10, 0.2)
    est.refine(10, 10.0, clock=clock)
    assert est._a.budgets == [5.0] and est._b.budgets == [3.0]
    assert clock.now <= 10.0


def _position_engine(position_every: int) -> StreamingReconstructor:
    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=2,
                        position_every=position_every, stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames_fft), nominal)
    for _ in range(4):
        engine.step()
    return engine


@pytest.mark.parametrize("position_every", [4, 2])
def test_no_update_or_cg_run_after_cg_stopped_for_the_budget(monkeypatch, position_every: int) -> None:
    """Iterations of 1 s, the fourth 3 s, position updates 0.1 s, an 8 s budget: CG stops after
    the fourth (6.1 s; its longest recent iteration, 3 s, no longer fits). The update guards
    predicted by the mean iteration (6.1 / 4 s) instead, so (every 4) the update pending at 6
    ran after CG had stopped for the budget — the path meant for "converged before an update
    point" — and a new CG run's first iteration ended at 9.2 s of the 8; (every 2) the update
    after iteration 4 and the pending one at 6 ran back to back at 6.1 and 6.2 s, no CG
    iteration after either (the review's reproductions, tests r1_overrun / r1_unfollowed)."""
    engine = _position_engine(position_every)
    clock = _WorkClock()
    updates = []
    real_update = reconstruct_module.update_positions

    def cheap_update(*args, **kwargs):
        updates.append(clock.now)
        clock.now += 0.1
        return real_update(*args, **kwargs)

    reported = []

    def fourth_and_seventh_are_slow(iteration: int, total: int, loss: float) -> None:
        reported.append(iteration)
        clock.now += 3.0 if iteration in (4, 7) else 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", cheap_update)
    losses = engine.refine(20, time_budget_s=8.0, callback=fourth_and_seventh_are_slow, clock=clock)
    assert clock.now <= 8.0
    assert updates == [2.0]  # after iteration 2; none that no iteration could follow
    assert reported == [1, 2, 3, 4] and len(losses) == 4
    assert clock.now == pytest.approx(6.1)


def test_a_position_update_is_predicted_with_the_iteration_it_follows(monkeypatch) -> None:
    """The update due after a long iteration (here the fourth, 3 s, reported before CG times
    it) is predicted with that iteration's time as the next one's: at 6.1 s of 8, 0.1 s of
    update and 1.5 s of mean iteration fit, but CG, counting the 3 s one, would stop right after
    it — so the update is not started, and the positions stay where the object was fitted."""
    engine = _position_engine(2)
    clock = _WorkClock()
    updates = []
    real_update = reconstruct_module.update_positions

    def cheap_update(*args, **kwargs):
        updates.append(clock.now)
        clock.now += 0.1
        return real_update(*args, **kwargs)

    def fourth_is_slow(iteration: int, total: int, loss: float) -> None:
        clock.now += 3.0 if iteration == 4 else 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", cheap_update)
    # (20 iterations with position_every 2: update points 2, 4, …, 18 — no aberrations, one CG run)
    engine.refine(20, time_budget_s=8.0, callback=fourth_is_slow, clock=clock)
    assert 6.1 not in updates
    assert clock.now <= 8.0


def test_no_position_update_after_the_last_reported_device_iteration() -> None:
    """On a device CG checks the budget before an iteration's work and reports the previous one
    with that work's first read: when it stops for the budget, the last iteration is reported
    after the decision, and its report ran ``between`` too — positions moved after CG had
    stopped (the object fitted at the old ones, saved with the new). Run on the strict
    GPU-semantics backend (gpu/strict.py), which takes the device path."""
    from cryoptycho.gpu import reconstruct as rec
    from cryoptycho.gpu.data import PtychoData

    nominal, _true, frames, _truth, _geo, probe = distorted_scan(seed=1, m=32)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    opts = ReconOptions(iterations=20, mu0=1e-3, backend="strict")
    problem = rec.prepare(data, opts)
    clock = _WorkClock()
    events: list[tuple[str, int]] = []

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        events.append(("report", iteration))
        clock.now += 1.0

    def finds_nothing(done: int, x) -> None:  # type: ignore[no-untyped-def]
        events.append(("between", done))  # (returns None: a rejected update, CG goes on untouched)

    _obj, _probe, losses = rec.refine_full_batch(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts, 20, 4.5,
        kappa=problem.kappa, probe_power=problem.probe_power, progress=one_second_per_iteration,
        clock=clock, between=finds_nothing)
    # (the clock here decides when CG stops: at the sixth iteration's check, 4 s in, a 1 s
    # iteration no longer fits; the fifth, run already, is reported after that decision)
    assert len(losses) == 5
    assert events[-1] == ("report", 5)  # the last report, and no update after it
    # every update is followed by an iteration (its report)
    assert events == [e for i in range(1, 6) for e in (("report", i), ("between", i))][:-1]


@pytest.mark.parametrize("reason", ["converged", "time_budget"])
def test_a_pending_position_update_runs_only_after_cg_converged(monkeypatch, reason: str) -> None:
    """CG that stopped short of the next update point because it converged is followed by the
    update there (the positions may still move, and CG goes on from them); CG that stopped for
    the budget is not — nothing would follow the update. CG's stop is injected: two iterations,
    then ``reason``; no budget, so only the stop reason decides."""
    from cryoptycho.gpu import cg

    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=4, position_every=4,
                        stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames_fft), nominal)
    for _ in range(4):
        engine.step()
    updates = []
    real_update = reconstruct_module.update_positions

    def counted_update(*args, **kwargs):
        updates.append(None)
        return real_update(*args, **kwargs)

    def stops_early(fun, x0, max_iter, *args, **kwargs):
        result = cg.minimize(fun, x0, min(max_iter, 2), *args, **kwargs)
        result.stopped = reason
        return result

    monkeypatch.setattr(reconstruct_module, "update_positions", counted_update)
    monkeypatch.setattr(reconstruct_module, "minimize", stops_early)
    engine.refine(12)
    if reason == "converged":
        assert updates  # at 4 (the first point after the 2 iterations run)
    else:
        assert updates == []


@pytest.mark.parametrize("update_s, undone", [(4.0, True), (2.0, False)])
def test_a_position_update_that_no_iteration_followed_is_undone(monkeypatch, update_s: float,
                                                                  undone: bool) -> None:
    """An update's cost is predicted by the last one's (the first: two mean iterations), and
    under load it varies (0.6-3.1 s in `bench live` at load 5-9, one accepted update left with no
    CG iteration after it). Here the first update, predicted at 2 s, takes 4: CG, restarted at 6 s
    of 6.5, has no time for an iteration at the moved positions. The object was fitted at the
    positions before the update: those are kept with it, not the moved ones. An update that
    took 2 s is followed by CG, and its positions are the result."""
    engine = _position_engine(2)
    n = engine.n_frames
    stored = engine.frame_store.positions[:n].copy()
    clock = _WorkClock()
    accepted = []
    real_update = reconstruct_module.update_positions

    def slow_update(*args, **kwargs):
        upd = real_update(*args, **kwargs)
        clock.now += update_s
        accepted.append(upd.accepted)
        return upd

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        clock.now += 1.0

    monkeypatch.setattr(reconstruct_module, "update_positions", slow_update)
    losses = engine.refine(10, time_budget_s=6.5, callback=one_second_per_iteration, clock=clock)
    assert accepted == [True]  # the update at iteration 2 moved the positions
    assert clock.now <= 6.5
    if undone:
        assert len(losses) == 2  # none after the update (2 + 4 = 6 s; a 1 s iteration ends at 7)
        np.testing.assert_allclose(engine.frame_store.positions[:n], stored, rtol=0, atol=1e-6 * PIXEL)
    else:
        assert len(losses) > 2
        assert np.abs(engine.frame_store.positions[:n] - stored).max() > 0.01 * PIXEL  # (moved)


@pytest.mark.parametrize("fit_s, undone", [(6.0, True), (1.0, False)])
def test_an_aberration_fit_that_no_iteration_followed_is_undone(monkeypatch, fit_s: float, undone: bool) -> None:
    """The aberration fit's counterpart of the position update's case: the fit after 2
    iterations, predicted at five mean iterations (5 s) with 8.5 s of budget, takes 6 s; CG
    has no time for an iteration with the new probe. The object was fitted with the probe
    before the fit: that probe (and its coefficients, zero) is saved with it, not the fitted
    one. A fit that took 1 s is followed by CG, and its probe is the result."""
    m = 32
    nominal, _true, frames_fft, _truth, _geo, probe = distorted_scan(seed=1, m=m)
    opts = ReconOptions(mu0=1e-3, refine_aberrations=True, aberration_start_iteration=2, aberration_every=2,
                        stream={"batch_size": 16, "refine_positions": False})
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames_fft), nominal)
    for _ in range(4):
        engine.step()
    before = engine.snapshot().probe.copy()
    clock = _WorkClock()
    fits = []
    real_fit = reconstruct_module.fit_aberrations

    def slow_fit(model, *args, **kwargs):
        out = real_fit(model, *args, **kwargs)
        clock.now += fit_s
        fits.append(model.coefficients.copy())
        return out

    def one_second_per_iteration(iteration: int, total: int, loss: float) -> None:
        clock.now += 1.0

    monkeypatch.setattr(reconstruct_module, "fit_aberrations", slow_fit)
    losses = engine.refine(10, time_budget_s=8.5, callback=one_second_per_iteration, clock=clock)
    assert len(fits) >= 1 and np.abs(fits[0]).max() > 0  # the fit moved the coefficients
    assert clock.now <= 8.5
    # compared up to the probe's scale (the engine rescales it to the measured power)
    after = engine.snapshot().probe
    before, after = before / np.linalg.norm(before), after / np.linalg.norm(after)
    estimate = engine.snapshot().probe_estimate
    if undone:
        assert len(losses) == 2  # none after the fit (2 + 6 = 8 s; a 4 s mean iteration ends past 8.5)
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())
        assert all(v == 0.0 for k, v in estimate.items() if k.startswith("aberration_")), estimate
    else:
        assert len(losses) > 2
        assert np.abs(after - before).max() > 1e-4 * np.abs(before).max()  # (the fitted probe)
        assert any(v != 0.0 for k, v in estimate.items() if k.startswith("aberration_")), estimate
