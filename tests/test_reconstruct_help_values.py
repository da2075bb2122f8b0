"""What `cryoptycho reconstruct --help` offers must be taken: --alpha-h said "inf disables", while
every reconstruction option has had to be finite since non-finite options are refused (a
user following the help got "alpha_h: Input should be a finite number")."""

from __future__ import annotations

import math
import re

from click.testing import CliRunner
from cryoptycho.daemon.cli import main
from cryoptycho.gpu.options import ReconOptions


def test_the_alpha_h_help_names_only_values_the_options_take() -> None:
    run = CliRunner().invoke(main, ["reconstruct", "--help"], terminal_width=200)
    assert run.exit_code == 0, run.output
    line = next(text for text in run.output.splitlines() if "--alpha-h" in text)
    if re.search(r"\binf\b", line):  # the help offers it: it must be valid
        ReconOptions(alpha_h=math.inf)
    assert "--truncation none" in line, line  # the way to disable the truncation, named
