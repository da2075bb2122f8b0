"""The viewer's web app (Starlette): the static page, one WebSocket per browser, result files.

Read-only by design: nothing here sends anything to the daemon except control-socket reads
(list_scans, snapshot). With an access token set, every route but /healthz requires it, as
``?token=…`` or ``Authorization: Bearer …``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .hub import Hub

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: seconds a client has for a request's headers, from connecting or from the last response
REQUEST_HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, hanging up on a connection that has not sent a whole
    request's headers within REQUEST_HEADER_TIMEOUT_S. uvicorn closes idle keep-alive
    connections but waits for ever for a request that never ends (slowloris, a port scanner,
    a proxy's pre-opened socket): each held a file descriptor until none was left for
    browsers. A request being answered, and a WebSocket, are never cut."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self.loop.call_later(REQUEST_HEADER_TIMEOUT_S, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle: Any) -> None:
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        # a WebSocket upgrade hands the transport to its own protocol and leaves self.cycle as it was
        if waiting and self.transport.get_protocol() is self and not self.transport.is_closing():
            log.debug("HTTP client %s sent no whole request in %.0f s: disconnected", self.client,
                      REQUEST_HEADER_TIMEOUT_S)
            self.transport.close()


def _authorised(token: str | None, query: Any, headers: Any) -> bool:
    if not token:
        return True
    given = query.get("token") or ""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def create_app(hub: Hub, token: str | None = None, manage_hub: bool = True) -> Starlette:
    """The ASGI app over ``hub``. With ``manage_hub`` the app starts and stops the hub's
    subscriber thread with its own lifespan."""

    async def index(request: Request) -> Response:
        if not _authorised(token, request.query_params, request.headers):
            return PlainTextResponse("access token required: open /?token=…", status_code=401)
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def healthz(request: Request) -> Response:
        if hub.failure is not None:
            return JSONResponse({"ok": False, "error": repr(hub.failure)}, status_code=503)
        return JSONResponse({"ok": True, "scans": len(hub.scans)})

    caught_up = [False]
    catching_up = asyncio.Lock()

    async def catch_up() -> None:
        """Once, before the first HTTP read: the scans that ended before this viewer started
        (a script fetching /api/state or /files got nothing until a browser had connected)."""
        async with catching_up:  # concurrent first requests all wait for the one refresh
            if not caught_up[0]:
                await asyncio.get_running_loop().run_in_executor(None, hub.refresh_from_control)
                caught_up[0] = True

    async def state(request: Request) -> Response:
        if not _authorised(token, request.query_params, request.headers):
            return JSONResponse({"error": "unauthorised"}, status_code=401)
        await catch_up()
        return JSONResponse(hub.state_messages())

    async def result_file(request: Request) -> Response:
        if not _authorised(token, request.query_params, request.headers):
            return PlainTextResponse("unauthorised", status_code=401)
        scan_id, kind = request.path_params["scan_id"], request.path_params["kind"]
        await catch_up()
        path = hub.file_for(scan_id, kind)
        if path is None or not path.is_file():
            return PlainTextResponse(f"no {kind!r} file for scan {scan_id!r}", status_code=404)
        return FileResponse(path, filename=path.name)

    async def websocket(ws: WebSocket) -> None:
        if not _authorised(token, ws.query_params, ws.headers):
            await ws.close(code=4401)
            return
        await ws.accept()
        loop = asyncio.get_running_loop()
        slot = hub.attach(loop)
        try:
            problem = await loop.run_in_executor(None, hub.refresh_from_control)
            hello: dict[str, Any] = {"kind": "hello", "control": problem or "ok"}
            await ws.send_json(hello)
            for message in hub.state_messages():
                await ws.send_json(message)
            while True:
                for message in await slot.take():
                    await ws.send_json(message)
        except WebSocketDisconnect:
            pass
        finally:
            hub.detach(slot)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        if manage_hub:
            hub.start()
        try:
            yield
        finally:
            if manage_hub:
                hub.stop()

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/state", state),
        Route("/files/{scan_id}/{kind}", result_file),
        WebSocketRoute("/ws", websocket),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
