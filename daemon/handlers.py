"""Control-socket handlers: method name → handler(**params) → result dict.

The protocol's ``dispatch`` (protocols/control.py) wraps results in ``{success: True, msg,
result}`` and turns any exception into ``{success: False, msg}``, so a handler simply raises on
bad input. Handlers run on the manager thread; none of them waits for an engine or the disk: one
whose answer needs the spool thread (``receipt``, ``finish_scan``) hands it to
:meth:`Service.reply_later`, and the manager answers when the spool thread is done.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import numpy as np
from cryoptycho.gpu.backend import BackendUnavailable, get_xp
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.schema import SCAN_ID_PATTERN
from pydantic import ValidationError

from .scans import ScanRefused
from .session import State

if TYPE_CHECKING:
    from .service import Service

Handler = Callable[..., dict[str, Any]]
T = TypeVar("T")

#: entries of each list a `status` reply carries (``waiting``, ``scans``, ``unclosed_spools``),
#: with its total beside it (``…_total``): a client reads a reply of at most its
#: ``max_header_bytes`` (1 MiB by default), and these lists grow without bound on a daemon that
#: runs for years (a detector's series wait however many there are; every failed spool close is
#: remembered until a re-open rebuilds it). A scan's summary is ≈ 0.4–1 kB, an unclosed spool's
#: note ≈ 0.3 kB: 200 of each stay well inside 1 MiB.
STATUS_LIST_MAX = 200
#: scans a `list_scans` reply carries at most: the running ones, then the newest (the daemon
#: remembers HISTORY ended scans, which fit; scans waiting for a worker do not: see STATUS_LIST_MAX)
LIST_SCANS_MAX = 512
#: packed bytes of the summaries a `list_scans` reply carries at most, within a client's 1 MiB
#: ``max_header_bytes``: a summary is ≈ 0.5–1 kB, but one with a producer's abort reason (up to
#: 4096 characters, a traceback often) holds it twice (``end_reason``, ``error``): 256 such
#: aborted scans made a 2.1 MB reply that no client could read
LIST_SCANS_BYTES = 640 * 1024
#: packed bytes of each list a `status` reply carries at most (next to its STATUS_LIST_MAX):
#: the count alone did not bound the reply — 200 live scans with 1024-character ids (the
#: largest ``max_scan_id_length``) and a 4096-character cancel reason in each summary
#: (``end_reason`` while its worker stops) made a status no client could read. 640 kB in all,
#: as a `list_scans` reply
STATUS_SCANS_BYTES = 448 * 1024
STATUS_WAITING_BYTES = 64 * 1024
STATUS_UNCLOSED_BYTES = 128 * 1024
#: results waiting for their raw frames (``raw_pending``: two paths each, ≈ 0.2–8 kB)
STATUS_RAW_PENDING_BYTES = 64 * 1024
#: the ``max_header_bytes`` the byte budgets above are made for: a daemon whose
#: ``limits.max_header_bytes`` is lower has them cut in proportion (``_budget``), or a status or
#: list_scans it could still answer in part was a max_header_bytes failure
BUDGETS_FOR_HEADER_BYTES = 1 << 20
#: characters of a control `cancel`'s reason, as of a producer's abort (protocols/schema.py)
REASON_MAX = 4096


def _leading(items: Iterable[T], most: int, most_bytes: int) -> list[T]:
    """The first of ``items``, at most ``most`` of them and ``most_bytes`` packed (none skipped:
    what is left out comes after all listed); the first is kept whatever its size."""
    kept: list[T] = []
    size = 0
    for item in itertools.islice(items, most):
        size += len(msgpack.packb(item, default=_plain))
        if size > most_bytes and kept:
            break
        kept.append(item)
    return kept


def _budget(nbytes: int, max_header_bytes: int) -> int:
    """A reply list's byte budget (made for a 1 MiB header) for a daemon whose
    ``limits.max_header_bytes`` is this: cut in proportion when it is lower, never raised (a
    client reads 1 MiB by default whatever the daemon takes)."""
    return nbytes * min(max_header_bytes, BUDGETS_FOR_HEADER_BYTES) // BUDGETS_FOR_HEADER_BYTES


def _bounded(summaries: list[dict[str, Any]], running: Any, most_bytes: int = LIST_SCANS_BYTES) -> list[dict[str, Any]]:
    """The summaries a `list_scans` reply carries, oldest first as listed: the running scans,
    then the newest others, at most LIST_SCANS_MAX of them and LIST_SCANS_BYTES packed. The
    newest alone were the scans waiting last: with many waiting (a detector's series) the
    running scans, listed before them, were left out, and watch and the viewer (which seed
    their boards from this) did not show them."""
    order = [i for i, s in enumerate(summaries) if s["scan_id"] in running]
    order += [i for i in range(len(summaries) - 1, -1, -1) if summaries[i]["scan_id"] not in running]
    # (the newest that fit: what is left out is older than all listed)
    kept = _leading(((i, summaries[i]) for i in order), LIST_SCANS_MAX, most_bytes)
    return [summaries[i] for i, _ in sorted(kept, key=lambda pair: pair[0])]


def _plain(value: Any) -> Any:
    """A summary's NumPy scalars as the reply's encoder packs them (its size is what counts)."""
    return value.item() if isinstance(value, np.generic) else str(value)


class HandlerError(ProtocolError):
    """A request the service cannot honour; its message becomes the reply's ``msg`` and its
    ``field``/``rule`` the reply's ``result`` (like a protocol error). Without ``field``, a
    message ``"params.x: text"`` names field ``params.x``."""

    def __init__(self, message: str, field: str | None = None, rule: str = "invalid_params") -> None:
        if field is None:
            head, sep, rest = message.partition(": ")
            field, message = (head, rest) if sep and head.startswith("params") and " " not in head else (
                "params", message)
        super().__init__(field, rule, message)


class Later(dict):  # type: ignore[type-arg]
    """What a handler returns when its reply is made later (:meth:`Service.reply_later`): an
    empty result that is never sent."""


def _session(service: Service, scan_id: Any) -> Any:
    if not isinstance(scan_id, str) or not scan_id:
        raise HandlerError("required (a scan id string)", "params.scan_id", "string_type")
    session = service.scans.sessions.get(scan_id)
    if session is None:
        raise HandlerError(f"unknown scan {scan_id!r}", "params.scan_id", "known_scan")
    return session


def build_table(service: Service) -> dict[str, Handler]:
    """The control table of ``service`` (closures over it)."""

    def ping() -> dict[str, Any]:
        return {"pong": True, "time_s": time.time(), "pid": os.getpid()}

    def budget(nbytes: int) -> int:
        return _budget(nbytes, service.limits.max_header_bytes)

    def status() -> dict[str, Any]:
        scans = service.scans
        live = [s for s in scans.sessions.values() if not s.state.final]
        # running scans first (at most max_concurrent_scans), then those next in the queue
        live.sort(key=lambda s: s.scan_id not in scans.running)
        # the newest (insertion order)
        raw_pending = scans.raw_pending()
        unclosed = _leading(reversed(list(scans.unclosed.items())), STATUS_LIST_MAX,
                            budget(STATUS_UNCLOSED_BYTES))[::-1]
        return {
            "uptime_s": time.monotonic() - service.started_at,
            "endpoints": service.endpoints,
            "metrics_port": service.metrics_port,
            "running": sorted(scans.running),
            # the next STATUS_LIST_MAX to run, in queue order
            "waiting": _leading(scans.waiting, STATUS_LIST_MAX, budget(STATUS_WAITING_BYTES)),
            "waiting_total": len(scans.waiting),
            "queued_frames": scans.queued_frames(),
            "memory_reserved_bytes": scans.reserved(),
            "max_concurrent_scans": service.config.max_concurrent_scans,
            "max_queued_scans": service.config.max_queued_scans,  # a held producer asks for room (DECTRIS bridge)
            "stopping": scans.stopping,
            "scans": dict(_leading(((s.scan_id, s.summary()) for s in live), STATUS_LIST_MAX,
                                   budget(STATUS_SCANS_BYTES))),
            "scans_total": len(live),
            # where the frames of scans whose spool close failed are, until a re-open rebuilds it
            "unclosed_spools": dict(unclosed),
            "unclosed_spools_total": len(scans.unclosed),
            # results written without their raw frames while another program held the scan's spool
            # for writing (storage/rawcopy.py): the spool and its journal stay until the copy
            "raw_pending": dict(_leading(
                ((sid, {"spool": str(spool), "result": str(result), "last_failure": scans.raw_failure(sid)})
                 for sid, (spool, result) in sorted(raw_pending.items())),
                STATUS_LIST_MAX, budget(STATUS_RAW_PENDING_BYTES))),
            "raw_pending_total": len(raw_pending),
        }

    def list_scans(state: str | None = None) -> dict[str, Any]:
        want = state
        if want is not None and want not in {s.value for s in State}:
            raise HandlerError(f"must be one of {', '.join(s.value for s in State)}", "params.state", "literal_error")
        # filtered on the summary's own state: a worker may change the state between a check of
        # it and the summary, which then listed an aborted scan as the announced one asked for
        out = [summary for summary in (s.summary() for s in list(service.scans.sessions.values()))
               if want in (None, summary["state"])]
        return {"scans": _bounded(out, service.scans.running, budget(LIST_SCANS_BYTES)), "total": len(out)}

    def snapshot(scan_id: str) -> dict[str, Any]:
        """The latest preview of a scan (late joiners), with its summary; images are absent
        until the worker published its first preview."""
        session = _session(service, scan_id)
        summary = session.summary()
        with session.lock:
            preview = session.figures.get("last_preview")
        reply: dict[str, Any] = {"scan": summary}
        if preview is None:
            return reply
        # the last typed Preview the worker published; the reply keeps its complex object
        amplitude = preview.object_amplitude if preview.object_amplitude is not None else 1.0
        reply.update(
            object=(amplitude * np.exp(1j * preview.object_phase)).astype(np.complex64),
            probe=preview.probe,
            coverage=preview.coverage,
            iteration=preview.iteration,
            pixel_size_m=preview.pixel_size_m,
            origin_m=list(preview.origin_m),
        )
        return reply

    def cancel(scan_id: str, reason: str = "") -> dict[str, Any]:
        session = _session(service, scan_id)
        # kept as the scan's end_reason and error, in every summary of it: bounded as a
        # producer's abort reason is (a 1 MiB one made list_scans unreadable)
        if not isinstance(reason, str):
            raise HandlerError("must be a string", "params.reason", "string_type")
        if len(reason) > REASON_MAX:
            raise HandlerError(f"{len(reason)} characters, at most {REASON_MAX}", "params.reason", "string_too_long")
        if session.state.final:
            raise HandlerError(f"scan {session.scan_id!r} is already {session.state.value}", "params.scan_id",
                               "live_scan")
        service.scans.abort_scan(session, reason or "cancelled by control request")
        return {"scan_id": session.scan_id, "state": session.state.value}

    def set_options(options: dict[str, Any], scan_id: str | None = None) -> dict[str, Any]:
        """Change reconstruction options: of one running scan (``scan_id``) or, without it, the
        defaults of scans that start later."""
        overrides = options
        if not isinstance(overrides, dict) or not overrides:
            raise HandlerError("required (a dict of ReconOptions fields)", "params.options", "dict_type")
        if scan_id is None:
            try:
                merged = service.config.options.merged(overrides)
            except ValidationError as exc:
                raise _options_error(exc) from None
            try:
                # valid but not installed here: refused now, not at the next scan (or worse)
                get_xp(merged.backend)
            except BackendUnavailable as exc:
                raise HandlerError(str(exc), "params.options.backend", "backend_available") from None
            service.config.options = merged
            return {"scope": "defaults", "options": service.config.options.to_dict()}
        session = _session(service, scan_id)
        worker = service.scans.running.get(session.scan_id)
        if worker is None and session.scan_id in service.scans.waiting and not session.state.final:
            # accepted, waiting for a worker: its worker starts with these (any option may change,
            # backend and algorithm too, as nothing runs yet)
            try:
                new = service.scans.set_waiting_options(session, overrides)
            except ValidationError as exc:
                raise _options_error(exc) from None
            except ScanRefused as exc:
                where = exc.field if exc.field.startswith("options.") else "options"
                raise HandlerError(exc.message, f"params.{where}", exc.rule) from None

            # answered once they are in the scan's spool: a restart recovers it with them
            kept = _answer_once_kept("the waiting scan", "a restart before it runs starts it",
                                     {"scope": session.scan_id, "options": new.to_dict(), "queued": True})
            return service.reply_later("set_options", lambda done: service.scans.keep_waiting_options(session, done),
                                       kept)
        if worker is None:
            raise HandlerError(f"scan {session.scan_id!r} has no running worker ({session.state.value}): the "
                               "options of a scan change while it waits or runs, not after",
                               "params.scan_id", "running_scan")
        for key in overrides:
            if key in ("backend", "precision", "algorithm"):
                raise HandlerError("cannot change while a scan runs", f"params.options.{key}", "fixed_while_running")
        try:
            new = worker.options.merged(overrides)
        except ValidationError as exc:
            raise _options_error(exc) from None
        try:
            # what a restart recovers it with (kept below) must fit the budget the restart checks
            service.scans.set_running_options(session, overrides, new)
        except ScanRefused as exc:
            where = exc.field if exc.field.startswith("options.") else "options"
            raise HandlerError(exc.message, f"params.{where}", exc.rule) from None
        worker.set_options(new)
        if session.scan_id not in service.scans.spools:
            # its end was read (or it is being cancelled): its spool is closed and its final
            # refinement runs from the frames its worker holds. The change is applied — the
            # moment operators adjust iterations — and the answer says a restart would not keep it
            return {"scope": session.scan_id, "options": new.to_dict(), "kept": False,
                    "note": "the scan takes no more frames and its spool is closed: the change applies to "
                            "this run of it only; a restart recovers it with its earlier options"}

        # answered once they are in the scan's spool (journaled in order with its frames):
        # a restart, even after kill -9, recovers the scan with them
        kept_running = _answer_once_kept("the running scan", "a restart recovers it",
                                         {"scope": session.scan_id, "options": new.to_dict(), "kept": True})
        return service.reply_later(
            "set_options", lambda done: service.scans.keep_running_options(session, done), kept_running)

    def receipt(scan_id: str) -> dict[str, Any]:
        """What the daemon holds of a scan: frames received (spooled), whether its scan_end was
        read. Cheap enough to poll: producers confirm delivery with it (PROTOCOL.md § 4.5)."""
        if not isinstance(scan_id, str) or not scan_id:
            raise HandlerError("required (a scan id string)", "params.scan_id", "string_type")
        session = service.scans.sessions.get(scan_id)
        if session is None:
            # not (yet) read, refused, or long forgotten: the daemon holds nothing of it
            refused = service.scans.refused.get(scan_id)
            unknown = {"scan_id": scan_id, "state": "unknown" if refused is None else "refused",
                       "ended": refused is not None, "end_reason": None, "end_count": None,
                       "expected_frames": None, "frames": {"received": 0}, "missing": [],
                       "error": None if refused is None else refused[1],
                       "refused_at": None if refused is None else refused[0]}

            def with_taken(taken: str | None, error: Exception | None) -> dict[str, Any]:
                if error is not None:
                    raise error
                # why a scan_start of this id would be refused as not unique (a spool or result
                # of it, e.g. from before a restart), or None: a sender is told before it sends
                # the scan, a DECTRIS bridge names its series anew; asked before a scan starts,
                # max_message_bytes: a producer sizes its messages below it (its sender is
                # disconnected and the message lost otherwise)
                return {**unknown, "taken": taken, "max_message_bytes": service.limits.max_message_bytes}

            if not re.fullmatch(SCAN_ID_PATTERN, scan_id):  # no scan can have it: no file to look for
                return with_taken(None, None)
            # looked for on the file-checks thread: stat calls on the spool and results
            # directories (a network file system's round trips, or a hung server) held the
            # manager loop for every receipt a producer polled, every peer waiting
            return service.reply_later(
                "receipt", lambda done: service.scans.off_manager(
                    lambda: service.scans.why_files_taken(scan_id), done, key=scan_id), with_taken)
        # the scan as the manager sees it now, whose frames read so far are counted once the
        # spool thread has written them: it reads the count after every write asked for before,
        # so every frame this receipt counts is on disk and none read before it is missed (the
        # delivery guarantee), while the manager loop goes on
        def seen() -> dict[str, Any]:  # under session.lock: every field read at one moment
            ledger = session.ledger
            closed = session.ended or session.state.final
            return {
                "scan_id": session.scan_id,
                "state": session.state.value,
                "ended": session.ended,
                "end_reason": session.end_reason,
                "end_count": session.end_count,
                "expected_frames": session.spec.expected_frames,
                "frames": ledger.as_dict(),
                # once nothing more is accepted, the first missing indices (at most 100)
                "missing": ledger.missing() if closed else [],
                "error": session.error,
                "refused": {"frames": session.frames_refused, "last": session.last_refusal},
                "starts_refused": session.starts_refused,
                "start_time_s": session.start_time_s,
            }

        with session.lock:
            now = seen()

        def stored() -> int:
            with session.lock:
                return session.ledger.received

        def start(done: Callable[[Any, Exception | None], None]) -> None:
            def on_disk(received: int | None, error: Exception | None) -> None:
                with session.lock:
                    halted = session.error is not None or session.state.final
                    stopped = session.error is not None and now["error"] is None
                if error is None and halted:
                    # the scan stopped (cancel, spool failure, acquisition timeout), maybe after
                    # this request: the stop's own spool operations (status, close; the mark or
                    # removal its worker's exit asks for) may come after this receipt's, and
                    # closes run on the closer thread; a receipt that says the scan stopped is
                    # answered once they are done too (its own closes, not other scans'), so
                    # that its spool holds what it counts and reads back closed
                    def settled() -> None:
                        service.scans.after_disk(stored, lambda n, err: done((n, stopped), err),
                                                 closes_of=session.scan_id)

                    service.scans.when_settled(session.scan_id, settled)
                else:
                    done((received, False), error)

            service.scans.after_disk(stored, on_disk)

        def answer(counted: tuple[int, bool] | None, error: Exception | None) -> dict[str, Any]:
            if error is not None:
                raise error
            assert counted is not None
            received, stopped = counted
            if stopped:
                # the reply is the scan as of now, every field of it (state, reason, missing
                # frames), so that a final state never comes without why it ended
                with session.lock:
                    now.update(seen())
            now["frames"]["received"] = received
            return now

        return service.reply_later("receipt", start, answer)

    def finish_scan(scan_id: str) -> dict[str, Any]:
        """Reconstruct what a scan received, now: ends an open scan whose producer is gone, or
        re-opens a scan stopped without a result (acquisition timeout, cancel) from its spool —
        one the daemon no longer holds too (a restart, or more than HISTORY scans since), from
        the spool it kept. Answered once the spool thread has done so (the spool is read there,
        not here)."""
        # (an id no scan can have is unknown, as before: a name of 10,000 characters would
        # fail the file system's look with ENAMETOOLONG)
        if (isinstance(scan_id, str) and scan_id not in service.scans.sessions
                and len(scan_id) <= service.limits.max_scan_id_length and re.fullmatch(SCAN_ID_PATTERN, scan_id)):
            def start(done: Callable[[Any, Exception | None], None]) -> None:
                service.scans.finish_kept(scan_id, done)
        else:
            session = _session(service, scan_id)

            def start(done: Callable[[Any, Exception | None], None]) -> None:
                service.scans.finish_scan(session, done)

        def answer(live: Any, error: Exception | None) -> dict[str, Any]:
            if isinstance(error, ScanRefused):
                raise HandlerError(error.message, f"params.{error.field}", error.rule) from None
            if error is not None:
                raise error
            return {"scan_id": live.scan_id, "state": live.state.value, "frames": live.ledger.as_dict()}

        return service.reply_later("finish_scan", start, answer)

    table = {
        "ping": ping,
        "status": status,
        "list_scans": list_scans,
        "snapshot": snapshot,
        "cancel": cancel,
        "set_options": set_options,
        "receipt": receipt,
        "finish_scan": finish_scan,
    }
    return {name: _counted(service, name, fn) for name, fn in table.items()}


def _counted(service: Service, name: str, fn: Handler) -> Handler:
    """Count calls by method and outcome; keeps ``fn``'s signature for dispatch's parameter check."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            result = fn(*args, **kwargs)
        except Exception:
            service.metrics.control_requests.labels(method=name, success="false").inc()
            raise
        if not isinstance(result, Later):  # a reply made later is counted when it is made
            service.metrics.control_requests.labels(method=name, success="true").inc()
        return result

    return wrapper


def _answer_once_kept(scan: str, restart: str, reply: dict[str, Any]) -> Callable[[Any, Exception | None], dict[str, Any]]:
    """The deferred answer of a scan's ``set_options``, once its spool has (or could not) keep
    them: ``reply``, or rule ``kept_with_scan`` naming the disk's error and what a restart does."""

    def answer(_: Any, error: Exception | None) -> dict[str, Any]:
        if error is not None:
            raise HandlerError(f"applied to {scan}, but not kept with its spool ({type(error).__name__}: {error}): "
                               f"{restart} with its earlier options", "params.options", "kept_with_scan") from None
        return reply

    return answer


def _options_error(exc: ValidationError) -> HandlerError:
    """The first option error, named like a protocol error (field path, pydantic's type as rule)."""
    err = exc.errors()[0]
    return HandlerError(err["msg"], f"params.options.{'.'.join(str(p) for p in err['loc'])}", err["type"])
