-------------------------------- MODULE Head --------------------------------
(***************************************************************************)
(* The settlement head: a multi-signed state channel among the validators, *)
(* after the Hydra Head protocol (Chakravarty et al., FC 2021) and the      *)
(* lifecycle hydra-node exposes: Idle -> Initializing -> Open -> Closed ->  *)
(* FanoutPossible -> Final.                                                 *)
(*                                                                          *)
(* protocol/head.py implements it: a local command or a received message   *)
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
(* `now`; the clock only advances once every honest party has handled all *)
(* Close and Contest messages (messages are faster than the contestation   *)
(* period, the assumption Hydra makes too). Restart/Sync are persistence   *)
(* and are left to the Python tests.                                        *)
(***************************************************************************)
EXTENDS Integers, FiniteSets, Sequences

CONSTANTS Parties, Byzantine, InitBalance, PoolBalance, Escrow, MaxTx,
          AgreedRounds, SignTimeout, ContestationPeriod, DepositPeriod, MaxTime

ASSUME Byzantine \subseteq Parties
ASSUME 2 * Cardinality(Byzantine) < Cardinality(Parties)

Pool == "pool"
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

RECURSIVE SumOver(_, _)
SumOver(f, S) == IF S = {} THEN 0
                 ELSE LET a == CHOOSE x \in S : TRUE IN f[a] + SumOver(f, S \ {a})
Total(bal) == SumOver(bal, Accounts)

L0 == [bal |-> [a \in Accounts |-> IF a = Pool THEN PoolBalance ELSE InitBalance],
       applied |-> {}, count |-> 0, rounds |-> 0, deposited |-> 0, deps |-> {}]
S0 == [n |-> 0, txs |-> <<>>, dep |-> NoDep, ledger |-> L0]
NoSn == [n |-> -1, txs |-> <<>>, dep |-> NoDep, ledger |-> L0]
CommittedTotal == N * InitBalance + PoolBalance

VARIABLES phase, committed, aborted, confirmed, pending, proposal, requestedAt, acks,
          closing, deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
          deposits, now

vars == <<phase, committed, aborted, confirmed, pending, proposal, requestedAt, acks,
          closing, deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
          deposits, now>>

----------------------------------------------------------------------------
(* Ledger rules: every transaction conserves value.                         *)

Valid(l, t) ==
    /\ t \notin l.applied
    /\ IF txPool[t].round THEN l.bal[Pool] >= txPool[t].amount
                          ELSE l.bal[txPool[t].author] >= txPool[t].amount

ApplyTx(l, t) ==
    LET tx == txPool[t]
        from == IF tx.round THEN Pool ELSE tx.author
    IN [l EXCEPT !.bal = [@ EXCEPT ![from] = @ - tx.amount, ![tx.to] = @ + tx.amount],
                 !.applied = @ \cup {t},
                 !.count = @ + 1,
                 !.rounds = IF tx.round THEN @ + 1 ELSE @]

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

Includable(d) == d = NoDep \/ (deposits[d].status = "pending" /\ now < deposits[d].deadline)

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
    /\ txPool = [t \in 1..MaxTx |-> [author |-> Pool, to |-> Pool, amount |-> 0, round |-> FALSE]]
    /\ nextTx = 1
    /\ deposits = [p \in Parties |-> [amount |-> 0, deadline |-> 0, status |-> "none"]]
    /\ now = 0

----------------------------------------------------------------------------
(* Lifecycle. Commits are seen by everyone at once (they are the head's     *)
(* opening state); the last one opens the head everywhere.                  *)

HeadInit(p) ==
    /\ phase[p] = "Idle"
    /\ phase' = [phase EXCEPT ![p] = "Initializing"]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, proposal, requestedAt, acks,
                   closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits, now>>

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
                   deposits, now>>

\* Only a party that has not committed may abort: the head can then never open.
Abort(p) ==
    /\ phase[p] = "Initializing"
    /\ p \notin committed
    /\ aborted' = TRUE
    /\ phase' = [q \in Parties |-> IF phase[q] \in {"Idle", "Initializing"} THEN "Final"
                                   ELSE phase[q]]
    /\ UNCHANGED <<committed, confirmed, pending, proposal, requestedAt, acks, closing,
                   deadline, votes, payouts, delivered, msgs, signed, txPool, nextTx,
                   deposits, now>>

----------------------------------------------------------------------------
(* Off-chain transactions and snapshots.                                    *)

NewTx(p) ==
    /\ phase[p] = "Open"
    /\ nextTx <= MaxTx
    /\ \E to \in Parties, amount \in 1..2, round \in BOOLEAN :
         LET tx == [author |-> p, to |-> to, amount |-> amount, round |-> round] IN
         /\ txPool' = [txPool EXCEPT ![nextTx] = tx]
         /\ msgs' = msgs \cup {[type |-> "NewTx", from |-> p, tx |-> nextTx]}
    /\ nextTx' = nextTx + 1
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, deposits, now>>

\* A received transaction joins the pending list if it applies after the others.
OnNewTx(p, m) ==
    /\ m.type = "NewTx"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ pending' = IF Valid(PendingLedger(p), m.tx)
                  THEN [pending EXCEPT ![p] = Append(@, m.tx)] ELSE pending
    /\ UNCHANGED <<phase, committed, aborted, confirmed, proposal, requestedAt, acks,
                   closing, deadline, votes, payouts, msgs, signed, txPool, nextTx,
                   deposits, now>>

\* The leader of the next snapshot proposes it and signs it (its own AckSn).
ReqSn(p) ==
    /\ phase[p] = "Open"
    /\ proposal[p] = NoSn
    /\ p = Leader(confirmed[p].n + 1)
    /\ \E d \in {NoDep} \cup {q \in Parties : Includable(q) /\ q \notin confirmed[p].ledger.deps} :
         /\ pending[p] /= <<>> \/ d /= NoDep
         /\ LET s == [n |-> confirmed[p].n + 1, txs |-> pending[p], dep |-> d,
                      ledger |-> ApplyDeposit(ApplyAll(confirmed[p].ledger, pending[p]), d)]
            IN /\ proposal' = [proposal EXCEPT ![p] = s]
               /\ signed' = signed \cup {<<p, s>>}
               /\ msgs' = msgs \cup {[type |-> "ReqSn", from |-> p, s |-> s],
                                     [type |-> "AckSn", from |-> p, s |-> s]}
    /\ acks' = [acks EXCEPT ![p] = {p}]
    /\ requestedAt' = [requestedAt EXCEPT ![p] = now]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, closing, deadline, votes,
                   payouts, delivered, txPool, nextTx, deposits, now>>

\* A party checks the leader's request against its own confirmed ledger and signs it.
OnReqSn(p, m) ==
    /\ m.type = "ReqSn"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ m.s.n = confirmed[p].n + 1
    /\ proposal[p] = NoSn
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF /\ m.from = Leader(m.s.n)
          /\ AllValid(confirmed[p].ledger, m.s.txs)
          /\ Includable(m.s.dep)
          /\ m.s.ledger = ApplyDeposit(ApplyAll(confirmed[p].ledger, m.s.txs), m.s.dep)
       THEN /\ proposal' = [proposal EXCEPT ![p] = m.s]
            /\ signed' = signed \cup {<<p, m.s>>}
            /\ msgs' = msgs \cup {[type |-> "AckSn", from |-> p, s |-> m.s]}
            /\ acks' = [acks EXCEPT ![p] = {p}]
            /\ requestedAt' = [requestedAt EXCEPT ![p] = now]
       ELSE UNCHANGED <<proposal, signed, msgs, acks, requestedAt>>
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, closing, deadline, votes,
                   payouts, txPool, nextTx, deposits, now>>

\* An AckSn counts only if it signs exactly the snapshot we signed; with every
\* party's, the snapshot is confirmed and its transactions leave the pending list.
OnAckSn(p, m) ==
    /\ m.type = "AckSn"
    /\ m \notin delivered[p]
    /\ phase[p] = "Open"
    /\ proposal[p] /= NoSn
    /\ m.s.n = proposal[p].n
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF m.s = proposal[p] /\ <<m.from, m.s>> \in signed
       THEN LET got == acks[p] \cup {m.from} IN
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
       ELSE UNCHANGED <<confirmed, pending, proposal, acks, deposits>>
    /\ UNCHANGED <<phase, committed, aborted, requestedAt, closing, deadline, votes,
                   payouts, msgs, signed, txPool, nextTx, now>>

----------------------------------------------------------------------------
(* Deposits into an open head, and the way back for one that never lands.   *)

Deposit(p) ==
    /\ phase[p] = "Open"
    /\ deposits[p].status = "none"
    /\ deposits' = [deposits EXCEPT ![p] = [amount |-> 1, deadline |-> now + DepositPeriod,
                                             status |-> "pending"]]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, now>>

SignedDeposit(q, d) == \E x \in signed : x[1] = q /\ x[2].dep = d

Recover(p) ==
    /\ deposits[p].status = "pending"
    /\ now >= deposits[p].deadline
    /\ \A q \in Honest :
         /\ p \notin confirmed[q].ledger.deps
         /\ \/ ~SignedDeposit(q, p)
            \/ phase[q] \in {"FanoutPossible", "Final"} /\ p \notin closing[q].ledger.deps
    /\ deposits' = [deposits EXCEPT ![p].status = "recovered"]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, now>>

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
    /\ p \in Honest
    /\ phase[p] = "Open"
    /\ confirmed[p].ledger.rounds >= AgreedRounds \/ Excused(p, Excuse(p))
    /\ phase' = [phase EXCEPT ![p] = "Closed"]
    /\ closing' = [closing EXCEPT ![p] = confirmed[p]]
    /\ deadline' = [deadline EXCEPT ![p] = now + ContestationPeriod]
    /\ msgs' = msgs \cup {[type |-> "Close", from |-> p, s |-> confirmed[p], at |-> now,
                           excuse |-> Excuse(p)]}
    /\ proposal' = [proposal EXCEPT ![p] = NoSn]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, requestedAt, acks, votes,
                   payouts, delivered, signed, txPool, nextTx, deposits, now>>

\* A Close on an older snapshot than ours is contested with ours; a Close before
\* the agreed rounds, without excuse, earns the closer our slash vote.
OnClose(p, m) ==
    /\ m.type = "Close"
    /\ m \notin delivered[p]
    /\ phase[p] \in {"Open", "Closed"}
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF FullySigned(m.s)
       THEN LET newest == Newer(m.s, confirmed[p])
                held == IF phase[p] = "Closed" THEN Newer(closing[p], newest) ELSE newest
                early == newest.ledger.rounds < AgreedRounds /\ ~Excused(m.from, m.excuse)
                contest == IF confirmed[p].n > m.s.n
                           THEN {[type |-> "Contest", from |-> p, s |-> confirmed[p]]} ELSE {}
                vote == IF early THEN {Vote(p, m.from, "early")} ELSE {}
            IN /\ phase' = [phase EXCEPT ![p] = "Closed"]
               /\ confirmed' = [confirmed EXCEPT ![p] = newest]
               /\ closing' = [closing EXCEPT ![p] = held]
               /\ deadline' = [deadline EXCEPT ![p] =
                     IF phase[p] = "Closed" /\ @ < m.at + ContestationPeriod THEN @
                     ELSE m.at + ContestationPeriod]
               /\ msgs' = msgs \cup contest \cup vote
               /\ votes' = IF early THEN [votes EXCEPT ![p][m.from] = @ \cup {p}] ELSE votes
               /\ proposal' = [proposal EXCEPT ![p] = NoSn]
       ELSE UNCHANGED <<phase, confirmed, closing, deadline, msgs, votes, proposal>>
    /\ UNCHANGED <<committed, aborted, pending, requestedAt, acks, payouts, signed, txPool,
                   nextTx, deposits, now>>

OnContest(p, m) ==
    /\ m.type = "Contest"
    /\ m \notin delivered[p]
    /\ phase[p] \in {"Open", "Closed"}
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ IF /\ FullySigned(m.s)
          /\ m.s.n > confirmed[p].n \/ (phase[p] = "Closed" /\ m.s.n > closing[p].n)
          /\ phase[p] = "Open" \/ now < deadline[p]
       THEN /\ confirmed' = [confirmed EXCEPT ![p] = Newer(m.s, @)]
            /\ closing' = IF phase[p] = "Closed" THEN [closing EXCEPT ![p] = Newer(m.s, @)]
                          ELSE closing
       ELSE UNCHANGED <<confirmed, closing>>
    /\ UNCHANGED <<phase, committed, aborted, pending, proposal, requestedAt, acks,
                   deadline, votes, payouts, msgs, signed, txPool, nextTx, deposits, now>>

OnSlashVote(p, m) ==
    /\ m.type = "SlashVote"
    /\ m \notin delivered[p]
    /\ phase[p] \in {"Open", "Closed", "FanoutPossible"}
    /\ delivered' = [delivered EXCEPT ![p] = @ \cup {m}]
    /\ votes' = [votes EXCEPT ![p][m.target] = @ \cup {m.from}]
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, payouts, msgs, signed, txPool, nextTx, deposits,
                   now>>

\* Timers: a snapshot unsigned past its timeout earns the missing signers our vote;
\* a closed head past its deadline may fan out.
Tick(p) ==
    \/ /\ phase[p] = "Open"
       /\ proposal[p] /= NoSn
       /\ now >= requestedAt[p] + SignTimeout
       /\ \E t \in Parties \ acks[p] :
            /\ p \notin votes[p][t]
            /\ votes' = [votes EXCEPT ![p][t] = @ \cup {p}]
            /\ msgs' = msgs \cup {Vote(p, t, "withheld")}
       /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                      acks, closing, deadline, payouts, delivered, signed, txPool, nextTx,
                      deposits, now>>
    \/ /\ phase[p] = "Closed"
       /\ now >= deadline[p]
       /\ phase' = [phase EXCEPT ![p] = "FanoutPossible"]
       /\ UNCHANGED <<committed, aborted, confirmed, pending, proposal, requestedAt, acks,
                      closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                      nextTx, deposits, now>>

Fanout(p) ==
    /\ phase[p] = "FanoutPossible"
    /\ phase' = [phase EXCEPT ![p] = "Final"]
    /\ payouts' = [payouts EXCEPT ![p] = FinalPayouts(closing[p].ledger, Slashed(p))]
    /\ UNCHANGED <<committed, aborted, confirmed, pending, proposal, requestedAt, acks,
                   closing, deadline, votes, delivered, msgs, signed, txPool, nextTx,
                   deposits, now>>

\* The clock: it moves on only once every honest party handled every Close and Contest.
Advance ==
    /\ now < MaxTime
    /\ \A p \in Honest : \A m \in msgs : m.type \in {"Close", "Contest"} => m \in delivered[p]
    /\ now' = now + 1
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, msgs, signed, txPool,
                   nextTx, deposits>>

----------------------------------------------------------------------------
(* A byzantine party may also close early on any fully signed snapshot, sign *)
(* a snapshot content of its own making, or vote against anyone; it may     *)
(* withhold any message simply by not taking the action that sends it.      *)

ByzClose(b) ==
    /\ \E s \in KnownSnapshots :
         /\ FullySigned(s)
         /\ msgs' = msgs \cup {[type |-> "Close", from |-> b, s |-> s, at |-> now, excuse |-> {}]}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, txPool,
                   nextTx, deposits, now>>

ByzSign(b) ==
    /\ \E m \in msgs, a \in Accounts :
         /\ m.type = "ReqSn"
         /\ LET forged == [m.s EXCEPT !.ledger.bal[a] = @ + 1] IN
            /\ signed' = signed \cup {<<b, forged>>}
            /\ msgs' = msgs \cup {[type |-> "AckSn", from |-> b, s |-> forged]}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, txPool, nextTx,
                   deposits, now>>

ByzVote(b) ==
    /\ \E t \in Parties \ {b}, g \in {"early", "withheld"} : msgs' = msgs \cup {Vote(b, t, g)}
    /\ UNCHANGED <<phase, committed, aborted, confirmed, pending, proposal, requestedAt,
                   acks, closing, deadline, votes, payouts, delivered, signed, txPool,
                   nextTx, deposits, now>>

----------------------------------------------------------------------------
Next ==
    \/ \E p \in Parties :
         \/ HeadInit(p) \/ Commit(p) \/ Abort(p) \/ NewTx(p) \/ ReqSn(p)
         \/ Deposit(p) \/ Recover(p) \/ Close(p) \/ Tick(p) \/ Fanout(p)
    \/ \E p \in Parties, m \in msgs :
         \/ OnNewTx(p, m) \/ OnReqSn(p, m) \/ OnAckSn(p, m)
         \/ OnClose(p, m) \/ OnContest(p, m) \/ OnSlashVote(p, m)
    \/ \E b \in Byzantine : ByzClose(b) \/ ByzSign(b) \/ ByzVote(b)
    \/ Advance

Spec == Init /\ [][Next]_vars

----------------------------------------------------------------------------
(* Invariants; protocol/head.py has a function of each name.                *)

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

\* Every ledger an honest party holds contains exactly what was committed plus the
\* deposits it absorbed, and fanout pays out that plus all escrow.
ValueConserved ==
    \A p \in Honest :
        /\ Total(confirmed[p].ledger.bal) = CommittedTotal + confirmed[p].ledger.deposited
        /\ closing[p] /= NoSn =>
             Total(closing[p].ledger.bal) = CommittedTotal + closing[p].ledger.deposited
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

=============================================================================
