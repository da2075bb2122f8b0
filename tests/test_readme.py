"""The README is what a new user follows: its commands must exist and its code must run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from cryoptycho.daemon.cli import COMMANDS, main
from cryoptycho.daemon.storage.dataset import read_dataset
from cryoptycho.daemon.storage.result import read_result
from cryoptycho.gpu import operators
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.probes import make_probe
from engine_helpers import nrmse, scored_region, weak_phase_object

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_starts_with_the_demo_and_the_ci_test_command() -> None:
    first = README.split("```", 2)[1]
    commands = [line for line in first.splitlines()[1:] if line.strip()]
    assert commands == ["pip install -e . && cryoptycho demo",
                        'pip install -e ".[test]" && python -m pytest -q']
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci


def test_every_command_the_readme_names_exists() -> None:
    code = "\n".join(re.findall(r"`([^`\n]+)`", README) + _blocks("bash"))
    named = set(re.findall(r"(?:^|[\s&])cryoptycho ([a-z][a-z0-9-]+)", code, flags=re.MULTILINE))
    assert {"demo", "serve", "reconstruct"} <= named
    unknown = named - set(COMMANDS)
    assert not unknown, f"README names commands the CLI lacks: {sorted(unknown)}"
    benches = set(re.findall(r"cryoptycho bench ([a-z0-9]+)", code))
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    for name in benches:
        assert name in result.output, f"bench {name} is in the README but not in `bench --help`"
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["cryoptycho"]:
                help_ = CliRunner().invoke(main, [words[1], "--help"])
                assert help_.exit_code == 0, line
                for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                    assert flag in help_.output, f"README uses {flag} that `{words[1]}` lacks: {line}"


def test_the_five_minute_walkthrough_names_the_files_the_daemon_writes() -> None:
    """It said ``hb.h5 (+ .mrc, .png)``: a user looking for ``hb.mrc`` found ``hb.phase.mrc``."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.storage.outputs import output_paths

    section = README.split("## Live service in five minutes")[1].split("\n## ")[0]
    cfg = ServiceConfig()
    written = output_paths(Path(cfg.results_dir.name) / "hb", cfg.output_formats).values()
    named = set(re.findall(r"`([^`\s]+\.(?:h5|mrc|png))`", section.split("The result lands in")[1].split(";")[0]))
    assert {p.name for p in written} == {Path(n).name for n in named}, named
    assert f"`{Path(cfg.results_dir.name) / 'hb.h5'}`" in section


def test_the_dataset_snippet_writes_a_file_the_engine_reconstructs(tmp_path, monkeypatch) -> None:
    """Run the README's h5py example on a simulated high-dose scan, then reconstruct the file it
    wrote with the probe model it declares: the object must come out right."""
    pixel, m = 0.8e-10, 32
    probe = make_probe("defocused", (m, m), pixel, 300e3, 9.2e-3, 40e-9, precision="double",
                       total_intensity=2e5)
    rng = np.random.default_rng(3)
    iy, ix = np.mgrid[0:8, 0:8]
    positions = np.stack([iy.ravel(), ix.ravel()], axis=1) * 3.0 * pixel
    positions += rng.uniform(-0.3, 0.3, positions.shape) * pixel
    geometry = fit_geometry(positions, pixel, (m, m))
    truth = weak_phase_object(geometry.object_shape, seed=3)
    batch = operators.make_batch(geometry.to_pixels(positions), geometry.object_shape, (m, m))
    frames = operators.from_fft_order(rng.poisson(np.abs(operators.forward(truth, probe, batch)) ** 2))
    frames = frames.astype(np.uint16)

    snippet = next(b for b in _blocks("python") if "cryoptycho-dataset" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {"frames": frames, "positions": positions})  # noqa: S102 (the README's own code)

    data = read_dataset(tmp_path / "scan.h5")
    np.testing.assert_array_equal(data.frames, frames)
    assert data.probe_model is not None and data.probe_model.kind == "defocused"

    result = CliRunner().invoke(main, ["reconstruct", "scan.h5", "-o", "out.h5", "-n", "30",
                                       "--fixed-probe", "--no-export", "-q"])
    assert result.exit_code == 0, result.output
    obj = read_result(tmp_path / "out.h5").state.object
    region = scored_region(truth, 6)
    assert nrmse(obj, truth, region) < 0.1
