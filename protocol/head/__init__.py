"""Settlement head: a multi-signed state channel among the validators (sans-IO).

The lifecycle and the snapshot protocol follow the Hydra Head (Chakravarty et al.,
"Hydra: Fast Isomorphic State Channels", FC 2021) as hydra-node exposes it:
HeadStatus Idle -> Initializing -> Open -> Closed -> FanoutPossible -> Final, Commit and
incremental Deposit/Recover, NewTx, ReqSn/AckSn snapshots signed by every party, Close
with the latest confirmed snapshot, Contest with a newer one, Fanout after the deadline.
The model is specs/Head.tla: the event classes and handlers here carry its action
names and the functions at the end its invariant names.

Each party runs one HeadMachine. Events go in (local commands, received messages, time);
effects come out (messages to broadcast on the settle channel, records to persist,
timers). Nothing here touches a socket, a disk or a clock.

Where this head differs from Hydra, because the mesh has no L1 to order things:
- the value in the ledger is an account balance map, not UTxO; rewards are paid out of
  a reward pool account funded at commit, so every transaction conserves value;
- escrow is locked at commit outside the ledger and redistributed at fanout: a party
  that a strict majority voted against (SlashVote) loses it to the others;
- a party that restarts asks for newer fully signed snapshots (Sync), since a snapshot
  that all parties signed is authoritative for everyone.

The package, by the spec's seams, each module importing only those above it:
  _codec         canonical msgpack and the type tests of strict decoding
  _errors        HeadMisuse (our misuse) and the rejections of a peer's input
  _transactions  the off-chain transactions: kinds, encoding, ids, strict decoding
  _ledger        the ledger and the pure rules that apply a transaction or a deposit
  _parameters    what the parties agree on at Init
  _snapshot      signed snapshots and when one may close, contest or sync
  _events        phases, events, effects and the TRANSITIONS/STAY_IN table
  _payouts       what a settled snapshot records and what fanout pays
  _state         the snapshot in flight, deposits, the closing; the state as plain data
  _machine       HeadMachine: the handlers, one per spec action
  _invariants    specs/Head.tla's invariants as functions of a machine
Everything public is re-exported here; nothing outside the package imports the
underscore modules (tests/test_layering.py).
"""

from __future__ import annotations

from protocol.head._codec import canonical
from protocol.head._errors import AwaitingOwnView, HeadMisuse
from protocol.head._events import (STAY_IN, TRANSITIONS, Abort, Close, Commit, Deposit, Effect, Event, Fanout, Init,
                                   NewTx, ObserveEpoch, ObserveRound, Phase, Receive, Record, Recover, Restart, Send,
                                   SetTimer, Tick, allowed)
from protocol.head._invariants import (INVARIANTS, ContestEndsOnNewestConfirmed, NoDoubleSpend,
                                       OnlyFullySignedSnapshotCloses, RewardsOnlyByRule, SlashNeedsMajority, TypeOK,
                                       ValueConserved, violated_invariants)
from protocol.head._ledger import Ledger, apply_deposit, apply_tx
from protocol.head._machine import CLOCK_SKEW_MS, MAX_SNAPSHOT_TXS, VIEWS_KEPT, HeadMachine
from protocol.head._parameters import HeadParameters
from protocol.head._payouts import final_payouts
from protocol.head._snapshot import (Snapshot, Verify, refusal_signing_payload, snapshot_problem,
                                     snapshot_signing_payload)
from protocol.head._state import Closing, DepositRecord, Proposal
from protocol.head._transactions import (POOL, SLASH_GROUNDS, TX_KINDS, RoundResult, ScoreReport, SlashVote, Transfer,
                                         Tx, Withdraw, decode_tx, encode_tx, tx_id, tx_signing_payload)
# The head's mesh messages live in protocol/head_messages.py (registered with
# protocol.messages on import); named here too, as the machine's inputs and outputs.
from protocol.head_messages import (HeadAbort, HeadAckSn, HeadClose, HeadCommit, HeadContest, HeadDeposit, HeadInit,
                                    HeadMessage, HeadNackSn, HeadNewTx, HeadRecover, HeadReqSn, HeadSync,
                                    HeadSyncRequest)

__all__ = [
    # encoding, transactions, ledger
    "canonical", "POOL", "SLASH_GROUNDS", "TX_KINDS", "Tx", "RoundResult", "ScoreReport", "Transfer", "SlashVote",
    "Withdraw", "encode_tx", "decode_tx", "tx_id", "tx_signing_payload", "Ledger", "apply_tx", "apply_deposit",
    # parameters and snapshots
    "HeadParameters", "Snapshot", "Verify", "snapshot_signing_payload", "refusal_signing_payload",
    "snapshot_problem", "final_payouts",
    # phases, events, effects, the table
    "Phase", "TRANSITIONS", "STAY_IN", "allowed", "Event", "Init", "Commit", "Abort", "NewTx", "Deposit", "Recover",
    "Close", "Fanout", "Tick", "Restart", "ObserveRound", "ObserveEpoch", "Receive", "Effect", "Send", "Record",
    "SetTimer",
    # the machine and its errors
    "HeadMachine", "HeadMisuse", "AwaitingOwnView", "Proposal", "DepositRecord", "Closing", "CLOCK_SKEW_MS",
    "MAX_SNAPSHOT_TXS", "VIEWS_KEPT",
    # invariants of specs/Head.tla
    "INVARIANTS", "violated_invariants", "TypeOK", "ValueConserved", "OnlyFullySignedSnapshotCloses",
    "ContestEndsOnNewestConfirmed", "NoDoubleSpend", "SlashNeedsMajority", "RewardsOnlyByRule",
    # messages (protocol/head_messages.py)
    "HeadMessage", "HeadInit", "HeadCommit", "HeadAbort", "HeadNewTx", "HeadReqSn", "HeadAckSn", "HeadNackSn",
    "HeadDeposit", "HeadRecover", "HeadClose", "HeadContest", "HeadSyncRequest", "HeadSync",
]
