"""Validated reconstruction options. Unknown keys are an error; options are saved with results.

Defaults follow the paper (μ₀ = 1e-2, μ₁ = 8e-2, α_h = 5) unless measurements on low-dose
data said otherwise; where they did, the field's docstring says why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StreamOptions(_Strict):
    """Mini-batch updates while frames are still arriving (owned by gpu/stream.py)."""

    batch_size: int = Field(64, ge=1, le=65536)
    """Positions per mini-batch step."""
    fresh_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of each batch drawn from frames that have not been visited yet (the rest is drawn
    uniformly from all frames received so far)."""
    initial_capacity: int = Field(1024, ge=1)
    """Frames the store holds before it first grows (it grows geometrically, in place)."""


class ReconOptions(_Strict):
    """Options of one reconstruction (offline or live)."""

    backend: Literal["numpy", "cupy"] = "numpy"
    precision: Literal["single", "double"] = "single"
    seed: int = 0

    noise_model: Literal["poisson", "amplitude"] = "poisson"
    truncation: Literal["none", "chen-candes", "high-intensity"] = "none"
    alpha_h: float = Field(5.0, gt=0)
    """Truncation threshold α_h of eq. 20 (∞ disables truncation)."""

    prior: Literal["none", "tikhonov", "sparse"] = "tikhonov"
    mu0: float = Field(1e-2, ge=0)
    """Weight of the Tikhonov gradient prior (eq. 12), scaled by κ."""
    mu1: float = Field(8e-2, ge=0)
    """Weight of the sparse (denoiser) prior (eq. 13)."""
    denoiser: str = "bm3d"
    """Denoiser behind the sparse prior (see cryoptycho.gpu.denoise)."""
    denoise_every: int = Field(10, ge=1)

    iterations: int = Field(100, ge=0)
    """Full-batch conjugate-gradient iterations (offline, and refinement after scan end)."""
    time_budget_s: float | None = Field(None, gt=0)

    refine_probe: bool = True
    probe_start_iteration: int = Field(10, ge=0)

    init: Literal["random", "spectral", "ones"] = "random"
    init_phase_mean: float = 0.1
    init_phase_std: float = Field(0.1, ge=0)

    stream: StreamOptions = Field(default_factory=StreamOptions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (for result files and the wire)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReconOptions:
        return cls.model_validate(data or {})

    def merged(self, overrides: dict[str, Any] | None) -> ReconOptions:
        """A copy with ``overrides`` applied (nested for ``stream``), validated."""
        base = self.to_dict()
        for key, value in (overrides or {}).items():
            if key == "stream" and isinstance(value, dict):
                base["stream"] = {**base["stream"], **value}
            else:
                base[key] = value
        return ReconOptions.model_validate(base)
