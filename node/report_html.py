"""report.html: the testnet's report.json (or one node's status.json) as a page people read.

One self-contained HTML file with inline SVG plots, no script and no network: loss per
round, round phase durations, the gossip latency histogram, miner scores and latencies,
balances over snapshots; then tables of the same numbers and report.json itself. Written
by `sealmesh testnet up` beside report.json, and by `sealmesh report PATH` from a
report.json, a testnet directory, or a node's data dir (its status.json).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any, Iterable

COLORS = ("#1f6fb2", "#e07b00", "#2e9e4f", "#b3261e", "#7b4bb7", "#8a6d3b", "#17a2b8", "#555")
W, H = 560, 200  # every plot's size in px
LEFT, BOTTOM, TOP = 56, 28, 10


class ReportError(Exception):
    """What the user should do; printed as one line."""


# --- finding the numbers --------------------------------------------------------------

def load(path: Path) -> tuple[dict[str, Any], list[float], str, dict[str, str]]:
    """(report, gossip latencies in ms, title, names of hotkeys) from a report.json, a
    testnet directory (DIR/report.json; latencies and names from DIR/nodes/*/status.json)
    or a node's data dir."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "report.json").is_file():
        path = path / "report.json"
    if path.is_dir():
        status = path / "status.json"
        if not status.is_file():
            raise ReportError(f"{path} has neither report.json nor status.json; give a testnet directory, "
                              "its report.json, or a node's data dir (a node writes status.json when it stops)")
        return report_from_status(_read_json(status))
    report = _read_json(path)
    if "presence" in report and "gossip" not in report:  # a node's status.json given by name
        return report_from_status(report)
    latencies: list[float] = []
    names: dict[str, str] = {}
    for status_path in sorted((path.parent / "nodes").glob("*/status.json")):
        try:
            status = _read_json(status_path)
        except ReportError:  # one node's bad file costs its samples, not the report
            continue
        latencies.extend((status.get("presence") or {}).get("latencies_ms") or [])
        for member in (status.get("presence") or {}).get("members") or []:
            if isinstance(member, dict) and member.get("hotkey") and member.get("name"):
                names[member["hotkey"]] = member["name"]
        if status.get("hotkey") and status.get("name"):
            names[status["hotkey"]] = status["name"]
    return report, latencies, f"testnet {path.parent.name}", names


def report_from_status(doc: dict[str, Any]) -> tuple[dict[str, Any], list[float], str, dict[str, str]]:
    return node_report(doc), list((doc.get("presence") or {}).get("latencies_ms") or []), \
        f"node {doc.get('name') or doc.get('hotkey', '?')} of mesh {doc.get('mesh_id', '?')}", {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; run `sealmesh testnet up --dir DIR` first, "
                          "or give a node's data dir") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc}); rerun what wrote it") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path} is not a report or status document (a JSON object)")
    return doc


def node_report(status: dict[str, Any]) -> dict[str, Any]:
    """One node's status.json in report.json's shape (node/testnet.py build_report), with
    names for hotkeys where the node knows them."""
    names = {m["hotkey"]: m.get("name") or m["hotkey"][:8]
             for m in (status.get("presence") or {}).get("members", []) if isinstance(m, dict) and "hotkey" in m}
    if status.get("hotkey"):
        names[status["hotkey"]] = status.get("name") or status["hotkey"][:8]
    name = lambda hotkey: names.get(hotkey, str(hotkey)[:8])  # noqa: E731
    sections = status.get("sections") or {}
    latency = (status.get("presence") or {}).get("latency_ms") or {}
    latencies = (status.get("presence") or {}).get("latencies_ms") or []
    report: dict[str, Any] = {
        "node": status.get("name"), "role": status.get("role"), "mesh_id": status.get("mesh_id"),
        "gossip": {"p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
                   "max_ms": max(latencies, default=None), "count": latency.get("count")},
        "rejected": dict(status.get("rejected") or {}), "problems": list(status.get("problems") or []),
    }
    training = sections.get("training")
    if isinstance(training, dict) and training.get("role") == "validator":
        report["training"] = {"rounds": [
            {"round": r.get("round"), "complete": r.get("phase") == "final", "phase": r.get("phase"),
             "abort_reason": r.get("abort_reason") or "", "contributors": [name(h) for h in r.get("contributors") or []],
             "loss_before": r.get("loss_before"), "loss_after": r.get("loss_after"), "seconds": r.get("seconds") or {}}
            for r in training.get("rounds") or [] if isinstance(r, dict)]}
    fhe = sections.get("fhe")
    if isinstance(fhe, dict) and fhe.get("role") == "validator":
        errors: dict[str, set] = {}
        for o in fhe.get("outcomes") or []:
            if o.get("error_reason"):
                errors.setdefault(o["miner"], set()).add(o["error_reason"])
        report["fhe"] = {"model": fhe.get("model"), "epochs": fhe.get("epochs"),
                         "miners": {name(m): {**v, "errors": sorted(errors.get(m, ()))}
                                    for m, v in (fhe.get("miners") or {}).items()}}
    head = sections.get("settlement")
    if isinstance(head, dict):
        records = head.get("records") or []
        report["settlement"] = {
            "backend": head.get("backend"), "state": head.get("state"),
            "snapshots_confirmed": head.get("snapshots_confirmed"), "conserved": head.get("conserved"),
            "balances": {name(k) if k != "reward_pool" else k: v for k, v in (head.get("balances") or {}).items()},
            "rounds": {str(r["round"]): {"rewards": {name(k): v for k, v in (r.get("rewards") or {}).items()},
                                         "snapshot": r.get("snapshot")}
                       for r in records if r.get("kind") == "round_result"},
            "epochs": {str(r["epoch"]): {"rewards": {name(k): v for k, v in (r.get("rewards") or {}).items()},
                                         "snapshot": r.get("snapshot")}
                       for r in records if r.get("kind") == "score_report"},
        }
    return report


def balances_by_snapshot(settlement: dict[str, Any], names: dict[str, str] | None = None
                         ) -> tuple[list[int], dict[str, list[float]]]:
    """Each account's balance after every confirmed snapshot, worked back from the final
    balances and the rewards each recorded round or epoch paid in its snapshot (the pool,
    which pays them, is left out: its scale would flatten the rest). report.json names
    some accounts and not others; `names` (hotkey -> name) makes both sides agree."""
    names = names or {}
    final = {names.get(k, k): v for k, v in (settlement.get("balances") or {}).items()
             if k != "reward_pool" and isinstance(v, (int, float))}
    paid: list[tuple[int, dict[str, float]]] = []
    for kind in ("rounds", "epochs"):
        for record in (settlement.get(kind) or {}).values():
            if isinstance(record, dict) and isinstance(record.get("snapshot"), int):
                paid.append((record["snapshot"], {names.get(k, k): v for k, v in (record.get("rewards") or {}).items()}))
    last = max([settlement.get("snapshots_confirmed") or 0] + [s for s, _ in paid])
    snapshots = list(range(0, last + 1))
    series = {}
    for account, balance in sorted(final.items()):
        series[account] = [balance - sum(r.get(account, 0) for s, r in paid if s > snap) for snap in snapshots]
    return snapshots, series


# --- plots: inline SVG ------------------------------------------------------------------

def _svg(body: Iterable[str], label: str, width: int = W, height: int = H) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>')


def _axes(lo: float, hi: float, unit: str) -> list[str]:
    y0, y1 = H - BOTTOM, TOP
    return [f'<line x1="{LEFT}" y1="{y0}" x2="{W}" y2="{y0}" stroke="#999"/>',
            f'<line x1="{LEFT}" y1="{y0}" x2="{LEFT}" y2="{y1}" stroke="#999"/>',
            f'<text x="{LEFT - 4}" y="{y0}" text-anchor="end">{_fmt(lo)}</text>',
            f'<text x="{LEFT - 4}" y="{y1 + 10}" text-anchor="end">{_fmt(hi)}</text>',
            f'<text x="2" y="{(y0 + y1) // 2}">{_e(unit)}</text>']


def _scale(lo: float, hi: float):
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 if lo else 0.0, hi + 0.5 if hi else 1.0
    return lo, hi, (lambda v: TOP + (hi - v) * (H - BOTTOM - TOP) / (hi - lo))


def line_chart(xs: list[Any], series: dict[str, list[float | None]], unit: str, label: str, *,
               from_zero: bool = False) -> str:
    values = [v for vs in series.values() for v in vs if isinstance(v, (int, float))]
    if not xs or not values:
        return _none(label)
    lo, hi, y = _scale(0.0 if from_zero else min(values), max(values))
    step = (W - LEFT - 20) / max(1, len(xs) - 1)
    x = (lambda i: LEFT + 10 + i * step) if len(xs) > 1 else (lambda i: (LEFT + W) / 2)
    body = _axes(lo, hi, unit)
    body += [f'<text x="{x(i):.1f}" y="{H - 10}" text-anchor="middle">{_e(v)}</text>' for i, v in enumerate(xs)]
    for n, (name, vs) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        pts = [(x(i), y(v)) for i, v in enumerate(vs) if isinstance(v, (int, float))]
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        body += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
    return _svg(body, label) + _legend(series)


def bar_chart(bars: dict[str, float | None], unit: str, label: str) -> str:
    values = [v for v in bars.values() if isinstance(v, (int, float))]
    if not values:
        return _none(label)
    lo, hi, y = _scale(0.0, max(values))
    width = (W - LEFT - 10) / len(bars)
    body = _axes(lo, hi, unit)
    for i, (name, v) in enumerate(bars.items()):
        left = LEFT + 5 + i * width
        body.append(f'<text x="{left + width / 2:.1f}" y="{H - 10}" text-anchor="middle">{_e(name)}</text>')
        if isinstance(v, (int, float)):
            body.append(f'<rect x="{left + width * 0.15:.1f}" y="{y(v):.1f}" width="{width * 0.7:.1f}" '
                        f'height="{y(lo) - y(v):.1f}" fill="{COLORS[0]}"><title>{_e(name)}: {_fmt(v)}</title></rect>')
            body.append(f'<text x="{left + width / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle">{_fmt(v)}</text>')
    return _svg(body, label)


def stacked_bars(rows: dict[str, dict[str, float]], unit: str, label: str) -> str:
    """One bar per row (a round), split into its parts (phases), in the same order."""
    parts = list(dict.fromkeys(p for r in rows.values() for p in r))
    totals = [sum(v for v in r.values() if isinstance(v, (int, float))) for r in rows.values()]
    if not rows or not any(totals):
        return _none(label)
    lo, hi, y = _scale(0.0, max(totals))
    width = (W - LEFT - 10) / len(rows)
    body = _axes(lo, hi, unit)
    for i, (name, r) in enumerate(rows.items()):
        left, base = LEFT + 5 + i * width, 0.0
        body.append(f'<text x="{left + width / 2:.1f}" y="{H - 10}" text-anchor="middle">{_e(name)}</text>')
        for n, part in enumerate(parts):
            v = r.get(part)
            if not isinstance(v, (int, float)) or v <= 0:
                continue
            body.append(f'<rect x="{left + width * 0.15:.1f}" y="{y(base + v):.1f}" width="{width * 0.7:.1f}" '
                        f'height="{y(base) - y(base + v):.1f}" fill="{COLORS[n % len(COLORS)]}">'
                        f'<title>{_e(name)} {_e(part)}: {_fmt(v)} s</title></rect>')
            base += v
    return _svg(body, label) + _legend({p: [] for p in parts})


def histogram(values: list[float], unit: str, label: str, bins: int = 12) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return _none(label)
    lo, hi = min(values), max(values)
    size = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / size))] += 1
    edges = {f"{_fmt(lo + i * size)}": c for i, c in enumerate(counts)}
    return bar_chart(edges, "count", label) + f'<p class="muted">{len(values)} samples, {unit} from ' \
                                              f'{_fmt(lo)} to {_fmt(hi)}, bins of {_fmt(size)}</p>'


def _legend(series: dict[str, Any]) -> str:
    items = "".join(f'<span><i style="background:{COLORS[n % len(COLORS)]}"></i>{_e(name)}</span>'
                    for n, name in enumerate(series))
    return f'<p class="legend">{items}</p>'


def _none(label: str) -> str:
    return f'<p class="muted">{_e(label)}: nothing recorded</p>'


# --- the page -----------------------------------------------------------------------------

def render(report: dict[str, Any], latencies: list[float] = (), title: str = "sealmesh report",
           names: dict[str, str] | None = None) -> str:
    """The page; `names` (hotkey -> node name) labels accounts report.json left as hotkeys."""
    names = names or {}
    training = report.get("training") or {}
    rounds = [r for r in training.get("rounds") or [] if isinstance(r, dict)]
    fhe = report.get("fhe") or {}
    miners = fhe.get("miners") or {}
    head = report.get("settlement") or {}
    gossip = report.get("gossip") or {}
    snapshots, balances = balances_by_snapshot(head, names)
    ok = report.get("ok")
    verdict = "OK" if ok else "INCOMPLETE" if ok is False else "one node's view"
    parts = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="{"ok" if ok else "bad" if ok is False else "muted"}">'
        f'{verdict}'
        f'{_kv(report, ("nodes", "rounds", "duration_s"))}</p>',
        _problems(report.get("problems") or []),
        "<h2>Loss per round</h2>",
        line_chart([r.get("round") for r in rounds],
                   {"eval loss before": [r.get("loss_before") for r in rounds],
                    "eval loss after": [r.get("loss_after") for r in rounds]}, "loss", "eval loss per round"),
        "<h2>Round phase durations</h2>",
        stacked_bars({f"round {r.get('round')}": r.get("seconds") or {} for r in rounds}, "seconds",
                     "seconds per phase of each round"),
        _table(["round", "complete", "contributors", "loss before", "loss after", "seconds"],
               [[r.get("round"), r.get("complete"), ", ".join(map(str, r.get("contributors") or [])) or "-",
                 r.get("loss_before"), r.get("loss_after"),
                 ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("seconds") or {}).items()) or "-"] for r in rounds]),
        "<h2>Gossip latency</h2>",
        histogram(list(latencies), "ms", "publish-to-delivery latency of pings (ms)"),
        _table(["expected", "delivered", "p50 ms", "p99 ms", "max ms"],
               [[gossip.get("expected", "-"), gossip.get("delivered", "-"), gossip.get("p50_ms"),
                 gossip.get("p99_ms"), gossip.get("max_ms")]]),
        "<h2>Miners</h2>",
        '<div class="pair">' + bar_chart({m: v.get("score") for m, v in miners.items()}, "score", "miner scores")
        + bar_chart({m: v.get("median_latency_s") for m, v in miners.items()}, "seconds",
                    "median latency of ok answers") + "</div>",
        _table(["miner", "behaviour", "score", "challenges", "ok", "wrong", "timeout", "error", "median s", "errors"],
               [[m, v.get("behaviour", "-"), v.get("score"), v.get("challenges"), v.get("ok"), v.get("wrong"),
                 v.get("timeout"), v.get("error"), v.get("median_latency_s"), ", ".join(v.get("errors") or []) or "-"]
                for m, v in miners.items()]),
        "<h2>Balances over snapshots</h2>",
        line_chart(snapshots, balances, "balance", "balance of each account after each snapshot"),
        f'<p>head {_e(head.get("backend") or "-")}: state {_e(head.get("state") or "-")}, '
        f'{_e(_fmt(head.get("snapshots_confirmed")))} snapshots confirmed, conserved {_e(_fmt(head.get("conserved")))}</p>',
        _table(["account", "final balance"], [[names.get(k, k), v] for k, v in (head.get("balances") or {}).items()]),
        "<h2>Rejected messages</h2>",
        _table(["reason", "count"], [[k, v] for k, v in sorted((report.get("rejected") or {}).items())])
        if report.get("rejected") else '<p class="muted">none</p>',
        "<details><summary>report.json</summary><pre>" + _e(json.dumps(report, indent=2)) + "</pre></details>",
    ]
    return _PAGE.format(title=_e(title), body="\n".join(parts))


def _problems(problems: list[Any]) -> str:
    if not problems:
        return '<p class="ok">no problems</p>'
    items = "".join(f"<li>{_e(p.get('problem') if isinstance(p, dict) else p)}</li>" for p in problems)
    return f'<ul class="problems">{items}</ul>'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return ""
    cells = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _kv(doc: dict[str, Any], keys: tuple[str, ...]) -> str:
    return "".join(f", {_e(k)} {_e(_fmt(doc[k]))}" for k in keys if k in doc)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 20px auto; max-width: 1180px; color: #1d232a; }}
h2 {{ font-size: 17px; margin: 22px 0 6px; border-bottom: 1px solid #dde2e7; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
td, th {{ padding: 2px 10px 2px 0; border-bottom: 1px solid #eceff2; text-align: left; font-variant-numeric: tabular-nums; }}
svg text {{ font-size: 11px; fill: #4a5561; }}
.pair {{ display: flex; gap: 16px; flex-wrap: wrap; }}
.legend span {{ margin-right: 14px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
.ok {{ color: #1c7c3c; font-weight: 600; }} .bad, .problems {{ color: #b3261e; }} .muted {{ color: #8a96a3; }}
pre {{ font-size: 12px; background: #f4f6f8; padding: 8px; overflow: auto; }}
</style></head>
<body>
{body}
</body></html>
"""


# --- writing it -----------------------------------------------------------------------------

def write_report_html(source: Path, out: Path | None = None) -> Path:
    """Render the report of `source` (see load) to `out`, by default report.html beside it."""
    report, latencies, title, names = load(source)
    source = Path(source).expanduser()
    out = out or ((source if source.is_dir() else source.parent) / "report.html")
    out.write_text(render(report, latencies, title, names))
    return out


def add_report_command(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="render report.html (plots of rounds, gossip, miners, balances) from a report.json "
                       "or a node's data dir",
        description="Render a self-contained report.html with inline plots from a testnet's report.json "
                    "(or its directory) or from a node's data dir (its status.json).")
    report.add_argument("source", type=Path, metavar="DATA_DIR_OR_REPORT_JSON")
    report.add_argument("--out", type=Path, help="where to write it (default: report.html beside the source)")


def run_report(args: argparse.Namespace) -> int:
    try:
        out = write_report_html(args.source, args.out)
    except ReportError as exc:
        print(f"sealmesh: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


__all__ = ["ReportError", "add_report_command", "balances_by_snapshot", "load", "node_report", "render",
           "run_report", "write_report_html"]
