"""Snapshots: a numbered ledger that every party signs, and when one may close, contest
or sync a head."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from protocol._wire import unpack_strict
from protocol.head._codec import canonical, conforms
from protocol.head._errors import reject
from protocol.head._ledger import Ledger
from protocol.head._parameters import HeadParameters

Verify = Callable[[str, bytes, bytes], bool]


def snapshot_signing_payload(head_id: str, number: int, tx_ids: tuple[str, ...] | list[str],
                             deposit_id: str, ledger_hash: str) -> bytes:
    return canonical(["sealmesh/head/snapshot", head_id, number, list(tx_ids), deposit_id,
                      ledger_hash])


@dataclass(frozen=True)
class Snapshot:
    number: int
    tx_ids: tuple[str, ...]
    deposit_id: str  # "" when it absorbs no deposit
    ledger: Ledger
    signatures: dict[str, bytes]  # party -> signature on the signing payload; {} for number 0

    def signing_payload(self, head_id: str) -> bytes:
        return snapshot_signing_payload(head_id, self.number, self.tx_ids, self.deposit_id,
                                        self.ledger.hash())

    def to_wire(self) -> dict[str, Any]:
        return {"number": self.number, "tx_ids": list(self.tx_ids), "deposit_id": self.deposit_id,
                "ledger": self.ledger.to_wire(), "signatures": dict(self.signatures)}

    def encode(self) -> bytes:
        return canonical(self.to_wire())

    @classmethod
    def from_wire(cls, wire: Any) -> "Snapshot":
        shape = {"number": int, "tx_ids": list[str], "deposit_id": str, "ledger": dict,
                 "signatures": dict[str, bytes]}
        if not isinstance(wire, dict) or set(wire) != set(shape) or not all(
                conforms(wire[k], hint) for k, hint in shape.items()):
            raise reject("malformed_snapshot", f"a snapshot has exactly the fields {sorted(shape)}")
        return cls(wire["number"], tuple(wire["tx_ids"]), wire["deposit_id"],
                   Ledger.from_wire(wire["ledger"]), dict(wire["signatures"]))

    @classmethod
    def decode(cls, raw: bytes) -> "Snapshot":
        try:
            wire = unpack_strict(raw)
        except Exception as exc:  # msgpack raises several unrelated types
            raise reject("malformed_snapshot", f"not a msgpack snapshot: {exc}") from exc
        return cls.from_wire(wire)


def refusal_signing_payload(head_id: str, number: int, reason: str) -> bytes:
    return canonical(["sealmesh/head/refusal", head_id, number, reason])


REFUSAL_REASON = re.compile(r"[a-z_]{1,64}")


def snapshot_problem(snapshot: Snapshot, params: HeadParameters, initial: Ledger,
                     verify: Verify) -> tuple[str, str] | None:
    """Why a snapshot may not close, contest or sync a head; None when it is fully signed.

    Snapshot 0 is the head's opening state, which needs no signatures (as in Hydra) but
    must equal what the parties committed.
    """
    if snapshot.number == 0:
        if snapshot.ledger != initial or snapshot.tx_ids or snapshot.deposit_id:
            return ("bad_initial_snapshot", "snapshot 0 must be exactly the committed state")
        return None
    if set(snapshot.signatures) != set(params.parties):
        return ("not_fully_signed", f"snapshot {snapshot.number} is signed by "
                f"{len(snapshot.signatures)} of {len(params.parties)} parties")
    payload = snapshot.signing_payload(params.head_id)
    for party in params.parties:
        if not verify(party, payload, snapshot.signatures[party]):
            return ("bad_snapshot_signature", f"{party}'s signature on snapshot {snapshot.number} "
                    "does not verify")
    return None
