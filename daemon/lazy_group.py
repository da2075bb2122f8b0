"""One lazy click group for the CLI and its sub-groups (``cryoptycho`` and ``cryoptycho bench``).

Subcommands are imported only when used, so ``--help`` stays fast and a broken optional part
(a missing extra) shows its import error when that subcommand runs instead of taking the whole
command line down.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click


class LazyGroup(click.Group):
    """A click group whose subcommands are modules exposing a click object named ``command``.

    ``modules`` maps each subcommand name to a module name under ``package``.
    """

    def __init__(self, *args: Any, package: str, modules: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.package = package
        self.modules = modules

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, mod in self.modules.items() if self._exists(mod))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = self.modules.get(name)
        if mod is None or not self._exists(mod):
            return None
        return importlib.import_module(f"{self.package}.{mod}").command

    def _exists(self, mod: str) -> bool:
        return importlib.util.find_spec(f"{self.package}.{mod}") is not None
