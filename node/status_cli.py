"""`sealmesh status`: one screen of what a running node knows, from its HTTP API's /status.

With --data-dir it finds the API port in DIR/ready.json (the daemon writes it once the
API listens); with --api it asks that URL. Every part of the screen is drawn from what
/status holds and a missing part is left out, so an older node, or a role that has not
reported yet, still gets the rest. Standard library only: an operator's box may have
nothing else, and this must work when the node's own stack is what is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("~/.sealmesh/node")  # node/settings.py's default
TIMEOUT_S = 5.0
LAST_ROUNDS = 3
TERMINAL_PHASES = {"final", "aborted"}


class StatusError(Exception):
    """What the operator should do; printed as one line, without a traceback."""


def add_status_command(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser(
        "status", help="one screen of a running node: members alive, rounds, FHE scores, head, problems",
        description="Ask a running node's HTTP API for its /status and print it as one screen. "
                    "Without --api, the API port is read from DATA_DIR/ready.json.")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--api", metavar="URL", help="the node's API, e.g. http://127.0.0.1:8080")
    where.add_argument("--data-dir", type=Path, help=f"the node's data dir (default {DEFAULT_DATA_DIR})")
    status.add_argument("--json", action="store_true", help="print the whole /status document as JSON")


def run_status(args: argparse.Namespace) -> int:
    try:
        url, data_dir = api_url(args.api, args.data_dir)
        doc = fetch_status(url, data_dir)
    except StatusError as exc:
        print(f"sealmesh: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


# --- finding and asking the node ------------------------------------------------

def api_url(api: str | None, data_dir: Path | None) -> tuple[str, Path | None]:
    """The API's base URL, and the data dir it came from (None with --api)."""
    if api:
        return (api if "://" in api else f"http://{api}").rstrip("/"), None
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    ready = data_dir / "ready.json"
    try:
        port = int(json.loads(ready.read_text())["api_port"])
    except FileNotFoundError:
        raise StatusError(f"no node has started in {data_dir} (no ready.json); start one with "
                          f"`sealmesh node --data-dir {data_dir} --role ROLE --genesis FILE` "
                          "(or --config node.toml), or give a running node's --api URL") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatusError(f"{ready} is unreadable ({exc}); restart the node, which rewrites it") from None
    # The API is local to the data dir; a node listening on 0.0.0.0 answers here too.
    return f"http://127.0.0.1:{port}", data_dir


def fetch_status(url: str, data_dir: Path | None = None) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url}/status answered HTTP {exc.code}; is it a sealmesh node's API?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if data_dir is not None:
            last = data_dir / "status.json"
            hint = f"; its last status is in {last}" if last.exists() else ""
            raise StatusError(f"the node of {data_dir} is not running (nothing answers at {url}: {reason}){hint}; "
                              f"start it with `sealmesh node --data-dir {data_dir} ...`") from None
        raise StatusError(f"no node is running at {url} ({reason}); start one with `sealmesh node`, "
                          "or check the URL (the node's api_host and api_port)") from None
    except ValueError as exc:
        raise StatusError(f"{url}/status is not JSON ({exc}); is it a sealmesh node's API?") from None


# --- the screen -----------------------------------------------------------------

def render(doc: dict[str, Any]) -> str:
    """The /status document as one screen of text; any part may be missing."""
    names = {m["hotkey"]: m.get("name") or m["hotkey"][:8]
             for m in (doc.get("presence") or {}).get("members", []) if isinstance(m, dict) and "hotkey" in m}
    me = doc.get("hotkey") or "?"
    names.setdefault(me, doc.get("name") or "this node")
    sections = doc.get("sections") or {}
    lines = _node_lines(doc)
    for part in (_member_lines(doc), _training_lines(sections.get("training"), names),
                 _fhe_lines(sections.get("fhe"), names), _settlement_lines(sections.get("settlement"), me),
                 _problem_lines(doc, sections)):
        if part:
            lines += [""] + part
    return "\n".join(lines)


def _node_lines(doc: dict[str, Any]) -> list[str]:
    name = f" {doc['name']}" if doc.get("name") else ""
    lines = [f"mesh {doc.get('mesh_id', '?')}: {doc.get('role', '?')}{name}, hotkey {doc.get('hotkey', '?')}",
             f"  peer id {doc.get('peer_id') or '-'}, up {_seconds(doc.get('uptime_s'))}, "
             f"{len(doc.get('peers') or [])} peers connected, API port {doc.get('api_port') or '-'}"]
    for addr in doc.get("addrs") or []:
        lines.append(f"  address {addr}")
    if reach := doc.get("reachability"):
        lines.append(f"  reachability {reach.get('status', '?')}: {reach.get('detail', '')}"
                     + "".join(f"; via {a}" for a in reach.get("relayed_addrs") or []))
    return lines


def _member_lines(doc: dict[str, Any]) -> list[str]:
    presence = doc.get("presence") or {}
    members = presence.get("members")
    if members is None:  # an older node: only who was heard, and who not
        missing = presence.get("missing") or []
        return [f"members: heard {len(presence.get('heard') or [])}, missing {len(missing)}"] + \
               [f"  missing {h}" for h in missing]
    alive = sum(1 for m in members if m.get("alive"))
    lines = [f"members: {alive} of {len(members)} others alive (heard within {_seconds(presence.get('window_s'))})"]
    for m in members:
        if m.get("alive"):
            state = f"alive, seen {_seconds(m.get('last_seen_s'))} ago"
        elif m.get("last_seen_s") is None:
            state = "NEVER HEARD"
        else:
            state = f"GONE, last seen {_seconds(m.get('last_seen_s'))} ago"
        lines.append(f"  {m.get('name', '?'):<14} {','.join(m.get('roles') or []) or '-':<10} {state:<32} "
                     f"{m.get('hotkey', '')}  peer {m.get('peer_id') or '-'}")
    return lines


def _training_lines(section: dict[str, Any] | None, names: dict[str, str]) -> list[str]:
    if not isinstance(section, dict):
        return []
    role = section.get("role", "")
    if section.get("disabled"):
        return [f"training ({role}): disabled: {section['disabled']}"]
    rounds = [r for r in section.get("rounds") or [] if isinstance(r, dict)]
    lines = [f"training ({role})" + (f", shard {section['shard']}" if section.get("shard") is not None else "")
             + (f", committee member {section['committee'].get('index')}/{section['committee'].get('size')}"
                if isinstance(section.get("committee"), dict) and section["committee"].get("member") else "")]
    if not rounds:
        return lines + ["  no round yet"]
    current = next((r for r in reversed(rounds) if r.get("phase") not in TERMINAL_PHASES), None)
    if current is not None:
        committee = f", committee {current['committee_phase']}" if current.get("committee_phase") else ""
        lines.append(f"  current round {current.get('round')}: phase {current.get('phase')}{committee}")
    else:
        lines.append(f"  no round open; last was round {rounds[-1].get('round')}")
    for r in rounds[-LAST_ROUNDS:]:
        lines.append("  " + _round_line(r, names))
    return lines


def _round_line(r: dict[str, Any], names: dict[str, str]) -> str:
    text = f"round {r.get('round')} {r.get('phase')}"
    if r.get("abort_reason"):
        text += f" ({r['abort_reason']})"
    if "contributors" in r:  # a validator's view
        who = [names.get(h, h[:8]) for h in r.get("contributors") or []]
        text += f": {len(who)} contributors ({', '.join(who) or 'none'})"
        if r.get("rejected"):
            text += f", {len(r['rejected'])} rejected"
        text += f", loss {_loss(r.get('loss_before'))} -> {_loss(r.get('loss_after'))}"
    else:  # a trainer's view of its own contribution
        if r.get("included") is not None:
            text += ", included" if r["included"] else ", not included"
        if "first_loss" in r or "last_loss" in r:
            text += f", training loss {_loss(r.get('first_loss'))} -> {_loss(r.get('last_loss'))}"
    return text


def _fhe_lines(section: dict[str, Any] | None, names: dict[str, str]) -> list[str]:
    if not isinstance(section, dict):
        return []
    if section.get("role") == "miner":
        served = section.get("served") or {}
        refused = section.get("refused") or {}
        return [f"fhe (miner): model {section.get('model') or '-'}, ready {_yes(section.get('ready'))}, "
                f"served {sum(served.values())}, refused {sum(refused.values())}, keys {section.get('keys', 0)}"]
    miners = section.get("miners") or {}
    planned = f" of {section['epochs']}" if section.get("epochs") else " (runs until stopped)"
    lines = [f"fhe scores: model {section.get('model') or '-'}, "
             f"epochs done {len(section.get('epochs_done') or [])}{planned}"]
    if not miners:
        lines.append("  no miner scored yet")
    for miner, m in sorted(miners.items()):
        latency = m.get("median_latency_s")
        lines.append(f"  {names.get(miner, miner[:8]):<14} score {_num(m.get('score'))} weight {_num(m.get('weight'))} "
                     f" challenges {m.get('challenges', 0)} ok {m.get('ok', 0)}"
                     f" median {'-' if latency is None else _seconds(latency)}")
    return lines


def _settlement_lines(section: dict[str, Any] | None, me: str) -> list[str]:
    if not isinstance(section, dict):
        return []
    balances = section.get("balances") or {}
    line = (f"head ({section.get('backend', 'embedded')}): {section.get('state', '?')}, "
            f"snapshot {section.get('snapshots_confirmed', 0)}, conserved {_yes(section.get('conserved'))}, "
            f"rounds recorded {len(section.get('rounds') or [])}, epochs {len(section.get('epochs') or [])}")
    lines = [line, f"  this node's balance: {balances.get(me, 0)}"]
    if section.get("slashed"):
        lines.append(f"  slashed: {', '.join(map(str, section['slashed']))}")
    return lines


def _problem_lines(doc: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    """What keeps a role from working (with its fix), then the roles' own complaints."""
    lines = []
    for p in doc.get("problems") or []:
        if isinstance(p, dict):
            lines.append(f"  ! {p.get('problem')}")
            if p.get("fix"):
                lines.append(f"    fix: {p['fix']}")
        else:
            lines.append(f"  ! {p}")
    for name, section in sorted(sections.items()):
        if not isinstance(section, dict):
            continue
        for text in section.get("problems") or []:
            lines.append(f"  ! {name}: {text}")
        errors = section.get("errors") or []
        if errors:
            lines.append(f"  ! {name}: {len(errors)} errors, the last: {errors[-1]}")
    return (["problems:"] + lines) if lines else ["problems: none"]


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


__all__ = ["StatusError", "add_status_command", "api_url", "fetch_status", "render", "run_status"]
