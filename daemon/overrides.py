"""``--set KEY=VALUE`` overrides of the reconstruction options, shared by the commands that take
them (`reconstruct`, `batch`): values are JSON when they parse, else strings; dotted keys nest."""

from __future__ import annotations

import json
from typing import Any

import click


def parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    """``("mu0=0.05", "stream.batch_size=32")`` → nested override dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise click.BadParameter(f"{key!r} nests under a non-section", param_hint="--set")
        node[parts[-1]] = value
    return out
