"""`cryoptycho bench NAME`: benchmarks, each a module in cryoptycho.daemon.bench."""

from __future__ import annotations

import click

from ..lazy_group import LazyGroup

#: benchmark name → module under cryoptycho.daemon.bench exposing ``command``
BENCHES = {"engine": "engine", "paper": "paper", "live": "live", "protocol": "protocol", "bm3d": "bm3d", "view": "view", "dectris": "dectris", "gpu": "gpu", "fuzz": "fuzz"}


@click.group(cls=LazyGroup, package="cryoptycho.daemon.bench", modules=BENCHES)
def command() -> None:
    """Benchmarks; every figure is a ratio measured side by side in one run."""
