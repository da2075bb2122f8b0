"""The scan table of the service: admission, spooling, hand-over to workers, recovery, finishing.

Every method here runs on the manager thread except :meth:`ScanManager.finish_result` and
:meth:`ScanManager.worker_exited`, which workers call (they only touch files of their own scan
and a thread-safe queue).
"""

from __future__ import annotations

import errno
import functools
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from cryoptycho.gpu.backend import BackendUnavailable, free_device_bytes, get_xp
from cryoptycho.gpu.data import stated_source_size
from cryoptycho.gpu.engines import memory_estimate
from cryoptycho.gpu.geometry import implausible_energy
from cryoptycho.gpu.options import (
    ReconOptions,
    merge_overrides,
    source_modes_in_force,
    source_size_in_force,
)
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.schema import SCAN_ID_PATTERN
from cryoptycho.protocols.sources import DetectorFrames, RawChunks
from pydantic import ValidationError

from .config import ServiceConfig
from .logs import Bounded, named
from .metrics import ServiceMetrics
from .publisher import Outbox
from .scan import ScanSpec
from .session import Session, State
from .storage.diskspace import require_free_space
from .storage.journal import fsync_path, journal_path
from .storage.rawcopy import (
    PENDING_SUFFIX,
    RAW_COPY_WAIT_S,
    complete_raw_copy,
    copy_raw,
    mark_pending,
    open_spool_for_copy,
    pending_marker,
    pending_markers,
    read_pending,
    remove_marker,
)
from .storage.readcheck import check_spool_readable
from .storage.spool import (
    SpoolInUse,
    SpoolWriter,
    discard_half_created,
    discard_journal,
    empty_final_spools,
    file_stem,
    held_for_writing,
    hold_against_writers,
    mark_status,
    read_spool,
    remove_if_empty,
    repair_spool,
    spool_path,
    unfinished_spools,
)
from .worker import Cancel, EndOfScan, FrameBatch, Interrupt, ScanWorker

log = logging.getLogger("cryoptycho.scans")

#: finished sessions kept for `list_scans`/`status` after their worker exits
HISTORY = 256
#: ended scans whose last preview stays in memory for control `snapshot`; older ones keep their
#: summary only (a preview of a large canvas is tens of MB, and a finished scan's result file
#: holds its images)
FINAL_PREVIEWS = 8
#: frame bytes waiting for the spool thread above which the manager stops reading ingest
SPOOL_BACKLOG_BYTES = 64 << 20
#: seconds a finished scan's worker waits for its spool to be closed (the spool thread writes a
#: detector scan's binned frames then: ≈ 1 s per 16,000 96×96 frames on 2 cores), after every
#: append before it, before the result copies it
SPOOL_CLOSE_WAIT_S = 600.0
#: how often the pending raw copies are tried again (storage/rawcopy.py): each try is one refused open
RAW_RETRY_S = 2.0
#: how often a raw copy that failed (a full disk, the result moved away or held by root's chattr)
#: is tried again: its cause is an operator's to remove, and the next start is maybe weeks away
RAW_FAILED_RETRY_S = 60.0
#: looks at the spool and results directories (:meth:`ScanManager.off_manager`) waiting for the
#: file-checks thread at most; a receipt past it is answered ``file_checks_busy`` at once. Those
#: of one scan id wait as one look (a producer polling its scan's receipt asks the same): only
#: distinct ids count, so this is reached only where the file system stopped answering, and a
#: client flooding receipts then queued one stat job per request, without bound
FILE_CHECKS_QUEUED = 256


class _Pending(NamedTuple):
    """Frames of one message waiting for the spool thread."""

    frames: np.ndarray
    indices: np.ndarray
    positions: np.ndarray
    arrived: float
    worker: ScanWorker | None
    #: the bslz4 bytes the frames were decoded from, written to the spool as they are
    wire: object | None = None


class ScanRefused(ValueError):
    """A scan_start that cannot be accepted; ``field`` and ``rule`` name the reason."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(f"{field}: {message} [rule {rule}]")
        self.field, self.rule, self.message = field, rule, message


def estimate_bytes(spec: ScanSpec, options: ReconOptions) -> int:
    """Memory of one engine of the scan, by options.algorithm's own estimate (frame store,
    object, probe, work buffers); the caller counts the engines a scan runs."""
    return memory_estimate(
        options, frame_shape=spec.frame_shape, frame_dtype=spec.frame_dtype,
        n_frames=spec.expected_frames or options.stream.initial_capacity, field_px=spec.field_px(),
    ).total


def _delete_spool_file(spool_file: Path, missing_ok: bool = False) -> None:
    """Delete a retired spool (its result holds its frames, on disk), the deletion on disk too:
    lost to a power loss, the spool came back ``ended`` beside its result, and the next start
    reconstructed the scan again — or, its raw-pending marker removed next, as a scan to recover."""
    spool_file.unlink(missing_ok=missing_ok)
    try:
        fsync_path(spool_file.parent)
    except OSError as exc:
        # the result is on disk and the spool gone: failing the scan now said its frames were
        # kept in a spool that no longer existed. A power loss may bring the spool back (ended,
        # beside its result): nothing of the scan is lost
        log.error("deleted %s, but its directory's fsync failed (%s): a power loss may bring it back beside its "
                  "result", spool_file, exc)


class _SpoolClosed(threading.Event):
    """Set when an ended scan's spool close is over; ``error``: why it failed, if it did, and
    ``kept``: what became of its frames then (:meth:`ScanManager._kept_note`)."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None
        self.kept = ""


class ScanManager:
    def __init__(self, config: ServiceConfig, metrics: ServiceMetrics, outbox: Outbox) -> None:
        self.config = config
        self.metrics = metrics
        self.outbox = outbox
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.waiting: list[str] = []  #: accepted scans without a worker yet (FIFO)
        #: scan ids of a detector source's series being started: no max_queued_scans for them (a
        #: detector cannot send a refused series again; the spool is their queue)
        self.uncapped: set[str] = set()
        self.running: dict[str, ScanWorker] = {}
        self.spools: dict[str, SpoolWriter] = {}
        #: ended scans waiting for a worker, whose spool is closed meanwhile (:meth:`end_scan`) →
        #: that close: each open spool holds two file descriptors (HDF5 file, journal), and a
        #: detector's series wait in the spool however many there are (``uncapped``)
        self._parked: dict[str, _SpoolClosed] = {}
        self._exited: queue.SimpleQueue[Session] = queue.SimpleQueue()
        #: scan id → memory a cancelled scan's exited worker still holds for its spool's close
        #: (ScanWorker.held_bytes), counted by :meth:`reserved` until the close lets go of it
        #: (ids in ``_let_go``): its reservation ended with the worker, and admission over-committed
        self._lingering: dict[str, dict[str, int]] = {}
        self._let_go: queue.SimpleQueue[str] = queue.SimpleQueue()
        #: refused scan_starts (scan id → (time, reason)), newest last, for control `receipt`
        self.refused: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.stopping = False
        # Every spool operation runs on ONE thread, in the order the manager asked for it:
        # writing a large frames message takes ~10 ms per MiB, which would stall the manager
        # loop (and ping) for as long; one FIFO thread keeps appends, status changes, closes and
        # the hand-overs to workers that must follow them in order.
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="spool")
        #: closes the spools of ended scans (:meth:`_close_ended`), off the spool thread; scan id →
        #: that close (or the mark after it, :meth:`_after_close`), which later work on the file waits for
        self._closer = ThreadPoolExecutor(1, thread_name_prefix="spool-close")
        #: scan id → (spool, result) of results written without /raw (storage/rawcopy.py)
        self._raw_pending: dict[str, tuple[Path, Path]] = {}
        #: their copies (a detector scan's spool: gigabytes, minutes), on a thread of their own: on
        #: the closer they held up every later spool close, the finishes and the receipts waiting for them
        self._raw_copier = ThreadPoolExecutor(1, thread_name_prefix="raw-copy")
        self._raw_lock = threading.Lock()
        self._raw_retrying = False
        self._raw_tried = 0.0  #: when retry_raw_copies last tried (monotonic)
        #: scan id → (when, why, its cause) its pending copy last failed: tried again every
        #: RAW_FAILED_RETRY_S, logged again only when the cause changes
        self._raw_failed: dict[str, tuple[float, str, str]] = {}
        self._closing: dict[str, threading.Event] = {}
        #: scan id → what became of the frames of a scan whose spool close failed: its journal
        #: keeps them, and a re-open rebuilds the file (for the stop's report; written by the closer)
        self.unclosed: dict[str, str] = {}
        #: waiting scans, ended, whose closed spool another program held for writing when their
        #: turn came (:meth:`_spool_held`): passed over until it lets go, said once
        self._held_spools: set[str] = set()
        #: scan id → (when, its re-open): a started scan whose closed spool another program took
        #: for writing before the spool thread re-opened it (:meth:`_reopen_later`). These two
        #: under _raw_lock (the spool thread adds to them, the manager reads them)
        self._reopen_waiting: dict[str, tuple[float, Callable[[], None]]] = {}
        #: scan id → the shared lock admission took on its closed spool (:meth:`_spool_held`),
        #: held until the spool thread's re-open (:meth:`_unpark`) lets go of it as HDF5 takes its
        #: own: a program that opens the file for writing in between is refused, instead of holding up the
        #: started scan, and its worker slot, for as long as it keeps the file (under _raw_lock)
        self._admission_locks: dict[str, BinaryIO] = {}
        #: unfinished spools a start found held for writing by another program (:meth:`_recover_later`):
        #: path → when last looked at; and those let go of, being examined (manager thread only)
        self._held_at_start: dict[Path, float] = {}
        self._late_recoveries: dict[Path, Future[tuple[Any, int, SpoolWriter | None] | None]] = {}
        #: where those are examined: on the raw-copy thread they waited behind a detector spool's
        #: copy (gigabytes, minutes), its scan unrecovered all that while
        self._recoverer = ThreadPoolExecutor(1, thread_name_prefix="late-recovery")
        #: spool files :meth:`recover` refused (why logged there), for the stop's report
        self.unrecovered: set[Path] = set()
        #: scan id → set once the spool thread closed the spool of a scan whose worker has its end
        self._spool_closed: dict[str, _SpoolClosed] = {}
        self._disk.submit(lambda: None).result()  # its thread starts now, not in the first scan's step
        self._disk_backlog = 0
        self._disk_lock = threading.Lock()
        self._disk_failed: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        #: per scan, the frames waiting for an append the spool thread has not started (_append)
        self._appending: dict[str, list[_Pending]] = {}
        #: work the spool thread handed back to the manager thread (see :meth:`after_disk`)
        self._disk_done: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        #: scans being re-opened from their spool (control `finish_scan`) → who waits for it
        self._reopening: dict[str, list[Callable[[Session | None, Exception | None], None]]] = {}
        #: stopped scans whose worker has yet to exit → what runs once it has (see :meth:`reap`)
        self._after_exit: dict[str, list[Callable[[], None]]] = {}
        # Worker threads are started on this thread, not the manager's: Thread.start() waits
        # until the new thread runs, i.e. until the OS schedules it and it gets the interpreter
        # lock, which took 150-300 ms on a loaded host and held up ping for as long. Started
        # now, so that no manager step waits for this thread's own start either.
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="worker-start")
        #: where the spool and results directories are looked at for an id's files (a receipt's
        #: ``taken``): each is a stat, and on a slow or hung network file system it held the
        #: manager loop, every peer waiting (see :meth:`off_manager`)
        self._file_checks = ThreadPoolExecutor(1, thread_name_prefix="file-checks")
        #: key → who waits for its look, queued and not started (its waiters join it); with the
        #: count of looks queued, under _checks_lock (the file-checks thread takes them)
        self._checks_queued: dict[str, list[Callable[[Any, Exception | None], None]]] = {}
        self._checks_waiting = 0
        self._checks_lock = threading.Lock()
        self._launcher.submit(lambda: None).result()
        # the engine module is imported now rather than inside the first scan_start, where its
        # import (~50 ms) would hold up the manager loop; so are the algorithm plug-ins (their
        # entry points: another ~50 ms at the first scan's options)
        import cryoptycho.gpu.stream  # noqa: F401
        from cryoptycho.gpu.engines import available_engines

        available_engines()

        config.spool_dir.mkdir(parents=True, exist_ok=True)
        config.results_dir.mkdir(parents=True, exist_ok=True)
        metrics.queue_capacity.set(config.queue_capacity_frames)

    # -- scan lifecycle (manager thread) -------------------------------------------------------
    def start_scan(self, spec: ScanSpec, spool: SpoolWriter | None = None) -> Session:
        """Accept a scan or raise :class:`ScanRefused`; nothing is kept for a refused scan.
        ``spool``: its spool file, already made by :meth:`create_spool` (off this thread)."""
        try:
            # a spool made by create_spool was made after its maker's check of the id's files
            # (the service's, off this thread): no stat of them here
            _, need = self.admission(spec, own_spool=spool is not None, files=spool is None)
        except Exception as refusal:  # refused, or an internal error: the spool made for it is not kept
            if spool is not None:
                self._discard(spec.scan_id, spool, refusal)
            raise
        if spool is None:
            spool = self.create_spool(spec)
        session = Session(spec, need)
        self.refused.pop(spec.scan_id, None)
        self._register(session, spool)
        warnings = [w for w in (implausible_energy(spec.energy_eV),) if w]
        self.outbox.post("scan.accepted", {"scan_id": spec.scan_id, "memory_bytes": need,
                                           "expected_frames": spec.expected_frames,
                                           "warnings": warnings})
        log.info("scan accepted", extra={"scan_id": spec.scan_id, "memory_bytes": need})
        for warning in warnings:
            log.warning(warning, extra={"scan_id": spec.scan_id})
        return session

    def _discard(self, scan_id: str, spool: SpoolWriter, refusal: Exception) -> None:
        """Delete the spool made for a scan that is refused (``refusal``). A failure doing so is
        logged (with the refusal) and counted, never raised over it: the producer and the
        operator are told why the scan was refused, not that its empty spool would not close
        (which replaced the refusal with an internal error)."""
        try:
            spool.discard()
        except Exception as exc:
            note = (f"its spool {spool.path} could not be discarded ({type(exc).__name__}: {exc}); "
                    f"{'it is left on disk' if spool.path.exists() else 'its files are deleted'}")
            log.error("scan refused (%s); %s", refusal, note, exc_info=exc, extra={"scan_id": scan_id})
            self.metrics.internal_errors.labels(where="spool").inc()

    def remember_refusal(self, scan_id: str, reason: str) -> None:
        """Keep why a scan_start was refused, so that its producer can learn it (control
        ``receipt``); the service calls this for every refusal, at whichever step it happened."""
        self.refused[scan_id] = (time.time(), reason)
        self.refused.move_to_end(scan_id)
        while len(self.refused) > HISTORY:
            self.refused.popitem(last=False)

    def create_spool(self, spec: ScanSpec) -> SpoolWriter:
        """The scan's spool file (any thread: it touches no state of the manager but the pending
        raw copies', under their lock)."""
        self._drop_stale_marker(spec.scan_id)
        try:
            return SpoolWriter.create(self.config.spool_dir, spec, fsync=self.config.spool_fsync,
                                      reserve_bytes=self.config.disk_reserve_bytes)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # out of descriptors (the process' RLIMIT_NOFILE, or the system's): named, not an
                # internal error, so the producer and the operator see the limit to raise
                path = spool_path(self.config.spool_dir, spec.scan_id)
                log.error("scan %s refused: its spool %s cannot be opened (%s, %s): raise the open-file "
                          "limit (LimitNOFILE=, ulimit -n; daemon/SERVICE.md, Open files)", spec.scan_id, path,
                          errno.errorcode[exc.errno], exc.strerror or exc, extra={"scan_id": spec.scan_id})
                raise ScanRefused("spool_dir", "open_files",
                                  f"spool {path} cannot be opened: {errno.errorcode[exc.errno]} "
                                  f"({exc.strerror or exc}); the daemon's open-file limit must be raised") from None
            if exc.errno != errno.ENOSPC:
                raise
            raise ScanRefused("spool_dir", "disk_space", exc.strerror or str(exc)) from None

    def _drop_stale_marker(self, scan_id: str) -> None:
        """A raw-pending marker whose spool is gone (``rm *.spool.h5`` leaves the markers) where a
        new scan takes its id (free again once its result is gone too, and the daemon no longer
        lists the old scan): left, it kept the new scan's spool from recovery after a stop or a
        kill, and the next start took that spool for the old scan's frames."""
        marker = pending_marker(spool_path(self.config.spool_dir, scan_id))
        if not marker.exists() or marker.with_name(marker.name[: -len(PENDING_SUFFIX)]).exists():
            return
        log.warning("removed %s: its spool is gone, and a new scan takes the id %r", marker.name, scan_id,
                    extra={"scan_id": scan_id})
        marker.unlink(missing_ok=True)
        with self._raw_lock:
            self._raw_pending.pop(scan_id, None)
            self._raw_failed.pop(scan_id, None)

    def admission(self, spec: ScanSpec, own_spool: bool = False,
                  files: bool = True) -> tuple[ReconOptions, dict[str, int]]:
        """Raise :class:`ScanRefused` unless the scan may start; else its options and memory.
        Needs only the declaration (shape, count, extent, options), never the probe or the
        positions, so the service refuses a scan before it builds anything large.
        ``own_spool``: the spool file that exists is this scan's own (made by create_spool).
        ``files``: look for the id's spool and result files too (stat calls, which
        :meth:`check_unique_files` makes off the manager thread); else only the scans held."""
        self._check_unique(spec.scan_id, own_spool, files)
        if self.stopping:
            raise ScanRefused("scan_id", "service_stopping", "the service is shutting down")
        if spec.scan_id not in self.uncapped and len(self.waiting) >= self.config.max_queued_scans + max(
            0, self.config.max_concurrent_scans - len(self.running)
        ):
            raise ScanRefused("scan_id", "max_queued_scans", f"{len(self.waiting)} scans are already waiting")
        options = self._options_for(spec)
        return options, self._reservation(spec, self._with_declared_modes(spec, options))

    @staticmethod
    def _with_declared_modes(spec: ScanSpec, options: ReconOptions) -> ReconOptions:
        """``options`` with as many probe modes as the scan's (modes, M, M) probe declares: the
        engine runs them all. The option probe_modes is bounded, a declared probe was not: a
        stack of 2000 probes (one per position, sent as modes) was accepted with the memory of
        one mode and kept its worker busy for ever. A coherent probe with a finite source (the
        scan states its size, or the options give one) runs as :func:`source_modes_in_force`
        modes: counted too, or its reservation was a third of the engine's work."""
        declared = spec.probe.shape[0] if spec.probe.ndim == 3 else 1
        if declared == 1 and source_size_in_force(options, stated_source_size(None, spec.metadata)):
            declared = source_modes_in_force(options)
        if declared <= options.probe_modes:
            return options
        try:
            return options.merged({"probe_modes": declared})
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["type"] != "less_than_equal":  # modes with an option they do not combine with
                raise ScanRefused("probe", "recon_options", f"a probe of {declared} modes: {err['msg']}") from None
            raise ScanRefused("probe", "probe_modes", f"the probe declares {declared} modes, at most "
                              f"{err['ctx']['le']} are run (option probe_modes): a (modes, M, M) probe holds the "
                              "incoherent modes of one probe, not a probe per position") from None

    def scan_id_taken(self, scan_id: str) -> bool:
        """Whether a scan_start of this id would be refused as not unique: the daemon holds a
        scan of that id, its spool, or its result files. Detector sources, which name their
        scans themselves, ask it so that a series after a restart does not take an old name."""
        return self.why_scan_id_taken(scan_id) is not None

    def why_scan_id_taken(self, scan_id: str) -> str | None:
        """The reason a scan_start of this id would be refused as not unique (naming the file
        that holds it), or None: the control ``receipt`` tells senders before they start."""
        if not re.fullmatch(SCAN_ID_PATTERN, scan_id):
            # not a name a scan can have (refused by the message checks, not as taken): naming
            # its spool raised, and the receipt of a scan refused for its id failed with that
            # ValueError instead of saying why the scan was refused
            return None
        try:
            self._check_unique(scan_id)
        except ScanRefused as exc:
            return exc.message
        return None

    def off_manager(self, check: Callable[[], Any], done: Callable[[Any, Exception | None], None],
                    key: str | None = None) -> None:
        """Run ``check`` (a look at the file systems) on the file-checks thread, then ``done(its
        result, None)`` — or ``done(None, its exception)`` — on the manager thread at its next
        :meth:`reap`, as :meth:`after_disk` does. Not behind the spool thread's writes: a
        receipt of an unknown scan waits for no scan's frames. Once the daemon stops, ``check``
        runs at once. ``key``: a look queued for the same key, not started yet, answers this
        one too (it is made after this request came). Past FILE_CHECKS_QUEUED looks waiting,
        ``done`` gets a ProtocolError (rule ``file_checks_busy``) at once."""
        with self._checks_lock:
            waiters = None if key is None else self._checks_queued.get(key)
            if waiters is not None:
                waiters.append(done)
                return
            busy = self._checks_waiting >= FILE_CHECKS_QUEUED
            if not busy:
                waiters = [done]
                self._checks_waiting += 1
                if key is not None:
                    self._checks_queued[key] = waiters
        if busy:
            done(None, ProtocolError(
                "scan_id", "file_checks_busy",
                f"{FILE_CHECKS_QUEUED} looks at the spool and results directories wait already (at most "
                f"{FILE_CHECKS_QUEUED}, FILE_CHECKS_QUEUED): their file system answers slowly or not at all; "
                "ask again later"))
            return
        assert waiters is not None

        def task() -> None:
            with self._checks_lock:  # started: a later request is not answered by a look made before it
                self._checks_waiting -= 1
                if key is not None and self._checks_queued.get(key) is waiters:
                    del self._checks_queued[key]
            try:
                result, error = check(), None
            except Exception as exc:  # noqa: BLE001 - handed to ``done``, which answers with it
                result, error = None, exc
            for each in waiters:
                self._disk_done.put(functools.partial(each, result, error))
            self.outbox.wake()

        try:
            self._file_checks.submit(task)
        except RuntimeError:  # shut down by close(): answered still, from this thread
            task()

    def why_files_taken(self, scan_id: str) -> str | None:
        """:meth:`why_scan_id_taken` for its files only (any thread: no state of the manager)."""
        if not re.fullmatch(SCAN_ID_PATTERN, scan_id):
            return None  # (as why_scan_id_taken: not a name a scan can have)
        try:
            self.check_unique_files(scan_id)
        except ScanRefused as exc:
            return exc.message
        return None

    def _check_unique(self, scan_id: str, own_spool: bool = False, files: bool = True) -> None:
        """Refuse an id the daemon holds a scan, spool (unless ``own_spool``) or result of. A
        result counts though the daemon no longer lists its scan (a restart, or more than
        HISTORY scans since): a new result would overwrite it. ``files``: look for the files."""
        if scan_id in self.sessions:
            raise ScanRefused("scan_id", "unique_scan_id", f"scan {scan_id!r} already exists")
        if files:
            self.check_unique_files(scan_id, own_spool)

    def check_unique_files(self, scan_id: str, own_spool: bool = False) -> None:
        """Refuse an id whose spool (unless ``own_spool``) or result files exist. Any thread: it
        reads no state of the manager. The files are looked for at each call, never remembered:
        a result another daemon or a person put in the results directory counts at once (an
        index of names would need the directory watched, and a watch sees nothing of what other
        hosts write to a network file system)."""
        from .storage.outputs import output_paths

        spool = spool_path(self.config.spool_dir, scan_id)
        if not own_spool and spool.exists():
            # no scan of that id is listed (a spool kept, or not recovered, from before a restart):
            # "already exists" sent the sender to a scan list without it, and named no file
            raise ScanRefused("scan_id", "unique_scan_id",
                              f"scan {scan_id!r} already has a spool ({spool}, kept from before a restart or "
                              "not recovered): a new scan would overwrite its frames; send the scan under "
                              "another id, or move the file away")

        stem = self.config.results_dir / file_stem(scan_id)
        taken = [p for p in output_paths(stem, self.config.output_formats).values() if p.exists()]
        if taken:
            spool_of = self._spool_named(taken[0])
            if spool_of is not None:
                # spool_dir is results_dir: scan "x.spool"'s result file is scan "x"'s spool (a
                # live one, often), which "already has a result … from before a restart" misnamed
                raise ScanRefused("scan_id", "unique_scan_id",
                                  f"scan {scan_id!r} would write its result to {taken[0]}, which is {spool_of} "
                                  "(spool_dir and results_dir are one directory): its result would overwrite "
                                  "those frames; send the scan under another id, or give results_dir a "
                                  "directory of its own")
            raise ScanRefused("scan_id", "unique_scan_id",
                              f"scan {scan_id!r} already has a result ({taken[0]}, from before a restart or "
                              "older than the scans the daemon lists): its result would overwrite it; send "
                              "the scan under another id, or move the file away")

    def _spool_named(self, path: Path) -> str | None:
        """What ``path`` is if it is a spool file of ``spool_dir`` (words for a refusal: whose,
        live or kept), else None."""
        path = path.resolve()
        if not path.name.endswith(".spool.h5") or path.parent != Path(self.config.spool_dir).resolve():
            return None
        for sid in list(self.sessions):
            if spool_path(self.config.spool_dir, sid).resolve() == path:
                live = "receiving frames" if sid in self.spools else "kept with its scan"
                return f"the spool of scan {sid!r} ({live})"
        stem = path.name.removesuffix(".spool.h5")
        whose = "" if "~" in stem else f" of scan {stem.replace('%3A', ':')!r}"  # (a hashed stem names no id)
        return f"a spool file{whose}, kept from before a restart or not recovered"

    def set_waiting_options(self, session: Session, overrides: dict[str, Any]) -> ReconOptions:
        """Change the options of a scan that waits for a worker (``overrides`` as set_options
        takes them, nested for ``stream``): its worker starts with them. Checked as at
        scan_start (valid, backend installed, within the memory budget: the scan's reservation
        is made again with them), so a change its worker could not run is refused now;
        :class:`ScanRefused` names it, or pydantic's ValidationError an invalid value (the
        caller names it as set_options names any option: pydantic's type as rule)."""
        spec = replace(session.spec, options=merge_overrides(session.spec.options, overrides))
        self.config.options.merged(spec.options)  # an invalid value: ValidationError, as documented
        options = self._options_for(spec)
        need = self._reservation(spec, self._with_declared_modes(spec, options))
        session.spec, session.reserved_bytes = spec, need
        return options

    def keep_waiting_options(self, session: Session, done: Callable[[Any, Exception | None], None]) -> None:
        """Write a waiting scan's options (:meth:`set_waiting_options`) into its spool's header,
        journaled (SpoolWriter.set_options), so that a restart recovers the scan with them;
        ``done(None, error or None)`` on the manager thread once they are on disk."""
        spool = self.spools.get(session.scan_id)
        parked = self._parked.get(session.scan_id)
        options = dict(session.spec.options)
        if spool is None and parked is not None:  # closed while it waits: opened for this, and closed again
            def reopened() -> None:
                writer = self._unpark(session.scan_id, parked)
                try:
                    writer.set_options(options)
                finally:
                    writer.close()
                    self._rehold_admitted(session)

            self.after_disk(reopened, done)
            return
        if spool is None:  # (a waiting scan's spool is the manager's until its worker starts)
            done(None, RuntimeError(f"scan {session.scan_id!r} has no spool to keep its options in"))
            return
        self.after_disk(lambda: spool.set_options(options), done)

    def set_running_options(self, session: Session, overrides: dict[str, Any], options: ReconOptions) -> None:
        """Change the options of a running scan (``overrides`` as set_options takes them;
        ``options``: its worker's options with them), as :meth:`keep_running_options` keeps them
        and a restart recovers the scan: checked against the memory budget as at scan_start (its
        reservation is made again with them), since the next start checks the recovered scan so
        and would refuse to recover it (its frames left in the spool, unreconstructed).
        :class:`ScanRefused` names a change that does not fit. The budget that is the device's
        free memory (``device_memory_budget_bytes`` unset) counts what this scan holds already
        as free."""
        spec = replace(session.spec, options=merge_overrides(session.spec.options, overrides))
        held = session.reserved_bytes.get("device", 0)
        session.reserved_bytes = self._reservation(spec, self._with_declared_modes(spec, options), held_device=held)
        session.spec = spec

    def keep_running_options(self, session: Session, done: Callable[[Any, Exception | None], None]) -> None:
        """Write the options of a running scan, changed by :meth:`set_running_options` (its
        worker has them already), into its spool's header, journaled in order with its appends, so that a
        restart recovers the scan with them; ``done(None, error or None)`` on the manager
        thread once they are on disk. A scan whose end has been read (or that is being
        cancelled) has its spool closing or closed: ``done`` gets an error saying so, and the
        caller answers that they were not kept."""
        spool = self.spools.get(session.scan_id)
        if spool is None:
            # its end was read (its final refinement runs from the frames its worker holds), or
            # it is being cancelled: either way nothing appends to its spool any more
            done(None, RuntimeError(f"scan {session.scan_id!r} takes no more frames and its spool is closed: "
                                    "the change applies to this run of it only"))
            return
        options = dict(session.spec.options)
        self.after_disk(lambda: spool.set_options(options), done)

    def _options_for(self, spec: ScanSpec) -> ReconOptions:
        try:
            options = self.config.options.merged(spec.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ScanRefused(f"options.{where}", "recon_options", err["msg"]) from None
        try:
            get_xp(options.backend)  # valid but not installed here (CuPy without a GPU)
        except BackendUnavailable as exc:
            raise ScanRefused("options.backend", "backend_available", str(exc)) from None
        return options

    def _reservation(self, spec: ScanSpec, options: ReconOptions, held_device: int = 0) -> dict[str, int]:
        """Memory the scan needs, checked against the budgets before any frame is accepted.
        ``held_device``: device memory the scan holds already (a running scan's new options),
        free for it when the budget is the device's free memory."""
        per_engine = estimate_bytes(spec, options)
        engines = 3 if self.config.resolution_interval_s > 0 else 1  # main + two half sets
        total = per_engine * engines
        device = "device" if options.backend == "cupy" else "host"
        if device == "device":
            budget = self.config.device_memory_budget_bytes
            if budget is None:
                budget = (free_device_bytes(get_xp("cupy")) or 0) + held_device
        else:
            budget = self.config.host_memory_budget_bytes
        if total > budget:
            field, hint = "expected_frames", ""
            if spec.extent_m is not None and estimate_bytes(replace(spec, extent_m=None), options) * engines <= budget:
                # the frames would fit: the field is what is too large (a step or positions in
                # the wrong unit), and naming expected_frames sent the user to the wrong value
                (y0, y1), (x0, x1) = spec.extent_m
                field, hint = "scan", (f"; the scan's field of {y1 - y0:.3g} m × {x1 - x0:.3g} m is what does "
                                       "not fit (are its positions or step in metres?)")
            raise ScanRefused(
                field,
                "memory_budget",
                f"the scan needs ≈{total / 2**20:.0f} MiB of {device} memory "
                f"({spec.expected_frames} frames of {spec.frame_shape[0]}×{spec.frame_shape[1]} "
                f"{spec.frame_dtype}, canvas {spec.field_px()} px) but the budget is {budget / 2**20:.0f} MiB"
                + hint,
            )
        return {device: total}

    def check_streamed_field(self, session: Session, positions: np.ndarray) -> None:
        """Refuse streamed positions whose canvas cannot fit the memory budget, before they
        are spooled. A scan that streams its positions declares no extent, so scan_start
        reserved a canvas of two frames; positions in µm sent as metres (inside
        max_abs_position_m) then made the worker's canvas 409 TiB and failed the scan with
        NumPy's MemoryError, which named neither the positions nor their unit. The estimate
        costs milliseconds, so it is made with room to grow (twice the span) and repeated
        only when the positions leave that room."""
        spec = session.spec
        if spec.extent_m is not None or not len(positions):
            return
        lo, hi = positions.min(axis=0), positions.max(axis=0)
        seen = session.streamed_extent
        if seen is not None:
            lo, hi = np.minimum(lo, seen[0]), np.maximum(hi, seen[1])
        session.streamed_extent = (lo, hi)
        span = hi - lo
        if session.streamed_room is not None and (span <= session.streamed_room).all():
            return
        options = self._options_for(spec)
        for room in (2 * span, span):
            grown = replace(spec, extent_m=((0.0, float(room[0])), (0.0, float(room[1]))))
            try:
                self._reservation(grown, options)
            except ScanRefused as exc:
                if room is span:
                    session.streamed_extent = seen  # these positions are refused: not part of the scan
                    raise ProtocolError(
                        "positions_m", "memory_budget",
                        f"the positions so far span {span[0]:.3g} m × {span[1]:.3g} m: {exc.message}",
                        session.scan_id) from None
                continue
            session.streamed_room = room
            return

    def _register(self, session: Session, spool: SpoolWriter | None) -> None:
        self.sessions[session.scan_id] = session
        if spool is not None:  # (None: parked, see recover)
            self.spools[session.scan_id] = spool
        self.waiting.append(session.scan_id)
        self._trim_history()

    def add_frames(self, session: Session, frames: np.ndarray, indices: np.ndarray, positions: np.ndarray,
                   arrived: float, detector: DetectorFrames | None = None, wire: object | None = None) -> int:
        """Spool, then count, then hand to the worker. Returns the number of frames kept.
        ``detector``: the frames' compressed chunks from a detector source, spooled as they are.
        ``wire``: the bslz4 bytes the frames were decoded from (Frames.wire_data)."""
        with session.lock:  # summaries read the ledger from other threads
            keep = session.ledger.admit(indices)
        dup = int((~keep).sum())
        if dup:
            self.metrics.frames_dropped.labels(reason="duplicate").inc(dup)
        if not keep.any():
            return 0
        raw = reducer = peak = None
        if detector is not None:
            raw, reducer, peak = detector.raw, detector.reducer, detector.peak
        if not keep.all():
            frames, indices, positions = frames[keep], indices[keep], positions[keep]
            raw = None if raw is None else raw.select(keep)
            wire = None  # the received bytes hold the duplicates too: the spool compresses these
        spool = self.spools[session.scan_id]
        n = len(frames)
        session.last_activity = time.monotonic()
        worker = self.running.get(session.scan_id)

        if raw is None:  # no detector chunks: appended with the frames waiting
            self._append(session, spool, _Pending(frames, indices, positions, arrived, worker, wire))
            return n

        def write() -> None:  # on the spool thread: a frame counts as received once on disk
            try:
                spool.append(frames, indices, positions, raw=raw, reducer=reducer)
            except BaseException:
                with session.lock:
                    session.ledger.unstored(indices)
                raise
            for path, chunks in spool.take_chunk_paths().items():
                self.metrics.spool_chunks.labels(path=path).inc(chunks)
            with session.lock:
                session.ledger.stored(n)
            self.metrics.frames_received.inc(n)
            self.metrics.last_frame.set(time.time())
            if worker is not None:
                worker.put(FrameBatch(frames, positions, arrived, peak))

        self._on_disk(session.scan_id, write, frames.nbytes)
        return n

    def keep_unpositioned(self, session: Session, image_ids: np.ndarray, raw: RawChunks) -> None:
        """Detector frames the scan has no position for (more images than positions): kept in
        its spool (``unpositioned_detector_frames``), after the frames asked for before them."""
        spool = self.spools[session.scan_id]
        session.last_activity = time.monotonic()

        def write() -> None:  # on the spool thread, in order with the scan's appends
            first = spool.unpositioned == 0
            try:
                kept = spool.append_unpositioned(image_ids, raw)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # checked before anything is written: the scan's own frames (and what it keeps
                # of these) stay whole, and it is reconstructed; a detector left running past
                # its scan must not fail it by filling the disk
                log.error("%d detector images without a position (ids %s …) not kept: %s", len(image_ids),
                          image_ids[:10].tolist(), exc, extra={"scan_id": session.scan_id})
                return
            dup = len(image_ids) - kept
            if dup:  # counted as the scan's duplicate frames are
                self.metrics.frames_dropped.labels(reason="duplicate").inc(dup)
                with session.lock:
                    session.ledger.duplicates += dup
                log.warning("%d detector images without a position arrived again (ids among %s%s); "
                            "kept once", dup, image_ids[:10].tolist(), " …" if len(image_ids) > 10 else "",
                            extra={"scan_id": session.scan_id})
            if not kept:
                return
            log.log(logging.WARNING if first else logging.DEBUG,
                    "%d detector images without a position (ids %s%s) kept in the spool's "
                    "unpositioned_detector_frames, not reconstructed (%d so far)", kept,
                    image_ids[:10].tolist(), " …" if len(image_ids) > 10 else "", spool.unpositioned,
                    extra={"scan_id": session.scan_id})

        self._on_disk(session.scan_id, write, sum(len(c) for c in raw.chunks))

    def _append(self, session: Session, spool: SpoolWriter, item: _Pending) -> None:
        """Spool frames: they join the append the spool thread has not started yet, if there
        is one, else they start one. One append writes all it holds at once (one commit, one
        flush: SpoolWriter.append_many), so the spool keeps up by growing its appends when it
        falls behind; its frames count as received, and go to the worker, once it is done."""
        scan_id = session.scan_id
        with self._disk_lock:
            self._disk_backlog += item.frames.nbytes
            batch = self._appending.get(scan_id)
            if batch is not None:
                batch.append(item)
                return
            batch = self._appending[scan_id] = [item]

        def write() -> None:  # on the spool thread: a frame counts as received once on disk
            with self._disk_lock:
                if self._appending.get(scan_id) is batch:
                    del self._appending[scan_id]  # frames from now on start the next append
            try:
                try:
                    n = spool.append_many([(i.frames, i.indices, i.positions) for i in batch], [i.wire for i in batch])
                except BaseException:
                    with session.lock:  # none of them counts as held (see FrameLedger.unstored)
                        session.ledger.unstored(np.concatenate([i.indices for i in batch]))
                    raise
                for path, chunks in spool.take_chunk_paths().items():
                    self.metrics.spool_chunks.labels(path=path).inc(chunks)
                with session.lock:
                    session.ledger.stored(n)
                self.metrics.frames_received.inc(n)
                self.metrics.last_frame.set(time.time())
                for i in batch:
                    if i.worker is not None:
                        i.worker.put(FrameBatch(i.frames, i.positions, i.arrived))
            finally:
                with self._disk_lock:
                    self._disk_backlog -= sum(i.frames.nbytes for i in batch)

        self._on_disk(scan_id, write, appending=True)

    def _run_storage(self, scan_id: str, fn: Callable[[], None]) -> None:
        """Run a spool operation on a storage thread: any storage fault is logged, counted and
        reported for the manager to fail only this scan."""
        try:
            fn()
        except Exception as exc:
            log.exception("spool operation failed", extra={"scan_id": scan_id})
            self.metrics.internal_errors.labels(where="spool").inc()
            self._disk_failed.put((scan_id, f"{type(exc).__name__}: {exc}"))

    def _on_disk(self, scan_id: str, fn: Callable[[], None], nbytes: int = 0, appending: bool = False) -> None:
        """Run ``fn`` on the spool thread after every spool operation asked for before it. A
        failure is logged and counted there and fails the scan (the manager, told through
        :meth:`reap`, publishes it). ``appending``: ``fn`` is :meth:`_append`'s write."""
        with self._disk_lock:
            self._disk_backlog += nbytes
            if not appending:
                # frames waiting to be spooled are written before this operation: frames
                # after it must not join them (they would be written before it)
                self._appending.pop(scan_id, None)

        def task() -> None:
            try:
                self._run_storage(scan_id, fn)
            finally:
                with self._disk_lock:
                    self._disk_backlog -= nbytes
            self.outbox.wake()  # the manager may read ingest again, or has a failure to report

        self._disk.submit(task)

    def flush_disk(self) -> None:
        """Wait until every spool operation asked for so far is done, closes included (tests).
        The manager thread never waits like this: it uses :meth:`after_disk`."""
        self._disk.submit(lambda: None).result()
        self._closer.submit(lambda: None).result()

    def after_disk(self, on_disk: Callable[[], Any], done: Callable[[Any, Exception | None], None],
                   closes_of: str | None = None) -> None:
        """Run ``on_disk`` on the spool thread after every spool operation asked for so far,
        then ``done(its result, None)`` — or ``done(None, its exception)`` — on the manager
        thread, at its next :meth:`reap`. A control request that must see the frames read before
        it on disk (``receipt``, ``finish_scan``) waits so, while the manager loop goes on.
        ``closes_of``: a scan id; ``done`` also waits for the closes of that scan's spool those
        operations started on the closer thread (a stopped scan's close finishes there: until
        then its file is still being written and its journal still there) — for its own, not
        for every close before it: another scan's close may take minutes (a large detector
        scan's binned rows), and a producer confirming delivery gives up long before.
        Once the spool thread is shut down (the daemon stops: :meth:`close`), every spool
        operation is over, and ``on_disk`` runs at once (``done`` at the next reap, still)."""

        def hand_back(result: Any, error: Exception | None) -> None:
            self._disk_done.put(functools.partial(done, result, error))
            self.outbox.wake()

        def task() -> None:
            try:
                result, error = on_disk(), None
            except Exception as exc:  # noqa: BLE001 - handed to ``done``, which answers with it
                result, error = None, exc
            # (on the spool thread, where _closer_task registers every close: the closes of this
            # scan asked for so far are that one and the closer's earlier tasks, FIFO)
            closing = self._closing.get(closes_of) if closes_of is not None else None
            if closing is not None and not closing.is_set():
                try:
                    self._closer.submit(hand_back, result, error)  # after that close
                    return
                except RuntimeError:  # shut down (the daemon stops) once its closes were over
                    pass
            hand_back(result, error)

        try:
            self._disk.submit(task)
        except RuntimeError:
            # shut down by close(), on this (the manager) thread: every spool operation is done.
            # Raised, it reached a receipt's continuation in run_disk_done at the stop, logged
            # as an internal error, and the request was never answered
            task()

    def run_disk_done(self) -> None:
        """Run on the manager thread what the spool thread handed back (:meth:`after_disk`)."""
        while True:
            try:
                fn = self._disk_done.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception as exc:  # one continuation's bug must not starve the others
                log.error("internal error after a spool operation: %s", exc, exc_info=exc)
                self.metrics.internal_errors.labels(where="housekeeping").inc()

    def end_scan(self, session: Session, reason: str = "scan_end", frame_count: int | None = None) -> None:
        if session.ended:
            return
        session.ended = True
        if session.end_reason is None:  # a scan_end after a cancel keeps the cancel's reason
            session.end_reason = reason
        session.end_count = frame_count
        if frame_count is not None and session.spec.expected_frames is None:
            session.ledger.expected = frame_count
        spool = self.spools.get(session.scan_id)
        worker = self.running.get(session.scan_id)
        closed = parked = None
        if worker is not None:
            self.spools.pop(session.scan_id, None)
            if spool is not None:
                closed = self._spool_closed[session.scan_id] = _SpoolClosed()
        elif spool is not None:  # it waits for a worker with nothing more to append: parked
            self.spools.pop(session.scan_id)
            parked = self._parked[session.scan_id] = _SpoolClosed()

        def task() -> None:  # after the scan's last frames are on disk and with its worker
            if spool is not None:
                try:
                    spool.set_status("ended")
                except BaseException:
                    if parked is not None:  # let go of the file all the same: its journal keeps the frames
                        self._close_ended(session.scan_id, spool, None, parked)
                    raise
            try:
                with session.lock:
                    frames = session.ledger.as_dict()
                # posted here, not when scan_end was read: the counts are of frames on disk, and
                # the event precedes whatever the worker publishes once it has the end
                self.outbox.post("scan.ended", {"scan_id": session.scan_id, "reason": reason, "frames": frames})
                if worker is not None:
                    # the worker refines while the spool closes, which writes a detector scan's
                    # binned frames (derived until now: spool.py DERIVED); finish_result waits for it
                    worker.put(EndOfScan(reason))
                    if closed is not None:
                        self._close_ended(session.scan_id, spool, worker.held_frames, closed, worker.held_peak)
            finally:
                if parked is not None:  # whatever failed above: the spool thread's re-open waits for this close
                    self._close_ended(session.scan_id, spool, None, parked)

        self._on_disk(session.scan_id, task)

    def _close_ended(self, scan_id: str, spool: SpoolWriter, held: Callable[[int, int], Any] | None,
                     closed: _SpoolClosed, peak: Callable[[], int | None] | None = None,
                     release: Callable[[], None] | None = None) -> None:
        """Spool thread, once a scan's spool takes no more appends (its status written: ended,
        aborted, failed; or the daemon stops): close it on the closer thread. Writing a detector
        scan's derived binned rows decodes them from its detector frames, or takes them from its
        worker's frame store (``held``: ScanWorker.held_frames), which waits up to
        HELD_FRAMES_WAIT_S for a worker that is behind; on the spool thread the next series'
        appends waited behind either. Every frame of the scan is durable already (the journal:
        the rows written here are derived from its detector frames), and nothing else writes
        this spool now; what reads or marks the file later waits for this close
        (:meth:`_wait_closed`), finish_result through ``closed``."""

        def task() -> None:
            try:
                spool.close(held=held, peak=peak)  # the frames its engine holds, and their largest count
            except Exception as exc:  # a storage fault: logged, counted, and this scan fails
                # before set: finish_result must not copy the file without its journal
                closed.error, closed.kept = exc, self._kept_note(spool)
                self.unclosed[scan_id] = closed.kept
                log.error("closing the spool failed (%s: %s); %s", type(exc).__name__, exc, closed.kept,
                          exc_info=exc, extra={"scan_id": scan_id})
                self.metrics.internal_errors.labels(where="spool").inc()
                self._disk_failed.put((scan_id, f"{type(exc).__name__}: {exc}; {closed.kept}"))
            finally:
                if release is not None:  # (the frames a cancelled scan's worker kept for it)
                    release()
                closed.set()
                self.outbox.wake()

        self._closer_task(scan_id, closed, task)

    def _closer_task(self, scan_id: str, done: threading.Event, task: Callable[[], None]) -> None:
        """Spool thread: run ``task`` on the closer thread, which sets ``done`` once it is over;
        what reads or re-opens the file later waits for it (:meth:`_wait_closed`: the closer is
        FIFO, so for this task and every earlier one of the scan)."""
        # (both this and _wait_closed run on the spool thread: no lock)
        self._closing = {k: c for k, c in self._closing.items() if not c.is_set()}
        self._closing[scan_id] = done
        self._closer.submit(task)

    def _kept_note(self, spool: SpoolWriter) -> str:
        """What became of the frames of a scan whose spool close failed (SpoolWriter.close let
        go of the file, its journal kept), for its error, the log and the stop's report."""
        path, status = spool.path.absolute(), spool.status
        start = "the next start" if self.config.recover else "a start with recover on"
        kept = f"its {spool.count} frames are kept in its journal {journal_path(path)}: "
        if status == "ended":
            return f"{kept}control `finish_scan` or {start} rebuilds {path} from it and reconstructs the scan"
        if status == "open":  # (the daemon stops)
            return f"{kept}{start} rebuilds {path} from it and recovers the scan"
        return f"{kept}{start} rebuilds {path} from it, {status} (control `finish_scan` reconstructs the scan)"

    def _after_close(self, scan_id: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the closer thread after every spool operation asked for so far, the
        closes they started included (one FIFO closer thread), so that the spool thread does
        not wait for a close that is slow (:meth:`_close_ended`). A failure is handled as
        :meth:`_on_disk` handles one."""

        done = threading.Event()

        def task() -> None:
            try:
                self._run_storage(scan_id, fn)
            finally:
                done.set()
            self.outbox.wake()

        # waited for as a close is: a finish_scan's re-open of the file after this mark, not
        # before (the mark wrote "aborted" over the re-opened scan's "ended")
        self._on_disk(scan_id, lambda: self._closer_task(scan_id, done, task))

    def when_settled(self, scan_id: str, fn: Callable[[], None]) -> None:
        """Manager thread: run ``fn`` now, or once the scan's worker has exited and its end was
        settled (:meth:`_settle` asks for the spool's close, mark or removal then), so that
        what ``fn`` asks of the spool thread comes after those."""
        if scan_id in self.running:
            self._after_exit.setdefault(scan_id, []).append(fn)
        else:
            fn()

    def _wait_closed(self, scan_id: str) -> None:
        """Spool thread: wait for the close of the scan's spool on the closer thread, if any."""
        closed = self._closing.pop(scan_id, None)
        if closed is not None:
            closed.wait()

    def abort_scan(self, session: Session, reason: str) -> None:
        """Cancel a scan (producer abort or control `cancel`); its spool is kept, marked aborted."""
        if session.end_reason is None:
            session.end_reason = reason  # `receipt` and `finish_scan` see why while the worker stops
        worker = self.running.get(session.scan_id)
        handed = worker is not None and self._hand_over(session.scan_id, worker)
        if worker is not None:
            worker.put(Cancel(reason))
        elif session.transition(State.ABORTED, error=reason):
            self.outbox.post("scan.aborted", {"scan_id": session.scan_id, "reason": reason})
            self._settle(session)
        self._close_spool(session.scan_id, "aborted", worker if handed else None)

    def fail_scan(self, session: Session, reason: str) -> None:
        """End a scan as failed after an internal error (its spool is kept, marked failed)."""
        worker = self.running.get(session.scan_id)
        handed = worker is not None and self._hand_over(session.scan_id, worker)
        if worker is not None:
            # the worker owns the engine: it stops at its next turn and ends the scan failed
            worker.put(Cancel(reason, failed=True))
        elif session.transition(State.FAILED, error=reason):
            self.outbox.post("scan.failed", {"scan_id": session.scan_id, "error": reason})
            self._settle(session)
        self._close_spool(session.scan_id, "failed", worker if handed else None)

    def _hand_over(self, scan_id: str, worker: ScanWorker) -> bool:
        """Before a running scan's Cancel: the frames its worker holds then go to its spool's
        close (ScanWorker.keep_held_for_close), which need not derive those binned rows again
        from the detector frames; none where the spool is not closed here (an ended scan's).
        Returns whether they are handed over."""
        if scan_id not in self.spools:
            return False
        worker.keep_held_for_close()
        return True

    def _release_held(self, scan_id: str, worker: ScanWorker) -> None:
        """Closer thread, a cancelled scan's close over: its worker lets go of the frames it kept
        for it, and the next :meth:`reap` stops counting them (and admits what waited for them)."""
        worker.release_held()
        self._let_go.put(scan_id)
        self.outbox.wake()

    def _close_spool(self, scan_id: str, status: str | None = None, worker: ScanWorker | None = None) -> None:
        """Close the scan's spool on the spool thread (after its pending appends), setting its
        status first when given; a cancelled scan's ``worker`` hands over the frames it held at
        the cancel (:meth:`_hand_over`), let go of once the close is over."""
        spool = self.spools.pop(scan_id, None)
        if spool is None:
            return
        session = self.sessions.get(scan_id)

        def task() -> None:
            try:
                if status is not None:
                    spool.set_status(status)
                    if session is not None:  # (its worker's exit then has nothing to mark: _mark_spool)
                        session.spool_status = status
            finally:  # (a status that could not be written: the file is let go of all the same)
                # on the closer, as at a scan's end: an aborted detector scan's binned rows are
                # written there (from the frames its worker held, else derived), not in front of
                # the next scan's appends
                if worker is not None:
                    self._close_ended(scan_id, spool, worker.held_frames, _SpoolClosed(), worker.held_peak,
                                      release=lambda: self._release_held(scan_id, worker))
                else:
                    self._close_ended(scan_id, spool, None, _SpoolClosed())

        self._on_disk(scan_id, task)

    # -- admission -----------------------------------------------------------------------------
    def reserved(self) -> dict[str, int]:
        out = {"host": 0, "device": 0}
        for scan_id in self.running:
            for dev, b in self.sessions[scan_id].reserved_bytes.items():
                out[dev] += b
        for held in self._lingering.values():
            for dev, b in held.items():
                out[dev] += b
        return out

    def admit(self) -> None:
        """Start workers for waiting scans while slots and memory allow (FIFO, no overtaking;
        but a scan whose closed spool another program holds for writing is passed over until
        that program lets go: :meth:`_spool_held`)."""
        passed = 0  # waiting scans passed over, at the head of the queue
        while len(self.waiting) > passed and not self.stopping and len(self.running) < self.config.max_concurrent_scans:
            session = self.sessions[self.waiting[passed]]
            if session.state.final:
                self.waiting.pop(passed)
                continue
            used = self.reserved()
            budget = {"host": self.config.host_memory_budget_bytes,
                      "device": self.config.device_memory_budget_bytes or 1 << 62}
            if ((self.running or self._lingering)
                    and any(used[d] + b > budget[d] for d, b in session.reserved_bytes.items())):
                return  # wait for a running scan, or a cancelled one's close, to free its memory
            if self._spool_held(session):
                passed += 1
                continue
            self.waiting.pop(passed)
            try:
                self._start_worker(session)
            except Exception as exc:  # e.g. the defaults changed under it: this scan fails, not the loop
                log.exception("cannot start the worker", extra={"scan_id": session.scan_id})
                self.running.pop(session.scan_id, None)
                self.metrics.internal_errors.labels(where="housekeeping").inc()
                self.fail_scan(session, f"cannot start: {type(exc).__name__}: {exc}")
        self._update_gauges()

    def _spool_held(self, session: Session) -> bool:
        """Whether the scan waits on a closed spool (parked: it ended while it waited, or was
        recovered ended) that another program holds open for writing — an operator's
        ``h5py.File(spool, "r+")``. Its worker's re-open of the spool was refused then, and the
        scan failed, every frame on disk. Now it waits (said once: log and an ``error`` event,
        rule ``spool_in_use``) and starts once that program lets go (admit runs at every
        housekeeping pass); the scans behind it go first meanwhile."""
        scan_id = session.scan_id
        parked = self._parked.get(scan_id)
        if parked is None or not parked.is_set():  # open (the daemon's), or its close under way
            return False
        path = spool_path(self.config.spool_dir, scan_id)
        try:
            share = hold_against_writers(path)
        except SpoolInUse as held:
            self._note_held(session, held)
            return True
        stale = None
        with self._raw_lock:
            noted = scan_id in self._held_spools
            self._held_spools.discard(scan_id)
            if share is not None:
                stale, self._admission_locks[scan_id] = self._admission_locks.get(scan_id), share
        if stale is not None:
            stale.close()
        if noted:
            log.info("spool %s let go of by the other program: the scan starts", path.name, extra={"scan_id": scan_id})
        return False

    def _rehold_admitted(self, session: Session) -> None:
        """Spool thread, after set_options' re-open of a waiting scan's closed spool
        (:meth:`keep_waiting_options`): where the scan was admitted meanwhile, that re-open took
        the shared lock admission keeps for the worker's re-open (queued behind it on this
        thread) and let go of it at its close; it is taken again, so that a program opening the
        file for writing before the worker's re-open is refused, as right after admission. One
        that got in between the close and this (microseconds) is met by the worker's re-open as
        before admission kept a lock (:meth:`_reopen_later`)."""
        scan_id = session.scan_id
        if not session.started or session.state.final or self.stopping:
            # not admitted: admission takes its own lock; over, or the daemon stopping (its
            # admission locks let go of): nothing re-opens it
            return
        try:
            share = hold_against_writers(spool_path(self.config.spool_dir, scan_id))
        except SpoolInUse:
            return
        if share is None:
            return
        with self._raw_lock:
            stale, self._admission_locks[scan_id] = self._admission_locks.get(scan_id), share
        if stale is not None:
            stale.close()
        if session.state.final:  # settled meanwhile (its lock dropped before this one was kept)
            share = self._drop_admission_lock(scan_id)
            if share is not None:
                share.close()

    def _drop_admission_lock(self, scan_id: str) -> BinaryIO | None:
        """The shared lock admission took on the scan's spool (None: none), no longer kept here."""
        with self._raw_lock:
            return self._admission_locks.pop(scan_id, None)

    def _note_held(self, session: Session, held: SpoolInUse, started: bool = False) -> None:
        """Say once per scan that it waits for another program's write handle on its spool;
        ``started``: its worker runs already (:meth:`_reopen_later`), keeping its slot."""
        scan_id = session.scan_id
        with self._raw_lock:
            if scan_id in self._held_spools:
                return
            self._held_spools.add(scan_id)
        message = (f"scan {scan_id!r} waits: its spool {held.path} is open for writing in another program (HDF5's "
                   "exclusive file lock), beside which the daemon does not open it (written beside a writer, even one "
                   f"that writes nothing, frames came back unreadable at its close). Its {session.ledger.received} "
                   "frames are on disk (the spool and its journal); the scan starts once that program closes the file "
                   "(h5py: File.close(), or end that Python session), "
                   + ("keeping its worker slot meanwhile (the program opened the file after the scan was started, "
                      "where the file system has no flock)" if started else "and the scans queued behind it start meanwhile"))
        log.warning("%s", message, extra={"scan_id": scan_id})
        self.outbox.post("error", {"scan_id": scan_id, "field": "spool", "rule": "spool_in_use", "message": message})

    def _start_worker(self, session: Session) -> None:
        options = self._options_for(session.spec)
        worker = ScanWorker(session, options, self.config, self.outbox, self.metrics,
                            finish=self.finish_result, on_exit=self.worker_exited)
        session.worker = worker
        session.started = True
        self.running[session.scan_id] = worker
        parked = self._parked.pop(session.scan_id, None)
        spool = None if parked is not None else self.spools[session.scan_id]
        closed = None
        if session.ended:  # its worker has the end at once: its spool closes now, as in end_scan
            self.spools.pop(session.scan_id, None)
            closed = self._spool_closed[session.scan_id] = _SpoolClosed()

        def task() -> None:  # after every append asked for so far: none is missed or doubled
            nonlocal spool
            frames = None
            later = False
            try:
                if parked is not None:
                    try:
                        spool = self._unpark(session.scan_id, parked)
                    except SpoolInUse as exc:
                        # another program took the file for writing after admit's look (_spool_held):
                        # its frames are on disk, the worker waits for them, and the re-open is asked
                        # again (retry_reopens) — before, the scan failed
                        later = self._reopen_later(session, task, exc)
                        if later or self.stopping or session.state.final:
                            return  # (stopping: it stays ended in the spool, for the next start)
                        raise
                if spool.count:  # frames spooled while the scan waited (or before a crash)
                    frames, _, positions = spool.read()
                    worker.put(FrameBatch(frames, positions))
                if closed is not None:
                    worker.put(EndOfScan("scan_end"))
            finally:
                if later:
                    pass  # (its close is the next try's)
                elif closed is not None and spool is None:  # it could not be re-opened: the scan fails
                    closed.error, closed.kept = RuntimeError("its spool could not be re-opened"), ""
                    closed.set()
                elif closed is not None:  # the binned rows read (derived) just now are written as they are
                    held = None if frames is None else lambda a, b: frames[a:b]
                    self._close_ended(session.scan_id, spool, held, closed)

        self._on_disk(session.scan_id, task)
        started = self._launcher.submit(worker.start)  # its inbox takes items before it runs
        started.add_done_callback(lambda f: self._start_failed(session, f.exception()))
        self.outbox.post("scan.acquiring", {"scan_id": session.scan_id})
        log.info("worker started", extra={"scan_id": session.scan_id})

    def _reopen_later(self, session: Session, task: Callable[[], None], held: SpoolInUse) -> bool:
        """Spool thread: ask for ``task`` (a started scan's re-open of its closed spool, refused
        beside another program's write handle) again in RAW_RETRY_S; said once, as
        :meth:`_spool_held` says it. False when the scan is over or the daemon stops."""
        if self.stopping or session.state.final:
            return False
        self._note_held(session, held, started=True)
        with self._raw_lock:
            self._reopen_waiting[session.scan_id] = (time.monotonic(), task)
        return True

    def retry_reopens(self) -> None:
        """Housekeeping (manager thread): the re-opens :meth:`_reopen_later` put off, asked of
        the spool thread again once RAW_RETRY_S went by."""
        now = time.monotonic()
        with self._raw_lock:
            due = [(sid, task) for sid, (when, task) in self._reopen_waiting.items() if now - when >= RAW_RETRY_S]
            for sid, _ in due:
                del self._reopen_waiting[sid]
        for sid, task in due:
            self._on_disk(sid, task)

    def _unpark(self, scan_id: str, parked: _SpoolClosed) -> SpoolWriter:
        """Spool thread: the spool of a scan parked while it waited (:meth:`end_scan`), open
        again once its close is over (it wrote the journal's "closed": no rebuild is needed)."""
        parked.wait()
        if parked.error is not None:  # its journal keeps the frames; the re-open rebuilds the file from it
            log.warning("re-opening the spool after its close failed (%s)", parked.error, extra={"scan_id": scan_id})
        spool = SpoolWriter.reopen(spool_path(self.config.spool_dir, scan_id), fsync=self.config.spool_fsync,
                                   reserve_bytes=self.config.disk_reserve_bytes,
                                   share=self._drop_admission_lock(scan_id))
        # re-opened (rebuilt from its journal if its close had failed): its later marks and
        # closes are this writer's, and `status` no longer lists it as unclosed
        self.unclosed.pop(scan_id, None)
        return spool

    def _start_failed(self, session: Session, exc: BaseException | None) -> None:
        """Launcher thread: a worker thread that could not start (no thread left in the OS)
        fails its scan like a worker exception, through the manager's reap."""
        if exc is None:
            return
        log.error("cannot start the worker thread: %s", exc, extra={"scan_id": session.scan_id})
        self.metrics.internal_errors.labels(where="worker").inc()
        if session.transition(State.FAILED, error=f"cannot start: {type(exc).__name__}: {exc}"):
            self.outbox.post("scan.failed", {"scan_id": session.scan_id, "error": session.error})
        self.worker_exited(session)

    def workers_started(self) -> None:
        """Wait until every worker asked for has its thread running (shutdown: before joins)."""
        self._launcher.submit(lambda: None).result()

    # -- called from worker threads ------------------------------------------------------------
    def finish_result(self, session: Session, state: Any) -> dict[str, str]:
        """Write the result file (engine result + the spool's NXcxi raw part under /raw) and the
        phase exports (``output_formats``); then retire the spool. Runs on the worker thread.
        Returns every file written, kind → path (the ``files`` of the published result)."""
        from .storage.outputs import save_outputs

        # absolute: subscribers do not share the daemon's working directory
        stem = self.config.results_dir.absolute() / file_stem(session.scan_id)
        spool_file = spool_path(self.config.spool_dir, session.scan_id)
        closed = self._spool_closed.pop(session.scan_id, None)
        if closed is not None and not closed.wait(SPOOL_CLOSE_WAIT_S):
            raise RuntimeError(f"the spool was not closed after {SPOOL_CLOSE_WAIT_S:g} s")
        if closed is not None and closed.error is not None:
            # the file lacks what its journal holds (a journal-only spool is brought up at its
            # close): its copy would be a result without frames, and the journal is kept
            raise RuntimeError(f"the spool could not be closed ({type(closed.error).__name__}: {closed.error}); "
                               f"{closed.kept}")
        extra: dict[str, Any] = {"scan_id": session.scan_id, "recovered": session.recovered,
                                 **{f"frames_{k}": v for k, v in session.ledger.as_dict().items()},
                                 **session.completeness()}
        if session.figures.get("resolution_m") is not None:
            extra["resolution_m"] = float(session.figures["resolution_m"])
        # the live parallax fit's aberrations (worker._note_parallax)
        extra.update({k: float(v) for k, v in session.figures.items() if k.startswith("parallax_")})

        # the result holds the spool's frames and the object: refused before HDF5 writes it
        need = spool_file.stat().st_size + 4 * int(state.object.nbytes)
        stem.parent.mkdir(parents=True, exist_ok=True)
        require_free_space(stem.parent, need, self.config.disk_reserve_bytes, f"the result of scan {session.scan_id!r}")
        # another program holding the spool for writing (HDF5's exclusive lock) refused this read,
        # and with it the whole scan after its reconstruction: the result is written without /raw
        # then, and the frames follow once that program lets go (storage/rawcopy.py)
        src = open_spool_for_copy(spool_file, RAW_COPY_WAIT_S)
        if src is None:
            extra["raw_pending"] = str(spool_file.absolute())
        try:
            written = save_outputs(stem, state, formats=self.config.output_formats, extra=extra,
                                   raw=None if src is None else functools.partial(copy_raw, src))
        finally:
            if src is not None:
                src.close()
        if src is None:
            # the journal stays until the copy is done (_retire_copied discards it): while another
            # program holds the spool for writing, the file alone is not a safe only copy (a holder
            # in "a" that wrote nothing left a file's end address wrong at its close: qafield6)
            mark_pending(spool_file, session.scan_id, written["result"], self.config.spool_fsync)
            return self._defer_raw_copy(session, spool_file, written)
        # the result is on disk by now (write_result fsyncs it and its directory): only then do
        # the spool's file and journal, the other copy of the frames, go
        discard_journal(spool_file, self.config.spool_fsync)  # closed, the file holds all of it
        if self.config.keep_spool:
            # beside a program reading the closed spool (h5py's defaults take a shared lock), which
            # made the mark fail and the scan with it, its result already written: marked without
            # HDF5's lock; beside one writing it (mark_status), not at all: the result stands
            self._mark_kept(session.scan_id, spool_file, "finished")
        else:  # (deleted: no mark to write)
            _delete_spool_file(spool_file)
        session.result_path = str(written["result"])
        files = {kind: str(p) for kind, p in written.items()}
        if self.config.keep_spool:
            files["spool"] = str(spool_file.absolute())
        return files

    def _defer_raw_copy(self, session: Session, spool_file: Path, written: dict[str, Path]) -> dict[str, str]:
        """finish_result's end when another program held the spool for writing: the spool kept
        (it alone holds the frames) with its marker naming the result (written by then), for
        retry_raw_copies or the next start."""
        result = written["result"]
        with self._raw_lock:
            self._raw_pending[session.scan_id] = (spool_file, result)
        message = (f"result {result} written without its raw frames (/raw): the spool {spool_file.absolute()} is "
                   "open for writing in another program (HDF5's exclusive file lock); the spool is kept with every "
                   "frame, and they are copied into the result once that program closes it (h5py: File.close(), "
                   "or end that Python session)")
        log.warning("%s", message, extra={"scan_id": session.scan_id})
        self.outbox.post("error", {"scan_id": session.scan_id, "field": "spool", "rule": "raw_copy_pending",
                                   "message": message})
        session.result_path = str(result)
        return {**{kind: str(p) for kind, p in written.items()}, "spool": str(spool_file.absolute())}

    def retry_raw_copies(self) -> None:
        """Housekeeping (manager thread): try the pending raw copies again, on the raw-copy thread
        (a copy reads the whole spool), at most one pass at a time."""
        now = time.monotonic()
        with self._raw_lock:
            if not self._raw_pending or self._raw_retrying or now - self._raw_tried < RAW_RETRY_S:
                return
            pending = {scan_id: files for scan_id, files in self._raw_pending.items()
                       if now - self._raw_failed.get(scan_id, (-RAW_FAILED_RETRY_S, "", ""))[0] >= RAW_FAILED_RETRY_S}
            if not pending:
                return
            self._raw_retrying, self._raw_tried = True, now
        try:
            self._raw_copier.submit(self._retry_raw, pending)
        except RuntimeError:  # shut down (the daemon stops): the next start tries again
            with self._raw_lock:
                self._raw_retrying = False

    def _retry_raw(self, pending: dict[str, tuple[Path, Path]]) -> None:
        # (one line per copy, each naming two paths: thousands of copies failing for one cause,
        # a full disk, wrote tens of MB of log in one pass)
        copied, failed = Bounded(log), Bounded(log)
        try:
            for scan_id, (spool_file, result) in pending.items():
                try:
                    if not complete_raw_copy(spool_file, result, self.config.disk_reserve_bytes):
                        continue  # still held: tried again at the next pass
                    copied.log(logging.INFO, "copied", "raw frames of spool %s copied into result %s (the program "
                               "holding the spool let go)", spool_file, result, extra={"scan_id": scan_id})
                    # (inside the try: this pass's future is never read, so a failure to retire the
                    # spool — an I/O error on its directory — is logged and counted here or nowhere)
                    if not self._retire_copied(scan_id, spool_file):
                        continue  # (held again at once: its mark is tried at the next pass)
                except Exception as exc:  # noqa: BLE001 - logged with its traceback through ``failed`` (Bounded)
                    # e.g. a full disk, the result moved away: the spool and its marker stay, tried
                    # again (before, only at the next start: a disk freed meanwhile did not count)
                    why = f"{type(exc).__name__}: {exc}"
                    # the same cause again is not logged again: an OSError by its errno (a full
                    # disk's message gives the free bytes, which change at every try)
                    cause = f"{type(exc).__name__} {exc.errno}" if isinstance(exc, OSError) and exc.errno else why
                    with self._raw_lock:
                        again = self._raw_failed.get(scan_id, (0.0, "", ""))[2] == cause
                        self._raw_failed[scan_id] = (time.monotonic(), why, cause)
                    if not again:
                        failed.log(logging.ERROR, cause, "cannot copy the raw frames of spool %s into result %s "
                                   "(%s); the spool and its marker %s stay, and the copy is tried again every %g s "
                                   "and at the next start", spool_file, result, why, pending_marker(spool_file),
                                   RAW_FAILED_RETRY_S, exc_info=exc, extra={"scan_id": scan_id})
                        self.metrics.internal_errors.labels(where="spool").inc()
                    continue
                with self._raw_lock:
                    self._raw_pending.pop(scan_id, None)
                    self._raw_failed.pop(scan_id, None)
        finally:
            copied.summary(logging.INFO, "raw copies done (the programs holding their spools let go)")
            failed.summary(logging.ERROR, "raw copies failed",
                           f"their spools and markers stay, tried again every {RAW_FAILED_RETRY_S:g} s and at the "
                           "next start (`status` raw_pending lists them)")
            with self._raw_lock:
                self._raw_retrying = False

    def _retire_copied(self, scan_id: str, spool_file: Path) -> bool:
        """A spool whose frames its result now holds: as finish_result retires one. False where
        its mark could not be written (another program took it for writing again): its marker
        stays, so that no start recovers it as a scan to reconstruct."""
        # (complete_raw_copy's add_raw fsynced the result and its directory: the frames are on disk there)
        discard_journal(spool_file, self.config.spool_fsync)  # (one a kill inside finish_result left)
        if self.config.keep_spool:
            if not self._mark_kept(scan_id, spool_file, "finished", "tried again once that program lets go "
                                   "(its raw-pending marker stays until then)"):
                return False
        else:
            _delete_spool_file(spool_file, missing_ok=True)
        remove_marker(spool_file)
        return True

    def raw_pending(self) -> dict[str, tuple[Path, Path]]:
        with self._raw_lock:
            return dict(self._raw_pending)

    def raw_failures(self) -> dict[str, tuple[str, str]]:
        """scan id → (why, its cause) of each pending raw copy whose last try failed."""
        with self._raw_lock:
            return {scan_id: (why, cause) for scan_id, (_, why, cause) in self._raw_failed.items()}

    def raw_failure(self, scan_id: str) -> str | None:
        """Why the pending raw copy of ``scan_id`` last failed (None: it did not, or was not tried)."""
        with self._raw_lock:
            failed = self._raw_failed.get(scan_id)
        return None if failed is None else failed[1]

    def worker_exited(self, session: Session) -> None:
        self._spool_closed.pop(session.scan_id, None)  # (a worker that did not finish its scan)
        self._exited.put(session)
        self.outbox.wake()

    # -- housekeeping (manager thread) -----------------------------------------------------------
    def reap(self) -> None:
        """Settle scans whose workers have exited, then admit waiting ones; run what the spool
        thread handed back."""
        changed = False
        while True:
            try:
                scan_id, why = self._disk_failed.get_nowait()
            except queue.Empty:
                break
            self.outbox.post("error", {"scan_id": scan_id, "field": "spool", "rule": "internal_error",
                                       "message": f"the spool file could not be written: {why}"})
            failed = self.sessions.get(scan_id)
            if failed is not None and not failed.state.final:
                with failed.lock:  # a receipt answered below already says why (its worker ends it later)
                    failed.error = failed.error or f"spool: {why}"
                self.fail_scan(failed, f"spool: {why}")
        self.run_disk_done()  # after the failures above: receipts waiting for the spool name them
        while True:
            try:
                session = self._exited.get_nowait()
            except queue.Empty:
                break
            worker = self.running.pop(session.scan_id, None)
            held = worker.held_bytes() if isinstance(worker, ScanWorker) else {}
            if held:  # (its close lets go of them later: _let_go, drained below)
                self._lingering[session.scan_id] = held
            # the session stays in the history (HISTORY) long after its worker: holding the
            # worker kept its engine (frame store, canvases: GBs per scan) alive with it
            session.worker = None
            self._settle(session)
            for then in self._after_exit.pop(session.scan_id, []):
                then()
            changed = True
        # after the exits: a close lets go only after the worker's held_bytes() said so
        # (ScanWorker._held_lock), so an id here is that of a lingering entry made already or
        # of one never made (the close was over before the worker's exit was settled)
        while True:
            try:
                scan_id = self._let_go.get_nowait()
            except queue.Empty:
                break
            changed = self._lingering.pop(scan_id, None) is not None or changed
        if changed:
            self.admit()

    def _settle(self, session: Session) -> None:
        state = session.state
        if state.final:
            self._parked.pop(session.scan_id, None)  # (stopped while it waited: closed already)
            with self._raw_lock:
                self._held_spools.discard(session.scan_id)
                self._reopen_waiting.pop(session.scan_id, None)
            share = self._drop_admission_lock(session.scan_id)  # (one whose re-open never came)
            if share is not None:
                share.close()
            self.metrics.scans.labels(outcome=state.value).inc()
            self._forget_old_previews()
            self._log_end(session)
            if session.scan_id in self.spools:
                self._close_spool(session.scan_id, state.value)
            elif state is not State.FINISHED:  # the worker held the spool: mark it (finished ones are retired)
                sid, value = session.scan_id, state.value
                self._after_close(sid, lambda: self._mark_spool(sid, value))
            if state is not State.FINISHED and session.ledger.received == 0:
                sid = session.scan_id
                self._after_close(sid, lambda: self._drop_empty_spool(sid))
        # a non-final session here was interrupted by shutdown: its spool stays open for recovery
        self._update_gauges()

    def _log_end(self, session: Session) -> None:
        """One line per scan that ends, with its outcome: the journal is the record of what
        became of a scan once `list_scans` has forgotten it (or the daemon restarted)."""
        frames = session.ledger.received
        extra = {"scan_id": session.scan_id, "outcome": session.state.value, "frames": frames}
        if session.state is State.FINISHED:
            log.info("scan finished: %d frames, result %s", frames, session.result_path, extra=extra)
            return
        kept = spool_path(self.config.spool_dir, session.scan_id)
        where = f"its {frames} frames are kept in {kept}" if frames else "it received no frame"
        log.log(logging.WARNING if session.state is State.FAILED else logging.INFO,
                "scan %s: %s; %s", session.state.value, session.error, where, extra=extra)

    def _forget_old_previews(self) -> None:
        """Keep the last preview of only the newest FINAL_PREVIEWS ended scans."""
        kept = 0
        for session in reversed(self.sessions.values()):
            if not session.state.final:
                continue
            with session.lock:
                if "last_preview" in session.figures:
                    kept += 1
                    if kept > FINAL_PREVIEWS:
                        del session.figures["last_preview"]

    def _mark_spool(self, scan_id: str, status: str) -> None:
        if scan_id in self.unclosed:  # its journal is its record, and the file is rebuilt from it
            return
        session = self.sessions.get(scan_id)  # (a re-open, which replaces it, waits for this mark)
        if session is not None and session.spool_status == status:
            # its cancel closed it with this status already (_close_spool): not opened again, a
            # receipt said it was closed so, and a reader may hold it (one in this process made
            # this r+ open fail: HDF5 opens a file once per process, read-only then)
            return
        path = spool_path(self.config.spool_dir, scan_id)
        if path.exists():
            if not self._mark_kept(scan_id, path, status):
                return  # its journal stays with it, as after a stop: the next start recovers it
            # closed (not unclosed), the file holds all of it, and its status is final: its journal
            # goes, as a close with a final status drops it (kept, the stop listed the spool as one
            # the next start recovers, and the next start dropped it)
            if self.config.spool_fsync:
                fsync_path(path)
            discard_journal(path, self.config.spool_fsync)

    def _mark_kept(self, scan_id: str, path: Path, status: str,
                   then: str = "unmarked, the next start recovers its scan again") -> bool:
        """Write a closed spool's final status (spool.mark_status); False where another program
        holds the file open for writing (logged: written beside it, the mark was lost or left the
        file unreadable at that program's close)."""
        try:
            mark_status(path, status)
        except SpoolInUse as exc:
            log.error("spool not marked %s: %s; %s", status, exc, then, extra={"scan_id": scan_id})
            return False
        return True

    def _drop_empty_spool(self, scan_id: str) -> None:
        """Closer thread, after the close or mark of a scan that ended without a frame."""
        path = spool_path(self.config.spool_dir, scan_id)
        try:
            status = remove_if_empty(path)
        except OSError as exc:
            # the scan is over and nothing was lost: not a spool write that failed (which would
            # publish an error for it); the file stays, and the next start tries again
            log.warning("could not remove spool %s of a scan that ended before its first frame: %s", path.name, exc,
                        extra={"scan_id": scan_id})
            return
        if status is not None:
            log.info("removed spool %s: its scan ended %s before its first frame (the file held none)", path.name, status,
                     extra={"scan_id": scan_id})

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.state.final or session.ended:
                continue
            limit = self.config.recover_wait_s if session.recovered else self.config.acquisition_timeout_s
            if now - session.last_activity <= limit:
                continue
            ledger = session.ledger
            # frames read but not yet written by the spool thread (behind on a busy host) are
            # kept all the same: counting only those on disk would call a whole scan partial,
            # and name fewer frames than its receipt and spool hold once the writes are done
            held = ledger.admitted
            if session.spec.expected_frames is None or held >= ledger.expected:
                log.warning("no frames for %.0f s: ending scan with what it has", limit,
                            extra={"scan_id": session.scan_id})
                self.end_scan(session, reason="acquisition_timeout")
                continue
            # the sender went silent mid-scan (killed, crashed, cable), or no producer came back
            # to a scan recovered open after a restart: a partial reconstruction labelled
            # "finished" would hide the loss (a subscriber takes scan.finished for the whole
            # scan), so the scan stops with its frames kept in the spool, and `finish_scan`
            # reconstructs them if the operator wants that. A recovered scan is no exception:
            # the daemon's restart does not make 500 of 1024 frames a complete scan.
            if session.recovered and self.config.recover_finish_partial:
                # (opted in: an unattended facility wants the result; it says it is partial)
                log.warning("no frame for %g s after %d of %d frames (the producer did not return after the "
                            "daemon's restart): reconstructing what the scan holds (recover_finish_partial), "
                            "its result marked partial", limit, held, ledger.expected,
                            extra={"scan_id": session.scan_id})
                self.end_scan(session, reason="recover_finish_partial")
                continue
            why = ("the producer did not return after the daemon's restart" if session.recovered
                   else "the sender stopped without scan_end")
            reason = (f"acquisition_timeout: no frame for {limit:g} s after {held} of "
                      f"{ledger.expected} frames ({why}); the frames are "
                      "kept in the spool: control `finish_scan` reconstructs them")
            log.warning(reason, extra={"scan_id": session.scan_id})
            self.abort_scan(session, reason)

    def finish_scan(self, session: Session, done: Callable[[Session | None, Exception | None], None]) -> None:
        """Control `finish_scan`: reconstruct what a scan received, now. An open scan is ended
        (its producer is gone or done without scan_end); a scan stopped without a result
        (acquisition timeout, cancel, abort, failure) is re-opened from its spool and refined.
        Idempotent: a scan already ended or re-opened is left as it is.

        Calls ``done(live session, None)`` or ``done(None, ScanRefused or other error)`` on the
        manager thread once the spool thread has done every operation asked for before (the
        frames read before the request are counted); the spool file is read there too, so the
        manager loop never waits for the disk."""
        try:
            if not session.state.final:
                if not session.ended and session.end_reason is not None:
                    raise ScanRefused("scan_id", "scan_stopping",
                                      f"scan {session.scan_id!r} is stopping ({session.end_reason}); "
                                      "ask again once it is aborted")
                self.end_scan(session, reason="finish_scan")
                self.admit()
                self.after_disk(lambda: None, lambda _r, err: done(None, err) if err else done(session, None))
                return
            waiters = self._reopening.get(session.scan_id)
            if waiters is not None:  # a re-open of it is under way (a repeated request): its answer
                waiters.append(done)
                return
            if session.state is State.FINISHED:
                raise ScanRefused("scan_id", "scan_finished", f"scan {session.scan_id!r} is already finished")
            if session.scan_id in self.running:
                # its worker has stopped it and is exiting (a receipt may already say so): the
                # scan is re-opened once the worker is gone, not refused for being too early
                def later() -> None:
                    try:
                        self.finish_scan(session, done)
                    except Exception as exc:  # noqa: BLE001 - answered as the request's failure
                        done(None, exc)

                self._after_exit.setdefault(session.scan_id, []).append(later)
                return
            if self.stopping:
                raise ScanRefused("scan_id", "service_stopping", "the service is shutting down")
        except ScanRefused as exc:
            done(None, exc)
            return
        self._reopening[session.scan_id] = [done]
        # on the spool thread, after it closed this file (the scan's last spool operation)
        self.after_disk(lambda: self._reopen_spool(session.scan_id),
                        lambda opened, err: self._reopened(session, opened, err))

    def finish_kept(self, scan_id: str, done: Callable[[Session | None, Exception | None], None]) -> None:
        """Control `finish_scan` of a scan the daemon no longer holds (it restarted, or more than
        HISTORY scans came since) whose spool it kept because the scan stopped without a result
        (status aborted or failed: not recovered at start). The abort reason tells the operator
        that `finish_scan` reconstructs those frames; until fieldqa9 (main ec52969) the request
        was refused as an unknown scan once the daemon had restarted. Answered as
        :meth:`finish_scan` is."""
        waiters = self._reopening.get(scan_id)
        if waiters is not None:  # a repeated request while the first one's re-open is under way
            waiters.append(done)
            return
        if self.stopping:
            done(None, ScanRefused("scan_id", "service_stopping", "the service is shutting down"))
            return
        self._reopening[scan_id] = [done]
        self.after_disk(lambda: self._reopen_kept(scan_id),
                        lambda opened, err: self._reopened_kept(scan_id, opened, err))

    def _reopen_kept(self, scan_id: str) -> tuple[Any, dict[str, int], SpoolWriter]:
        """Spool thread: :meth:`_reopen_spool` for a kept spool of a stopped scan, refused by
        name for any other file (a finished scan's kept spool, an open one another daemon of
        the directory may hold)."""
        path = spool_path(self.config.spool_dir, scan_id)
        if not path.exists():
            raise ScanRefused("scan_id", "known_scan", f"unknown scan {scan_id!r}: the daemon holds no scan "
                                                       f"of that id and no spool file {path.name}")
        try:
            status = read_spool(path, frames=False).status
        except BlockingIOError as exc:
            raise ScanRefused("scan_id", "spool_in_use", f"scan {scan_id!r}: its spool {SpoolInUse(path, exc)}") from exc
        except (OSError, ValueError) as exc:
            raise ScanRefused("scan_id", "spool_readable", f"scan {scan_id!r}: its spool {path} cannot be "
                                                           f"read ({type(exc).__name__}: {exc})") from exc
        if status not in ("aborted", "failed"):
            raise ScanRefused("scan_id", "stopped_scan", f"scan {scan_id!r} is not held by the daemon and its "
                                                         f"spool {path.name} has status {status!r}: only a stopped "
                                                         "scan's kept spool (aborted or failed) is re-opened")
        return self._reopen_spool(scan_id)

    def _reopened_kept(self, scan_id: str, opened: Any, error: Exception | None) -> None:
        """Manager thread: register a kept spool re-opened by :meth:`_reopen_kept`, as a scan
        recovered from before a restart (its summary and result say so)."""
        if error is None and scan_id in self.sessions:
            # cannot come from a scan_start (the spool makes the id taken); refused as one would be
            error = ScanRefused("scan_id", "unique_scan_id", f"scan {scan_id!r} already exists")
            opened[2].close()
        if error is not None:
            for done in self._reopening.pop(scan_id, []):
                done(None, error)
            return
        contents, need, _spool = opened
        self._reopened(Session(contents.spec, need, recovered=True), opened, None)

    def _reopen_spool(self, scan_id: str) -> tuple[Any, dict[str, int], SpoolWriter]:
        """Spool thread: read a stopped scan's spool and open it again for its worker."""
        self._wait_closed(scan_id)
        path = spool_path(self.config.spool_dir, scan_id)
        if not path.exists():
            raise ScanRefused("scan_id", "spool_kept", f"scan {scan_id!r} has no spool file left ({path.name}; "
                                                       "one that held no frame is removed at its scan's end)")
        try:
            contents = read_spool(path, frames=False)
        except BlockingIOError as exc:  # HDF5's file lock: a writer holds it (a reader's lets it read)
            raise ScanRefused("scan_id", "spool_in_use", f"scan {scan_id!r}: its spool {SpoolInUse(path, exc)}") from exc
        if not len(contents.indices):
            raise ScanRefused("scan_id", "frames_received", f"scan {scan_id!r} received no frame")
        need = self._reservation(contents.spec, self._options_for(contents.spec))
        try:
            spool = SpoolWriter.reopen(path, fsync=self.config.spool_fsync,
                                       reserve_bytes=self.config.disk_reserve_bytes)
        except SpoolInUse as exc:  # an operator's writer: a refusal naming it, not an internal error
            raise ScanRefused("scan_id", "spool_in_use", f"scan {scan_id!r}: its spool {exc}") from exc
        try:
            spool.set_status("ended")
        except Exception:
            spool.close()
            raise
        return contents, need, spool

    def _reopened(self, session: Session, opened: Any, error: Exception | None) -> None:
        """Manager thread: register the re-opened scan (``opened`` by :meth:`_reopen_spool`)
        and answer everyone who asked for it."""
        waiters = self._reopening.pop(session.scan_id, [])
        live: Session | None = None
        if error is None:
            contents, need, spool = opened
            if self.stopping:  # its spool says "ended": the next start recovers it
                error = ScanRefused("scan_id", "service_stopping", "the service is shutting down")
                try:
                    spool.close()
                except Exception as exc:  # the request is still answered; its journal keeps the frames
                    kept = self.unclosed[session.scan_id] = self._kept_note(spool)
                    log.error("closing the spool failed (%s: %s); %s", type(exc).__name__, exc, kept,
                              exc_info=exc, extra={"scan_id": session.scan_id})
                    self.metrics.internal_errors.labels(where="spool").inc()
            else:
                live = self._register_reopened(session, contents, need, spool)
        for done in waiters:
            done(live, error)

    def _register_reopened(self, session: Session, contents: Any, need: dict[str, int],
                           spool: SpoolWriter) -> Session:
        spec = contents.spec
        # a scan recovered after a restart stays one when re-opened (its summary and result say so)
        reopened = Session(spec, need, recovered=session.recovered)
        reopened.ledger.stored(int(reopened.ledger.admit(contents.indices).sum()))
        reopened.ended, reopened.end_reason = True, "finish_scan"
        # the stopped record is replaced by the live one (history trimming may have dropped it)
        self.sessions.pop(session.scan_id, None)
        while session.scan_id in self.waiting:  # stopped while waiting: admit() had not dropped it
            self.waiting.remove(session.scan_id)
        self._register(reopened, spool)
        self.unclosed.pop(session.scan_id, None)  # its spool was rebuilt from its journal (SpoolWriter.reopen)
        log.info("scan re-opened from its spool to finish (%d frames)", spool.count,
                 extra={"scan_id": spec.scan_id})
        self.outbox.post("scan.accepted", {"scan_id": spec.scan_id, "reopened": True,
                                           "expected_frames": spec.expected_frames,
                                           "frames": reopened.ledger.as_dict()})
        self.admit()
        return reopened

    def queued_frames(self) -> int:
        return sum(w.queued_frames for w in self.running.values())

    def backpressure(self) -> bool:
        """True while any worker's queue is over capacity, or the spool thread is behind by more
        than SPOOL_BACKLOG_BYTES: the manager stops reading ingest."""
        with self._disk_lock:
            if self._disk_backlog > SPOOL_BACKLOG_BYTES:
                return True
        return any(w.queued_frames > self.config.queue_capacity_frames for w in self.running.values())

    def _update_gauges(self) -> None:
        counts = {s: 0 for s in State}
        for session in self.sessions.values():
            counts[session.state] += 1
        for state, n in counts.items():
            self.metrics.scans_in_state.labels(state=state.value).set(n)
        for dev, b in self.reserved().items():
            self.metrics.memory_reserved.labels(device=dev).set(b)
        self.metrics.queue_depth.set(self.queued_frames())

    def _trim_history(self) -> None:
        while len(self.sessions) > HISTORY:
            # a final scan whose worker has not exited yet is still running: reserved() and the
            # worker's exit look it up, so it stays until it is settled
            oldest = next((k for k, s in self.sessions.items() if s.state.final and k not in self.running), None)
            if oldest is None:
                return
            del self.sessions[oldest]

    # -- recovery and shutdown ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Re-open the unfinished scans of the spool directory (after a crash or a drain)."""
        recovered = []
        removed = Bounded(log)  # (a line each: a directory of thousands wrote as many)
        for part in discard_half_created(self.config.spool_dir):
            removed.log(logging.WARNING, "half-created spool files", "removed %s: a spool file the daemon was "
                        "killed creating (it held no frame)", part)
        for empty in empty_final_spools(self.config.spool_dir):  # (kept by earlier releases)
            if remove_if_empty(empty) is not None:
                removed.log(logging.INFO, "empty spools of failed or aborted scans", "removed spool %s: its scan "
                            "failed or was aborted before its first frame (it held no frame)", empty.name)
        removed.summary(logging.INFO, "spool files removed that held no frame")
        refused, waiting = Bounded(log), Bounded(log)
        # the spools past the first LOG_ITEMS_MAX of each kind: published as one event, not one
        # each (1,000 bad spools posted 1,000 error events at once, past every subscriber's queue)
        refused_past: list[Path] = []
        waiting_past: list[Path] = []
        for path in unfinished_spools(self.config.spool_dir):
            held = held_for_writing(path)
            if held is not None:
                self._recover_later(path, held, waiting, waiting_past)
                continue
            try:
                found = self._examine(path)
            except (OSError, ValueError, KeyError) as exc:
                self._not_recovered(path, exc, refused, refused_past)
                continue
            if found is not None:
                recovered.append(self._register_recovered(*found))
        self._post_past(refused, refused_past, "recoverable_spool", "cannot be recovered by this daemon",
                        "each is left as it is, tried again at every start")
        self._post_past(waiting, waiting_past, "spool_in_use", "are open for writing in another program (HDF5's "
                        "exclusive file lock)", "each is recovered once that program closes it")
        refused.summary(logging.ERROR, "spools this daemon cannot recover (published as error events: the first "
                        f"{refused.most} one by one, the rest in one)", "each is left as it is, tried again at every start")
        waiting.summary(logging.WARNING, "spools open for writing in another program", "each is recovered once "
                        "that program closes it")
        self.admit()
        return recovered

    def _examine(self, path: Path) -> tuple[Any, int, SpoolWriter | None] | None:
        """An unfinished spool made ready to be recovered: its contents (frames unread), its
        reservation and its writer (None: ended, it waits parked); None where there is no scan to
        recover. Raises (OSError, ValueError, KeyError) where it cannot be."""
        # a kill inside HDF5's flush: the journal has every frame
        repaired = repair_spool(path, self.config.disk_reserve_bytes)
        if repaired is not None:
            log.warning("spool %s %s", path.name, repaired)
        contents = read_spool(path, frames=False)
        spec = contents.spec
        if spec.scan_id in self.sessions:
            return None
        if contents.status not in ("open", "ended"):  # killed as its final status was written
            discard_journal(path, self.config.spool_fsync)
            return None
        unreadable = check_spool_readable(path)
        if unreadable is not None:  # a child read the frames: a crash there stops no daemon
            raise ValueError(unreadable)
        options = self._options_for(spec)
        need = self._reservation(spec, options)
        # an ended scan takes no more appends: it waits parked (closed), as in end_scan
        spool = None if contents.status == "ended" else SpoolWriter.reopen(
            path, fsync=self.config.spool_fsync, reserve_bytes=self.config.disk_reserve_bytes)
        return contents, need, spool

    def _not_recovered(self, path: Path, exc: BaseException, said: Bounded | None = None,
                       past: list[Path] | None = None) -> None:
        """Log and publish a spool that cannot be recovered; in a start's pass (``said``), one
        past its first LOG_ITEMS_MAX goes to ``past`` instead, for :meth:`_post_past`."""
        self.unrecovered.add(path)
        if said is None:
            log.error("cannot recover spool %s: %s", path, exc)
        else:  # (a start's pass over the spool directory)
            one_by_one = past is None or said.logged < said.most
            said.log(logging.ERROR, type(exc).__name__, "cannot recover spool %s: %s", path, exc)
            if not one_by_one:
                past.append(path)  # type: ignore[union-attr]
                return
        self.outbox.post("error", {"field": "spool", "rule": "recoverable_spool",
                                   "message": f"{path}: {exc}", "scan_id": None})

    def _post_past(self, said: Bounded, past: list[Path], rule: str, what: str, then: str) -> None:
        """One ``error`` event for the spools of a start's pass not published one by one (past
        the first ``said.most``): their number, causes as counted for the log, the first names."""
        if not past:
            return
        causes = "; ".join(f"{n} × {cause}" for cause, n in said.left.most_common(said.most))
        message = (f"{len(past)} more spool files in {self.config.spool_dir} {what} (after the first {said.most}, "
                   f"each published on its own): {named(p.name for p in past)}"
                   + (f"; causes: {causes}" if causes else "") + f"; {then}")
        self.outbox.post("error", {"field": "spool", "rule": rule, "message": message, "scan_id": None})

    def _register_recovered(self, contents: Any, need: int, spool: SpoolWriter | None) -> str:
        spec = contents.spec
        session = Session(spec, need, recovered=True)
        session.ledger.stored(int(session.ledger.admit(contents.indices).sum()))
        session.ended = contents.status == "ended"
        if spool is None:
            self._parked[spec.scan_id] = parked = _SpoolClosed()
            parked.set()
        self._register(session, spool)
        log.info("recovered scan from spool (%d frames, %s)", len(contents.indices), contents.status,
                 extra={"scan_id": spec.scan_id})
        self.outbox.post("scan.accepted", {"scan_id": spec.scan_id, "recovered": True,
                                           "expected_frames": spec.expected_frames,
                                           "frames": session.ledger.as_dict()})
        return spec.scan_id

    def _recover_later(self, path: Path, held: SpoolInUse, said: Bounded, past: list[Path]) -> None:
        """A start's unfinished spool that another program holds open for writing (an operator's
        ``h5py.File(spool, "r+")``): not read beside it (written beside a writer, frames came back
        unreadable), nor left to the next start as before ("cannot recover spool"): looked at
        again every RAW_RETRY_S (:meth:`retry_held_recoveries`) and recovered once it lets go."""
        message = (f"{path} is open for writing in another program (HDF5's exclusive file lock), beside which the "
                   "daemon does not read it: its scan is recovered once that program closes the file (h5py: "
                   "File.close(), or end that Python session)")
        if said.logged >= said.most:  # (published with the others past the first: _post_past)
            past.append(path)
        else:
            self.outbox.post("error", {"field": "spool", "rule": "spool_in_use", "message": message,
                                       "scan_id": None})
        said.log(logging.WARNING, "held for writing", "%s", message)
        self.unrecovered.add(path)  # (the stop's report names it while it waits)
        self._held_at_start[path] = time.monotonic()

    def retry_held_recoveries(self) -> list[str]:
        """Housekeeping (manager thread): the spools :meth:`_recover_later` waits on, looked at
        again once RAW_RETRY_S went by; one no longer held is examined off this thread (a child
        reads its frames: seconds for a large spool, which ping and ingest must not wait for),
        and its scan registered here once that is done. The ids of the scans recovered."""
        recovered: list[str] = []
        for path, future in list(self._late_recoveries.items()):
            if not future.done():
                continue
            del self._late_recoveries[path]
            try:
                found = future.result()
            except (OSError, ValueError, KeyError) as exc:
                if isinstance(exc, SpoolInUse):  # taken again before it was read: waits on
                    self._held_at_start[path] = time.monotonic()
                else:
                    self._not_recovered(path, exc)
                continue
            if found is None:
                self.unrecovered.discard(path)
                continue
            contents, _, spool = found
            if self.stopping or contents.spec.scan_id in self.sessions:
                # a scan of that id was started meanwhile, or the daemon stops: left for the next start
                if spool is not None:
                    spool.close()
                continue
            self.unrecovered.discard(path)
            recovered.append(self._register_recovered(*found))
        if self.stopping:
            return recovered
        now = time.monotonic()
        for path, when in list(self._held_at_start.items()):
            if now - when < RAW_RETRY_S:
                continue
            if not path.exists():
                del self._held_at_start[path]
                self.unrecovered.discard(path)
                log.warning("spool %s, which another program held for writing, is gone: nothing to recover", path)
                continue
            if held_for_writing(path) is not None:
                self._held_at_start[path] = now
                continue
            del self._held_at_start[path]
            log.info("spool %s let go of by the other program: recovering its scan", path.name)
            self._late_recoveries[path] = self._recoverer.submit(self._examine, path)
        if recovered:
            self.admit()
        return recovered

    def held_at_start(self) -> set[Path]:
        """The unfinished spools a start found held for writing that still wait for their writer
        to close them (manager thread, or after :meth:`close`)."""
        return set(self._held_at_start)

    def load_raw_pending(self) -> None:
        """The results a stop left without their raw frames (their spools' markers): copied by
        retry_raw_copies, whether ``recover`` is on or not: the scan is over, only its result
        lacks the frames. Their spools are not scans to recover (unfinished_spools skips them)."""
        # (a line each, two paths in it: thousands of results waiting wrote tens of MB at a start)
        bad, gone, waits = Bounded(log), Bounded(log), Bounded(log)
        for marker in pending_markers(self.config.spool_dir):
            try:
                spool_file, scan_id, result = read_pending(marker)
            except ValueError as exc:
                # (it keeps its spool from recovery: said, with what to do, or the spool stayed unexplained)
                spool_file = marker.with_name(marker.name[: -len(PENDING_SUFFIX)])
                bad.log(logging.ERROR, "malformed", "%s; it is left as it is, and so is its spool %s: neither "
                        "recovered nor copied into a result while the marker is there. Write it again as "
                        "{\"scan_id\": …, \"result\": the result file lacking /raw}, or remove it (a start with "
                        "recover on then reconstructs the scan from the spool again)", exc, spool_file.name)
                continue
            if not spool_file.exists():
                gone.log(logging.WARNING, "spool gone", "removed %s: its spool %s is gone", marker, spool_file.name)
                marker.unlink()
                continue
            waits.log(logging.INFO, "waiting", "result %s still lacks its raw frames (/raw): copying them from "
                      "spool %s once no other program holds it for writing", result, spool_file,
                      extra={"scan_id": scan_id})
            with self._raw_lock:
                self._raw_pending[scan_id] = (spool_file, result)
        bad.summary(logging.ERROR, "raw-pending markers that are not ones", "each is left as it is, and so is its "
                    "spool: write it again as {\"scan_id\": …, \"result\": …}, or remove it")
        gone.summary(logging.WARNING, "raw-pending markers removed: their spools are gone")
        waits.summary(logging.INFO, "results still lack their raw frames (/raw)", "copied from their spools once "
                      "no other program holds them (`status` raw_pending lists them)")

    def interrupt(self, ended_too: bool) -> None:
        """Shutdown: stop workers without a final state (their scans stay in the spool and are
        recovered at the next start). Scans whose scan_end arrived are left to finish unless
        ``ended_too``."""
        self.stopping = True
        self.workers_started()
        for worker in self.running.values():
            if ended_too or not worker.session.ended:
                worker.put(Interrupt())

    def close(self) -> None:
        for scan_id in list(self.spools):
            self._close_spool(scan_id)
        self._disk.shutdown(wait=True)
        self._closer.shutdown(wait=True)
        # (a pass under way ends with its copy: one cut short leaves only a hidden .part result)
        self._raw_copier.shutdown(wait=True, cancel_futures=True)
        self._recoverer.shutdown(wait=True, cancel_futures=True)
        self._launcher.shutdown(wait=True)
        self._file_checks.shutdown(wait=True)
        with self._raw_lock:  # (admitted at the stop, their re-open not run)
            shares, self._admission_locks = list(self._admission_locks.values()), {}
        for share in shares:
            share.close()
        for path, future in self._late_recoveries.items():  # examined, not registered: the next start's
            failed = None if future.cancelled() else future.exception()
            if isinstance(failed, SpoolInUse):  # taken for writing again: still waits for its writer
                self._held_at_start[path] = time.monotonic()
            elif failed is not None:  # (as retry_held_recoveries would have: said, and named at the stop)
                log.error("cannot recover spool %s: %s", path, failed)
            else:
                found = None if future.cancelled() else future.result()
                if found is not None and found[2] is not None:
                    found[2].close()
                # (let go of, and not refused: the stop's report counts it among the spools the
                # next start recovers, not those this daemon could not)
                self.unrecovered.discard(path)
        self._late_recoveries.clear()
        self.run_disk_done()  # answers to requests that waited for the spool thread
