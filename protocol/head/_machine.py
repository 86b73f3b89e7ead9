"""One party's head machine: events in, effects out (specs/Head.tla's actions as
handlers, the TRANSITIONS table as the only way phase changes)."""

from __future__ import annotations

from typing import Any, Callable

import msgpack

from crypto.identity import verify_signature
from protocol import head_rules as rules
from protocol import member_book as mb
from protocol._wire import unpack_strict
from protocol.epistula import Signer
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import decode as decode_message
from protocol.messages import encode as encode_message
from protocol.head_messages import (HeadAbort, HeadAckSn, HeadClose, HeadCommit, HeadContest,
                                    HeadDeposit, HeadInit, HeadMessage, HeadNackSn, HeadNewTx,
                                    HeadRecover, HeadReqSn, HeadSync, HeadSyncRequest)
from protocol.head._codec import canonical, sha256_hex
from protocol.head._errors import AwaitingOwnView, HeadMisuse, reject
from protocol.head._events import (TRANSITIONS, Abort, Close, Commit, Deposit, Effect, Event, Fanout, Init, NewTx,
                                   ObserveEpoch, ObserveRound, Phase, Receive, Record, Recover, Restart, Send, SetTimer,
                                   Tick, allowed)
from protocol.head._ledger import Ledger, apply_deposit, apply_tx
from protocol.head._parameters import HeadParameters
from protocol.head._payouts import final_payouts, settled_records
from protocol.head._snapshot import REFUSAL_REASON, Snapshot, Verify, refusal_signing_payload, snapshot_problem
from protocol.head._state import Closing, DepositRecord, Proposal, restore_state, state_to_wire
from protocol.head._transactions import (POOL, RoundResult, ScoreReport, SlashVote, Tx, decode_tx, encode_tx, tx_id,
                                         tx_signing_payload)

CLOCK_SKEW_MS = 8_000  # a Close stamped further from our clock is refused (Epistula's window)
MAX_SNAPSHOT_TXS = 1000
VIEWS_KEPT = 2 * rules.RECORD_WINDOW  # own views of rounds (epochs) kept before pruning old ones


# --- the machine --------------------------------------------------------------------


class HeadMachine:
    """One party's view of the head. `handle` is the only entry point."""

    def __init__(self, signer: Signer, *, verify: Verify = verify_signature) -> None:
        self.signer = signer
        self.me = signer.ss58_address
        self.verify = verify
        self.phase = Phase.IDLE
        self.params: HeadParameters | None = None
        self.commits: dict[str, tuple[int, int, int]] = {}  # party -> (escrow, balance, pool)
        self.confirmed: Snapshot | None = None
        self.pending: dict[str, tuple[bytes, bytes]] = {}  # tx id -> (tx, signature), arrival order
        self.proposal: Proposal | None = None
        self.waiting: HeadReqSn | None = None  # a ReqSn that came while we were behind
        self.early_acks: dict[str, bytes] = {}  # AckSn for confirmed+1 before its ReqSn
        # Signed refusals (NackSn) of snapshots not yet confirmed: party -> (number,
        # reason, signature), the newest per party. They block withheld_signature votes.
        self.refusals: dict[str, tuple[int, str, bytes]] = {}
        self.deposits: dict[str, DepositRecord] = {}
        self.closing: Closing | None = None
        self.votes: dict[str, dict[str, tuple[bytes, bytes]]] = {}  # target -> voter -> (tx, sig)
        self.payouts: dict[str, int] | None = None
        self.early: list[tuple[str, bytes]] = []  # (sender, message) that came before Init
        # Our own view of finished rounds and epochs (ObserveRound/ObserveEpoch): the
        # records we co-sign must match it (head_rules).
        self.observed_rounds: dict[int, list[Any]] = {}
        self.observed_epochs: dict[int, dict[str, float]] = {}
        # Views under these were pruned (_prune_views): the records they judged are settled.
        self.views_pruned_rounds = 0
        self.views_pruned_epochs = 0
        self._pending_ledger: Ledger | None = None  # derived: confirmed ledger + pending txs
        # What this party judges membership records against (configuration, not state:
        # the node sets it from the genesis file and its settings); None co-signs none.
        self.membership: mb.MembershipRules | None = None

    # -- entry point ------------------------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, Receive):
            return self._receive(event.sender, event.message, event.now_ms)
        return _COMMANDS[type(event)](self, event)

    # -- views -------------------------------------------------------------------------

    @property
    def parameters(self) -> HeadParameters:
        if self.params is None:
            raise HeadMisuse("no head was initialized", reason="no_head")
        return self.params

    @property
    def pending_ledger(self) -> Ledger:
        if self._pending_ledger is None:
            self._rebuild_pending()
        assert self._pending_ledger is not None
        return self._pending_ledger

    @property
    def committed_total(self) -> int:
        return sum(balance + pool for _, balance, pool in self.commits.values())

    @property
    def escrow_total(self) -> int:
        return sum(escrow for escrow, _, _ in self.commits.values())

    def slashed(self) -> list[str]:
        """Parties that a strict majority of the other parties voted against."""
        majority = self.params.majority if self.params else 1
        return sorted(t for t, voters in self.votes.items() if len(voters) >= majority)

    def deadline_ms(self) -> int | None:
        return self.closing.deadline(self.parameters) if self.closing else None

    # -- guards ------------------------------------------------------------------------

    def _require(self, action: str, *, local: bool) -> None:
        if not allowed(action, self.phase):
            hint = f"{action} is not allowed while the head is {self.phase.value}"
            if local:
                raise HeadMisuse(hint, reason="wrong_phase")
            raise reject("wrong_phase", hint)

    def _move(self, action: str, to: Phase) -> None:
        if to not in TRANSITIONS.get((action, self.phase), frozenset()):
            raise LocalProtocolError(f"no transition {self.phase.value} -{action}-> {to.value}")
        self.phase = to

    # -- lifecycle: Init, Commit, Abort ------------------------------------------------

    def _init(self, event: Init) -> list[Effect]:
        self._require("Init", local=True)
        params = event.parameters
        if params.problems() or self.me not in params.parties:
            raise HeadMisuse("; ".join(params.problems() or ["this node is not a party"]),
                             reason="bad_parameters")
        self.params = params
        self._move("Init", Phase.INITIALIZING)
        return [Send(params.to_message()), Record("head_init", {"head_id": params.head_id})
                ] + self._replay_early(event.now_ms)

    def _on_init(self, sender: str, message: HeadInit, now_ms: int) -> list[Effect]:
        params = HeadParameters.from_message(message)
        if self.params == params:
            return []  # the same Init again
        self._require("Init", local=False)
        if params.problems():
            raise reject("bad_parameters", "; ".join(params.problems()))
        if sender not in params.parties or self.me not in params.parties:
            raise reject("not_a_party", "an Init names its sender and this node as parties")
        self.params = params
        self._move("Init", Phase.INITIALIZING)
        return [Record("head_init", {"head_id": params.head_id})] + self._replay_early(now_ms)

    def _keep_early(self, sender: str, message: HeadCommit | HeadAbort) -> list[Effect]:
        """A Commit or Abort that overtook its Init: keep one per sender and kind until it comes."""
        raw = encode_message(message)
        if not any(s == sender and decode_message(r).TYPE == message.TYPE for s, r in self.early):
            self.early.append((sender, raw))
        return []

    def _replay_early(self, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        early, self.early = self.early, []
        for sender, raw in early:
            try:
                effects += self._receive(sender, decode_message(raw), now_ms)
            except RemoteProtocolError as exc:
                effects.append(Record("rejected", {"reason": exc.reason, "hint": exc.hint}))
        return effects

    def _commit(self, event: Commit) -> list[Effect]:
        self._require("Commit", local=True)
        self._check_commit(self.me, event.escrow, event.balance, event.pool, local=True)
        message = HeadCommit(self.parameters.head_id, event.escrow, event.balance, event.pool)
        return [Send(message)] + self._apply_commit(self.me, message)

    def _on_commit(self, sender: str, message: HeadCommit, now_ms: int) -> list[Effect]:
        self._require("Commit", local=False)
        self._check_commit(sender, message.escrow, message.balance, message.pool, local=False)
        return self._apply_commit(sender, message)

    def _check_commit(self, party: str, escrow: int, balance: int, pool: int, *,
                      local: bool) -> None:
        problem = None
        if party in self.commits:
            problem = ("duplicate_commit", f"{party} already committed")
        elif escrow != self.parameters.escrow:
            problem = ("wrong_escrow", f"the head's escrow is {self.parameters.escrow}, not {escrow}")
        elif balance < 0 or pool < 0:
            problem = ("negative_commit", "balance and pool must not be negative")
        if problem and local:
            raise HeadMisuse(problem[1], reason=problem[0])
        if problem:
            raise reject(*problem)

    def _apply_commit(self, party: str, message: HeadCommit) -> list[Effect]:
        self.commits[party] = (message.escrow, message.balance, message.pool)
        effects: list[Effect] = [Record("commit", {"party": party, "escrow": message.escrow,
                                                   "balance": message.balance, "pool": message.pool})]
        if set(self.commits) != set(self.parameters.parties):
            self._move("Commit", Phase.INITIALIZING)
            return effects
        balances = {p: b for p, (_, b, _) in self.commits.items()}
        balances[POOL] = sum(pool for _, _, pool in self.commits.values())
        self.confirmed = Snapshot(0, (), "", Ledger(balances), {})
        self._pending_ledger = self.confirmed.ledger
        self._move("Commit", Phase.OPEN)
        return effects + [Record("head_open", {"balances": dict(balances)})]

    # Without an L1 to order an abort against the last commit, only a party that has not
    # committed may abort: the head then can never open anywhere, as it lacks that commit.

    def _abort(self, event: Abort) -> list[Effect]:
        self._require("Abort", local=True)
        if self.me in self.commits:
            raise HeadMisuse("a party that committed cannot abort", reason="committed")
        return [Send(HeadAbort(self.parameters.head_id))] + self._apply_abort(self.me)

    def _on_abort(self, sender: str, message: HeadAbort, now_ms: int) -> list[Effect]:
        self._require("Abort", local=False)
        if sender in self.commits:
            raise reject("committed", f"{sender} committed, so it cannot abort")
        return self._apply_abort(sender)

    def _apply_abort(self, party: str) -> list[Effect]:
        # Every commit seen goes back whole to its party: nothing happened in the head yet.
        self.payouts = {p: sum(c) for p, c in sorted(self.commits.items())}
        self._move("Abort", Phase.FINAL)
        return [Record("aborted", {"by": party, "payouts": dict(self.payouts)})]

    # -- NewTx and SlashVote -----------------------------------------------------------

    def _newtx(self, event: NewTx) -> list[Effect]:
        if event.tx.author != self.me:
            raise HeadMisuse("a party submits only transactions it authored", reason="not_author")
        problem = self._record_problem(event.tx)
        if problem:
            raise HeadMisuse(problem[1], reason=problem[0])
        raw = encode_tx(event.tx)
        signature = self.signer.sign(tx_signing_payload(self.parameters.head_id, tx_id(raw)))
        try:
            effects = self._accept_tx(raw, signature, event.now_ms)
        except RemoteProtocolError as exc:
            raise HeadMisuse(exc.hint, reason=exc.reason) from None
        return [Send(HeadNewTx(self.parameters.head_id, raw, signature))] + effects

    def _on_new_tx(self, sender: str, message: HeadNewTx, now_ms: int) -> list[Effect]:
        return self._accept_tx(message.tx, message.signature, now_ms)

    def _accept_tx(self, raw: bytes, signature: bytes, now_ms: int) -> list[Effect]:
        tx = decode_tx(raw)
        txid = tx_id(raw)
        self._check_tx_signature(tx, raw, signature)
        if isinstance(tx, SlashVote):
            return self._count_vote(tx, raw, signature)
        self._require("NewTx", local=False)
        if txid in self.pending:
            raise reject("duplicate_tx", f"transaction {txid[:12]} is already pending")
        problem = self._record_problem(tx)
        if problem and problem[0] not in rules.NOT_OBSERVED:
            raise reject(*problem)  # a record we will never co-sign; one we cannot judge yet waits
        self._pending_ledger = apply_tx(self.pending_ledger, tx, txid)
        self.pending[txid] = (raw, signature)
        return self._maybe_request(now_ms)

    def _record_problem(self, tx: Tx) -> tuple[str, str] | None:
        """Why we would not co-sign this RoundResult or ScoreReport (head_rules); None
        for a record we agree with and for every other kind of transaction."""
        ledger = self.confirmed.ledger if self.confirmed is not None else None
        if isinstance(tx, mb.MEMBER_TXS):
            # At most one per snapshot (_ready_txs), so the confirmed ledger is the one it applies to.
            return None if ledger is None else mb.record_problem(tx, ledger, self.membership)
        if isinstance(tx, RoundResult) and ledger is not None and tx.round < ledger.rounds_below:
            # Checked first: its own view may be pruned, and it must not wait for one.
            return rules.window_problem(ledger.rounds_below, (), tx.round, "round")
        if isinstance(tx, ScoreReport) and ledger is not None and tx.epoch < ledger.epochs_below:
            return rules.window_problem(ledger.epochs_below, (), tx.epoch, "epoch")
        if isinstance(tx, RoundResult):
            return rules.round_result_problem(tx, self.parameters, self.observed_rounds)
        if isinstance(tx, ScoreReport):
            return rules.score_report_problem(tx, self.parameters, self.observed_epochs)
        return None

    def _check_tx_signature(self, tx: Tx, raw: bytes, signature: bytes) -> None:
        if tx.author not in self.parameters.parties:
            raise reject("unknown_author", f"{tx.author} is not a party of this head")
        if not self.verify(tx.author, tx_signing_payload(self.parameters.head_id, tx_id(raw)),
                           signature):
            raise reject("bad_tx_signature", f"transaction {tx_id(raw)[:12]} is not signed by its author")

    def _count_vote(self, vote: SlashVote, raw: bytes, signature: bytes) -> list[Effect]:
        self._require("SlashVote", local=False)
        if vote.target not in self.parameters.parties:
            raise reject("unknown_target", f"{vote.target} is not a party of this head")
        voters = self.votes.setdefault(vote.target, {})
        if vote.author in voters:
            return []  # one vote per voter and target; repeats change nothing
        was_slashed = vote.target in self.slashed()
        voters[vote.author] = (raw, signature)
        effects: list[Effect] = [Record("slash_vote", {"voter": vote.author, "target": vote.target,
                                                       "grounds": vote.grounds})]
        if not was_slashed and vote.target in self.slashed():
            effects.append(Record("slashed", {"party": vote.target, "voters": sorted(voters)}))
        return effects

    def _cast_vote(self, target: str, grounds: str, evidence: int) -> list[Effect]:
        if self.me in self.votes.get(target, {}):
            return []
        raw = encode_tx(SlashVote(self.me, target, grounds, evidence))
        signature = self.signer.sign(tx_signing_payload(self.parameters.head_id, tx_id(raw)))
        return ([Send(HeadNewTx(self.parameters.head_id, raw, signature))]
                + self._count_vote(SlashVote(self.me, target, grounds, evidence), raw, signature))

    # -- snapshots: ReqSn, AckSn -------------------------------------------------------

    def _maybe_request(self, now_ms: int) -> list[Effect]:
        """ReqSn: the next snapshot's leader proposes it once there is something to settle."""
        if self.phase != Phase.OPEN or self.proposal is not None or self.confirmed is None:
            return []
        number = self.confirmed.number + 1
        if self.parameters.leader(number) != self.me:
            return []
        txs = self._ready_txs()
        deposit_id = next((d for d, r in self.deposits.items() if r.includable_in(number)), "")
        if not txs and not deposit_id:
            return []
        ledger = self._ledger_after(txs, deposit_id)
        proposal = Proposal(number, txs, deposit_id, ledger, now_ms)
        return [Send(proposal.request(self.parameters.head_id))] + self._sign(proposal)

    def _ready_txs(self) -> tuple[tuple[bytes, bytes], ...]:
        """The pending txs a leader proposes: in arrival order, those we would co-sign now
        (a record waits for our own view of its round) and that still apply after them."""
        assert self.confirmed is not None
        ledger, chosen = self.confirmed.ledger, []
        for txid, (raw, signature) in self.pending.items():
            if len(chosen) == MAX_SNAPSHOT_TXS:
                break
            tx = decode_tx(raw)
            if self._record_problem(tx) is not None:
                continue
            if isinstance(tx, mb.MEMBER_TXS) and any(
                    isinstance(decode_tx(r), mb.MEMBER_TXS) for r, _ in chosen):
                continue  # one membership record per snapshot: the next one takes it
            try:
                ledger = apply_tx(ledger, tx, txid)
            except RemoteProtocolError:
                continue
            chosen.append((raw, signature))
        return tuple(chosen)

    def _on_req_sn(self, sender: str, message: HeadReqSn, now_ms: int) -> list[Effect]:
        self._require("ReqSn", local=False)
        assert self.confirmed is not None
        number = message.number
        if number <= self.confirmed.number:
            raise reject("stale_snapshot", f"snapshot {number} is not newer than the confirmed "
                          f"{self.confirmed.number}")
        if sender != self.parameters.leader(number):
            raise reject("not_leader", f"{sender} does not lead snapshot {number}")
        if self.proposal is not None and self.proposal.number == number:
            if message == self.proposal.request(self.parameters.head_id):
                return []  # the same request again
            if self.refused(self.me, number):
                return []
            # The leader equivocated. We signed its other request, and gossip brings this one
            # to everyone: our signed refusal tells those who signed this one that we are not
            # withholding (else they and the leader would outvote us; found by TLC).
            return self._refuse(number, "conflicting_snapshot",
                                f"{sender} proposed two different snapshots {number}")
        if number > self.confirmed.number + 1:  # we are behind: catch up, then sign it
            self.waiting = message
            return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]
        try:
            proposal = self._checked_request(message, now_ms)
        except AwaitingOwnView as exc:
            self.waiting = message
            return ([Record("awaiting_own_view", {"number": number, "reason": exc.reason})]
                    + self._refuse(number, exc.reason, exc.hint))
        except RemoteProtocolError as exc:
            return self._refuse(number, exc.reason, exc.hint)
        return self._sign(proposal)

    def _refuse(self, number: int, reason: str, hint: str) -> list[Effect]:
        """NackSn: say, signed, why we do not sign snapshot `number`, so that nobody takes
        our silence for withholding. The request itself changes nothing else here."""
        signature = self.signer.sign(refusal_signing_payload(self.parameters.head_id, number, reason))
        self.refusals[self.me] = (number, reason, signature)
        return [Send(HeadNackSn(self.parameters.head_id, number, reason, signature)),
                Record("refused", {"number": number, "reason": reason, "hint": hint})]

    def _on_nack_sn(self, sender: str, message: HeadNackSn, now_ms: int) -> list[Effect]:
        self._require("NackSn", local=False)
        assert self.confirmed is not None
        if message.number <= self.confirmed.number:
            return []  # a refusal of a snapshot that was confirmed after all
        if not REFUSAL_REASON.fullmatch(message.reason):
            raise reject("malformed_refusal", "a refusal's reason is a short snake_case word")
        payload = refusal_signing_payload(self.parameters.head_id, message.number, message.reason)
        if not self.verify(sender, payload, message.signature):
            raise reject("bad_refusal_signature", f"{sender}'s refusal of snapshot "
                          f"{message.number} is not signed by it")
        if self.refusals.get(sender, (-1,))[0] >= message.number:
            return []
        self.refusals[sender] = (message.number, message.reason, message.signature)
        return [Record("refusal", {"party": sender, "number": message.number,
                                   "reason": message.reason})]

    def refused(self, party: str, number: int) -> bool:
        """`party` signed a refusal of snapshot `number`: it is not withholding it."""
        return self.refusals.get(party, (-1,))[0] == number

    def _checked_request(self, message: HeadReqSn, now_ms: int) -> Proposal:
        """The proposal a ReqSn makes, if its txs are signed and valid in its order on our
        confirmed ledger and give the ledger hash it claims."""
        if len(message.txs) != len(message.signatures) or len(message.txs) > MAX_SNAPSHOT_TXS:
            raise reject("malformed_request", "a ReqSn has one signature per transaction")
        txs = tuple(zip(message.txs, message.signatures))
        if sum(isinstance(_decoded_or_none(raw), mb.MEMBER_TXS) for raw, _ in txs) > 1:
            raise reject("one_membership_record_per_snapshot", f"snapshot {message.number} holds "
                          "more than one membership record")
        for raw, signature in txs:
            try:
                tx = decode_tx(raw)
                self._check_tx_signature(tx, raw, signature)
            except RemoteProtocolError as exc:
                raise reject("invalid_snapshot_tx", f"snapshot {message.number}: {exc.hint}") from None
            problem = self._record_problem(tx)
            if problem and problem[0] in rules.NOT_OBSERVED:
                raise AwaitingOwnView(f"snapshot {message.number}: {problem[1]}", reason=problem[0])
            if problem:
                raise reject(problem[0], f"snapshot {message.number}: {problem[1]}")
        self._check_deposit_includable(message.deposit_id, message.number)
        try:
            ledger = self._ledger_after(txs, message.deposit_id)
        except RemoteProtocolError as exc:
            raise reject("invalid_snapshot_tx", f"snapshot {message.number}: {exc.hint}") from None
        if ledger.hash() != message.ledger_hash:
            raise reject("ledger_hash_mismatch", f"snapshot {message.number}'s ledger hash is not "
                          "the result of its transactions")
        return Proposal(message.number, txs, message.deposit_id, ledger, now_ms)

    def _retry_waiting(self, now_ms: int) -> list[Effect]:
        """After catching up, sign the ReqSn that came while we were behind. Its
        rejection must not fail the event that caught us up, so it becomes a record."""
        message, self.waiting = self.waiting, None
        if message is None or self.confirmed is None or message.number != self.confirmed.number + 1:
            return []
        if self.proposal is not None and self.proposal.number == message.number:
            return []  # we signed another request for this number since: never two
        try:
            return self._sign(self._checked_request(message, now_ms))
        except AwaitingOwnView as exc:
            self.waiting = message  # still not ours to judge: keep waiting
            if self.refused(self.me, message.number):
                return []
            return self._refuse(message.number, exc.reason, exc.hint)
        except RemoteProtocolError as exc:
            return self._refuse(message.number, exc.reason, exc.hint)

    def _check_deposit_includable(self, deposit_id: str, number: int) -> None:
        if not deposit_id:
            return
        record = self.deposits.get(deposit_id)
        if record is None:  # its Deposit message has not reached us yet: wait for it
            raise AwaitingOwnView(f"deposit {deposit_id[:12]} has not reached this party yet",
                                  reason="deposit_not_seen")
        if not record.includable_in(number):
            raise reject("deposit_not_includable", f"deposit {deposit_id[:12]} is {record.status} "
                          f"and may be absorbed up to snapshot {record.last_snapshot}, not {number}")

    def _ledger_after(self, txs: tuple[tuple[bytes, bytes], ...], deposit_id: str) -> Ledger:
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for raw, _ in txs:
            ledger = apply_tx(ledger, decode_tx(raw), tx_id(raw))
        if deposit_id:
            record = self.deposits[deposit_id]
            ledger = apply_deposit(ledger, deposit_id, record.party, record.amount)
        return ledger

    def _sign(self, proposal: Proposal) -> list[Effect]:
        """AckSn: sign a snapshot we checked, then count the acks that came early."""
        number, now_ms = proposal.number, proposal.requested_at_ms
        payload = proposal.payload(self.parameters.head_id)
        signature = self.signer.sign(payload)
        proposal.acks[self.me] = signature
        for party, early in sorted(self.early_acks.items()):
            if party != self.me and self.verify(party, payload, early):
                proposal.acks[party] = early  # a bad early ack is dropped; its party counts as missing
        self.early_acks = {}
        self.proposal = proposal
        effects: list[Effect] = [
            Send(HeadAckSn(self.parameters.head_id, number, signature)),
            SetTimer(now_ms + self.parameters.sign_timeout_ms, "snapshot_signatures")]
        return effects + self._maybe_confirm(now_ms)

    def _on_ack_sn(self, sender: str, message: HeadAckSn, now_ms: int) -> list[Effect]:
        self._require("AckSn", local=False)
        assert self.confirmed is not None
        if message.number <= self.confirmed.number:
            return []  # a late ack of a snapshot we already confirmed
        proposal = self.proposal
        if proposal is None or proposal.number != message.number:
            if message.number == self.confirmed.number + 1:
                self.early_acks.setdefault(sender, message.signature)
                return []
            return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]
        if sender in proposal.acks:
            return []
        if not self.verify(sender, proposal.payload(self.parameters.head_id), message.signature):
            raise reject("bad_snapshot_signature", f"{sender}'s signature is not on snapshot "
                          f"{message.number} as we computed it")
        proposal.acks[sender] = message.signature
        return self._maybe_confirm(now_ms)

    def _maybe_confirm(self, now_ms: int) -> list[Effect]:
        proposal = self.proposal
        if proposal is None or set(proposal.acks) != set(self.parameters.parties):
            return []
        snapshot = Snapshot(proposal.number, proposal.tx_ids, proposal.deposit_id, proposal.ledger,
                            dict(sorted(proposal.acks.items())))
        return self._adopt(snapshot) + self._maybe_request(now_ms)

    def _adopt(self, snapshot: Snapshot) -> list[Effect]:
        """Make a fully signed snapshot the confirmed one (after AckSn or Sync)."""
        effects: list[Effect] = [Record("snapshot_confirmed", {
            "number": snapshot.number, "tx_ids": list(snapshot.tx_ids),
            "deposit_id": snapshot.deposit_id, "ledger_hash": snapshot.ledger.hash()})]
        known = dict(self.pending)
        if self.proposal is not None:
            known.update((tx_id(raw), (raw, sig)) for raw, sig in self.proposal.txs)
        for txid in snapshot.tx_ids:
            if txid in known:
                effects.extend(settled_records(decode_tx(known[txid][0]), txid, snapshot.number))
        for deposit_id in snapshot.ledger.deposits:
            record = self.deposits.get(deposit_id)
            if record is not None and record.status == "pending":
                record.status = "absorbed"
                effects.append(Record("deposit_absorbed", {"deposit_id": deposit_id,
                                                           "party": record.party,
                                                           "amount": record.amount}))
        self.confirmed = snapshot
        for txid in snapshot.tx_ids + snapshot.ledger.applied:
            self.pending.pop(txid, None)
        self._prune_views()
        self._rebuild_pending()  # drops what a skipped-over snapshot settled (Sync)
        if self.proposal is not None and self.proposal.number <= snapshot.number:
            self.proposal = None
        self.early_acks = {}
        self.refusals = {p: r for p, r in self.refusals.items() if r[0] > snapshot.number}
        return effects

    def _rebuild_pending(self) -> None:
        """Re-apply pending txs on the confirmed ledger; drop those that no longer apply."""
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for txid, (raw, _) in list(self.pending.items()):
            tx = decode_tx(raw)
            problem = self._record_problem(tx)
            if problem and problem[0] not in rules.NOT_OBSERVED:
                del self.pending[txid]  # our own view came and disagrees: never co-signed
                continue
            try:
                ledger = apply_tx(ledger, tx, txid)
            except RemoteProtocolError:
                del self.pending[txid]
        self._pending_ledger = ledger

    # -- our own view: ObserveRound, ObserveEpoch --------------------------------------

    def _observe_round(self, event: ObserveRound) -> list[Effect]:
        limit = None if self.params is None else self.params.round_limit
        below = self.confirmed.ledger.rounds_below if self.confirmed else 0
        if event.round >= below:  # a view of a round that can no longer settle is not kept
            self._keep_view(self.observed_rounds, event.round,
                            rules.round_view(event.adapter_id, event.contributors), "round", limit)
        return self._after_own_view(event.now_ms)

    def _observe_epoch(self, event: ObserveEpoch) -> list[Effect]:
        limit = None if self.params is None else self.params.epoch_limit
        scores = {k: float(v) for k, v in sorted(event.scores.items())}
        if event.epoch >= (self.confirmed.ledger.epochs_below if self.confirmed else 0):
            self._keep_view(self.observed_epochs, event.epoch, scores, "epoch", limit)
        return self._after_own_view(event.now_ms)

    def _prune_views(self) -> None:
        """Forget our views of records under the confirmed window, which can never be
        co-signed again, once more than VIEWS_KEPT are held: the state stays bounded
        (issue 12). Until then RewardsOnlyByRule can still check every settled record."""
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for seen, below, attr in ((self.observed_rounds, ledger.rounds_below, "views_pruned_rounds"),
                                  (self.observed_epochs, ledger.epochs_below, "views_pruned_epochs")):
            if len(seen) <= VIEWS_KEPT:
                continue
            for number in [n for n in seen if n < below]:
                del seen[number]
            setattr(self, attr, max(getattr(self, attr), below))

    @staticmethod
    def _keep_view(seen: dict[int, Any], number: int, view: Any, what: str, limit: int | None) -> None:
        if limit is not None and not 0 <= number < limit:
            raise HeadMisuse(f"{what} {number} is outside the head's agreed {what}s 0..{limit - 1}",
                             reason=f"{what}_out_of_range")
        if seen.get(number, view) != view:
            raise HeadMisuse(f"{what} {number} was already observed with other contents",
                             reason="conflicting_observation")
        seen[number] = view

    def _after_own_view(self, now_ms: int) -> list[Effect]:
        """A request that waited for this view can be judged now; as leader, a record
        that waited for it can be proposed."""
        if self.phase != Phase.OPEN or self.confirmed is None:
            return []
        self._rebuild_pending()
        return self._retry_waiting(now_ms) + self._maybe_request(now_ms)

    # -- catching up: Restart, Sync ----------------------------------------------------

    def _restart(self, event: Restart) -> list[Effect]:
        if self.phase != Phase.OPEN or self.confirmed is None:
            return []
        if self.proposal is not None:
            # Acks that came while we were down are lost: restart the signature clock so
            # nobody is blamed for our outage, and ask for what the others confirmed.
            self.proposal.requested_at_ms = event.now_ms
        return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]

    def _on_sync_request(self, sender: str, message: HeadSyncRequest, now_ms: int) -> list[Effect]:
        self._require("Sync", local=False)
        assert self.confirmed is not None
        if self.confirmed.number > message.confirmed_number:
            return [Send(HeadSync(self.parameters.head_id, self.confirmed.encode()))]
        proposal = self.proposal
        own = self.refusals.get(self.me)
        if proposal is None and own is not None and own[0] == message.confirmed_number + 1:
            return [Send(HeadNackSn(self.parameters.head_id, *own))]  # it may have lost our refusal
        if proposal is None or proposal.number != message.confirmed_number + 1:
            return []
        # The requester may have lost the snapshot in flight: the leader sends its request
        # again, and every party its own AckSn, so nobody is blamed for an outage.
        head_id = self.parameters.head_id
        effects: list[Effect] = []
        if self.parameters.leader(proposal.number) == self.me:
            effects.append(Send(proposal.request(head_id)))
        return effects + [Send(HeadAckSn(head_id, proposal.number, proposal.acks[self.me]))]

    def _on_sync(self, sender: str, message: HeadSync, now_ms: int) -> list[Effect]:
        self._require("Sync", local=False)
        assert self.confirmed is not None
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot.number <= self.confirmed.number:
            return []
        self._check_fully_signed(snapshot)
        return self._adopt(snapshot) + self._retry_waiting(now_ms) + self._maybe_request(now_ms)

    def _check_fully_signed(self, snapshot: Snapshot) -> None:
        problem = snapshot_problem(snapshot, self.parameters, self._initial_ledger(), self.verify)
        if problem:
            raise reject(*problem)

    def _initial_ledger(self) -> Ledger:
        balances = {p: b for p, (_, b, _) in self.commits.items()}
        balances[POOL] = sum(pool for _, _, pool in self.commits.values())
        return Ledger(balances)

    # -- deposits: Deposit, Recover ----------------------------------------------------

    def _deposit(self, event: Deposit) -> list[Effect]:
        self._require("Deposit", local=True)
        if event.amount <= 0:
            raise HeadMisuse("a deposit is a positive amount", reason="bad_deposit")
        deposit_id = self.deposit_id(self.me, event.amount, event.nonce)
        if deposit_id in self.deposits:
            raise HeadMisuse("this deposit was already made; use another nonce",
                             reason="duplicate_deposit")
        assert self.confirmed is not None
        last = self.confirmed.number + self.parameters.deposit_period_snapshots
        self.deposits[deposit_id] = DepositRecord(self.me, event.amount, last)
        return [Send(HeadDeposit(self.parameters.head_id, deposit_id, event.amount, event.nonce,
                                 last)),
                Record("deposit", {"deposit_id": deposit_id, "party": self.me,
                                   "amount": event.amount, "last_snapshot": last})
                ] + self._maybe_request(event.now_ms)

    def deposit_id(self, party: str, amount: int, nonce: int) -> str:
        return sha256_hex(canonical(["sealmesh/head/deposit", self.parameters.head_id, party, amount,
                                  nonce]))

    def _on_deposit(self, sender: str, message: HeadDeposit, now_ms: int) -> list[Effect]:
        self._require("Deposit", local=False)
        if message.amount <= 0 or message.deposit_id != self.deposit_id(sender, message.amount,
                                                                          message.nonce):
            raise reject("bad_deposit", "a deposit's id is the hash of its party, amount and nonce")
        assert self.confirmed is not None
        # The depositor counts from its confirmed snapshot, which may be a little behind or
        # ahead of ours; a window further out would only keep its own funds locked longer.
        period = self.parameters.deposit_period_snapshots
        if not 1 <= message.last_snapshot <= self.confirmed.number + 2 * period:
            raise reject("bad_deposit_window", f"a deposit may be absorbed for {period} snapshots "
                          f"from the depositor's confirmed one, not up to {message.last_snapshot}")
        if message.deposit_id in self.deposits:
            return []
        self.deposits[message.deposit_id] = DepositRecord(sender, message.amount,
                                                          message.last_snapshot)
        return ([Record("deposit", {"deposit_id": message.deposit_id, "party": sender,
                                    "amount": message.amount, "last_snapshot": message.last_snapshot})]
                + self._retry_waiting(now_ms) + self._maybe_request(now_ms))

    def _recover(self, event: Recover) -> list[Effect]:
        self._require("Recover", local=True)
        problem = self._recover_problem(self.me, event.deposit_id, event.now_ms)
        if problem:
            raise HeadMisuse(problem[1], reason=problem[0])
        return ([Send(HeadRecover(self.parameters.head_id, event.deposit_id))]
                + self._apply_recover(event.deposit_id))

    def _on_recover(self, sender: str, message: HeadRecover, now_ms: int) -> list[Effect]:
        self._require("Recover", local=False)
        problem = self._recover_problem(sender, message.deposit_id, now_ms)
        if problem:
            raise reject(*problem)
        return self._apply_recover(message.deposit_id)

    def _recover_problem(self, party: str, deposit_id: str, now_ms: int) -> tuple[str, str] | None:
        record = self.deposits.get(deposit_id)
        if record is None:
            return ("unknown_deposit", f"no deposit {deposit_id[:12]}")
        if record.party != party:
            return ("not_depositor", "only the depositor recovers a deposit")
        if record.status != "pending":
            return ("deposit_" + record.status, f"deposit {deposit_id[:12]} is {record.status}")
        if self.closing and deposit_id in self.closing.snapshot.ledger.deposits:
            return ("deposit_absorbed", "the closed snapshot absorbed this deposit")
        if self.phase in (Phase.FANOUT_POSSIBLE, Phase.FINAL):
            return None  # the head settled without it
        # Each snapshot number is confirmed once, with every party's signature: once ours
        # reaches the deposit's last snapshot without it, no snapshot can still absorb it.
        assert self.confirmed is not None
        if self.confirmed.number < record.last_snapshot:
            return ("deposit_not_expired", f"deposit {deposit_id[:12]} may still be absorbed up to "
                    f"snapshot {record.last_snapshot}; {self.confirmed.number} is confirmed")
        if deposit_id in self.confirmed.ledger.deposits:
            return ("deposit_absorbed", "the confirmed snapshot absorbed this deposit")
        return None

    def _apply_recover(self, deposit_id: str) -> list[Effect]:
        record = self.deposits[deposit_id]
        record.status = "recovered"
        return [Record("deposit_recovered", {"deposit_id": deposit_id, "party": record.party,
                                             "amount": record.amount})]

    # -- Close, Contest, Tick, Fanout --------------------------------------------------

    def _close(self, event: Close) -> list[Effect]:
        self._require("Close", local=True)
        if self.phase == Phase.CLOSED:
            raise HeadMisuse("the head is already closed", reason="wrong_phase")
        assert self.confirmed is not None
        excuse = self._excuse()
        # The ledger keeps a count, not every id; each counted round was in the agreed
        # range, as every party checked it (head_rules) before signing its snapshot.
        done = self.confirmed.ledger.rounds_settled
        if done < self.parameters.agreed_rounds and not excuse:
            raise HeadMisuse(
                f"{done} of the agreed {self.parameters.agreed_rounds} rounds are settled; closing "
                "now gets this validator slashed. Wait for the rounds, or for a majority vote "
                "against a party that withholds its signature", reason="early_close")
        closing = Closing(self.confirmed, event.now_ms, self.me)
        message = HeadClose(self.parameters.head_id, self.confirmed.encode(), event.now_ms, excuse)
        return [Send(message)] + self._apply_close(closing)

    def _excuse(self) -> list[bytes]:
        """Signed withholding votes against a slashed party: they justify an early close."""
        for target in self.slashed():
            votes = [canonical([raw, sig]) for raw, sig in self.votes[target].values()
                     if decode_tx(raw).grounds == "withheld_signature"]
            if len(votes) >= self.parameters.majority:
                return votes
        return []

    def _excused(self, excuse: list[bytes], closer: str) -> bool:
        voters_by_target: dict[str, set[str]] = {}
        for item in excuse:
            try:
                raw, signature = unpack_strict(item)
                vote = decode_tx(raw)
            except (RemoteProtocolError, ValueError, TypeError, msgpack.UnpackException):
                continue
            if (isinstance(vote, SlashVote) and vote.grounds == "withheld_signature"
                    and vote.author in self.parameters.parties and vote.target != closer
                    and self.verify(vote.author, tx_signing_payload(self.parameters.head_id,
                                                                    tx_id(raw)), signature)):
                voters_by_target.setdefault(vote.target, set()).add(vote.author)
        return any(len(v) >= self.parameters.majority for v in voters_by_target.values())

    def _on_close(self, sender: str, message: HeadClose, now_ms: int) -> list[Effect]:
        self._require("Close", local=False)
        if self.closing is not None and now_ms >= self.closing.deadline(self.parameters):
            # Like a late Contest: past the deadline the closed snapshot is final here, so a
            # newer one must not reach this party alone (found by TLC on specs/Head.tla).
            raise reject("close_after_deadline", "the contestation period is over")
        if abs(message.closed_at_ms - now_ms) > CLOCK_SKEW_MS:
            raise reject("stale_close", f"closed_at is {message.closed_at_ms - now_ms} ms from "
                          f"our clock; the bound is {CLOCK_SKEW_MS}")
        snapshot = Snapshot.decode(message.snapshot)
        self._check_fully_signed(snapshot)
        assert self.confirmed is not None
        newest = max(self.confirmed, snapshot, key=lambda s: s.number)
        effects: list[Effect] = []
        done = newest.ledger.rounds_settled
        if done < self.parameters.agreed_rounds and not self._excused(message.excuse, sender):
            effects += self._cast_vote(sender, "early_close", snapshot.number)
        if snapshot.number > self.confirmed.number:
            effects += self._adopt(snapshot)  # fully signed, so ours too
        closing = Closing(snapshot, message.closed_at_ms, sender)
        if self.closing is not None:
            # Concurrent closes: the earliest sets the deadline, the newest snapshot wins.
            first = min(self.closing, closing, key=lambda c: (c.closed_at_ms, c.closer))
            closing = Closing(max(self.closing.snapshot, snapshot, key=lambda s: s.number),
                              first.closed_at_ms, first.closer)
        return effects + self._apply_close(closing)

    def _apply_close(self, closing: Closing) -> list[Effect]:
        self.closing = closing
        self.proposal, self.waiting, self.early_acks = None, None, {}
        self._move("Close", Phase.CLOSED)
        deadline = closing.deadline(self.parameters)
        return [Record("closed", {"by": closing.closer, "number": closing.snapshot.number,
                                  "deadline_ms": deadline}),
                SetTimer(deadline, "contestation_deadline")] + self._maybe_contest()

    def _maybe_contest(self) -> list[Effect]:
        """Contest: answer a close on an older snapshot with our newer confirmed one."""
        closing, confirmed = self.closing, self.confirmed
        assert closing is not None and confirmed is not None
        if confirmed.number <= closing.snapshot.number:
            return []
        closing.snapshot = confirmed  # our own contest counts here as it does everywhere else
        return [Send(HeadContest(self.parameters.head_id, confirmed.encode())),
                Record("contested", {"by": self.me, "number": confirmed.number})]

    def _on_contest(self, sender: str, message: HeadContest, now_ms: int) -> list[Effect]:
        self._require("Contest", local=False)
        if self.phase == Phase.OPEN:
            return self._contest_before_close(message)
        assert self.closing is not None
        if now_ms >= self.closing.deadline(self.parameters):
            raise reject("contest_after_deadline", "the contestation period is over")
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot == self.closing.snapshot:
            return []  # another party contested with the same snapshot as we did
        if snapshot.number <= self.closing.snapshot.number:
            raise reject("contest_not_newer", f"snapshot {snapshot.number} is not newer than the "
                          f"closed {self.closing.snapshot.number}")
        self._check_fully_signed(snapshot)
        assert self.confirmed is not None
        effects = self._adopt(snapshot) if snapshot.number > self.confirmed.number else []
        self.closing.snapshot = snapshot
        self._move("Contest", Phase.CLOSED)
        return effects + [Record("contested", {"by": sender, "number": snapshot.number})] + \
            self._maybe_contest()

    def _contest_before_close(self, message: HeadContest) -> list[Effect]:
        """A Contest overtook the Close it answers. Its snapshot is fully signed, so it is
        authoritative: confirm it now, and the Close, when it comes, finds it ours."""
        assert self.confirmed is not None
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot.number <= self.confirmed.number:
            return []
        self._check_fully_signed(snapshot)
        return self._adopt(snapshot)

    def _tick(self, event: Tick) -> list[Effect]:
        effects: list[Effect] = []
        if self.phase == Phase.OPEN and self.proposal is not None and event.now_ms >= (
                self.proposal.requested_at_ms + self.parameters.sign_timeout_ms):
            for party in self.parameters.parties:
                if party not in self.proposal.acks and not self.refused(party, self.proposal.number):
                    effects += self._cast_vote(party, "withheld_signature", self.proposal.number)
        if self.phase == Phase.OPEN:
            effects += self._maybe_request(event.now_ms)
        if self.phase == Phase.CLOSED and self.closing is not None and (
                event.now_ms >= self.closing.deadline(self.parameters)):
            self._move("Tick", Phase.FANOUT_POSSIBLE)
            effects.append(Record("fanout_possible", {"number": self.closing.snapshot.number}))
        return effects

    def _fanout(self, event: Fanout) -> list[Effect]:
        effects = self._tick(Tick(event.now_ms)) if self.phase == Phase.CLOSED else []
        if self.phase == Phase.CLOSED:
            raise HeadMisuse(f"fanout waits for the contestation deadline at {self.deadline_ms()} ms",
                             reason="wrong_phase")
        self._require("Fanout", local=True)
        assert self.closing is not None
        escrows = {p: e for p, (e, _, _) in self.commits.items()}
        self.payouts = final_payouts(self.closing.snapshot.ledger, escrows, self.slashed())
        self._move("Fanout", Phase.FINAL)
        return effects + [Record("fanout", {"number": self.closing.snapshot.number,
                                            "payouts": dict(self.payouts),
                                            "slashed": self.slashed()})]

    # -- received messages -------------------------------------------------------------

    def _receive(self, sender: str, message: HeadMessage, now_ms: int) -> list[Effect]:
        handler = _RECEIVERS.get(type(message))
        if handler is None:
            raise reject("unknown_type", f"{type(message).__name__} is not a head message")
        if not isinstance(message, HeadInit):
            if self.params is None and isinstance(message, (HeadCommit, HeadAbort)):
                return self._keep_early(sender, message)
            if self.params is None:
                raise reject("wrong_phase", "no head was initialized here")
            if message.head_id != self.params.head_id:
                raise reject("wrong_head", f"message for head {message.head_id!r}, not ours")
            if sender not in self.params.parties:
                raise reject("not_a_party", f"{sender} is not a party of this head")
        return handler(self, sender, message, now_ms)

    # -- persistence -------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """All state, as plain msgpack-able data: what storage keeps and what tests hash."""
        return state_to_wire(self)

    @classmethod
    def from_wire(cls, wire: dict[str, Any], signer: Signer, *,
                  verify: Verify = verify_signature) -> "HeadMachine":
        machine = cls(signer, verify=verify)
        restore_state(machine, wire)
        if machine.confirmed is not None:
            machine._rebuild_pending()
        return machine


    def state_hash(self) -> str:
        return sha256_hex(canonical(self.to_wire()))


_COMMANDS: dict[type, Callable[..., list[Effect]]] = {
    Init: HeadMachine._init,
    Commit: HeadMachine._commit,
    Abort: HeadMachine._abort,
    NewTx: HeadMachine._newtx,
    Deposit: HeadMachine._deposit,
    Recover: HeadMachine._recover,
    Close: HeadMachine._close,
    Fanout: HeadMachine._fanout,
    Tick: HeadMachine._tick,
    Restart: HeadMachine._restart,
    ObserveRound: HeadMachine._observe_round,
    ObserveEpoch: HeadMachine._observe_epoch,
}

_RECEIVERS: dict[type, Callable[..., list[Effect]]] = {
    HeadInit: HeadMachine._on_init,
    HeadCommit: HeadMachine._on_commit,
    HeadAbort: HeadMachine._on_abort,
    HeadNewTx: HeadMachine._on_new_tx,
    HeadReqSn: HeadMachine._on_req_sn,
    HeadAckSn: HeadMachine._on_ack_sn,
    HeadNackSn: HeadMachine._on_nack_sn,
    HeadDeposit: HeadMachine._on_deposit,
    HeadRecover: HeadMachine._on_recover,
    HeadClose: HeadMachine._on_close,
    HeadContest: HeadMachine._on_contest,
    HeadSyncRequest: HeadMachine._on_sync_request,
    HeadSync: HeadMachine._on_sync,
}


def _decoded_or_none(raw: bytes) -> Tx | None:
    try:
        return decode_tx(raw)
    except RemoteProtocolError:
        return None
