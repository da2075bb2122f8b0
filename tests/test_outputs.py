"""One place saves the outputs of a reconstruction (storage/outputs.py): one naming scheme,
formats from the configuration; and only the CLI imports the command modules."""

from __future__ import annotations

import ast
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from cryoptycho.daemon.config import load_config
from cryoptycho.daemon.storage.outputs import check_formats, save_outputs, stem_of
from cryoptycho.daemon.storage.result import centred_phase, read_result
from cryoptycho.gpu.geometry import ScanGeometry
from cryoptycho.gpu.state import ReconState
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _state() -> ReconState:
    rng = np.random.default_rng(3)
    obj = np.exp(1j * 0.3 * rng.standard_normal((24, 32))).astype(np.complex64)
    geometry = ScanGeometry(pixel_size=2e-10, origin=(0.0, 0.0), object_shape=obj.shape, probe_shape=(8, 8))
    return ReconState(object=obj, probe=np.ones((8, 8), np.complex64), geometry=geometry, energy=300e3)


def test_save_outputs_writes_every_format_under_one_stem(tmp_path: Path) -> None:
    state = _state()
    stem = tmp_path / "sub" / "scan.a.b"  # dots in a scan id are part of the stem
    written = save_outputs(stem, state, extra={"note": "x"})
    assert {k: p.name for k, p in written.items()} == {
        "result": "scan.a.b.h5", "phase_mrc": "scan.a.b.phase.mrc", "phase_png": "scan.a.b.phase.png"}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(p.name for p in written.values())
    res = read_result(written["result"])
    np.testing.assert_allclose(res.state.object, state.object)
    assert res.extra["note"] == "x"
    with mrcfile.open(written["phase_mrc"]) as mrc:
        np.testing.assert_allclose(mrc.data, centred_phase(state.object), atol=1e-6)
        assert np.isclose(float(mrc.voxel_size.x), 2.0)  # Å
    png = np.asarray(Image.open(written["phase_png"]))
    assert png.shape == state.object.shape and png.dtype == np.uint8 and png.max() == 255 and png.min() == 0


def test_formats_choose_the_outputs_and_the_result_is_always_written(tmp_path: Path) -> None:
    written = save_outputs(tmp_path / "r", _state(), formats=["h5", "png"])
    assert set(written) == {"result", "phase_png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.phase.png"]
    with pytest.raises(ValueError, match="lack 'h5'"):
        check_formats(["mrc"])
    with pytest.raises(ValueError, match=r"unknown output format\(s\) \['tiff'\]"):
        check_formats(["h5", "tiff"])
    assert stem_of("out/x.result.h5") == Path("out/x.result") and stem_of("out/x.hdf") == Path("out/x.hdf")


def test_output_formats_is_a_service_configuration_key(tmp_path: Path) -> None:
    assert load_config(None).output_formats == ("h5", "mrc", "png")
    toml = tmp_path / "c.toml"
    toml.write_text('output_formats = ["h5", "mrc"]\n')
    assert load_config(toml).output_formats == ("h5", "mrc")
    toml.write_text('output_formats = ["png"]\n')
    with pytest.raises(ValueError, match="output_formats"):
        load_config(toml)


def _imported_modules(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a module of the daemon package."""
    package = ("cryoptycho", *path.relative_to(ROOT).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            # `from pkg import mod` imports pkg.mod when mod is a module
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def test_only_the_cli_imports_the_command_modules() -> None:
    """Library code lives outside daemon/commands/: no library module, benchmark or command
    imports a command module; only the CLI (cli.py, through the lazy group) does."""
    commands = "cryoptycho.daemon.commands"
    offenders = set()
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        if path == ROOT / "daemon" / "cli.py":
            continue
        for line, module in _imported_modules(path, ast.parse(path.read_text(), str(path))):
            if module.startswith(commands + ".") and module != commands + ".__init__":
                offenders.add(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert sorted(offenders) == [], "only daemon/cli.py imports daemon/commands/*"


def test_reconstruct_and_batch_write_the_formats_asked_for(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryoptycho.daemon.cli import main
    from cryoptycho.daemon.storage.dataset import write_dataset
    from engine_helpers import synthetic_dataset

    dataset = write_dataset(tmp_path / "in" / "d.h5", synthetic_dataset(2000.0, m=16, grid=4, step_px=3.0, seed=1))
    runner = CliRunner()
    base = ["-n", "1", "--fixed-probe", "-q"]
    out = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(tmp_path / "a" / "r.h5"), *base,
                               "--formats", "h5,png"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["r.h5", "r.phase.png"]
    out = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(tmp_path / "b" / "r.h5"), *base])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["r.h5", "r.phase.mrc", "r.phase.png"]
    bad = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(tmp_path / "c.h5"), *base, "--formats", "png"])
    assert bad.exit_code == 2 and "lack 'h5'" in bad.output
    bad = runner.invoke(main, ["reconstruct", str(dataset), "-o", str(tmp_path / "c.h5"), *base,
                               "--formats", "h5", "--no-export"])
    assert bad.exit_code == 2 and "not both" in bad.output
    out = runner.invoke(main, ["batch", str(tmp_path / "in"), "-o", str(tmp_path / "batch"), "--threads",
                               "--set", "iterations=1", "--formats", "h5,mrc", "-q"])
    assert out.exit_code == 0, out.output
    assert {p.name for p in (tmp_path / "batch").iterdir()} == {
        "d.result.h5", "d.result.phase.mrc", "batch-summary.json"}
