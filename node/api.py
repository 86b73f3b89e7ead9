"""The node's HTTP API: /health, /status, /metrics, Epistula-signed POST /v1/message, and
the status page at / (static files of node/static/, which draw /status in the browser).

Bridge choice: aiohttp runs on its own thread with its own asyncio loop; the node's
trio loop stays pure trio. Why not trio-asyncio in the same thread: libp2p's trio tasks
and aiohttp handlers would then share one loop shim whose edge cases (cancellation,
shutdown order) become ours to debug, and a slow handler would stall gossip. Across
the thread boundary there are only two things: /status and /metrics read thread-safe
snapshots, and /v1/message hands the request to trio with trio.from_thread.run (run in
an executor so the asyncio loop never blocks), where verification and dispatch happen
on the node's own loop, the only owner of protocol state. The thread plumbing is
node/http_thread.py's, shared with the miner's HTTP servers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import trio
from aiohttp import web

from node.http_thread import serve_app_in_thread, trio_caller
from node.metrics import NodeMetrics

log = logging.getLogger("sealmesh.api")

MAX_REQUEST_BYTES = 1024 * 1024
STATIC_DIR = Path(__file__).parent / "static"  # shipped as package data (pyproject.toml)
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

# (headers, body) -> (http status, json body); runs on the trio loop.
RequestHandler = Callable[[Mapping[str, str], bytes], Awaitable[tuple[int, dict[str, Any]]]]


class ApiServer:
    def __init__(self, host: str, port: int, *, status: Callable[[], dict[str, Any]],
                 metrics: NodeMetrics, on_message: RequestHandler) -> None:
        self.host, self.port = host, port
        self._status, self._metrics, self._on_message = status, metrics, on_message
        metrics.watch_status(status)  # rounds, FHE and head families come from /status
        self._on_trio: Callable[..., Any] | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; task_status.started(port) once listening; HttpBindError
        when it cannot listen."""
        self._on_trio = trio_caller(trio.lowlevel.current_trio_token())
        await serve_app_in_thread(self._app, self.host, self.port, name="sealmesh-api",
                                  on_bound=self._bound, task_status=task_status)

    def _bound(self, port: int) -> None:
        self.port = port  # the real port when 0 was asked
        log.info("api listening on http://%s:%d", self.host, self.port)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status_handler)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_post("/v1/message", self._message)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return _static_file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return _static_file(request.match_info["name"])

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _message(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._metrics.reject("http", "oversized")
            return web.json_response({"error": "request body too large", "reason": "oversized"},
                                     status=413)
        assert self._on_trio is not None
        status, payload = await self._on_trio(self._on_message, dict(request.headers), body)
        return web.json_response(payload, status=status)


def _static_file(name: str) -> web.Response:
    """One file of node/static/ by its bare name: no paths, so nothing else is reachable."""
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise web.HTTPNotFound(text=f"no such file: {name}")
    return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})
