"""`sealmesh leave --data-dir DIR`: ask the running node to leave its mesh (issue 15).

Like `sealmesh head close`: a request file in DATA_DIR/membership-commands/, which the
node's membership service picks up within a second and answers with a result file.
The leave takes effect with the next confirmed head snapshot; the node's escrow, less any
penalty for leaving early, is released then (`sealmesh status` shows it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from node.membership import COMMANDS_DIR


class LeaveError(Exception):
    """What the operator should fix; printed without a traceback."""


def add_leave_command(commands: argparse._SubParsersAction) -> None:
    leave = commands.add_parser("leave", help="ask the running node to leave its mesh "
                                "(its escrow is released once a snapshot confirms it)")
    leave.add_argument("--data-dir", type=Path, required=True, help="the node's data dir")
    leave.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the node")


def request_leave(data_dir: Path, timeout_s: float) -> dict:
    folder = Path(data_dir).expanduser() / COMMANDS_DIR
    if not folder.is_dir():
        raise LeaveError(f"{data_dir} is not a running node's data dir (no {COMMANDS_DIR}/); "
                         "give the --data-dir the node runs with")
    result = folder / "leave.result"
    result.unlink(missing_ok=True)
    (folder / "leave.request").write_text("{}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result.exists():
            return json.loads(result.read_text())
        time.sleep(0.1)
    raise LeaveError(f"the node did not answer within {timeout_s:.0f} s; is it running with --data-dir {data_dir}?")


def run_leave(args: argparse.Namespace) -> int:
    from node.cli import UserError
    try:
        doc = request_leave(args.data_dir, args.timeout)
    except LeaveError as exc:
        raise UserError(str(exc)) from exc
    if not doc.get("ok"):
        raise UserError(f"leave refused ({doc.get('reason')}): {doc.get('error')}")
    print(f"leave requested: {doc.get('note')}")
    return 0
