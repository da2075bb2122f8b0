"""Source trees for the before/after measurement scripts: a revision exported from git, and a
shim that maps the ``cryoptycho`` namespace onto a tree (put on PYTHONPATH of a child)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def shim(root: Path, where: Path) -> Path:
    """A folder whose ``cryoptycho`` package is ``root``'s gpu/, protocols/, daemon/."""
    pkg = where / "cryoptycho"
    pkg.mkdir(parents=True)
    for sub in ("gpu", "protocols", "daemon"):
        (pkg / sub).symlink_to(root / sub)
    return where


def export(repo: Path, rev: str, where: Path) -> Path:
    """The package folders of revision ``rev`` of ``repo``, written under ``where``."""
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "gpu", "protocols", "daemon"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def baseline_and_here(repo: Path, rev: str, tmp: Path) -> dict[str, Path]:
    """Shims of revision ``rev`` and of the working tree ``repo``, by the names the scripts
    print: the two sides of a before/after run."""
    base = export(repo, rev, tmp / "base")
    return {f"baseline ({rev})": shim(base, tmp / "shim-base"), "this tree": shim(repo, tmp / "shim-here")}
