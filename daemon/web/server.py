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

from .hub import Hub

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


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
