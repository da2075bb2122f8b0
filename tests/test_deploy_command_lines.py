"""Every cryoptycho command line the deployment files give — the images' CMD, the systemd units'
ExecStart, the compose services' and Kubernetes containers' command/args, and the commands
deploy/README.md tells an operator to type — names a command and options the CLI has.

A renamed or misspelt option there fails only when the container or unit starts (click's "No
such option" in a crash-looping pod), and no other test runs those lines. Each line is parsed by
the command's own click parser, so an option given a value it does not take, or a value missing,
fails here too; nothing is run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from cryoptycho.daemon.cli import main
from deploy_support import DEPLOY, dockerfile, final_stage, unit_file, yaml_docs

IMAGE = re.compile(r"(^|/)cryoptycho(:|$)")  # the project's image, any tag or registry


def _readme_lines() -> list[tuple[str, list[str]]]:
    """``cryoptycho …`` lines of deploy/README.md's code blocks (continuations joined, comments cut)."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["cryoptycho"]:
                found.append((f"deploy/README.md: {shlex.join(words)}", words[1:]))
    return found


def _image_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted((DEPLOY / "docker").glob("Dockerfile*")):
        if path.suffix == ".dockerignore":
            continue
        stage = final_stage(dockerfile(path))
        (entry,) = [c.value for c in stage if c.cmd == "ENTRYPOINT"]
        (cmd,) = [c.value for c in stage if c.cmd == "CMD"]
        assert list(entry) == ["cryoptycho"], (path.name, entry)
        found.append((f"{path.name} CMD", list(cmd)))
    return found


def _unit_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        for line in unit_file(path)["Service"].get("ExecStart", []):
            words = shlex.split(line)
            assert Path(words[0]).name == "cryoptycho", (path.name, line)
            found.append((f"{path.name} ExecStart", words[1:]))
    return found


def _container_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(DEPLOY.glob("compose*.yaml")):
        for name, service in (yaml_docs(path)[0].get("services") or {}).items():
            if "command" in service and IMAGE.search(str(service.get("image", ""))):
                command = service["command"]
                found.append((f"{path.name} {name}", shlex.split(command) if isinstance(command, str) else command))
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml_docs(path):
            pod = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                # an image's own ENTRYPOINT is `cryoptycho`: args are its arguments unless
                # the container replaces the command
                if IMAGE.search(container.get("image", "")) and "args" in container and "command" not in container:
                    found.append((f"{path.name} {container['name']}", container["args"]))
    return found


LINES = _readme_lines() + _image_lines() + _unit_lines() + _container_lines()


def _parse(args: list[str]) -> None:
    """Resolve the subcommands and parse their options as click would, without running anything.
    Values are not converted (a path the line names need not exist here, an env var need not be
    set), but every option must exist, take a value where one is given, and get one where needed."""
    command: click.Command = main
    name = "cryoptycho"
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"no command {name} {args[0]}"
        command, name, args = sub, f"{name} {args[0]}", args[1:]
    ctx = click.Context(command, info_name=name)
    parser = command.make_parser(ctx)
    _, rest, _ = parser.parse_args(list(args))
    positional = [p for p in command.params if isinstance(p, click.Argument)]
    takes_more = sum(p.nargs if p.nargs > 0 else len(rest) for p in positional)
    assert len(rest) <= takes_more, f"{name}: unexpected arguments {rest}"


def test_the_command_line_collection_finds_each_kind_of_file() -> None:
    kinds = {where.split()[0].rstrip(":") for where, _ in LINES}
    assert {"deploy/README.md", "Dockerfile", "Dockerfile.cpu", "cryoptycho@.service",
            "cryoptycho-broker.service", "compose.yaml", "statefulset.yaml", "broker.yaml"} <= kinds, kinds


@pytest.mark.parametrize(("where", "args"), LINES, ids=[w for w, _ in LINES])
def test_every_deployed_command_line_parses_with_the_cli(where: str, args: list[str]) -> None:
    try:
        _parse(list(args))
    except click.UsageError as err:  # NoSuchOption, BadOptionUsage, ...
        pytest.fail(f"{where}: {err.format_message()}")


@pytest.mark.parametrize("line", [["serve", "--confg", "x.toml"], ["broker", "--backends=tcp://h:1"],
                                  ["view", "--port"], ["nosuch"], ["serve", "extra"]])
def test_the_parser_check_refuses_what_the_cli_refuses(line: list[str]) -> None:
    """The check itself fails on a misspelt option, a missing value, an unknown command and a
    stray argument (what click refuses at start)."""
    with pytest.raises((click.UsageError, AssertionError)):
        _parse(line)
