"""The status page at GET /, looked at as a person would: headless Chromium renders it
from a node's HTTP API, the test reads the members and rounds off the rendered DOM and
keeps a screenshot (issue 17 items 1 and 5). Chromium is Debian's
`chromium-headless-shell`; the browser tests are skipped when it is absent."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from node.api import STATIC_DIR, ApiServer
from node.metrics import NodeMetrics

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="no chromium-headless-shell (apt-get install chromium-headless-shell)")
RECORDED = Path(__file__).parent / "data" / "status_validator.json"
ARTIFACTS = Path(os.environ.get("SEALMESH_TEST_ARTIFACTS", "/tmp/sealmesh-artifacts"))


def chromium(url: str, *, screenshot: Path | None = None, size: str = "1280,1500") -> str:
    """The DOM after the page's scripts ran (dump-dom), or "" with --screenshot."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=4000", f"--window-size={size}"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run(args + [url], capture_output=True, timeout=90, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def visible_text(dom: str) -> str:
    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def serve(doc: dict, work) -> object:
    """Run `work(port)` in a thread while the node's real ApiServer serves `doc` as /status."""
    async def main():
        api = ApiServer("127.0.0.1", 0, status=lambda: doc, metrics=NodeMetrics(), on_message=None)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(api.serve)
            try:
                return await trio.to_thread.run_sync(work, port)
            finally:
                nursery.cancel_scope.cancel()
    return trio.run(main)


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""


def test_the_page_and_its_files_are_served_and_nothing_else():
    def work(port):
        base = f"http://127.0.0.1:{port}"
        return [_get(base + p) for p in ("/", "/static/app.js", "/static/style.css",
                                          "/static/..%2Fapi.py", "/static/missing.js", "/status")]
    page, js, css, escape, missing, status = serve({"mesh_id": "m"}, work)
    assert page[0] == 200 and page[1].startswith("text/html") and b'src="/static/app.js"' in page[2]
    assert js[0] == 200 and js[1].startswith("text/javascript") and b"fetch(\"/status\"" in js[2]
    assert css[0] == 200 and css[1].startswith("text/css")
    assert escape[0] == 404 and missing[0] == 404
    assert status[0] == 200 and json.loads(status[2]) == {"mesh_id": "m"}
    # no CDN: nothing on the page loads from another host
    for name in ("index.html", "app.js", "style.css"):
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", (STATIC_DIR / name).read_text()), name


@needs_chromium
def test_chromium_renders_members_rounds_fhe_and_head_of_a_recorded_validator():
    doc = json.loads(RECORDED.read_text())  # a validator's /status from `sealmesh testnet up`
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)

    def work(port):
        url = f"http://127.0.0.1:{port}/"
        dom = chromium(url)
        chromium(url, screenshot=shot)
        return dom

    dom = serve(doc, work)
    text = visible_text(dom)
    assert f"sealmesh {doc['mesh_id']}: validator {doc['name']}" in text
    members = doc["presence"]["members"]
    assert members
    for m in members:
        assert m["name"] in text
    alive = sum(1 for m in members if m["alive"])
    assert f"{alive} of {len(members)} others alive" in text
    rounds = doc["sections"]["training"]["rounds"]
    assert len(rounds) >= 1
    for r in rounds[-12:]:  # every round shown: number, phase, its loss before -> after
        assert f"{r['loss_before']:.4f} → {r['loss_after']:.4f}" in text
    assert dom.count("<circle") >= 2 * len(rounds)  # the loss chart: before and after per round
    for score in (m["score"] for m in doc["sections"]["fhe"]["miners"].values()):
        assert f"{score:.3f}" in text
    head = doc["sections"]["settlement"]
    assert f"snapshot {head['snapshots_confirmed']} confirmed" in text and head["state"] in text
    assert "could not read /status" not in text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"status page screenshot: {shot}")


@needs_chromium
def test_the_page_says_so_when_the_node_stops_answering(tmp_path):
    """Opened from a file, /status cannot be fetched: the page says it and keeps trying."""
    page = tmp_path / "index.html"
    page.write_text((STATIC_DIR / "index.html").read_text().replace("/static/", str(STATIC_DIR) + "/"))
    text = visible_text(chromium(page.as_uri()))
    assert "could not read /status" in text and "retrying" in text


def test_static_files_stay_small():
    total = sum(p.stat().st_size for p in STATIC_DIR.iterdir() if p.is_file())
    print(f"status page size: {total} bytes")
    assert total < 20_000


@pytest.mark.slow
@needs_chromium
def test_chromium_renders_the_page_of_a_real_node_process(tmp_path):
    """`sealmesh node` processes (a validator and a trainer of a 1+1 test mesh): once the
    validator has a round, its own API serves the page Chromium renders."""
    import time

    from node.testnet import TestnetPlan, prepare
    from tests.nodes import _spawn, _stop_all, http_get, wait_ready

    nodes = prepare(TestnetPlan(validators=1, trainers=1, miners=0, pings=0, rounds=1, key_bits=1024,
                                directory=tmp_path / "tn"))
    validator, trainer = nodes
    for node in nodes:
        node.process = _spawn(node)
    shot = ARTIFACTS / "status-page-real-node.png"
    try:
        for node in nodes:
            wait_ready(node, timeout_s=180)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            doc = json.loads(http_get(validator.api_port, "/status")[1])
            rounds = (doc.get("sections", {}).get("training") or {}).get("rounds") or []
            alive = [m for m in doc["presence"]["members"] if m["alive"]]
            if rounds and alive:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no round or no live member after 180 s: {doc.get('sections')}")
        url = f"http://127.0.0.1:{validator.api_port}/"
        text = visible_text(chromium(url))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        chromium(url, screenshot=shot)
    finally:
        _stop_all(nodes)
    assert "sealmesh testnet: validator validator-0" in text
    assert "trainer-0" in text and "1 of 1 others alive" in text
    assert re.search(r"current round 0: phase \w+|no round open; last was round 0", text), text
    assert shot.stat().st_size > 20_000
    print(f"status page of a real node, screenshot: {shot}")
