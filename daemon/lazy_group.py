"""One lazy click group for the CLI and its sub-groups (``cryoptycho`` and ``cryoptycho bench``).

Subcommands are imported only when used, so ``--help`` stays fast and a broken optional part
(a missing extra) shows its import error when that subcommand runs instead of taking the whole
command line down.
"""

from __future__ import annotations

import ast
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

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The list of subcommands in ``--help``, as click writes it, from each module's source:
        importing every subcommand for its one-line help made ``cryoptycho --help`` import the
        whole service (about 2 s). A module whose command the source does not describe plainly
        is imported as before."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self._described(name) or self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])

    def _described(self, name: str) -> click.Command | None:
        """A stand-in carrying the help of subcommand ``name`` (the docstring of the module's
        ``def command``, as click takes it), or None unless its decorators are one
        ``click.command``/``click.group`` (no help, short help, hidden or deprecated flag) and
        options."""
        spec = importlib.util.find_spec(f"{self.package}.{self.modules[name]}")
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return None
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "command":
                break
        else:
            return None
        kinds = [_decorator(d) for d in node.decorator_list]
        if kinds.count("command") != 1 or any(k is None for k in kinds):
            return None
        return click.Command(name, help=ast.get_docstring(node, clean=False))


def _decorator(node: ast.expr) -> str | None:
    """"command" for ``@click.command(...)``/``@click.group(...)`` without keywords that change
    the listing, "option" for ``@click.option``/``@click.argument``/``@click.version_option``,
    None for anything else."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    if not isinstance(node.func.value, ast.Name) or node.func.value.id != "click":
        return None
    attr = node.func.attr
    if attr in ("option", "argument", "version_option", "help_option", "pass_context"):
        return "option"
    listing = {"short_help", "hidden", "deprecated", "help"}  # the listing uses the group's name
    plain = all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
    if attr in ("command", "group") and plain and not any(k.arg in listing or k.arg is None for k in node.keywords):
        return "command"
    return None
