"""The spool's journal: an append-only record of every spool write, beside the HDF5 file.

HDF5 writes a flush's chunks and metadata in an order of its own, and a file cut short part way
through a flush is not one of its consistent states (FORMATS.md § "The journal"): a kill there
could lose frames already received. The journal does not depend on that order. Each append of
the spool is one record, written (and fsynced, with the spool's ``fsync`` option) before the
append counts as received; a record cut short by a kill fails its length or CRC and is dropped
(it was never acknowledged). Recovery rebuilds the HDF5 file from the journal
(:func:`cryoptycho.daemon.storage.spool.repair_spool`).

File: :data:`MAGIC`, then records. A record: ``<QI`` (payload bytes, CRC32 of the payload), the
payload: ``<I`` (header bytes), a msgpack map (the header: ``op`` and its fields), the body
(the bytes the header's fields describe, one after another).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("cryoptycho.journal")

MAGIC = b"CRYOPTYCHO-SPOOL-JOURNAL-1\n"
SUFFIX = ".journal"
_RECORD = struct.Struct("<QI")
_HEADER = struct.Struct("<I")
try:  # the records' CRC-32 from ISA-L (python-isal, the optional [isal] extra): the same checksum
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # (measured: 57.6 against 4.3 GB/s, 0.06 against 0.86 µs per 3.7 kB DECTRIS frame)
    _crc32 = zlib.crc32


#: the record kinds (``op``) this build knows (FORMATS.md § "The journal")
KNOWN_OPS = frozenset({"base", "opened", "closed", "append", "status", "options", "chunk_per_frame",
                       "detector", "derive", "unpositioned"})
#: the header field a newer build sets on a record that a build not knowing its kind may skip:
#: one that carries no frame and changes none of the file's rows (an annotation, a figure). A
#: record of an unknown kind without it is required: the spool is refused by name, kept as it is
OPTIONAL = "optional"


def unknown_kind(header: dict[str, Any]) -> tuple[str, bool] | None:
    """(the kind, whether optional) of a record this build does not know; None for a known one."""
    op = header.get("op")
    if isinstance(op, str) and op in KNOWN_OPS:
        return None
    if not isinstance(op, str):
        # a list or a map raised TypeError (unhashable) out of every read of the spool, naming
        # neither the file nor the record; no kind at all, its writer's mark is not trusted either
        return repr(op), False
    return op, header.get(OPTIONAL) is True


def journal_path(spool_file: str | Path) -> Path:
    """``<stem>.spool.h5`` → ``<stem>.spool.journal`` (a stem of at most 200 bytes fits)."""
    p = Path(spool_file)
    return p.with_name(p.name.removesuffix(".h5") + SUFFIX)


@dataclass
class Record:
    header: dict[str, Any]
    body: memoryview
    end: int  # offset in the file just after this record


@dataclass
class Scan:
    """What one pass over a journal found (:func:`scan_records`)."""

    records: int
    first: dict[str, Any] | None  # the first record's header (the base)
    last: dict[str, Any] | None  # the last whole record's header
    end: int  # the offset after the last whole record
    why: str | None  # why reading stopped before the end of the file (None: at its end)
    #: kinds of records this build does not know and may skip (a newer build's optional records), with their counts
    skipped: dict[str, int] = field(default_factory=dict)
    #: the first kind of record this build does not know and must not skip (None: none)
    required: str | None = None

    def unknown_note(self) -> str:
        """The skipped records, for a log line ("" when none)."""
        if not self.skipped:
            return ""
        kinds = ", ".join(f"{n} {op!r}" for op, n in sorted(self.skipped.items()))
        return (f"skipped {sum(self.skipped.values())} journal records this cryoptycho does not know, marked "
                f"optional by the newer one that wrote them ({kinds})")

    def refusal(self) -> str:
        """Why a journal with a required unknown record is not applied (``required`` set)."""
        return (f"its journal holds a record {self.required!r} that this cryoptycho does not know and that the newer "
                "one that wrote it marked as required; the file and its journal are kept unchanged, for that "
                "version to recover (daemon/SERVICE.md, \"Downgrades and the spool journal\")")


def iter_records(path: str | Path, start: int | None = None) -> Iterator[Record | str]:
    """The whole records of journal ``path`` one by one, then, if the file goes on after the
    last of them, why it was not read on (a str). A record cut short, or one whose CRC fails,
    ends the journal: everything from there on was never acknowledged. One record is in
    memory at a time. ``start``: the offset of a record to begin at (the end of an earlier one)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            yield "not a spool journal (no magic at its start)"
            return
        pos = len(MAGIC)
        if start is not None and start > pos:
            pos = f.seek(start)
        while True:
            head = f.read(_RECORD.size)
            if not head:
                return
            if len(head) < _RECORD.size:
                yield f"a record header cut short at byte {pos}"
                return
            size, crc = _RECORD.unpack(head)
            left = os.fstat(f.fileno()).st_size - pos - _RECORD.size
            if size > left:  # a damaged length must not make us allocate what the file lacks
                yield f"a record cut short at byte {pos} ({max(left, 0)} of {size} bytes)"
                return
            payload = f.read(size)
            if len(payload) < size:
                yield f"a record cut short at byte {pos} ({len(payload)} of {size} bytes)"
                return
            if _crc32(payload) != crc or size < _HEADER.size:
                yield f"a record whose CRC fails at byte {pos}"
                return
            (hlen,) = _HEADER.unpack_from(payload, 0)
            try:
                header = msgpack.unpackb(payload[_HEADER.size:_HEADER.size + hlen])
            except (ValueError, msgpack.UnpackException) as exc:  # CRC passed: not a torn write
                yield f"a record whose header does not decode at byte {pos}: {exc}"
                return
            pos += _RECORD.size + size
            yield Record(header, memoryview(payload)[_HEADER.size + hlen:], pos)


def scan_records(path: str | Path) -> Scan:
    """One pass over journal ``path``: how many whole records, the first and last, where they end."""
    out = Scan(0, None, None, len(MAGIC), None)
    for item in iter_records(path):
        if isinstance(item, str):
            out.why = item
            if out.records == 0:
                out.end = 0 if item.startswith("not a spool journal") else len(MAGIC)
        else:
            out.records += 1
            out.first = out.first or item.header
            out.last, out.end = item.header, item.end
            unknown = unknown_kind(item.header)
            if unknown is not None:
                if unknown[1]:
                    out.skipped[unknown[0]] = out.skipped.get(unknown[0], 0) + 1
                elif out.required is None:
                    out.required = unknown[0]
    return out


class Journal:
    """Appends records to one journal file (one writer, the spool thread)."""

    def __init__(self, path: Path, fd: int, fsync: bool, end: int = 0) -> None:
        self.path = path
        self._fd = fd
        self._fsync = fsync
        #: the offset after the last record written (where the next one begins)
        self.end = end
        #: why no record may be written any more (a failed write left bytes it could not cut off)
        self.broken: str | None = None

    @classmethod
    def create(cls, path: str | Path, fsync: bool) -> Journal:
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        journal = cls(path, fd, fsync)
        try:
            _write_all(fd, [MAGIC])
            journal.end = len(MAGIC)
        except BaseException:
            journal.close()
            raise
        return journal

    @classmethod
    def resume(cls, path: str | Path, end: int, fsync: bool) -> Journal:
        """Append after the record ending at ``end``: a torn record after it is cut off first,
        so that new records follow whole ones."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, fsync, end)

    def write(self, header: dict[str, Any], body: Sequence[Any] = (), sync: bool = True) -> None:
        """Append one record; on disk (fsynced with the ``fsync`` option) when it returns,
        unless ``sync`` is False (the caller syncs with a later record)."""
        if self.broken is not None:
            raise OSError(f"journal {self.path.name} takes no more records: {self.broken}")
        packed = msgpack.packb(header)
        pieces = [_HEADER.pack(len(packed)), packed, *body]
        crc = 0
        size = 0
        for piece in pieces:
            crc = _crc32(piece, crc)
            size += memoryview(piece).nbytes
        try:
            _write_all(self._fd, [_RECORD.pack(size, crc), *pieces])
            if sync:
                self.sync()
        except BaseException as exc:
            # A record that failed (ENOSPC or EDQUOT part way, EIO, fsync) is not acknowledged,
            # but its bytes may be in the file, and a writer that goes on after a failure (a
            # set_options answered "not kept") appended after them: a reader stops at the torn
            # record, and the records after it (acknowledged frames) were lost at recovery.
            self._cut_back(exc)
            raise
        self.end += _RECORD.size + size

    def _cut_back(self, why: BaseException) -> None:
        """Cut the journal back to its last whole record (:attr:`end`) after a failed write;
        when that fails too, no record may follow (:attr:`broken`): the next write raises."""
        try:
            os.ftruncate(self._fd, self.end)  # O_APPEND: the next record starts at the new end
        except OSError as exc:
            self.broken = (f"a failed write ({type(why).__name__}: {why}) could not be cut off at byte "
                           f"{self.end} ({exc}): a record after it would be unreadable")

    def sync(self) -> None:
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


def _write_all(fd: int, pieces: Sequence[Any]) -> None:
    """os.writev until every byte is written (a write may be short: a signal, a full pipe)."""
    views = [memoryview(p).cast("B") for p in pieces if memoryview(p).nbytes]
    max_iov = 512  # IOV_MAX is 1024 on Linux: a record of many chunks goes in several calls
    while views:
        done = os.writev(fd, views[:max_iov])
        while views and done >= views[0].nbytes:
            done -= views[0].nbytes
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


#: what a file system that cannot sync a directory answers its fsync (FUSE file systems, CIFS/SMB
#: and some NFS set-ups: EINVAL, fsync(2)'s "does not support synchronization")
_DIR_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_dirs_said: set[str] = set()
_dirs_said_lock = threading.Lock()


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that a file created or renamed in it survives a power
    loss), by its path. A directory on a file system that cannot sync one is skipped (said
    once per directory): it offers no such ordering to wait for, and raising failed every
    scan's finish there after its result was written (svc8 made these fsyncs unconditional). A
    file's fsync, and any other error on a directory's (EIO), still raise."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _DIR_SYNC_UNSUPPORTED or not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise
            with _dirs_said_lock:
                said, _ = str(path) in _dirs_said, _dirs_said.add(str(path))
            if not said:
                log.warning("the file system of %s does not sync directories (fsync: %s): a file renamed or "
                            "deleted there may not survive a power loss; going on without", path, exc)
    finally:
        os.close(fd)


def iter_bodies(body: memoryview, sizes: Sequence[int]) -> Iterator[memoryview]:
    """The pieces of a record's body, of ``sizes`` bytes each, in order."""
    pos = 0
    for n in sizes:
        yield body[pos:pos + n]
        pos += n
    if pos != len(body):
        raise ValueError(f"a journal record's body has {len(body)} bytes, its header describes {pos}")
