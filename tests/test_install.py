"""The package as a user installs it: a wheel built from the files the container images copy,
installed into a fresh virtual environment outside the checkout, used through its console script.

The rest of the suite runs on an editable install, which maps the source folders into place and
so hides what a regular install lacks: a subpackage or data file left out of the wheel, an
import only the editable finder satisfies, a dependency that is not declared. A regular install
once failed on every command while the whole suite passed.

The environment is made with ``--system-site-packages`` so the dependencies the test extra
already installed are reused (nothing is downloaded: the wheel is installed with
``--no-index``); modules are checked to load from the environment, never from the checkout.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import h5py
import pytest
from cryoptycho.daemon.cli import COMMANDS
from cryoptycho.daemon.commands.bench import BENCHES
from cryoptycho.protocols.control import ControlClient
from daemon_support import wait_for
from deploy_support import DEPLOY, ROOT, dockerfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: source folder → the subpackage it installs as (pyproject.toml [tool.setuptools] package-dir)
PACKAGES = {"gpu": "cryoptycho.gpu", "protocols": "cryoptycho.protocols", "daemon": "cryoptycho.daemon"}
#: tracked under a package folder, used by nobody at run time: not expected in the wheel
NOT_SHIPPED = {"daemon/web/viewer.png"}  # the README's screenshot
#: tracked, but of no use to whoever builds or tests from the source distribution
NOT_IN_SDIST = {".gitignore"}
IMAGES = (DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cpu")
TIMEOUT_S = 120

pytestmark = pytest.mark.subprocess


def _build_copies(path: Path) -> list[str]:
    """Sources the image's build stage COPYs from the build context before it installs."""
    ins = dockerfile(path)
    second_from = [i for i, c in enumerate(ins) if c.cmd == "FROM"][1]
    return [src for c in ins[:second_from] if c.cmd == "COPY" and not c.flags for src in c.value[:-1]]


def _source_files() -> list[Path]:
    """Every file under the package folders (relative to the root), caches excluded."""
    return sorted(
        p.relative_to(ROOT) for folder in PACKAGES for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _installed_name(rel: Path) -> str:
    """``gpu/sim/x.py`` → ``cryoptycho/gpu/sim/x.py`` (the wheel's path)."""
    return "/".join(("cryoptycho", *PACKAGES[rel.parts[0]].split(".")[1:], *rel.parts[1:]))


def _module_name(rel: Path) -> str:
    parts = [*PACKAGES[rel.parts[0]].split("."), *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} → rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


class Install:
    """A virtual environment holding the wheel, and how to run its commands as a user would."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.venv = root / "venv"
        self.bin = self.venv / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.cwd = root / "work"  # outside the checkout: nothing of it is importable from here
        self.cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.env = {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(self.venv),
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return _run([*args], cwd=self.cwd, env=self.env)

    def cryoptycho(self, *args: str) -> subprocess.CompletedProcess:
        """The console script, as a user types it."""
        return self.run(str(self.bin / "cryoptycho"), *args)

    def site_packages(self) -> Path:
        out = self.run(str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    # Build from exactly what the CPU image copies: a file the build needs but the image leaves
    # out fails here, not in a container build.
    src = root / "src"
    src.mkdir()
    for name in _build_copies(DEPLOY / "docker" / "Dockerfile.cpu"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), str(src)])
    (built,) = (root / "dist").glob("cryoptycho-*.whl")
    return built


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source distribution as `python -m build --sdist` makes it from the checkout's tracked
    files (in an isolated build environment, as the wheel fixture's `pip wheel` builds). Built
    from a copy: setuptools writes cryoptycho.egg-info/ beside pyproject.toml, which in the
    checkout would be a second "cryoptycho" distribution on the path of `python -m pytest`."""
    pytest.importorskip("build", reason="the `build` frontend (test extra) makes the sdist")
    root = tmp_path_factory.mktemp("sdist")
    src = root / "src"
    for name in _tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(root / "dist"), str(src)])
    (built,) = (root / "dist").glob("cryoptycho-*.tar.gz")
    return built


@pytest.fixture(scope="module")
def install(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Install:
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    # --without-pip: Debian's Python lacks ensurepip; the pip of the site packages serves
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()}")
    inst = Install(root, wheel)
    # the dependencies are those `pip install -e ".[test]"` installed (checked below, as pip's
    # resolver would: resolving them again over the site packages costs seconds)
    inst.run(str(inst.python), "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel))
    return inst


def test_installed_wheel_finds_every_requirement_it_declares(install: Install) -> None:
    script = """
import importlib.metadata as md
from packaging.requirements import Requirement
for raw in md.requires("cryoptycho"):
    req = Requirement(raw)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's, or another Python's
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print(f"missing: {raw}")
        continue
    if not req.specifier.contains(have, prereleases=True):
        print(f"{raw}: {have} installed")
"""
    out = install.run(str(install.python), "-c", script)
    assert not out.stdout.strip(), out.stdout


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = {_installed_name(p) for p in _source_files() if p.as_posix() not in NOT_SHIPPED}
    assert not expected - names, f"left out of the wheel: {sorted(expected - names)}"
    # the data the code opens at run time, named here so a glob change cannot drop it unnoticed
    for needed in ("cryoptycho/daemon/web/static/index.html", "cryoptycho/daemon/web/static/app.js",
                   "cryoptycho/gpu/sim/data/4HHB.pdb.gz", "cryoptycho/protocols/PROTOCOL.md"):
        assert needed in names
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "cryoptycho = cryoptycho.daemon.cli:main" in zf.read(entry_points).decode()


def _tracked_files() -> set[str]:
    """The checkout's files as git tracks them (a clean clone's, as CI builds from)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    out = _run([git, "-C", str(ROOT), "ls-files", "-z"])
    return {name for name in out.stdout.split("\0") if name and (ROOT / name).is_file()}


def test_sdist_holds_every_tracked_file_and_builds_the_same_wheel(sdist: Path, wheel: Path) -> None:
    """A packager builds and tests from the sdist alone. setuptools puts the packages and
    tests/test*.py in it but not the helpers those tests import (conftest.py, daemon_support.py,
    ...), the deployment files or CI's entry point: the suite of an unpacked sdist failed at
    collection. The wheel built from the sdist holds what the checkout's wheel holds."""
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        top = {m.name.split("/", 1)[0] for m in members}
        assert top == {sdist.name.removesuffix(".tar.gz")}, top
        names = {m.name.split("/", 1)[1] for m in members}
        unpacked = sdist.parent / "unpacked"
        # the "data" filter (refuses links and paths out of the folder) exists from 3.10.12 / 3.11.4
        tf.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    missing = sorted(_tracked_files() - names - NOT_IN_SDIST)
    assert not missing, f"left out of the sdist: {missing}"
    stray = sorted(n for n in names if "__pycache__" in n or n.endswith(".pyc"))
    assert not stray, stray
    (src,) = unpacked.iterdir()
    dist = sdist.parent / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)])
    (from_sdist,) = dist.glob("cryoptycho-*.whl")
    with zipfile.ZipFile(from_sdist) as a, zipfile.ZipFile(wheel) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())


def test_every_folder_of_shipped_files_is_a_declared_package() -> None:
    """Each folder holding shipped files is listed in ``packages`` and its own ``package-data``
    globs name its data files. setuptools takes every importable folder for a package: data in an
    unlisted one (``static/``, ``data/`` globbed from the parent) is shipped today with a
    "Package ... is absent from the `packages` configuration" warning on every build and install,
    and "would be ignored" by a later setuptools. Read from pyproject.toml: no build needed."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {v: k for k, v in tool["package-dir"].items()} == PACKAGES
    declared = set(tool["packages"])
    package_data = tool["package-data"]
    problems = [f"package-data for {name}, which is not in packages" for name in package_data if name not in declared]
    problems += [f"package-data glob {glob!r} of {name} reaches into a subfolder: make that folder a package"
                 for name, globs in package_data.items() for glob in globs if "/" in glob]
    for rel in _source_files():
        if rel.as_posix() in NOT_SHIPPED:
            continue
        package = ".".join([PACKAGES[rel.parts[0]], *rel.parts[1:-1]])
        if package not in declared:
            problems.append(f"{rel}: its folder {package} is not in [tool.setuptools] packages")
        elif rel.suffix != ".py" and not any(fnmatch.fnmatch(rel.name, g) for g in package_data.get(package, [])):
            problems.append(f"{rel}: no [tool.setuptools.package-data] glob of {package} names it")
    assert not problems, "\n".join(problems)


def test_every_module_imports_from_the_installed_wheel(install: Install) -> None:
    modules = sorted({_module_name(p) for p in _source_files() if p.suffix == ".py"})
    script = ("import importlib, json, sys\n"
              "print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))")
    files = json.loads(install.run(str(install.python), "-c", script, *modules).stdout)
    site = install.site_packages().resolve()
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(site)}
    assert not outside, f"loaded from outside the installed wheel: {outside}"


def test_every_command_shows_its_help_from_the_console_script(install: Install) -> None:
    commands = [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS),
                *(["bench", name, "--help"] for name in BENCHES)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda args: install.cryoptycho(*args), commands))
    for args, out in zip(commands, outputs, strict=True):
        if args == ["--version"]:
            assert importlib.metadata.version("cryoptycho") in out.stdout, out.stdout
        else:
            assert out.stdout.startswith("Usage: cryoptycho"), (args, out.stdout)
        assert "Traceback" not in out.stderr, (args, out.stderr)
    listed = outputs[0].stdout.split("Commands:")[1]
    assert all(f"  {name} " in listed for name in COMMANDS), listed


def test_simulate_serve_replay_from_the_installed_command(install: Install) -> None:
    work = install.cwd
    install.cryoptycho("simulate", "--dose", "10", "--frame-size", "16", "--pixel-size", "1.6", "--semiangle",
                       "4.6", "--thin", "--ice", "8", "-o", str(work / "tiny.h5"))
    log = work / "serve.log"  # a file, not a pipe: a pipe nobody reads would block a chatty daemon
    serve = subprocess.Popen(
        [str(install.bin / "cryoptycho"), "serve", "--ingest", "tcp://127.0.0.1:*", "--publish",
         "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0", "--spool-dir",
         str(work / "spool"), "--results-dir", str(work / "results"), "--set", "options.iterations=3"],
        cwd=work, env=install.env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )
    try:
        ready = json.loads(serve.stdout.readline() or "{}")
        assert ready.get("event") == "ready", (serve.wait(TIMEOUT_S), log.read_text())
        install.cryoptycho("replay", str(work / "tiny.h5"), "--ingest", ready["ingest"],
                          "--control", ready["control"], "--rate", "0")
        def ended() -> list:
            assert serve.poll() is None, log.read_text()
            scans = [s for s in ctl.list_scans() if s["scan_id"] == "tiny"]
            return scans if any(s["state"] in ("finished", "failed") for s in scans) else []

        with ControlClient(ready["control"], timeout_s=10) as ctl:
            scans = wait_for(ended, TIMEOUT_S, "the replayed scan to end")
        (scan,) = scans
        assert scan["state"] == "finished" and scan["frames"]["received"] == scan["expected_frames"], scan
        with h5py.File(scan["result_path"]) as f:
            assert f["object"].ndim == 2
        assert {p.name for p in (work / "results").iterdir()} >= {"tiny.h5", "tiny.phase.mrc", "tiny.phase.png"}
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=TIMEOUT_S)
    assert serve.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_view_on_port_zero_and_ports_in_use_from_the_installed_command(install: Install) -> None:
    """`view --port 0` binds before it prints (the URL said port 0 when uvicorn bound it after),
    and its page and static files come from the wheel; a port in use is a usage error naming
    the option, for the viewer and for serve, not uvicorn's or zmq's bare "address in use"."""
    import urllib.request

    view = subprocess.Popen([str(install.bin / "cryoptycho"), "view", "--port", "0"], cwd=install.cwd,
                            env=install.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = view.stdout.readline()
        assert line.startswith("cryoptycho viewer on http://127.0.0.1:"), (line, view.poll())
        url = line.split()[3]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert port > 0, line
        page = urllib.request.urlopen(url, timeout=TIMEOUT_S).read().decode()
        assert 'src="static/app.js"' in page, page[:400]
        for asset in ("static/app.js", "static/style.css"):
            assert urllib.request.urlopen(url + asset, timeout=TIMEOUT_S).status == 200, asset
        def refused(*args: str) -> subprocess.CompletedProcess:  # (install.cryoptycho asserts success)
            return subprocess.run([str(install.bin / "cryoptycho"), *args], cwd=install.cwd, env=install.env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S, check=False)

        again = refused("view", "--port", str(port))
        said = " ".join(again.stderr.split())
        assert again.returncode == 2 and "Traceback" not in said, again.stderr
        assert f"cannot serve the viewer on 127.0.0.1:{port}" in said and "--port" in said, again.stderr
        served = refused("serve", "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*",
                         "--control", f"tcp://127.0.0.1:{port}", "--metrics-port", "0",
                         "--spool-dir", str(install.cwd / "spool"), "--results-dir", str(install.cwd / "results"))
        said = " ".join(served.stderr.split())
        assert served.returncode == 1 and "Traceback" not in said, served.stderr
        assert f"cannot bind control socket to tcp://127.0.0.1:{port}" in said and "--control" in said, said
    finally:
        view.send_signal(signal.SIGTERM)
        view.communicate(timeout=TIMEOUT_S)


@pytest.mark.parametrize("image", IMAGES, ids=lambda p: p.name)
def test_images_install_the_same_way(image: Path) -> None:
    """Each container image builds from the files the wheel test builds from, with a regular
    (not editable) install, so what passes here is what the image holds."""
    assert sorted(_build_copies(image)) == sorted(_build_copies(DEPLOY / "docker" / "Dockerfile.cpu"))
    installs = [c.value[0] for c in dockerfile(image) if c.cmd == "RUN" and "pip install" in c.value[0]]
    project = [cmd for cmd in installs if " ." in cmd or ' ".[' in cmd]
    assert project, installs
    assert not any(" -e " in cmd or "--editable" in cmd for cmd in installs), installs


# -- declared dependencies ------------------------------------------------------------------------

#: module names whose distribution is named otherwise and is not installed here (CUDA-specific)
PROVIDED_BY = {"cupy": ("cupy-cuda12x", "cupy-cuda13x"), "cupyx": ("cupy-cuda12x", "cupy-cuda13x")}
#: imported without an ImportError guard, but only on the CuPy path, which needs a CUDA extra
CUPY_PATH_ONLY = {"cupyx"}


def _imports(tree: ast.AST) -> list[tuple[str, bool, int]]:
    """(top-level module, guarded, line) of every absolute import; guarded = inside a ``try``
    that catches ImportError. Imports under ``if TYPE_CHECKING`` never run and are skipped."""
    found: list[tuple[str, bool, int]] = []

    def catches_import_error(node: ast.Try) -> bool:
        names = set()
        for h in node.handlers:
            for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]):
                names.add(getattr(t, "id", getattr(t, "attr", None)))
        return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], guarded, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded, node.lineno))
        if isinstance(node, ast.Try):
            for child in node.body:
                visit(child, guarded or catches_import_error(node))
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def _names(requirements: list[str]) -> set[str]:
    """Distribution names the requirements bring, an extra's own requirements included
    (``dask[distributed]`` brings ``distributed``)."""
    names = set()
    for raw in requirements:
        req = Requirement(raw)
        names.add(canonicalize_name(req.name))
        for extra in req.extras:
            try:
                brought = importlib.metadata.requires(req.name) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            names |= {canonicalize_name(Requirement(r).name) for r in brought
                      if Requirement(r).marker is not None and Requirement(r).marker.evaluate({"extra": extra})}
    return names


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A module the package imports unconditionally comes from a required dependency (for every
    Python the project declares); an optional one from an extra, and the file that uses it
    imports it behind an ImportError guard somewhere (the clear "install the extra" error)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = _names(project["dependencies"])
    optional = _names([r for reqs in project["optional-dependencies"].values() for r in reqs])
    installed = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for rel in _source_files():
        if rel.suffix != ".py":
            continue
        imports = _imports(ast.parse((ROOT / rel).read_text(encoding="utf-8")))
        checked = {module for module, guarded, _ in imports if guarded} | CUPY_PATH_ONLY
        for module, _, line in imports:
            if module in stdlib or module == "cryoptycho":
                continue
            dists = {canonicalize_name(d) for d in PROVIDED_BY.get(module, installed.get(module, [module]))}
            allowed = required | optional if module in checked else required
            if not dists & allowed:
                kind = "optional" if module in checked else "required"
                problems.append(f"{rel}:{line}: import {module} ({'/'.join(sorted(dists))}) is not a declared "
                                f"{kind} dependency")
    assert not problems, "\n".join(problems)


def test_required_dependencies_hold_for_every_declared_python() -> None:
    """A marker may narrow a required dependency only to the Pythons whose standard library
    lacks the module (tomli until tomllib in 3.11); none may leave a supported Python without it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = project["requires-python"].removeprefix(">=")
    assert lowest == "3.10", "update the backports below with the lowest supported Python"
    backports = {"tomli": "tomllib"}
    for raw in project["dependencies"]:
        req = Requirement(raw)
        if req.marker is None:
            continue
        name = canonicalize_name(req.name)
        assert name in backports, f"{raw}: only standard-library backports may carry a marker"
        for version, needed in (("3.10", True), ("3.11", False)):
            env = {"python_version": version, "python_full_version": f"{version}.0"}
            assert req.marker.evaluate(env) is needed, f"{raw} on Python {version}: {backports[name]} backport"
