"""The parallax gate's paths beyond the default fit (gpu/parallax.py, "The gate"): its trial
probes stop on a cancel like the fit's own (the live engine drops a fit that would overrun the
refinement budget, and counts its trials to predict what is left), the joint scan fit and the
alias-aware fit run on the strict device backend with the same result as on NumPy, and the
result is the same bit for bit from one run to the next (the surrogates' random signs are
seeded)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cryoptycho.gpu.backend import get_xp
from cryoptycho.gpu.parallax import BrightFieldModel, FitCancelled, estimate_aberrations
from cryoptycho.gpu.probes import make_probe
from engine_helpers import ENERGY, PIXEL, aberrated_dataset

M = 32


def _nominal(xp=np):
    return make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, xp=xp, precision="double")


class _CountingCancel(threading.Event):
    """A cancel flag that counts the trials that read it (as stream.FitProgress does)."""

    def __init__(self) -> None:
        super().__init__()
        self.trials = 0

    def is_set(self) -> bool:
        self.trials += 1
        return super().is_set()


def test_a_cancel_during_the_gate_stops_the_fit_at_its_next_trial(monkeypatch) -> None:
    """The cancel arrives as the gate's surrogates are drawn (after the search and the
    curvature): the fit raises FitCancelled before another trial probe, and every trial of the
    gate was counted. Before, the gate's 1 + 4n trials ran unchecked and uncounted."""
    data = aberrated_dataset(1e5, {"C10": 15e-9}, 1, 10)
    cancel = _CountingCancel()
    calls = {"projected": 0}
    projected = BrightFieldModel.projected

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["projected"] += 1
        return projected(self, *args, **kwargs)

    monkeypatch.setattr(BrightFieldModel, "projected", counted)
    whole = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, cancel=cancel)
    # every trial probe reads the flag once; the model's shell weights and the nominal score
    # (set-up) and the summaries at the end (2 explained shares, the log-likelihood gain) do not
    assert cancel.trials == calls["projected"] - 2 - 3, (cancel.trials, calls, whole.evaluations)

    surrogate = BrightFieldModel.noise_surrogate

    def cancelled_then(self, rng):  # type: ignore[no-untyped-def]
        cancel.set()
        return surrogate(self, rng)

    monkeypatch.setattr(BrightFieldModel, "noise_surrogate", cancelled_then)
    calls["projected"] = 0
    with pytest.raises(FitCancelled):
        estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, cancel=cancel)
    # the search's, the curvature's and the fitted signal's trials ran, none of the gate's
    # gradients (2 per coefficient and surrogate, 3 coefficients, 2 surrogates) after the cancel;
    # ``evaluations`` counts up to the 2 explained shares
    assert calls["projected"] == whole.evaluations - 2 - 2 * 3 * 2, (calls, whole.evaluations)


@pytest.mark.parametrize("kwargs", [{"scan": True}, {"aliases": True, "nyquist_fraction": 1.8}],
                         ids=["scan", "aliases"])
def test_the_scan_and_alias_fits_run_on_the_device_backend(kwargs) -> None:
    """The strict backend refuses implicit device → host conversions: the off-grid and alias
    paths looped over the rows of device arrays (Ψ's moments, the alias ramps)."""
    xp = get_xp("strict")
    data = aberrated_dataset(1e5, {"C10": 15e-9}, 1, 8)
    fit = estimate_aberrations(xp.asarray(data.frames), data.positions, _nominal(xp), PIXEL, ENERGY,
                               names=("C10",), **kwargs)
    host = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",), **kwargs)
    assert fit.significance == pytest.approx(host.significance, rel=1e-6)
    assert fit.coefficients["C10"] == pytest.approx(host.coefficients["C10"], abs=1e-12)


def test_the_gate_is_the_same_bit_for_bit_on_a_second_run() -> None:
    data = aberrated_dataset(1e4, {}, 2, 10)
    first = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, noise_draws=3)
    second = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, noise_draws=3)
    assert first.significance == second.significance and first.standard_error == second.standard_error
