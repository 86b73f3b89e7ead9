---------------------------- MODULE FheChallenge ----------------------------
(***************************************************************************)
(* FHE challenges: validators challenge miners with encrypted inputs under *)
(* their own evaluation keys; every challenge gets exactly one outcome.    *)
(*                                                                          *)
(* protocol/challenge.py implements it. The validator's ChallengeMachine   *)
(* has one method per action (StartEpoch -> start_epoch, Issue -> issue,   *)
(* KeyUploaded, Sent, ResponseReceived, Timeout, Error, CloseEpoch); the   *)
(* miner's MinerKeyring has AddKey (inside KeyUploaded here) and Evaluate. *)
(* ForeignKey is a miner trying a challenge under another validator's key, *)
(* MinerRestart a miner losing its keys. The invariants at the end have    *)
(* the names of the Python check functions that                            *)
(* tests/test_challenge_explore.py evaluates in every state it reaches.    *)
(*                                                                          *)
(* Abstractions. One model, so a key is named after its owner: validator v *)
(* uploads key v only (key ids are sha256 of the key bytes, which only v   *)
(* has). Epochs are global: a new one starts when every validator closed   *)
(* the last. The split of miners is any balanced assignment (Python draws *)
(* one by hashing; every property here holds for all of them). Times are   *)
(* abstract: Timeout is the deadline passing, and a late answer is a       *)
(* Timeout. Scores and windows (protocol/scoring.py) are plain functions,  *)
(* tested with vectors, not modelled.                                      *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS Validators,     \* validator hotkeys (model values)
          Miners,         \* miner hotkeys
          MaxEpoch,       \* epochs to explore
          Challenges,     \* challenges per miner per epoch (challenges_per_miner)
          Iterations,     \* circuit runs each challenge asks for (ChallengeConfig.iterations)
          MaxIterations,  \* the bound both sides enforce (MAX_ITERATIONS)
          MaxRestarts,    \* how often miners may lose their keys
          Restarters      \* the miners that may (the explorer's RESTARTING)

ASSUME Validators # {} /\ Miners # {}
ASSUME MaxEpoch \in Nat \ {0} /\ Challenges \in Nat \ {0} /\ MaxRestarts \in Nat
ASSUME Iterations \in 1..MaxIterations
ASSUME Restarters \subseteq Miners

Keys == Validators                  \* key k belongs to validator k
Ids == Validators \X Miners \X (1..Challenges)   \* this epoch's challenge <<v, m, i>>
EpochPhases == {"idle", "open", "closed"}
Phases == {"none", "awaiting_key", "ready", "sent", "decided"}
InFlight == {"awaiting_key", "ready", "sent"}
Outcomes == {"ok", "wrong", "timeout", "error"}
NoOutcome == "none"
MinerDid == {"nothing", "computed", "garbage", "refused"}

VARIABLES epoch,       \* the current epoch, 0 before the first
          vphase,      \* [Validators -> EpochPhases]
          assign,      \* [Miners -> Validators]: who challenges whom this epoch
          cphase,      \* [Ids -> Phases]
          outcome,     \* [Ids -> Outcomes \cup {NoOutcome}]: the recorded outcome
          recorded,    \* [Ids -> Nat]: how many outcomes were recorded (the log's count)
          uploaded,    \* validators' belief: <<m, k>> when miner m holds key k
          held,        \* [Miners -> SUBSET Keys]: the miner's keyring
          usedBy,      \* [Miners -> [Keys -> SUBSET Validators]]: whom each key ran for
          evalEpoch,   \* [Miners -> [Validators -> 0..MaxEpoch]]: epoch of the last run counted
          evalCount,   \* [Miners -> [Validators -> Nat]]: runs counted in that epoch
          minerDid,    \* [Ids -> MinerDid]: what the miner did with a sent challenge
          restarts

vars == <<epoch, vphase, assign, cphase, outcome, recorded, uploaded, held, usedBy,
          evalEpoch, evalCount, minerDid, restarts>>

keyringVars == <<held, usedBy, evalEpoch, evalCount>>

V(c) == c[1]
M(c) == c[2]
Issued(v, m) == Cardinality({i \in 1..Challenges : cphase[<<v, m, i>>] # "none"})
Busy(v, m) == \E i \in 1..Challenges : cphase[<<v, m, i>>] \in InFlight
Load(a, v) == Cardinality({m \in Miners : a[m] = v})
\* Round robin over the ranked validators: loads differ by at most one.
Balanced(a) == \A v, w \in Validators : Load(a, v) <= Load(a, w) + 1

Init ==
    /\ epoch = 0
    /\ vphase = [v \in Validators |-> "idle"]
    /\ assign = [m \in Miners |-> CHOOSE v \in Validators : TRUE]  \* replaced by StartEpoch
    /\ cphase = [c \in Ids |-> "none"]
    /\ outcome = [c \in Ids |-> NoOutcome]
    /\ recorded = [c \in Ids |-> 0]
    /\ uploaded = {}
    /\ held = [m \in Miners |-> {}]
    /\ usedBy = [m \in Miners |-> [k \in Keys |-> {}]]
    /\ evalEpoch = [m \in Miners |-> [v \in Validators |-> 0]]
    /\ evalCount = [m \in Miners |-> [v \in Validators |-> 0]]
    /\ minerDid = [c \in Ids |-> "nothing"]
    /\ restarts = 0

(* Record(c, o): the one place an outcome is written; every deciding action uses it. *)
(* What the miner did no longer matters once c is decided: forgetting it merges     *)
(* states that differ only there (the explorer's forget_decided).                  *)
Record(c, o) ==
    /\ cphase' = [cphase EXCEPT ![c] = "decided"]
    /\ outcome' = [outcome EXCEPT ![c] = o]
    /\ recorded' = [recorded EXCEPT ![c] = @ + 1]
    /\ minerDid' = [minerDid EXCEPT ![c] = "nothing"]

StartEpoch ==
    /\ epoch < MaxEpoch
    /\ \A v \in Validators : vphase[v] # "open"
    /\ \E a \in [Miners -> Validators] : Balanced(a) /\ assign' = a
    /\ epoch' = epoch + 1
    /\ vphase' = [v \in Validators |-> "open"]
    /\ cphase' = [c \in Ids |-> "none"]
    /\ outcome' = [c \in Ids |-> NoOutcome]
    /\ recorded' = [c \in Ids |-> 0]
    /\ minerDid' = [c \in Ids |-> "nothing"]
    /\ UNCHANGED <<uploaded, keyringVars, restarts>>

CloseEpoch(v) ==
    /\ vphase[v] = "open"
    /\ \A m \in Miners : ~Busy(v, m)
    /\ vphase' = [vphase EXCEPT ![v] = "closed"]
    /\ UNCHANGED <<epoch, assign, cphase, outcome, recorded, uploaded, keyringVars, minerDid, restarts>>

Issue(v, m) ==
    /\ vphase[v] = "open"
    /\ assign[m] = v
    /\ Issued(v, m) < Challenges
    /\ ~Busy(v, m)
    /\ LET c == <<v, m, Issued(v, m) + 1>>
       IN cphase' = [cphase EXCEPT ![c] = IF <<m, v>> \in uploaded THEN "ready" ELSE "awaiting_key"]
    /\ UNCHANGED <<epoch, vphase, assign, outcome, recorded, uploaded, keyringVars, minerDid, restarts>>

(* The upload succeeded: the miner's AddKey bound key v to v, the validator knows it. *)
KeyUploaded(c) ==
    /\ cphase[c] = "awaiting_key"
    /\ cphase' = [cphase EXCEPT ![c] = "ready"]
    /\ uploaded' = uploaded \cup {<<M(c), V(c)>>}
    /\ held' = [held EXCEPT ![M(c)] = @ \cup {V(c)}]
    /\ usedBy' = IF V(c) \in held[M(c)] THEN usedBy
                 ELSE [usedBy EXCEPT ![M(c)][V(c)] = {}]
    /\ UNCHANGED <<epoch, vphase, assign, outcome, recorded, evalEpoch, evalCount, minerDid, restarts>>

Sent(c) ==
    /\ cphase[c] = "ready"
    /\ cphase' = [cphase EXCEPT ![c] = "sent"]
    /\ UNCHANGED <<epoch, vphase, assign, outcome, recorded, uploaded, keyringVars, minerDid, restarts>>

(* The keyring's check (MinerKeyring.evaluate): the key is held, its owner asks, *)
(* the iterations and this epoch's quota allow it.                               *)
MayRun(m, requester, k) ==
    /\ k \in held[m]
    /\ k = requester
    /\ Iterations <= MaxIterations
    /\ evalEpoch[m][requester] < epoch \/ evalCount[m][requester] < Challenges

Run(m, requester, k) ==
    /\ evalCount' = [evalCount EXCEPT ![m][requester] = IF evalEpoch[m][requester] < epoch THEN 1 ELSE @ + 1]
    /\ evalEpoch' = [evalEpoch EXCEPT ![m][requester] = epoch]
    /\ usedBy' = [usedBy EXCEPT ![m][k] = @ \cup {requester}]
    /\ UNCHANGED held

TryRun(c, k, onRefusal) ==
    /\ cphase[c] = "sent"
    /\ minerDid[c] = "nothing"
    /\ IF MayRun(M(c), V(c), k)
       THEN Run(M(c), V(c), k) /\ minerDid' = [minerDid EXCEPT ![c] = "computed"]
       ELSE UNCHANGED keyringVars /\ minerDid' = [minerDid EXCEPT ![c] = onRefusal]
    /\ UNCHANGED <<epoch, vphase, assign, cphase, outcome, recorded, uploaded, restarts>>

(* An honest miner runs the challenge under the key it names: the requester's. *)
Evaluate(c) == TryRun(c, V(c), "refused")

(* A miner tries v's challenge under another validator's key k. Its keyring     *)
(* must refuse; a miner that computes anyway hands v garbage (judged wrong).    *)
ForeignKey(c, k) == k # V(c) /\ TryRun(c, k, "garbage")

ResponseReceived(c, o) ==
    /\ cphase[c] = "sent"
    /\ \/ minerDid[c] = "computed" /\ o \in {"ok", "wrong"}   \* wrong: a bad computation
       \/ minerDid[c] = "garbage" /\ o = "wrong"
    /\ Record(c, o)
    /\ UNCHANGED <<epoch, vphase, assign, uploaded, keyringVars, restarts>>

(* The deadline passed with no answer, or the answer came too late. *)
Timeout(c) ==
    /\ cphase[c] = "sent"
    /\ Record(c, "timeout")
    /\ UNCHANGED <<epoch, vphase, assign, uploaded, keyringVars, restarts>>

(* Upload failed, stream broke, the miner refused. A refusal because the miner *)
(* lost the key (unknown_key) makes the validator upload it again next time.   *)
Error(c) ==
    /\ cphase[c] \in InFlight
    /\ Record(c, "error")
    /\ uploaded' = IF minerDid[c] = "refused" /\ V(c) \notin held[M(c)]
                   THEN uploaded \ {<<M(c), V(c)>>} ELSE uploaded
    /\ UNCHANGED <<epoch, vphase, assign, keyringVars, restarts>>

MinerRestart(m) ==
    /\ m \in Restarters
    /\ restarts < MaxRestarts
    /\ held' = [held EXCEPT ![m] = {}]
    /\ usedBy' = [usedBy EXCEPT ![m] = [k \in Keys |-> {}]]
    /\ restarts' = restarts + 1
    /\ UNCHANGED <<epoch, vphase, assign, cphase, outcome, recorded, uploaded, evalEpoch, evalCount, minerDid>>

Done == epoch = MaxEpoch /\ \A v \in Validators : vphase[v] = "closed"

(* Every epoch closed: the run is over (stuttering here is not a deadlock). *)
Finished == Done /\ UNCHANGED vars

Next ==
    \/ StartEpoch
    \/ \E v \in Validators : CloseEpoch(v)
    \/ \E v \in Validators, m \in Miners : Issue(v, m)
    \/ \E c \in Ids : KeyUploaded(c) \/ Sent(c) \/ Evaluate(c) \/ Timeout(c) \/ Error(c)
    \/ \E c \in Ids, k \in Keys : ForeignKey(c, k)
    \/ \E c \in Ids, o \in Outcomes : ResponseReceived(c, o)
    \/ \E m \in Miners : MinerRestart(m)
    \/ Finished

\* Every action moves a well-founded measure (epoch, phases, counts, restarts),
\* so weak fairness on Next drives every behaviour to Done.
Spec == Init /\ [][Next]_vars /\ WF_vars(Next)

-----------------------------------------------------------------------------
(* Invariants: the Python check functions of the same names. *)

TypeOK ==
    /\ epoch \in 0..MaxEpoch
    /\ vphase \in [Validators -> EpochPhases]
    /\ assign \in [Miners -> Validators]
    /\ cphase \in [Ids -> Phases]
    /\ outcome \in [Ids -> Outcomes \cup {NoOutcome}]
    /\ recorded \in [Ids -> Nat]
    /\ uploaded \subseteq Miners \X Keys
    /\ held \in [Miners -> SUBSET Keys]
    /\ usedBy \in [Miners -> [Keys -> SUBSET Validators]]
    /\ evalEpoch \in [Miners -> [Validators -> 0..MaxEpoch]]
    /\ evalCount \in [Miners -> [Validators -> Nat]]
    /\ minerDid \in [Ids -> MinerDid]
    /\ restarts \in 0..MaxRestarts
    /\ \A c \in Ids : cphase[c] # "none" => assign[M(c)] = V(c)

(* Never two outcomes; decided exactly when one is recorded; a closed epoch has *)
(* decided every challenge it issued.                                            *)
ExactlyOneOutcome ==
    \A c \in Ids :
        /\ recorded[c] <= 1
        /\ (cphase[c] = "decided") <=> (recorded[c] = 1 /\ outcome[c] # NoOutcome)
        /\ vphase[V(c)] = "closed" => cphase[c] \in {"none", "decided"}

(* A key ran only for the validator that uploaded it. *)
KeysUsedOnlyByOwner ==
    \A m \in Miners, k \in Keys : usedBy[m][k] \subseteq {k}

(* At most Challenges per miner per epoch on both sides, one in flight at a time, *)
(* each of at most MaxIterations circuit runs.                                    *)
IterationsBounded ==
    /\ Iterations <= MaxIterations
    /\ \A v \in Validators, m \in Miners :
           Cardinality({i \in 1..Challenges : cphase[<<v, m, i>>] \in InFlight}) <= 1
    /\ \A m \in Miners, v \in Validators : evalCount[m][v] <= Challenges

(* Liveness, the other half of ExactlyOneOutcome: every issued challenge is *)
(* decided, and the run ends with every epoch closed.                      *)
EveryChallengeDecided == \A c \in Ids : (cphase[c] \in InFlight) ~> (cphase[c] = "decided")
EventuallyDone == <>Done

=============================================================================
