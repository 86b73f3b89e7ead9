"""An HTTP server that cannot listen says so on the trio side, at once, with the port and
what to do; before, the node's API raised a bare RuntimeError and the miner's two HTTP
servers waited forever for a port that never opened."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from node.api import ApiServer
from node.http_thread import HttpBindError, serve_app_in_thread
from node.metrics import NodeMetrics

ROOT = Path(__file__).resolve().parent.parent


def _taken_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_the_api_on_a_taken_port_raises_a_bind_error_naming_it():
    holder = _taken_port()
    port = holder.getsockname()[1]

    async def main():
        api = ApiServer("127.0.0.1", port, status=dict, metrics=NodeMetrics(), on_message=None)
        with trio.fail_after(20):  # the old miner servers hung here
            async with trio.open_nursery() as nursery:
                await nursery.start(api.serve)

    try:
        with pytest.raises(BaseException) as caught:
            trio.run(main)
    finally:
        holder.close()
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    bind = [e for e in errors if isinstance(e, HttpBindError)]
    assert bind, errors
    assert f"127.0.0.1:{port}" in str(bind[0]) and "choose another port" in str(bind[0])


def test_a_server_that_listens_serves_and_stops_when_cancelled():
    from aiohttp import web
    import urllib.request

    def app():
        application = web.Application()
        async def up(request):
            return web.Response(text="up")
        application.router.add_get("/", up)
        return application

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_app_in_thread(
                app, "127.0.0.1", 0, name="test-http", task_status=task_status))
            body = await trio.to_thread.run_sync(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read())
            nursery.cancel_scope.cancel()
        return port, body

    port, body = trio.run(main)
    assert body == b"up"
    with socket.socket() as probe:  # no listener is left once the server stopped
        # SO_REUSEADDR: the closed request's TIME_WAIT may hold the port; only a socket
        # still listening on it makes this bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_sealmesh_node_on_a_taken_api_port_is_one_line_and_exit_2(tmp_path):
    holder = _taken_port()
    port = holder.getsockname()[1]
    run = lambda *argv: subprocess.run([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120)
    try:
        wallet = tmp_path / "wallets"
        assert run("wallet", "create", "--name", "w", "--hotkey", "default", "--path", str(wallet)).returncode == 0
        address = run("wallet", "show", "--name", "w", "--hotkey", "default", "--path", str(wallet)).stdout.strip()
        genesis = tmp_path / "genesis.json"
        assert run("mesh", "init", "--mesh-id", "bind-test", "--out", str(genesis)).returncode == 0, "mesh init"
        added = run("mesh", "add-member", str(genesis), "--hotkey", address, "--roles", "trainer", "--stake", "10")
        assert added.returncode == 0, added.stderr
        done = run("node", "--role", "trainer", "--genesis", str(genesis), "--wallet-name", "w", "--wallet-path",
                   str(wallet), "--data-dir", str(tmp_path / "data"), "--listen-host", "127.0.0.1",
                   "--listen-port", "0", "--api-port", str(port))
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sealmesh: error: sealmesh-api: cannot listen on") and str(port) in last, last
    assert "Traceback" not in done.stderr
