"""`cryoptycho bench view`: how fresh the browser viewer's images are and what it costs the daemon.

One simulated scan is streamed through the live service (the same run as `bench live`) once per
browser count — by default 0, 1 and 5 headless Chromium pages on `cryoptycho view`. Reported side
by side from the same run:

* frames/s folded into the model while streaming, and its ratio to the run without browsers
  (target: no measurable drop);
* the daemon's frame → preview latency p50/p95;
* publish → drawn: from the daemon publishing a preview to the page having drawn it (object,
  probe and scale bar), p50/p95 over every preview every page drew (target p95 ≤ 300 ms on
  loopback). The page records it in ``window.cryoptychoDraws``; daemon and browser share this
  host's clock.

Needs Chromium, ChromeDriver (Debian: ``apt-get install chromium chromium-driver``) and selenium
(in the ``test`` extra); paths can be set with ``CRYOPTYCHO_CHROMIUM`` / ``CRYOPTYCHO_CHROMEDRIVER``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

#: Flags for a root, headless, offline Chromium (no background connections to a closed network).
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--hide-scrollbars", "--window-size=1400,1020",
)


class BrowserUnavailable(RuntimeError):
    """Chromium, ChromeDriver or selenium is missing; the message says what to install."""


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or :class:`BrowserUnavailable` naming what is missing."""
    chromium = os.environ.get("CRYOPTYCHO_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("CRYOPTYCHO_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    if missing:
        raise BrowserUnavailable(f"{' and '.join(missing)} not found: install Debian's chromium and "
                                 "chromium-driver, or set CRYOPTYCHO_CHROMIUM / CRYOPTYCHO_CHROMEDRIVER")
    return chromium, driver  # type: ignore[return-value]


def open_browser(url: str, profile_dir: Path) -> Any:
    """A headless Chromium (selenium WebDriver) showing ``url``; ``profile_dir`` must be empty."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed: pip install -e '.[test]'") from None
    chromium, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.get(url)
    return driver


def draw_delays(driver: Any) -> list[float]:
    """Seconds from publish to drawn of every preview the page drew."""
    draws = driver.execute_script("return window.cryoptychoDraws || []")
    return [d["drawn_s"] - d["published_s"] for d in draws if d.get("published_s")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def viewer_server(publish: str, control: str, timeout_s: float = 30.0,
                  cli: Sequence[str] = (sys.executable, "-m", "cryoptycho.daemon.cli")) -> Iterator[str]:
    """Run `cryoptycho view` for a daemon as a subprocess; yields its URL once it answers.
    ``cli``: the command that runs the CLI (a test's may set module constants first)."""
    port = _free_port()
    cmd = [*cli, "view", "--publish", publish, "--control", control, "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_until_up(proc, log, url, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(proc: subprocess.Popen, log: Any, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"cryoptycho view exited (rc {proc.returncode}):\n{log.read()}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cryoptycho view did not answer on {url} in {timeout_s:g} s") from None
            time.sleep(0.1)


def run_with_browsers(data: Any, browsers: int, rate: float, refine_s: float, iterations: int,
                      workdir: Path) -> dict[str, Any]:
    """One `bench live` run with ``browsers`` pages open on a viewer of the service."""
    from .live import run_live

    stack = contextlib.ExitStack()
    drivers: list[Any] = []

    def attach(endpoints: dict[str, str]) -> None:
        if not browsers:
            return
        url = stack.enter_context(viewer_server(endpoints["publish"], endpoints["control"]))
        for i in range(browsers):
            profile = workdir / f"browser-{i}"
            profile.mkdir()
            driver = open_browser(url, profile)
            stack.callback(driver.quit)
            drivers.append(driver)

    with stack:
        figures = run_live(data, rate, refine_s, iterations, workdir / "live", on_ready=attach)
        delays = [d for driver in drivers for d in draw_delays(driver)]
    figures["browsers"] = browsers
    figures["previews_drawn"] = len(delays)
    figures["draw_p50_s"] = float(np.percentile(delays, 50)) if delays else None
    figures["draw_p95_s"] = float(np.percentile(delays, 95)) if delays else None
    return figures


@click.command()
@click.option("--browsers", default="0,1,5", show_default=True, help="Browser counts to compare.")
@click.option("--frame-size", type=int, default=64, show_default=True)
@click.option("--margin", "margin_m", type=float, default=6e-9, show_default=True,
              help="Ice around the particle, m (sets the number of positions).")
@click.option("--dose", type=float, default=20.0, show_default=True, help="e⁻/Å².")
@click.option("--rate", type=float, default=500.0, show_default=True, help="Frames/s streamed.")
@click.option("--refine-s", type=float, default=5.0, show_default=True, help="Refinement budget after scan end.")
@click.option("--iterations", type=int, default=20, show_default=True, help="Refinement CG iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def command(browsers: str, frame_size: int, margin_m: float, dose: float, rate: float, refine_s: float,
            iterations: int, seed: int, as_json: bool) -> None:
    """Browser viewer: publish → drawn latency, and the daemon's fold rate with 0, 1, 5 pages."""
    from .live import _simulate

    try:
        counts = [int(b) for b in browsers.split(",")]
    except ValueError:
        raise click.BadParameter(f"{browsers!r}: comma-separated whole numbers", param_hint="--browsers") from None
    if any(c < 0 for c in counts):
        raise click.BadParameter("browser counts must be ≥ 0", param_hint="--browsers")
    try:
        find_browser()
        import selenium  # noqa: F401
    except (BrowserUnavailable, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    console = Console(stderr=as_json)
    with console.status("simulating…"):
        data = _simulate(frame_size, margin_m, dose, seed)
    runs = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp, console.status(f"{n} browser(s): streaming…"):
            runs.append(run_with_browsers(data, n, rate, refine_s, iterations, Path(tmp)))
    base = next((r["fold_frames_per_s"] for r in runs if r["browsers"] == 0), None)
    for r in runs:
        r["fold_ratio_to_no_browser"] = (r["fold_frames_per_s"] / base
                                         if base and r["fold_frames_per_s"] else None)
    if as_json:
        click.echo(json.dumps(runs, indent=2, default=float))
        return
    table = Table(title=f"bench view — {len(data.frames)} frames of {frame_size}×{frame_size} at "
                        f"{rate:g} frames/s")
    for col in ("browsers", "folded/s", "÷ none", "folded by scan end", "frame→preview p50/p95 s",
                "publish→drawn p50/p95 s", "drawn"):
        table.add_column(col, justify="right")

    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in runs:
        table.add_row(str(r["browsers"]), fmt(r["fold_frames_per_s"], ".0f"),
                      fmt(r["fold_ratio_to_no_browser"], ".2f"),
                      f"{r['frames_used_at_scan_end']} / {r['frames']}",
                      f"{fmt(r['latency_p50_s'], '.3f')} / {fmt(r['latency_p95_s'], '.3f')}",
                      f"{fmt(r['draw_p50_s'], '.3f')} / {fmt(r['draw_p95_s'], '.3f')}",
                      str(r["previews_drawn"]))
    console.print(table)
    console.print("targets: publish→drawn p95 ≤ 0.3 s; no measurable drop of the fold rate")
