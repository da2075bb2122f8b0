"""The `cryoptycho` command line: one click group, one module per subcommand.

Each module in :mod:`cryoptycho.daemon.commands` named in ``COMMANDS`` exposes a click command
(or group) called ``command``; they are imported lazily so that ``cryoptycho --help`` stays fast
and a broken optional part cannot take the whole CLI down silently (its import error is shown
when that subcommand is used).
"""

from __future__ import annotations

import atexit
import gc
import os

import click

from .lazy_group import LazyGroup

# The interpreter's last garbage collections at exit walk every object the imports made (NumPy,
# SciPy, pydantic's schemas): 0.15-0.2 s of CPU at the end of every command, daemon and test
# subprocess. Frozen, they are skipped. Registered first, this runs after every other exit handler
# (the ZeroMQ contexts' termination, logging's flush), so what they close is closed.
atexit.register(gc.freeze)
# pydantic loads every installed plugin (entry-point group "pydantic") when it builds its first
# model: logfire's (installed with pydantic-ai, e.g. by ptychodus) imports logfire, OpenTelemetry,
# rich and requests — 0.3 s of CPU at every command and daemon start, for instrumentation that
# only a logfire.configure() in the process would turn on, and no command calls it. Set before
# any command module builds a model; an explicit PYDANTIC_DISABLE_PLUGINS wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "logfire-plugin")

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
    "dectris-bridge": "dectris_bridge",
    "broker": "broker",
}


@click.group(
    cls=LazyGroup,
    package="cryoptycho.daemon.commands",
    modules=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="cryoptycho")
def main() -> None:
    """cryoptycho — live low-dose electron ptychography."""


if __name__ == "__main__":
    main()
