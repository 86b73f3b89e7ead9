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


def test_signed_for_must_be_this_node_or_empty_on_broadcast():
    to_alice = ep.seal(BOB, b"x", now_ms=NOW, signed_for=ALICE.ss58_address)
    with pytest.raises(ep.WrongRecipient, match="not this node"):
        verifier(own=BOB).verify(to_alice, now_ms=NOW, policy=ANYONE, broadcast=False)
    to_all = ep.seal(ALICE, b"x", now_ms=NOW)
    with pytest.raises(ep.WrongRecipient, match="broadcast"):
        verifier().verify(to_all, now_ms=NOW, policy=ANYONE, broadcast=False)
    assert verifier().verify(to_all, now_ms=NOW, policy=ANYONE, broadcast=True)


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
    with pytest.raises(ep.BadSignature):
        verifier().verify(bad, now_ms=NOW, policy=ANYONE, broadcast=True)


def test_replay_cache_memory_is_bounded_and_eviction_keeps_replays_out():
    cache = ep.ReplayCache(window_ms=8000, capacity=3)
    for i in range(5):
        cache.record(f"u{i}", NOW + i, now_ms=NOW + i)
    assert len(cache) == 3
    assert cache.seen("u0", NOW) and cache.seen("u1", NOW + 1)  # evicted, but below the floor
    assert cache.seen("u4", NOW + 4)
    assert not cache.seen("fresh", NOW + 5)


def test_replay_cache_expires_old_entries():
    cache = ep.ReplayCache(window_ms=1000)
    cache.record("old", NOW, now_ms=NOW)
    cache.record("new", NOW + 5000, now_ms=NOW + 5000)
    assert len(cache) == 1 and cache.floor_ms == -1
