"""Epistula v2: signing, the verification order, replay cache, and cross-checks with an
independent sr25519 implementation (py-sr25519-bindings, substrate-interface's backend)."""

import hashlib

import base58
import pytest
import sr25519

from crypto.identity import Hotkey, verify_signature
from protocol import epistula as ep
from protocol.membership import Member, Role, SenderPolicy, StaticDirectory

NOW = 1_700_000_000_000
ALICE = Hotkey.from_uri("//Alice")
BOB = Hotkey.from_uri("//Bob")
EVE = Hotkey.from_uri("//Eve")  # not a member
DIRECTORY = StaticDirectory((
    Member(ALICE.ss58_address, frozenset({Role.VALIDATOR}), stake=100.0),
    Member(BOB.ss58_address, frozenset({Role.TRAINER}), stake=1.0),
))
ANYONE = SenderPolicy()


def ss58_of(public_key: bytes, prefix: int = 42) -> str:
    """SS58 written out from the spec, independent of bittensor-wallet."""
    data = bytes([prefix]) + public_key
    checksum = hashlib.blake2b(b"SS58PRE" + data, digest_size=64).digest()[:2]
    return base58.b58encode(data + checksum).decode()


def verifier(own=BOB, **kw):
    return ep.EnvelopeVerifier(DIRECTORY, own.ss58_address, **kw)


def test_sealed_envelope_verifies_and_names_its_member():
    env = ep.seal(ALICE, b"hello", now_ms=NOW, signed_for=BOB.ss58_address)
    member = verifier().verify(env, now_ms=NOW + 10, policy=ANYONE, broadcast=False)
    assert member.hotkey == ALICE.ss58_address
    assert env.signature.startswith("0x") and len(env.signature) == 130


def test_signing_payload_is_the_epistula_string():
    payload = ep.signing_payload(b"body", "u", 123, "5Fx")
    assert payload == f"{hashlib.sha256(b'body').hexdigest()}.u.123.5Fx".encode()


def test_our_signature_verifies_with_independent_sr25519():
    env = ep.seal(ALICE, b"cross", now_ms=NOW)
    payload = ep.signing_payload(env.body, env.uuid, env.timestamp_ms, env.signed_for)
    assert ss58_of(ALICE.public_key) == ALICE.ss58_address
    assert sr25519.verify(bytes.fromhex(env.signature[2:]), payload, ALICE.public_key)
    assert not sr25519.verify(bytes.fromhex(env.signature[2:]), payload + b"x", ALICE.public_key)


def test_independent_sr25519_signature_verifies_here():
    public, secret = sr25519.pair_from_seed(bytes(range(32)))
    address = ss58_of(public)
    body, uuid = b"from-outside", "1b4e28ba-2fa1-4d2c-883f-0016d3cca427"
    payload = ep.signing_payload(body, uuid, NOW, "")
    signature = sr25519.sign((public, secret), payload)
    directory = StaticDirectory((Member(address, frozenset({Role.MINER})),))
    env = ep.Envelope("2", NOW, uuid, address, "", "0x" + signature.hex(), body)
    v = ep.EnvelopeVerifier(directory, BOB.ss58_address)
    assert v.verify(env, now_ms=NOW, policy=ANYONE, broadcast=True).hotkey == address
    assert verify_signature(address, payload, signature)
    assert not verify_signature(address, payload, signature[:-1] + bytes([signature[-1] ^ 1]))


def test_headers_round_trip_case_insensitively():
    env = ep.seal(ALICE, b"x", now_ms=NOW, signed_for=BOB.ss58_address)
    headers = {k.lower(): v for k, v in env.to_headers().items()}
    assert ep.Envelope.from_headers(headers, b"x") == env


def test_gossip_bytes_round_trip():
    env = ep.seal(ALICE, b"\x00\xff", now_ms=NOW)
    assert ep.Envelope.from_gossip_bytes(env.to_gossip_bytes()) == env


@pytest.mark.parametrize("change, hint", [
    ({ep.HEADER_VERSION: "1"}, "version"),
    ({ep.HEADER_TIMESTAMP: "12.5"}, "timestamp"),
    ({ep.HEADER_TIMESTAMP: "-5"}, "timestamp"),
    ({ep.HEADER_UUID: "not-a-uuid"}, "uuid"),
    ({ep.HEADER_UUID: "1b4e28ba-2fa1-1d2c-883f-0016d3cca427"}, "uuid"),  # v1, not v4
    ({ep.HEADER_SIGNED_BY: "5NotAnAddress"}, "signed-by"),
    ({ep.HEADER_SIGNED_FOR: "junk"}, "signed-for"),
    ({ep.HEADER_SIGNATURE: "0x1234"}, "signature"),
])
def test_malformed_headers_are_rejected_with_a_reason(change, hint):
    headers = ep.seal(ALICE, b"x", now_ms=NOW).to_headers() | change
    with pytest.raises(ep.MalformedEnvelope, match=hint) as info:
        ep.Envelope.from_headers(headers, b"x")
    assert info.value.reason == "malformed_envelope"


def test_missing_header_is_malformed():
    headers = ep.seal(ALICE, b"x", now_ms=NOW).to_headers()
    del headers[ep.HEADER_UUID]
    with pytest.raises(ep.MalformedEnvelope, match="Epistula-Uuid"):
        ep.Envelope.from_headers(headers, b"x")


@pytest.mark.parametrize("raw", [
    b"\xc1", b"not msgpack at all \xff\xfe", b"\x93\x01\x02\x03",
    b"\x81\xa1a\x01",  # a map with the wrong keys
])
def test_malformed_gossip_envelopes(raw):
    with pytest.raises(ep.MalformedEnvelope):
        ep.Envelope.from_gossip_bytes(raw)


def test_gossip_envelope_with_extra_field_is_rejected():
    import msgpack
    env = ep.seal(ALICE, b"x", now_ms=NOW)
    fields = msgpack.unpackb(env.to_gossip_bytes()) | {"extra": 1}
    with pytest.raises(ep.MalformedEnvelope, match="exactly"):
        ep.Envelope.from_gossip_bytes(msgpack.packb(fields))


def test_unknown_signer():
    env = ep.seal(EVE, b"x", now_ms=NOW)
    with pytest.raises(ep.UnknownSigner):
        verifier().verify(env, now_ms=NOW, policy=ANYONE, broadcast=True)


def test_role_and_stake_policy():
    validators_only = SenderPolicy(roles=frozenset({Role.VALIDATOR}))
    env = ep.seal(BOB, b"x", now_ms=NOW)
    with pytest.raises(ep.SignerNotAllowed, match="validator"):
        verifier(own=ALICE).verify(env, now_ms=NOW, policy=validators_only, broadcast=True)
    rich_only = SenderPolicy(min_stake=50.0)
    with pytest.raises(ep.SignerNotAllowed, match="stake"):
        verifier(own=ALICE).verify(env, now_ms=NOW, policy=rich_only, broadcast=True)
    ok = ep.seal(ALICE, b"x", now_ms=NOW)
    assert verifier().verify(ok, now_ms=NOW, policy=validators_only, broadcast=True)


def test_signed_for_must_be_this_node_direct_and_empty_on_broadcast():
    to_alice = ep.seal(BOB, b"x", now_ms=NOW, signed_for=ALICE.ss58_address)
    with pytest.raises(ep.WrongRecipient, match="not this node"):
        verifier(own=BOB).verify(to_alice, now_ms=NOW, policy=ANYONE, broadcast=False)
    assert verifier(own=ALICE).verify(to_alice, now_ms=NOW, policy=ANYONE, broadcast=False)
    to_all = ep.seal(ALICE, b"x", now_ms=NOW)
    with pytest.raises(ep.WrongRecipient, match="broadcast"):
        verifier().verify(to_all, now_ms=NOW, policy=ANYONE, broadcast=False)
    assert verifier().verify(to_all, now_ms=NOW, policy=ANYONE, broadcast=True)


def test_finding4_gossip_signed_for_the_receiver_itself_is_refused():
    """Issue 11 finding 4: a relay that accepted gossip signed for itself forwarded it to
    neighbours that refused it as wrong_recipient and blamed the relay. Now the recipient
    refuses it too, with the same reason as everyone else. (Before: accepted.)"""
    for_bob = ep.seal(ALICE, b"x", now_ms=NOW, signed_for=BOB.ss58_address)
    with pytest.raises(ep.WrongRecipient, match="signed for no one"):
        verifier(own=BOB).verify(for_bob, now_ms=NOW, policy=ANYONE, broadcast=True)
    with pytest.raises(ep.WrongRecipient, match="signed for no one"):
        verifier(own=ALICE).verify(for_bob, now_ms=NOW, policy=ANYONE, broadcast=True)


@pytest.mark.parametrize("window", [5_000, 8_000])
def test_time_window_in_both_directions(window):
    v = verifier(window_ms=window)
    stale = ep.seal(ALICE, b"x", now_ms=NOW - window - 1)
    future = ep.seal(ALICE, b"x", now_ms=NOW + window + 1)
    with pytest.raises(ep.StaleTimestamp):
        v.verify(stale, now_ms=NOW, policy=ANYONE, broadcast=True)
    with pytest.raises(ep.FutureTimestamp):
        v.verify(future, now_ms=NOW, policy=ANYONE, broadcast=True)
    edge = ep.seal(ALICE, b"x", now_ms=NOW - window)
    assert v.verify(edge, now_ms=NOW, policy=ANYONE, broadcast=True)


def test_replay_is_rejected_within_the_window():
    v = verifier()
    env = ep.seal(ALICE, b"x", now_ms=NOW)
    v.verify(env, now_ms=NOW, policy=ANYONE, broadcast=True)
    with pytest.raises(ep.Replay):
        v.verify(env, now_ms=NOW + 1000, policy=ANYONE, broadcast=True)
    with pytest.raises(ep.StaleTimestamp):  # and after the window it is simply stale
        v.verify(env, now_ms=NOW + 9000, policy=ANYONE, broadcast=True)


def test_forged_message_does_not_burn_the_honest_uuid():
    v = verifier()
    honest = ep.seal(ALICE, b"x", now_ms=NOW)
    forged = ep.Envelope(honest.version, honest.timestamp_ms, honest.uuid, honest.signed_by,
                         honest.signed_for, "0x" + "00" * 64, b"evil")
    with pytest.raises(ep.BadSignature):
        v.verify(forged, now_ms=NOW, policy=ANYONE, broadcast=True)
    assert v.verify(honest, now_ms=NOW, policy=ANYONE, broadcast=True)


@pytest.mark.parametrize("tamper", ["body", "uuid", "timestamp", "signed_for"])
def test_tampering_breaks_the_signature(tamper):
    env = ep.seal(ALICE, b"payload", now_ms=NOW)
    changed = {
        "body": dict(body=b"payloaD"),
        "uuid": dict(uuid="1b4e28ba-2fa1-4d2c-883f-0016d3cca427"),
        "timestamp": dict(timestamp_ms=NOW + 1),
        "signed_for": dict(signed_for=BOB.ss58_address),
    }[tamper]
    import dataclasses
    bad = dataclasses.replace(env, **changed)
    with pytest.raises(ep.BadSignature):  # re-addressed to us: only direct requests may carry a signed-for
        verifier().verify(bad, now_ms=NOW, policy=ANYONE, broadcast=tamper != "signed_for")


def test_replay_cache_memory_is_bounded_and_eviction_keeps_replays_out():
    cache = ep.ReplayCache(window_ms=8000, capacity=3)
    for i in range(5):
        cache.record("alice", f"u{i}", NOW + i, now_ms=NOW + i)
    assert len(cache) == 3
    assert cache.seen("alice", "u0", NOW) and cache.seen("alice", "u1", NOW + 1)  # forgotten, but below the floor
    assert cache.seen("alice", "u4", NOW + 4)
    assert not cache.seen("alice", "fresh", NOW + 5)
    assert not cache.seen("bob", "u0", NOW)  # alice's floor is alice's alone


def test_replay_cache_expires_old_entries():
    cache = ep.ReplayCache(window_ms=1000)
    cache.record("alice", "old", NOW, now_ms=NOW)
    cache.record("alice", "new", NOW + 5000, now_ms=NOW + 5000)
    assert len(cache) == 1 and cache.floor_ms("alice") == -1


def test_finding10_a_member_reusing_an_honest_uuid_burns_only_its_own():
    """Issue 11 finding 10: the cache was keyed by uuid alone, so Bob signing Alice's
    in-flight uuid first made Alice's message a replay. (Before: Replay raised for Alice.)"""
    v = verifier(own=EVE)
    honest = ep.seal(ALICE, b"honest", now_ms=NOW)
    squatter = ep.seal(BOB, b"squat", now_ms=NOW, uuid=honest.uuid)
    assert v.verify(squatter, now_ms=NOW, policy=ANYONE, broadcast=True).hotkey == BOB.ss58_address
    assert v.verify(honest, now_ms=NOW + 5, policy=ANYONE, broadcast=True).hotkey == ALICE.ss58_address
    with pytest.raises(ep.Replay):  # a real replay is still one
        v.verify(honest, now_ms=NOW + 10, policy=ANYONE, broadcast=True)


def test_finding10_a_flood_stamped_at_the_window_edge_moves_no_one_elses_floor():
    """Issue 11 finding 10: filling the cache with messages stamped at the window's edge
    (now + window) lifted the one floor over every honest message in flight. (Before: the
    honest message signed 1 s ago was refused as a replay.) Now the flooder's quota is its
    own, and an entry in the future is never forgotten, so the floor never leaves the past."""
    window, quota = 8_000, 50
    v = verifier(own=EVE, window_ms=window, replay_capacity=quota)
    in_flight = ep.seal(ALICE, b"honest", now_ms=NOW - 1_000)
    refused = []
    for i in range(quota + 20):
        edge = ep.seal(BOB, b"flood %d" % i, now_ms=NOW + window)
        try:
            v.verify(edge, now_ms=NOW, policy=ANYONE, broadcast=True)
        except ep.ReplayQuotaExceeded as exc:
            refused.append(exc.reason)
    assert refused == ["replay_quota"] * 20  # only the flooder's own messages beyond its quota
    assert v.replays.floor_ms(BOB.ss58_address) < NOW  # never lifted from a future stamp
    assert v.verify(in_flight, now_ms=NOW, policy=ANYONE, broadcast=True).hotkey == ALICE.ss58_address
    # Once the flood's stamps are in the past, the flooder may speak again.
    later = ep.seal(BOB, b"later", now_ms=NOW + window + 1)
    assert v.verify(later, now_ms=NOW + window + 1, policy=ANYONE, broadcast=True)


def test_finding11_unicode_digits_and_trailing_newlines_are_malformed():
    """Issue 11 finding 11: "¹²³".isdigit() is True and int() then raised ValueError (an
    HTTP 500), and "$" let a trailing newline through the uuid and signature patterns.
    (Before: ValueError for the timestamp; the newline variants were accepted.)"""
    env = ep.seal(ALICE, b"x", now_ms=NOW)
    for change in ({ep.HEADER_TIMESTAMP: "¹²³"}, {ep.HEADER_TIMESTAMP: "١٢٣"},
                   {ep.HEADER_UUID: env.uuid + "\n"}, {ep.HEADER_SIGNATURE: env.signature + "\n"},
                   {ep.HEADER_TIMESTAMP: str(NOW) + "\n"}):
        with pytest.raises(ep.MalformedEnvelope):
            ep.Envelope.from_headers(env.to_headers() | change, b"x")
    import msgpack
    fields = msgpack.unpackb(env.to_gossip_bytes()) | {"uuid": env.uuid + "\n"}
    with pytest.raises(ep.MalformedEnvelope, match="uuid"):
        ep.Envelope.from_gossip_bytes(msgpack.packb(fields, use_bin_type=True))
