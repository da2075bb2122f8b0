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
