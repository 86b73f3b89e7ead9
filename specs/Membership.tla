----------------------------- MODULE Membership -----------------------------
(***************************************************************************)
(* Joining and leaving a running mesh (issue 15): the membership records  *)
(* of the settlement head. protocol/admission.py holds the admission rules *)
(* (AdmissionOK here is admission_problem there), protocol/member_book.py  *)
(* the records (Admit, Leave, Slash here are Admit, Leave, MemberSlash     *)
(* there), protocol/inbound.py the rule that a stranger's message changes  *)
(* nothing (Speak). tests/test_membership_explore.py checks the same      *)
(* invariants, by name, on the Python ledger in every state it reaches.    *)
(*                                                                          *)
(* Abstractions. A record takes effect when a snapshot that every validator *)
(* signed confirms it (specs/Head.tla models the signing; here a record is *)
(* one step). Requests are signed: `requests` is every request ever        *)
(* published, so a replay is Admit of an old element. A founding member's  *)
(* stake is the head's commit escrow (Head.tla), not modelled here: the    *)
(* escrow below is admitted members' stake only. Rounds settle (`rounds`,  *)
(* the ledger's rounds_settled), which is the clock of the cool-down and   *)
(* of the early-leave penalty: no party's own clock is involved.           *)
(*                                                                          *)
(* Slashing (protocol/offences.py): each validator keeps its own view of   *)
(* whom each of its rounds named (`named`, NameOffender), frozen once the  *)
(* round settled; a slash cites a round and is co-signed by a validator    *)
(* only if its own view of that round names the member, so it takes       *)
(* effect only where every validator's does (SlashOnlyOnEvidence).         *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS
    Founding,    \* the genesis members
    Strangers,   \* hotkeys that may ask to join
    Stakes,      \* the stakes a join request may offer
    MinStake,    \* the policy's minimum (one role)
    Cap,         \* most members at once
    Cooldown,    \* settled rounds before a slashed hotkey may join again
    MinRounds,   \* leaving sooner forfeits Penalty (at most the escrow)
    Penalty,
    MaxRounds,   \* bounds for TLC
    MaxJoins,
    Validators   \* the head's parties, each with its own round views

Hotkeys == Founding \cup Strangers

VARIABLES
    member,      \* hotkey -> in the directory now
    escrow,      \* hotkey -> stake held in the head for it
    locked,      \* ghost: the stake its admission locked
    released,    \* hotkey -> escrow released to it by Leave, ever
    pool,        \* what penalties and slashes gave the reward pool
    joins,       \* hotkey -> admissions, ever (the requests' joins_before)
    slashed,     \* hotkeys slashed at least once
    slashedAt,   \* hotkey -> rounds when last slashed
    admittedAt,  \* hotkey -> rounds when last admitted
    rounds,      \* settled rounds
    staked,      \* stake that entered the head by admissions, ever
    requests,    \* signed join requests ever published: <<hotkey, stake, joins_before>>
    heard,       \* ghost: senders whose messages a node acted on
    stateAtSpeak, \* ghost: TRUE while every stranger's message left the state alone
    named,       \* validator -> <<hotkey, round>> its own rounds named (OffenceViews)
    slashedFor   \* ghost: <<hotkey, round>> of every slash that took effect

vars == <<member, escrow, locked, released, pool, joins, slashed, slashedAt, admittedAt, rounds,
          staked, requests, heard, stateAtSpeak, named, slashedFor>>
ledger == <<member, escrow, locked, released, pool, joins, slashed, slashedAt, admittedAt, rounds,
            staked, requests>>

RECURSIVE SumOver(_, _)
SumOver(f, S) == IF S = {} THEN 0
                 ELSE LET x == CHOOSE x \in S : TRUE IN f[x] + SumOver(f, S \ {x})

Members == {h \in Hotkeys : member[h]}

Init ==
    /\ member = [h \in Hotkeys |-> h \in Founding]
    /\ escrow = [h \in Hotkeys |-> 0]
    /\ locked = [h \in Hotkeys |-> 0]
    /\ released = [h \in Hotkeys |-> 0]
    /\ pool = 0
    /\ joins = [h \in Hotkeys |-> 0]
    /\ slashed = {}
    /\ slashedAt = [h \in Hotkeys |-> 0]
    /\ admittedAt = [h \in Hotkeys |-> 0]
    /\ rounds = 0
    /\ staked = 0
    /\ requests = {}
    /\ heard = {}
    /\ stateAtSpeak = TRUE
    /\ named = [v \in Validators |-> {}]
    /\ slashedFor = {}

\* Anyone not a member signs a join request with the stake it chooses and its current
\* admission count (node/membership.py join_request); a replay is an old element of
\* `requests` offered again to Admit, which is how an attacker's copy is modelled.
RequestJoin(h, s, j) ==
    /\ ~member[h]
    /\ j = joins[h] /\ j <= MaxJoins
    /\ requests' = requests \cup {<<h, s, j>>}
    /\ UNCHANGED <<member, escrow, locked, released, pool, joins, slashed, slashedAt, admittedAt,
                   rounds, staked, heard, stateAtSpeak, named, slashedFor>>

\* protocol/admission.py admission_problem = None
AdmissionOK(h, s, j) ==
    /\ ~member[h]
    /\ j = joins[h]                    \* stale_join: a replay names a passed count
    /\ s >= MinStake                   \* stake_too_low
    /\ Cardinality(Members) < Cap      \* member_cap
    /\ h \in slashed => rounds - slashedAt[h] >= Cooldown   \* slashed_cooldown

\* The validators record an admission and co-sign it: the stake enters into escrow.
Admit(h, s, j) ==
    /\ <<h, s, j>> \in requests
    /\ AdmissionOK(h, s, j)
    /\ member' = [member EXCEPT ![h] = TRUE]
    /\ escrow' = [escrow EXCEPT ![h] = s]
    /\ locked' = [locked EXCEPT ![h] = s]
    /\ joins' = [joins EXCEPT ![h] = j + 1]
    /\ admittedAt' = [admittedAt EXCEPT ![h] = rounds]
    /\ staked' = staked + s
    /\ UNCHANGED <<released, pool, slashed, slashedAt, rounds, requests, heard, stateAtSpeak, named,
                   slashedFor>>

\* protocol/admission.py leave_penalty
Due(h) == IF rounds - admittedAt[h] >= MinRounds THEN 0
          ELSE IF escrow[h] < Penalty THEN escrow[h] ELSE Penalty

\* A member's signed leave, recorded: it is no longer a member from this snapshot on
\* (the next round opens without it) and its escrow less the penalty is released.
Leave(h) ==
    /\ member[h]
    /\ member' = [member EXCEPT ![h] = FALSE]
    /\ released' = [released EXCEPT ![h] = released[h] + escrow[h] - Due(h)]
    /\ pool' = pool + Due(h)
    /\ escrow' = [escrow EXCEPT ![h] = 0]
    /\ UNCHANGED <<locked, joins, slashed, slashedAt, admittedAt, rounds, staked, requests, heard,
                   stateAtSpeak, named, slashedFor>>

\* Validator v's round now running (round `rounds`) names member h: its contribution was
\* rejected for what its bytes prove, or its slot proof was out of range (named_offenders).
\* Views differ between validators only where a round's inputs did (the model lets them).
NameOffender(v, h) ==
    /\ member[h] /\ h \in Strangers /\ rounds < MaxRounds
    /\ named' = [named EXCEPT ![v] = named[v] \cup {<<h, rounds>>}]
    /\ UNCHANGED <<member, escrow, locked, released, pool, joins, slashed, slashedAt, admittedAt,
                   rounds, staked, requests, heard, stateAtSpeak, slashedFor>>

\* A member slash citing round r, co-signed by every validator (a snapshot needs all), each
\* only if its own round r named h (slash_evidence_problem): its escrow goes to the pool.
Slash(h, r) ==
    /\ member[h]
    /\ \A v \in Validators : <<h, r>> \in named[v]
    /\ slashedFor' = slashedFor \cup {<<h, r>>}
    /\ member' = [member EXCEPT ![h] = FALSE]
    /\ pool' = pool + escrow[h]
    /\ escrow' = [escrow EXCEPT ![h] = 0]
    /\ slashed' = slashed \cup {h}
    /\ slashedAt' = [slashedAt EXCEPT ![h] = rounds]
    /\ UNCHANGED <<locked, released, joins, admittedAt, rounds, staked, requests, heard, stateAtSpeak,
                   named>>

SettleRound ==
    /\ rounds < MaxRounds
    /\ rounds' = rounds + 1
    /\ UNCHANGED <<member, escrow, locked, released, pool, joins, slashed, slashedAt, admittedAt,
                   staked, requests, heard, stateAtSpeak, named, slashedFor>>

\* Any signed message other than a join request (protocol/inbound.py): a member's is acted
\* on; a stranger's is IGNOREd (unknown_signer), changing nothing, nor charging its relay.
Speak(h) ==
    /\ heard' = IF member[h] THEN heard \cup {h} ELSE heard
    /\ stateAtSpeak' = (stateAtSpeak /\ (member[h] \/ heard' = heard))
    /\ UNCHANGED <<ledger, named, slashedFor>>

Next ==
    \/ \E h \in Hotkeys, s \in Stakes, j \in 0..MaxJoins : RequestJoin(h, s, j) \/ Admit(h, s, j)
    \/ \E h \in Hotkeys : Leave(h) \/ Speak(h) \/ \E r \in 0..MaxRounds : Slash(h, r)
    \/ \E v \in Validators, h \in Hotkeys : NameOffender(v, h)
    \/ SettleRound

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
TypeOK ==
    /\ member \in [Hotkeys -> BOOLEAN]
    /\ escrow \in [Hotkeys -> Nat] /\ released \in [Hotkeys -> Nat] /\ pool \in Nat
    /\ joins \in [Hotkeys -> 0..(MaxJoins + 1)]
    /\ slashed \subseteq Hotkeys

\* A stranger's message never changes state, and only members are acted on.
NonMemberNoEffect == stateAtSpeak /\ heard \subseteq (Founding \cup {h \in Hotkeys : joins[h] > 0})

\* Every unit of stake that entered is in escrow, released, or in the pool.
EscrowConserved == SumOver(escrow, Hotkeys) + SumOver(released, Hotkeys) + pool = staked

\* An admitted member's deposit stays locked, whole, until it leaves or is slashed.
DepositLocked ==
    \A h \in Hotkeys :
        /\ (member[h] /\ joins[h] > 0) => escrow[h] = locked[h]
        /\ ~member[h] => escrow[h] = 0

CapRespected == Cardinality(Members) <= Cap \/ Cardinality(Founding) > Cap

CooldownRespected == \A h \in slashed : member[h] => admittedAt[h] - slashedAt[h] >= Cooldown

\* A slash took effect only on a round that every validator's own view named it in.
SlashOnlyOnEvidence == \A p \in slashedFor : \A v \in Validators : p \in named[v]

\* Each admission used a request of its own: a replayed one admits nobody twice.
NoReplayedAdmission == \A h \in Hotkeys : joins[h] <= Cardinality({r \in requests : r[1] = h})
=============================================================================
