"""`cryoptycho bench protocol` runs end to end into a real daemon (producer process → ingest
socket → spool → frame store) through the console script, and reports what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def test_bench_protocol_end_to_end_into_the_daemon() -> None:
    cmd = ["cryoptycho", "bench", "protocol", "--no-decode", "--batch", "64", "--daemon-frames", "8192",
           "--daemon-codec", "none", "--no-live"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    row = re.search(r"^\s*64\s+none\s+paused\s+first\s+([\d,]+)\s+([\d,]+)\s+([\d,.]+)((?:\s+[\d,.]+){5})"
                    r"\s+([\d,.]+)\s+([\d,]+)\s*$", out, re.MULTILINE)
    assert row, out
    received, stored, cpu, producer, cap = (float(row[i].replace(",", "")) for i in (1, 2, 3, 5, 6))
    # every frame was spooled and counted, then stored (the run waits for both): rates exist, and
    # storing comes after receiving, so its rate cannot be the higher one
    assert received > 0 and 0 < stored <= received and cpu > 0 and producer > 0
    assert cap == pytest.approx(2e6 / (cpu + producer), rel=0.01, abs=1)  # the rounded figures it says it divides
    if sys.platform == "linux":  # per-thread CPU from /proc: the roles that did the work show
        roles = dict(zip(("receive", "manager", "spool", "compress", "worker"),
                         (float(x.replace(",", "")) for x in row[4].split()), strict=True))
        # /proc counts CPU in 10 ms ticks: the manager's ≈ 2 µs per frame stays within one or
        # two ticks (over 1,024 frames it read 0.0 in a CI run), so only the roles that spend
        # ≥ 10 µs per frame (≥ 8 ticks over 8,192 frames) are asserted one by one
        assert roles["receive"] > 0 and roles["compress"] > 0 and roles["worker"] > 0, out
        # first touches of fresh memory by thread: the worker's frame store is fresh memory
        faults = {scan: re.search(rf"^\s*64\s+none\s+paused\s+{scan}\s+receive ([\d.]+) manager ([\d.]+) "
                                  r"spool ([\d.]+) compress ([\d.]+) worker ([\d.]+) other ([\d.]+)$", out, re.MULTILINE)
                  for scan in ("first", "next", "ahead")}
        assert faults["first"] and faults["next"] and faults["ahead"], out
        # the first scan's frame store is fresh memory (4.5 pages per 96×96 uint16 frame), faulted
        # in by the worker or by the store's prefaulter ahead of it (an ended thread: "other");
        # the next scan's reuses the first one's (frame_store_reuse_bytes), in memory already
        assert float(faults["first"][5]) + float(faults["first"][6]) > 2 and float(faults["next"][5]) < 1, out
        # ahead: a first scan whose daemon faulted the store's memory in at start (frame_store_warm_bytes)
        assert float(faults["ahead"][5]) < 1, out
    for scan in ("next", "ahead"):
        assert re.search(rf"^\s*64\s+none\s+paused\s+{scan}\s+[\d,]+\s+[\d,]+\s", out, re.MULTILINE), out
    for stage in ("validate + decode", "ledger", "spool write", "spool compress", "frame store append",
                  "engine add_frames"):
        assert re.search(rf"^\s+{re.escape(stage)}.*\s[\d.]+$", out, re.MULTILINE), (stage, out)


@pytest.mark.skipif(sys.platform != "linux", reason="page faults by thread are read from /proc")
def test_bench_protocol_next_scan_alone_reuses_the_warm_up_scans_store() -> None:
    """``--scan next`` in a fresh process (how the figures are taken: one kind per run): the
    measured scan follows a warm-up scan that is aborted, whose close takes its frame store's
    rows and lets go of them after. The clock starts once it has, so the measured scan's store
    reuses that memory: neither the worker nor a prefaulter (an ended thread: "other") faults
    in fresh pages (4.4 a frame when the clock started before the close let go: a close of
    32,768 frames outlasted the measured scan's start; of 4,096–16,384 it did not)."""
    cmd = ["cryoptycho", "bench", "protocol", "--no-decode", "--batch", "256", "--daemon-frames", "32768",
           "--daemon-codec", "none", "--no-live", "--scan", "next"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    faults = re.search(r"^\s*256\s+none\s+paused\s+next\s+receive ([\d.]+) manager ([\d.]+) "
                       r"spool ([\d.]+) compress ([\d.]+) worker ([\d.]+) other ([\d.]+)$", out, re.MULTILINE)
    assert faults, out
    assert float(faults[5]) < 1 and float(faults[6]) < 1, out
