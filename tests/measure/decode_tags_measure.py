"""CPU µs per DECTRIS Stream V2 message of the CBOR decode, a baseline revision's
``protocols/dectris/decode.py`` against this tree's, side by side in one process (paired,
interleaved blocks on this thread's CPU clock, medians; the paired ratio is what to read on a
shared box): the decoding workers' image path (``split_v2_image``), ``decode_v2`` of an image
(the bridge) and of a start. Also the image path had every image been loaded with the tag hook
and read field by field (the alternative not taken).

    python tests/measure/decode_tags_measure.py --baseline-rev 3b547f3
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _baseline(rev: str, where: Path):
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:protocols/dectris/decode.py"],
                          check=True, capture_output=True, text=True).stdout
    path = where / "decode_baseline.py"
    path.write_text(text)
    # a module of the same package, so that its relative imports resolve to this tree's
    spec = importlib.util.spec_from_file_location("cryoptycho.protocols.dectris._decode_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@click.command()
@click.option("--baseline-rev", default="3b547f3", show_default=True, help="Revision of the 'before' decode.py.")
@click.option("--side", default=192, show_default=True, help="Detector side (bslz4 uint16 images).")
@click.option("--rounds", default=80, show_default=True, help="Interleaved blocks of 64 messages per variant.")
def main(baseline_rev: str, side: int, rounds: int) -> None:
    from cryoptycho.protocols.dectris import decode as here
    from cryoptycho.protocols.dectris.sim import SimSeries, v2_messages

    with tempfile.TemporaryDirectory() as tmp:
        before = _baseline(baseline_rev, Path(tmp))
    frames = np.random.default_rng(0).poisson(0.05, (64, side, side)).astype(np.uint16)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [8, 8], "step_m": [2e-10, 2e-10]}}}
    msgs = list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user)))
    images, start = msgs[1:-1], msgs[0]

    def hooked(raw: bytes) -> object:
        return here._checked_image(here._parse_v2(raw), "threshold_1")

    same = [before.split_v2_image(m, "threshold_1") for m in images]
    if same != [here.split_v2_image(m, "threshold_1") for m in images] or same != [hooked(m) for m in images] \
            or before.decode_v2(start) != here.decode_v2(start):
        raise SystemExit("the two decoders differ")
    cases: dict[str, dict[str, Callable[[], object]]] = {
        "split_v2_image": {"before": lambda: [before.split_v2_image(m, "threshold_1") for m in images],
                           "after": lambda: [here.split_v2_image(m, "threshold_1") for m in images],
                           "hook on every image": lambda: [hooked(m) for m in images]},
        "decode_v2 image": {"before": lambda: [before.decode_v2(m, ("threshold_1",)) for m in images],
                            "after": lambda: [here.decode_v2(m, ("threshold_1",)) for m in images]},
        "decode_v2 start": {"before": lambda: [before.decode_v2(start) for _ in range(64)],
                            "after": lambda: [here.decode_v2(start) for _ in range(64)]},
    }
    for name, fns in cases.items():
        res: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds):
            for k in (list(fns) if r % 2 else list(fns)[::-1]):
                c = time.thread_time_ns()
                fns[k]()
                res[k].append((time.thread_time_ns() - c) / 64 / 1e3)
        line = f"{name}: before {statistics.median(res['before']):.2f} µs"
        for k in list(fns)[1:]:
            ratio = statistics.median(b / a for a, b in zip(res["before"], res[k]))
            line += f"; {k} {statistics.median(res[k]):.2f} µs (paired ratio {ratio:.3f})"
        click.echo(line)


if __name__ == "__main__":
    sys.exit(main())
