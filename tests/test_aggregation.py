"""The secure-aggregation round machines, driven event by event (protocol/aggregation/)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import msgpack
import pytest

from crypto.identity import Hotkey
from protocol import aggregation as agg
from protocol import epistula as ep
from protocol import messages as m
from protocol.aggregation import Phase, CommitteePhase, TrainerPhase
from protocol.aggregation_messages import (
    MAX_COMMITTEE, MAX_HYPERPARAMETERS, MAX_NAME_CHARS, MAX_ROUND_CONTRIBUTORS, MAX_STATS,
    MAX_VALIDATORS, AcceptedSet, BlameRequest, Contribution, ContributionVerdict, PartialDecryption,
    RoundAborted, RoundFinal, RoundOpen, SlotProof,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.inbound import open_gossip, seal_message
from protocol.membership import Member, Role, StaticDirectory

ROOT = Path(__file__).resolve().parent.parent
T1, T2, T3 = "trainer-1", "trainer-2", "trainer-3"
V1, V2, V3 = "validator-1", "validator-2", "validator-3"
C1, C2, C3 = "member-1", "member-2", "member-3"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ALL_BLOCKS = (0, 1, 2)  # a committee of three: three decryption blocks
HYPERPARAMETERS = {"steps": 20.0, "lr": 0.02, "batch_size": 8.0, "block_len": 64.0, "adapter_values": 300.0}


def mesh_of(ro: RoundOpen, **policy) -> agg.MeshRounds:
    """The mesh configuration under which `ro` is the honest opener's RoundOpen."""
    fields = dict(min_contributors=ro.min_contributors, max_contributors=ro.max_contributors,
                  clip_bound=ro.clip_bound, quant_bits=ro.quant_bits)
    fields.update(policy)
    return agg.MeshRounds(validators=tuple(sorted(ro.validators)), committee=tuple(ro.committee),
                          threshold=ro.threshold, public_key_id=ro.public_key_id, key_bits=ro.key_bits,
                          policy=agg.RoundPolicy(**fields))


def join(machine, ro: RoundOpen, sender: str = V1, *, now_ms: int = 0, mesh: agg.MeshRounds | None = None):
    """JoinRound as a node that last knew the round before `ro` (the honest schedule)."""
    kwargs = {"now_ms": now_ms, "mesh": mesh or mesh_of(ro), "last_round_id": ro.round_id - 1 if ro.round_id else None}
    return machine.join_round(sender, ro, **kwargs)


def make_open(**changes) -> RoundOpen:
    fields = dict(
        round_id=7, base_adapter_id=h("base"), public_key_id=h("pk"), hyperparameters=dict(HYPERPARAMETERS),
        clip_bound=1.0, quant_bits=16, max_contributors=10, key_bits=2048, ciphertexts_per_contribution=12,
        max_contribution_bytes=1 << 22, deadline_ms=10_000, final_deadline_ms=20_000, min_contributors=2,
        committee=[C1, C2, C3], threshold=2, validators=[V1, V2])
    fields.update(changes)
    return RoundOpen(**fields)


def contribution(trainer: str, ro: RoundOpen) -> Contribution:
    return Contribution(ro.round_id, h(f"blob:{trainer}"), ro.ciphertexts_per_contribution, 4096)


def sent(effects, kind):
    return [e.message for e in effects if isinstance(e, agg.Send) and isinstance(e.message, kind)]


def of(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


def collect(v: agg.ValidatorRound, trainers, *, cheaters=(), now_ms=1_000):
    """Open, receive and verify the trainers' contributions (cheaters rejected)."""
    v.open_round(now_ms=now_ms)
    for t in trainers:
        v.receive_contribution(t, contribution(t, v.round_open), now_ms=now_ms)
        if t in cheaters:
            v.verify_contribution(t, valid=False, reason="range_proof", evidence_id=h(f"evidence:{t}"))
        else:
            v.verify_contribution(t, valid=True)


def aggregate_id(blob_ids) -> str:
    return h("aggregate:" + ",".join(blob_ids))


def close_and_publish(v: agg.ValidatorRound) -> AcceptedSet:
    effects = v.close_collection(now_ms=v.round_open.deadline_ms)
    (compute,) = of(effects, agg.ComputeAggregate)
    (published,) = sent(v.compute_aggregate(aggregate_id(compute.blob_ids)), AcceptedSet)
    return published


# --- messages --------------------------------------------------------------------------


def largest_messages() -> list[m.Message]:
    key = "5" + "F" * (agg.MAX_HOTKEY_CHARS - 1)
    name = "n" * MAX_NAME_CHARS
    hotkeys = lambda n, tag: [f"{tag}{i:03d}".ljust(agg.MAX_HOTKEY_CHARS, "x") for i in range(n)]  # noqa: E731
    big = 2**63 - 1
    return [
        make_open(round_id=big, hyperparameters={f"{i:02d}".ljust(MAX_NAME_CHARS, "h"): 1e-300 for i in
                                                 range(MAX_HYPERPARAMETERS)},
                  clip_bound=1e300, quant_bits=32, max_contributors=MAX_ROUND_CONTRIBUTORS, key_bits=big,
                  ciphertexts_per_contribution=big, max_contribution_bytes=big, deadline_ms=big - 1,
                  final_deadline_ms=big, min_contributors=MAX_ROUND_CONTRIBUTORS,
                  committee=hotkeys(MAX_COMMITTEE, "c"), threshold=MAX_COMMITTEE,
                  validators=hotkeys(MAX_VALIDATORS, "v")),
        Contribution(big, h("x"), big, big),
        ContributionVerdict(big, key, h("x"), False, name, h("e")),
        AcceptedSet(big, hotkeys(MAX_ROUND_CONTRIBUTORS, "t"), [h(str(i)) for i in range(MAX_ROUND_CONTRIBUTORS)],
                    h("a")),
        PartialDecryption(big, h("a"), h("p")),
        RoundFinal(big, h("b"), h("n"), h("a"), hotkeys(MAX_ROUND_CONTRIBUTORS, "t"),
                   {f"{i:02d}".ljust(MAX_NAME_CHARS, "s"): 1e-300 for i in range(MAX_STATS)}),
        RoundAborted(big, name),
    ]


@pytest.mark.parametrize("message", largest_messages(), ids=lambda msg: msg.TYPE)
def test_max_bytes_is_honest(message):
    """The largest message the machines accept fits its limit, and the limit is not
    more than twice what it needs."""
    raw = m.encode(message)
    assert message.MAX_BYTES // 2 < len(raw) <= message.MAX_BYTES
    assert m.decode(raw, channel=m.Channel.TRAIN) == message


def test_messages_live_on_the_train_channel_only():
    raw = m.encode(contribution(T1, make_open()))
    with pytest.raises(m.WrongChannel):
        m.decode(raw, channel=m.Channel.MEMBERSHIP)
    too_long = AcceptedSet(1, [T1] * 600, [h("x")] * 600, h("a"))
    with pytest.raises(ValueError, match="limit"):
        m.encode(too_long)


def test_sender_policies_hold_through_epistula():
    trainer, validator = Hotkey.from_uri("//Bob"), Hotkey.from_uri("//Alice")
    directory = StaticDirectory((Member(validator.ss58_address, frozenset({Role.VALIDATOR}), 1.0),
                                 Member(trainer.ss58_address, frozenset({Role.TRAINER}), 1.0)))
    verifier = ep.EnvelopeVerifier(directory, validator.ss58_address)
    now = 1_700_000_000_000
    ok = seal_message(trainer, contribution(T1, make_open()), now_ms=now).to_gossip_bytes()
    got = open_gossip(ok, channel=m.Channel.TRAIN, verifier=verifier, now_ms=now, max_bytes=1 << 20)
    assert got.member.hotkey == trainer.ss58_address and isinstance(got.message, Contribution)
    forged = seal_message(trainer, AcceptedSet(7, [], [], ""), now_ms=now).to_gossip_bytes()
    with pytest.raises(ep.SignerNotAllowed):
        open_gossip(forged, channel=m.Channel.TRAIN, verifier=verifier, now_ms=now, max_bytes=1 << 20)


# --- round configuration --------------------------------------------------------------


@pytest.mark.parametrize("changes, hint", [
    ({"base_adapter_id": "not-a-hash"}, "base_adapter_id"),
    ({"deadline_ms": 20_000}, "deadline"),
    ({"min_contributors": 11}, "min_contributors"),
    ({"min_contributors": 0}, "min_contributors"),
    ({"threshold": 4}, "threshold"),
    ({"threshold": 0}, "threshold"),
    ({"committee": [C1, C1, C2]}, "twice"),
    ({"committee": []}, "committee"),
    ({"validators": ["x" * 49]}, "characters"),
    ({"clip_bound": float("nan")}, "clip_bound"),
    ({"hyperparameters": {"lr": float("inf")}}, "finite"),
    ({"quant_bits": 1}, "quant_bits"),
    ({"max_contributors": MAX_ROUND_CONTRIBUTORS + 1}, "max_contributors"),
])
def test_bad_round_open_is_refused_with_a_reason(changes, hint):
    bad = make_open(**changes)
    with pytest.raises(LocalProtocolError, match=hint):
        agg.ValidatorRound(bad, V1)
    for machine in (agg.CommitteeRound(C1), agg.TrainerRound(T1)):
        with pytest.raises(RemoteProtocolError, match=hint) as info:
            join(machine, bad, mesh=mesh_of(make_open()))
        assert info.value.reason == "bad_round_open"
        assert machine.round_open is None


def test_quorum_is_a_strict_majority():
    assert [agg.quorum(make_open(validators=[f"v{i}" for i in range(n)])) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


# --- a whole round ---------------------------------------------------------------------


class Round:
    """Two validators, three members (t = 2) and three trainers, wired by hand."""

    def __init__(self, **changes) -> None:
        self.ro = make_open(**changes)
        self.validators = {v: agg.ValidatorRound(self.ro, v) for v in self.ro.validators}
        self.committee = {c: agg.CommitteeRound(c) for c in self.ro.committee}
        for c in self.committee.values():
            join(c, self.ro)

    def publish_sets(self, trainers_seen, cheaters=()):
        sets = {}
        for v, machine in self.validators.items():
            collect(machine, trainers_seen[v], cheaters=cheaters)
            effects = machine.close_collection(now_ms=self.ro.deadline_ms)
            for compute in of(effects, agg.ComputeAggregate):
                effects = machine.compute_aggregate(aggregate_id(compute.blob_ids))
            (sets[v],) = sent(effects, AcceptedSet)
        return sets

    def exchange_sets(self, sets):
        effects = {}
        for v, machine in self.validators.items():
            effects[v] = [e for w, s in sets.items() if w != v for e in machine.receive_accepted_set(w, s)]
        for c, member in self.committee.items():
            effects[c] = [e for w, s in sets.items() for e in member.receive_accepted_set(w, s)]
        return effects

    def release(self, member: str, *, good: bool = True) -> PartialDecryption:
        machine = self.committee[member]
        (compute,) = machine.resume_effects()
        (decrypt,) = of(machine.compute_aggregate(aggregate_id(compute.blob_ids)), agg.DecryptPartial)
        tag = "good" if good else "bad"
        (partial,) = sent(machine.release_partial(decrypt.aggregate_id, h(f"partial:{member}:{tag}")),
                          PartialDecryption)
        return partial


def test_a_round_with_a_cheater_and_a_wrong_partial_ends_with_one_adapter():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2, T3], V2: [T3, T2, T1]}, cheaters=[T3])
    assert sets[V1] == sets[V2]
    assert sets[V1].contributors == [T1, T2] and sets[V1].blob_ids == [h(f"blob:{T1}"), h(f"blob:{T2}")]
    effects = r.exchange_sets(sets)
    assert all(machine.phase is Phase.DECRYPT for machine in r.validators.values())
    assert all(of(effects[c], agg.ComputeAggregate) for c in r.committee)
    # The invalid contribution is excluded with its evidence, for settlement.
    assert r.validators[V1].exclusions() == [agg.Exclusion(T3, h(f"blob:{T3}"), "range_proof", h(f"evidence:{T3}"))]

    partials = {c: r.release(c, good=(c != C1)) for c in (C1, C2, C3)}
    v1 = r.validators[V1]
    (check,) = of(v1.receive_partial(C1, partials[C1]), agg.VerifyPartialBlob)
    assert (check.member_index, check.partial_blob_id) == (1, h(f"partial:{C1}:bad"))
    assert v1.verify_partial(C1, valid=False, reason="share_proof") == []
    assert v1.bad_partials == {C1: "share_proof"}  # excluded, named
    v1.receive_partial(C2, partials[C2])
    assert v1.verify_partial(C2, valid=True, blocks=ALL_BLOCKS) == []  # one valid partial: t = 2 not reached
    v1.receive_partial(C3, partials[C3])
    (combine,) = v1.verify_partial(C3, valid=True, blocks=ALL_BLOCKS)
    assert combine.partials == ((2, h(f"partial:{C2}:good")), (3, h(f"partial:{C3}:good")))
    assert combine.contributors == 2 and combine.base_adapter_id == r.ro.base_adapter_id
    (final,) = sent(v1.finalize(h("adapter"), {"l2": 0.25}), RoundFinal)
    assert v1.phase is Phase.FINAL
    assert final == RoundFinal(7, r.ro.base_adapter_id, h("adapter"), sets[V1].aggregate_id, [T1, T2], {"l2": 0.25})
    assert agg.HonestValidatorsAgreeOnAdapter(r.validators.values())
    assert agg.OnlyAgreedAggregateDecrypted(r.validators.values(), r.committee.values())
    assert agg.FinalContainsOnlyValidContributions(r.validators.values(), {T1: h(f"blob:{T1}"), T2: h(f"blob:{T2}")})
    assert not agg.FinalContainsOnlyValidContributions(r.validators.values(), {T1: h(f"blob:{T1}")})


def test_the_committee_tolerates_n_minus_t_members_gone():
    r = Round()
    r.exchange_sets(r.publish_sets({V1: [T1, T2], V2: [T1, T2]}))
    v2 = r.validators[V2]
    for c in (C1, C3):  # C2 never answers
        v2.receive_partial(c, r.release(c))
    effects = [e for c in (C1, C3) for e in v2.verify_partial(c, valid=True, blocks=ALL_BLOCKS)]
    assert of(effects, agg.CombinePartials)[0].partials[0][0] == 1


def test_partials_that_arrive_early_wait_for_the_agreed_aggregate():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    for c in r.committee.values():
        for w, s in sets.items():
            c.receive_accepted_set(w, s)
    partial = r.release(C1)
    wrong = dataclasses.replace(r.release(C2), aggregate_id=h("another aggregate"))
    v1 = r.validators[V1]
    assert v1.receive_partial(C1, partial) == [] and v1.receive_partial(C2, wrong) == []
    effects = v1.receive_accepted_set(V2, sets[V2])
    assert [e.member for e in of(effects, agg.VerifyPartialBlob)] == [C1]
    assert v1.bad_partials == {C2: "wrong_aggregate"}


def test_a_verdict_still_pending_at_the_deadline_is_waited_for():
    ro = make_open()
    v = agg.ValidatorRound(ro, V1)
    v.open_round(now_ms=0)
    for t in (T1, T2):
        v.receive_contribution(t, contribution(t, ro), now_ms=9_999)
    v.verify_contribution(T1, valid=True)
    assert v.close_collection(now_ms=10_000) == [agg.EnterPhase("aggregate")]
    (verdict, compute) = v.verify_contribution(T2, valid=True)
    assert isinstance(verdict, agg.Send) and compute.blob_ids == (h(f"blob:{T1}"), h(f"blob:{T2}"))


def test_below_min_contributors_at_the_deadline_aborts_and_nothing_is_decrypted():
    r = Round()
    sets = r.publish_sets({V1: [T1, T3], V2: [T1]}, cheaters=[T3])
    assert sets[V1].contributors == [T1] and sets[V1].aggregate_id == ""  # nothing aggregated
    effects = r.exchange_sets(sets)
    assert {machine.phase for machine in r.validators.values()} == {Phase.ABORTED}
    assert sent(effects[V1], RoundAborted) == [RoundAborted(7, "below_min_contributors")]
    assert all(c.phase is CommitteePhase.ABORTED for c in r.committee.values())
    assert not any(of(effects[c], (agg.ComputeAggregate, agg.DecryptPartial)) for c in r.committee)
    assert agg.NoDecryptionBelowMin(r.committee.values(), 2)


def test_validators_that_saw_different_sets_do_not_agree_and_abort():
    r = Round(min_contributors=1)
    sets = r.publish_sets({V1: [T1, T2], V2: [T1]})
    effects = r.exchange_sets(sets)
    assert sent(effects[V1], RoundAborted) == [RoundAborted(7, "no_agreement")]
    assert all(c.phase is CommitteePhase.ABORTED and c.agreed is None for c in r.committee.values())


def test_a_minority_validator_adopts_the_quorum_set_and_recomputes_its_aggregate():
    r = Round(validators=[V1, V2, V3])
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2], V3: [T1]})  # V3 missed T2's contribution
    v3 = r.validators[V3]
    assert v3.receive_accepted_set(V1, sets[V1]) == []
    effects = v3.receive_accepted_set(V2, sets[V2])
    (compute,) = of(effects, agg.ComputeAggregate)
    assert v3.phase is Phase.DECRYPT and compute.blob_ids == tuple(sets[V1].blob_ids)
    with pytest.raises(LocalProtocolError):
        v3.verify_partial(C1, valid=True, blocks=ALL_BLOCKS)
    assert v3.compute_aggregate(sets[V1].aggregate_id) == [] and v3.aggregate_confirmed
    # ...and a recomputation that does not match the agreed id stops the round there.
    other = agg.ValidatorRound.from_state(v3.to_state())
    other.aggregate_confirmed = False
    assert sent(other.compute_aggregate(h("something else")), RoundAborted)[0].reason == "aggregate_mismatch"


def test_a_quorum_set_with_a_contribution_we_rejected_is_refused():
    r = Round(validators=[V1, V2, V3])
    sets = r.publish_sets({V1: [T1, T2, T3], V2: [T1, T2, T3], V3: [T1, T2, T3]}, cheaters=[T3])
    liar = AcceptedSet(7, [T1, T2, T3], [h(f"blob:{t}") for t in (T1, T2, T3)], h("x"))
    v3 = r.validators[V3]
    v3.receive_accepted_set(V1, liar)
    effects = v3.receive_accepted_set(V2, liar)
    assert sent(effects, RoundAborted)[0].reason == "agreed_set_includes_rejected"
    assert sets[V3].contributors == [T1, T2]


def test_the_committee_releases_only_the_agreed_aggregate():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    c = r.committee[C1]
    with pytest.raises(LocalProtocolError):
        c.release_partial(sets[V1].aggregate_id, h("p"))  # no agreement yet
    assert c.receive_accepted_set(V1, sets[V1]) == []
    (_, compute) = c.receive_accepted_set(V2, sets[V2])
    with pytest.raises(LocalProtocolError):
        c.release_partial(sets[V1].aggregate_id, h("p"))  # aggregate not recomputed yet
    (decrypt,) = c.compute_aggregate(aggregate_id(compute.blob_ids))
    assert decrypt == agg.DecryptPartial(7, sets[V1].aggregate_id)
    with pytest.raises(LocalProtocolError, match="refusing"):
        c.release_partial(h("another aggregate"), h("p"))
    c.release_partial(sets[V1].aggregate_id, h("p"))
    assert c.phase is CommitteePhase.RELEASED
    with pytest.raises(LocalProtocolError):
        c.release_partial(sets[V1].aggregate_id, h("p"))  # once per round


def test_a_committee_member_that_recomputes_another_aggregate_releases_nothing():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    c = r.committee[C2]
    for w, s in sets.items():
        c.receive_accepted_set(w, s)
    assert c.compute_aggregate(h("not the agreed one")) == [agg.EnterPhase("aborted", "aggregate_mismatch")]
    assert c.resume_effects() == []


def test_the_final_deadline_aborts_what_is_unfinished():
    r = Round()
    r.exchange_sets(r.publish_sets({V1: [T1, T2], V2: [T1, T2]}))
    v1 = r.validators[V1]
    with pytest.raises(LocalProtocolError):
        v1.final_deadline(now_ms=19_999)
    assert sent(v1.final_deadline(now_ms=20_000), RoundAborted) == [RoundAborted(7, "not_enough_partials")]
    assert v1.final_deadline(now_ms=20_001) == []  # already over
    late = agg.ValidatorRound(make_open(), V2)
    assert sent(late.final_deadline(now_ms=20_000), RoundAborted)[0].reason == "never_opened"


def test_shell_work_that_ends_after_the_final_deadline_changes_nothing():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    r.exchange_sets(sets)
    member = r.committee[C1]
    member.compute_aggregate(sets[V1].aggregate_id)
    member.final_deadline(now_ms=20_000)
    assert member.release_partial(sets[V1].aggregate_id, h("late")) == []
    assert member.phase is CommitteePhase.ABORTED and not member.released_blob_id
    v1 = r.validators[V1]
    for c in (C2, C3):
        v1.receive_partial(c, r.release(c))
        v1.verify_partial(c, valid=True, blocks=ALL_BLOCKS)
    v1.final_deadline(now_ms=20_000)
    assert v1.abort_reason == "combine_timeout"
    assert v1.finalize(h("late adapter"), {}) == [] and v1.adapter_id == ""
    trainer = agg.TrainerRound(T1)
    join(trainer, r.ro)
    trainer.final_deadline(now_ms=20_000)
    assert trainer.contribute(h("b"), ciphertext_count=12, size_bytes=1, now_ms=20_001) == []


# --- bad input ---------------------------------------------------------------------------


def opened(**changes) -> agg.ValidatorRound:
    v = agg.ValidatorRound(make_open(**changes), V1)
    v.open_round(now_ms=0)
    return v


def with_contribution(**changes) -> agg.ValidatorRound:
    v = opened()
    v.receive_contribution(T1, contribution(T1, v.round_open), now_ms=5)
    return v


@pytest.mark.parametrize("setup, event, reason", [
    (opened, lambda v: v.receive_contribution(T1, Contribution(8, h("b"), 12, 1), now_ms=5), "wrong_round"),
    (opened, lambda v: v.receive_contribution(T1, contribution(T1, v.round_open), now_ms=10_000), "late_contribution"),
    (lambda: agg.ValidatorRound(make_open(), V1),
     lambda v: v.receive_contribution(T1, contribution(T1, v.round_open), now_ms=5), "round_not_open"),
    (opened, lambda v: v.receive_contribution(T1, Contribution(7, "B" * 64, 12, 1), now_ms=5), "bad_blob_id"),
    (opened, lambda v: v.receive_contribution(T1, Contribution(7, h("b"), 11, 1), now_ms=5), "wrong_ciphertext_count"),
    (opened, lambda v: v.receive_contribution(T1, Contribution(7, h("b"), 12, 1 << 23), now_ms=5),
     "oversized_contribution"),
    (opened, lambda v: v.receive_contribution(T1, Contribution(7, h("b"), 12, 0), now_ms=5), "oversized_contribution"),
    (with_contribution, lambda v: v.receive_contribution(T1, Contribution(7, h("other"), 12, 1), now_ms=5),
     "second_contribution"),
    (lambda: opened(max_contributors=1, min_contributors=1), lambda v: [  # candidates: 4 per place
        v.receive_contribution(t, contribution(t, v.round_open), now_ms=5) for t in (T1, T2, T3, "t4", "t5")],
     "round_full"),
    (opened, lambda v: v.receive_accepted_set("stranger", AcceptedSet(7, [], [], "")), "not_a_round_validator"),
    (opened, lambda v: v.receive_accepted_set(V2, AcceptedSet(7, [T2, T1], [h("1"), h("2")], h("a"))),
     "bad_accepted_set"),
    (opened, lambda v: v.receive_accepted_set(V2, AcceptedSet(7, [T1, T2], [h("1")], h("a"))), "bad_accepted_set"),
    (opened, lambda v: v.receive_accepted_set(V2, AcceptedSet(7, [T1, T2], [h("1"), h("1")], h("a"))),
     "bad_accepted_set"),
    (opened, lambda v: v.receive_accepted_set(V2, AcceptedSet(7, [T1], [h("1")], h("a"))), "bad_accepted_set"),
    (opened, lambda v: v.receive_accepted_set(V2, AcceptedSet(7, [T1, T2], [h("1"), h("2")], "")), "bad_accepted_set"),
    (opened, lambda v: [v.receive_accepted_set(V2, AcceptedSet(7, [], [], "")),
                        v.receive_accepted_set(V2, AcceptedSet(7, [T1], [h("1")], ""))], "equivocation"),
    (opened, lambda v: v.receive_partial("stranger", PartialDecryption(7, h("a"), h("p"))), "not_a_committee_member"),
    (opened, lambda v: v.receive_partial(C1, PartialDecryption(7, "a", h("p"))), "bad_blob_id"),
    (opened, lambda v: [v.receive_partial(C1, PartialDecryption(7, h("a"), h("p"))),
                        v.receive_partial(C1, PartialDecryption(7, h("a"), h("q")))], "second_partial"),
])
def test_a_peers_bad_input_is_refused_with_a_reason_and_changes_nothing(setup, event, reason):
    v = setup()
    with pytest.raises(RemoteProtocolError) as info:
        event(v)
    assert info.value.reason == reason and info.value.hint
    # A rejected event leaves no trace: replaying the accepted prefix gives the same state.
    again = setup()
    with pytest.raises(RemoteProtocolError):
        event(again)
    assert again.to_state() == v.to_state()


def test_a_rejected_message_leaves_the_machine_as_it_was():
    v = with_contribution()
    before = v.to_state()
    for bad in (Contribution(7, h("other"), 12, 1), Contribution(7, h("b"), 11, 1), Contribution(8, h("b"), 12, 1)):
        with pytest.raises(RemoteProtocolError):
            v.receive_contribution(T1 if bad.blob_id == h("other") else T2, bad, now_ms=5)
        assert v.to_state() == before


@pytest.mark.parametrize("event", [
    lambda v: v.open_round(now_ms=0),  # twice
    lambda v: v.close_collection(now_ms=9_999),  # before the deadline
    lambda v: v.verify_contribution(T2, valid=True),  # nothing pending for T2
    lambda v: v.verify_contribution(T1, valid=False, reason="", evidence_id=h("e")),  # no reason
    lambda v: v.verify_contribution(T1, valid=False, reason="r", evidence_id="nope"),  # no evidence
    lambda v: v.compute_aggregate(h("a")),  # nothing asked
    lambda v: v.finalize(h("adapter"), {}),  # no combine
    lambda v: v.combine_fails("x"),
    lambda v: v.verify_partial(C1, valid=True, blocks=ALL_BLOCKS),
])
def test_our_own_misuse_is_a_local_error(event):
    v = with_contribution()
    with pytest.raises(LocalProtocolError):
        event(v)


def test_committee_and_trainer_refuse_messages_before_their_round_open():
    for machine, call in ((agg.CommitteeRound(C1), lambda c: c.receive_accepted_set(V1, AcceptedSet(7, [], [], ""))),
                          (agg.TrainerRound(T1), lambda t: t.receive_round_aborted(V1, RoundAborted(7, "x")))):
        with pytest.raises(RemoteProtocolError) as info:
            call(machine)
        assert info.value.reason == "unknown_round"


def test_a_conflicting_round_open_and_a_stranger_announcing_are_refused():
    c = agg.CommitteeRound(C1)
    join(c, make_open())
    assert join(c, make_open(), V2) == []  # the same announcement re-sent by another validator
    with pytest.raises(RemoteProtocolError) as info:
        join(c, make_open(deadline_ms=11_000), V2)
    assert info.value.reason == "conflicting_round_open"
    with pytest.raises(RemoteProtocolError) as info:
        join(agg.TrainerRound(T1), make_open(), "stranger")
    assert info.value.reason == "not_the_scheduled_opener"
    with pytest.raises(LocalProtocolError):
        join(agg.CommitteeRound("not a member"), make_open())


# --- the trainer -------------------------------------------------------------------------


def test_a_trainer_contributes_once_and_learns_the_adapter():
    ro = make_open()
    t = agg.TrainerRound(T1)
    effects = join(t, ro)
    assert of(effects, agg.Train) == [agg.Train(ro)] and t.phase is TrainerPhase.TRAINING
    (msg,) = sent(t.contribute(h("blob"), ciphertext_count=12, size_bytes=100, now_ms=9_999), Contribution)
    assert msg == Contribution(7, h("blob"), 12, 100)
    with pytest.raises(LocalProtocolError):
        t.contribute(h("blob2"), ciphertext_count=12, size_bytes=100, now_ms=9_999)
    final = RoundFinal(7, ro.base_adapter_id, h("new"), h("agg"), [T1, T2], {})
    t.receive_round_final(V2, final)
    assert (t.phase, t.adapter_id, t.included) == (TrainerPhase.FINAL, h("new"), True)
    assert t.receive_round_final(V1, final) == []
    with pytest.raises(RemoteProtocolError) as info:
        t.receive_round_final(V1, dataclasses.replace(final, adapter_id=h("other")))
    assert info.value.reason == "conflicting_final"


def test_a_trainer_that_finishes_after_the_deadline_sends_nothing():
    t = agg.TrainerRound(T1)
    join(t, make_open())
    effects = t.contribute(h("blob"), ciphertext_count=12, size_bytes=100, now_ms=10_000)
    assert sent(effects, Contribution) == [] and t.phase is TrainerPhase.MISSED
    t.receive_round_aborted(V1, RoundAborted(7, "below_min_contributors"))
    assert (t.phase, t.abort_reason) == (TrainerPhase.ABORTED, "below_min_contributors")
    late = agg.TrainerRound(T2)
    assert join(late, make_open(), now_ms=10_000)[0].phase == "missed"
    bad_shape = agg.TrainerRound(T3)
    join(bad_shape, make_open())
    with pytest.raises(LocalProtocolError):
        bad_shape.contribute(h("blob"), ciphertext_count=11, size_bytes=100, now_ms=0)


def test_a_trainer_whose_model_was_late_skips_rounds_it_can_no_longer_contribute_to():
    """A node that just started or joined (issue 15) has RoundOpens queued before its model
    loads: it trains only for a round whose deadline is ahead, never for one that ended
    or timed out meanwhile (that CPU would make it miss the open round too)."""
    ro = make_open()  # deadline at 10_000
    t = agg.TrainerRound(T1)
    assert not t.worth_training(0)  # not joined
    join(t, ro)
    assert t.worth_training(9_999) and not t.worth_training(10_000)
    ended = agg.TrainerRound(T2)
    join(ended, ro)
    ended.receive_round_final(V1, RoundFinal(7, ro.base_adapter_id, h("new"), h("agg"), [T1], {}))
    assert not ended.worth_training(0)
    done = agg.TrainerRound(T3)
    join(done, ro)
    done.contribute(h("blob"), ciphertext_count=12, size_bytes=100, now_ms=1)
    assert not done.worth_training(2)  # contributed already


# --- persistence: resume in every phase ----------------------------------------------------


def roundtrip(machine):
    raw = msgpack.packb(machine.to_state(), use_bin_type=True)
    again = type(machine).from_state(msgpack.unpackb(raw, raw=False))
    assert again.to_state() == machine.to_state()
    return again


def validator_in_every_phase():
    """(label, machine, expected resume effect types, a way to finish the round)."""
    ro = make_open()
    sets = Round().publish_sets({V1: [T1, T2], V2: [T1, T2]})
    other = sets[V2]
    out = []
    v = agg.ValidatorRound(ro, V1)
    out.append(("open", v, []))
    v = agg.ValidatorRound(ro, V1)
    v.open_round(now_ms=0)
    v.receive_contribution(T1, contribution(T1, ro), now_ms=1)
    v.receive_contribution(T2, contribution(T2, ro), now_ms=1)
    v.verify_contribution(T1, valid=True)
    out.append(("collect", v, [agg.VerifyContributionBlob]))
    v = agg.ValidatorRound.from_state(v.to_state())
    v.verify_contribution(T2, valid=True)
    v.close_collection(now_ms=10_000)
    out.append(("aggregate", v, [agg.ComputeAggregate]))
    v = agg.ValidatorRound.from_state(v.to_state())
    v.compute_aggregate(other.aggregate_id)
    v.receive_partial(C1, PartialDecryption(7, other.aggregate_id, h("p1")))
    v.receive_accepted_set(V2, other)
    out.append(("decrypt", v, [agg.VerifyPartialBlob]))
    v = agg.ValidatorRound.from_state(v.to_state())
    v.verify_partial(C1, valid=True, blocks=ALL_BLOCKS)
    v.receive_partial(C2, PartialDecryption(7, other.aggregate_id, h("p2")))
    v.verify_partial(C2, valid=True, blocks=ALL_BLOCKS)
    out.append(("combining", v, [agg.CombinePartials]))
    v = agg.ValidatorRound.from_state(v.to_state())
    v.finalize(h("adapter"), {"l2": 1.0})
    out.append(("final", v, []))
    v = agg.ValidatorRound(ro, V1)
    v.final_deadline(now_ms=20_000)
    out.append(("aborted", v, []))
    return out


@pytest.mark.parametrize("label, machine, expected", validator_in_every_phase(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_a_restarted_validator_resumes_in_every_phase(label, machine, expected):
    again = roundtrip(machine)
    assert again.phase.value == {"combining": "decrypt"}.get(label, label)
    assert [type(e) for e in again.resume_effects()] == expected
    # It goes on exactly as the original would: feed both the same next events.
    for m_ in (machine, again):
        for effect in m_.resume_effects():
            if isinstance(effect, agg.VerifyContributionBlob):
                m_.verify_contribution(effect.trainer, valid=True)
            elif isinstance(effect, agg.ComputeAggregate):
                m_.compute_aggregate(aggregate_id(effect.blob_ids))
            elif isinstance(effect, agg.VerifyPartialBlob):
                m_.verify_partial(effect.member, valid=True, blocks=ALL_BLOCKS)
            elif isinstance(effect, agg.CombinePartials):
                m_.finalize(h("adapter"), {})
    assert again.to_state() == machine.to_state()


def test_a_restarted_committee_member_and_trainer_resume_in_every_phase():
    r = Round()
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    c = agg.CommitteeRound(C1)
    seen = [(roundtrip(c).phase, c.resume_effects())]
    join(c, r.ro)
    seen.append((roundtrip(c).phase, roundtrip(c).resume_effects()))
    for w, s in sets.items():
        c.receive_accepted_set(w, s)
    seen.append((roundtrip(c).phase, [type(e) for e in roundtrip(c).resume_effects()]))
    c = roundtrip(c)
    c.compute_aggregate(sets[V1].aggregate_id)
    seen.append((roundtrip(c).phase, [type(e) for e in roundtrip(c).resume_effects()]))
    c = roundtrip(c)
    c.release_partial(sets[V1].aggregate_id, h("p"))
    seen.append((roundtrip(c).phase, roundtrip(c).resume_effects()))
    assert seen == [
        (CommitteePhase.WAITING, []), (CommitteePhase.WATCH, []),
        (CommitteePhase.DECRYPT, [agg.ComputeAggregate]), (CommitteePhase.DECRYPT, [agg.DecryptPartial]),
        (CommitteePhase.RELEASED, []),
    ]
    aborted = agg.CommitteeRound(C2)
    join(aborted, r.ro)
    aborted.final_deadline(now_ms=20_000)
    assert roundtrip(aborted).phase is CommitteePhase.ABORTED and roundtrip(aborted).abort_reason == "no_agreement"

    t = agg.TrainerRound(T1)
    phases = [roundtrip(t).phase]
    join(t, r.ro)
    assert roundtrip(t).resume_effects() == [agg.Train(r.ro)]
    phases.append(roundtrip(t).phase)
    t = roundtrip(t)
    t.contribute(h("b"), ciphertext_count=12, size_bytes=1, now_ms=1)
    phases.append(roundtrip(t).phase)
    t = roundtrip(t)
    t.receive_round_final(V1, RoundFinal(7, r.ro.base_adapter_id, h("n"), h("a"), [T1], {}))
    phases.append(roundtrip(t).phase)
    assert phases == [TrainerPhase.WAITING, TrainerPhase.TRAINING, TrainerPhase.CONTRIBUTED, TrainerPhase.FINAL]
    assert roundtrip(t).included


def test_a_state_of_another_version_or_kind_is_refused():
    state = agg.ValidatorRound(make_open(), V1).to_state()
    with pytest.raises(LocalProtocolError, match="version"):
        agg.ValidatorRound.from_state({**state, "v": 2})
    with pytest.raises(LocalProtocolError):
        agg.CommitteeRound.from_state(state)
    with pytest.raises(LocalProtocolError):
        agg.ValidatorRound.from_state({**state, "round_open": b"\x00junk"})


# --- the spec and the code name the same things --------------------------------------------


def spec_text(name: str) -> str:
    return (ROOT / "specs" / name).read_text()


def test_every_tla_action_is_a_method_and_every_method_an_action():
    tla = spec_text("SecureAggregation.tla")
    next_block = tla[tla.index("Next ==") : tla.index("Spec ==")]
    used = set(re.findall(r"\b([A-Z][A-Za-z]+)\(", next_block)) | set(re.findall(r"\\/ ([A-Z][A-Za-z]+)\b", next_block))
    actions = used - {"Cardinality"}
    assert actions == set(agg.ACTIONS) | set(agg.ENVIRONMENT_ACTIONS) | set(agg.ADVERSARY_ACTIONS)
    for name, implementations in agg.ACTIONS.items():
        assert re.search(rf"^{name}\(.*\) ==", tla, re.M), name
        for cls, method in implementations:
            assert callable(getattr(cls, method)), (name, method)
            assert method == re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_the_cfg_checks_exactly_the_python_invariants():
    cfg = spec_text("SecureAggregation.cfg")
    tla = spec_text("SecureAggregation.tla")
    block = re.search(r"^INVARIANTS?\n((?:[ \t]+\w+\n)+)", cfg, re.M)
    assert block, "the cfg lists its invariants one per indented line"
    names = set(block.group(1).split())
    assert names == set(agg.INVARIANTS)
    for name in agg.INVARIANTS:
        assert re.search(rf"^{name} ==", tla, re.M) and callable(getattr(agg, name))


# --- the blame step after a slot overflow (issue 11 finding 5) ------------------------------


def _overflowing_round():
    ro = make_open()
    v = agg.ValidatorRound(ro, V1)
    collect(v, [T1, T2, T3])
    own = close_and_publish(v)
    v.receive_accepted_set(V2, own)
    for member in (C1, C2):
        v.receive_partial(member, PartialDecryption(ro.round_id, own.aggregate_id, h(f"partial:{member}")))
        v.verify_partial(member, valid=True, blocks=ALL_BLOCKS)
    assert v.combining
    return ro, v, own


def test_finding5_an_overflow_names_who_fails_or_stays_silent_and_no_one_else():
    ro, v, own = _overflowing_round()
    effects = v.slot_overflow(0, 3, False, now_ms=15_000, blame_ms=5_000)
    (request,) = sent(effects, BlameRequest)
    assert v.phase is Phase.BLAME and (request.plaintext_index, request.slot, request.top) == (0, 3, False)
    assert of(effects, agg.SetTimer) == [agg.SetTimer("blame_deadline", 20_000)]
    assert v.final_deadline(now_ms=20_000) == [] and v.phase is Phase.BLAME  # the blame deadline ends it
    answer = lambda t: SlotProof(ro.round_id, own.aggregate_id, 0, 3, False, h(f"proof:{t}"))  # noqa: E731
    (verify,) = of(v.receive_slot_proof(T1, answer(T1)), agg.VerifySlotProofBlob)
    assert verify.contribution_blob_id == h(f"blob:{T1}") and verify.position == agg.BlamePosition(0, 3, False)
    v.receive_slot_proof(T2, answer(T2))
    other = SlotProof(ro.round_id, own.aggregate_id, 1, 3, False, h("proof:other"))
    assert v.receive_slot_proof(T3, other) == []  # an answer to another position is not ours
    with pytest.raises(RemoteProtocolError, match="second_slot_proof|different"):
        v.receive_slot_proof(T2, SlotProof(ro.round_id, own.aggregate_id, 0, 3, False, h("again")))
    assert v.verify_slot_proof(T1, valid=True) == []
    assert v.verify_slot_proof(T2, valid=False, reason="bad_slot_proof") == []
    assert v.blame_deadline(now_ms=20_000)
    assert v.phase is Phase.ABORTED and v.abort_reason == "slot_overflow_named"
    assert v.bad_contributors == {T2: agg.NAMED_OUT_OF_RANGE, T3: agg.NAMED_SILENT}
    assert agg.HonestNeverNamed([v], [T1]) and agg.OverflowNamesAByzantine([v], [T2, T3])
    assert not agg.HonestNeverNamed([v], [T1, T3])
    again = agg.ValidatorRound.from_state(msgpack.unpackb(msgpack.packb(v.to_state()), raw=False))
    assert again.to_state() == v.to_state()
    # the named are refused as contributors for the next COOLDOWN_ROUNDS rounds
    barred = agg.cooling_down({ro.round_id: v.bad_contributors}, ro.round_id + 1)
    assert barred == {T2, T3} and agg.cooling_down({ro.round_id: v.bad_contributors}, ro.round_id + 4) == set()
    nxt = agg.ValidatorRound(make_open(round_id=ro.round_id + 1), V1, barred=barred)
    nxt.open_round(now_ms=1_000)
    with pytest.raises(RemoteProtocolError, match="blame"):
        nxt.receive_contribution(T2, contribution(T2, nxt.round_open), now_ms=1_000)


def test_finding5_a_trainer_answers_a_blame_only_from_a_round_validator_for_its_own_contribution():
    ro = make_open()
    t = agg.TrainerRound(T1)
    join(t, ro)
    request = BlameRequest(ro.round_id, h("agg"), 0, 3, False)
    with pytest.raises(RemoteProtocolError, match="not_a_contributor|did not contribute"):
        t.receive_blame_request(V1, request)
    t.contribute(h("mine"), ciphertext_count=ro.ciphertexts_per_contribution, size_bytes=4096, now_ms=1_000)
    with pytest.raises(RemoteProtocolError) as info:
        t.receive_blame_request("someone", request)
    assert info.value.reason == "not_a_round_validator"
    with pytest.raises(RemoteProtocolError) as info:
        t.receive_blame_request(V1, BlameRequest(ro.round_id, h("agg"), ro.ciphertexts_per_contribution, 0, False))
    assert info.value.reason == "bad_blame_position"
    (prove,) = of(t.receive_blame_request(V1, request), agg.ProveSlots)
    assert prove.position == agg.BlamePosition(0, 3, False) and t.resume_effects() == [prove]
    (answer,) = sent(t.slot_proved(prove.position, h("proof")), SlotProof)
    assert answer.proof_blob_id == h("proof") and answer.aggregate_id == h("agg")
    assert sent(t.receive_blame_request(V2, request), SlotProof) == [answer]  # proven once, re-sent
    with pytest.raises(RemoteProtocolError) as info:  # each validator gets one position per round
        t.receive_blame_request(V1, BlameRequest(ro.round_id, h("agg"), 1, 3, False))
    assert info.value.reason == "second_blame_position"
    again = agg.TrainerRound.from_state(msgpack.unpackb(msgpack.packb(t.to_state()), raw=False))
    assert again.to_state() == t.to_state()
