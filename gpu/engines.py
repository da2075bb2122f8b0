"""The engine boundary: what a reconstruction algorithm offers the daemon, and the registry of them.

An algorithm is registered by name (:func:`register_engine`) with three parts:

* ``live(spec, options) -> LiveEngine`` — an engine that grows with a scan while its frames
  arrive (the daemon drives it from one worker thread; :class:`LiveEngine` is all it calls);
* ``memory_estimate(options, frame_shape=…, frame_dtype=…, n_frames=…, field_px=…) ->
  MemoryEstimate`` — the bytes a scan needs, so the daemon can refuse a scan that cannot fit
  before it starts (from the declaration alone: no probe, no positions);
* ``offline(data, options, progress) -> ReconState`` (optional) — the whole-dataset
  reconstruction behind ``cryoptycho reconstruct``; without it the live engine is fed every
  frame and refined (:func:`offline_via_live`).

``ReconOptions.algorithm`` names the algorithm; ``"map-cg"`` (the default) is the streaming
Poisson MAP engine with full-batch CG refinement (:mod:`cryoptycho.gpu.stream`,
:mod:`cryoptycho.gpu.reconstruct`). Algorithms from other packages are found through the entry
point group ``cryoptycho.engines`` (name = algorithm name, object = an :class:`Algorithm`), so
an installed plug-in is usable by option alone — see ENGINE.md, "Adding an algorithm".
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .data import PtychoData
from .options import ReconOptions
from .probes import make_probe, scale_probe
from .state import ReconState

log = logging.getLogger("cryoptycho.engines")

#: The entry point group searched for algorithms of other installed packages.
ENTRY_POINT_GROUP = "cryoptycho.engines"
#: The algorithm of ``ReconOptions()``.
DEFAULT_ALGORITHM = "map-cg"

Extent = tuple[tuple[float, float], tuple[float, float]]
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine knows of a scan before its first frame (the daemon's scan description,
    reduced to the engine's needs). ``probe`` is (M, M) complex in the sample plane, scaled to
    Σ|ψ|² = mean counts per pattern; ``mask`` (M, M) bool in detector order, True = valid."""

    frame_shape: tuple[int, int]
    frame_dtype: np.dtype
    pixel_size_m: float
    probe: np.ndarray
    mask: np.ndarray | None = None
    extent_m: Extent | None = None
    expected_frames: int | None = None
    energy_eV: float | None = None
    #: the probe comes from nominal lens settings (a probe model), not a measurement: the
    #: options' ``parallax`` "auto" corrects it from the data (gpu/parallax.py)
    probe_from_model: bool = False
    #: the source size the scan states (rms at the sample, m; its probe model's
    #: ``source_size_m``), which the options' ``source_size_m`` "auto" uses; None: none stated
    source_size_m: float | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a scan needs on the engine's device: ``total`` is the peak the daemon admits
    scans by; ``parts`` breaks it down for logs and benchmarks (names are the algorithm's)."""

    total: int
    parts: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.total) < 0:
            raise ValueError(f"a memory estimate must be ≥ 0 bytes, got {self.total}")


class StepReport(Protocol):
    """What the daemon reads from one :meth:`LiveEngine.step`."""

    @property
    def iteration(self) -> int: ...  # steps taken so far, this one included

    @property
    def n_frames(self) -> int: ...  # frames the engine held when the step ran

    @property
    def fresh(self) -> int: ...  # frames this step used for the first time


@runtime_checkable
class LiveEngine(Protocol):
    """A reconstruction that grows with a scan. Driven from ONE thread; only :meth:`snapshot`'s
    result may cross to another."""

    #: The options in force; the worker assigns new ones (a client's ``set_options``) and the
    #: engine applies them from its next step.
    options: ReconOptions

    @property
    def n_frames(self) -> int: ...

    @property
    def iteration(self) -> int: ...

    def add_frames(self, frames: Any, positions_m: Any) -> None:
        """Frames (n, M, M) counts in detector order at probe positions (n, 2) metres."""

    def step(self) -> StepReport:
        """One update while the scan runs; FloatingPointError when the state became non-finite."""

    def flush_losses(self) -> list[float]:
        """Per-position losses of the steps since the last call (FloatingPointError if one is
        not finite): the daemon checks them for divergence and publishes the last."""

    def refine(self, iterations: int, time_budget_s: float | None = None,
               callback: Progress | None = None) -> list[float]:
        """After scan end: at most ``iterations`` iterations within ``time_budget_s`` seconds;
        ``callback(iteration, total, loss)`` after each (``loss`` summed over positions; it may
        raise to stop the refinement, which must then leave the engine's state as before)."""

    def snapshot(self) -> ReconState:
        """Host copies of object, probe, geometry, positions and bookkeeping."""

    def restore(self, state: ReconState) -> None:
        """Put an earlier :meth:`snapshot`'s object and probe back (a rollback after
        divergence); the canvas may have grown since."""

    def positions(self) -> np.ndarray:
        """(n_frames, 2) probe positions in metres as the engine now has them (refined, if the
        algorithm refines positions), in arrival order."""

    def coverage(self) -> np.ndarray:
        """Canvas-shaped host map of how much each object pixel was illuminated."""


LiveFactory = Callable[[EngineSpec, ReconOptions], LiveEngine]
MemoryFunction = Callable[..., MemoryEstimate]
OfflineFunction = Callable[[PtychoData, ReconOptions, Progress | None], ReconState]


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm (the object a ``cryoptycho.engines`` entry point names)."""

    live: LiveFactory
    memory_estimate: MemoryFunction
    offline: OfflineFunction | None = None
    description: str = ""


_REGISTRY: dict[str, Algorithm] = {}
_LOCK = threading.RLock()  # discovery registers while holding it
_discovered = False


def register_engine(name: str, algorithm: Algorithm) -> None:
    """Register ``algorithm`` under ``name`` (later registrations win, as for denoisers)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an algorithm name must be a non-empty string, got {name!r}")
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register_engine({name!r}, …) needs an Algorithm, got {type(algorithm).__name__}")
    with _LOCK:
        _REGISTRY[name] = algorithm


def available_engines() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a clear error lists the known names."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))} "
            f"(plug-ins register through the entry point group {ENTRY_POINT_GROUP!r})"
        ) from None


def create_engine(spec: EngineSpec, options: ReconOptions) -> LiveEngine:
    """The live engine of ``options.algorithm`` for the scan ``spec``."""
    engine = get_algorithm(options.algorithm).live(spec, options)
    if not isinstance(engine, LiveEngine):
        raise TypeError(f"algorithm {options.algorithm!r} built a {type(engine).__name__}, "
                        "which lacks part of the LiveEngine interface")
    return engine


def memory_estimate(options: ReconOptions, *, frame_shape: tuple[int, int], frame_dtype: Any,
                    n_frames: int, field_px: tuple[int, int]) -> MemoryEstimate:
    """Bytes a scan of ``n_frames`` frames of ``frame_shape`` ``frame_dtype`` over an object
    canvas of ``field_px`` pixels needs with ``options.algorithm``. Needs only the scan's
    declaration (no probe, no positions): the daemon asks before it builds anything large."""
    est = get_algorithm(options.algorithm).memory_estimate(
        options, frame_shape=frame_shape, frame_dtype=np.dtype(frame_dtype), n_frames=n_frames,
        field_px=field_px)
    if not isinstance(est, MemoryEstimate):
        raise TypeError(f"algorithm {options.algorithm!r}: memory_estimate returned "
                        f"{type(est).__name__}, not a MemoryEstimate")
    return est


def reconstruct(data: PtychoData, options: ReconOptions, progress: Progress | None = None) -> ReconState:
    """Offline reconstruction of ``data`` with ``options.algorithm``."""
    algorithm = get_algorithm(options.algorithm)
    if algorithm.offline is not None:
        return algorithm.offline(data, options, progress)
    return offline_via_live(algorithm, data, options, progress)


def offline_via_live(algorithm: Algorithm, data: PtychoData, options: ReconOptions,
                     progress: Progress | None = None) -> ReconState:
    """An algorithm without an offline path: its live engine gets every frame at once, is
    refined for ``options.iterations`` within ``options.time_budget_s``, and its snapshot is
    the result."""
    data.validate()
    frames = np.asarray(data.frames)
    if data.probe is not None:
        probe = np.asarray(data.probe)
    elif data.probe_model is not None:
        pm = data.probe_model
        probe = make_probe(pm.kind, data.frame_shape, data.real_pixel_size, data.energy, pm.semiangle,
                           pm.defocus, pm.cs, 1.0, pm.zones, pm.diameter, pm.seed, np, options.precision)
        probe = scale_probe(probe, frames, data.mask)
    else:
        raise ValueError(f"algorithm {options.algorithm!r} needs a dataset with /probe or /probe_model")
    spec = EngineSpec(
        frame_shape=data.frame_shape, frame_dtype=frames.dtype, pixel_size_m=data.real_pixel_size,
        probe=probe, mask=None if data.mask is None else np.asarray(data.mask, bool),
        expected_frames=int(frames.shape[0]), energy_eV=data.energy,
        probe_from_model=data.probe is None, source_size_m=data.stated_source_size,
    )
    engine = algorithm.live(spec, options)
    engine.add_frames(frames, np.asarray(data.positions))
    engine.refine(options.iterations, time_budget_s=options.time_budget_s, callback=progress)
    return engine.snapshot()


def _map_cg_live(spec: EngineSpec, options: ReconOptions) -> LiveEngine:
    from .stream import StreamingReconstructor

    return StreamingReconstructor(
        frame_shape=spec.frame_shape, frame_dtype=spec.frame_dtype, pixel_size=spec.pixel_size_m,
        probe=spec.probe, options=options, mask=spec.mask, extent_m=spec.extent_m,
        expected_frames=spec.expected_frames, energy_eV=spec.energy_eV,
        probe_from_model=spec.probe_from_model, source_size_m=spec.source_size_m,
    )


def _map_cg_memory(options: ReconOptions, *, frame_shape: tuple[int, int], frame_dtype: np.dtype,
                   n_frames: int, field_px: tuple[int, int]) -> MemoryEstimate:
    from .stream import StreamingReconstructor

    parts = StreamingReconstructor.memory_estimate(
        frame_shape=frame_shape, frame_dtype=frame_dtype, n_frames=n_frames, field_px=field_px,
        options=options,
    )
    return MemoryEstimate(total=int(parts["total"]), parts={k: int(v) for k, v in parts.items() if k != "total"})


def _map_cg_offline(data: PtychoData, options: ReconOptions, progress: Progress | None) -> ReconState:
    from .reconstruct import full_batch_reconstruct

    return full_batch_reconstruct(data, options, progress)


register_engine(DEFAULT_ALGORITHM, Algorithm(
    live=_map_cg_live, memory_estimate=_map_cg_memory, offline=_map_cg_offline,
    description="Poisson MAP: mini-batch gradient steps while streaming, full-batch CG after",
))


def _discover() -> None:
    """Register the algorithms of installed plug-ins once (entry point group
    ``cryoptycho.engines``); a plug-in that fails to load is logged and skipped, not fatal:
    the algorithms that did load stay usable and an unknown name still errors clearly."""
    global _discovered
    with _LOCK:  # held throughout: no thread sees the registry half-discovered
        if _discovered:
            return
        _discovered = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                register_engine(ep.name, ep.load())
            except Exception:
                log.exception("algorithm plug-in %r (%s) failed to load: skipped", ep.name, ep.value)


__all__ = [
    "DEFAULT_ALGORITHM",
    "ENTRY_POINT_GROUP",
    "Algorithm",
    "EngineSpec",
    "LiveEngine",
    "MemoryEstimate",
    "StepReport",
    "available_engines",
    "create_engine",
    "get_algorithm",
    "memory_estimate",
    "offline_via_live",
    "reconstruct",
    "register_engine",
]
