"""`sealmesh head status|close|fanout|withdraw`: the operator's view of a validator's settlement head.

`status` reads the validator's head.sqlite read-only (the node may be running: SQLite
WAL lets a reader in beside the writer). `close`, `fanout` and `withdraw` ask the running
node: they drop a request file in DATA_DIR/roles/settlement-commands/, which the
settlement service picks up within a fraction of a second and answers with a result
file. Whoever can write the node's data dir may command its head; nothing is opened on
the network. `withdraw --amount X` takes X of this validator's balance out of the open
head (Hydra's decommit): paid out once a snapshot confirms it, the head stays open.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from node.clock import now_ms
from protocol import head as h

COMMANDS_DIR = "settlement-commands"  # node/roles/settlement.py watches it
REPORTED = ("round_result", "score_report", "withdrawn", "slashed", "closed", "contested", "fanout")


class HeadCliError(Exception):
    """What the operator should fix; printed without a traceback."""


def add_head_commands(commands: argparse._SubParsersAction) -> None:
    head = commands.add_parser("head", help="inspect or close this validator's settlement head")
    actions = head.add_subparsers(dest="head_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="state, balances, snapshot number and records (read-only)")
    status.add_argument("--data-dir", type=Path, required=True, help="the validator's data dir")
    status.add_argument("--json", action="store_true", help="print the whole status as JSON")
    for name, text in (("close", "close the head with the latest confirmed snapshot"),
                       ("fanout", "pay out a closed head once its contestation period is over")):
        action = actions.add_parser(name, help=f"ask the running node to {text}")
        action.add_argument("--data-dir", type=Path, required=True, help="the validator's data dir")
        action.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the node")
    withdraw = actions.add_parser("withdraw", help="ask the running node to take part of its balance "
                                  "out of the open head, without closing it")
    withdraw.add_argument("--amount", type=_positive_amount, required=True,
                          help="ledger units to take out (at most this validator's balance)")
    withdraw.add_argument("--data-dir", type=Path, required=True, help="the validator's data dir")
    withdraw.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the node")


def _positive_amount(text: str) -> int:
    try:
        amount = int(text)
    except ValueError:
        amount = 0
    if amount <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of ledger units")
    return amount


def run_head(args: argparse.Namespace) -> int:
    try:
        if args.head_command == "status":
            doc = read_head(find_head(args.data_dir))
            print(json.dumps(doc, indent=2) if args.json else format_status(doc))
            return 0
        payload = {"amount": args.amount} if args.head_command == "withdraw" else {}
        result = ask_node(args.data_dir, args.head_command, timeout_s=args.timeout, payload=payload)
    except HeadCliError as exc:
        print(f"sealmesh head: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def find_head(data_dir: Path) -> Path:
    data_dir = Path(data_dir).expanduser()
    for path in (data_dir / "roles" / "head.sqlite", data_dir / "head.sqlite"):
        if path.exists():
            return path
    raise HeadCliError(f"no head.sqlite under {data_dir}; is it a validator's data dir "
                       "(settlement = \"embedded\") that has started once?")


class _Viewer:
    """Loads a machine without its key: a status reader never signs."""

    ss58_address = ""

    def sign(self, message: bytes) -> bytes:
        raise h.HeadMisuse("a status reader cannot sign", reason="read_only")


def read_head(path: Path) -> dict[str, Any]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT state, events FROM machine WHERE id = 1").fetchone()
            records = db.execute("SELECT kind, data, at_ms FROM records ORDER BY seq").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise HeadCliError(f"cannot read {path}: {exc}") from exc
    if row is None:
        return {"state": "Idle", "events": 0, "snapshot": 0, "balances": {}, "records": []}
    machine = h.HeadMachine.from_wire(msgpack.unpackb(row[0], raw=False), _Viewer())  # type: ignore[arg-type]
    confirmed = machine.confirmed
    balances = machine.payouts if machine.payouts is not None else (
        {k: v for k, v in confirmed.ledger.balances.items() if v} if confirmed else {})
    return {
        "state": machine.phase.value, "events": row[1],
        "head_id": machine.params.head_id if machine.params else None,
        "parties": list(machine.params.parties) if machine.params else [],
        "snapshot": confirmed.number if confirmed else 0,
        "closed_snapshot": machine.closing.snapshot.number if machine.closing else None,
        "contestation_deadline_ms": machine.deadline_ms(),
        "balances": dict(balances), "escrow": machine.escrow_total,
        "withdrawn": dict(confirmed.ledger.withdrawn) if confirmed else {},
        "slashed": machine.slashed(),
        "invariants_violated": h.violated_invariants(machine) if machine.params else [],
        "records": [{"kind": kind, "at_ms": at, **msgpack.unpackb(data, raw=False)}
                    for kind, data, at in records if kind in REPORTED],
    }


def format_status(doc: dict[str, Any]) -> str:
    lines = [f"head {doc.get('head_id') or '-'}: {doc['state']}, snapshot {doc['snapshot']}"]
    if doc.get("closed_snapshot") is not None:
        lines.append(f"closed on snapshot {doc['closed_snapshot']}, contest until "
                     f"{doc['contestation_deadline_ms']} ms")
    for who, amount in doc["balances"].items():
        lines.append(f"  {who:<50} {amount:>12}")
    for who, amount in doc.get("withdrawn", {}).items():
        lines.append(f"  withdrawn by {who}: {amount}")
    for record in doc["records"]:
        what = {k: v for k, v in record.items() if k not in ("kind", "at_ms")}
        lines.append(f"  {record['kind']}: {json.dumps(what, sort_keys=True)}")
    if doc.get("slashed"):
        lines.append(f"slashed: {', '.join(doc['slashed'])}")
    if doc.get("invariants_violated"):
        lines.append(f"INVARIANTS VIOLATED: {', '.join(doc['invariants_violated'])}")
    return "\n".join(lines)


def ask_node(data_dir: Path, command: str, *, timeout_s: float,
             payload: dict[str, Any] | None = None) -> dict[str, Any]:
    folder = Path(data_dir).expanduser() / "roles" / COMMANDS_DIR
    if not folder.is_dir():
        raise HeadCliError(f"{folder} does not exist; is {data_dir} a validator's data dir whose "
                           "settlement service has started?")
    result = folder / f"{command}.result"
    result.unlink(missing_ok=True)
    request = {"at_ms": now_ms(), **(payload or {})}
    tmp = folder / f"{command}.request.tmp"  # written whole, then renamed: never read half-written
    tmp.write_text(json.dumps(request))
    tmp.replace(folder / f"{command}.request")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result.exists():
            return json.loads(result.read_text())
        time.sleep(0.1)
    (folder / f"{command}.request").unlink(missing_ok=True)
    raise HeadCliError(f"the node did not answer {command!r} within {timeout_s:.0f} s; is it running?")


__all__ = ["HeadCliError", "add_head_commands", "ask_node", "find_head", "format_status", "read_head",
           "run_head"]
