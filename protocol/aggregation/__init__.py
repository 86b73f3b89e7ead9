"""Secure-aggregation rounds, sans-IO: the validator's, committee member's and trainer's machines.

Read beside specs/SecureAggregation.tla: each public method is one of its actions under
the same name in snake_case (OpenRound = open_round, ...), and the check functions at
the bottom are its invariants, under the same names.

Validator phases:  OPEN -> COLLECT -> AGGREGATE -> DECRYPT -> FINAL, or ABORTED
                   (DECRYPT -> BLAME -> ABORTED when the sum overflows a slot).
  COLLECT    contributions that arrive before the deadline are verified by the shell;
  AGGREGATE  at the deadline, once every received contribution has a verdict, the
             accepted ones (sorted by trainer hotkey) are aggregated and published as
             an AcceptedSet; the round goes on with the set that a quorum (a strict
             majority of the round's validators) published identically;
  DECRYPT    partial decryptions of that aggregate are verified; once every decryption
             block has t valid batches from distinct members (first partial or cover:
             _blocks.cover) those batches are combined (CombinePartials names them);
  FINAL      the shell reports the new adapter id; RoundFinal is sent.
  BLAME      the sum did not unpack at one position (SlotOverflow, issue 11 finding 5):
             every contributor of the agreed set is asked to prove that position in
             range (BlameRequest, SlotProof); at the blame deadline whoever failed or
             stayed silent is named in bad_contributors and the round is aborted; the
             named are refused as contributors for COOLDOWN_ROUNDS rounds after it.
A committee member releases its partial decryption only for an aggregate that a quorum
agreed on, that it recomputed itself, and that has at least the mesh's min_contributors;
after it, once, a cover of blocks still short of t valid batches (choose_cover -> CoverBlocks).

Who may open a round, and with which parameters, is not the RoundOpen's to say: every
node holds the mesh's rules (MeshRounds: validators, committee, RoundPolicy) and joins
only what round_open_refusal() allows: the scheduled opener's RoundOpen for a round id
this node expects next, with the mesh's minimum and layout and bounded hyper-parameters.

The machines never do crypto, read a clock or touch the network: verification
outcomes, aggregate ids and partial validity come in as events from the shell, time is
an argument, and what to do comes back as effects.

The package, one module per part, each importing only those above it:
  _phases      the three machines' phases
  _effects     what a machine asks its shell to do
  _round_open  a RoundOpen checked, and the mesh's rules it must match (MeshRounds, RoundPolicy)
  _blocks      who decrypts which block: substitutes, cover, the batches a combine takes
  _rules       the draw of contributors, the blocks a partial carries, the blame step
  _agreement   accepted sets and the quorum that agrees on one
  _state       saved state: version, the RoundOpen in wire form, shared guards
  _validator   ValidatorRound
  _committee   CommitteeRound
  _trainer     TrainerRound
  _invariants  the spec's invariants and its action table (ACTIONS)
Everything public is re-exported here; nothing outside the package imports the
underscore modules (tests/test_layering.py).
"""

from __future__ import annotations

from protocol.aggregation._phases import CommitteePhase, Phase, TrainerPhase
from protocol.aggregation._effects import (BlamePosition, CombinePartials, ComputeAggregate, CoverBlocks,
                                           DecryptPartial, Effect, EnterPhase, ProveSlots, Send, SetTimer, Train,
                                           VerifyContributionBlob, VerifyPartialBlob, VerifySlotProofBlob)
from protocol.aggregation._blocks import blocks_for, blocks_to_decrypt, cover, cover_for_missing
from protocol.aggregation._round_open import (DEFAULT_HYPERPARAMETERS, MAX_HOTKEY_CHARS, HyperparameterBound,
                                              MeshRounds, OpenRefusal, RoundPolicy, check_round_open,
                                              expected_base_adapter, hyperparameters_problem, is_blob_id,
                                              open_wait_reason, quorum, round_id_problem, round_open_problem,
                                              round_open_refusal, scheduled_opener)
from protocol.aggregation._rules import (BLAME_MS, CANDIDATES_PER_PLACE, COOLDOWN_ROUNDS, MAX_BLAME_MS,
                                         NAMED_OUT_OF_RANGE, NAMED_SILENT, blame_position_problem, candidate_limit,
                                         cooling_down, draw_contributors, draw_seed, own_blocks,
                                         partial_coverage_problem, round_blocks)
from protocol.aggregation._agreement import SetView
from protocol.aggregation._state import STATE_VERSION
from protocol.aggregation._validator import Exclusion, ValidatorRound
from protocol.aggregation._committee import CommitteeRound
from protocol.aggregation._trainer import TrainerRound
from protocol.aggregation._invariants import (ACTIONS, ADVERSARY_ACTIONS, ENVIRONMENT_ACTIONS, INVARIANTS,
                                              FinalContainsOnlyValidContributions, HonestNeverNamed,
                                              HonestValidatorsAgreeOnAdapter, JoinedOnlyMeshRounds,
                                              NoDecryptionBelowMin, OnlyAgreedAggregateDecrypted,
                                              OverflowNamesAByzantine, TypeOK)
# The machines' bound on reason and stat names (protocol/aggregation_messages.py), which
# the rounds shell reads from here.
from protocol.aggregation_messages import MAX_NAME_CHARS

__all__ = [
    "ACTIONS", "ADVERSARY_ACTIONS", "BLAME_MS", "blame_position_problem", "BlamePosition", "blocks_for",
    "blocks_to_decrypt", "candidate_limit", "CANDIDATES_PER_PLACE", "check_round_open", "CombinePartials",
    "CommitteePhase", "CommitteeRound", "ComputeAggregate", "COOLDOWN_ROUNDS", "cooling_down", "cover",
    "cover_for_missing", "CoverBlocks", "DecryptPartial", "DEFAULT_HYPERPARAMETERS",
    "draw_contributors", "draw_seed", "Effect", "EnterPhase", "ENVIRONMENT_ACTIONS", "Exclusion",
    "expected_base_adapter", "FinalContainsOnlyValidContributions", "HonestNeverNamed",
    "HonestValidatorsAgreeOnAdapter", "HyperparameterBound", "hyperparameters_problem", "INVARIANTS", "is_blob_id",
    "JoinedOnlyMeshRounds", "MAX_BLAME_MS", "MAX_HOTKEY_CHARS", "MAX_NAME_CHARS", "MeshRounds", "NAMED_OUT_OF_RANGE", "NAMED_SILENT",
    "NoDecryptionBelowMin", "OnlyAgreedAggregateDecrypted", "open_wait_reason", "OpenRefusal",
    "OverflowNamesAByzantine", "own_blocks", "partial_coverage_problem", "Phase", "ProveSlots", "quorum",
    "round_blocks", "round_id_problem", "round_open_problem", "round_open_refusal", "RoundPolicy", "scheduled_opener", "Send",
    "SetTimer", "SetView", "STATE_VERSION", "Train", "TrainerPhase", "TrainerRound", "TypeOK", "ValidatorRound",
    "VerifyContributionBlob", "VerifyPartialBlob", "VerifySlotProofBlob",
]
