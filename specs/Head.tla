-------------------------------- MODULE Head --------------------------------
(***************************************************************************)
(* The settlement head: a multi-signed state channel among the validators, *)
(* after the Hydra Head protocol (Chakravarty et al., FC 2021) and the      *)
(* lifecycle hydra-node exposes: Idle -> Initializing -> Open -> Closed ->  *)
(* FanoutPossible -> Final.                                                 *)
(*                                                                          *)
(* protocol/head/ implements it: a local command or a received message     *)
(* there is the action of the same name here (OnX is the handler _on_x of  *)
(* a received message), and the invariants at the end have the same names *)
(* as the Python functions that tests/test_head_explore.py checks in every *)
(* state it reaches.                                                        *)
(*                                                                          *)
(* Abstractions. Signatures are unforgeable: `signed` records which party  *)
(* signed which snapshot content, and a snapshot is fully signed when every *)
(* party did. Messages are gossip: a message in `msgs` reaches every party, *)
(* which handles it once (`delivered`). Ledger transactions are transfers   *)
(* between parties and round results paid from the reward pool. Time is   *)
(* `now`; the clock only advances once every honest party has handled the *)
(* messages a timeout or deadline judges (Close, Contest, and the ReqSn,   *)
(* AckSn and NackSn of the snapshot in flight): messages are faster than   *)
(* the timeouts, the assumption Hydra makes too. Restart/Sync are          *)
(* persistence and are left to the Python tests.                            *)
(*                                                                          *)
(* Records (issue 11, finding 2). Rounds 0..RoundLimit-1 may settle; round *)
(* RoundLimit stands for any id outside the agreed range (10^9). A round    *)
(* happens (RoundFinal) and each party learns it at a time of its own      *)
(* (Observe: the node feeding the machine its own RoundFinal). A party      *)
(* co-signs a round result only if the scheduled Author wrote it, its id  *)
(* is in range, it pays RoundReward to RuleTo(r) (the reward rule) and it  *)
(* observed the round itself; otherwise, or while it has not observed it, *)
(* it sends a signed refusal (NackSn), which blocks the withheld vote.     *)
(*                                                                          *)
(* Catching up (protocol/round_catchup.py). A party down for a whole round *)
(* has no RoundFinal of its own and would refuse forever. AdoptByQuorum:   *)
(* it adopts round r as observed once a strict majority of the parties     *)
(* other than itself sent a RoundFinal of r (`finals`: who claimed which   *)
(* round; an honest party claims what it observed itself, a byzantine one *)
(* any round, happened or not, ByzFinal). A round's content is its id here *)
(* (the reward rule RuleTo(r) pays by it), so a RoundFinal with other      *)
(* content than what happened is one of a round that did not happen.       *)
(* Adoption needs no honest view of its own, so RewardsOnlyByRule says:    *)
(* every settled round happened, this party observed or adopted it, and a *)
(* strict majority of the parties claimed it.                               *)
(*                                                                          *)
(* A head that keeps going (issue 12). The ledger does not keep every      *)
(* settled round: a watermark `below` (every round under it settled or     *)
(* skipped for good) and the settled ids `recent` inside [below, below +   *)
(* Window), with a count `settled`; a round under the watermark is refused *)
(* (round_too_old) and one in `recent` is already recorded. `rounds` is a  *)
(* ghost (all rounds ever settled, for the invariants; the Python ledger   *)
(* does not keep it), and `applied` is the model's identity of applied txs *)
(* that pending lists are pruned of: neither refuses a replayed round or   *)
(* withdraw, which only the window and `before` do. Withdraw (Hydra's      *)
(* decommit): a party takes part of its balance out of the open head; the *)
(* value leaves the ledger into `wd`, and each withdraw names what its     *)
(* author had withdrawn `before`, so it applies once.                      *)
(***************************************************************************)
EXTENDS Integers, FiniteSets, Sequences

CONSTANTS Parties, Byzantine, InitBalance, PoolBalance, Escrow, MaxTx,
          AgreedRounds, RoundLimit, RoundReward, SignTimeout, ContestationPeriod,
          DepositPeriod, MaxTime, Late, Closers, Faults, Window, Withdrawers

ASSUME Byzantine \subseteq Parties
ASSUME 2 * Cardinality(Byzantine) < Cardinality(Parties)
ASSUME AgreedRounds <= RoundLimit
ASSUME Window \in Nat \ {0}
\* Which environment and byzantine actions a model run explores (each config picks a
\* few, so that TLC finishes): deposit, byz_close, byz_sign, byz_vote, byz_tx, byz_req.
\* transfer: honest parties also pay each other; deposit: they deposit and recover.
\* byz_final: a byzantine party sends RoundFinals of rounds of its choosing.
ASSUME Faults \subseteq {"transfer", "deposit", "byz_close", "byz_sign", "byz_vote", "byz_tx",
                         "byz_req", "byz_final"}
\* Withdrawers: the honest parties that take part of their balance out of the open head.
ASSUME Withdrawers \subseteq Parties \ Byzantine
\* Late: the parties whose own RoundFinal comes at a time of its own (the others learn a
\* round as it happens); Closers: the honest parties that may close.
ASSUME Late \subseteq Parties /\ Closers \subseteq Parties \ Byzantine

Pool == "pool"
Out == "out"  \* where a Withdraw sends value: out of the head
NoDep == "nodep"
Accounts == Parties \cup {Pool}
Phases == {"Idle", "Initializing", "Open", "Closed", "FanoutPossible", "Final"}
Honest == Parties \ Byzantine
N == Cardinality(Parties)
Majority(S) == 2 * Cardinality(S) > N
\* The leader rotation: a fixed order of the parties (Python sorts their hotkeys).
Order == CHOOSE s \in [1..N -> Parties] : \A i, j \in 1..N : i /= j => s[i] /= s[j]
Leader(n) == Order[((n - 1) % N) + 1]
Pos(p) == CHOOSE i \in 1..N : Order[i] = p

\* Records (protocol/head_rules.py): the scheduled author is rank 0, the leader of
\* snapshot 1; round r pays RoundReward to its contributor RuleTo(r).
Rounds == 0..(RoundLimit - 1)
FakeRound == RoundLimit
NoRound == -1
Author == Order[1]
RuleTo(r) == Order[(r % N) + 1]

RECURSIVE SumOver(_, _)
SumOver(f, S) == IF S = {} THEN 0
                 ELSE LET a == CHOOSE x \in S : TRUE IN f[a] + SumOver(f, S \ {a})
Total(bal) == SumOver(bal, Accounts)

L0 == [bal |-> [a \in Accounts |-> IF a = Pool THEN PoolBalance ELSE InitBalance],
       applied |-> {}, count |-> 0, rounds |-> {}, deposited |-> 0, deps |-> {},
       below |-> 0, recent |-> {}, settled |-> 0, wd |-> [q \in Parties |-> 0]]
S0 == [n |-> 0, txs |-> <<>>, dep |-> NoDep, ledger |-> L0]
NoSn == [n |-> -1, txs |-> <<>>, dep |-> NoDep, ledger |-> L0]
CommittedTotal == N * InitBalance + PoolBalance

VARIABLES phase, committed, aborted, confirmed, pending, proposal, requestedAt, acks,
          closing, deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
          deposits, now, happened, observed, waiting, finals

vars == <<phase, committed, aborted, confirmed, pending, proposal, requestedAt, acks,
          closing, deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
          deposits, now, happened, observed, waiting, finals>>
\* What the record rules read; most actions leave it as it is.
views == <<happened, observed, waiting, finals>>

----------------------------------------------------------------------------
(* Ledger rules: every transaction conserves value.                         *)

IsRound(t) == txPool[t].round /= NoRound
IsWithdraw(t) == txPool[t].to = Out

MaxOf(S) == CHOOSE x \in S : \A y \in S : y <= x
\* head_rules.settle_in_window: the watermark jumps so that r is inside the window,
\* then moves past the contiguous settled prefix.
SettleIn(below, recent, r) ==
    LET kept == recent \cup {r}
        b0 == IF r - Window + 1 > below THEN r - Window + 1 ELSE below
        b1 == CHOOSE x \in b0..(MaxOf(kept) + 1) :
                x \notin kept /\ \A y \in b0..(x - 1) : y \in kept
    IN [below |-> b1, recent |-> {y \in kept : y >= b1}]

\* A round is refused by the window alone, a withdraw by `before` alone (no id is kept
\* for them); only a transfer by its id.
Valid(l, t) ==
    LET tx == txPool[t] IN
    IF IsRound(t) THEN /\ tx.round >= l.below /\ tx.round \notin l.recent
                       /\ l.bal[Pool] >= tx.amount
    ELSE IF IsWithdraw(t) THEN l.bal[tx.author] >= tx.amount /\ l.wd[tx.author] = tx.before
    ELSE t \notin l.applied /\ l.bal[tx.author] >= tx.amount

ApplyTx(l, t) ==
    LET tx == txPool[t]
        w == IF IsRound(t) THEN SettleIn(l.below, l.recent, tx.round)
             ELSE [below |-> l.below, recent |-> l.recent]
    IN IF IsWithdraw(t)
       THEN [l EXCEPT !.bal = [@ EXCEPT ![tx.author] = @ - tx.amount],
                      !.wd = [@ EXCEPT ![tx.author] = @ + tx.amount],
                      !.applied = @ \cup {t}, !.count = @ + 1]
       ELSE LET from == IF IsRound(t) THEN Pool ELSE tx.author IN
            [l EXCEPT !.bal = [@ EXCEPT ![from] = @ - tx.amount, ![tx.to] = @ + tx.amount],
                      !.applied = @ \cup {t},
                      !.count = @ + 1,
                      !.rounds = IF IsRound(t) THEN @ \cup {tx.round} ELSE @,
                      !.below = w.below, !.recent = w.recent,
                      !.settled = IF IsRound(t) THEN @ + 1 ELSE @]

\* The record rules (head_rules.round_result_problem): what any party can check, and
\* what only a party that observed the round itself can.
ByTheRule(t) ==
    ~IsRound(t) \/ (/\ txPool[t].round \in Rounds
                    /\ txPool[t].author = Author
                    /\ txPool[t].amount = RoundReward
                    /\ txPool[t].to = RuleTo(txPool[t].round))
SeenBy(p, t) == ~IsRound(t) \/ txPool[t].round \in observed[p]
AllByTheRule(s) == \A i \in 1..Len(s) : ByTheRule(s[i])
AllSeenBy(p, s) == \A i \in 1..Len(s) : SeenBy(p, s[i])
\* The ledger counts settlements, as protocol/head/_ledger.py does; each was in range, as every
\* party checked before signing (RewardsOnlyByRule).
SettledAgreed(l) == l.settled

\* A leader proposes, in order, the pending txs it would co-sign now that still apply.
RECURSIVE ReadyTxs(_, _, _)
ReadyTxs(p, l, s) ==
    IF s = <<>> THEN <<>>
    ELSE IF ByTheRule(Head(s)) /\ SeenBy(p, Head(s)) /\ Valid(l, Head(s))
         THEN <<Head(s)>> \o ReadyTxs(p, ApplyTx(l, Head(s)), Tail(s))
         ELSE ReadyTxs(p, l, Tail(s))

RECURSIVE ApplyAll(_, _)
ApplyAll(l, s) == IF s = <<>> THEN l ELSE ApplyAll(ApplyTx(l, Head(s)), Tail(s))

RECURSIVE AllValid(_, _)
AllValid(l, s) == s = <<>> \/ (Valid(l, Head(s)) /\ AllValid(ApplyTx(l, Head(s)), Tail(s)))

ApplyDeposit(l, d) ==
    IF d = NoDep THEN l
    ELSE [l EXCEPT !.bal[d] = @ + deposits[d].amount,
                   !.deposited = @ + deposits[d].amount,
                   !.deps = @ \cup {d}]

PendingLedger(p) == ApplyAll(confirmed[p].ledger, pending[p])

\* Deposit inclusion is counted in snapshot numbers, which every party agrees on, not
\* by any party's clock (issue 11, finding 6): snapshots up to `last` may absorb it.
Includable(d, n) == d = NoDep \/ (deposits[d].status = "pending" /\ n <= deposits[d].last)

FullySigned(s) == s = S0 \/ (s.n > 0 /\ \A q \in Parties : <<q, s>> \in signed)
KnownSnapshots == {x[2] : x \in signed} \cup {S0}
Newer(s1, s2) == IF s1.n > s2.n THEN s1 ELSE s2

VotesAgainst(t, grounds) ==
    {m.from : m \in {x \in msgs : x.type = "SlashVote" /\ x.target = t /\ x.grounds \in grounds}}
Slashed(p) == {t \in Parties : Majority(votes[p][t])}
Keepers(S) == IF Parties \ S = {} THEN Parties ELSE Parties \ S

\* Fanout: the closed ledger, plus escrow back to every unslashed party and the
\* slashed parties' escrow split among them (the remainder to the first in Order).
FinalPayouts(l, S) ==
    LET K == Keepers(S)
        forfeited == Escrow * Cardinality(Parties \ K)
        share == forfeited \div Cardinality(K)
        first == CHOOSE k \in K : \A j \in K : Pos(k) <= Pos(j)
    IN [a \in Accounts |->
          l.bal[a] + IF a \in K
                     THEN Escrow + share + (IF a = first THEN forfeited % Cardinality(K) ELSE 0)
                     ELSE 0]

Vote(p, t, grounds) == [type |-> "SlashVote", from |-> p, target |-> t, grounds |-> grounds]
Nack(p, n) == [type |-> "NackSn", from |-> p, n |-> n]
\* p holds t's signed refusal of snapshot n: t is not withholding it.
RefusedTo(p, t, n) == Nack(t, n) \in delivered[p]

Prune(p, l) == SelectSeq(pending[p], LAMBDA t : t \notin l.applied)

\* The messages a timeout or deadline judges: each honest party handles them before
\* the clock moves on (messages are faster than the timeouts).
Judged(p, m) ==
    /\ m.from /= p
    /\ \/ m.type \in {"Close", "Contest"}
       \/ /\ phase[p] = "Open"
          /\ \/ m.type = "NackSn"
             \/ m.type = "ReqSn" /\ m.s.n = confirmed[p].n + 1 /\ proposal[p] = NoSn
             \/ /\ m.type = "ReqSn" /\ proposal[p] /= NoSn /\ m.s.n = proposal[p].n
                /\ m.s /= proposal[p] /\ m.from = Leader(m.s.n)
             \/ /\ m.type = "AckSn" /\ proposal[p] /= NoSn /\ m.s = proposal[p]
                /\ m.from \notin acks[p] /\ <<m.from, m.s>> \in signed

----------------------------------------------------------------------------
Init ==
    /\ phase = [p \in Parties |-> "Idle"]
    /\ committed = {}
    /\ aborted = FALSE
    /\ confirmed = [p \in Parties |-> S0]
    /\ pending = [p \in Parties |-> <<>>]
    /\ proposal = [p \in Parties |-> NoSn]
    /\ requestedAt = [p \in Parties |-> 0]
    /\ acks = [p \in Parties |-> {}]
    /\ closing = [p \in Parties |-> NoSn]
    /\ deadline = [p \in Parties |-> 0]
    /\ votes = [p \in Parties |-> [t \in Parties |-> {}]]
    /\ payouts = [p \in Parties |-> [a \in Accounts |-> 0]]
    /\ delivered = [p \in Parties |-> {}]
    /\ msgs = {}
    /\ signed = {}
    /\ txPool = [t \in 1..MaxTx |-> [author |-> Pool, to |-> Pool, amount |-> 0, round |-> NoRound,
                                     before |-> 0]]
    /\ nextTx = 1
    /\ deposits = [p \in Parties |-> [amount |-> 0, last |-> 0, status |-> "none"]]
    /\ now = 0
    /\ happened = {}
    /\ observed = [p \in Parties |-> {}]
    /\ waiting = [p \in Parties |-> NoSn]
    /\ finals = {}

----------------------------------------------------------------------------
(* Lifecycle. Commits are seen by everyone at once (they are the head's     *)
(* opening state); the last one opens the head everywhere.                  *)

HeadInit(p) ==
    /\ phase[p] = "Idle"
    /\ phase' = [phase EXCEPT ![p] = "Initializing"]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, proposal, requestedAt, acks,
                   closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now, views>>

Commit(p) ==
    /\ phase[p] = "Initializing"
    /\ p \notin committed
    /\ ~aborted
    /\ committed' = committed \cup {p}
    /\ phase' = IF committed' = Parties
                THEN [q \in Parties |-> IF phase[q] = "Initializing" THEN "Open" ELSE phase[q]]
                ELSE phase
    /\ UNCHANGED <<aborted, confirmed, pending, proposal, requestedAt, acks, closing,
                   deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

\* Only a party that has not committed may abort: the head can then never open.
Abort(p) ==
    /\ phase[p] = "Initializing"
    /\ p \notin committed
    /\ aborted' = TRUE
    /\ phase' = [q \in Parties |-> IF phase[q] \in {"Idle", "Initializing"} THEN "Final"
                                   ELSE phase[q]]
    /\ UNCHANGED <<committed, confirmed, pending, proposal, requestedAt, acks, closing,
                   deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

----------------------------------------------------------------------------
(* Off-chain transactions and snapshots.                                    *)

\* An honest party submits a transfer of its own, or, as the scheduled author, the
\* result of a round it observed itself, by the rule; it is pending here at once.
NewTx(p) ==
    /\ phase[p] = "Open"
    /\ nextTx <= MaxTx
    /\ \E tx \in (IF "transfer" \in Faults
                  THEN [author : {p}, to : Parties \ {p}, amount : 1..2, round : {NoRound},
                        before : {0}] ELSE {})
                 \cup (IF p \in Withdrawers /\ PendingLedger(p).bal[p] >= 1
                      THEN {[author |-> p, to |-> Out, amount |-> 1, round |-> NoRound,
                             before |-> PendingLedger(p).wd[p]]} ELSE {})
                 \cup {[author |-> p, to |-> RuleTo(r), amount |-> RoundReward, round |-> r,
                        before |-> 0] :
                       r \in IF p = Author THEN observed[p] \ PendingLedger(p).rounds ELSE {}} :
         /\ txPool' = [txPool EXCEPT ![nextTx] = tx]
         /\ msgs' = msgs \cup {[type |-> "NewTx", from |-> p, tx |-> nextTx]}
    /\ pending' = [pending EXCEPT ![p] = Append(@, nextTx)]
    /\ nextTx' = nextTx + 1
    /\ UNCHANGED <<phase, committed, aborted, confirmed, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, deposits, now, views>>

\* A received transaction joins the pending list if it applies after the others and
\* its record is one this party could ever co-sign (a round not yet observed waits).
OnNewTx(p, m) ==
    /\ m.type = "NewTx"
    /\ phase[p] = "Open"
    /\ Valid(PendingLedger(p), m.tx)
    /\ ByTheRule(m.tx)
    /\ pending' = [pending EXCEPT ![p] = Append(@, m.tx)]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, proposal, requestedAt, acks,
                   closing, deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

\* The leader of the next snapshot proposes it and signs it (its own AckSn).
ReqSn(p) ==
    /\ phase[p] = "Open"
    /\ proposal[p] = NoSn
    /\ p = Leader(confirmed[p].n + 1)
    /\ \E d \in {NoDep} \cup {q \in Parties : Includable(q, confirmed[p].n + 1)
                                     /\ q \notin confirmed[p].ledger.deps} :
         LET txs == ReadyTxs(p, confirmed[p].ledger, pending[p]) IN
         /\ txs /= <<>> \/ d /= NoDep
         /\ LET s == [n |-> confirmed[p].n + 1, txs |-> txs, dep |-> d,
                      ledger |-> ApplyDeposit(ApplyAll(confirmed[p].ledger, txs), d)]
            IN /\ proposal' = [proposal EXCEPT ![p] = s]
               /\ signed' = signed \cup {<<p, s>>}
               /\ msgs' = msgs \cup {[type |-> "ReqSn", from |-> p, s |-> s],
                                     [type |-> "AckSn", from |-> p, s |-> s]}
    /\ acks' = [acks EXCEPT ![p] = {p}]
    /\ requestedAt' = [requestedAt EXCEPT ![p] = now]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, closing, deadline, votes,
                   payouts, delivered, txPool, nextTx, deposits, now, views>>

\* The checks a request must pass before a party signs it, but for its own view of
\* the rounds it settles.
Checked(p, m) ==
    /\ AllValid(confirmed[p].ledger, m.s.txs)
    /\ AllByTheRule(m.s.txs)
    /\ Includable(m.s.dep, m.s.n)
    /\ m.s.ledger = ApplyDeposit(ApplyAll(confirmed[p].ledger, m.s.txs), m.s.dep)

Sign(p, s) ==
    /\ proposal' = [proposal EXCEPT ![p] = s]
    /\ signed' = signed \cup {<<p, s>>}
    /\ acks' = [acks EXCEPT ![p] = {p}]
    /\ requestedAt' = [requestedAt EXCEPT ![p] = now]

\* A party checks the leader's request against its own confirmed ledger and its own
\* view of the rounds, and signs it; otherwise it refuses, signed (NackSn). A request
\* that only waits for the party's own RoundFinal is kept and signed once it comes.
OnReqSn(p, m) ==
    /\ m.type = "ReqSn"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ m.s.n = confirmed[p].n + 1
    /\ proposal[p] = NoSn
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF m.from /= Leader(m.s.n)
       THEN UNCHANGED <<proposal, signed, msgs, acks, requestedAt, waiting>>
       ELSE IF Checked(p, m) /\ AllSeenBy(p, m.s.txs)
       THEN /\ Sign(p, m.s)
            /\ msgs' = msgs \cup {[type |-> "AckSn", from |-> p, s |-> m.s]}
            /\ UNCHANGED waiting
       ELSE /\ msgs' = msgs \cup {Nack(p, m.s.n)}
            /\ waiting' = IF Checked(p, m) THEN [waiting EXCEPT ![p] = m.s] ELSE waiting
            /\ UNCHANGED <<proposal, signed, acks, requestedAt>>
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, closing, deadline, votes,
                   payouts, txPool, nextTx, deposits, now, happened, observed, finals>>

\* The party's own RoundFinal came: the request that waited for it is signed now.
Resign(p) ==
    /\ phase[p] = "Open"
    /\ proposal[p] = NoSn
    /\ waiting[p] /= NoSn
    /\ waiting[p].n = confirmed[p].n + 1
    /\ AllSeenBy(p, waiting[p].txs)
    /\ Sign(p, waiting[p])
    /\ msgs' = msgs \cup {[type |-> "AckSn", from |-> p, s |-> waiting[p]]}
    /\ waiting' = [waiting EXCEPT ![p] = NoSn]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, closing, deadline, votes,
                   payouts, delivered, txPool, nextTx, deposits, now, happened, observed, finals>>

\* A second, different request for the snapshot we signed: the leader equivocated. We
\* never sign two; our signed refusal tells the parties that signed the other one that
\* we are not withholding.
OnConflictingReqSn(p, m) ==
    /\ m.type = "ReqSn"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ proposal[p] /= NoSn
    /\ m.s.n = proposal[p].n
    /\ m.s /= proposal[p]
    /\ m.from = Leader(m.s.n)
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ msgs' = msgs \cup {Nack(p, m.s.n)}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, signed, txPool, nextTx,
                   deposits, now, views>>

OnNackSn(p, m) ==
    /\ m.type = "NackSn"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

\* A round of the agreed range happens, and each party's node tells its machine; the
\* honest ones that saw it publish their RoundFinal.
RoundFinal(r) ==
    /\ r \in Rounds \ happened
    /\ happened' = happened \cup {r}
    /\ observed' = [p \in Parties |-> IF p \in Late THEN observed[p] ELSE observed[p] \cup {r}]
    /\ finals' = finals \cup {<<q, r>> : q \in Honest \ Late}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now, waiting>>

Observe(p, r) ==
    /\ p \in Late
    /\ r \in happened \ observed[p]
    /\ observed' = [observed EXCEPT ![p] = @ \cup {r}]
    /\ finals' = IF p \in Byzantine THEN finals ELSE finals \cup {<<p, r>>}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now, happened, waiting>>

\* Who claimed, by a RoundFinal, that round r happened.
Claimed(r) == {q \in Parties : <<q, r>> \in finals}

\* A party that has no view of round r (it was down for the round) adopts r once a
\* strict majority of the parties other than itself claimed it (quorum N \div 2 + 1 of
\* N, round_catchup.catchup_quorum). Any id: the shell asks only for rounds its head
\* holds a record of, a narrower rule than this one.
AdoptByQuorum(p, r) ==
    /\ p \in Late \ Byzantine
    /\ r \notin observed[p]
    /\ Cardinality(Claimed(r) \ {p}) >= N \div 2 + 1
    /\ observed' = [observed EXCEPT ![p] = @ \cup {r}]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now, happened, waiting, finals>>

\* An AckSn counts only if it signs exactly the snapshot we signed; with every
\* party's, the snapshot is confirmed and its transactions leave the pending list.
\* (A message whose handling would change nothing, such as an AckSn over another
\* snapshot or a transaction that no longer applies, is left undelivered: the model
\* records delivery only where it matters.)
OnAckSn(p, m) ==
    /\ m.type = "AckSn"
    /\ phase[p] = "Open"
    /\ proposal[p] /= NoSn
    /\ m.s = proposal[p]
    /\ m.from \notin acks[p]
    /\ <<m.from, m.s>> \in signed
    /\ LET got == acks[p] \cup {m.from} IN
            IF got = Parties
            THEN /\ confirmed' = [confirmed EXCEPT ![p] = proposal[p]]
                 /\ pending' = [pending EXCEPT ![p] =
                        SelectSeq(@, LAMBDA t : t \notin proposal[p].ledger.applied)]
                 /\ proposal' = [proposal EXCEPT ![p] = NoSn]
                 /\ acks' = [acks EXCEPT ![p] = {}]
                 /\ deposits' = IF proposal[p].dep = NoDep THEN deposits
                                ELSE [deposits EXCEPT ![proposal[p].dep].status = "absorbed"]
            ELSE /\ acks' = [acks EXCEPT ![p] = got]
                 /\ UNCHANGED <<confirmed, pending, proposal, deposits>>
    /\ UNCHANGED <<phase, committed, aborted, requestedAt, closing, deadline, votes,
                   payouts, delivered, msgs, signed, txPool, nextTx, now, views>>

----------------------------------------------------------------------------
(* Deposits into an open head, and the way back for one that never lands.   *)
(* (A Deposit reaches every party at once here; Python's party that has not *)
(* seen it yet refuses, signed, and signs once it comes.)                    *)

Deposit(p) ==
    /\ "deposit" \in Faults
    /\ phase[p] = "Open"
    /\ \A q \in Parties : deposits[q].status = "none"  \* one deposit per run keeps TLC quick
    /\ deposits' = [deposits EXCEPT ![p] = [amount |-> 1, last |-> confirmed[p].n + DepositPeriod,
                                             status |-> "pending"]]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, now, views>>

\* Every honest party accepts the depositor's Recover by its own view: the head settled
\* without it, or it confirmed the deposit's last snapshot without it (each number is
\* confirmed once, with every signature, so nothing can absorb it any more).
RecoverableAt(q, d) ==
    /\ closing[q] = NoSn \/ d \notin closing[q].ledger.deps
    /\ \/ phase[q] \in {"FanoutPossible", "Final"}
       \/ confirmed[q].n >= deposits[d].last /\ d \notin confirmed[q].ledger.deps

Recover(p) ==
    /\ deposits[p].status = "pending"
    /\ \A q \in Honest : RecoverableAt(q, p)
    /\ deposits' = [deposits EXCEPT ![p].status = "recovered"]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, now, views>>

----------------------------------------------------------------------------
(* Closing, contesting, slashing.                                           *)

Excuse(p) == {m \in msgs : /\ m.type = "SlashVote" /\ m.grounds = "withheld"
                            /\ m.target \in Slashed(p) /\ m.from \in votes[p][m.target]}
Excused(closer, excuse) ==
    \E t \in Parties \ {closer} :
        Majority({v.from : v \in {x \in excuse : x.target = t /\ x.grounds = "withheld"}})

\* An honest party closes only after the agreed rounds, or with a majority vote
\* against a party that withholds its signature.
Close(p) ==
    /\ p \in Closers
    /\ phase[p] = "Open"
    /\ SettledAgreed(confirmed[p].ledger) >= AgreedRounds \/ Excused(p, Excuse(p))
    /\ phase' = [phase EXCEPT ![p] = "Closed"]
    /\ closing' = [closing EXCEPT ![p] = confirmed[p]]
    /\ deadline' = [deadline EXCEPT ![p] = now + ContestationPeriod]
    /\ msgs' = msgs \cup {[type |-> "Close", from |-> p, s |-> confirmed[p], at |-> now,
                           excuse |-> Excuse(p)]}
    /\ proposal' = [proposal EXCEPT ![p] = NoSn]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, requestedAt, acks, votes,
                   payouts, delivered, signed, txPool, nextTx, deposits, now, views>>

\* A Close on an older snapshot than ours is contested with ours; a Close before
\* the agreed rounds, without excuse, earns the closer our slash vote.
OnClose(p, m) ==
    /\ m.type = "Close"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open" \/ (phase[p] = "Closed" /\ now < deadline[p])
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF FullySigned(m.s)
       THEN LET newest == Newer(m.s, confirmed[p])
                held == IF phase[p] = "Closed" THEN Newer(closing[p], newest) ELSE newest
                early == SettledAgreed(newest.ledger) < AgreedRounds /\ ~Excused(m.from, m.excuse)
                contest == IF confirmed[p].n > m.s.n
                           THEN {[type |-> "Contest", from |-> p, s |-> confirmed[p]]} ELSE {}
                vote == IF early THEN {Vote(p, m.from, "early")} ELSE {}
            IN /\ phase' = [phase EXCEPT ![p] = "Closed"]
               /\ confirmed' = [confirmed EXCEPT ![p] = newest]
               /\ pending' = [pending EXCEPT ![p] = Prune(p, newest.ledger)]
               /\ closing' = [closing EXCEPT ![p] = held]
               /\ deadline' = [deadline EXCEPT ![p] =
                     IF phase[p] = "Closed" /\ @ < m.at + ContestationPeriod THEN @
                     ELSE m.at + ContestationPeriod]
               /\ msgs' = msgs \cup contest \cup vote
               /\ votes' = IF early THEN [votes EXCEPT ![p][m.from] = @ \cup {p}] ELSE votes
               /\ proposal' = [proposal EXCEPT ![p] = NoSn]
       ELSE UNCHANGED <<phase, confirmed, pending, closing, deadline, msgs, votes, proposal>>
    /\ UNCHANGED <<committed, aborted, requestedAt, acks, payouts, signed, txPool,
                   nextTx, deposits, now, views>>

OnContest(p, m) ==
    /\ m.type = "Contest"
    /\ m \notin delivered[p]
    /\ phase[p] \in {"Open", "Closed"}
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF /\ FullySigned(m.s)
          /\ m.s.n > confirmed[p].n \/ (phase[p] = "Closed" /\ m.s.n > closing[p].n)
          /\ phase[p] = "Open" \/ now < deadline[p]
       THEN /\ confirmed' = [confirmed EXCEPT ![p] = Newer(m.s, @)]
            /\ pending' = [pending EXCEPT ![p] = Prune(p, Newer(m.s, confirmed[p]).ledger)]
            /\ closing' = IF phase[p] = "Closed" THEN [closing EXCEPT ![p] = Newer(m.s, @)]
                          ELSE closing
       ELSE UNCHANGED <<confirmed, pending, closing>>
    /\ UNCHANGED <<phase, committed, aborted, proposal, requestedAt, acks,
                   deadline, votes, payouts, msgs, signed, txPool, nextTx, deposits, now, views>>

OnSlashVote(p, m) ==
    /\ m.type = "SlashVote"
    /\ m.from \notin votes[p][m.target]
    /\ phase[p] \in {"Open", "Closed", "FanoutPossible"}
    /\ votes' = [votes EXCEPT ![p][m.target] = @ \cup {m.from}]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, payouts, delivered, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

\* Timers: a snapshot unsigned past its timeout earns our vote against each party that
\* neither signed it nor sent its signed refusal.
Tick(p) ==
    /\ phase[p] = "Open"
    /\ proposal[p] /= NoSn
    /\ now >= requestedAt[p] + SignTimeout
    /\ \E t \in Parties \ acks[p] :
         /\ ~RefusedTo(p, t, proposal[p].n)
         /\ p \notin votes[p][t]
         /\ votes' = [votes EXCEPT ![p][t] = @ \cup {p}]
         /\ msgs' = msgs \cup {Vote(p, t, "withheld")}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, payouts, delivered, signed, txPool, nextTx,
                   deposits, now, views>>

\* A closed head past its deadline fans out. Python's Tick moves it to FanoutPossible
\* and its Fanout event (which ticks first) to Final; the node fans out as soon as it
\* may, so the model takes both steps at once.
Fanout(p) ==
    /\ phase[p] \in {"Closed", "FanoutPossible"}
    /\ now >= deadline[p]
    /\ phase' = [phase EXCEPT ![p] = "Final"]
    /\ payouts' = [payouts EXCEPT ![p] = FinalPayouts(closing[p].ledger, Slashed(p))]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, proposal, requestedAt, acks,
                   closing, deadline, votes, delivered, msgs, signed, txPool, nextTx,
                   deposits, now, views>>

\* The clock: it moves on only once every honest party handled what it judges.
Advance ==
    /\ now < MaxTime
    /\ \A p \in Honest : \A m \in msgs : Judged(p, m) => m \in delivered[p]
    /\ now' = now + 1
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, views>>

----------------------------------------------------------------------------
(* A byzantine party may also close early on any fully signed snapshot, sign *)
(* a snapshot content of its own making, or vote against anyone; it may     *)
(* withhold any message simply by not taking the action that sends it.      *)

ByzClose(b) ==
    /\ "byz_close" \in Faults
    /\ ~\E m \in msgs : m.type = "Close" /\ m.from = b  \* one close: later ones add nothing new
    /\ \E s \in KnownSnapshots :
         /\ FullySigned(s)
         /\ msgs' = msgs \cup {[type |-> "Close", from |-> b, s |-> s, at |-> now, excuse |-> {}]}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, txPool,
                   nextTx, deposits, now, views>>

ByzSign(b) ==
    /\ "byz_sign" \in Faults
    /\ \E m \in msgs, a \in Accounts :
         /\ m.type = "ReqSn"
         /\ LET forged == [m.s EXCEPT !.ledger.bal[a] = @ + 1] IN
            /\ signed' = signed \cup {<<b, forged>>}
            /\ msgs' = msgs \cup {[type |-> "AckSn", from |-> b, s |-> forged]}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, txPool, nextTx,
                   deposits, now, views>>

\* It may author a round result paying itself (an id in the range, or outside it), and,
\* as leader, request a snapshot of one of its own transactions (an honest leader's
\* request of the same number makes that an equivocation).
ByzNewTx(b) ==
    /\ "byz_tx" \in Faults
    /\ nextTx <= MaxTx
    /\ \E r \in Rounds \cup {FakeRound}, to \in {b}, amount \in {RoundReward} :
         /\ txPool' = [txPool EXCEPT ![nextTx] = [author |-> b, to |-> to, amount |-> amount,
                                                  round |-> r, before |-> 0]]
         /\ msgs' = msgs \cup {[type |-> "NewTx", from |-> b, tx |-> nextTx]}
    /\ nextTx' = nextTx + 1
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, deposits, now, views>>

ByzReqSn(b) ==
    /\ "byz_req" \in Faults
    /\ phase[b] = "Open"
    /\ b = Leader(confirmed[b].n + 1)
    /\ \E t \in {x \in 1..(nextTx - 1) : txPool[x].author = b} :
         LET s == [n |-> confirmed[b].n + 1, txs |-> <<t>>, dep |-> NoDep,
                   ledger |-> ApplyTx(confirmed[b].ledger, t)]
         IN /\ Valid(confirmed[b].ledger, t)
            /\ msgs' = msgs \cup {[type |-> "ReqSn", from |-> b, s |-> s]}
            /\ signed' = signed \cup {<<b, s>>}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, txPool, nextTx,
                   deposits, now, views>>

\* It may claim any round, happened or not, or one outside the range.
ByzFinal(b) ==
    /\ "byz_final" \in Faults
    /\ \E r \in Rounds \cup {FakeRound} :
         /\ <<b, r>> \notin finals
         /\ finals' = finals \cup {<<b, r>>}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now, happened, observed, waiting>>

ByzVote(b) ==
    /\ "byz_vote" \in Faults
    /\ \E t \in Parties \ {b}, g \in {"early", "withheld"} : msgs' = msgs \cup {Vote(b, t, g)}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, txPool,
                   nextTx, deposits, now, views>>

----------------------------------------------------------------------------
Next ==
    \/ \E p \in Parties :
         \/ HeadInit(p) \/ Commit(p) \/ Abort(p) \/ NewTx(p) \/ ReqSn(p)
         \/ Deposit(p) \/ Recover(p) \/ Close(p) \/ Tick(p) \/ Fanout(p) \/ Resign(p)
    \/ \E p \in Parties, m \in msgs : m.from /= p /\ (  \* a party's own messages are applied as sent
         \/ OnNewTx(p, m) \/ OnReqSn(p, m) \/ OnConflictingReqSn(p, m) \/ OnAckSn(p, m)
         \/ OnNackSn(p, m)
         \/ OnClose(p, m) \/ OnContest(p, m) \/ OnSlashVote(p, m))
    \/ \E r \in Rounds : RoundFinal(r)
    \/ \E p \in Late, r \in Rounds : Observe(p, r)
    \/ \E p \in Late, r \in Rounds \cup {FakeRound} : AdoptByQuorum(p, r)
    \/ \E b \in Byzantine : ByzClose(b) \/ ByzSign(b) \/ ByzVote(b) \/ ByzNewTx(b) \/ ByzReqSn(b)
                           \/ ByzFinal(b)
    \/ Advance

Spec == Init /\ [][Next]_vars

----------------------------------------------------------------------------
(* Invariants; protocol/head/_invariants.py has a function of each name.    *)

TypeOK ==
    /\ phase \in [Parties -> Phases]
    /\ committed \subseteq Parties
    /\ aborted \in BOOLEAN
    /\ now \in 0..MaxTime
    /\ nextTx \in 1..(MaxTx + 1)
    /\ \A p \in Parties :
         /\ confirmed[p].n \in Nat
         /\ votes[p] \in [Parties -> SUBSET Parties]
         /\ acks[p] \subseteq Parties
         /\ deposits[p].status \in {"none", "pending", "absorbed", "recovered"}
         /\ observed[p] \subseteq happened
    /\ happened \subseteq Rounds
    /\ finals \subseteq Parties \X (Rounds \cup {FakeRound})

\* Every ledger an honest party holds contains exactly what was committed plus the
\* deposits it absorbed, less what was withdrawn (committed + deposits = ledger +
\* withdrawn), and fanout pays out the ledger plus all escrow.
Withdrawn(l) == SumOver(l.wd, Parties)
ValueConserved ==
    \A p \in Honest :
        /\ Total(confirmed[p].ledger.bal) + Withdrawn(confirmed[p].ledger)
             = CommittedTotal + confirmed[p].ledger.deposited
        /\ closing[p] /= NoSn =>
             Total(closing[p].ledger.bal) + Withdrawn(closing[p].ledger)
               = CommittedTotal + closing[p].ledger.deposited
        /\ (phase[p] = "Final" /\ ~aborted) =>
             Total(payouts[p]) = Total(closing[p].ledger.bal) + N * Escrow

OnlyFullySignedSnapshotCloses ==
    \A p \in Honest : closing[p] /= NoSn => FullySigned(closing[p])

ContestEndsOnNewestConfirmed ==
    \A p, q \in Honest :
        (phase[p] \in {"FanoutPossible", "Final"} /\ ~aborted) => closing[p].n >= confirmed[q].n

NoDoubleSpend ==
    \A p \in Honest :
        \A l \in {confirmed[p].ledger, PendingLedger(p)}
                   \cup (IF closing[p] /= NoSn THEN {closing[p].ledger} ELSE {}) :
            /\ \A a \in Accounts : l.bal[a] >= 0
            /\ l.count = Cardinality(l.applied)
            \* The window settles no round twice: each settlement added a new id.
            /\ l.settled = Cardinality(l.rounds)
            /\ l.recent \subseteq l.rounds /\ \A r \in l.recent : l.below <= r /\ r < l.below + Window
            /\ \A q \in Parties : l.wd[q] >= 0
            /\ \A d \in Parties : deposits[d].status = "recovered" => d \notin l.deps

\* Escrow is forfeited only by a party that a strict majority voted against, by
\* SlashVote messages that exist.
SlashNeedsMajority ==
    \A p \in Honest :
        /\ \A t \in Parties : votes[p][t] \subseteq VotesAgainst(t, {"early", "withheld"})
        /\ (phase[p] = "Final" /\ ~aborted) =>
             \A t \in Parties :
                payouts[p][t] < closing[p].ledger.bal[t] + Escrow =>
                    Majority(VotesAgainst(t, {"early", "withheld"}) \ {t})

\* Rewards are paid only for rounds that happened, that this party observed itself or
\* adopted, that a strict majority of the parties claimed (their RoundFinal), in the
\* agreed range, and only what the rule pays (issue 11, finding 2).
RewardsOnlyByRule ==
    \A p \in Honest :
        \A l \in {confirmed[p].ledger} \cup (IF closing[p] /= NoSn THEN {closing[p].ledger} ELSE {}) :
            /\ l.rounds \subseteq happened \cap observed[p]
            /\ \A r \in l.rounds : Majority(Claimed(r))
            /\ l.bal[Pool] = PoolBalance - RoundReward * Cardinality(l.rounds)

\* No honest party is slashed: it never closes early, and it signs every snapshot in
\* time or says, signed, why it does not.
NoHonestSlashed ==
    \A p, q \in Honest : ~Majority(votes[p][q])

=============================================================================
