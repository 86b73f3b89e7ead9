"""The FHE challenge machine driven event by event, h11-style: no network, time as input."""

from __future__ import annotations

import hashlib

import pytest

from protocol.challenge import (
    MAX_ITERATIONS, TIMEOUT_REASON, UNKNOWN_KEY, BadIterations, ChallengeConfig, ChallengeMachine,
    ChallengePhase, EpochPhase,
    ExactlyOneOutcome, GossipScore, IterationsBounded, KeyIdTaken, KeyModelMismatch, KeyNotOwned,
    KeysUsedOnlyByOwner, MinerKeyring, RecordOutcome, SendChallenge, TooManyChallenges,
    TooManyIterations, TypeOK,
    UnknownKey, UploadKey, assign_miners, challenge_id, epoch_order, judge,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.scoring import Outcome, WindowEntry

MESH = "testmesh"
V1, V2 = "validator-a", "validator-b"
MINERS = [f"miner-{i}" for i in range(7)]


def machine_with_one_miner(**config) -> tuple[ChallengeMachine, str]:
    """V1 alone, so it is assigned every miner; returns the machine and one miner."""
    m = ChallengeMachine(ChallengeConfig(MESH, **config), V1)
    m.start_epoch(1, offers={"miner-0": "cnn"}, key_ids={"cnn": "k-cnn"}, validators=[V1], now=0.0)
    return m, "miner-0"


def only(effects, kind):
    assert len(effects) == 1 and isinstance(effects[0], kind), effects
    return effects[0]


# --- epoch plan -------------------------------------------------------------------------


def test_assignment_partitions_miners_round_robin_by_rank():
    plan = assign_miners(5, MESH, MINERS, [V2, V1])
    order = epoch_order(5, MESH, MINERS)
    assert sorted(order) == sorted(MINERS)
    assert plan[V1] == tuple(order[0::2]) and plan[V2] == tuple(order[1::2])  # V1 ranks first by hotkey
    assert sorted(plan[V1] + plan[V2]) == sorted(MINERS)  # every miner exactly once
    assert plan == assign_miners(5, MESH, reversed(MINERS), [V1, V2, V1])  # same from any input order


def test_order_changes_with_epoch_and_mesh():
    orders = {tuple(epoch_order(e, MESH, MINERS)) for e in range(10)}
    assert len(orders) > 5  # 7! orders: ten epochs all but never collide
    assert epoch_order(1, MESH, MINERS) != epoch_order(1, "othermesh", MINERS)


def test_assignment_needs_a_validator():
    with pytest.raises(LocalProtocolError):
        assign_miners(1, MESH, MINERS, [])


def test_challenge_ids_are_distinct_per_index():
    ids = {challenge_id(MESH, 1, V1, m, i) for m in MINERS for i in (1, 2)}
    assert len(ids) == 2 * len(MINERS)


def test_judge():
    assert judge(True, 0.999, 0.99) is Outcome.OK
    assert judge(True, 0.98, 0.99) is Outcome.WRONG
    assert judge(False, 1.0, 0.99) is Outcome.WRONG
    for bad in (1.5, float("nan")):
        with pytest.raises(LocalProtocolError):
            judge(True, bad, 0.99)
    with pytest.raises(LocalProtocolError):
        judge(1, 1.0, 0.99)  # type: ignore[arg-type]


# --- one challenge's life ---------------------------------------------------------------


def test_ok_path_uploads_key_once_then_records_latency():
    m, miner = machine_with_one_miner(response_timeout_s=100.0)
    upload = only(m.issue(miner, input_seed=7, now=10.0), UploadKey)
    assert (upload.miner, upload.model, upload.key_id) == (miner, "cnn", "k-cnn")
    send = only(m.key_uploaded(upload.challenge_id, now=11.0), SendChallenge)
    assert (send.input_seed, send.epoch, send.timeout_s, send.iterations) == (7, 1, 100.0, 1)
    assert m.sent(send.challenge_id, at=12.0) == []
    record = only(m.response_received(send.challenge_id, at=32.0, argmax_agrees=True, cosine=0.999),
                  RecordOutcome).record
    assert (record.outcome, record.latency_s, record.issued_at) == (Outcome.OK, 20.0, 10.0)
    assert (record.validator, record.miner, record.model, record.epoch) == (V1, miner, "cnn", 1)

    # second challenge: the miner holds our key, so no upload
    send2 = only(m.issue(miner, input_seed=8, now=40.0), SendChallenge)
    assert send2.challenge_id != send.challenge_id
    m.sent(send2.challenge_id, at=41.0)
    wrong = only(m.response_received(send2.challenge_id, at=51.0, argmax_agrees=False, cosine=0.2),
                 RecordOutcome).record
    assert (wrong.outcome, wrong.agreement, wrong.cosine) == (Outcome.WRONG, False, 0.2)
    assert ExactlyOneOutcome(m) and TypeOK(m) and IterationsBounded([m])

    gossip = only(m.close_epoch(now=60.0), GossipScore)
    (score,) = gossip.scores
    # window: ok at 20 s (score 8) and one wrong: rate 0.5 -> 8 / (1 + 2.5^30)
    assert score.miner == miner and score.challenges == 2 and score.ok == 1
    assert score.score == pytest.approx(8 / (1 + 2.5 ** 30))
    assert m.phase is EpochPhase.CLOSED and ExactlyOneOutcome(m)


def test_bounded_challenges_per_miner_and_one_in_flight():
    m, miner = machine_with_one_miner(challenges_per_miner=2)
    upload = only(m.issue(miner, input_seed=1, now=0.0), UploadKey)
    with pytest.raises(LocalProtocolError, match="in flight"):
        m.issue(miner, input_seed=2, now=0.0)
    m.error(upload.challenge_id, reason="stream_reset", now=1.0)
    m.issue(miner, input_seed=2, now=2.0)
    cid = next(c for c in m.challenges.values() if c.phase is not ChallengePhase.DECIDED).challenge_id
    m.error(cid, reason="stream_reset", now=3.0)
    assert not m.can_issue(miner)
    with pytest.raises(LocalProtocolError, match="already had"):
        m.issue(miner, input_seed=3, now=4.0)
    assert IterationsBounded([m])


def test_timeout_only_after_deadline_and_late_answer_is_a_timeout():
    m, miner = machine_with_one_miner(response_timeout_s=30.0)
    cid = only(m.issue(miner, input_seed=1, now=0.0), UploadKey).challenge_id
    m.key_uploaded(cid, now=0.0)
    m.sent(cid, at=5.0)
    with pytest.raises(LocalProtocolError, match="has until"):
        m.timeout(cid, now=34.9)
    assert m.expire(now=34.9) == []
    late = only(m.response_received(cid, at=35.5, argmax_agrees=True, cosine=1.0), RecordOutcome).record
    assert (late.outcome, late.error_reason, late.latency_s) == (Outcome.TIMEOUT, TIMEOUT_REASON, None)

    cid2 = only(m.issue(miner, input_seed=2, now=40.0), SendChallenge).challenge_id
    m.sent(cid2, at=40.0)
    expired = only(m.expire(now=70.0), RecordOutcome).record
    assert expired.challenge_id == cid2 and expired.outcome is Outcome.TIMEOUT


def test_never_two_outcomes():
    m, miner = machine_with_one_miner()
    cid = only(m.issue(miner, input_seed=1, now=0.0), UploadKey).challenge_id
    m.key_uploaded(cid, now=0.0)
    m.sent(cid, at=1.0)
    m.response_received(cid, at=2.0, argmax_agrees=True, cosine=1.0)
    for event in (lambda: m.response_received(cid, at=3.0, argmax_agrees=True, cosine=1.0),
                  lambda: m.timeout(cid, now=1e9), lambda: m.error(cid, reason="x", now=4.0),
                  lambda: m.sent(cid, at=5.0), lambda: m.key_uploaded(cid, now=5.0)):
        with pytest.raises(LocalProtocolError):
            event()
    assert len(m.records) == 1 and ExactlyOneOutcome(m)


def test_misuse_is_a_local_error():
    m, miner = machine_with_one_miner()
    with pytest.raises(LocalProtocolError, match="not assigned"):
        m.issue("stranger", input_seed=1, now=0.0)
    with pytest.raises(LocalProtocolError, match="no challenge"):
        m.sent("nope", at=0.0)
    cid = only(m.issue(miner, input_seed=1, now=0.0), UploadKey).challenge_id
    with pytest.raises(LocalProtocolError, match="Sent on challenge"):
        m.sent(cid, at=0.0)  # the key is not uploaded yet
    m.key_uploaded(cid, now=0.0)
    m.sent(cid, at=10.0)
    with pytest.raises(LocalProtocolError, match="precedes"):
        m.response_received(cid, at=9.0, argmax_agrees=True, cosine=1.0)
    with pytest.raises(LocalProtocolError, match="needs a reason"):
        m.error(cid, reason="", now=11.0)
    with pytest.raises(LocalProtocolError, match="without an outcome"):
        m.close_epoch(now=12.0)
    with pytest.raises(LocalProtocolError, match="still open"):
        m.start_epoch(2, offers={}, key_ids={}, validators=[V1], now=12.0)


def test_start_epoch_checks_its_inputs():
    m = ChallengeMachine(ChallengeConfig(MESH), V1)
    with pytest.raises(LocalProtocolError, match="not among"):
        m.start_epoch(1, offers={}, key_ids={}, validators=[V2], now=0.0)
    with pytest.raises(LocalProtocolError, match="no evaluation key"):
        m.start_epoch(1, offers={"miner-0": "cnn"}, key_ids={}, validators=[V1], now=0.0)
    m.start_epoch(3, offers={}, key_ids={}, validators=[V1], now=0.0)
    assert m.close_epoch(now=1.0) == []  # nobody challenged: nothing to gossip
    with pytest.raises(LocalProtocolError, match="not after"):
        m.start_epoch(3, offers={}, key_ids={}, validators=[V1], now=2.0)
    with pytest.raises(LocalProtocolError, match="no epoch is open"):
        m.issue("miner-0", input_seed=0, now=3.0)
    for bad in (dict(challenges_per_miner=0), dict(response_timeout_s=0.0), dict(min_cosine=2.0),
                dict(iterations=0), dict(iterations=MAX_ITERATIONS + 1)):
        with pytest.raises(LocalProtocolError):
            ChallengeConfig(MESH, **bad)


def test_unknown_key_error_makes_the_next_challenge_upload_again():
    m, miner = machine_with_one_miner()
    cid = only(m.issue(miner, input_seed=1, now=0.0), UploadKey).challenge_id
    m.key_uploaded(cid, now=0.0)
    m.sent(cid, at=1.0)
    m.error(cid, reason=UNKNOWN_KEY, now=2.0)  # the miner restarted and lost our key
    only(m.issue(miner, input_seed=2, now=3.0), UploadKey)


def test_window_is_seeded_from_history_and_spans_epochs():
    history = {"miner-0": [WindowEntry(Outcome.OK, 40.0)] * 3}
    m = ChallengeMachine(ChallengeConfig(MESH, challenges_per_miner=1), V1, windows=history)
    m.start_epoch(1, offers={"miner-0": "cnn"}, key_ids={"cnn": "k"}, validators=[V1], now=0.0)
    cid = m.issue("miner-0", input_seed=1, now=0.0)[0].challenge_id
    m.error(cid, reason="refused", now=0.0)
    (score,) = only(m.close_epoch(now=1.0), GossipScore).scores
    # 3 ok at 40 s (score 1) + 1 error: rate 0.25 -> 1 / (1 + 2.5^5) = 1 / 98.65625
    assert (score.challenges, score.ok) == (4, 3)
    assert score.score == pytest.approx(1 / 98.65625)


def test_two_validators_split_the_miners_of_an_epoch():
    offers = {m: "cnn" for m in MINERS}
    machines = [ChallengeMachine(ChallengeConfig(MESH), v) for v in (V1, V2)]
    for machine in machines:
        machine.start_epoch(9, offers=offers, key_ids={"cnn": f"k-{machine.validator}"}, validators=[V1, V2], now=0)
    a, b = (set(machine.assigned) for machine in machines)
    assert a | b == set(MINERS) and not a & b
    with pytest.raises(LocalProtocolError):
        machines[0].issue(next(iter(b)), input_seed=0, now=0.0)


# --- the miner's keyring ----------------------------------------------------------------


def test_keyring_runs_a_key_only_for_its_owner():
    ring = MinerKeyring(max_challenges_per_epoch=2)
    ring.add_key(V1, "k1", model="cnn")
    ring.add_key(V1, "k1", model="cnn")  # idempotent
    assert ring.evaluate(V1, "k1", model="cnn", now=1.0).owner == V1
    with pytest.raises(KeyNotOwned) as info:
        ring.evaluate(V2, "k1", model="cnn", now=1.0)
    assert info.value.reason == "foreign_key" and isinstance(info.value, RemoteProtocolError)
    with pytest.raises(KeyIdTaken):
        ring.add_key(V2, "k1", model="cnn")
    with pytest.raises(UnknownKey) as unknown:
        ring.evaluate(V2, "k2", model="cnn", now=1.0)
    assert unknown.value.reason == UNKNOWN_KEY
    with pytest.raises(KeyModelMismatch):
        ring.evaluate(V1, "k1", model="mlp", now=1.0)
    assert ring.used_by["k1"] == {V1} and KeysUsedOnlyByOwner([ring])


def test_keyring_bounds_evaluations_per_validator_and_window():
    ring = MinerKeyring(max_challenges_per_epoch=2, window_s=60.0)
    ring.add_key(V1, "k1", model="cnn")
    ring.add_key(V2, "k2", model="cnn")
    ring.evaluate(V1, "k1", model="cnn", now=1000.0)
    ring.evaluate(V1, "k1", model="cnn", now=1030.0)
    with pytest.raises(TooManyChallenges):
        ring.evaluate(V1, "k1", model="cnn", now=1059.0)
    ring.evaluate(V2, "k2", model="cnn", now=1059.0)  # another validator's quota is its own
    ring.evaluate(V1, "k1", model="cnn", now=1060.0)  # the first left the window
    with pytest.raises(TooManyChallenges):
        ring.evaluate(V1, "k1", model="cnn", now=1089.0)  # sliding: the 1030 one still counts
    ring.evaluate(V1, "k1", model="cnn", now=1090.0)
    assert IterationsBounded([], [ring])


def test_issue13_the_requester_cannot_reset_its_quota():
    """Issue 13: the epoch was the requester's field and a rising one reset the count (8
    challenges, refused, epoch+1 accepted, epoch 2**62 accepted, then StaleEpoch for every
    normal epoch). The keyring no longer takes an epoch: only the miner's clock counts."""
    import inspect

    assert "epoch" not in inspect.signature(MinerKeyring.evaluate).parameters
    ring = MinerKeyring(max_challenges_per_epoch=8)
    ring.add_key(V1, "k1", model="cnn")
    for i in range(8):
        ring.evaluate(V1, "k1", model="cnn", now=500.0 + i)
    for _ in range(3):  # whatever the next requests say, within the window they are refused
        with pytest.raises(TooManyChallenges):
            ring.evaluate(V1, "k1", model="cnn", now=510.0)
    # Once the window passed, the validator is served again (no lock-out).
    ring.evaluate(V1, "k1", model="cnn", now=561.0)


def test_brainlocks_streaming_check():
    from protocol.challenge import streamed_in_time

    assert streamed_in_time([1.0, 2.0, 3.0, 4.0, 5.0], 5.0)  # one chunk per iteration as it is done
    assert not streamed_in_time([4.9, 4.9, 4.95, 5.0, 5.0], 5.0)  # all at the end
    assert streamed_in_time([3.5, 4.9, 5.0, 5.0, 5.0], 5.0)  # the first 20 % (1 of 5) by 70 %
    assert streamed_in_time([1.0] * 9 + [10.0], 10.0)  # 2 of 10 by 7 s
    assert not streamed_in_time([], 1.0)


def test_keyring_bounds_iterations_per_challenge():
    ring = MinerKeyring(max_challenges_per_epoch=5, max_iterations=2)
    ring.add_key(V1, "k1", model="cnn")
    ring.evaluate(V1, "k1", model="cnn", now=1.0, iterations=2)
    with pytest.raises(TooManyIterations) as info:
        ring.evaluate(V1, "k1", model="cnn", now=1.0, iterations=3)
    assert info.value.reason == "too_many_iterations"
    with pytest.raises(BadIterations) as bad:
        ring.evaluate(V1, "k1", model="cnn", now=1.0, iterations=0)
    assert bad.value.reason == "bad_iterations"
    assert list(ring.evaluations[V1]) == [1.0]  # refused runs are not counted
    assert IterationsBounded([], [ring])


def test_keyring_holds_at_most_max_keys():
    ring = MinerKeyring(max_challenges_per_epoch=1, max_keys=2)
    for i in range(3):
        ring.add_key(V1, f"k{i}", model="cnn")
    assert list(ring.bindings) == ["k1", "k2"]
    with pytest.raises(UnknownKey):
        ring.evaluate(V1, "k0", model="cnn", now=1.0)
    ring.forget_all()
    assert not ring.bindings


# --- mesh messages and stream frames ---------------------------------------------------

import msgpack  # noqa: E402

from crypto.identity import Hotkey  # noqa: E402
from protocol.challenge_messages import (  # noqa: E402
    ENVELOPE_OVERHEAD, FHE_PROTOCOL, MAX_CIPHERTEXT_BYTES, MAX_ENVELOPE_BYTES, MAX_EVAL_KEY_BYTES, MAX_WIRE_ITERATIONS,
    MAX_RESULT_BYTES, STREAM_MESSAGES, AddKey, BadFrame, ChallengeRequest, ChallengeResponse,
    InvalidChallengeMessage, KeyAdded, ModelOffer, PayloadMismatch, Refused, ScoreReport, UnexpectedMessage,
    open_frame, pack_frame, seal_frame, unpack_frame,
)
from protocol.epistula import EnvelopeVerifier, SignerNotAllowed, WrongRecipient  # noqa: E402
from protocol.inbound import seal_message  # noqa: E402
from protocol.membership import Member, Role, StaticDirectory  # noqa: E402
from protocol.messages import Channel, WrongChannel, decode, encode  # noqa: E402
from protocol.scoring import score_window  # noqa: E402

VALIDATOR_KEY, MINER_KEY = Hotkey.from_uri("//Alice"), Hotkey.from_uri("//Bob")
DIRECTORY = StaticDirectory((Member(VALIDATOR_KEY.ss58_address, frozenset({Role.VALIDATOR})),
                             Member(MINER_KEY.ss58_address, frozenset({Role.MINER}))))
SHA, CID, BIG = "f" * 64, "e" * 32, 2**64 - 1
NOW_MS = 1_700_000_000_000


def largest_messages():
    """The biggest instance of each type the field bounds allow."""
    return [
        ModelOffer("a" * 64, SHA, "1" * 64, FHE_PROTOCOL, MAX_ITERATIONS, BIG, 65535),
        ScoreReport(BIG, VALIDATOR_KEY.ss58_address, 1.5e300, 40, 39, 1 / 40, 1e300),
        AddKey("a" * 64, SHA, MAX_EVAL_KEY_BYTES),
        KeyAdded(SHA),
        ChallengeRequest(CID, BIG, "a" * 64, SHA, MAX_WIRE_ITERATIONS, SHA, MAX_CIPHERTEXT_BYTES),
        ChallengeResponse(CID, SHA, MAX_RESULT_BYTES, BIG),
        Refused(ChallengeRequest.TYPE, SHA, "r" * 48, "\u00e9" * 128),  # 256 bytes of UTF-8
    ]


def test_max_bytes_are_honest():
    for message in largest_messages():
        size = len(encode(message))
        assert 0.85 * message.MAX_BYTES < size <= message.MAX_BYTES, (message.TYPE, size, message.MAX_BYTES)
        assert decode(encode(message)) == message
    biggest = max(len(seal_message(VALIDATOR_KEY, m, now_ms=10**15 - 1, signed_for=MINER_KEY.ss58_address)
                      .to_gossip_bytes()) for m in largest_messages() if type(m) in STREAM_MESSAGES)
    assert biggest - max(len(encode(m)) for m in largest_messages() if type(m) in STREAM_MESSAGES) <= ENVELOPE_OVERHEAD
    assert biggest <= MAX_ENVELOPE_BYTES


def test_channels_and_policies():
    offer, report = largest_messages()[:2]
    assert decode(encode(offer), channel=Channel.FHE) == offer
    assert ModelOffer.POLICY.roles == {Role.MINER} and ScoreReport.POLICY.roles == {Role.VALIDATOR}
    for cls in STREAM_MESSAGES:
        assert cls.CHANNEL is None and not cls.BROADCAST
    with pytest.raises(WrongChannel):
        decode(encode(KeyAdded(SHA)), channel=Channel.FHE)  # stream only, never gossip


@pytest.mark.parametrize("fields, hint", [
    ({"model": "Bad Model!"}, "model"),
    ({"key_id": "F" * 64}, "key_id"),
    ({"key_bytes": MAX_EVAL_KEY_BYTES + 1}, "key_bytes"),
])
def test_decoding_a_peers_out_of_bounds_field_is_rejected(fields, hint):
    body = {"model": "digits-cnn", "key_id": SHA, "key_bytes": 10, **fields}
    raw = msgpack.packb({"v": 1, "type": AddKey.TYPE, "fields": body}, use_bin_type=True)
    with pytest.raises(InvalidChallengeMessage, match=hint) as info:
        decode(raw)
    assert info.value.reason == "invalid_field"


OFFER_FIELDS = {"model": "synthetic-cnv-tiny", "server_sha256": SHA, "peer_id": "12D3KooWabc", "protocol": FHE_PROTOCOL,
                "max_iterations": 1, "offered_ms": 0, "brainlock_port": 8091}


@pytest.mark.parametrize("port, reason, hint", [
    (70000, "invalid_field", "brainlock_port"),
    (-1, "invalid_field", "brainlock_port"),
    ("http://169.254.169.254/latest/meta-data", "malformed_message", "brainlock_port"),  # a URL: never
    ("8091", "malformed_message", "brainlock_port"),
    (True, "malformed_message", "brainlock_port"),
    (None, "malformed_message", "brainlock_port"),
])
def test_an_offer_with_a_malformed_brainlock_endpoint_is_refused_with_a_reason(port, reason, hint):
    raw = msgpack.packb({"v": 1, "type": ModelOffer.TYPE, "fields": {**OFFER_FIELDS, "brainlock_port": port}},
                        use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match=hint) as info:
        decode(raw)
    assert info.value.reason == reason


def test_an_offer_keeps_its_strictness_with_the_brainlock_port():
    good = msgpack.packb({"v": 1, "type": ModelOffer.TYPE, "fields": OFFER_FIELDS}, use_bin_type=True)
    assert decode(good).brainlock_port == 8091
    assert ModelOffer("digits-cnn", SHA, "12D3KooW", FHE_PROTOCOL, 1, 0).brainlock_port == 0  # no server
    for fields in ({k: v for k, v in OFFER_FIELDS.items() if k != "brainlock_port"},  # an older node's offer
                   {**OFFER_FIELDS, "brainlock_url": "http://x"}):  # an unknown field
        raw = msgpack.packb({"v": 1, "type": ModelOffer.TYPE, "fields": fields}, use_bin_type=True)
        with pytest.raises(RemoteProtocolError, match="missing fields|unknown fields"):
            decode(raw)


def test_the_offered_endpoint_is_the_announced_host_and_the_offered_port():
    from protocol.brainlock import offered_endpoint

    direct, relayed = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWa", "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWr/p2p-circuit"
    assert offered_endpoint([relayed, direct], 8091) == ("203.0.113.7", 8091)
    assert offered_endpoint(["/dns4/miner.example/tcp/4001"], 8091) == ("miner.example", 8091)
    assert offered_endpoint(["/ip6/2001:db8::1/tcp/4001"], 8091) == ("2001:db8::1", 8091)
    assert offered_endpoint([direct], 0) is None  # no Brainlock server: libp2p
    assert offered_endpoint([relayed], 8091) is None and offered_endpoint([], 8091) is None
    assert offered_endpoint(["garbage", "/tcp/4001"], 8091) is None


def test_message_field_rules():
    with pytest.raises(InvalidChallengeMessage, match="protocol"):
        ModelOffer("digits-cnn", SHA, "12D3KooW", "/other/1", 1, 0)
    with pytest.raises(InvalidChallengeMessage, match="iterations"):
        ChallengeRequest(CID, 1, "digits-cnn", SHA, MAX_WIRE_ITERATIONS + 1, SHA, 10)
    # Over the miner's bound but within the wire's: decodes, so the miner can refuse it signed.
    assert ChallengeRequest(CID, 1, "digits-cnn", SHA, MAX_ITERATIONS + 1, SHA, 10).iterations == MAX_ITERATIONS + 1
    with pytest.raises(InvalidChallengeMessage, match="SS58"):
        ScoreReport(1, "not-an-address", 1.0, 1, 1, 0.0, 1.0)
    with pytest.raises(InvalidChallengeMessage, match="failure_rate"):
        ScoreReport(1, MINER_KEY.ss58_address, 1.0, 4, 3, 0.5, 1.0)  # 1 of 4 failed is 0.25
    with pytest.raises(InvalidChallengeMessage, match="finite"):
        ScoreReport(1, MINER_KEY.ss58_address, float("inf"), 1, 1, 0.0, 1.0)
    with pytest.raises(InvalidChallengeMessage, match="reason"):
        Refused(AddKey.TYPE, SHA, "Not A Label", "")
    with pytest.raises(InvalidChallengeMessage, match="hint"):
        Refused(AddKey.TYPE, SHA, "unknown_key", "x" * 257)


def test_score_report_from_a_miner_score():
    score = score_window(MINER_KEY.ss58_address, [WindowEntry(Outcome.OK, 20.0), WindowEntry(Outcome.ERROR)])
    report = ScoreReport.of(7, score)
    assert (report.epoch, report.score, report.ok, report.challenges, report.median_latency_s) == (
        7, score.score, 1, 2, 20.0)
    none_ok = ScoreReport.of(7, score_window(MINER_KEY.ss58_address, [WindowEntry(Outcome.TIMEOUT)]))
    assert (none_ok.median_latency_s, none_ok.failure_rate) == (0.0, 1.0)


def miner_verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(DIRECTORY, MINER_KEY.ss58_address)


def test_frame_round_trip_carries_an_authenticated_payload():
    ciphertext = bytes(range(256)) * 7
    request = ChallengeRequest.for_input(CID, 3, "digits-cnn", SHA, 1, ciphertext)
    frame = seal_frame(VALIDATOR_KEY, request, ciphertext, now_ms=NOW_MS, signed_for=MINER_KEY.ss58_address)
    verified, payload = open_frame(frame, verifier=miner_verifier(), now_ms=NOW_MS,
                                   expect=(AddKey, ChallengeRequest))
    assert verified.message == request and payload == ciphertext
    assert verified.member.hotkey == VALIDATOR_KEY.ss58_address

    result = b"\x01" * 1000
    response = seal_frame(MINER_KEY, ChallengeResponse.for_result(CID, result, 42), result, now_ms=NOW_MS,
                          signed_for=VALIDATOR_KEY.ss58_address)
    verified, payload = open_frame(response, verifier=EnvelopeVerifier(DIRECTORY, VALIDATOR_KEY.ss58_address),
                                   now_ms=NOW_MS, expect=(ChallengeResponse, Refused))
    assert payload == result and verified.message.compute_ms == 42

    keys = b"k" * 5000
    add = seal_frame(VALIDATOR_KEY, AddKey.for_keys("digits-cnn", keys), keys, now_ms=NOW_MS,
                     signed_for=MINER_KEY.ss58_address)
    verified, payload = open_frame(add, verifier=miner_verifier(), now_ms=NOW_MS, expect=(AddKey,))
    assert payload == keys and verified.message.key_id == hashlib.sha256(keys).hexdigest()


def test_frames_refuse_a_swapped_or_cut_payload():
    ciphertext = b"c" * 100
    request = ChallengeRequest.for_input(CID, 3, "digits-cnn", SHA, 1, ciphertext)
    frame = seal_frame(VALIDATOR_KEY, request, ciphertext, now_ms=NOW_MS, signed_for=MINER_KEY.ss58_address)
    envelope, _ = unpack_frame(frame)
    for bad_payload in (b"d" * 100, b"c" * 99, b""):
        with pytest.raises(PayloadMismatch) as info:
            open_frame(pack_frame(envelope, bad_payload), verifier=miner_verifier(), now_ms=NOW_MS,
                       expect=(ChallengeRequest,))
        assert info.value.reason == "payload_mismatch"
    for cut in (frame[:3], frame[:50], (10**6).to_bytes(4, "big") + frame[4:]):
        with pytest.raises(BadFrame) as bad:
            open_frame(cut, verifier=miner_verifier(), now_ms=NOW_MS, expect=(ChallengeRequest,))
        assert bad.value.reason == "bad_frame"
    with pytest.raises(BadFrame, match="over what"):
        open_frame(frame + b"x" * 2 * MAX_CIPHERTEXT_BYTES, verifier=miner_verifier(), now_ms=NOW_MS,
                   expect=(ChallengeRequest,))
    with pytest.raises(PayloadMismatch):  # we refuse to send a mismatch too
        seal_frame(VALIDATOR_KEY, request, b"other", now_ms=NOW_MS, signed_for=MINER_KEY.ss58_address)


def test_frames_check_sender_recipient_and_type():
    keys = b"k" * 10
    # a miner may not upload keys: the policy says validators
    by_miner = seal_frame(MINER_KEY, AddKey.for_keys("digits-cnn", keys), keys, now_ms=NOW_MS,
                          signed_for=MINER_KEY.ss58_address)
    with pytest.raises(SignerNotAllowed):
        open_frame(by_miner, verifier=miner_verifier(), now_ms=NOW_MS, expect=(AddKey,))
    # signed for someone else
    elsewhere = seal_frame(VALIDATOR_KEY, AddKey.for_keys("digits-cnn", keys), keys, now_ms=NOW_MS,
                           signed_for=VALIDATOR_KEY.ss58_address)
    with pytest.raises(WrongRecipient):
        open_frame(elsewhere, verifier=miner_verifier(), now_ms=NOW_MS, expect=(AddKey,))
    # a valid message of the wrong kind for this end of the stream: refused before its signature is checked
    request = seal_frame(VALIDATOR_KEY, ChallengeRequest.for_input(CID, 1, "digits-cnn", SHA, 1, b"x"), b"x",
                         now_ms=NOW_MS, signed_for=MINER_KEY.ss58_address)
    with pytest.raises(UnexpectedMessage) as info:
        open_frame(request, verifier=EnvelopeVerifier(DIRECTORY, MINER_KEY.ss58_address, signature_check=None),
                   now_ms=NOW_MS, expect=(AddKey,))
    assert info.value.reason == "unexpected_message"
    # a payload on a message that carries none
    ack_env, _ = unpack_frame(seal_frame(MINER_KEY, KeyAdded(SHA), now_ms=NOW_MS,
                                         signed_for=VALIDATOR_KEY.ss58_address))
    with pytest.raises(PayloadMismatch):
        open_frame(pack_frame(ack_env, b"extra"), verifier=EnvelopeVerifier(DIRECTORY, VALIDATOR_KEY.ss58_address),
                   now_ms=NOW_MS, expect=(KeyAdded, Refused))
