"""A real Prometheus scrapes a node's /metrics and answers for its round and rejection
counters (issue 17 item 2). Needs Debian's `prometheus`; skipped when it is absent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio

from crypto.identity import Hotkey
from node.api import ApiServer
from node.daemon import Node
from node.registry.genesis import Genesis
from node.settings import NodeSettings
from protocol.membership import Member, Role
from tests.nodes import http_post

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
RULES = Path(__file__).parent.parent / "deploy" / "prometheus" / "sealmesh.rules.yml"
RECORDED = Path(__file__).parent / "data" / "status_validator.json"
ARTIFACTS = Path(os.environ.get("SEALMESH_TEST_ARTIFACTS", "/tmp/sealmesh-artifacts"))

HOTKEYS = [Hotkey.from_uri(u) for u in ("//Alice", "//Bob")]
A, X = (k.ss58_address for k in HOTKEYS)
GENESIS = Genesis("prom-mesh", (Member(A, frozenset({Role.TRAINER}), 1.0), Member(X, frozenset({Role.VALIDATOR}), 10.0)),
                  names=((A, "trainer-0"), (X, "validator-0")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(tmp_path: Path, target_port: int) -> tuple[subprocess.Popen, int]:
    """Prometheus scraping 127.0.0.1:target_port every second, with our rules loaded."""
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "sealmesh", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    return process, port


def prom_api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for_value(port: int, promql: str, timeout_s: float = 30.0) -> float:
    """The value Prometheus has for `promql` once the query has a result."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = prom_api(port, "query", query=promql)["data"]["result"]
        except OSError:  # not listening yet
            result = []
        if result:
            return float(result[0]["value"][1])
        time.sleep(0.3)
    raise AssertionError(f"prometheus has no result for {promql} after {timeout_s} s")


def query_counters(port: int, api_port: int) -> dict[str, float]:
    queries = {
        "up": 'up{job="sealmesh"}',
        "rejected_http_malformed_envelope": 'sealmesh_messages_rejected_total{source="http",reason="malformed_envelope"}',
        "rejected_all": "sum(sealmesh_messages_rejected_total)",
        "rounds_final": "sealmesh_rounds_final_total",
        "rounds_aborted": "sum(sealmesh_rounds_aborted_total) or vector(0)",
    }
    return {name: wait_for_value(port, q) for name, q in queries.items()}


def _save(name: str, results: dict) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(json.dumps(results, indent=2))
    print(f"prometheus query results: {path}: {results}")
    return path


def test_prometheus_scrapes_a_node_and_answers_for_rounds_and_rejections(tmp_path):
    """A real Node's HTTP API (in-process, no mesh) with the training, FHE and head
    sections of a recorded testnet validator; one bad /v1/message is rejected by the
    node's own Epistula check, and Prometheus, scraping for real, sees it."""
    node = Node(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "node"), HOTKEYS[1], GENESIS)
    recorded = json.loads(RECORDED.read_text())["sections"]
    final_rounds = sum(1 for r in recorded["training"]["rounds"] if r["phase"] == "final")

    def status() -> dict:
        node._refresh_status()
        return {**node.status(), "sections": recorded}

    async def main() -> dict:
        api = ApiServer("127.0.0.1", 0, status=status, metrics=node.metrics, on_message=node._on_http_message)
        async with trio.open_nursery() as nursery:
            api_port = await nursery.start(api.serve)
            code, reply = await trio.to_thread.run_sync(
                http_post, api_port, "/v1/message", b"not an envelope", {"Epistula-Version": "2"})
            assert (code, reply["reason"]) == (401, "malformed_envelope")
            prometheus, prom_port = start_prometheus(tmp_path, api_port)
            try:
                counters = await trio.to_thread.run_sync(query_counters, prom_port, api_port)
                rules = await trio.to_thread.run_sync(prom_api, prom_port, "rules")
            finally:
                prometheus.terminate()
                prometheus.wait(10)
            nursery.cancel_scope.cancel()
        return {"counters": counters, "rules": rules}

    result = trio.run(main)
    counters = result["counters"]
    _save("prometheus-in-process.json", counters)
    assert counters["up"] == 1
    assert counters["rejected_http_malformed_envelope"] == 1 and counters["rejected_all"] == 1
    assert counters["rounds_final"] == final_rounds >= 1
    assert counters["rounds_aborted"] == 0
    loaded = {r["name"] for g in result["rules"]["data"]["groups"] for r in g["rules"]}
    assert {"SealmeshNodeDown", "SealmeshRoundsAborting", "SealmeshMinerFailing",
            "SealmeshHeadNotConfirming", "sealmesh:fhe_miner_failure_ratio:1h"} <= loaded


@pytest.mark.slow
def test_prometheus_scrapes_a_real_node_process(tmp_path):
    """`sealmesh node` as its own process (a validator of a 1+1 test mesh whose trainer
    never starts): its rounds counter exists at 0 and a rejected message counts."""
    from node.testnet import TestnetPlan, prepare
    from tests.nodes import _spawn, _stop_all, wait_ready

    validator, _trainer = prepare(TestnetPlan(validators=1, trainers=1, miners=0, pings=0, rounds=1,
                                              key_bits=1024, directory=tmp_path / "tn"))
    validator.process = _spawn(validator)
    prometheus = None
    try:
        wait_ready(validator, timeout_s=120)
        code, reply = http_post(validator.api_port, "/v1/message", b"{}", {"Epistula-Version": "2"})
        assert (code, reply["reason"]) == (401, "malformed_envelope")
        prometheus, prom_port = start_prometheus(tmp_path, validator.api_port)
        counters = query_counters(prom_port, validator.api_port)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        _stop_all([validator])
    _save("prometheus-node-process.json", counters)
    assert counters["up"] == 1 and counters["rejected_http_malformed_envelope"] == 1
    assert counters["rounds_final"] == 0 and counters["rounds_aborted"] == 0
