"""Issue 14 item 1: which decryption blocks a member covers, and which batches a combine
takes, are the machines' decisions (CommitteeRound.choose_cover -> CoverBlocks,
ValidatorRound -> CombinePartials.batches), driven here event by event.

A committee of three, t = 2: block 0 is asked of members (1, 2), block 1 of (2, 3),
block 2 of (3, 1) (agg.blocks_for); a combine needs, for every block, t valid batches
from distinct members, each from the member's first partial or its cover partial.
"""

import msgpack
import pytest

from protocol import aggregation as agg
from protocol.aggregation import CommitteePhase, Phase
from protocol.aggregation_messages import PartialDecryption
from protocol.errors import LocalProtocolError
from tests.test_aggregation import C1, C2, C3, T1, T2, V1, V2, Round, h, of, sent

OWN = {C1: (0, 2), C2: (0, 1), C3: (1, 2)}


def test_the_block_rules_live_in_the_protocol_package():
    blocks = agg.blocks_for(30, 3, 2)
    assert [b.members for b in blocks] == [(1, 2), (2, 3), (3, 1)]
    ro = Round().ro
    assert [b.members for b in agg.round_blocks(ro)] == [(1, 2), (2, 3), (3, 1)]
    assert {c: agg.own_blocks(ro, c) for c in (C1, C2, C3)} == OWN
    # member 3 gone before decrypting: 1 substitutes in block 1, 2 in block 2
    assert agg.blocks_to_decrypt(blocks, 1, {1, 2}, 2) == [0, 1, 2]
    assert agg.blocks_to_decrypt(blocks, 2, {1, 2}, 2) == [0, 1, 2]
    assert agg.cover(blocks, {1: [0, 2], 2: [0, 1]}, 2) is None
    assert agg.cover(blocks, {1: [0, 1, 2], 2: [0, 1, 2], 3: [1, 2]}, 2) == {0: [1, 2], 1: [1, 2], 2: [1, 2]}
    assert agg.cover(blocks, {1: [0, 0], 2: [1, 1], 3: [2, 2]}, 2) is None  # a block twice is one batch


def _decrypting_round():
    """Both validators agreed; every member released its partial (own blocks only)."""
    r = Round()
    r.exchange_sets(r.publish_sets({V1: [T1, T2], V2: [T1, T2]}))
    partials = {c: r.release(c) for c in (C1, C2, C3)}
    return r, partials


def _verify(v, member, msg, blocks, *, valid=True):
    (check,) = of(v.receive_partial(member, msg), agg.VerifyPartialBlob)
    assert check.cover is msg.cover and check.partial_blob_id == msg.partial_blob_id
    if valid:
        return v.verify_partial(member, valid=True, blocks=blocks, cover=msg.cover)
    return v.verify_partial(member, valid=False, reason="share_proof", cover=msg.cover)


def _cover(r, member, view) -> tuple[PartialDecryption, tuple[int, ...]]:
    c = r.committee[member]
    (cover_blocks,) = c.choose_cover(view)
    assert isinstance(cover_blocks, agg.CoverBlocks) and not c.cover_pending()
    assert c.resume_effects() == [cover_blocks]  # owed until released, after a restart too
    (msg,) = sent(c.release_cover(cover_blocks.aggregate_id, h(f"cover:{member}")), PartialDecryption)
    assert msg.cover and c.resume_effects() == []
    return msg, cover_blocks.blocks


def test_a_missing_member_is_covered_by_the_live_members_and_only_then_combined():
    r, partials = _decrypting_round()
    v = r.validators[V1]
    # member 3 stays silent: members 1 and 2 are valid, but block 1 (2, 3) and block 2
    # (3, 1) have one batch each, so the spec's combining is set and no combine is asked
    assert _verify(v, C1, partials[C1], OWN[C1]) == []
    assert _verify(v, C2, partials[C2], OWN[C2]) == []
    assert v.combining and v.combine_batches == ()
    view = v.cover_view()
    assert view == {1: (0, 2), 2: (0, 1)}
    # every member with that view picks the same substitutes: 1 covers block 1, 2 block 2
    assert r.committee[C1].cover_pending() and r.committee[C2].cover_pending()
    cover1, blocks1 = _cover(r, C1, view)
    cover2, blocks2 = _cover(r, C2, view)
    assert (blocks1, blocks2) == ((1,), (2,))
    assert r.committee[C3].choose_cover(view) == []  # never released: nothing to cover
    assert _verify(v, C1, cover1, blocks1) == []  # block 2 still has one batch
    assert v.cover_view() == {1: (0, 1, 2), 2: (0, 1)}
    (combine,) = _verify(v, C2, cover2, blocks2)
    p1, p2 = partials[C1].partial_blob_id, partials[C2].partial_blob_id
    c1, c2 = cover1.partial_blob_id, cover2.partial_blob_id
    assert combine.batches == ((0, ((1, p1), (2, p2))), (1, ((1, c1), (2, p2))), (2, ((1, p1), (2, c2))))
    assert combine.partials == ((1, p1), (2, p2)) and combine.contributors == 2
    # the decision is saved: a restarted validator asks for the same combine
    again = agg.ValidatorRound.from_state(msgpack.unpackb(msgpack.packb(v.to_state()), raw=False))
    assert of(again.resume_effects(), agg.CombinePartials) == [combine]
    # once every block is coverable, a member that had not chosen yet has nothing to do
    late = r.committee[C3]
    assert late.cover_pending()
    assert late.choose_cover(v.cover_view()) == [] and not late.cover_pending()
    v.finalize(h("adapter"), {})
    assert v.phase is Phase.FINAL


def test_every_block_from_first_partials_needs_no_cover():
    r, partials = _decrypting_round()
    v = r.validators[V1]
    _verify(v, C1, partials[C1], OWN[C1])
    _verify(v, C2, partials[C2], OWN[C2])
    (combine,) = _verify(v, C3, partials[C3], OWN[C3])
    p = {c: partials[c].partial_blob_id for c in (C1, C2, C3)}
    assert combine.batches == ((0, ((1, p[C1]), (2, p[C2]))), (1, ((2, p[C2]), (3, p[C3]))),
                               (2, ((1, p[C1]), (3, p[C3]))))
    member = r.committee[C1]
    assert member.choose_cover(v.cover_view()) == [] and not member.cover_pending()
    assert member.to_state()["cover_settled"] and member.cover_blocks == ()


def test_a_cover_that_cannot_reach_t_per_block_asks_for_no_combine():
    r, partials = _decrypting_round()
    v = r.validators[V1]
    _verify(v, C1, partials[C1], OWN[C1])
    _verify(v, C2, partials[C2], OWN[C2])
    _verify(v, C3, partials[C3], (), valid=False)  # member 3's partial has a bad proof
    assert v.bad_partials == {C3: "share_proof"}
    view = v.cover_view()
    cover1, blocks1 = _cover(r, C1, view)
    cover2, blocks2 = _cover(r, C2, view)
    # member 3's cover is valid, but its own partial is not: its batches never count
    c3 = PartialDecryption(7, partials[C1].aggregate_id, h("cover:member-3"), cover=True)
    assert _verify(v, C3, c3, (0, 1, 2)) == []
    assert _verify(v, C1, cover1, blocks1) == []
    # member 2's cover does not verify: block 2 keeps one valid batch, so no combine
    assert _verify(v, C2, cover2, blocks2, valid=False) == []
    assert v.bad_covers == {C2: "share_proof"} and v.combine_batches == ()
    assert v.verified_blocks() == {1: (0, 1, 2), 2: (0, 1)}
    assert agg.cover(agg.round_blocks(r.ro), v.verified_blocks(), 2) is None
    with pytest.raises(LocalProtocolError):
        v.finalize(h("adapter"), {})  # no combine was asked for
    v.final_deadline(now_ms=r.ro.final_deadline_ms)
    assert v.abort_reason == "combine_timeout"  # t partials were valid, some block never had t batches


def test_one_live_member_alone_cannot_reach_t():
    r, partials = _decrypting_round()
    v = r.validators[V1]
    _verify(v, C1, partials[C1], OWN[C1])
    view = v.cover_view()
    assert view == {1: (0, 2)}
    # block 1 has no batch: member 1, the only one known live, covers it; blocks 0 and 2
    # need a second member, which member 1 cannot be
    cover1, blocks1 = _cover(r, C1, view)
    assert blocks1 == (1,)
    assert _verify(v, C1, cover1, blocks1) == []
    assert v.verified_blocks() == {1: (0, 1, 2)}
    assert not v.combining and v.combine_batches == ()
    v.final_deadline(now_ms=r.ro.final_deadline_ms)
    assert v.abort_reason == "not_enough_partials"


def test_the_cover_choice_is_only_ours_after_our_partial_and_while_the_round_decrypts():
    r = Round()
    r.exchange_sets(r.publish_sets({V1: [T1, T2], V2: [T1, T2]}))
    member = r.committee[C1]
    assert not member.cover_pending() and member.choose_cover({1: (0,)}) == []  # nothing released yet
    r.release(C1)
    assert member.cover_pending()
    assert member.choose_cover(None) == [] and not member.cover_pending()  # our validator stopped decrypting
    other = r.committee[C2]
    r.release(C2)
    other.final_deadline(now_ms=r.ro.final_deadline_ms)  # released: the deadline changes nothing here
    assert other.phase is CommitteePhase.RELEASED and other.cover_pending()
    v = r.validators[V1]
    v.final_deadline(now_ms=r.ro.final_deadline_ms)
    assert v.cover_view() is None  # the round is over: no cover can help it
    assert other.choose_cover(v.cover_view()) == [] and not other.cover_pending()


def test_blocks_outside_the_round_are_not_counted():
    r, partials = _decrypting_round()
    v = r.validators[V1]
    _verify(v, C1, partials[C1], (0, 2, 3, 99, -1))
    assert v.partial_blocks == {C1: (0, 2)}
