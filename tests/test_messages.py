"""Strict msgpack decoding of typed messages, and the gossip/HTTP inbound pipeline."""

import msgpack
import pytest
from hypothesis import given, strategies as st

from crypto.identity import Hotkey
from protocol import epistula as ep
from protocol import messages as m
from protocol.inbound import open_gossip, open_request, seal_message
from protocol.membership import Member, Role, StaticDirectory

NOW = 1_700_000_000_000
VALIDATOR = Hotkey.from_uri("//Alice")
TRAINER = Hotkey.from_uri("//Bob")
DIRECTORY = StaticDirectory((
    Member(VALIDATOR.ss58_address, frozenset({Role.VALIDATOR}), 10.0),
    Member(TRAINER.ss58_address, frozenset({Role.TRAINER}), 1.0),
))


def raw_message(type_name, fields, v=m.PROTOCOL_VERSION):
    return msgpack.packb({"v": v, "type": type_name, "fields": fields}, use_bin_type=True)


@given(seq=st.integers(0, 2**63 - 1), sent=st.integers(0, 2**53))
def test_ping_round_trips(seq, sent):
    assert m.decode(m.encode(m.Ping(seq=seq, sent_ms=sent))) == m.Ping(seq, sent)


def test_announce_round_trips_on_its_channel():
    a = m.Announce("mesh", "12D3Koo", ["/ip4/127.0.0.1/tcp/1"], ["trainer"], NOW)
    assert m.decode(m.encode(a), channel=m.Channel.MEMBERSHIP) == a
    with pytest.raises(m.WrongChannel):
        m.decode(m.encode(a), channel=m.Channel.TRAIN)


@pytest.mark.parametrize("raw, error, hint", [
    (b"\xc1garbage", m.MessageError, "msgpack"),
    (raw_message("ping", {"seq": 1, "sent_ms": 2}, v=99), m.UnsupportedVersion, "version"),
    (raw_message("nope", {}), m.UnknownMessageType, "nope"),
    (raw_message("ping", {"seq": 1}), m.MessageError, "missing"),
    (raw_message("ping", {"seq": 1, "sent_ms": 2, "x": 3}), m.MessageError, "unknown fields"),
    (raw_message("ping", {"seq": "1", "sent_ms": 2}), m.MessageError, "seq"),
    (raw_message("ping", {"seq": True, "sent_ms": 2}), m.MessageError, "seq"),
    (raw_message("announce", {"mesh_id": "m", "peer_id": "p", "addrs": [1], "roles": [],
                              "started_ms": 0}), m.MessageError, "addrs"),
    (msgpack.packb(msgpack.ExtType(1, b"x")), m.MessageError, "extension"),
    (raw_message("ping", {"seq": 1, "sent_ms": 2}) + b"\x00", m.MessageError, "msgpack"),
    (raw_message("ping", {"seq": 1, "sent_ms": 1, "pad": "x" * 300}),
     m.OversizedMessage, "limit"),
    (b"\x00" * (m.MAX_MESSAGE_BYTES + 1), m.OversizedMessage, "limit"),
])
def test_strict_decoding_rejects_with_a_reason(raw, error, hint):
    with pytest.raises(error, match=hint) as info:
        m.decode(raw)
    assert info.value.reason


def test_encode_refuses_to_build_an_oversized_message():
    with pytest.raises(ValueError, match="limit"):
        m.encode(m.MembershipView(at_ms=0, members=["x" * 100] * 1000))


def test_gossip_pipeline_accepts_a_sealed_message():
    env = seal_message(VALIDATOR, m.Ping(1, NOW), now_ms=NOW)
    v = ep.EnvelopeVerifier(DIRECTORY, TRAINER.ss58_address)
    got = open_gossip(env.to_gossip_bytes(), channel=m.Channel.MEMBERSHIP, verifier=v,
                      now_ms=NOW, max_bytes=4096)
    assert got.message == m.Ping(1, NOW) and got.member.hotkey == VALIDATOR.ss58_address


def test_validator_only_message_from_a_trainer_is_rejected():
    env = seal_message(TRAINER, m.MembershipView(NOW, []), now_ms=NOW)
    v = ep.EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address)
    with pytest.raises(ep.SignerNotAllowed):
        open_gossip(env.to_gossip_bytes(), channel=m.Channel.MEMBERSHIP, verifier=v,
                    now_ms=NOW, max_bytes=1 << 20)


def test_oversized_gossip_payload_is_rejected_before_parsing():
    v = ep.EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address)
    with pytest.raises(m.OversizedMessage):
        open_gossip(b"\x00" * 5000, channel=m.Channel.MEMBERSHIP, verifier=v, now_ms=NOW,
                    max_bytes=4096)


def test_http_request_pipeline_requires_this_node_as_recipient():
    v = ep.EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address)
    env = seal_message(TRAINER, m.Ping(3, NOW), now_ms=NOW, signed_for=VALIDATOR.ss58_address)
    assert open_request(env.to_headers(), env.body, verifier=v, now_ms=NOW).message.seq == 3
    broadcast = seal_message(TRAINER, m.Ping(4, NOW), now_ms=NOW)
    with pytest.raises(ep.WrongRecipient):
        open_request(broadcast.to_headers(), broadcast.body, verifier=v, now_ms=NOW)
