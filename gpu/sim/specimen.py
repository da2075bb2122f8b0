"""Atomic models of specimens: read with gemmi, hydrogens added, optionally rotated.

Experimental models (X-ray, cryo-EM) omit hydrogens, yet H carries about a fifth of a protein's
projected potential. gemmi can place riding hydrogens only with the CCP4 monomer library, which
is not shipped, so we use the documented first approximation: each heavy atom carries its
hydrogens *at its own position* (the H–X bond, ≈1 Å, is below the resolution of interest).

How many H each heavy atom carries: gemmi's built-in residue table gives the hydrogen count of
every standard residue (free form); polymer-linked residues lose two H per link (one H₂O per
peptide / phosphodiester bond, one H from each partner). The residue's H are shared among its heavy atoms in proportion
to their free valence (valence − heavy-atom neighbours within bonding distance), so CH₃ gets
three times the share of a CH. Residues gemmi does not know fall back to the valence rule
alone. Crystallographic waters are dropped by default: the ice model supplies the solvent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from .elements import check_elements

#: typical valences for the free-valence rule (others carry no hydrogen)
VALENCE = {"C": 4, "N": 3, "O": 2, "S": 2, "Se": 2}
#: heavy-atom bond cut-off (Å): C–S and S–S bonds are ≤ 2.05 Å; non-bonded contacts ≥ 2.6 Å
BOND_CUTOFF_A = 2.1
#: protein partial specific volume (cm³/g) → the volume of ice each atom displaces
PARTIAL_SPECIFIC_VOLUME = 0.73
_DALTON_G = 1.66053906660e-24

#: sample name → (file name, description). hemoglobin ships with the package; the others are
#: looked up in $CRYOPTYCHO_STRUCTURES (a folder of PDB/mmCIF files).
SAMPLES: dict[str, tuple[str, str]] = {
    "hemoglobin": ("4HHB.pdb.gz", "human deoxy-haemoglobin, 64 kDa (4HHB)"),
    "proteasome": ("3J9I.pdb.gz", "T. acidophilum 20S proteasome, 0.66 MDa (3J9I)"),
    "ribosome30s": ("4V4R_30S.pdb.gz", "T. thermophilus 30S ribosomal subunit, 0.76 MDa (4V4R)"),
    "ribosome": ("6ZU5.cif.gz", "P. locustae 80S ribosome, 2.4 MDa (6ZU5)"),
}
STRUCTURES_ENV = "CRYOPTYCHO_STRUCTURES"


@dataclass(frozen=True)
class AtomicModel:
    """Heavy atoms with their riding hydrogens. Positions (N, 3) are (z, y, x) in metres,
    z along the beam."""

    positions: np.ndarray
    elements: np.ndarray  #: (N,) element symbols
    occupancy: np.ndarray  #: (N,)
    hydrogens: np.ndarray  #: (N,) hydrogen count carried by each atom (float)
    volume: np.ndarray  #: (N,) m³ of solvent displaced by the atom and its hydrogens
    name: str = ""

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def extent(self) -> np.ndarray:
        """(3,) size (m) of the bounding box in (z, y, x)."""
        return np.ptp(self.positions, axis=0)

    def centred(self) -> AtomicModel:
        """The model with its bounding-box centre at the origin."""
        lo, hi = self.positions.min(axis=0), self.positions.max(axis=0)
        return replace(self, positions=self.positions - 0.5 * (lo + hi))

    def rotated(self, rotation: Rotation) -> AtomicModel:
        """Rotated about its centroid (``rotation`` acts on (x, y, z) vectors)."""
        c = self.positions.mean(axis=0)
        xyz = (self.positions - c)[:, ::-1]
        return replace(self, positions=rotation.apply(xyz)[:, ::-1] + c)

    def randomly_oriented(self, rng: np.random.Generator) -> AtomicModel:
        return self.rotated(Rotation.random(random_state=rng))

    def without_hydrogens(self) -> AtomicModel:
        return replace(self, hydrogens=np.zeros_like(self.hydrogens))


def resolve_sample(sample: str | os.PathLike[str]) -> Path:
    """A sample name (``hemoglobin`` …) or a path → the structure file."""
    path = Path(sample)
    if path.exists():
        return path
    name = str(sample).lower()
    if name not in SAMPLES:
        raise ValueError(
            f"unknown sample {str(sample)!r}: give a PDB/mmCIF path or one of {sorted(SAMPLES)}"
        )
    fname = SAMPLES[name][0]
    packaged = resources.files("cryoptycho.gpu.sim").joinpath("data", fname)
    if packaged.is_file():
        return Path(str(packaged))
    folder = os.environ.get(STRUCTURES_ENV)
    if folder and (Path(folder) / fname).exists():
        return Path(folder) / fname
    raise FileNotFoundError(
        f"sample {name!r} needs {fname}, which is not shipped with the package; put it in a folder "
        f"and point ${STRUCTURES_ENV} at it"
    )


def load_model(
    sample: str | os.PathLike[str], hydrogens: bool = True, keep_waters: bool = False
) -> AtomicModel:
    """Read the first model of a PDB/mmCIF file (or a named sample), add hydrogens."""
    path = resolve_sample(sample)
    try:
        st = gemmi.read_structure(str(path))  # PDB or mmCIF, gzipped or not
    except RuntimeError as exc:  # gemmi's "Unknown format of X." reached the user as a traceback
        raise ValueError(f"{path}: not a PDB or mmCIF file gemmi can read ({exc})") from None
    if len(st) == 0:
        raise ValueError(f"{path}: the structure has no models")
    st.setup_entities()
    if not keep_waters:
        st.remove_waters()
    st.remove_empty_chains()
    pos, elem, occ, res_id, has_h, res_names, linked = [], [], [], [], [], [], []
    rid = 0
    for chain in st[0]:
        polymer = chain.get_polymer()
        n_poly = len(polymer)
        for i_res, res in enumerate(chain):
            rid += 1
            in_polymer = i_res < n_poly and res.entity_type == gemmi.EntityType.Polymer
            # links of this residue in its chain: 2 inside, 1 at a chain end
            linked.append(0 if not in_polymer or n_poly < 2 else (1 if i_res in (0, n_poly - 1) else 2))
            res_names.append(res.name)
            for atom in res:
                if atom.element.name in ("H", "D"):
                    has_h.append(rid)
                    continue
                p = atom.pos
                pos.append((p.z, p.y, p.x))
                elem.append(atom.element.name)
                occ.append(atom.occ)
                res_id.append(rid)
    if not pos:
        raise ValueError(f"{path}: no heavy atoms in the first model")
    positions_a = np.asarray(pos, dtype=np.float64)
    elements = np.asarray(elem)
    check_elements(np.unique(elements))
    res_id_arr = np.asarray(res_id)
    h = (
        _riding_hydrogens(positions_a, elements, res_id_arr, res_names, linked, set(has_h))
        if hydrogens
        else np.zeros(len(elements))
    )
    mass = np.array([gemmi.Element(e).weight for e in elements]) + h * gemmi.Element("H").weight
    volume_m3 = mass * _DALTON_G * PARTIAL_SPECIFIC_VOLUME * 1e-6
    return AtomicModel(
        positions=positions_a * 1e-10,
        elements=elements,
        occupancy=np.asarray(occ, dtype=np.float64),
        hydrogens=h,
        volume=volume_m3,
        name=path.name.split(".")[0],
    )


def _riding_hydrogens(
    positions_a: np.ndarray,
    elements: np.ndarray,
    res_id: np.ndarray,
    res_names: list[str],
    linked: list[int],
    residues_with_h: set[int],
) -> np.ndarray:
    """Hydrogen count per heavy atom (see the module docstring)."""
    tree = cKDTree(positions_a)
    pairs = tree.query_pairs(BOND_CUTOFF_A, output_type="ndarray")
    neighbours = np.bincount(pairs.ravel(), minlength=len(elements))
    valence = np.array([VALENCE.get(e, 0) for e in elements])
    free = np.clip(valence - neighbours, 0, None).astype(np.float64)
    h = free.copy()
    # Per residue: rescale the free-valence shares to the tabulated count.
    order = np.argsort(res_id, kind="stable")
    bounds = np.flatnonzero(np.diff(res_id[order])) + 1
    for group in np.split(order, bounds):
        rid = int(res_id[group[0]])
        if rid in residues_with_h:
            # The model places this residue's H explicitly (skipped on reading): the plain
            # valence rule puts them back at their heavy atoms.
            continue
        info = gemmi.find_tabulated_residue(res_names[rid - 1])
        if info is None or info.hydrogen_count <= 0:
            continue
        target = max(info.hydrogen_count - linked[rid - 1], 0)
        share = free[group]
        total = share.sum()
        h[group] = share * (target / total) if total > 0 else 0.0
    return h
