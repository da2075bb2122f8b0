"""Control-socket handlers: method name → handler(params) → reply dict.

The protocol's ``dispatch`` turns any exception into ``{success: False, msg}``, so a handler may
simply raise; replies here always carry ``success`` and ``msg`` and run on the manager thread.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from pydantic import ValidationError

from .session import State

if TYPE_CHECKING:
    from .service import Service

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class HandlerError(ValueError):
    """A request the service cannot honour; its message becomes the reply's ``msg``."""


def _session(service: Service, params: dict[str, Any]) -> Any:
    scan_id = params.get("scan_id")
    if not isinstance(scan_id, str) or not scan_id:
        raise HandlerError("params.scan_id: required (a scan id string)")
    session = service.scans.sessions.get(scan_id)
    if session is None:
        raise HandlerError(f"params.scan_id: unknown scan {scan_id!r}")
    return session


def build_table(service: Service) -> dict[str, Handler]:
    """The control table of ``service`` (closures over it)."""

    def ping(params: dict[str, Any]) -> dict[str, Any]:
        return {"success": True, "msg": "pong", "time_s": time.time(), "pid": os.getpid()}

    def status(params: dict[str, Any]) -> dict[str, Any]:
        scans = service.scans
        return {
            "success": True,
            "msg": "ok",
            "uptime_s": time.monotonic() - service.started_at,
            "endpoints": service.endpoints,
            "metrics_port": service.metrics_port,
            "running": sorted(scans.running),
            "waiting": list(scans.waiting),
            "queued_frames": scans.queued_frames(),
            "memory_reserved_bytes": scans.reserved(),
            "max_concurrent_scans": service.config.max_concurrent_scans,
            "stopping": scans.stopping,
            "scans": {sid: s.summary() for sid, s in scans.sessions.items() if not s.state.final},
        }

    def list_scans(params: dict[str, Any]) -> dict[str, Any]:
        want = params.get("state")
        if want is not None and want not in {s.value for s in State}:
            raise HandlerError(f"params.state: must be one of {', '.join(s.value for s in State)}")
        out = [s.summary() for s in service.scans.sessions.values() if want in (None, s.state.value)]
        return {"success": True, "msg": f"{len(out)} scans", "scans": out}

    def snapshot(params: dict[str, Any]) -> dict[str, Any]:
        session = _session(service, params)
        summary = session.summary()
        with session.lock:
            preview = session.figures.get("last_preview")
        reply: dict[str, Any] = {"success": True, "msg": "ok", "scan": summary}
        if preview is None:
            reply["msg"] = "no reconstruction yet"
            return reply
        obj = np.asarray(preview["object"])
        reply.update(
            object=obj.astype(np.complex64),
            probe=np.asarray(preview["probe"], dtype=np.complex64),
            coverage=np.asarray(preview["coverage"], dtype=np.float32),
            iteration=int(preview["iteration"]),
            pixel_size_m=float(preview["pixel_size_m"]),
            origin_m=[float(v) for v in preview["origin_m"]],
        )
        return reply

    def cancel(params: dict[str, Any]) -> dict[str, Any]:
        session = _session(service, params)
        if session.state.final:
            raise HandlerError(f"scan {session.scan_id!r} is already {session.state.value}")
        reason = str(params.get("reason") or "cancelled by control request")
        service.scans.abort_scan(session, reason)
        return {"success": True, "msg": f"cancelling {session.scan_id}"}

    def set_options(params: dict[str, Any]) -> dict[str, Any]:
        """Change reconstruction options: of one scan (``scan_id``) or the defaults of new scans."""
        overrides = params.get("options")
        if not isinstance(overrides, dict) or not overrides:
            raise HandlerError("params.options: required (a dict of ReconOptions fields)")
        scan_id = params.get("scan_id")
        if scan_id is None:
            try:
                service.config.options = service.config.options.merged(overrides)
            except ValidationError as exc:
                raise HandlerError(_first_error(exc)) from None
            return {"success": True, "msg": "defaults updated", "options": service.config.options.to_dict()}
        session = _session(service, params)
        worker = service.scans.running.get(session.scan_id)
        if worker is None:
            raise HandlerError(f"scan {session.scan_id!r} has no running worker ({session.state.value})")
        for key in overrides:
            if key in ("backend", "precision"):
                raise HandlerError(f"params.options.{key}: cannot change while a scan runs")
        try:
            new = worker.options.merged(overrides)
        except ValidationError as exc:
            raise HandlerError(_first_error(exc)) from None
        worker.set_options(new)
        return {"success": True, "msg": f"options of {session.scan_id} updated", "options": new.to_dict()}

    return {
        "ping": ping,
        "status": status,
        "list_scans": list_scans,
        "snapshot": snapshot,
        "cancel": cancel,
        "set_options": set_options,
    }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"params.options.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
