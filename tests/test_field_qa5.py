"""Field QA, round 5: the package as a facility installs and drives it from outside — the oldest
dependency versions pyproject.toml allows, third-party senders written from the public protocol
documents, result files read by a downstream pipeline."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

#: The oldest release of a dependency that has what the code calls, found by installing the lower
#: bounds (uv pip install --resolution lowest-direct) and running the suite and the daemon on them.
NEEDED = {
    # cbor2 6.0.x's loads() takes bytes only: protocols/dectris/decode.py hands it a memoryview, and
    # with 6.0.0 the first Stream V2 message raised TypeError in the source thread and stopped `serve`
    "cbor2": ("6.1", "cbor2.loads(memoryview) in protocols/dectris/decode.py"),
    "pydantic-settings": ("2.7", "NoDecode in protocols/limits.py"),
}


def _lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for raw in project["dependencies"]:
        req = Requirement(raw)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            bounds[canonicalize_name(req.name)] = max(lows)
    return bounds


def test_declared_lower_bounds_have_the_apis_the_code_calls() -> None:
    bounds = _lower_bounds()
    short = [f"{name}>={bounds.get(name)} allows a release without {why} (needs >= {least})"
             for name, (least, why) in NEEDED.items() if bounds.get(name, Version("0")) < Version(least)]
    assert not short, "\n".join(short)
