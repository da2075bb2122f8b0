"""Subcommands of the `cryoptycho` CLI; each module exposes one click command or group."""
