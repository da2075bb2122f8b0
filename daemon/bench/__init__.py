"""Benchmarks behind `cryoptycho bench …`; each module exposes one click command."""
