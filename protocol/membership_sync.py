"""How a node that is not a head party learns the membership: from a fully signed
snapshot (protocol/head/) that a validator publishes in a MembershipUpdate.

A snapshot that every party of the head signed is authoritative for everyone (the head's
own rule for Sync), so any node can check one with the parties' hotkeys alone: the
genesis validators, who are the embedded head's parties. Newer replaces older within
one head; a snapshot of another head is refused (a head's book does not carry over to
the next head yet: docs/membership.md).
"""

from __future__ import annotations

from typing import Callable

from crypto.identity import verify_signature
from protocol.admission import MembershipUpdate
from protocol.errors import RemoteProtocolError
from protocol.head import Snapshot

Verify = Callable[[str, bytes, bytes], bool]


def _reject(reason: str, hint: str) -> RemoteProtocolError:
    return RemoteProtocolError(hint, reason=reason)


def checked_update(update: MembershipUpdate, parties: tuple[str, ...], *, current_head: str | None,
                   current_number: int, verify: Verify = verify_signature) -> Snapshot:
    """The update's snapshot if it is fully signed by `parties` and newer than what this
    node holds (`current_head`, `current_number`); RemoteProtocolError otherwise.
    "stale_update" is not an attack: validators repeat their newest for late joiners."""
    snapshot = Snapshot.decode(update.snapshot)
    if current_head is not None and update.head_id != current_head:
        raise _reject("other_head", f"membership of head {update.head_id!r}; this node follows {current_head!r}")
    if current_head is not None and snapshot.number <= current_number:
        raise _reject("stale_update", f"snapshot {snapshot.number} is not newer than {current_number}")
    if snapshot.number == 0 or set(snapshot.signatures) != set(parties):
        raise _reject("not_fully_signed", f"snapshot {snapshot.number} is signed by {sorted(snapshot.signatures)}, "
                      f"not by every party {sorted(parties)}")
    payload = snapshot.signing_payload(update.head_id)
    for party in parties:
        if not verify(party, payload, snapshot.signatures[party]):
            raise _reject("bad_snapshot_signature", f"{party}'s signature on snapshot {snapshot.number} does not verify")
    return snapshot


__all__ = ["checked_update"]
