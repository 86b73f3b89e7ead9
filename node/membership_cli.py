"""`sealmesh leave --data-dir DIR`: ask the running node to leave its mesh (issue 15);
`sealmesh member slash --hotkey SS58 --grounds G --round R --data-dir DIR`: ask the
running validator to propose a MemberSlash (the co-signers' evidence rule decides).

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

from node.cli_errors import UserError
from node.membership import COMMANDS_DIR
from protocol.member_book import MEMBER_SLASH_GROUNDS


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
    try:
        doc = request_leave(args.data_dir, args.timeout)
    except LeaveError as exc:
        raise UserError(str(exc)) from exc
    if not doc.get("ok"):
        raise UserError(f"leave refused ({doc.get('reason')}): {doc.get('error')}")
    print(f"leave requested: {doc.get('note')}")
    return 0


GROUNDS = MEMBER_SLASH_GROUNDS  # the record's own list: a new ground is a choice here at once


def add_member_command(commands: argparse._SubParsersAction) -> None:
    member = commands.add_parser("member", help="act on another member of the mesh (validators)")
    actions = member.add_subparsers(dest="member_command", required=True, metavar="ACTION")
    slash = actions.add_parser(
        "slash", help="ask the running validator to propose slashing a member for what a round proved",
        description="Propose a MemberSlash on the settlement head: the member's escrow goes to the "
        "reward pool and it may not join again for the cool-down. Every validator (this one "
        "first) co-signs it only if its own round ROUND named HOTKEY on GROUNDS: a contribution "
        "rejected for what its bytes prove (bad_proof, malformed_contribution, wrong_size) or a "
        "slot proof out of range in the blame step are invalid_contribution; no round names "
        "sabotage or withheld_share yet. Without that evidence it is refused and nothing changes.")
    slash.add_argument("--hotkey", required=True, help="the member's SS58 hotkey")
    slash.add_argument("--grounds", required=True, choices=GROUNDS, help="what its round proved")
    slash.add_argument("--round", type=int, required=True, help="the round id the grounds refer to")
    slash.add_argument("--data-dir", type=Path, required=True, help="the validator's data dir")
    slash.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the node")


def run_member(args: argparse.Namespace) -> int:
    from node.head_cli import HeadCliError, ask_node

    if args.round < 0:
        raise UserError("--round is a round id (0 or more)")
    try:
        doc = ask_node(args.data_dir, "member_slash", timeout_s=args.timeout,
                       payload={"hotkey": args.hotkey, "grounds": args.grounds, "round": args.round})
    except HeadCliError as exc:
        raise UserError(str(exc)) from exc
    if not doc.get("ok"):
        raise UserError(f"member slash refused ({doc.get('reason')}): {doc.get('error')}")
    print(f"member slash proposed (tx {str(doc.get('tx_id'))[:12]}): {doc.get('note')}")
    return 0
