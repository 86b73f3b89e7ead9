"""Helpers for tests that run real node processes on loopback."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from node.testnet import NodeProcess, _spawn, _stop_all


def wait_for(what: str, predicate, timeout_s: float, every_s: float = 2.0):
    """predicate()'s first truthy value, polled every `every_s`; AssertionError naming
    `what` when none came within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_ready(node: NodeProcess, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.process is not None and node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited: {(node.data_dir / 'node.log').read_text()[-3000:]}")
        ready = node.data_dir / "ready.json"
        if ready.exists():
            return json.loads(ready.read_text())
        time.sleep(0.1)
    raise TimeoutError(f"{node.name} not ready after {timeout_s}s")


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def rejected_metric(metrics_text: str, source: str, reason: str) -> float:
    needle = f'sealmesh_messages_rejected_total{{reason="{reason}",source="{source}"}}'
    for line in metrics_text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


__all__ = ["NodeProcess", "_spawn", "_stop_all", "wait_ready", "http_get", "http_post",
           "rejected_metric", "Path"]
