"""report.html: plots and the same numbers as report.json, from a recorded testnet run
(tests/data/testnet: report.json and one validator's status.json, as `sealmesh testnet up`
left them), or from a node's data dir (issue 17 items 3 and 5)."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path


from node.cli import main
from node.report_html import balances_by_snapshot, load, render, write_report_html
from tests.test_status_page import ARTIFACTS, needs_chromium, chromium, visible_text

TESTNET = Path(__file__).parent / "data" / "testnet"
REPORT = json.loads((TESTNET / "report.json").read_text())
STATUS = json.loads((TESTNET / "nodes" / "validator-0" / "status.json").read_text())


def _embedded_report(page: str) -> dict:
    (raw,) = re.findall(r"<summary>report.json</summary><pre>(.*?)</pre>", page, flags=re.S)
    return json.loads(html.unescape(raw))


def test_report_html_has_every_plot_and_the_numbers_of_report_json(tmp_path):
    shutil.copytree(TESTNET, tmp_path / "tn")
    out = write_report_html(tmp_path / "tn" / "report.json")
    assert out == tmp_path / "tn" / "report.html"
    page = out.read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert _embedded_report(page) == REPORT  # the same numbers, whole
    labels = re.findall(r'<svg [^>]*aria-label="([^"]+)"', page)
    assert labels == ["eval loss per round", "seconds per phase of each round",
                      "publish-to-delivery latency of pings (ms)", "miner scores", "median latency of ok answers",
                      "balance of each account after each snapshot"]
    rounds = REPORT["training"]["rounds"]
    text = visible_text(page)
    for r in rounds:
        assert f"round {r['round']}" in text and f"{r['loss_after']:.4g}" in text
    latencies = STATUS["presence"]["latencies_ms"]  # the histogram: every sample of nodes/*/status.json
    assert f"{len(latencies)} samples" in text
    for miner, m in REPORT["fhe"]["miners"].items():
        assert miner in text and f"{m['score']:.4g}" in text
    g = REPORT["gossip"]
    assert f"{g['p50_ms']:.4g}" in text and f"{g['p99_ms']:.4g}" in text
    names = {STATUS["hotkey"]: STATUS["name"], **{m["hotkey"]: m["name"] for m in STATUS["presence"]["members"]}}
    (balances,) = re.findall(r"<th>final balance</th></tr>(.*?)</table>", page)
    shown = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", balances))
    assert shown == {names.get(k, k): str(v) for k, v in REPORT["settlement"]["balances"].items()}
    assert not set(shown) & set(names)  # every hotkey the mesh knows is shown by its name


def test_balances_by_snapshot_work_back_from_the_final_balances():
    head = {"snapshots_confirmed": 3, "balances": {"t0": 110, "t1": 40, "reward_pool": 850},
            "rounds": {"0": {"rewards": {"t0": 60, "t1": 40}, "snapshot": 1},
                       "1": {"rewards": {"HK": 50}, "snapshot": 3}},
            "epochs": {}}
    snapshots, series = balances_by_snapshot(head, {"HK": "t0"})  # a reward keyed by hotkey
    assert snapshots == [0, 1, 2, 3]
    assert series == {"t0": [0, 60, 60, 110], "t1": [0, 40, 40, 40]}


def test_report_command_from_a_node_data_dir_and_its_errors(tmp_path, capsys):
    data_dir = tmp_path / "validator-0"
    data_dir.mkdir()
    shutil.copy(TESTNET / "nodes" / "validator-0" / "status.json", data_dir)
    assert main(["report", str(data_dir), "--out", str(tmp_path / "node.html")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'node.html'}"
    page = (tmp_path / "node.html").read_text()
    report = _embedded_report(page)
    assert [r["round"] for r in report["training"]["rounds"]] == [r["round"] for r in
                                                                  STATUS["sections"]["training"]["rounds"]]
    assert report["settlement"]["snapshots_confirmed"] == STATUS["sections"]["settlement"]["snapshots_confirmed"]
    assert f"{len(STATUS['presence']['latencies_ms'])} samples" in visible_text(page)
    # a directory with neither file, and a report that is not JSON: one line each, exit 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sealmesh: error:") and "status.json" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not readable JSON" in err and len(err.splitlines()) == 1


def test_render_tolerates_a_report_with_no_sections():
    page = render({"ok": False, "problems": ["x never heard y"]})
    assert "INCOMPLETE" in page and "x never heard y" in page and "nothing recorded" in page


@needs_chromium
def test_chromium_shows_the_report(tmp_path):
    report, latencies, title, names = load(TESTNET)
    out = tmp_path / "report.html"
    out.write_text(render(report, latencies, title, names))
    text = visible_text(chromium(out.as_uri()))
    assert "Loss per round" in text and "Balances over snapshots" in text
    assert all(f"round {r['round']}" in text for r in REPORT["training"]["rounds"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-html.png"
    shot.unlink(missing_ok=True)
    chromium(out.as_uri(), screenshot=shot, size="1200,2600")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"report.html screenshot: {shot}")


