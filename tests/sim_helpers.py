"""Small real specimens for fast simulator tests."""

from __future__ import annotations

import numpy as np
from cryoptycho.gpu.sim.specimen import AtomicModel, load_model


def hemoglobin_fragment(radius: float = 1e-9) -> AtomicModel:
    """Hemoglobin atoms within ``radius`` (m) of its centre: a small, real piece of protein."""
    model = load_model("hemoglobin").centred()
    keep = np.linalg.norm(model.positions, axis=1) < radius
    return AtomicModel(
        positions=model.positions[keep], elements=model.elements[keep],
        occupancy=model.occupancy[keep], hydrogens=model.hydrogens[keep],
        volume=model.volume[keep], name="fragment",
    )
