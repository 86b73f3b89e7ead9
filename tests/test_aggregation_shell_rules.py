"""Issue 14 item 1: what the rounds shell re-sends, when its timers matter and whether it
joins a RoundOpen are the machines' answers (still_needed, a stale CloseCollection,
ValidatorRound.join_round / receive_round_open), not rules of the shell."""

import dataclasses

import pytest

from protocol import aggregation as agg
from protocol.aggregation import Phase
from protocol.aggregation_messages import AcceptedSet, PartialDecryption, RoundAborted, RoundFinal
from protocol.errors import RemoteProtocolError
from tests.test_aggregation import ALL_BLOCKS, C1, C2, T1, T2, V1, V2, Round, h, make_open, mesh_of, sent


def test_still_needed_follows_the_round():
    r = Round()
    v1, v2 = r.validators[V1], r.validators[V2]
    assert v1.still_needed() == [] and v2.still_needed() == []  # not open yet
    v1.open_round(now_ms=0)
    v2.open_round(now_ms=0)
    assert v1.still_needed() == [r.ro]  # the scheduled opener re-sends its RoundOpen while collecting
    assert v2.still_needed() == []  # nobody else's RoundOpen counts
    r.validators = {V1: agg.ValidatorRound(r.ro, V1), V2: agg.ValidatorRound(r.ro, V2)}
    sets = r.publish_sets({V1: [T1, T2], V2: [T1, T2]})
    v1 = r.validators[V1]
    assert v1.still_needed() == [sets[V1]] and isinstance(sets[V1], AcceptedSet)  # collection over: no RoundOpen
    r.exchange_sets(sets)
    member = r.committee[C1]
    assert member.still_needed() == []
    partial = r.release(C1)
    assert member.still_needed() == [partial]
    (cover,) = sent(member.release_cover(partial.aggregate_id, h("cover")), PartialDecryption)
    assert member.still_needed() == [partial, cover] and cover.cover
    for c in (C1, C2):
        v1.receive_partial(c, partial if c == C1 else r.release(C2))
        effects = v1.verify_partial(c, valid=True, blocks=ALL_BLOCKS)
    assert effects  # t = 2 valid partials: combine
    v1.finalize(h("adapter"), {"l2": 0.5})
    assert v1.still_needed() == [sets[V1], RoundFinal(7, r.ro.base_adapter_id, h("adapter"), sets[V1].aggregate_id,
                                                      [T1, T2], {"l2": 0.5})]
    v2 = r.validators[V2]
    v2.final_deadline(now_ms=r.ro.final_deadline_ms)
    assert v2.still_needed()[-1] == RoundAborted(7, v2.abort_reason) and v2.abort_reason == "not_enough_partials"


def test_a_stale_close_collection_timer_changes_nothing():
    """The shell no longer checks the phase before firing the deadline timer: after
    collection closed (or the round ended) the machine ignores it."""
    r = Round()
    r.publish_sets({V1: [T1, T2], V2: [T1]})
    v1 = r.validators[V1]
    assert v1.phase is Phase.AGGREGATE
    before = v1.to_state()
    assert v1.close_collection(now_ms=r.ro.deadline_ms + 1) == []
    assert v1.to_state() == before
    v1.final_deadline(now_ms=r.ro.final_deadline_ms)
    assert v1.phase is Phase.ABORTED and v1.close_collection(now_ms=r.ro.final_deadline_ms) == []


def test_a_validator_joins_only_by_the_rule_every_node_joins_by():
    """The checks the shell's _join made before building a ValidatorRound are the
    machine's JoinRound now (round_open_refusal), with the same reasons."""
    ro = make_open()
    mesh = mesh_of(ro)
    join = dict(me=V2, mesh=mesh, now_ms=0, last_round_id=ro.round_id - 1, expected_base=ro.base_adapter_id)
    v = agg.ValidatorRound.join_round(V1, ro, **join)
    assert v.phase is Phase.OPEN and v.round_open == ro
    for sender, message, reason in (
            (V2, ro, "not_the_scheduled_opener"),
            (V1, dataclasses.replace(ro, min_contributors=1), "round_policy_mismatch"),
            (V1, dataclasses.replace(ro, base_adapter_id=h("another base")), "wrong_base_adapter")):
        with pytest.raises(RemoteProtocolError) as info:
            agg.ValidatorRound.join_round(sender, message, **join)
        assert info.value.reason == reason
    assert v.receive_round_open(V1, ro) == []  # a re-sent copy
    before = v.to_state()
    with pytest.raises(RemoteProtocolError) as info:
        v.receive_round_open(V1, dataclasses.replace(ro, deadline_ms=ro.deadline_ms + 1))
    assert info.value.reason == "conflicting_round_open" and v.to_state() == before
