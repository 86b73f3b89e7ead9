"""Catching up on a round a validator was down for (protocol/round_catchup.py): the
adoption rule, and the rounds shell carrying it out against real settlement services
(tests/test_settlement_service.py's router: real EmbeddedHeads, sr25519, strict decoding).

The attack (issue 11 finding 2 must stay fixed): one malicious validator's RoundFinal
of a fake round is never adopted, so the lagging validator never co-signs it."""

from __future__ import annotations

import pytest
import trio

from node.roles import rounds as rr
from node.roles import settlement as st
from node.settings import NodeSettings
from protocol import aggregation as agg
from protocol import head as h
from protocol import round_catchup as rc
from protocol.aggregation_messages import RoundAborted, RoundFinal, RoundOpen
from protocol.membership import Role
from protocol.messages import Channel, decode, encode
from tests.test_settlement_service import KEYS, T1, T2, Router, _open_mesh, quick, trio_test  # noqa: F401

A, B, C = (k.ss58_address for k in KEYS)
PARTIES = (A, B, C)
BASE, ADAPTER, AGGREGATE = "b" * 64, "a" * 64, "c" * 64


def final(round_id: int = 0, adapter: str = ADAPTER, contributors=(T1, T2), aggregate: str = AGGREGATE) -> RoundFinal:
    return RoundFinal(round_id, BASE, adapter, aggregate, sorted(contributors), {"l2": 0.5})


def heard(**by_sender) -> dict[str, rc.RoundOutcome]:
    return {sender: rc.outcome_of(message) for sender, message in by_sender.items()}


# --- the rule -------------------------------------------------------------------------


def test_a_majority_of_identical_round_finals_is_adopted():
    outcome = rc.adopted_outcome(0, {A: rc.outcome_of(final()), B: rc.outcome_of(final())}, parties=PARTIES, me=C)
    assert outcome == rc.RoundOutcome(0, False, BASE, ADAPTER, AGGREGATE, tuple(sorted((T1, T2))))
    # mean_stats are not part of the outcome: two honest validators may round them apart
    other_stats = RoundFinal(0, BASE, ADAPTER, AGGREGATE, sorted((T1, T2)), {"l2": 0.7})
    assert rc.adopted_outcome(0, {A: rc.outcome_of(final()), B: rc.outcome_of(other_stats)},
                              parties=PARTIES, me=C) == outcome


def test_one_sender_is_not_a_majority():
    assert rc.adopted_outcome(0, {A: rc.outcome_of(final())}, parties=PARTIES, me=C) is None
    # nor does our own message count, nor one of a non-party, nor one of another round
    outsider = KEYS[0].ss58_address[:-1] + "x"
    for extra in (C, outsider):
        assert rc.adopted_outcome(0, {A: rc.outcome_of(final()), extra: rc.outcome_of(final())},
                                  parties=PARTIES, me=C) is None
    assert rc.adopted_outcome(0, {A: rc.outcome_of(final()), B: rc.outcome_of(final(1))},
                              parties=PARTIES, me=C) is None


@pytest.mark.parametrize("differing", [
    final(adapter="d" * 64), final(contributors=(T1,)), final(aggregate="e" * 64),
    RoundFinal(0, "f" * 64, ADAPTER, AGGREGATE, sorted((T1, T2)), {}), RoundAborted(0, "timeout")])
def test_a_majority_that_differs_in_content_is_not_adopted(differing):
    assert rc.adopted_outcome(0, {A: rc.outcome_of(final()), B: rc.outcome_of(differing)},
                              parties=PARTIES, me=C) is None


def test_a_majority_of_round_aborted_is_an_aborted_view_whatever_the_reasons():
    outcome = rc.adopted_outcome(0, {A: rc.outcome_of(RoundAborted(0, "timeout")),
                                     B: rc.outcome_of(RoundAborted(0, "below_min"))}, parties=PARTIES, me=C)
    assert outcome == rc.RoundOutcome(0, True)


def test_a_duplicate_sender_is_counted_once_and_its_first_story_stands():
    book = rc.OutcomesHeard(PARTIES, C)
    assert book.hear(A, final()) is None
    assert book.hear(A, final()) is None  # the same again: still one sender
    assert book.hear(A, final(adapter="d" * 64)) is None  # a changed story replaces nothing
    assert book.heard[0][A].adapter_id == ADAPTER
    assert book.hear(C, final()) is None  # itself
    assert book.hear(B, final()).adapter_id == ADAPTER


def test_five_parties_need_three_others():
    parties = PARTIES + (T1, T2)  # five party hotkeys
    two = {A: rc.outcome_of(final()), B: rc.outcome_of(final())}
    assert rc.catchup_quorum(5) == 3 and rc.catchup_quorum(2) == 2
    assert rc.adopted_outcome(0, two, parties=parties, me=C) is None
    assert rc.adopted_outcome(0, {**two, T1: rc.outcome_of(final())}, parties=parties, me=C) is not None
    # a two-party head never catches up: the other party alone is no majority
    assert rc.adopted_outcome(0, {A: rc.outcome_of(final())}, parties=(A, C), me=C) is None


def test_outcomes_heard_keeps_a_bounded_number_of_rounds():
    book = rc.OutcomesHeard(PARTIES, C)
    for r in range(rc.MAX_ROUNDS_HEARD + 5):
        book.hear(A, final(r))
    assert len(book.heard) == rc.MAX_ROUNDS_HEARD and min(book.heard) == 5


def test_republishing_waits_for_the_final_deadline_and_the_period_and_stops_once_confirmed():
    due = lambda **kw: rc.republish_due(**{"now_ms": 100_000, "final_deadline_ms": 50_000,  # noqa: E731
                                           "confirmed": False, "last_ms": None, **kw})
    assert due()
    assert not due(now_ms=40_000)  # before the final deadline the round machine re-sends it
    assert not due(confirmed=True) and not due(confirmed=None)
    assert not due(last_ms=100_000 - rc.REPUBLISH_MS + 1) and due(last_ms=100_000 - rc.REPUBLISH_MS)


# --- the shell, against real settlement services --------------------------------------


def _lagging_rounds_shell(router: Router, me: str, tmp_path) -> rr.RoundsService:
    """C's rounds service as run() leaves it after a restart that lost the round: no slot."""
    service = rr.RoundsService(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "rounds" / me))
    service.ctx, service.me = router.contexts[me], me
    service.mesh = agg.MeshRounds(validators=PARTIES, committee=PARTIES, threshold=2, public_key_id="k" * 64,
                                  key_bits=1024)
    return service


async def _gossip(shell: rr.RoundsService, sender: str, message) -> None:
    """What the train topic would deliver: encoded, strictly decoded, then the shell's path."""
    await shell._handle(sender, decode(encode(message), channel=Channel.TRAIN), 0)


def _view_of(router: Router, hotkey: str, round_id: int):
    return router.services[hotkey].head.machine.observed_rounds.get(round_id)


def _doc(message: RoundFinal) -> dict:
    return {"round": message.round_id, "adapter_id": message.adapter_id, "contributors": message.contributors,
            "rejected": []}


@trio_test
async def test_a_validator_that_never_saw_the_round_acks_it_after_the_others_round_finals(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=1)
        for hotkey in (A, B):  # C was down for the whole round: its rounds service has nothing
            router.services[hotkey].record_round(_doc(final()))
        await router.until(lambda: router.services[C].awaits_round_view(0))  # A's request waits on C
        assert router.section(C)["snapshots_confirmed"] == 0
        shell = _lagging_rounds_shell(router, C, tmp_path)
        await _gossip(shell, A, final())
        assert shell.adopted == [] and _view_of(router, C, 0) is None  # one validator is no majority
        await _gossip(shell, B, final())
        assert shell.adopted == [0]
        await router.until(lambda: all(router.section(k)["snapshots_confirmed"] == 1 for k in PARTIES))
        assert _view_of(router, C, 0) == h_view(final())
        assert not router.services[C].awaits_round_view(0) and router.services[C].round_confirmed(0)
        await _gossip(shell, A, final())  # a later re-publish adopts nothing twice
        assert shell.adopted == [0]
        await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in PARTIES), timeout_s=30)
        nursery.cancel_scope.cancel()
    sections = [router.section(k) for k in PARTIES]
    assert all(s["rounds"] == [0] and s["slashed"] == [] for s in sections)
    assert sections[0]["balances"] == sections[2]["balances"]
    assert sections[2]["balances"][T1] == sections[2]["balances"][T2] == st.ROUND_REWARD // 2


@trio_test
async def test_one_malicious_validators_round_final_of_a_fake_round_is_not_adopted(tmp_path):
    """B missed round 0; C, malicious, gossips a RoundFinal of a round that pays itself
    (and repeats it, and changes it): B adopts nothing and never co-signs C's story."""
    router = Router()
    fake = final(adapter="d" * 64, contributors=(C,))
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=1)
        router.services[A].record_round(_doc(final()))  # the author's honest view
        router.services[C].record_round(_doc(final()))  # C's head co-signs honestly; its gossip lies
        await router.until(lambda: router.services[B].awaits_round_view(0))
        shell = _lagging_rounds_shell(router, B, tmp_path)
        for message in (fake, fake, final(adapter="e" * 64, contributors=(C,))):
            await _gossip(shell, C, message)
        await _gossip(shell, A, final())  # the honest account: one sender against one
        await trio.sleep(1.0)  # resends of the request come and go; B must still refuse
        assert shell.adopted == [] and _view_of(router, B, 0) is None
        assert router.services[B].awaits_round_view(0)
        assert all(router.section(k)["snapshots_confirmed"] == 0 for k in PARTIES)
        assert router.section(B)["rounds"] == []
        nursery.cancel_scope.cancel()


def h_view(message: RoundFinal) -> list:
    from protocol.head_rules import round_view
    return round_view(message.adapter_id, message.contributors)


def test_rounds_awaiting_view_names_only_unseen_unsettled_rounds_in_range(tmp_path):
    machine = h.HeadMachine(KEYS[0])
    assert rc.rounds_awaiting_view(machine) == set()  # no head: nothing to wait for
    assert rc.round_confirmed(machine, 0) is False  # a head not open yet will need it


def _aborted_slot(me: str, now: int) -> rr.RoundSlot:
    """Round 0 as `me` ended it: opened by A, aborted at its final deadline, long past."""
    ro = RoundOpen(round_id=0, base_adapter_id=BASE, public_key_id="f" * 64,
                   hyperparameters={"steps": 20.0, "lr": 0.02, "batch_size": 8.0, "block_len": 64.0,
                                    "adapter_values": 300.0},
                   clip_bound=1.0, quant_bits=16, max_contributors=10, key_bits=2048, ciphertexts_per_contribution=12,
                   max_contribution_bytes=1 << 22, deadline_ms=now - 60_000, final_deadline_ms=now - 30_000,
                   min_contributors=2, committee=list(PARTIES), threshold=2, validators=list(PARTIES))
    mesh = agg.MeshRounds(validators=PARTIES, committee=PARTIES, threshold=2, public_key_id=ro.public_key_id,
                          key_bits=2048, policy=agg.RoundPolicy(min_contributors=2, max_contributors=10,
                                                                clip_bound=1.0, quant_bits=16))
    slot = rr.RoundSlot(ro)
    slot.validator = agg.ValidatorRound.join_round(A, ro, me=me, mesh=mesh, now_ms=ro.deadline_ms - 1_000,
                                                   last_round_id=None, expected_base=BASE)
    slot.validator.final_deadline(now_ms=now)
    assert slot.terminal() and slot.validator.phase is agg.Phase.ABORTED
    return slot


@trio_test
async def test_an_aborted_round_is_republished_after_its_final_deadline_until_confirmed_and_adopted(tmp_path):
    """After the final deadline the round machines re-send nothing; A and B re-publish
    their RoundAborted (once per period, while their head has not confirmed round 0), and
    C, down for the round, adopts the view "aborted" from them and signs."""
    from node.metrics import NodeMetrics
    from node.roles.base import RoleContext

    router = Router()
    train: list[tuple[str, object]] = []
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=1)
        aborted = {"round": 0, "adapter_id": "", "contributors": [], "rejected": []}
        for hotkey in (A, B):
            router.services[hotkey].record_round(aborted)
        await router.until(lambda: router.services[C].awaits_round_view(0))
        ended = {}
        for key in KEYS[:2]:
            me = key.ss58_address

            async def publish(message, me=me):
                train.append((me, message))
            shell = rr.RoundsService(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "rounds" / me))
            shell.me = me
            shell.ctx = RoleContext(settings=shell.settings, hotkey=key, genesis=router.contexts[me].genesis,
                                    mesh=None, store=None, verifier=None, metrics=NodeMetrics(),
                                    data_dir=tmp_path / "rounds" / me, publish=publish, peer_of=lambda _: "peer",
                                    services={"settlement": router.services[me]})
            slot = _aborted_slot(me, st.now_ms())
            ended[me] = (shell, slot)
            await shell._republish_outcome(slot)
            await shell._republish_outcome(slot)  # within REPUBLISH_MS: nothing more
        assert [(sender, type(message)) for sender, message in train] == [(A, RoundAborted), (B, RoundAborted)]
        lagging = _lagging_rounds_shell(router, C, tmp_path)
        for sender, message in train:
            await _gossip(lagging, sender, message)
        assert lagging.adopted == [0]
        await router.until(lambda: all(router.section(k)["snapshots_confirmed"] == 1 for k in PARTIES))
        assert _view_of(router, C, 0) == h_view(final(adapter="", contributors=()))
        train.clear()
        for shell, slot in ended.values():
            shell.republished.clear()  # the period is over; the head has confirmed round 0
            await shell._republish_outcome(slot)
        assert train == []
        nursery.cancel_scope.cancel()
