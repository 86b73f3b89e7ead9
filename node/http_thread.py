"""An aiohttp server on its own thread, run from a trio task.

aiohttp needs an asyncio loop and the node runs trio, so each HTTP server (node/api.py,
the miner's MinerHttp and BrainlockHttp) runs its app on a thread of its own; handlers
cross back to the trio loop with `on_trio`. This module holds that plumbing once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

import trio

log = logging.getLogger("sealmesh.http")


def trio_caller(token: trio.lowlevel.TrioToken) -> Callable[..., Any]:
    """`await on_trio(fn, *args)` from an aiohttp handler: runs async `fn` on the trio loop."""
    async def on_trio(fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: trio.from_thread.run(fn, *args, trio_token=token))
    return on_trio


class HttpBindError(RuntimeError):
    """The server could not listen (the port is taken, the address is not ours)."""


async def serve_app_in_thread(make_app: Callable[[], Any], host: str, port: int, *, name: str,
                              on_bound: Callable[[int], None] = lambda port: None,
                              task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `make_app()` (called on the server's own loop) on host:port until cancelled;
    on_bound(port), then task_status.started(port), once it listens. lingering_time 0: a refused body is not read on and
    discarded for 10 s, the connection closes once the answer is out (issue 13).

    A server that cannot listen raises HttpBindError here, on the trio side, instead of
    leaving its caller waiting for a port that never opens."""
    from aiohttp import web

    bound, stop, bound_port, failed = threading.Event(), {}, [port], []

    async def main() -> None:
        runner = web.AppRunner(make_app(), access_log=None, lingering_time=0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_port[0] = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked
            stop["event"], stop["loop"] = asyncio.Event(), asyncio.get_running_loop()
            bound.set()
            await stop["event"].wait()
        finally:
            await runner.cleanup()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # before bound: the trio side raises it
            failed.append(exc)
            bound.set()

    thread = threading.Thread(target=thread_main, name=name, daemon=True)
    thread.start()
    await trio.to_thread.run_sync(bound.wait)
    if failed and "loop" not in stop:
        exc = failed[0]
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HttpBindError(f"{name}: cannot listen on {host}:{port}: {why}; choose another port "
                            f"or stop the process that holds it") from exc
    on_bound(bound_port[0])
    task_status.started(bound_port[0])
    try:
        await trio.sleep_forever()
    finally:
        stop["loop"].call_soon_threadsafe(stop["event"].set)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, 10)
