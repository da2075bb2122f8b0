"""`cryoptycho watch`: follow a daemon's scans in the terminal (rich progress bars).

Subscribes to the publish socket (latest-only: a slow terminal skips stale previews), seeds the
table from the control socket (``list_scans``) so scans that started earlier show up too, and
with ``--save-dir`` writes each scan's latest preview phase and its final result as PNG.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import zmq
from cryoptycho.protocols.client import InvalidEndpoint, check_endpoint
from cryoptycho.protocols.control import DEFAULT_CONTROL, ControlClient
from cryoptycho.protocols.errors import ControlError, ControlTimeout
from cryoptycho.protocols.security import ClientCurve
from cryoptycho.protocols.subscriber import DEFAULT_PUBLISH, EventsDropped, Subscriber
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

#: previews written to --save-dir at most this often per scan (the daemon sends up to 5 Hz)
SAVE_EVERY_S = 1.0
#: bars of ended scans kept on screen (the newest); running scans always keep theirs
ENDED_BARS = 10
ENDED = ("finished", "failed", "aborted")
#: scans whose bar was dropped, remembered (the newest) so that a late event of theirs does not
#: bring the bar back; the daemon itself remembers 256 scans
DROPPED_MEMORY = 1024
#: events that begin a scan's life: a scan re-opened by `finish_scan` is announced again
STARTS = ("accepted", "acquiring")


def save_phase_png(phase: np.ndarray, path: Path) -> Path:
    """8-bit PNG of a phase image (mean removed, 0.5–99.5 % stretch)."""
    from PIL import Image

    ph = np.asarray(phase, dtype=np.float64)
    ph = ph - np.mean(ph)
    lo, hi = np.percentile(ph, [0.5, 99.5])
    scaled = np.clip((ph - lo) / max(hi - lo, 1e-12), 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((scaled * 255).round().astype(np.uint8)).save(path)
    return path


class Board:
    """One progress bar per scan, fed by published events."""

    def __init__(self, progress: Progress, save_dir: Path | None) -> None:
        self.progress = progress
        self.save_dir = save_dir
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, int | None] = {}
        self.saved_at: dict[str, float] = {}
        self.results = 0
        self.ended: list[str] = []  #: scans with a bar that have ended, oldest first
        #: scans whose bar was dropped (:meth:`_ended`), oldest first: their late events (a
        #: metrics or result after the end, a repeated end) made a new bar that never went
        self.dropped: dict[str, None] = {}

    def task(self, scan_id: str, total: int | None = None) -> TaskID:
        if scan_id not in self.tasks:
            self.tasks[scan_id] = self.progress.add_task(scan_id, total=total, info="announced")
        elif total is not None:
            self.progress.update(self.tasks[scan_id], total=total)
        return self.tasks[scan_id]

    def seed(self, scans: list[dict[str, Any]]) -> None:
        for s in scans:
            if not self.progress.console.is_terminal:  # (as on_event: a line, not a bar)
                received, expected = s.get("frames", {}).get("received", 0), s.get("expected_frames")
                of = "" if expected is None else f" of {expected}"
                self.progress.console.print(f"{s['scan_id']}: {s.get('state', '')} ({received}{of} frames received)",
                                            soft_wrap=True, markup=False)
            tid = self.task(s["scan_id"], s.get("expected_frames"))
            self.progress.update(tid, completed=s.get("frames", {}).get("received", 0), info=s.get("state", ""))
            if s.get("state") in ENDED:
                self._ended(s["scan_id"])

    def _ended(self, scan_id: str) -> None:
        """Drop the bars of all but the newest ENDED_BARS ended scans. A watch left open kept a
        bar for every scan, and rich renders every bar at each refresh (10 Hz): after a few
        hundred scans it took a whole core of the daemon's host."""
        if scan_id in self.ended:
            return
        self.ended.append(scan_id)
        while len(self.ended) > ENDED_BARS:
            old = self.ended.pop(0)
            self.progress.remove_task(self.tasks.pop(old))
            self.totals.pop(old, None)
            self.saved_at.pop(old, None)
            self.dropped[old] = None
            while len(self.dropped) > DROPPED_MEMORY:
                del self.dropped[next(iter(self.dropped))]

    def _late(self, scan_id: str, event: str | None = None) -> bool:
        """Whether an event of ``scan_id`` comes after its bar was dropped (then it changes no
        bar); a start (:data:`STARTS`: re-opened by `finish_scan`) gives it a bar again."""
        if scan_id not in self.dropped:
            return False
        if event in STARTS:
            del self.dropped[scan_id]
            return False
        return True

    def on_event(self, ev: Any) -> None:
        kind = type(ev).__name__
        scan_id = getattr(ev, "scan_id", None)
        if kind == "ErrorEvent":
            self.progress.console.print(f"[red]error[/red] {ev.scan_id or ''} {ev.field}: {ev.message} [{ev.rule}]")
            return
        if scan_id is None:
            return
        if kind == "ScanEvent":
            if not self.progress.console.is_terminal:
                # no live bars off a terminal (a pipe, a log file, the journal): one line per event
                self.progress.console.print(f"{scan_id}: {ev.event}" + (f": {ev.reason}" if ev.reason else ""),
                                            soft_wrap=True, markup=False)
            if self._late(scan_id, ev.event):
                return
            tid = self.task(scan_id, ev.info.get("expected_frames"))
            self.progress.update(tid, info=ev.event + (f": {ev.reason}" if ev.reason else ""))
            if ev.event in ENDED:
                self._ended(scan_id)
        elif kind == "Metrics":
            if self._late(scan_id):
                return
            tid = self.task(scan_id)
            loss = "—" if ev.loss is None else f"{ev.loss:.3g}"
            res = "—" if ev.resolution_m is None else f"{ev.resolution_m * 1e10:.1f} Å"
            self.progress.update(tid, completed=ev.frames_received,
                                 info=f"{ev.state} it {ev.iteration} loss {loss} res {res}")
        elif kind == "Preview" and self.save_dir is not None:
            now = time.monotonic()
            if now - self.saved_at.get(scan_id, 0.0) >= SAVE_EVERY_S:
                self.saved_at[scan_id] = now
                save_phase_png(ev.object_phase, self.save_dir / f"{scan_id}.preview.png")
        elif kind == "Result":
            self.results += 1
            if not self.progress.console.is_terminal:
                self.progress.console.print(f"{scan_id}: result " + ", ".join(str(p) for p in (ev.files or {}).values()),
                                            soft_wrap=True, markup=False)
            if self.save_dir is not None:
                path = save_phase_png(np.angle(ev.object), self.save_dir / f"{scan_id}.result.png")
                self.progress.console.print(f"{scan_id}: final image → {path}")
            if self._late(scan_id):  # counted and saved all the same
                return
            tid = self.task(scan_id)
            task = self.progress.tasks[self.progress.task_ids.index(tid)]
            if task.total is not None:
                self.progress.update(tid, completed=task.total)


@click.command()
@click.option("--publish", default=DEFAULT_PUBLISH, show_default=True, help="Daemon publish endpoint.")
@click.option("--control", default=DEFAULT_CONTROL, show_default=True,
              help="Daemon control endpoint (to list scans that started before we joined).")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each scan's latest preview and final phase here (PNG).")
@click.option("--exit-after-results", type=int, default=0,
              help="Exit after this many final results (0 = run until Ctrl-C).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds (0 = never).")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: this client's .key_secret file (needs --server-key; `cryoptycho keys`).")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CURVE: the daemon's public server.key file.")
def command(publish: str, control: str, save_dir: Path | None, exit_after_results: int, timeout: float,
            client_key: Path | None, server_key: Path | None) -> None:
    """Follow the daemon's scans: progress, loss and resolution, live."""
    if (client_key is None) != (server_key is None):
        raise click.BadParameter("give both --client-key and --server-key, or neither")
    curve = ClientCurve(client_key, server_key) if client_key and server_key else None
    console = Console()
    # off a terminal (a pipe, a log file, the journal) the Board prints lines; a live display
    # there drew nothing while it ran and, at the exit, the bars as they last were (stale)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=console, disable=not console.is_terminal)
    board = Board(progress, save_dir)
    try:  # a typo in either endpoint is a usage error, not a traceback
        for option, endpoint, kind in (("--publish", publish, zmq.SUB), ("--control", control, zmq.DEALER)):
            check_endpoint(endpoint, kind)
    except InvalidEndpoint as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    with Subscriber(publish, curve=curve) as sub, progress:
        try:
            with ControlClient(control, timeout_s=2.0, retries=1, curve=curve) as ctl:
                board.seed(ctl.list_scans())
        except (ControlTimeout, ControlError) as exc:
            console.print(f"[yellow]no scan list from {control}: {exc} (is `cryoptycho serve` running? "
                          "watching for its events anyway)[/yellow]")
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while deadline is None or time.monotonic() < deadline:
            try:
                ev = sub.recv(timeout_s=0.5)
            except EventsDropped as exc:
                console.print(f"[yellow]{exc}[/yellow]")
                continue
            if ev is not None:
                board.on_event(ev)
            if exit_after_results and board.results >= exit_after_results:
                break
