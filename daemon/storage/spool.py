"""The spool: every received frame on disk before it counts as received.

One HDF5 file per scan, ``<spool_dir>/<scan_id>.spool.h5``, whose raw part follows the
NXcxi_ptycho / CXI layout, so a spool file is also a valid raw-data file. Layout: daemon/storage/
FORMATS.md § "Spool file", the one reference; change it there with this module.

``/entry_1/data_1`` attr ``count`` is written *after* the rows and before the flush: a crash
mid-append leaves the previous count, so a reader never sees a half-written frame.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
from cryoptycho.daemon.scan import SPOOL_ARRAYS, ScanSpec, spec_from_spool_header, spool_header
from cryoptycho.daemon.storage.dataset import compression
from cryoptycho.daemon.storage.diskspace import require_free_space
from cryoptycho.daemon.storage.h5format import (
    FILTER_NOTE,
    NxcxiEntry,
    chunk_rows,
    nav_shape_of,
    open_checked,
    write_nav_shape,
)
from cryoptycho.daemon.storage.journal import (
    Journal,
    Record,
    fsync_path,
    iter_bodies,
    iter_records,
    journal_path,
    scan_records,
    unknown_kind,
)
from cryoptycho.daemon.storage.readcheck import READ_TIMEOUT_S
from cryoptycho.protocols.compression import (
    BLOCK_BYTES,
    bslz4_block_elements,
    bslz4_concat,
    bslz4_decompress,
    bslz4_header,
    bslz4_slices,
    default_block_elements,
)
from cryoptycho.protocols.compression import bslz4_compress as compression_bslz4
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.schema import SCAN_ID_PATTERN
from cryoptycho.protocols.sources import RawChunks

log = logging.getLogger("cryoptycho.spool")

FORMAT = "cryoptycho-spool"
#: statuses a scan's spool ends with: its journal is deleted once the file is closed
FINAL_STATUSES = ("finished", "aborted", "failed")
#: the newest version this code reads; a spool whose binned ``data`` rows may be derived from
#: ``detector_frames`` (:data:`DERIVED`) is version 2, others are version 1, as before
FORMAT_VERSION = 2
_PLAIN_VERSION = 1
SUFFIX = ".spool.h5"
#: beside a finished scan's spool whose frames its result still lacks (rawcopy.py): that spool
#: is no scan to recover
PENDING_SUFFIX = ".raw-pending"
#: bytes of a file stem: a file name holds 255 bytes, and ".spool.h5" / ".h5" / ".phase.mrc" / ".phase.png"
#: must still fit behind it
MAX_STEM = 200
_HASH_HEX = 32  # 128 bits of SHA-256: no two scan ids share a stem in practice
DATA = "entry_1/data_1"
#: unbinned frames of a detector source, beside ``data`` (HDF5 bitshuffle filter id)
DETECTOR_FRAMES = "detector_frames"
#: the frames of ``detector_frames``' rows whose chunk was part full when they came (spool.py
#: SpoolWriter._write_detector; read both with :func:`read_detector_frames`)
DETECTOR_TAIL = "detector_frames_tail"
#: detector frames the scan has no position for (a DECTRIS series with more images than the
#: scan's positions), one frame a chunk as the detector sent it, in arrival order, and their
#: detector image ids: kept, not reconstructed (FORMATS.md)
UNPOSITIONED = "unpositioned_detector_frames"
UNPOSITIONED_IDS = "unpositioned_image_id"
BITSHUFFLE_FILTER = "32008"
#: how :meth:`SpoolWriter.append_many` wrote whole chunks of ``data``: ``as_received`` (the
#: sender's bslz4 bytes, HDF5 direct chunk write) or compressed here, because the frames came
#: without bslz4 bytes (``not_bslz4``: raw or lz4 on the wire, or some dropped as duplicates),
#: in another bitshuffle block size (``block_size``), the chunk spans two messages
#: (``spans_messages``) or does not start and end on the sender's blocks (``alignment``)
CHUNK_PATHS = ("as_received", "not_bslz4", "block_size", "spans_messages", "alignment")
#: how chunks of ``detector_frames`` were written (counted with :data:`CHUNK_PATHS`): the
#: frames' bslz4 blocks joined under one header (``detector_as_received``), decoded and
#: compressed again because their blocks do not join (``detector_recompressed``: another block
#: size than the chunk's other frames), one frame a chunk (``detector_per_frame``: a frame that
#: is not a whole number of blocks, or a spool file of an earlier release); frames written to
#: the tail because their chunk was not whole yet (``detector_tail``, one a chunk), and chunks
#: written again (``detector_rewritten``: only a scan's last chunk, when frames come after the
#: scan ended and closed it)
DETECTOR_CHUNK_PATHS = ("detector_as_received", "detector_recompressed", "detector_per_frame",
                        "detector_tail", "detector_rewritten")


#: how a detector source's binned frames are computed from ``detector_frames`` (a group in
#: ``entry_1/data_1``: the reducer's geometry as attributes, ``window_valid``): while a scan is
#: open its binned ``data`` is not written, only its detector frames (which it is a pure
#: function of); the rows whose ``data`` is still to be derived are the group's attribute
#: ``pending_rows`` ((k, 2) [start, stop) ranges). They are written once, when the spool of a
#: scan that ended is closed (:meth:`SpoolWriter.close`), and every reader derives them until then
#: (:func:`fill_derived`): byte for byte the frames the scan received.
DERIVED = "data_from_detector"
#: rows derived (decoded and binned) at a time: bounds a reader's memory
_DERIVE_ROWS = 512

#: bytes of journal records applied to the file at a time (their appends as one)
_APPLY_BYTES = 64 << 20

#: rows ``detector_frames_tail`` grows by when it must (a resize per append costs tens of µs)
_TAIL_STEP = 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_POOL_THREADS = max(2, os.cpu_count() or 2)


def _compress_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="spool-compress")
        return _pool


def _compress_all(chunks: list[np.ndarray]) -> list[bytes]:
    return [compression_bslz4(chunk) for chunk in chunks]


class _RowRun:
    """Rows of ``data`` to write through HDF5's filter, gathered while they are consecutive (a
    part-full chunk that several appends filled is then read, filled and written once), up to
    :data:`_RUN_BYTES`."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self._ds = ds
        self._start = self._stop = 0
        self._parts: list[np.ndarray] = []
        self._bytes = 0

    def add(self, row: int, rows: np.ndarray) -> None:
        if self._parts and (row != self._stop or self._bytes > _RUN_BYTES):
            self.write()
        if not self._parts:
            self._start = row
        self._parts.append(rows)
        self._bytes += rows.nbytes
        self._stop = row + len(rows)

    def write(self) -> None:
        if self._parts:
            rows = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
            self._ds[self._start:self._stop] = rows
            self._parts, self._bytes = [], 0


#: bytes of consecutive rows written through the filter at once when journal records are applied
_RUN_BYTES = 16 << 20


class _Rows:
    """Rows [k, k + n) of the spool held by consecutive blocks, sliced by spool row: a view
    when the slice lies in one block, a copy of just that slice when it spans blocks."""

    def __init__(self, blocks: list[np.ndarray], k: int) -> None:
        self._blocks = blocks
        self._starts = np.cumsum([k] + [len(b) for b in blocks])

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi = rows.start, rows.stop
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            start, end = int(self._starts[i]), min(hi, int(self._starts[i + 1]))
            pieces.append(self._blocks[i][lo - start : end - start])
            lo, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass(frozen=True)
class FftOrder:
    """Host frames (n, M, M) in a frame store's FFT order (zero frequency at [0, 0]), as a
    :data:`HeldFrames` may give them: the spool puts them in detector order chunk by chunk on
    its compression threads, in one pass with the cast to ``data``'s dtype (:func:`_to_detector`),
    where a copy in detector order on the closing thread cost ≈ 4.5 µs a 96×96 uint32 frame."""

    rows: np.ndarray

    def __getitem__(self, rows: slice) -> FftOrder:
        return FftOrder(self.rows[rows])


def _to_detector(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """FFT-order ``frames`` as a new array in detector order (``fftshift``) of ``dtype``, which
    holds their counts (checked by the caller): for even sides one pass that swaps the halves
    and casts."""
    n, my, mx = frames.shape
    out = np.empty(frames.shape, dtype)
    if my % 2 or mx % 2:
        out[...] = np.fft.fftshift(frames, axes=(1, 2))
    else:
        out.reshape(n, 2, my // 2, 2, mx // 2)[...] = frames.reshape(n, 2, my // 2, 2, mx // 2)[:, ::-1, :, ::-1]
    return out


#: rows [start, stop) of an ended scan's binned frames as the scan holds them in memory (host
#: frames of the reducer's dtype and ``data``'s frame shape, in detector order or :class:`FftOrder`),
#: or None where it holds none: the derived rows are then written without decoding them
#: (daemon/worker.py ScanWorker.held_frames)
HeldFrames = Callable[[int, int], "np.ndarray | FftOrder | None"]
#: the largest count of an ended scan's binned frames (those :data:`HeldFrames` gives), or None
#: where it is not known: the derived rows are then stored in the reducer's dtype
HeldPeak = Callable[[], "int | None"]


class _TooNarrow(ValueError):
    """A derived row holds a count that the dtype chosen for ``data`` does not hold."""

    def __init__(self, count: int) -> None:
        super().__init__(f"count {count}")
        self.count = count


class _HeldRows:
    """The binned frames of derived rows at a scan's end: as :data:`HeldFrames` gives them
    where it does and they pass the check (:meth:`checked`), else derived from the detector
    frames. Counts the rows of each (``frame_store``, ``detector_frames``)."""

    def __init__(self, writer: SpoolWriter, held: HeldFrames | None) -> None:
        self._w = writer
        self._held = held
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def ask(self, lo: int, hi: int) -> np.ndarray | FftOrder | None:
        """Rows [lo, hi) as ``held`` gives them, unchecked; None (and not asked again) where
        it has none."""
        held = self._held
        if held is None:
            return None
        try:
            rows = held(lo, hi)
        except Exception:  # the rows are derived instead: the spool is written all the same
            log.exception("spool %s: the scan's binned frames of rows %d..%d could not be read; "
                          "decoded from %s instead", self._w.path.name, lo, hi, DETECTOR_FRAMES)
            rows = None
        if rows is None:
            self._held = None
        return rows

    def checked(self, lo: int, hi: int, given: np.ndarray | FftOrder | None) -> np.ndarray | FftOrder:
        """Rows [lo, hi): ``given`` if it has their shape and dtype and its first and last
        rows are those derived from their detector frames (a store that missed, reordered or
        changed frames shows there), else derived whole."""
        w = self._w
        ds = w._data
        if given is not None:
            fft = isinstance(given, FftOrder)
            rows = given.rows if fft else given

            def row(r: int) -> np.ndarray:
                return _to_detector(rows[r - lo:r - lo + 1], rows.dtype)[0] if fft else rows[r - lo]

            # (uint8: a frame store that held every count in a byte, gpu/framestore.py narrow)
            ok = (isinstance(rows, np.ndarray) and rows.shape == (hi - lo, *ds.shape[1:])
                  and (rows.dtype == w._reducer.out_dtype
                       or (rows.dtype == np.uint8 and np.can_cast(rows.dtype, w._reducer.out_dtype)))
                  and all(np.array_equal(row(r), derive_rows(w._f, w._reducer, r, r + 1, fast=True)[0])
                          for r in sorted({lo, hi - 1})))
            if ok:
                with self._lock:
                    self.counts["frame_store"] += hi - lo
                return given if fft else np.ascontiguousarray(given)
            log.warning("spool %s: the scan's binned frames of rows %d..%d are not those of its %s: "
                        "decoded from them instead", w.path.name, lo, hi, DETECTOR_FRAMES)
            self._held = None
        with self._lock:
            self.counts["detector_frames"] += hi - lo
        return derive_rows(w._f, w._reducer, lo, hi, fast=True)

    def rows(self, lo: int, hi: int) -> np.ndarray | FftOrder:
        return self.checked(lo, hi, self.ask(lo, hi))


def spool_path(spool_dir: str | Path, scan_id: str) -> Path:
    # every scan id the protocol accepts, at any configured length limit, names a spool file
    if not isinstance(scan_id, str) or not re.fullmatch(SCAN_ID_PATTERN, scan_id):
        raise ValueError(
            f"scan_id {scan_id!r} cannot name a spool file: use A-Z a-z 0-9 . _ : @ + -, "
            "starting with a letter or digit"
        )
    return Path(spool_dir) / f"{file_stem(scan_id)}{SUFFIX}"


def file_stem(scan_id: str) -> str:
    """The scan's name in file names (spool and results), at most :data:`MAX_STEM` bytes.

    ':' is not portable (Windows, SMB shares), so it becomes '%3A'; '%' is never part of a scan
    id, so escaping alone is injective. An escaped id longer than :data:`MAX_STEM` keeps its
    first characters (readable in a listing) and ends in '~' and a SHA-256 of the whole id:
    '~' appears in no scan id and in no escaped stem, so a shortened stem never equals a full
    one, and two shortened stems differ unless their ids' hashes collide."""
    stem = scan_id.replace(":", "%3A")
    if len(stem) <= MAX_STEM:
        return stem
    digest = hashlib.sha256(scan_id.encode()).hexdigest()[:_HASH_HEX]
    head = stem[: MAX_STEM - _HASH_HEX - 1]
    cut = head.rfind("%", len(head) - 2)  # never cut an escape in half
    if cut >= 0:
        head = head[:cut]
    return f"{head}~{digest}"


class SpoolInUse(OSError):
    """A spool file another program holds open for writing (an operator's h5py ``"r+"``/``"a"``,
    HDFView editing it: HDF5's exclusive file lock), so that the daemon cannot append to it
    without two writers garbling it. Nothing was changed; asking again once that program
    closed the file works."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"{path} is open for writing in another program (HDF5's exclusive file lock: {cause}); "
                         "close it there (h5py: File.close(), or end that Python session) and ask again "
                         "(control `finish_scan`)")
        self.path = path


def _share_lock(path: Path) -> BinaryIO | None:
    """A handle holding a shared ``flock`` on ``path``, the lock an HDF5 reader holds: taken
    beside readers, refused (:class:`SpoolInUse`) while a writer holds the exclusive one. None
    where the file system has no such locks."""
    handle = open(path, "rb")  # noqa: SIM115 - held for the open file's life (SpoolWriter)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise SpoolInUse(path, exc) from None
    except OSError:
        handle.close()
        return None
    return handle


def hold_against_writers(path: Path) -> BinaryIO | None:
    """A shared lock on the closed spool ``path`` (its handle), which keeps a program from
    opening it for writing until it is closed (HDF5's exclusive lock is refused beside it);
    :class:`SpoolInUse` where one holds it for writing now. None where the file cannot be opened
    (removed by hand, unreadable: the re-open that follows says what is wrong with it) or its
    file system has no such locks."""
    try:
        return _share_lock(path)
    except SpoolInUse:
        raise
    except OSError:
        return None


def held_for_writing(path: Path) -> SpoolInUse | None:
    """Whether another program holds the closed spool ``path`` open for writing (HDF5's
    exclusive lock) now: the :class:`SpoolInUse` a re-open would raise, else None (no such
    lock, or none on this file system). Asks without opening it in HDF5. A file that cannot be
    opened at all (removed by hand, unreadable, no descriptor left) is not held: None, and the
    re-open that follows says what is wrong with it — this look raised out of admission at every
    pass, and no scan queued behind it started again."""
    try:
        share = _share_lock(path)
    except SpoolInUse as exc:
        return exc
    except OSError:
        return None
    if share is not None:
        share.close()
    return None


def open_for_writing(path: Path, share: BinaryIO | None = None) -> tuple[h5py.File, BinaryIO | None]:
    """The daemon's own spool file, open for appending, and the handle of a shared lock it
    holds while open (None: HDF5's own lock is held). HDF5 locks a file for its whole open,
    and a reader's shared lock — `h5ls`, HDFView or a pipeline peeking at a waiting scan's spool,
    a recovered one's at start — made the daemon's re-open fail with EAGAIN and the scan with
    it, every frame received and acknowledged. The daemon is the spool's only writer (serve's
    directory lock), so such a reader is logged and the file opened without HDF5's lock, the
    daemon holding a shared lock of its own instead: readers opening it after that are not
    refused, but a program that opens it for writing is, as one that held it for writing
    already refuses the daemon (:class:`SpoolInUse`): two writers garble the file (an
    operator's ``h5py.File(path, "r+")`` that set an attribute while the daemon appended left
    frames unreadable, "filter returned failure during read"). Without a reader the lock is
    taken as before: a reader is refused while the daemon writes the file, as HDF5 means it to be.

    ``share``: a shared lock the daemon took on this file before (:func:`hold_against_writers`,
    at a parked scan's admission) and kept since, so that no program could open it for writing
    meanwhile: let go of only now, as HDF5 takes its own (kept, HDF5's lock would be refused
    beside it, and the daemon named a reader that was itself) — a writer can come in only
    between these two calls, where it is met as before (:class:`SpoolInUse`)."""
    if share is not None:
        share.close()
    f, share = _open_beside_readers(path)
    if share is not None:
        log.warning("another process has %s open: opened for writing without HDF5's file lock; "
                    "that reader may see the file change under it", path)
    return f, share


def _open_beside_readers(path: Path) -> tuple[h5py.File, BinaryIO | None]:
    """``path`` opened "r+": with HDF5's lock (None), or beside readers without it, under the
    daemon's shared lock (its handle); :class:`SpoolInUse` beside a writer."""
    try:
        return h5py.File(path, "r+"), None
    except BlockingIOError:
        share = _share_lock(path)  # SpoolInUse: the holder is a writer
        try:
            return h5py.File(path, "r+", locking=False), share
        except BaseException:
            if share is not None:
                share.close()
            raise


def mark_status(path: Path, status: str) -> None:
    """Write the final ``status`` of a closed spool file (finished, aborted, failed). Beside a
    reader's shared lock it is written without HDF5's lock, under a shared lock of the daemon's
    (as :func:`open_for_writing`); beside a writer (HDF5's exclusive lock) it is not written:
    :class:`SpoolInUse` — the attribute written beside an operator's ``h5py.File(path, "r+")``,
    even one that wrote nothing, was lost or made unreadable at that program's close ("len not
    positive after adjustment for EOA": it wrote back the file's end address as it knew it)."""
    f, share = _open_beside_readers(path)
    try:
        with f:
            f.attrs["status"] = status
    finally:
        if share is not None:
            share.close()


class SpoolWriter:
    """Appends frames of one scan; every :meth:`append` is on disk (flushed) when it returns."""

    def __init__(self, path: Path, file: h5py.File, fsync: bool = False, reserve_bytes: int = 0,
                 journal: Journal | None = None, journal_only: bool = True,
                 share_lock: BinaryIO | None = None) -> None:
        self.path = path
        self._f = file
        #: the shared lock held while ``file`` is open without HDF5's (open_for_writing)
        self._share_lock = share_lock
        self._fsync = fsync
        #: every write of an append is recorded here before the append counts as received
        #: (journal.py); None: a file being rebuilt from its journal
        self._journal = journal
        #: journal-only appends (:data:`JOURNAL_ONLY`): the journal offset up to which the HDF5
        #: file holds what the journal does (None: every append writes the file too)
        self._applied: int | None = journal.end if journal is not None and journal_only else None
        #: whether the operation under way writes its journal record only (:meth:`_deferrable`)
        self._defer = False
        #: the current append's chunks written as bytes (dataset name, row, bytes), and rows
        #: of ``data`` written through HDF5's filter (first row, rows, their bslz4 bytes), for
        #: its journal record
        self._writes: list[tuple[str, int, object]] = []
        self._rows: list[tuple[int, int, bytes]] = []
        #: an append that would leave less free is refused before HDF5 writes (diskspace.py)
        self.reserve_bytes = reserve_bytes
        self._entry = NxcxiEntry(file)
        self._data = self._entry.data
        self._index = self._entry.frame_index
        self._pos = self._entry.positions_m
        self.count = self._entry.count
        #: the scan's status as last set (:meth:`set_status`), in the journal if not yet in the file
        self.status = _text(file.attrs.get("status", "open"))
        #: whole chunks written by append_many, by path (:data:`CHUNK_PATHS`), and chunks of
        #: ``detector_frames`` (:data:`DETECTOR_CHUNK_PATHS`), until taken
        self.chunk_paths: Counter[str] = Counter()
        #: detector frames (bslz4 blobs, or None: no frame) of the rows of ``detector_frames``'
        #: last chunk, when it is part full: they are in the tail, and go into the chunk
        #: when an append fills it (:meth:`_write_detector`)
        self._det_open: list[object | None] = self._open_detector_rows()
        #: (first row, frames) of the part full chunk that set_status wrote, if it did
        self._det_closed: tuple[int, int] | None = None
        self._zeros: dict[tuple[object, ...], bytes] = {}  # a zero frame's blob, padding chunks
        self._det_cache: tuple[int, tuple[int, ...], np.dtype, int] | None = None
        self._tail: h5py.Dataset | None = None
        self._tail_rows = -1  # the tail's extent, once looked up
        #: the reducer whose binned frames are derived from ``detector_frames`` (:data:`DERIVED`)
        #: and the row ranges whose ``data`` is not written yet
        self._reducer, self._pending = load_derivation(self._f)
        #: derived rows written at the scan's end, by where their binned frames came from: the
        #: scan's own (``frame_store``: :data:`HeldFrames`) or decoded (``detector_frames``)
        self.derived_rows: Counter[str] = Counter()
        #: image ids of :data:`UNPOSITIONED` (read from the file when first needed)
        self._kept_ids: set[int] | None = None

    @property
    def derivation(self) -> FrameReducer | None:
        """The reducer the binned frames are derived with (None: the spool keeps them as sent)."""
        return self._reducer

    @classmethod
    def create(cls, spool_dir: str | Path, spec: ScanSpec, fsync: bool = False,
               reserve_bytes: int = 0, journal_only: bool = True) -> SpoolWriter:
        path = spool_path(spool_dir, spec.scan_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        require_free_space(path.parent, 0, reserve_bytes, f"the spool of scan {spec.scan_id!r}")
        if path.exists():
            raise FileExistsError(f"spool file {path} already exists (scan_id {spec.scan_id!r} reused)")
        m = spec.frame_shape
        # written under a hidden name and renamed once closed: a kill while HDF5 writes the new
        # file left a half file under the spool's name, which no recovery could read ("bad object
        # header"), so every later start logged it as unrecoverable and kept it for ever; it
        # never held a frame (frames come after the journal's base), so a half one is removed
        part = creating_path(path)
        part.unlink(missing_ok=True)
        f = h5py.File(part, "w")
        try:
            f.attrs.update(format=FORMAT, format_version=_PLAIN_VERSION, scan_id=spec.scan_id, status="open")
            s = f.create_group("scan")
            header, arrays = spool_header(spec)
            s.attrs["json"] = header
            for name, array in arrays.items():
                s[name] = array
            NxcxiEntry.create(
                f, title=spec.scan_id, frame_shape=m, frame_dtype=spec.frame_dtype,
                energy_eV=spec.energy_eV, pixel_size_m=spec.pixel_size_m, metadata=spec.metadata,
                mask=spec.mask,
            )
            if spec.positions_m is not None:
                grid = nav_shape_of(spec.positions_m, spec.metadata)
                write_nav_shape(f, *(grid or (None, False)))
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise
        f.close()  # closed, the file is one of HDF5's consistent states: the journal's base
        journal = None
        try:
            os.replace(part, path)
            image = path.read_bytes()
            jpath = journal_path(path)
            jpath.unlink(missing_ok=True)  # a journal without its spool file: of a spool deleted
            journal = Journal.create(jpath, fsync)
            journal.write({"op": "base", "image": True}, [image])
            if fsync:
                fsync_path(path.parent)
            f, share = open_for_writing(path)
        except BaseException:
            if journal is not None:
                journal.close()
                journal.path.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise
        return cls(path, f, fsync, reserve_bytes, journal, journal_only, share)

    @classmethod
    def reopen(cls, path: str | Path, fsync: bool = False, reserve_bytes: int = 0,
               journal_only: bool = True, share: BinaryIO | None = None) -> SpoolWriter:
        """Append to an existing spool file (recovery): it is rebuilt from its journal first if
        the journal holds more than the file was closed with (:func:`repair_spool`); rows beyond
        ``count`` are discarded. A spool without a journal (of an earlier release, or re-opened
        after its scan reached a final state) gets one whose base is the file as it is.
        ``share``: the daemon's shared lock on the file, taken before: let go of as the file is
        opened for writing (:func:`open_for_writing`), or where the re-open fails before that."""
        try:
            return cls._reopen(Path(path), fsync, reserve_bytes, journal_only, share)
        except BaseException:
            if share is not None:
                share.close()  # (closed already where the open was reached: harmless)
            raise

    @classmethod
    def _reopen(cls, path: Path, fsync: bool, reserve_bytes: int, journal_only: bool,
                share: BinaryIO | None) -> SpoolWriter:
        end = _repair(path, reserve_bytes)[0]
        jpath = journal_path(path)
        # the journal says the file is open again before anything writes it: from here on a
        # kill leaves a journal that does not end "closed", and recovery rebuilds the file
        if end is None:
            jpath.unlink(missing_ok=True)  # no base record: it holds nothing received
            journal = Journal.create(jpath, fsync)
            try:
                journal.write(*_in_place_base(path))  # SpoolInUse beside a writer
                if fsync:
                    fsync_path(path.parent)
            except BaseException:
                journal.close()
                jpath.unlink(missing_ok=True)
                raise
        else:
            journal = Journal.resume(jpath, end, fsync)
            try:
                journal.write({"op": "opened"})
            except BaseException:
                journal.close()
                raise
        f = None
        try:
            f, share = open_for_writing(path, share)
            try:
                writer = cls(path, f, fsync, reserve_bytes, journal, journal_only, share)
                writer._truncate(writer.count)
            except BaseException:
                if share is not None:
                    share.close()
                raise
        except BaseException:
            journal.close()
            if f is not None:
                # the file was opened for writing and may have changed: the journal stays, and
                # the next open rebuilds the file from it rather than trusting it
                f.close()
                raise
            # not opened, so untouched: the journal back as it was (none, or ending "closed"),
            # so that a later try, and the next start, find the spool as before this one
            if end is None:
                jpath.unlink(missing_ok=True)
            else:
                os.truncate(jpath, end)
            if fsync:
                fsync_path(jpath.parent if end is None else jpath)
            raise
        return writer

    def _truncate(self, n: int) -> None:
        self._entry.truncate(n)
        if any(b > n for _, b in self._pending):  # rows of an append that was not committed
            self._set_pending([[a, min(b, n)] for a, b in self._pending if a < n])
        tail = self._f[DATA].get(DETECTOR_TAIL)
        if tail is not None and tail.shape[0] > n:
            tail.resize(n, axis=0)  # rows of an append that was not committed

    def append(self, frames: np.ndarray, indices: np.ndarray, positions_m: np.ndarray, *,
               raw: RawChunks | None = None, reducer: FrameReducer | None = None) -> None:
        """Write a batch of frames (wire dtype), their indices and (y, x) positions, then flush.

        ``raw``: the unbinned detector frames they came from, as bitshuffle-LZ4 chunks, one per
        frame, kept as they are in ``detector_frames`` row for row (HDF5 direct chunk writes).
        ``reducer``: what made ``frames`` of ``raw`` (``frames`` are ``reducer.reduce_batch`` of
        the decoded ``raw``): their ``data`` rows are then not written now but derived from the
        detector frames (:data:`DERIVED`), and written when the scan ends."""
        n = len(frames)
        if n == 0:
            return
        self._check_space(frames.nbytes + (0 if raw is None else sum(len(c) for c in raw.chunks)))
        self._widen()
        derive = raw is not None and reducer is not None and self._derivable(reducer, raw)
        if raw is not None and self._entry.detector_frames is None:
            nbytes = math.prod(raw.shape) * raw.dtype.itemsize
            block = bslz4_header(raw.chunks[0], raw.dtype.itemsize)[1] if raw.chunks else BLOCK_BYTES
            self._create_detector_frames(raw.shape, raw.dtype, chunk_rows(nbytes) if nbytes % block == 0 else 1)
            # rows before the first detector frames have none, in their chunk too
            self._det_open = [None] * (self.count % self._entry.detector_frames.chunks[0])
        det = self._entry.detector_frames
        if raw is not None and not self._direct_ok(det, raw, n, det.chunks[0]):
            # a source bug, not bad input: the frames still count; their detector rows stay empty
            log.error("spool %s: %d detector frames %s %s do not fit its %s %s; not kept",
                      self.path.name, len(raw.chunks), raw.shape, raw.dtype, det.shape[1:], det.dtype)
            raw = None

        derive = derive and raw is not None
        if derive and self._reducer is None:
            self._begin_derivation(reducer)  # type: ignore[arg-type]
        det_open: list[list[object | None]] = []

        def write_frames(k: int) -> None:
            if derive:
                self._add_pending(k, n)  # derived from the detector frames written below
            else:
                self._write_frames(k, frames)
            det_open.append(self._write_detector(k, n, None if raw is None else raw.chunks))

        self._begin(derive or frames.dtype == self._data.dtype)
        pending = self._pending
        try:
            # commits rows, then the count
            count = self._commit_rows(frames, indices, positions_m, write_frames)
            header, body = self._append_record(count - n, indices, positions_m)
            if derive:
                header["d"] = 1
            self._flush((header, body))
        except BaseException:
            if self._defer:  # not recorded: the derived rows it added are not the file's either
                self._pending, self._defer = pending, False
            raise
        self.count = count
        self._det_open = det_open[0]

    def append_many(self, batches: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    wire: Sequence[object | None] | None = None) -> int:
        """Write several batches of (frames, indices, positions) as ONE append: the rows of all
        of them, one commit of ``count`` and one flush, so that the per-append cost (a dozen
        HDF5 calls and the flush) is paid once for all. What the spool thread found waiting
        is written this way (daemon/scans.py): under load, appends grow instead of queueing.
        ``wire``: per batch, the bslz4 bytes its frames were decoded from (or None); the whole
        chunks they hold are written as they are (:meth:`_write_blocks`).
        Returns the frames written. On disk exactly as the same batches appended one by one."""
        wire = list(wire) if wire is not None else [None] * len(batches)
        self._widen()
        if len(wire) != len(batches):
            raise ValueError(f"{len(wire)} wire blobs for {len(batches)} batches")
        kept = [(b, w) for b, w in zip(batches, wire) if len(b[0])]
        if not kept:
            return 0
        batches, wire = [b for b, _ in kept], [w for _, w in kept]
        blocks = [b[0] for b in batches]
        self._check_space(sum(b.nbytes for b in blocks))
        indices = np.concatenate([np.asarray(b[1]) for b in batches])
        positions = np.concatenate([np.asarray(b[2], dtype=np.float64).reshape(-1, 2) for b in batches])
        det_open: list[list[object | None]] = []

        def write_frames(k: int) -> None:
            self._write_blocks(k, blocks, wire)
            det_open.append(self._write_detector(k, len(indices), None))

        self._begin(all(b.dtype == self._data.dtype for b in blocks))
        count = self._commit_rows(None, indices, positions, write_frames)
        self._flush(self._append_record(count - len(indices), indices, positions))
        self.count = count
        self._det_open = det_open[0]
        return len(indices)

    # -- the journal (journal.py) ---------------------------------------------------------------
    def _begin(self, deferrable: bool = False) -> None:
        """Start collecting an operation's writes for its journal record. ``deferrable``: the
        operation may be written to the journal only (:data:`JOURNAL_ONLY`), if the writer
        appends so; else the file is brought up to the journal first, and the operation's
        record is then the file's too (:meth:`_flush`)."""
        self._writes.clear()
        self._rows.clear()
        self._defer = deferrable and self._applied is not None
        if not self._defer:
            self._materialise()

    def _commit_rows(self, frames: np.ndarray | None, indices: np.ndarray, positions: np.ndarray,
                     write_frames: Callable[[int], None]) -> int:
        """The rows of an append and then its count (NxcxiEntry.append), or, journal-only, the
        rows' chunks for its record alone; the count after it."""
        if not self._defer:
            return self._entry.append(frames, indices, positions, write_frames=write_frames)
        write_frames(self.count)
        return self.count + len(indices)

    def _put(self, name: str, ds: h5py.Dataset, row: int, chunk: object) -> None:
        """Write one chunk of ``ds`` (``name`` in ``entry_1/data_1``) as it is, and keep it for
        the append's journal record."""
        if not self._defer:
            ds.id.write_direct_chunk((row, 0, 0), chunk)  # frames: (K, H, W) (ds.ndim costs µs)
        if self._journal is not None:
            self._writes.append((name, row, chunk))

    def _put_rows(self, ds: h5py.Dataset, row: int, rows: np.ndarray) -> None:
        """Write rows of ``data`` through HDF5's filter: a chunk part full before or after them
        (HDF5 reads it, adds the rows and writes it again, in the flush: a kill before the
        flush leaves the file as the last append left it), frames of another dtype. The
        journal record holds the rows, compressed here (bslz4: a few µs a frame; the chunk
        HDF5 writes holds the rows before them too, so its bytes would grow the journal by the
        square of the appends a chunk takes)."""
        if not self._defer:  # (a journal-only append has rows of data's dtype: _begin)
            ds[row:row + len(rows)] = rows
        if self._journal is not None:
            kept = rows if rows.dtype == ds.dtype else ds[row:row + len(rows)]  # as HDF5 converted them
            self._rows.append((row, len(rows), compression_bslz4(np.ascontiguousarray(kept))))

    def _append_record(self, k: int, indices: np.ndarray, positions: np.ndarray) -> tuple[dict, list]:
        n = len(indices)
        header: dict[str, object] = {"op": "append", "k": k, "n": n}
        body: list[object] = [np.ascontiguousarray(indices, dtype=np.int64),
                              np.ascontiguousarray(np.asarray(positions, dtype=np.float64).reshape(n, 2))]
        return header, body

    def _with_writes(self, header: dict, body: list) -> tuple[dict, list]:
        """The journal record of the operation: its chunks, and the rows the filter wrote."""
        header["w"] = [[name, row, memoryview(chunk).nbytes] for name, row, chunk in self._writes]
        header["r"] = [[row, n, len(blob)] for row, n, blob in self._rows]
        body += [chunk for _, _, chunk in self._writes]
        body += [blob for _, _, blob in self._rows]
        self._writes.clear()
        self._rows.clear()
        return header, body

    def _journal_op(self, header: dict, body: Sequence[object] = ()) -> None:
        """A change of the file's layout, recorded before the append that needs it (it is
        synced with that append's record). It is made in the file at once (a few per scan),
        after the journal-only appends before it."""
        if self._journal is not None:
            self._materialise()
            self._journal.write(header, body, sync=False)
            if self._applied is not None:
                self._applied = self._journal.end

    def _materialise(self) -> None:
        """Bring the HDF5 file up to its journal (:data:`JOURNAL_ONLY`): apply the records of
        the journal-only appends (status, options) since the last time, as a rebuild from the journal
        does (:meth:`_replay`), and flush. A kill meanwhile leaves the journal as it was: the
        file is rebuilt from it at the next start (:func:`repair_spool`), as after a kill
        inside any flush."""
        journal = self._journal
        if self._applied is None or journal is None or self._applied >= journal.end:
            return
        end, count, pending = journal.end, self.count, self._pending
        # HDF5 does not survive a full disk (diskspace.py): refused first, the journal keeps all.
        # Not the reserve: these bytes were admitted with their appends (whose checks counted
        # them), and a scan that fails on a full disk still closes its spool within the reserve
        require_free_space(self.path.parent, end - self._applied, 0,
                           f"the spool file {self.path.name} (its appends since {self._entry.count} rows)")
        self._defer = False
        self.count = self._entry.count
        self._pending = load_derivation(self._f)[1]

        def records() -> Iterator[Record]:
            for item in iter_records(journal.path, self._applied):
                if isinstance(item, str):
                    raise OSError(f"spool {self.path.name}: its journal cannot be read back ({item})")
                if item.header["op"] not in ("append", "status", "options"):
                    raise ValueError(f"spool {self.path.name}: its journal holds a {item.header['op']!r} "
                                     "record among appends not yet in the file")
                yield item
                if item.end >= end:
                    return

        try:
            self._apply(records())
        except BaseException:  # the writer's own view stays what the journal holds (its caller reports it)
            self.count, self._pending = count, pending
            raise
        if self.count != count or self._pending != pending:
            raise ValueError(f"spool {self.path.name}: its journal's appends give {self.count} rows "
                             f"({self._pending} derived), the writer has {count} ({pending})")
        self._f.flush()
        self._applied = end
        self._tail = None  # its extent is looked up again

    # -- binned frames derived from the detector frames (DERIVED) --------------------------------
    def _derivable(self, reducer: FrameReducer, raw: RawChunks) -> bool:
        """Whether ``data`` rows of frames ``reducer`` made of ``raw`` can be derived: the
        reducer gives ``data``'s frames (shape, dtype) from the detector frames ``raw`` holds,
        and is the reducer of this spool's earlier derived rows, if any."""
        m = self._data.shape[1:]
        if (reducer.detector_shape != tuple(raw.shape) or (reducer.frame_side,) * 2 != tuple(m)
                or np.dtype(reducer.out_dtype) != self._data.dtype):
            return False
        return self._reducer is None or self._reducer is reducer or _same_reducer(self._reducer, reducer)

    def _begin_derivation(self, reducer: FrameReducer) -> None:
        """Store how ``data`` is derived (:data:`DERIVED`): its reducer's geometry. The file
        becomes format version 2: a reader that does not know the group would read zeros."""
        header, mask = reducer_header(reducer)
        self._journal_op({"op": "derive", **header}, [mask])
        g = self._f[DATA].create_group(DERIVED)
        g.attrs["description"] = ("data rows in pending_rows are not written yet: they are the frames of "
                                  "detector_frames cropped and binned by this geometry (FORMATS.md)")
        for key, value in header.items():
            g.attrs[key] = -1 if value is None else value
        g.create_dataset("window_valid", data=mask.reshape(reducer.window, reducer.window))
        self._f.attrs["format_version"] = FORMAT_VERSION
        self._reducer = reducer

    def _add_pending(self, k: int, n: int, write: bool = True) -> None:
        pending = [list(r) for r in self._pending]
        if pending and pending[-1][1] == k:
            pending[-1][1] = k + n
        else:
            pending.append([k, k + n])
        self._set_pending(pending, write)

    def _set_pending(self, pending: list[list[int]], write: bool = True) -> None:
        if self._defer or not write:  # written when the file is brought up to its journal (_materialise)
            self._pending = [(int(a), int(b)) for a, b in pending]
            return
        g = self._f[DATA][DERIVED]
        if pending:
            g.attrs["pending_rows"] = np.asarray(pending, np.int64).reshape(-1, 2)
        elif "pending_rows" in g.attrs:
            del g.attrs["pending_rows"]
        self._pending = [(int(a), int(b)) for a, b in pending]

    def _write_derived(self, held: HeldFrames | None = None, peak: HeldPeak | None = None) -> None:
        """Write the ``data`` rows still derived (:meth:`_write_derived_as`), as counts of the
        smallest unsigned dtype that holds the scan's largest count where ``peak`` knows it and
        every row is derived (no chunk of ``data`` written yet: the dataset is made again with
        that dtype, :meth:`_recast_data`): at most a quarter of the bytes to bitshuffle and
        compress for low-dose counts. Every row is checked against that dtype before it is cast;
        one that does not fit has the rows written again in the reducer's dtype (logged)."""
        if not self._pending:
            return
        wide = self._data.dtype
        narrow = self._narrow_dtype(peak)
        if narrow == wide:
            self._write_derived_as(held)
            return
        self._recast_data(narrow)
        try:
            self._write_derived_as(held)
        except _TooNarrow as exc:
            log.warning("spool %s: a binned count of %d does not fit %s (the scan's peak was given as "
                        "smaller): its rows are written again as %s", self.path.name, exc.count, narrow, wide)
            self._recast_data(wide, discard=True)
            self._write_derived_as(held)

    def _narrow_dtype(self, peak: HeldPeak | None) -> np.dtype:
        """The dtype the derived rows are written in (:meth:`_write_derived`)."""
        ds = self._data
        if (peak is None or ds.dtype.kind != "u" or self._pending != [(0, self.count)]
                or ds.id.get_num_chunks()):
            return ds.dtype
        try:
            top = peak()
        except Exception:  # the rows are written in the reducer's dtype: the spool is written all the same
            log.exception("spool %s: the scan's largest count could not be read", self.path.name)
            return ds.dtype
        if top is None or top < 0:
            return ds.dtype
        return next((np.dtype(t) for t in ("uint8", "uint16", "uint32")
                     if np.iinfo(t).max >= top and np.dtype(t).itemsize <= ds.dtype.itemsize), ds.dtype)

    def _fit(self, rows: np.ndarray | FftOrder) -> np.ndarray:
        """Derived ``rows`` in detector order as counts of ``data``'s dtype, or
        :class:`_TooNarrow` where one does not fit it (never a silent wrap-around)."""
        dtype = self._data.dtype
        fft = isinstance(rows, FftOrder)
        counts = rows.rows if fft else rows
        if counts.dtype != dtype and counts.size and (top := int(counts.max())) > np.iinfo(dtype).max:
            raise _TooNarrow(top)
        if fft:
            return _to_detector(counts, dtype)
        return counts if counts.dtype == dtype else counts.astype(dtype)

    def _write_derived_as(self, held: HeldFrames | None) -> None:
        """Write the ``data`` rows still derived (the scan ended), compressed as chunks: the
        binned frames ``held`` gives (the scan's frame store: they need no decoding), or where
        it gives none, decoded and binned from the detector frames as every reader derives
        them. Rows from ``held`` are checked first: the first and last of each block against
        their detector frames, derived; a block that differs is derived whole (and logged), and
        ``held`` is not asked again. Whole chunks are made and compressed on the spool's
        compression threads (the codecs and NumPy release the GIL), a few hundred rows a task,
        and written here in row order; rows of a part-full chunk at a range's ends go through
        :meth:`_write_blocks`. Not journaled: they are a function of what the journal holds,
        and a rebuild derives them again."""
        if not self._pending:
            return
        ds = self._data
        c = ds.chunks[0]
        step = max(c, _DERIVE_ROWS // c * c)
        pool = _compress_pool()
        paths = self.chunk_paths.copy()  # (these chunks are no received frames' path)
        asker = _HeldRows(self, held)
        try:
            for a, b in self._pending:
                first, last = min(b, -(-a // c) * c), max(a, b // c * c)
                if first >= last:  # no whole chunk
                    self._write_blocks(a, [self._derived_room(self._fit(asker.rows(a, b)))])
                    continue
                if a < first:
                    self._write_blocks(a, [self._derived_room(self._fit(asker.rows(a, first)))])
                tasks: list = []

                def write(task: Any) -> None:  # in row order
                    row, blobs = task.result()
                    self._derived_room(blobs)
                    for j, blob in enumerate(blobs):
                        self._put("data", ds, row + j * c, blob)

                try:
                    for lo in range(first, last, step):
                        hi = min(last, lo + step)
                        # the frame store is read here, on one thread (a device's transfers in order)
                        tasks.append(pool.submit(self._derived_chunks, lo, hi, asker, asker.ask(lo, hi)))
                        if len(tasks) > _POOL_THREADS:  # a few tasks in flight: memory stays bounded
                            write(tasks.pop(0))
                    while tasks:
                        write(tasks.pop(0))
                finally:  # (a count that does not fit: the tasks in flight end before the rows are written again)
                    for task in tasks:
                        task.cancel()
                    wait(tasks)
                if last < b:
                    self._write_blocks(last, [self._derived_room(self._fit(asker.rows(last, b)))])
        finally:  # (also when a count does not fit the dtype: the rows are written again)
            self._writes.clear()  # (the chunks collected for a journal record)
            self.chunk_paths = paths
        self.derived_rows.update(asker.counts)
        if asker.counts["frame_store"]:
            log.info("spool %s: %d binned rows written from the scan's frames, %d decoded from %s",
                     self.path.name, asker.counts["frame_store"], asker.counts["detector_frames"],
                     DETECTOR_FRAMES)
        self._set_pending([])

    def _derived_room(self, written: Any) -> Any:
        """``written`` (rows, or compressed chunks) once the disk has room for them: HDF5 does
        not survive a full disk (diskspace.py), and these rows are not journaled, so no append's
        check counted them (as :meth:`_materialise`, within the reserve: the scan's frames are
        in its journal, and a close that fails here leaves them there)."""
        nbytes = written.nbytes if isinstance(written, np.ndarray) else sum(len(b) for b in written)
        require_free_space(self.path.parent, nbytes, 0, f"the spool file {self.path.name} (its binned rows, "
                           "derived at the scan's end)")
        return written

    def _derived_chunks(self, lo: int, hi: int, asker: _HeldRows,
                        given: np.ndarray | None) -> tuple[int, list[bytes]]:
        """(``lo``, the ``data`` chunks of rows [lo, hi), whole chunks), on a compression thread."""
        c = self._data.chunks[0]
        counts = asker.checked(lo, hi, given)
        # cast chunk by chunk: each chunk's rows are read again from cache
        return lo, [compression_bslz4(self._fit(counts[i:i + c])) for i in range(0, hi - lo, c)]

    def _replay(self, header: dict, body: memoryview) -> None:
        """Apply one journal record to this file (a rebuild: :func:`repair_spool`)."""
        op = header["op"]
        if op == "append":
            self._replay_appends([(header, body)])
        elif op == "status":
            self._replay_writes(header, iter_bodies(body, _sizes(header)))
            self._f.attrs["status"] = header["status"]
        elif op == "options":
            self._write_options(header["options"])
        elif op == "chunk_per_frame":
            self._chunk_per_frame()
        elif op == "detector":
            self._create_detector_frames(tuple(header["shape"]), np.dtype(header["dtype"]), int(header["rows"]))
        elif op == "derive":
            self._begin_derivation(reducer_of(header, np.frombuffer(body, np.uint8)))
        elif op == "unpositioned":
            k, n = int(header["k"]), int(header["n"])
            pieces = iter_bodies(body, [8 * n, *_sizes(header)])
            if (at := self._unpositioned_rows(tuple(header["shape"]), np.dtype(header["dtype"]), n)) != k:
                raise ValueError(f"its journal keeps unpositioned frames from row {k} on, the file has {at}")
            self._f[DATA][UNPOSITIONED_IDS][k:k + n] = np.frombuffer(next(pieces), np.int64)
            self._replay_writes(header, pieces)
        elif (unknown := unknown_kind(header)) is not None and not unknown[1]:
            # (the callers refuse such a journal before applying it: scan_records' ``required``)
            raise ValueError(f"its journal holds an unknown record {op!r}")
        # else "base", "opened", "closed", or a newer build's optional record: nothing to apply

    def _apply(self, records: Iterable[Record]) -> None:
        """Apply journal records to this file in order (a rebuild; a journal-only spool brought up
        to its journal): consecutive appends as one (:meth:`_replay_appends`), up to
        :data:`_APPLY_BYTES` of records at a time."""
        group: list[tuple[dict, memoryview]] = []
        size = 0
        for record in records:
            if record.header["op"] == "append":
                group.append((record.header, record.body))
                size += len(record.body)
                if size < _APPLY_BYTES:
                    continue
            self._replay_appends(group)
            group, size = [], 0
            if record.header["op"] != "append":
                self._replay(record.header, record.body)
        self._replay_appends(group)

    def _replay_appends(self, group: list[tuple[dict, memoryview]]) -> None:
        """Apply consecutive append records as one append of all their rows: one change of the
        extents and one ``count`` (a dozen HDF5 calls an append cost more than its chunks), the
        same rows as one by one."""
        if not group:
            return
        self._widen()
        k = self.count
        parsed = []
        for header, body in group:
            first, n = int(header["k"]), int(header["n"])
            if first != k:
                raise ValueError(f"its journal appends rows from {first} to a file of {k} rows")
            pieces = iter_bodies(body, [8 * n, 16 * n, *_sizes(header)])
            parsed.append((header, first, n, np.frombuffer(next(pieces), np.int64),
                           np.frombuffer(next(pieces), np.float64).reshape(n, 2), pieces))
            k += n
        derived = any(p[0].get("d") for p in parsed)

        def write_frames(_: int) -> None:
            rows = _RowRun(self._data)
            for header, first, n, _i, _p, pieces in parsed:
                if header.get("d"):
                    self._add_pending(first, n, write=False)
                self._replay_writes(header, pieces, rows)
            rows.write()
            if derived:
                self._set_pending([list(r) for r in self._pending])

        indices = np.concatenate([p[3] for p in parsed])
        positions = np.concatenate([p[4] for p in parsed])
        self.count = self._entry.append(None, indices, positions, write_frames=write_frames)

    def _replay_writes(self, header: dict, pieces: Iterator[memoryview], run: _RowRun | None = None) -> None:
        """Write a record's chunks, and its rows of ``data`` through the filter (into ``run``,
        if given: consecutive rows of several records are written together)."""
        g = self._f[DATA]
        found: dict[str, h5py.Dataset] = {}
        for name, row, _ in header["w"]:
            ds = found.get(name)
            if ds is None:
                ds = found[name] = g[name]
            # the tail grows where it is written (the others: by the append, first)
            if name not in ("data", DETECTOR_FRAMES) and ds.shape[0] <= row:
                ds.resize(row + 1, axis=0)
            # the journal's bytes as they were read (h5py takes a buffer: a copy cost 0.4 of 8 µs a chunk)
            ds.id.write_direct_chunk((row, 0, 0), next(pieces))
        ds = self._data
        for row, n, _ in header.get("r", []):
            rows = bslz4_decompress(next(pieces), ds.dtype, (n, *ds.shape[1:]))
            if run is None:
                ds[row:row + n] = rows
            else:
                run.add(row, rows)

    def _check_space(self, nbytes: int) -> None:
        # uncompressed bytes: an upper bound of what the append writes, in the file and its
        # journal; and what journal-only appends before it still owe the file (about their records)
        owed = 0 if self._applied is None or self._journal is None else self._journal.end - self._applied
        require_free_space(self.path.parent, 2 * nbytes + owed, self.reserve_bytes,
                           f"the spool file {self.path.name}")

    def _write_frames(self, k: int, frames: np.ndarray) -> None:
        self._write_blocks(k, [frames])

    def _write_blocks(self, k: int, blocks: list[np.ndarray], wire: Sequence[object | None] | None = None) -> None:
        """Rows [k, k + n) of ``data`` from consecutive ``blocks`` of frames. A whole chunk
        inside a block whose bslz4 bytes (``wire``, per block) have it on their block grid is
        written from those bytes (no compression); other whole chunks are compressed on
        threads (bitshuffle releases the GIL; HDF5's filter, run by h5py, holds it), a few
        chunks per task, and written as chunks; a chunk that spans two blocks is gathered from
        both; rows of a partly filled chunk go through the filter (:meth:`_put_rows`). The
        bytes are those the filter would write."""
        ds = self._data
        n = sum(len(b) for b in blocks)
        c = ds.chunks[0]
        first, last = -(-k // c) * c, (k + n) // c * c  # whole chunks: rows [first, last)
        if (c == 1 or last - first < c or any(b.dtype != ds.dtype for b in blocks)
                or BITSHUFFLE_FILTER not in ds._filters):
            for b in blocks:
                self._put_rows(ds, k, b)
                k += len(b)
            return
        rows = _Rows(blocks, k)
        if first > k:
            self._put_rows(ds, k, rows[k:first])
        starts = range(first, last, c)
        ready = self._chunks_as_received(k, blocks, wire, starts)
        chunks = [rows[a : a + c] for a in starts if a not in ready]
        pool = _compress_pool()
        per_task = max(1, -(-len(chunks) // _POOL_THREADS))  # one task per thread: few futures
        tasks = [pool.submit(_compress_all, chunks[i : i + per_task]) for i in range(0, len(chunks), per_task)]
        compressed = (blob for task in tasks for blob in task.result())
        for a in starts:
            self._put("data", ds, a, ready[a] if a in ready else next(compressed))
        if last < k + n:
            self._put_rows(ds, last, rows[last : k + n])

    def _chunks_as_received(self, k: int, blocks: list[np.ndarray], wire: Sequence[object | None] | None,
                            starts: range) -> dict[int, bytes]:
        """Chunk start row → the chunk's bytes cut from the bslz4 bytes its frames arrived in,
        for every whole chunk where that is exact: inside one block, the dataset's bitshuffle
        block size (and dtype and frame shape, which the frames were checked to have), and
        starting and ending on the sender's block grid. Counts every chunk's path."""
        ds = self._data
        c = ds.chunks[0]
        frame = int(np.prod(ds.chunks[1:]))
        item = ds.dtype.itemsize
        cd = ds._filters[BITSHUFFLE_FILTER]  # (version, version, item size, block size, codec)
        block = int(cd[3]) if len(cd) > 3 and cd[3] else None
        out: dict[int, bytes] = {}
        reasons: Counter[str] = Counter()
        if wire is None or all(w is None for w in wire):
            self.chunk_paths["not_bslz4"] += len(starts)
            return out
        lo = k
        for b, blob in zip(blocks, wire):
            hi = lo + len(b)
            mine = [a for a in starts if lo <= a and a + c <= hi]
            lo = hi
            if not mine:
                continue
            if blob is None:
                reasons["not_bslz4"] += len(mine)
                continue
            if bslz4_block_elements(blob, item) != (block or default_block_elements(item)):
                reasons["block_size"] += len(mine)
                continue
            first = hi - len(b)
            cut = bslz4_slices(blob, item, [((a - first) * frame, (a - first + c) * frame) for a in mine])
            for a, chunk in zip(mine, cut):
                if chunk is None:
                    reasons["alignment"] += 1
                else:
                    out[a] = chunk
        reasons["spans_messages"] = len(starts) - len(out) - sum(reasons.values())
        reasons["as_received"] = len(out)
        self.chunk_paths.update(+reasons)
        fallback = {r: v for r, v in reasons.items() if r != "as_received" and v}
        if fallback:
            log.debug("spool %s: %d of %d chunks compressed here (%s)", self.path.name,
                      sum(fallback.values()), len(starts), ", ".join(f"{r} {v}" for r, v in fallback.items()))
        return out

    def take_chunk_paths(self) -> Counter[str]:
        """The chunk counts by path since the last call (for the service's metrics)."""
        taken, self.chunk_paths = self.chunk_paths, Counter()
        return taken

    @staticmethod
    def _direct_ok(ds: h5py.Dataset, chunks: RawChunks, n: int, rows: int = 1) -> bool:
        """``chunks`` may be written as they are (``rows`` frames a chunk: joined, if more than one)."""
        return (len(chunks.chunks) == n and ds.chunks == (rows, *chunks.shape) and ds.dtype == chunks.dtype
                and BITSHUFFLE_FILTER in ds._filters)

    def _write_detector(self, k: int, n: int, blobs: Sequence[object] | None) -> list[object | None]:
        """Rows [k, k + n) of ``detector_frames``, if the spool has it: the frames' bslz4 blobs
        (``blobs``, one per row) or None (rows without detector frames: zeros, as rows never
        written read). Returns what :attr:`_det_open` is once the append is committed.

        Several frames a chunk: a chunk is its frames' blocks joined (:func:`bslz4_concat`; no
        compression here), written once, when the append that fills it comes. A frame counts as
        received once it is on disk, so the frames of a chunk left part full are written, one
        frame a chunk, to ``detector_frames_tail`` (the same rows), and held in memory until
        their chunk is whole. Nothing written is ever written again: HDF5 frees the old copy of
        a chunk that is rewritten in another size and may put anything there before the flush
        that commits the new one, so a crash meanwhile could lose frames already received. A
        DECTRIS source's jobs end on whole chunks while the detector is ahead (64 frames), so
        then nothing goes to the tail."""
        det = self._entry.detector_frames
        if det is None:
            return []
        rows = self._det_layout(det)[0]
        if rows == 1:
            if blobs is not None:
                for i, blob in enumerate(blobs):
                    self._put(DETECTOR_FRAMES, det, k + i, blob)
                self.chunk_paths["detector_per_frame"] += n
            return []
        held = [*self._det_open, *(blobs if blobs is not None else [None] * n)]
        base = k - len(self._det_open)
        whole = len(held) // rows * rows
        for j in range(0, whole, rows):
            group = held[j:j + rows]
            if any(f is not None for f in group):
                chunk, path = self._detector_chunk(det, group)
                if self._det_closed is not None and self._det_closed[0] == base + j:
                    self.chunk_paths["detector_rewritten"] += 1  # frames after the scan ended
                self._put(DETECTOR_FRAMES, det, base + j, chunk)
                self.chunk_paths[path] += 1
        if blobs is not None and whole < len(held):
            if self._tail is None:
                self._tail = self._f[DATA][DETECTOR_TAIL]
                self._tail_rows = self._tail.shape[0]
            tail = self._tail
            first = max(base + whole, k)
            # grown here, when written, in steps (rows past the count are never read, and
            # recovery cuts them): not by every append
            if self._tail_rows < k + n and not self._defer:  # (a rebuild grows it where it writes)
                self._tail_rows = k + n + _TAIL_STEP
                tail.resize(self._tail_rows, axis=0)
            for row in range(first, k + n):
                self._put(DETECTOR_TAIL, tail, row, blobs[row - k])
            self.chunk_paths["detector_tail"] += k + n - first
        return held[whole:]

    def _close_detector_chunk(self) -> None:
        """Write the part full last chunk of ``detector_frames`` (zero frames after its rows), so
        that the dataset alone holds every frame once the scan has ended; its frames stay in
        the tail too."""
        det = self._f[DATA].get(DETECTOR_FRAMES)
        if det is None or not any(f is not None for f in self._det_open):
            return
        closed = (self.count - len(self._det_open), len(self._det_open))
        if self._det_closed == closed:
            return
        if self._det_closed is not None and self._det_closed[0] == closed[0]:
            self.chunk_paths["detector_rewritten"] += 1  # frames after the scan ended
        chunk, path = self._detector_chunk(det, self._det_open)
        self._put(DETECTOR_FRAMES, det, closed[0], chunk)
        self.chunk_paths[path] += 1
        self._det_closed = closed

    def _detector_chunk(self, det: h5py.Dataset, frames: list[object | None]) -> tuple[bytes, str]:
        """One chunk of ``detector_frames`` from its rows' frames (a bslz4 blob, or None: a zero
        frame), zero frames after them: their blocks joined when they join, else compressed in
        the block size of the first."""
        rows, shape, dtype, nbytes = self._det_layout(det)
        parts = frames
        if len(frames) < rows or None in frames:
            first = next((f for f in frames if f is not None), None)
            block = BLOCK_BYTES if first is None else bslz4_header(first, dtype.itemsize)[1]
            zero = self._zero_frame(shape, dtype, block)
            parts = [zero if f is None else f for f in frames] + [zero] * (rows - len(frames))
        chunk = bslz4_concat(parts, dtype.itemsize, nbytes)
        if chunk is not None:
            return chunk, "detector_as_received"
        blobs = [f for f in frames if f is not None]  # not joined: compressed in the first's block size
        stack = np.zeros((rows, *shape), dtype)
        for i, f in enumerate(frames):
            if f is not None:
                stack[i] = bslz4_decompress(f, dtype, shape)
        return compression_bslz4(stack, bslz4_header(blobs[0], dtype.itemsize)[1]), "detector_recompressed"

    def _det_layout(self, det: h5py.Dataset) -> tuple[int, tuple[int, ...], np.dtype, int]:
        # (rows a chunk, frame shape, dtype, frame bytes), read once: h5py asks HDF5 each time
        if self._det_cache is None:
            self._det_cache = (det.chunks[0], det.shape[1:], det.dtype, math.prod(det.shape[1:]) * det.dtype.itemsize)
        return self._det_cache

    def _zero_frame(self, shape: tuple[int, ...], dtype: np.dtype, block: int) -> bytes:
        key = (shape, dtype.str, block)
        if key not in self._zeros:
            self._zeros[key] = compression_bslz4(np.zeros(shape, dtype), block)
        return self._zeros[key]

    def _open_detector_rows(self) -> list[object | None]:
        """The frames of ``detector_frames``' part full last chunk, read back from the tail (a
        spool file reopened for recovery); None where a row had none."""
        det = self._f[DATA].get(DETECTOR_FRAMES)
        if det is None or det.chunks[0] == 1:
            return []
        tail = self._f[DATA][DETECTOR_TAIL]
        out: list[object | None] = []
        for row in range(self.count // det.chunks[0] * det.chunks[0], self.count):
            written = row < tail.shape[0] and tail.id.get_chunk_info_by_coord((row, 0, 0)).byte_offset is not None
            out.append(tail.id.read_direct_chunk((row, 0, 0))[1] if written else None)
        return out

    def _chunk_per_frame(self) -> None:
        """Re-create the (still empty) frames dataset with one frame per chunk (only before the
        first frame). Nothing writes binned frames as chunks any more: kept to replay the
        journals of spools written before (their op "chunk_per_frame")."""
        self._journal_op({"op": "chunk_per_frame"})
        old = self._data
        m, dtype = old.shape[1:], old.dtype
        det = self._f["entry_1/instrument_1/detector_1"]
        new = det.create_dataset("data_per_frame", shape=(0, *m), maxshape=(None, *m), dtype=dtype,
                                 chunks=(1, *m), **compression())
        for key, value in old.attrs.items():
            new.attrs[key] = value
        self._entry.replace_data(new)  # every name of the frames now points at the new dataset
        del det["data_per_frame"]
        self._data = new

    def _widen(self) -> None:
        """Before rows are appended to a spool whose derived rows were stored in a dtype
        narrower than its reducer's (:meth:`_write_derived`, which did so only where every row
        was derived; frames after the scan ended, its spool re-opened): the frames dataset in
        the reducer's dtype again, every row derived, as before that close (readers derive
        them; the next close stores them again). Not journaled, as the close that narrowed it:
        a rebuild from the journal gives the same file."""
        reducer = self._reducer
        if reducer is None or self._data.dtype == reducer.out_dtype:
            return
        n = self._entry.count
        log.info("spool %s: its %d binned rows, stored as %s, are derived again (rows appended)",
                 self.path.name, n, self._data.dtype)
        self._recast_data(np.dtype(reducer.out_dtype), discard=True)
        g = self._f[DATA][DERIVED]
        if n:
            g.attrs["pending_rows"] = np.asarray([[0, n]], np.int64)
        self._pending = [(0, n)] if n else []

    def _recast_data(self, dtype: np.dtype, discard: bool = False) -> None:
        """Re-create the frames dataset, none of whose chunks is written yet (every row derived:
        :data:`DERIVED`; ``discard``: the chunks written are of rows still pending), with counts
        of ``dtype`` (:func:`_recast_frames`)."""
        if self._data.id.get_num_chunks() and not discard:
            raise ValueError(f"spool {self.path.name}: its frames are written in part; "
                             f"their dtype stays {self._data.dtype}")
        self._data = _recast_frames(self._f, self._entry, dtype)

    def _create_detector_frames(self, shape: tuple[int, ...], dtype: np.dtype, rows: int) -> None:
        """``rows`` frames a chunk: several (as ``data``: :func:`chunk_rows`) when a frame is a
        whole number of the detector's bitshuffle blocks, so that frames' blocks join into
        chunks (192×192 uint16: nine 8 KiB blocks, eight frames a chunk), and the tail beside
        it (:meth:`_write_detector`); else one frame a chunk."""
        self._journal_op({"op": "detector", "shape": list(shape), "dtype": np.dtype(dtype).str, "rows": rows})
        h, w = shape
        for name, chunk, text in (
                (DETECTOR_FRAMES, rows, ("unbinned detector frames, row for row with data, as the detector "
                                        "sent them (bitshuffle-LZ4 chunks)")),
                (DETECTOR_TAIL, 1, ("the detector frames of rows whose chunk of detector_frames was not "
                                   "whole yet when they were received, one frame a chunk (FORMATS.md)"))):
            if name == DETECTOR_TAIL and rows == 1:
                break
            ds = self._f[DATA].create_dataset(
                name, shape=(self.count, h, w), maxshape=(None, h, w), dtype=dtype,
                chunks=(chunk, h, w), **compression())
            ds.attrs["description"] = text
            ds.attrs["compression"] = FILTER_NOTE
            if name == DETECTOR_FRAMES:
                self._entry.detector_frames = ds

    def append_unpositioned(self, image_ids: np.ndarray, raw: RawChunks) -> int:
        """Keep detector frames the scan has no position for (:data:`UNPOSITIONED`, their ids in
        :data:`UNPOSITIONED_IDS`), written as they came and flushed; with the journal they count
        as kept once its record is written, as an append's frames do. An image id kept already
        (before a restart too: the file's ids) or twice in ``image_ids`` is kept once, its
        first time. Returns how many were kept now (the rest are duplicates)."""
        n = len(raw.chunks)
        if n != len(image_ids):
            raise ValueError(f"{n} detector chunks for {len(image_ids)} image ids")
        if n == 0:
            return 0
        ids = np.ascontiguousarray(image_ids, dtype=np.int64)
        self._begin()
        if self._kept_ids is None:  # first use, or the first after a reopen: the ids the file keeps
            held = self._f[DATA].get(UNPOSITIONED_IDS)
            self._kept_ids = set() if held is None else set(held[()].tolist())
        first = np.zeros(n, bool)
        first[np.unique(ids, return_index=True)[1]] = True
        new = first & np.fromiter((int(i) not in self._kept_ids for i in ids), bool, n)
        if not new.all():
            # a series resumed after a restart sends again images the spool kept before it
            ids, raw = ids[new], raw.select(new)
            n = len(ids)
            if n == 0:
                return 0
        self._check_space(sum(len(c) for c in raw.chunks))
        header = {"op": "unpositioned", "shape": list(raw.shape), "dtype": np.dtype(raw.dtype).str}
        k = self._unpositioned_rows(tuple(raw.shape), np.dtype(raw.dtype), n)
        frames = self._f[DATA][UNPOSITIONED]
        if not self._direct_ok(frames, raw, n):
            raise ValueError(f"detector frames {raw.shape} {raw.dtype} do not fit the spool's {UNPOSITIONED} "
                             f"{frames.shape[1:]} {frames.dtype}")
        self._f[DATA][UNPOSITIONED_IDS][k:k + n] = ids
        for i, chunk in enumerate(raw.chunks):
            self._put(UNPOSITIONED, frames, k + i, chunk)
        header.update(k=k, n=n)
        self._flush((header, [ids]))
        self._kept_ids.update(ids.tolist())
        return n

    @property
    def unpositioned(self) -> int:
        """Detector frames kept without a position (:meth:`append_unpositioned`)."""
        ds = self._f[DATA].get(UNPOSITIONED)
        return 0 if ds is None else int(ds.shape[0])

    def _unpositioned_rows(self, shape: tuple[int, ...], dtype: np.dtype, n: int) -> int:
        """The first of ``n`` new rows of :data:`UNPOSITIONED` (made on first use)."""
        g = self._f[DATA]
        if UNPOSITIONED not in g:
            h, w = shape
            ds = g.create_dataset(UNPOSITIONED, shape=(0, h, w), maxshape=(None, h, w), dtype=dtype,
                                  chunks=(1, h, w), **compression())
            ds.attrs["description"] = ("detector frames the scan has no position for (the detector "
                                       "took more images than the scan has positions): kept as the "
                                       "detector sent them, not reconstructed; their image ids in "
                                       f"{UNPOSITIONED_IDS}")
            ds.attrs["compression"] = FILTER_NOTE
            g.create_dataset(UNPOSITIONED_IDS, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        k = g[UNPOSITIONED].shape[0]
        g[UNPOSITIONED].resize(k + n, axis=0)
        g[UNPOSITIONED_IDS].resize(k + n, axis=0)
        return k

    def read_detector_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Detector frames of rows [start, stop), None when the spool keeps none."""
        self._materialise()
        return read_detector_frames(self._f, start, self.count if stop is None else min(stop, self.count))

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames, indices and positions of rows [start, stop) (the writer's own view)."""
        self._materialise()
        stop = self.count if stop is None else min(stop, self.count)
        frames = self._data[start:stop]
        fill_derived(self._f, frames, start)
        return frames, self._index[start:stop], self._pos[start:stop]

    def set_status(self, status: str) -> None:
        self._begin(True)
        if status != "open":  # the scan ended: detector_frames alone holds every frame from now
            self._close_detector_chunk()
        if not self._defer:
            self._f.attrs["status"] = status
        self._flush(({"op": "status", "status": status}, []))
        self.status = status

    def _let_go(self) -> None:
        """Close the HDF5 file and the journal after a close that failed, the journal left
        without "closed": it keeps every frame, and the file (which may lag or lack some of
        them) is rebuilt from it by the next re-open (`finish_scan`, the next start). Held open,
        the file's descriptor and HDF5's lock on it stayed with the daemon until it exited."""
        journal, self._journal = self._journal, None
        try:
            self._close_file()
        except Exception:  # the journal is closed all the same; the caller reports the close's error
            log.exception("spool %s: closing the file after its close failed", self.path.name)
        finally:
            if journal is not None:
                journal.close()

    def _close_file(self) -> None:
        """Close the HDF5 file, then let go of the shared lock held for it (open_for_writing)."""
        try:
            self._f.close()
        finally:
            share, self._share_lock = self._share_lock, None
            if share is not None:
                share.close()

    def set_options(self, options: dict[str, Any]) -> None:
        """Replace the scan's option overrides in its header (``/scan`` attr ``json``: what a
        recovered scan is started with): control `set_options` on a scan waiting for a worker or running.
        Journaled as the appends are: durable once this returns."""
        header = {"op": "options", "options": options}
        json.dumps(header)  # what the file keeps: refused before the journal has it
        self._begin(True)
        if not self._defer:
            self._write_options(options)
        self._flush((header, []))

    def _write_options(self, options: dict[str, Any]) -> None:
        scan = self._f["scan"]
        head = json.loads(scan.attrs["json"])
        head["options"] = options
        scan.attrs["json"] = json.dumps(head)

    def _flush(self, record: tuple[dict, list] | None = None) -> None:
        """Flush the HDF5 file, then write the operation's journal ``record`` (fsynced with the
        ``fsync`` option): only then does it count as done. A kill before the record is whole
        leaves the operation out of the journal (never acknowledged); one inside HDF5's flush
        may leave the HDF5 file inconsistent, which recovery rebuilds from the journal."""
        if not self._defer:
            self._f.flush()
        if self._journal is not None:
            if record is not None:
                self._journal.write(*self._with_writes(*record))
                if self._applied is not None and not self._defer:  # written through: the file has it
                    self._applied = self._journal.end
            self._defer = False
        elif self._fsync:
            os.fsync(self._f.id.get_vfd_handle())

    @property
    def raw_group(self) -> h5py.Group:
        self._materialise()
        return self._f["entry_1"]

    def discard(self) -> None:
        """Close and delete the spool file and its journal (a scan refused after its spool was
        made). Deleted even when the close fails (which lets go of the file, :meth:`close`): a
        refused scan keeps nothing, and its files left behind would block its id (``unique_scan_id``)
        and be recovered as an open scan at the next start; the close's error is raised after."""
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)
            journal_path(self.path).unlink(missing_ok=True)

    def close(self, held: HeldFrames | None = None, peak: HeldPeak | None = None) -> None:
        """Close the file: closed, it is consistent, which the journal records ("closed": a
        rebuild is not needed); once the scan's status is final, the journal is deleted. A
        scan that ended (any status but open) has its derived binned frames written first,
        from ``held`` where it has them, in the smallest dtype that holds ``peak``
        (:meth:`_write_derived`)."""
        if not self._f.id.valid:
            return
        try:
            self._materialise()
            status = str(self._f.attrs.get("status", "open"))
            if status != "open" and self._pending:  # the scan ended: its binned frames are written once
                # not journaled (_write_derived): without the journal no chunk is kept for a record,
                # which held a whole scan's compressed binned frames until the derivation ended
                journal, self._journal = self._journal, None
                try:
                    self._write_derived(held, peak)
                finally:
                    self._journal = journal
                self._f.flush()
        except BaseException:
            self._let_go()
            raise
        self._close_file()
        journal, self._journal = self._journal, None
        if journal is None or journal.closed:
            return
        try:
            if self._fsync:
                fsync_path(self.path)
            if status in FINAL_STATUSES:
                journal.close()
                discard_journal(self.path, self._fsync)
            else:
                journal.write({"op": "closed"})
        finally:
            journal.close()


def _sizes(header: dict) -> list[int]:
    """The sizes of a journal record's chunks and rows, in the order of its body."""
    return [size for *_, size in header["w"]] + [size for *_, size in header.get("r", [])]


def _in_place_base(path: Path) -> tuple[dict, list]:
    """The base record of a journal begun for a spool that has none: its count, and the bytes
    of the part-full last chunks of ``data`` and ``detector_frames`` (appends write those again:
    a kill then could damage the rows they held)."""
    try:
        f = h5py.File(path, "r")
    except BlockingIOError as exc:  # a shared lock is refused beside a writer only
        raise SpoolInUse(path, exc) from exc
    with f:
        g = f[DATA]
        count = int(g.attrs.get("count", 0))
        header: dict = {"op": "base", "image": False, "count": count, "w": []}
        body: list = []
        for name in ("data", DETECTOR_FRAMES):
            ds = g.get(name)
            if ds is None or count % ds.chunks[0] == 0 or ds.shape[0] < count:
                continue
            start = count // ds.chunks[0] * ds.chunks[0]
            if ds.id.get_chunk_info_by_coord((start, 0, 0)).byte_offset is None:
                continue  # never written
            chunk = ds.id.read_direct_chunk((start, 0, 0))[1]
            header["w"].append([name, start, len(chunk)])
            body.append(chunk)
    return header, body


def discard_journal(spool_file: str | Path, fsync: bool = False) -> None:
    """Delete the journal of a spool file that is closed with a final status (or deleted)."""
    path = journal_path(spool_file)
    if path.exists():
        path.unlink()
        if fsync:
            fsync_path(path.parent)


def repair_spool(path: str | Path, reserve_bytes: int = 0) -> str | None:
    """Rebuild spool file ``path`` from its journal when the journal holds more than the file
    was last closed with (a process killed while it wrote: the HDF5 file may then miss frames
    that were received, or be damaged): the file is rebuilt beside it and replaces it. Returns
    what was done, a sentence for the log, or None (nothing to do). Raises OSError or
    ValueError when the journal cannot be applied; the file is then untouched. A rebuild that
    might not fit with ``reserve_bytes`` left free is refused first (OSError ENOSPC)."""
    try:
        return _repair(Path(path), reserve_bytes)[1]
    except (OSError, ValueError, KeyError):
        raise
    except Exception as exc:  # h5py's other errors on a damaged file: the caller keeps the file
        raise ValueError(f"rebuilding it from its journal failed ({type(exc).__name__}: {exc})") from exc


def _repair(path: Path, reserve_bytes: int = 0) -> tuple[int | None, str | None]:
    """(the offset after the journal's last whole record, None when there is no journal with a
    base record; what was done, or None)."""
    jpath = journal_path(path)
    if not jpath.exists():
        return None, None
    scan = scan_records(jpath)
    if scan.first is None or scan.first.get("op") != "base":
        return None, None  # cut short while the spool was created: no frame was received
    if scan.last is not None and scan.last.get("op") == "closed":
        return scan.end, None
    if scan.required is not None:
        raise ValueError(scan.refusal())
    rebuilt = path.with_name(path.name + ".rebuild")
    rebuilt.unlink(missing_ok=True)
    _require_rebuild_room(path, jpath, bool(scan.first.get("image")), reserve_bytes)
    try:
        if scan.first.get("image"):
            frames = _rebuild(path, rebuilt, scan.records)
        else:
            frames = _rebuild_in_child(path, rebuilt, scan.records)
        fsync_path(rebuilt)
        os.replace(rebuilt, path)
        fsync_path(path.parent)
    except BaseException:
        rebuilt.unlink(missing_ok=True)
        raise
    journal = Journal.resume(jpath, scan.end, fsync=True)
    try:
        journal.write({"op": "closed"})
    finally:
        journal.close()
    torn = f"; {scan.why}, dropped (never acknowledged)" if scan.why else ""
    skipped = f"; {scan.unknown_note()}" if scan.skipped else ""
    done = f"rebuilt from its journal ({scan.records} records, {frames} frames{torn}{skipped})"
    return journal.path.stat().st_size, done


#: at most this much of disk_reserve_bytes is kept free by a rebuild: recovering frames already
#: acknowledged may use the reserve (it is there for such writes), not the last bytes of the disk
REBUILD_MARGIN_BYTES = 8 * 2**20


def _require_rebuild_room(path: Path, jpath: Path, image_base: bool, reserve_bytes: int) -> None:
    """Raise OSError(ENOSPC) unless the rebuild surely fits. HDF5 does not survive ENOSPC
    (diskspace.py): a rebuild onto a nearly full spool disk crashed the daemon at every start
    (SIGSEGV/SIGBUS in h5py's deallocation after the failed write; a restart loop under systemd).
    The rebuilt file holds the journal's frames plus HDF5's metadata and whole chunks (1.2x the
    journal on a 64x64 scan), an in-place base copies the file first: twice the journal (plus
    the file) is asked for. The spool and journal stay untouched for a start with room."""
    needed = 2 * jpath.stat().st_size + (0 if image_base else path.stat().st_size)
    margin = min(max(reserve_bytes, 0), REBUILD_MARGIN_BYTES)
    free = shutil.disk_usage(path.parent).free
    if free - needed >= margin:
        return
    raise OSError(
        errno.ENOSPC,
        f"no space to rebuild spool {path.name} from its journal: {path.parent} has "
        f"{free / 2**20:.1f} MiB free, the rebuild needs up to {needed / 2**20:.1f} MiB with "
        f"{margin / 2**20:.1f} MiB left over (free disk space, then restart the daemon; the spool and "
        "its journal are kept as they are)",
    )


def _rebuild(path: Path, rebuilt: Path, records: int) -> int:
    """Write ``rebuilt`` from the first ``records`` records of ``path``'s journal; its frames.
    An image base never reads ``path`` (it may be damaged); an in-place base copies it."""
    items = (r for r in iter_records(journal_path(path)) if not isinstance(r, str))
    base = next(items)
    if base.header.get("image"):
        rebuilt.write_bytes(base.body)
    else:  # a spool re-opened without a journal: the file as it was then, rows after its count cut
        shutil.copyfile(path, rebuilt)
    f = h5py.File(rebuilt, "r+")
    try:
        writer = SpoolWriter(rebuilt, f)
        if not base.header.get("image"):
            writer._truncate(int(base.header["count"]))
            writer.count = int(base.header["count"])
            f[DATA].attrs["count"] = writer.count
            # the part-full chunks as they were: appends wrote them again, and a kill then
            # may have damaged them
            writer._replay_writes(base.header, iter_bodies(base.body, _sizes(base.header)))
        del base
        writer._apply(itertools.islice(items, records - 1))
        return writer.count
    finally:
        f.close()


def _rebuild_in_child(path: Path, rebuilt: Path, records: int) -> int:
    """:func:`_rebuild` in a child process: an in-place base copies the file as it is, which a
    kill inside a flush may have damaged so that HDF5 crashes on it (readcheck.py)."""
    code = ("import sys; from pathlib import Path; from cryoptycho.daemon.storage.spool import _rebuild; "
            "print(_rebuild(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))")
    try:
        run = subprocess.run([sys.executable, "-c", code, str(path), str(rebuilt), str(records)],
                             capture_output=True, text=True, timeout=READ_TIMEOUT_S * 5,
                             stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"rebuilding it from its journal took more than {READ_TIMEOUT_S * 5:g} s") from None
    if run.returncode < 0:
        raise ValueError(f"rebuilding it from its journal crashed the process (signal {-run.returncode})")
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        raise ValueError(f"rebuilding it from its journal failed ({lines[-1].strip() if lines else run.returncode})")
    return int(run.stdout.split()[-1])


@dataclass
class SpoolContents:
    path: Path
    status: str
    spec: ScanSpec
    frames: np.ndarray
    indices: np.ndarray
    positions_m: np.ndarray


def read_spool(path: str | Path, frames: bool = True) -> SpoolContents:
    """Read a spool file (committed rows only); a malformed file is a ValueError naming the problem."""
    path = Path(path)
    jpath = journal_path(path)
    if jpath.exists():
        # the scan is still open, or its daemon was killed: the HDF5 file may lack (or, killed
        # inside a flush, garble) frames the journal holds, so read what the journal says, from
        # a copy — the file itself is the daemon's to repair (or still being written)
        try:
            scan = scan_records(jpath)
        except FileNotFoundError:  # closed meanwhile (see below)
            return _read_checked(path, frames)
        base = scan.first or {}
        if base.get("op") == "base" and (scan.last or {}).get("op") != "closed":
            if scan.required is not None:
                raise ValueError(f"{path}: {scan.refusal()}")
            if scan.skipped:
                log.warning("spool %s: %s", path, scan.unknown_note())
            with tempfile.TemporaryDirectory(prefix="cryoptycho-spool-") as tmp:
                copy = Path(tmp) / path.name
                try:
                    (_rebuild if base.get("image") else _rebuild_in_child)(path, copy, scan.records)
                except Exception as exc:
                    if not jpath.exists():
                        # its daemon closed the spool meanwhile (the journal goes last, once the
                        # file is whole): the file now holds every frame the journal did
                        return _read_checked(path, frames)
                    raise ValueError(f"{path}: its journal {jpath.name} could not be applied "
                                     f"({type(exc).__name__}: {exc})") from exc
                got = _read_checked(copy, frames)
            return SpoolContents(path, got.status, got.spec, got.frames, got.indices, got.positions_m)
    return _read_checked(path, frames)


def _read_checked(path: Path, frames: bool) -> SpoolContents:
    required = ("scan", DATA + "/data", DATA + "/frame_index", DATA + "/positions_m")
    with open_checked(path, FORMAT, "spool", required, FORMAT_VERSION) as f:
        return spool_contents(path, f, frames)


def spool_contents(path: Path, f: h5py.Group, frames: bool = True) -> SpoolContents:
    """The spool part held by group ``f`` (a spool file's root, or a result file's /raw)."""
    g = f[DATA]
    n = int(g.attrs["count"])
    scan = f["scan"]
    spec = spec_from_spool_header(scan.attrs["json"], {k: v[()] for k, v in scan.items() if k in SPOOL_ARRAYS})
    m = spec.frame_shape
    data = np.zeros((0, *m), spec.frame_dtype)
    if frames:
        data = g["data"][:n]
        fill_derived(f, data, 0)
    return SpoolContents(
        path=path,
        status=str(f.attrs.get("status", "open")),
        spec=spec,
        frames=data,
        indices=g["frame_index"][:n],
        positions_m=g["positions_m"][:n],
    )


def reducer_header(reducer: FrameReducer) -> tuple[dict, np.ndarray]:
    """A reducer's geometry as the fields of :data:`DERIVED` (and of the journal's ``derive``
    record), and its window's valid pixels (flat uint8)."""
    header = {"detector_shape": [int(v) for v in reducer.detector_shape], "corner": [int(v) for v in reducer.corner],
              "window": int(reducer.window), "bin": int(reducer.bin),
              "saturation_value": None if reducer.saturation_value is None else int(reducer.saturation_value),
              "out_dtype": np.dtype(reducer.out_dtype).str}
    return header, np.ascontiguousarray(reducer.window_valid, np.uint8).reshape(-1)


def reducer_of(fields: Any, window_valid: np.ndarray) -> FrameReducer:
    """The reducer :func:`reducer_header` described (``fields``: a mapping, or HDF5 attributes)."""
    c, b = int(fields["window"]), int(fields["bin"])
    if c < 1 or b < 1 or c % b or np.asarray(window_valid).size != c * c:
        raise ValueError(f"{DERIVED}: window {c}, bin {b} and {np.asarray(window_valid).size} valid pixels "
                         "do not describe a binning")
    valid = np.asarray(window_valid).reshape(c, c).astype(bool)
    m = c // b
    sat = fields["saturation_value"]
    sat = None if sat is None or int(sat) < 0 else int(sat)
    return FrameReducer(
        detector_shape=tuple(int(v) for v in fields["detector_shape"]),  # type: ignore[arg-type]
        corner=tuple(int(v) for v in fields["corner"]),  # type: ignore[arg-type]
        window=c, bin=b, static_valid=valid.reshape(m, b, m, b).all(axis=(1, 3)), window_valid=valid,
        saturation_value=sat, out_dtype=np.dtype(_text(fields["out_dtype"])))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _same_reducer(a: FrameReducer, b: FrameReducer) -> bool:
    ha, ma = reducer_header(a)
    hb, mb = reducer_header(b)
    return ha == hb and np.array_equal(ma, mb)


def _recast_frames(f: h5py.File, entry: NxcxiEntry, dtype: np.dtype) -> h5py.Dataset:
    """The spool's frames dataset made again, empty, with counts of ``dtype``: its shape,
    chunks, filter and attributes as before, under every name the layout gives the frames."""
    old = entry.data
    det = f["entry_1/instrument_1/detector_1"]
    new = det.create_dataset("data_recast", shape=old.shape, maxshape=old.maxshape, dtype=dtype,
                             chunks=old.chunks, **compression())
    for key, value in old.attrs.items():
        new.attrs[key] = value
    entry.replace_data(new)
    del det["data_recast"]
    return new


def load_derivation(f: h5py.Group) -> tuple[FrameReducer | None, list[tuple[int, int]]]:
    """The reducer of a spool's derived ``data`` rows (None: it has none) and the [start, stop)
    row ranges whose ``data`` is still derived (``f``: a spool file's root or a result's /raw)."""
    g = f[DATA].get(DERIVED)
    if g is None:
        return None, []
    reducer = reducer_of(g.attrs, g["window_valid"][()])
    pending = np.asarray(g.attrs.get("pending_rows", np.zeros((0, 2), np.int64)), np.int64).reshape(-1, 2)
    return reducer, [(int(a), int(b)) for a, b in pending]


def derive_rows(f: h5py.Group, reducer: FrameReducer | None, start: int, stop: int,
                fast: bool = False) -> np.ndarray:
    """The binned frames of rows [start, stop): their detector frames, decoded and binned.
    ``fast``: rows in whole chunks of ``detector_frames`` are decoded outside HDF5 (the chunks
    read as they are, decoded by :func:`bslz4_decompress`, which releases the GIL: h5py holds
    its lock while HDF5's filter decodes); the same frames (tests/test_spool_journal.py)."""
    if reducer is None:
        raise ValueError(f"{DATA}/data rows {start}..{stop} are derived, but the spool has no {DERIVED}")
    raw = _detector_chunks(f, start, stop) if fast else None
    if raw is None:
        raw = read_detector_frames(f, start, stop)
    if raw is None or len(raw) != stop - start:
        raise ValueError(f"{DATA}/data rows {start}..{stop} are derived from detector frames the spool lacks")
    return reducer.reduce_batch(raw)[0]


def _detector_chunks(f: h5py.Group, start: int, stop: int) -> np.ndarray | None:
    """Detector frames of rows [start, stop) decoded from their chunks' bytes, or None where
    that does not apply (rows in the tail or never written, a chunk HDF5 stored unfiltered):
    the caller reads them through HDF5 then."""
    g = f[DATA]
    det = g[DETECTOR_FRAMES]
    r = det.chunks[0]
    count = int(g.attrs["count"])
    whole = count // r * r if DETECTOR_TAIL in g else count
    if stop > min(whole, det.shape[0]) or start >= stop:
        return None
    shape, dtype = det.shape[1:], det.dtype
    lo = start // r * r
    out = np.empty((-(-(stop - lo) // r) * r, *shape), dtype)
    for row in range(lo, stop, r):
        if det.id.get_chunk_info_by_coord((row, 0, 0)).byte_offset is None:
            return None  # never written: rows without detector frames read zeros through HDF5
        mask, blob = det.id.read_direct_chunk((row, 0, 0))
        if mask:
            return None
        out[row - lo:row - lo + r] = bslz4_decompress(blob, dtype, (r, *shape))
    return out[start - lo:stop - lo]


def fill_derived(f: h5py.Group, frames: np.ndarray, start: int) -> None:
    """Put the derived frames into ``frames`` (rows ``start`` on, as read from ``data``)."""
    g = f[DATA].get(DERIVED)
    if g is None or "pending_rows" not in g.attrs:
        return
    reducer, pending = load_derivation(f)
    stop = start + len(frames)
    for a, b in pending:
        lo, hi = max(a, start), min(b, stop)
        for s in range(lo, hi, _DERIVE_ROWS):
            e = min(hi, s + _DERIVE_ROWS)
            frames[s - start:e - start] = derive_rows(f, reducer, s, e)


def read_detector_frames(f: h5py.Group, start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """The unbinned detector frames of committed rows [start, stop) of a spool (``f``: a spool
    file's root or a result file's /raw), None when it has none. Rows of a chunk that was not
    whole yet when the file was last written (a scan still open, or cut short by a crash) are
    read from ``detector_frames_tail``; spool files of earlier releases (one frame a chunk, no
    tail) read alike."""
    g = f[DATA]
    det = g.get(DETECTOR_FRAMES)
    if det is None:
        return None
    count = int(g.attrs["count"])
    stop = count if stop is None else min(stop, count)
    start = min(start, stop)
    tail = g.get(DETECTOR_TAIL)
    whole = count // det.chunks[0] * det.chunks[0] if tail is not None else count
    out = det[start:max(start, min(stop, whole))]
    if stop > whole:  # the tail ends at its last frame: rows after it had none
        first = max(start, whole)
        rows = np.zeros((stop - first, *det.shape[1:]), det.dtype)
        kept = tail[first:min(stop, tail.shape[0])]
        rows[:len(kept)] = kept
        out = np.concatenate([out, rows])
    return out


def creating_path(path: Path) -> Path:
    """Where :meth:`SpoolWriter.create` writes a new spool file until it is closed."""
    return path.with_name(f".{path.name}.part")


def discard_half_created(spool_dir: str | Path) -> list[Path]:
    """Delete the spool files a daemon was killed creating (hidden ``.<name>.spool.h5.part``):
    they hold no frame, only the beginning of a scan's header. Returns what was deleted."""
    gone = []
    for part in Path(spool_dir).glob(f".*{SUFFIX}.part"):
        part.unlink(missing_ok=True)
        gone.append(part)
    return gone


def _empty_and_over(path: Path) -> str | None:
    """The final status (failed, aborted) of spool file ``path`` when it is closed (no journal)
    and holds no frame — neither a positioned one (``count``) nor a detector frame kept without
    a position (:data:`UNPOSITIONED`); else None (also for a file unreadable or not ours)."""
    if journal_path(path).exists():  # open, or its close failed: the journal is its record
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:  # (a reader's lock must not keep it)
            status = f.attrs.get("status")
            if f.attrs.get("format") != FORMAT or status not in ("failed", "aborted"):
                return None
            g = f[DATA]
            # the detector images past a scan's positions are kept whatever became of the scan:
            # a spool holding only those (they came first, or its positioned frames were refused)
            # was deleted with them
            unpositioned = g.get(UNPOSITIONED)
            if int(g.attrs.get("count", 1)) != 0 or (unpositioned is not None and unpositioned.shape[0]):
                return None
            return str(status)
    except (OSError, KeyError):
        return None


def remove_if_empty(path: str | Path) -> str | None:
    """Delete spool file ``path`` when its scan is over (failed or aborted) and it holds no
    frame — a scan that ended before its first frame reached the disk (a daemon killed just
    after its scan_start, then nothing came; cancelled or timed out before any frame). Such a
    file holds nothing to reconstruct (finish_scan refuses it), yet it was kept for ever and
    blocked its scan id. Returns the scan's status when the file was deleted, else None."""
    path = Path(path)
    status = _empty_and_over(path)
    if status is not None:
        path.unlink(missing_ok=True)
    return status


def empty_final_spools(spool_dir: str | Path) -> list[Path]:
    """Spool files :func:`remove_if_empty` deletes, left by a release that kept them."""
    return sorted(p for p in Path(spool_dir).glob(f"*{SUFFIX}") if _empty_and_over(p) is not None)


def unfinished_spools(spool_dir: str | Path) -> list[Path]:
    """Spool files whose scan never reached a final state (oldest first)."""
    out = []
    for path in sorted(Path(spool_dir).glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
        if path.with_name(path.name + PENDING_SUFFIX).exists():
            continue  # finished: only its result waits for its frames (rawcopy.py)
        if journal_path(path).exists():
            # open, or closed while its scan was: the HDF5 file may need its journal to be read
            out.append(path)
            continue
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") == FORMAT and f.attrs.get("status") in ("open", "ended"):
                    out.append(path)
        except OSError:
            out.append(path)  # unreadable: let recovery report it rather than silently skip it
    return out
