-------------------------- MODULE SecureAggregation --------------------------
(***************************************************************************)
(* Secure-aggregation rounds: the package protocol/aggregation/.           *)
(*                                                                         *)
(* Each action is a method of a Python machine under the same name in      *)
(* snake_case (OpenRound = ValidatorRound.open_round, JoinRound =          *)
(* TrainerRound.join_round and CommitteeRound.join_round, ...), except the *)
(* environment's Tick, NextRound and Done. The invariants are Python check *)
(* functions of the same names.                                            *)
(*                                                                         *)
(* Abstractions. A contribution is named by its trainer (one per trainer   *)
(* and round); an aggregate id, the sha256 of the product of the accepted  *)
(* ciphertexts in trainer order, is named by the set of its trainers; an   *)
(* adapter by the sequence of sets applied since genesis. Verification is  *)
(* deterministic: a cheater's proof never verifies, a bad member's partial *)
(* never verifies. Messages are never forged (Epistula) but may be lost or *)
(* late: a receive action may simply never happen. Validators are honest;  *)
(* trainers and committee members may drop out at any point.               *)
(* The adversary (ByzOpenRound): a validator key in Byzantine, the         *)
(* scheduled Opener's or another's, gossips a RoundOpen with any           *)
(* min_contributors, at any time of the round (one per round: a member     *)
(* joins one RoundOpen, so one suffices). The minimum that protects a      *)
(* trainer is the mesh's, MeshMinContributors, a constant of the           *)
(* configuration; a node joins only an Acceptable RoundOpen: the Opener's, *)
(* with the mesh's minimum (protocol/aggregation round_open_refusal).      *)
(* Round ids, hyper-parameters and deadlines are checked there too; the    *)
(* model has one round at a time, so they are not modelled.                *)
(* Python publishes a set below the minimum inside CloseCollection or      *)
(* VerifyContribution, without an aggregate; here ComputeAggregate does it.*)
(***************************************************************************)
EXTENDS Naturals, FiniteSets, Sequences

CONSTANTS
    Trainers,        \* hotkeys of the trainers
    Validators,      \* the round's validators (all honest)
    Committee,       \* key-share holders
    Cheaters,        \* trainers whose contribution does not verify
    BadMembers,      \* committee members whose partial decryption does not verify
    MeshMinContributors, \* the mesh's minimum (configuration): fewer, nothing is decrypted
    MaxContributors, \* the most contributions aggregated: more accepted, a draw picks these
    Opener,          \* the validator scheduled to open the rounds
    Byzantine,       \* validator keys that may gossip a RoundOpen of their choosing
    Overflowers,     \* trainers whose verified contribution has slots out of range
    Threshold,       \* t of the t-of-n threshold key
    MaxRounds,       \* rounds explored
    NoSet            \* model value: "no set yet"

ASSUME /\ Cheaters \subseteq Trainers
       /\ Overflowers \subseteq Trainers \ Cheaters
       /\ BadMembers \subseteq Committee
       /\ MeshMinContributors \in 1..Cardinality(Trainers)
       /\ Opener \in Validators
       /\ MaxContributors \in MeshMinContributors..Cardinality(Trainers)
       /\ Threshold \in 1..Cardinality(Committee)
       /\ MaxRounds \in 1..10

Quorum == Cardinality(Validators) \div 2 + 1   \* a strict majority
Valid == Trainers \ Cheaters
MaybeSet == (SUBSET Trainers) \cup {NoSet}
Adapters == UNION {[1..n -> SUBSET Trainers] : n \in 0..MaxRounds}

VPhases == {"open", "collect", "aggregate", "decrypt", "blame", "final", "aborted"}
CPhases == {"waiting", "watch", "decrypt", "released", "aborted"}
TPhases == {"waiting", "training", "contributed", "final", "aborted"}
Over == {"final", "aborted"}

\* A RoundOpen on the wire: who signed it and the minimum it names.
Opens == [from : Validators \cup Byzantine, min : 1..Cardinality(Trainers)]
HonestOpen == [from |-> Opener, min |-> MeshMinContributors]
NoOpen == [from |-> Opener, min |-> 0]  \* the adversary sent nothing this round
\* What a validator, member or trainer joins (round_open_refusal).
Acceptable(m) == m.from = Opener /\ m.min = MeshMinContributors

VARIABLES
    round,       \* the round being run
    base,        \* the adapter it starts from
    clock,       \* "collect" (before the deadline), "closed", "expired" (after the final deadline)
    tPhase,      \* trainer -> phase
    sent,        \* trainers whose Contribution is on the wire
    vPhase,      \* validator -> phase
    status,      \* validator -> trainer -> "none" | "pending" | "accepted" | "rejected"
    published,   \* validator -> the AcceptedSet it published, or NoSet
    vSeen,       \* validator -> validator -> the AcceptedSet heard from it, or NoSet
    vAgreed,     \* validator -> the set a quorum published, or NoSet
    vConfirmed,  \* validators holding the agreed aggregate (own, or recomputed)
    partial,     \* validator -> member -> "none" | "pending" | "valid" | "invalid"
    combining,   \* validators that asked the shell to combine t valid partials
    vAdapter,    \* validator -> its new adapter, or NoSet
    cPhase,      \* member -> phase
    cSeen,       \* member -> validator -> the AcceptedSet heard from it, or NoSet
    cAgreed,     \* member -> the set a quorum published, or NoSet
    cConfirmed,  \* members that recomputed the agreed aggregate themselves
    honestOpen,  \* the Opener's RoundOpen is on the wire
    byzOpen,     \* the adversary's RoundOpen this round, or NoOpen
    cMin,        \* member -> the minimum of the RoundOpen it joined (0: none)
    vBlame,      \* validators whose combined sum overflowed a slot (they ran the blame step)
    slotProof,   \* validator -> trainer -> "none" | "pending" | "valid" | "invalid"
    named        \* validator -> the contributors its blame step named

roundVars == <<round, base, clock>>
trainerVars == <<tPhase, sent>>
validatorVars == <<vPhase, status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
openVars == <<honestOpen, byzOpen, cMin>>
committeeVars == <<cPhase, cSeen, cAgreed, cConfirmed, openVars>>
blameVars == <<vBlame, slotProof, named>>
vars == <<roundVars, trainerVars, validatorVars, committeeVars, blameVars>>

\* The RoundOpens on the wire this round.
OnWire == (IF honestOpen THEN {HonestOpen} ELSE {}) \cup (IF byzOpen = NoOpen THEN {} ELSE {byzOpen})

-----------------------------------------------------------------------------
(* Agreement on a map "validator -> set heard from it".                    *)

SetsIn(seen) == {seen[w] : w \in Validators} \ {NoSet}
Votes(seen, S) == Cardinality({w \in Validators : seen[w] = S})
AgreedIn(seen) == {S \in SetsIn(seen) : Votes(seen, S) >= Quorum}
Silent(seen) == Cardinality({w \in Validators : seen[w] = NoSet})
\* No set can reach a quorum any more, even if every silent validator joins it.
Impossible(seen) == /\ Silent(seen) < Quorum
                    /\ \A S \in SetsIn(seen) : Votes(seen, S) + Silent(seen) < Quorum

Accepted(v) == {t \in Trainers : status[v][t] = "accepted"}
\* Issue 11 finding 8: not the first MaxContributors, but a draw that depends only on the
\* accepted set (Python: draw_contributors, seeded by its hash), so validators with the
\* same accepted set draw the same one.
Drawn(S) == IF Cardinality(S) <= MaxContributors THEN S
            ELSE CHOOSE X \in SUBSET S : Cardinality(X) = MaxContributors
NoPending(v) == \A t \in Trainers : status[v][t] # "pending"
ValidPartials(v, p) == {c \in Committee : p[c] = "valid"}

\* Validator v decides on `seen` (its own set `own` included): the next values of
\* vPhase, vAgreed and vConfirmed.
Decide(v, seen, own) ==
    IF AgreedIn(seen) = {}
    THEN /\ vPhase' = IF Impossible(seen) THEN [vPhase EXCEPT ![v] = "aborted"] ELSE vPhase
         /\ UNCHANGED <<vAgreed, vConfirmed>>
    ELSE LET agreed == CHOOSE X \in AgreedIn(seen) : TRUE
         IN /\ vAgreed' = [vAgreed EXCEPT ![v] = agreed]
            /\ IF Cardinality(agreed) < MeshMinContributors \/ \E t \in agreed : status[v][t] = "rejected"
               THEN /\ vPhase' = [vPhase EXCEPT ![v] = "aborted"]
                    /\ UNCHANGED vConfirmed
               ELSE /\ vPhase' = [vPhase EXCEPT ![v] = "decrypt"]
                    /\ vConfirmed' = IF agreed = own THEN vConfirmed \cup {v} ELSE vConfirmed

\* Committee member c decides on `seen`: the next values of cPhase and cAgreed.
CommitteeDecide(c, seen) ==
    IF AgreedIn(seen) = {}
    THEN /\ cPhase' = IF Impossible(seen) THEN [cPhase EXCEPT ![c] = "aborted"] ELSE cPhase
         /\ UNCHANGED cAgreed
    ELSE LET agreed == CHOOSE X \in AgreedIn(seen) : TRUE
         IN /\ cAgreed' = [cAgreed EXCEPT ![c] = agreed]
            /\ cPhase' = [cPhase EXCEPT ![c] = IF Cardinality(agreed) < cMin[c]
                                               THEN "aborted" ELSE "decrypt"]

-----------------------------------------------------------------------------
(* A round starts fresh; only the base adapter carries over.              *)

FreshRound ==
    /\ clock' = "collect"
    /\ tPhase' = [t \in Trainers |-> "waiting"]
    /\ sent' = {}
    /\ vPhase' = [v \in Validators |-> "open"]
    /\ status' = [v \in Validators |-> [t \in Trainers |-> "none"]]
    /\ published' = [v \in Validators |-> NoSet]
    /\ vSeen' = [v \in Validators |-> [w \in Validators |-> NoSet]]
    /\ vAgreed' = [v \in Validators |-> NoSet]
    /\ vConfirmed' = {}
    /\ partial' = [v \in Validators |-> [c \in Committee |-> "none"]]
    /\ combining' = {}
    /\ vAdapter' = [v \in Validators |-> NoSet]
    /\ cPhase' = [c \in Committee |-> "waiting"]
    /\ cSeen' = [c \in Committee |-> [w \in Validators |-> NoSet]]
    /\ cAgreed' = [c \in Committee |-> NoSet]
    /\ cConfirmed' = {}
    /\ honestOpen' = FALSE
    /\ byzOpen' = NoOpen
    /\ cMin' = [c \in Committee |-> 0]
    /\ vBlame' = {}
    /\ slotProof' = [v \in Validators |-> [t \in Trainers |-> "none"]]
    /\ named' = [v \in Validators |-> {}]

Init ==
    /\ round = 1
    /\ base = << >>
    /\ clock = "collect"
    /\ tPhase = [t \in Trainers |-> "waiting"]
    /\ sent = {}
    /\ vPhase = [v \in Validators |-> "open"]
    /\ status = [v \in Validators |-> [t \in Trainers |-> "none"]]
    /\ published = [v \in Validators |-> NoSet]
    /\ vSeen = [v \in Validators |-> [w \in Validators |-> NoSet]]
    /\ vAgreed = [v \in Validators |-> NoSet]
    /\ vConfirmed = {}
    /\ partial = [v \in Validators |-> [c \in Committee |-> "none"]]
    /\ combining = {}
    /\ vAdapter = [v \in Validators |-> NoSet]
    /\ cPhase = [c \in Committee |-> "waiting"]
    /\ cSeen = [c \in Committee |-> [w \in Validators |-> NoSet]]
    /\ cAgreed = [c \in Committee |-> NoSet]
    /\ cConfirmed = {}
    /\ honestOpen = FALSE
    /\ byzOpen = NoOpen
    /\ cMin = [c \in Committee |-> 0]
    /\ vBlame = {}
    /\ slotProof = [v \in Validators |-> [t \in Trainers |-> "none"]]
    /\ named = [v \in Validators |-> {}]

-----------------------------------------------------------------------------
(* Actions                                                                 *)

\* The Opener opens and gossips HonestOpen; another validator opens once it has
\* joined that RoundOpen and does not gossip it again (only the Opener's counts).
OpenRound(v) ==
    /\ vPhase[v] = "open"
    /\ clock = "collect"
    /\ v = Opener \/ honestOpen
    /\ vPhase' = [vPhase EXCEPT ![v] = "collect"]
    /\ honestOpen' = TRUE
    /\ UNCHANGED <<roundVars, trainerVars, cPhase, cSeen, cAgreed, cConfirmed, byzOpen, cMin>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
    /\ UNCHANGED blameVars

\* The adversary gossips a RoundOpen naming any minimum, signed by a key it holds.
ByzOpenRound ==
    /\ byzOpen = NoOpen
    /\ \E f \in Byzantine, n \in 1..Cardinality(Trainers) : byzOpen' = [from |-> f, min |-> n]
    /\ UNCHANGED <<roundVars, trainerVars, validatorVars, cPhase, cSeen, cAgreed, cConfirmed, honestOpen, cMin>>
    /\ UNCHANGED blameVars

\* A trainer or a committee member hears a RoundOpen on the wire and joins it if it
\* is Acceptable; any other one it refuses (nothing changes).
JoinRound(p) ==
    /\ \E m \in OnWire :
        /\ Acceptable(m)
        /\ \/ /\ p \in Trainers
              /\ tPhase[p] = "waiting"
              /\ tPhase' = [tPhase EXCEPT ![p] = "training"]
              /\ UNCHANGED <<sent, committeeVars>>
           \/ /\ p \in Committee
              /\ cPhase[p] = "waiting"
              /\ cPhase' = [cPhase EXCEPT ![p] = "watch"]
              /\ cMin' = [cMin EXCEPT ![p] = m.min]
              /\ UNCHANGED <<trainerVars, cSeen, cAgreed, cConfirmed, honestOpen, byzOpen>>
    /\ UNCHANGED <<roundVars, validatorVars>>
    /\ UNCHANGED blameVars

\* A trainer that never takes this step dropped out.
Contribute(t) ==
    /\ tPhase[t] = "training"
    /\ clock = "collect"
    /\ tPhase' = [tPhase EXCEPT ![t] = "contributed"]
    /\ sent' = sent \cup {t}
    /\ UNCHANGED <<roundVars, validatorVars, committeeVars>>
    /\ UNCHANGED blameVars

ReceiveContribution(v, t) ==
    /\ t \in sent
    /\ clock = "collect"
    /\ vPhase[v] = "collect"
    /\ status[v][t] = "none"
    /\ status' = [status EXCEPT ![v][t] = "pending"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<vPhase, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
    /\ UNCHANGED blameVars

VerifyContribution(v, t) ==
    /\ status[v][t] = "pending"
    /\ status' = [status EXCEPT ![v][t] = IF t \in Cheaters THEN "rejected" ELSE "accepted"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<vPhase, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
    /\ UNCHANGED blameVars

CloseCollection(v) ==
    /\ vPhase[v] = "collect"
    /\ clock # "collect"
    /\ vPhase' = [vPhase EXCEPT ![v] = "aggregate"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
    /\ UNCHANGED blameVars

\* A validator aggregates its accepted set and publishes it (then decides), or
\* recomputes an adopted set's aggregate; a member recomputes the agreed aggregate.
\* Aggregate ids are sets here, so a recomputation always matches.
ComputeAggregate(p) ==
    \/ /\ p \in Validators
       /\ vPhase[p] = "aggregate"
       /\ published[p] = NoSet
       /\ NoPending(p)
       /\ LET own == Drawn(Accepted(p))
              seen == [vSeen[p] EXCEPT ![p] = own]
          IN /\ published' = [published EXCEPT ![p] = own]
             /\ vSeen' = [vSeen EXCEPT ![p] = seen]
             /\ Decide(p, seen, own)
       /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
       /\ UNCHANGED <<status, partial, combining, vAdapter>>
    \/ /\ p \in Validators
       /\ vPhase[p] = "decrypt"
       /\ p \notin vConfirmed
       /\ vConfirmed' = vConfirmed \cup {p}
       /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
       /\ UNCHANGED <<vPhase, status, published, vSeen, vAgreed, partial, combining, vAdapter>>
    \/ /\ p \in Committee
       /\ cPhase[p] = "decrypt"
       /\ p \notin cConfirmed
       /\ cConfirmed' = cConfirmed \cup {p}
       /\ UNCHANGED <<roundVars, trainerVars, validatorVars, cPhase, cSeen, cAgreed, openVars>>
    /\ UNCHANGED blameVars

\* Receiver r (a validator or a member) hears validator w's AcceptedSet.
ReceiveAcceptedSet(r, w) ==
    /\ published[w] # NoSet
    /\ \/ /\ r \in Validators
          /\ vPhase[r] \notin Over
          /\ vSeen[r][w] = NoSet
          /\ LET seen == [vSeen[r] EXCEPT ![w] = published[w]]
             IN /\ vSeen' = [vSeen EXCEPT ![r] = seen]
                /\ IF vPhase[r] = "aggregate" /\ published[r] # NoSet
                   THEN Decide(r, seen, published[r])
                   ELSE UNCHANGED <<vPhase, vAgreed, vConfirmed>>
          /\ UNCHANGED <<committeeVars, status, published, partial, combining, vAdapter>>
       \/ /\ r \in Committee
          /\ cPhase[r] = "watch"
          /\ cSeen[r][w] = NoSet
          /\ LET seen == [cSeen[r] EXCEPT ![w] = published[w]]
             IN /\ cSeen' = [cSeen EXCEPT ![r] = seen]
                /\ CommitteeDecide(r, seen)
          /\ UNCHANGED <<validatorVars, cConfirmed, openVars>>
    /\ UNCHANGED <<roundVars, trainerVars>>
    /\ UNCHANGED blameVars

\* A member that never takes this step dropped out.
ReleasePartial(c) ==
    /\ cPhase[c] = "decrypt"
    /\ c \in cConfirmed
    /\ cPhase' = [cPhase EXCEPT ![c] = "released"]
    /\ UNCHANGED <<roundVars, trainerVars, validatorVars, cSeen, cAgreed, cConfirmed, openVars>>
    /\ UNCHANGED blameVars

\* A partial of another aggregate than the one v agreed on is excluded at once.
ReceivePartial(v, c) ==
    /\ cPhase[c] = "released"
    /\ vPhase[v] = "decrypt"
    /\ v \in vConfirmed
    /\ partial[v][c] = "none"
    /\ partial' = [partial EXCEPT ![v][c] = IF cAgreed[c] = vAgreed[v] THEN "pending" ELSE "invalid"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<vPhase, status, published, vSeen, vAgreed, vConfirmed, combining, vAdapter>>
    /\ UNCHANGED blameVars

\* Once t partials are valid the validator asks for a combine (the first t in
\* committee order).
VerifyPartial(v, c) ==
    /\ vPhase[v] = "decrypt"
    /\ partial[v][c] = "pending"
    /\ LET p == [partial[v] EXCEPT ![c] = IF c \in BadMembers THEN "invalid" ELSE "valid"]
       IN /\ partial' = [partial EXCEPT ![v] = p]
          /\ combining' = IF Cardinality(ValidPartials(v, p)) >= Threshold
                          THEN combining \cup {v} ELSE combining
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<vPhase, status, published, vSeen, vAgreed, vConfirmed, vAdapter>>
    /\ UNCHANGED blameVars

Finalize(v) ==
    /\ vPhase[v] = "decrypt"
    /\ v \in combining
    /\ vPhase' = [vPhase EXCEPT ![v] = "final"]
    /\ vAdapter' = [vAdapter EXCEPT ![v] = Append(base, vAgreed[v])]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining>>
    /\ UNCHANGED blameVars

\* The sum did not unpack (a slot overflowed): no adapter.
CombineFails(v) ==
    /\ vPhase[v] = "decrypt"
    /\ v \in combining
    /\ vPhase' = [vPhase EXCEPT ![v] = "aborted"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
    /\ UNCHANGED blameVars

\* Issue 11 finding 5: the sum did not unpack at one position (SlotOverflow): only a
\* contribution with slots out of range can cause it (the contribution proof bounds the
\* plaintext, not its slots), so an Overflower is in the set. Not every such set
\* overflows (Finalize stays possible: values inside the decode window). The validator
\* asks every contributor of its agreed set to prove the position in range.
SlotOverflow(v) ==
    /\ vPhase[v] = "decrypt"
    /\ v \in combining
    /\ vAgreed[v] \cap Overflowers # {}
    /\ vPhase' = [vPhase EXCEPT ![v] = "blame"]
    /\ vBlame' = vBlame \cup {v}
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars, slotProof, named>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>

\* A contributor's slot proof reaches v (an Overflower's may never: silence).
ReceiveSlotProof(v, t) ==
    /\ vPhase[v] = "blame"
    /\ t \in vAgreed[v]
    /\ slotProof[v][t] = "none"
    /\ slotProof' = [slotProof EXCEPT ![v][t] = "pending"]
    /\ UNCHANGED <<roundVars, trainerVars, validatorVars, committeeVars, vBlame, named>>

\* The exact slot proof is sound and complete: an honest contributor's verifies, an
\* Overflower's does not (it cannot prove a slot it filled out of range).
VerifySlotProof(v, t) ==
    /\ vPhase[v] = "blame"
    /\ slotProof[v][t] = "pending"
    /\ slotProof' = [slotProof EXCEPT ![v][t] = IF t \in Overflowers THEN "invalid" ELSE "valid"]
    /\ UNCHANGED <<roundVars, trainerVars, validatorVars, committeeVars, vBlame, named>>

\* The blame deadline: every contributor without a valid proof is named, the round is
\* aborted. Timing assumption: an honest contributor's proof arrives and is verified
\* before it (the deadline allows for a few seconds of proving; one that crashed would
\* be named no_slot_proof, docs/aggregation.md).
BlameDeadline(v) ==
    /\ vPhase[v] = "blame"
    /\ \A t \in vAgreed[v] \ Overflowers : slotProof[v][t] = "valid"
    /\ \A t \in Trainers : slotProof[v][t] # "pending"
    /\ named' = [named EXCEPT ![v] = {t \in vAgreed[v] : slotProof[v][t] # "valid"}]
    /\ vPhase' = [vPhase EXCEPT ![v] = "aborted"]
    /\ UNCHANGED <<roundVars, trainerVars, committeeVars, vBlame, slotProof>>
    /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>

\* A blame step under way is not cut short by the final deadline: its own ends it.
FinalDeadline(p) ==
    /\ clock = "expired"
    /\ \/ /\ p \in Validators
          /\ vPhase[p] \notin Over \cup {"blame"}
          /\ vPhase' = [vPhase EXCEPT ![p] = "aborted"]
          /\ UNCHANGED <<trainerVars, committeeVars>>
          /\ UNCHANGED <<status, published, vSeen, vAgreed, vConfirmed, partial, combining, vAdapter>>
       \/ /\ p \in Committee
          /\ cPhase[p] \in {"watch", "decrypt"}
          /\ cPhase' = [cPhase EXCEPT ![p] = "aborted"]
          /\ UNCHANGED <<trainerVars, validatorVars, cSeen, cAgreed, cConfirmed, openVars>>
       \/ /\ p \in Trainers
          /\ tPhase[p] \in {"training", "contributed"}
          /\ tPhase' = [tPhase EXCEPT ![p] = "aborted"]
          /\ UNCHANGED <<sent, validatorVars, committeeVars>>
    /\ UNCHANGED roundVars
    /\ UNCHANGED blameVars

ReceiveRoundFinal(t, v) ==
    /\ vPhase[v] = "final"
    /\ tPhase[t] \in {"training", "contributed"}
    /\ tPhase' = [tPhase EXCEPT ![t] = "final"]
    /\ UNCHANGED <<roundVars, sent, validatorVars, committeeVars>>
    /\ UNCHANGED blameVars

ReceiveRoundAborted(t, v) ==
    /\ vPhase[v] = "aborted"
    /\ tPhase[t] \in {"training", "contributed"}
    /\ tPhase' = [tPhase EXCEPT ![t] = "aborted"]
    /\ UNCHANGED <<roundVars, sent, validatorVars, committeeVars>>
    /\ UNCHANGED blameVars

(* The environment: the clock passes the deadline, then the final deadline; *)
(* a new round starts from the adapter of the last (or the same base).     *)

Tick ==
    /\ clock # "expired"
    /\ clock' = IF clock = "collect" THEN "closed" ELSE "expired"
    /\ UNCHANGED <<round, base, trainerVars, validatorVars, committeeVars>>
    /\ UNCHANGED blameVars

NextRound ==
    /\ round < MaxRounds
    /\ clock = "expired"
    /\ \A v \in Validators : vPhase[v] \in Over
    /\ round' = round + 1
    /\ base' = IF \E v \in Validators : vPhase[v] = "final"
               THEN vAdapter[CHOOSE v \in Validators : vPhase[v] = "final"]
               ELSE base
    /\ FreshRound

\* The last round is over: stutter, so that TLC's deadlock check stays useful.
Done ==
    /\ round = MaxRounds
    /\ clock = "expired"
    /\ \A v \in Validators : vPhase[v] \in Over
    /\ UNCHANGED vars

Next ==
    \/ \E v \in Validators : \/ OpenRound(v)
                             \/ CloseCollection(v)
                             \/ Finalize(v)
                             \/ CombineFails(v)
                             \/ SlotOverflow(v)
                             \/ BlameDeadline(v)
    \/ \E v \in Validators, t \in Trainers : ReceiveSlotProof(v, t) \/ VerifySlotProof(v, t)
    \/ \E p \in Trainers \cup Committee : JoinRound(p)
    \/ \E t \in Trainers : Contribute(t)
    \/ \E v \in Validators, t \in Trainers : ReceiveContribution(v, t) \/ VerifyContribution(v, t)
    \/ \E p \in Validators \cup Committee : ComputeAggregate(p)
    \/ \E r \in Validators \cup Committee, w \in Validators : ReceiveAcceptedSet(r, w)
    \/ \E c \in Committee : ReleasePartial(c)
    \/ \E v \in Validators, c \in Committee : ReceivePartial(v, c) \/ VerifyPartial(v, c)
    \/ \E p \in Trainers \cup Validators \cup Committee : FinalDeadline(p)
    \/ \E t \in Trainers, v \in Validators : ReceiveRoundFinal(t, v) \/ ReceiveRoundAborted(t, v)
    \/ ByzOpenRound
    \/ Tick
    \/ NextRound
    \/ Done

Spec == Init /\ [][Next]_vars

\* Liveness needs only what the protocol itself relies on: the clock moves (the deadlines
\* pass), each node's final-deadline timer fires, local verification finishes, an honest
\* contributor answers a blame request, and the blame deadline fires. Messages may still
\* be lost and members and trainers may still drop out.
Fairness ==
    /\ WF_vars(Tick)
    /\ WF_vars(NextRound)
    /\ \A p \in Trainers \cup Validators \cup Committee : WF_vars(FinalDeadline(p))
    /\ \A v \in Validators : WF_vars(BlameDeadline(v))
    /\ \A v \in Validators, t \in Trainers : WF_vars(VerifySlotProof(v, t))
    /\ \A v \in Validators, t \in Trainers \ Overflowers : WF_vars(ReceiveSlotProof(v, t))

FairSpec == Spec /\ Fairness

-----------------------------------------------------------------------------
(* Invariants (the Python check functions have the same names)             *)

TypeOK ==
    /\ round \in 1..MaxRounds
    /\ base \in Adapters
    /\ clock \in {"collect", "closed", "expired"}
    /\ tPhase \in [Trainers -> TPhases]
    /\ sent \subseteq Trainers
    /\ vPhase \in [Validators -> VPhases]
    /\ status \in [Validators -> [Trainers -> {"none", "pending", "accepted", "rejected"}]]
    /\ published \in [Validators -> MaybeSet]
    /\ vSeen \in [Validators -> [Validators -> MaybeSet]]
    /\ vAgreed \in [Validators -> MaybeSet]
    /\ vConfirmed \subseteq Validators
    /\ partial \in [Validators -> [Committee -> {"none", "pending", "valid", "invalid"}]]
    /\ combining \subseteq Validators
    /\ vAdapter \in [Validators -> Adapters \cup {NoSet}]
    /\ cPhase \in [Committee -> CPhases]
    /\ cSeen \in [Committee -> [Validators -> MaybeSet]]
    /\ cAgreed \in [Committee -> MaybeSet]
    /\ cConfirmed \subseteq Committee
    /\ honestOpen \in BOOLEAN
    /\ byzOpen \in Opens \cup {NoOpen}
    /\ cMin \in [Committee -> 0..Cardinality(Trainers)]
    /\ vBlame \subseteq Validators
    /\ slotProof \in [Validators -> [Trainers -> {"none", "pending", "valid", "invalid"}]]
    /\ named \in [Validators -> SUBSET Trainers]

\* A member decrypts (recomputes for, or releases, a partial) only an aggregate of
\* at least the MESH's minimum, whatever minimum a RoundOpen on the wire named.
NoDecryptionBelowMin ==
    \A c \in Committee :
        (c \in cConfirmed \/ cPhase[c] = "released") => Cardinality(cAgreed[c]) >= MeshMinContributors

\* A member that joined a round joined one with the mesh's minimum.
JoinedOnlyMeshRounds ==
    \A c \in Committee : cPhase[c] # "waiting" => cMin[c] = MeshMinContributors

\* Every released partial is of a set that a quorum of validators really published.
OnlyAgreedAggregateDecrypted ==
    \A c \in Committee :
        cPhase[c] = "released" =>
            Cardinality({v \in Validators : published[v] = cAgreed[c]}) >= Quorum

HonestValidatorsAgreeOnAdapter ==
    \A v, w \in Validators :
        (vPhase[v] = "final" /\ vPhase[w] = "final") => vAdapter[v] = vAdapter[w]

FinalContainsOnlyValidContributions ==
    \A v \in Validators :
        vPhase[v] = "final" => vAgreed[v] \subseteq (Valid \cap sent)

\* Issue 11 finding 5: no blame step names an honest contributor.
HonestNeverNamed ==
    \A v \in Validators : named[v] \cap (Trainers \ Overflowers) = {}

\* A round that ended after a blame step names at least one byzantine contributor.
OverflowNamesAByzantine ==
    \A v \in Validators :
        (vPhase[v] = "aborted" /\ v \in vBlame) => named[v] \cap Overflowers # {}

-----------------------------------------------------------------------------
(* Liveness (FairSpec): every round ends, each validator with an adapter or *)
(* aborted, whatever the adversary gossips and whoever drops out.           *)

AllRoundsEnd == <>(round = MaxRounds /\ \A v \in Validators : vPhase[v] \in Over)

=============================================================================
