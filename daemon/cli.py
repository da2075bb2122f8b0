"""The `cryoptycho` command line: one click group, one module per subcommand.

Each module in :mod:`cryoptycho.daemon.commands` named in ``COMMANDS`` exposes a click command
(or group) called ``command``; they are imported lazily so that ``cryoptycho --help`` stays fast
and a broken optional part cannot take the whole CLI down silently (its import error is shown
when that subcommand is used).
"""

from __future__ import annotations

import importlib
import importlib.util

import click

#: subcommand name → module under cryoptycho.daemon.commands
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "serve": "serve",
    "reconstruct": "reconstruct",
    "simulate": "simulate",
    "evaluate": "evaluate",
    "replay": "replay",
    "watch": "watch",
    "view": "view",
    "keys": "keys",
    "bench": "bench",
    "batch": "batch",
    "dectris-sim": "dectris_sim",
    "broker": "broker",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, mod in COMMANDS.items() if _exists(mod))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = COMMANDS.get(name)
        if mod is None or not _exists(mod):
            return None
        module = importlib.import_module(f"cryoptycho.daemon.commands.{mod}")
        return module.command


def _exists(mod: str) -> bool:
    return importlib.util.find_spec(f"cryoptycho.daemon.commands.{mod}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cryoptycho")
def main() -> None:
    """cryoptycho — live low-dose electron ptychography."""


if __name__ == "__main__":
    main()
