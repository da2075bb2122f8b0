"""``cryoptycho --help`` lists the subcommands without importing them (daemon/lazy_group.py):
the listing is the one click writes from the imported commands, and no command module is loaded;
``serve --help`` and ``demo --help`` do not load the service or its settings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import click
import pytest
from cryoptycho.daemon.cli import main
from cryoptycho.daemon.commands.bench import command as bench


@pytest.mark.parametrize("group", [main, bench], ids=["cryoptycho", "bench"])
@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_listing_read_from_the_sources_is_the_one_click_writes(group: click.Group, width: int) -> None:
    ctx = click.Context(group, info_name="cryoptycho")
    lazy, eager = click.HelpFormatter(width=width), click.HelpFormatter(width=width)
    group.format_commands(ctx, lazy)
    click.Group.format_commands(group, ctx, eager)  # imports every subcommand
    assert lazy.getvalue() == eager.getvalue()
    assert all(name in lazy.getvalue() for name in group.list_commands(ctx))


@pytest.mark.parametrize(("args", "commands"), [(["--help"], []), (["serve", "--help"], ["serve"]),
                                                    (["demo", "--help"], ["demo"])])
def test_help_imports_neither_other_commands_nor_the_service(args: list[str], commands: list[str]) -> None:
    script = textwrap.dedent(f"""
        import sys
        from cryoptycho.daemon.cli import main
        try:
            main({args!r})
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print(sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("cryoptycho.daemon.commands.")))
        print([m for m in ("cryoptycho.daemon.service", "cryoptycho.daemon.config") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    *_, modules, heavy = out.stdout.strip().splitlines()
    assert (modules, heavy) == (repr(commands), "[]"), out.stdout
