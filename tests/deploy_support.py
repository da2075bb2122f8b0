"""Readers shared by the deploy tests: Dockerfiles, systemd units, env files, YAML, config checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dockerfile as dockerfile_parser
import pytest
import yaml
from cryoptycho.daemon.config import ServiceConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SITE_TOML = DEPLOY / "config" / "cryoptycho.toml"


def dockerfile(path: Path) -> tuple[Any, ...]:
    """The instructions of a Dockerfile, parsed by BuildKit's own parser (``dockerfile`` package):
    each has ``cmd`` (upper case), ``flags``, ``value`` (arguments) and ``json`` (exec form)."""
    return tuple(dockerfile_parser.parse_file(str(path)))


def final_stage(instructions: tuple[Any, ...]) -> tuple[Any, ...]:
    last_from = max(i for i, c in enumerate(instructions) if c.cmd == "FROM")
    return instructions[last_from:]


def docker_env(instructions: tuple[Any, ...]) -> dict[str, str]:
    """Every ENV key=value of the final stage."""
    env: dict[str, str] = {}
    for c in final_stage(instructions):
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    return env


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section → key → values (keys may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}:{n}: not 'Key=Value' inside a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_text(text: str) -> dict[str, str]:
    """KEY=VALUE lines (an EnvironmentFile)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            out[key] = value
    return out


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def config_with_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> ServiceConfig:
    """The daemon's configuration with ``env`` set and the site TOML loaded, as deployed.

    Also checks that every CRYOPTYCHO_* variable took effect, i.e. the TOML (which wins over the
    environment) does not silently override a per-instance setting.
    """
    for key in list(__import__("os").environ):
        if key.startswith("CRYOPTYCHO_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_config(SITE_TOML)
    for key, value in env.items():
        if not key.startswith("CRYOPTYCHO_"):
            continue
        node: Any = config
        for part in key.removeprefix("CRYOPTYCHO_").lower().split("__"):
            assert hasattr(node, part), f"{key}: no such setting"
            node = getattr(node, part)
        assert str(node) == value, f"{key}={value} is overridden (config has {node!r})"
    return config


def port(endpoint: str) -> int:
    match = re.fullmatch(r"tcp://[^:]+:(\d+)", endpoint)
    assert match, f"not a tcp endpoint with a port: {endpoint}"
    return int(match.group(1))


def default_ports() -> dict[str, int]:
    """The daemon's own default ports (from its settings model, not copied here)."""
    fields = ServiceConfig.model_fields
    return {
        "ingest": port(fields["ingest"].default),
        "publish": port(fields["publish"].default),
        "control": port(fields["control"].default),
        "metrics": int(fields["metrics_port"].default),
    }


def seconds(text: str) -> float:
    """A systemd time span ("15min", "30s", "1h 30min", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 1e-3}
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        assert unit in units, f"unknown time unit {unit!r} in {text!r}"
        total += float(value) * units[unit]
    return total
