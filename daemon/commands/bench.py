"""`cryoptycho bench NAME`: benchmarks, each a module in cryoptycho.daemon.bench."""

from __future__ import annotations

import importlib
import importlib.util

import click

#: benchmark name → module under cryoptycho.daemon.bench exposing ``command``
BENCHES = {"engine": "engine", "paper": "paper", "live": "live", "protocol": "protocol", "bm3d": "bm3d", "view": "view", "dectris": "dectris", "fuzz": "fuzz"}


class _BenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, m in BENCHES.items() if _exists(m))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = BENCHES.get(name)
        if mod is None or not _exists(mod):
            return None
        return importlib.import_module(f"cryoptycho.daemon.bench.{mod}").command


def _exists(mod: str) -> bool:
    return importlib.util.find_spec(f"cryoptycho.daemon.bench.{mod}") is not None


@click.group(cls=_BenchGroup)
def command() -> None:
    """Benchmarks; every figure is a ratio measured side by side in one run."""
