"""The dashboard's Starlette app: the page, its assets, its JSON and its event stream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._http import TokenGate
from .._metrics import Pools, pools_of
from .._remote import plain
from ._hub import Hub

if TYPE_CHECKING:
    from ...server._server import SocketServer

__all__ = ["dashboard_app"]

#: Seconds between two pushes to a page.
PUSH_EVERY = 1.0
#: Log lines a page gets at most per push (the rest wait for the next one).
_LOG_LINES_PER_PUSH = 200
_LOG_LINES_FIRST = 300


def dashboard_app(
    pools: Pools,
    *,
    server: SocketServer | None = None,
    token: str | None = None,
    history_seconds: int = 600,
) -> Any:
    """The dashboard of ``pools`` (a pool, pools, or ``Supervisor.pools``) as an
    ASGI app; ``server``: also show a socket server's connections; ``token``:
    required of every request. Charts cover the last ``history_seconds``."""
    if type(history_seconds) is not int or history_seconds < 10:
        raise ValueError(f"history_seconds must be an int >= 10, got {history_seconds!r}")
    hub = Hub(pools_of(pools), server=server, history_seconds=history_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Gather even while nobody looks, so the charts have their history.
        async with anyio.create_task_group() as tg:
            tg.start_soon(_gather_forever, hub)
            yield
            tg.cancel_scope.cancel()

    static = resources.files(__package__).joinpath("static")
    routes = [
        Route("/", lambda request: HTMLResponse(static.joinpath("index.html").read_text())),
        Route("/api/state", lambda request: _state(hub)),
        Route("/api/logs", lambda request: _logs(hub, request)),
        Route("/api/stream", lambda request: _stream(hub, request)),
        Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    return app if token is None else TokenGate(app, token)


async def _gather_forever(hub: Hub) -> None:
    while True:
        hub.refresh()
        await anyio.sleep(PUSH_EVERY)


def _json(value: Any) -> Response:
    return Response(json.dumps(value, default=repr), media_type="application/json")


def _state(hub: Hub) -> Response:
    hub.refresh()
    return _json({**hub.state(), "history": hub.history_of(), "events": list(hub.events)})


def _worker_of(text: str | None) -> tuple[str, int] | None:
    """``POOL/WORKER`` -> (pool, worker), or None."""
    if not text:
        return None
    pool, _, slot = text.rpartition("/")
    return (pool, int(slot)) if pool and slot.isdigit() else None


def _logs(hub: Hub, request: Request) -> Response:
    pool, worker = request.query_params.get("pool"), request.query_params.get("worker")
    if not pool or worker is None or not worker.isdigit():
        return JSONResponse({"error": "give ?pool=NAME&worker=N"}, status_code=400)
    lines = hub.logs.lines(pool, int(worker), _LOG_LINES_FIRST)
    return _json([_line(line) for line in lines])


def _line(line: Any) -> dict[str, Any]:
    return {"time": line.time, "level": line.level, "line": line.line, "seq": line.seq}


def _stream(hub: Hub, request: Request) -> Response:
    chosen = _worker_of(request.query_params.get("log"))

    async def messages() -> AsyncIterator[str]:
        hub.refresh()
        seq = hub.event_seq
        first = {
            **hub.state(),
            "history": hub.history_of(),
            "events": list(hub.events),
            "log": chosen and f"{chosen[0]}/{chosen[1]}",
            "lines": [],
        }
        log_seq = 0
        if chosen is not None:
            kept = hub.logs.lines(*chosen, _LOG_LINES_FIRST)
            first["lines"] = [_line(line) for line in kept]
            log_seq = kept[-1].seq if kept else 0
        yield _sse("hello", first)
        while not await request.is_disconnected():
            await anyio.sleep(PUSH_EVERY)
            hub.refresh()
            state = hub.state()
            state["events"] = hub.events_after(seq)
            seq = hub.event_seq
            state["last_by_pool"] = {
                name: points[-1] for name, points in hub.history.items() if points
            }
            state["lines"] = []
            if chosen is not None:
                new = [line for line in hub.logs.lines(*chosen) if line.seq > log_seq]
                new = new[:_LOG_LINES_PER_PUSH]
                if new:
                    log_seq = new[-1].seq
                state["lines"] = [_line(line) for line in new]
            yield _sse("state", state)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(messages(), media_type="text/event-stream", headers=headers)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(plain(data), default=repr)}\n\n"
