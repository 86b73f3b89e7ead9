"""A running node rejects every kind of bad input with its reason, counts it in /metrics,
and keeps serving. The attacker is an in-process libp2p host that takes the place of a
genesis trainer (its peer key and hotkey), so its messages reach the node's validator."""

import dataclasses
import json
import time

import msgpack
import pytest
import trio

from crypto.identity import Hotkey
from node.mesh import Mesh, MeshConfig
from node.testnet import TestnetPlan, prepare
from node.wallet import load_hotkey
from protocol.epistula import seal
from protocol.inbound import seal_message
from protocol.messages import Announce, MembershipView, Ping
from tests.nodes import _spawn, _stop_all, http_get, http_post, rejected_metric, wait_ready

GOSSIP_REASONS = ["malformed_envelope", "malformed_message", "oversized", "bad_signature", "replay",
                  "stale_timestamp", "future_timestamp", "unknown_signer", "wrong_recipient",
                  "signer_not_allowed", "peer_binding", "unknown_type"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    nodes = prepare(TestnetPlan(validators=1, trainers=1, miners=0, pings=0, directory=root))
    validator, trainer = nodes
    validator.process = _spawn(validator)
    try:
        wait_ready(validator)
        yield root, validator, trainer
    finally:
        _stop_all([validator])


def now_ms():
    return time.time_ns() // 1_000_000


def attack_messages(trainer_key):
    eve = Hotkey.from_uri("//Eve")
    good = seal_message(trainer_key, Ping(1, now_ms()), now_ms=now_ms())
    padded = msgpack.packb({"v": 1, "type": "ping", "fields": {"seq": 1, "sent_ms": 1, "pad": "x" * 400}})
    unknown = msgpack.packb({"v": 1, "type": "steal_funds", "fields": {}})
    garbage_body = b"\x92\x01"
    return {
        "malformed_envelope": b"\xc1 definitely not msgpack",
        "malformed_message": seal(trainer_key, garbage_body, now_ms=now_ms()).to_gossip_bytes(),
        "oversized": seal(trainer_key, padded, now_ms=now_ms()).to_gossip_bytes(),
        "unknown_type": seal(trainer_key, unknown, now_ms=now_ms()).to_gossip_bytes(),
        "bad_signature": dataclasses.replace(good, signature="0x" + "11" * 64).to_gossip_bytes(),
        "stale_timestamp": seal_message(trainer_key, Ping(2, 0), now_ms=now_ms() - 60_000).to_gossip_bytes(),
        "future_timestamp": seal_message(trainer_key, Ping(3, 0), now_ms=now_ms() + 60_000).to_gossip_bytes(),
        "unknown_signer": seal_message(eve, Ping(4, now_ms()), now_ms=now_ms()).to_gossip_bytes(),
        "wrong_recipient": seal_message(trainer_key, Ping(5, now_ms()), now_ms=now_ms(),
                                        signed_for=eve.ss58_address).to_gossip_bytes(),
        "signer_not_allowed": seal_message(trainer_key, MembershipView(now_ms(), []),
                                           now_ms=now_ms()).to_gossip_bytes(),
        "peer_binding": seal_message(trainer_key, Announce("testnet", "12D3KooWNotMyPeerId", [], ["trainer"], 0),
                                     now_ms=now_ms()).to_gossip_bytes(),
        "replay": good.to_gossip_bytes(),  # sent twice below: the second copy is the replay
    }


async def _attack(root, validator, trainer):
    trainer_key = load_hotkey("testnet", trainer.name, root / "wallets")
    config = MeshConfig(mesh_id="testnet", listen_port=_port_of(trainer),
                        bootstrap=(json.loads((validator.data_dir / "ready.json").read_text())["addrs"][0],))
    seed = (trainer.data_dir / "node_key").read_bytes()
    async with Mesh.open(config, seed) as attacker:
        await attacker.subscribe("membership", lambda peer, data: (_accept(), "ok"))
        await attacker.wait_for_topic_peers("membership", 1, timeout_s=30)
        await trio.sleep(1.5)  # let the node's mesh graft us
        payloads = attack_messages(trainer_key)
        for payload in payloads.values():
            await attacker.publish("membership", payload)
        await attacker.publish("membership", payloads["replay"])
        # After all that, an honest message from the same peer still gets through.
        await attacker.publish("membership", seal_message(trainer_key, Ping(99, now_ms()),
                                                          now_ms=now_ms()).to_gossip_bytes())
        deadline = trio.current_time() + 30
        while trio.current_time() < deadline:
            _, body = await trio.to_thread.run_sync(http_get, validator.api_port, "/status")
            status = json.loads(body)
            if status["presence"]["pings_received"].get(trainer.hotkey, 0) >= 2:
                return status
            await trio.sleep(0.2)
        return status


def _accept():
    from node.mesh import ValidationResult
    return ValidationResult.ACCEPT


def _port_of(node):
    import tomllib
    return tomllib.loads((node.data_dir / "node.toml").read_text())["listen_port"]


def test_gossip_bad_input_is_rejected_counted_and_the_node_keeps_serving(mesh):
    root, validator, trainer = mesh
    status = trio.run(_attack, root, validator, trainer)
    # the valid ping (seq 1, its first copy) and the final one (seq 99) were delivered
    assert status["presence"]["pings_received"][trainer.hotkey] == 2
    code, metrics = http_get(validator.api_port, "/metrics")
    assert code == 200
    text = metrics.decode()
    for reason in GOSSIP_REASONS:
        assert rejected_metric(text, "gossip", reason) == 1, (reason, status["rejected"])
    assert http_get(validator.api_port, "/health") == (200, b'{"ok": true}')


def test_http_endpoint_checks_epistula(mesh):
    root, validator, trainer = mesh
    trainer_key = load_hotkey("testnet", trainer.name, root / "wallets")
    port = validator.api_port
    ok = seal_message(trainer_key, Ping(7, now_ms()), now_ms=now_ms(), signed_for=validator.hotkey)
    assert http_post(port, "/v1/message", ok.body, ok.to_headers()) == (200, {"ok": True, "type": "ping"})
    code, reply = http_post(port, "/v1/message", ok.body, ok.to_headers())
    assert (code, reply["reason"]) == (401, "replay")
    forged = dataclasses.replace(seal_message(trainer_key, Ping(8, now_ms()), now_ms=now_ms(),
                                              signed_for=validator.hotkey), signature="0x" + "22" * 64)
    code, reply = http_post(port, "/v1/message", forged.body, forged.to_headers())
    assert (code, reply["reason"]) == (401, "bad_signature")
    code, reply = http_post(port, "/v1/message", ok.body, {"Epistula-Version": "2"})
    assert (code, reply["reason"]) == (401, "malformed_envelope")
    code, _ = http_post(port, "/v1/message", b"x" * (1024 * 1024 + 1), ok.to_headers())
    assert code == 413
    _, metrics = http_get(port, "/metrics")
    assert rejected_metric(metrics.decode(), "http", "bad_signature") == 1
    assert http_get(port, "/health")[0] == 200


def test_finding11_unicode_digit_timestamp_gets_401_not_500(mesh):
    """Issue 11 finding 11: "¹²³".isdigit() is True, int() then raised ValueError and the
    node's HTTP API answered 500. The header is sent as the UTF-8 bytes a client would put
    on the wire. (Before: 500 with aiohttp's error page; now 401 malformed_envelope.)"""
    import http.client

    root, validator, trainer = mesh
    trainer_key = load_hotkey("testnet", trainer.name, root / "wallets")
    env = seal_message(trainer_key, Ping(9, now_ms()), now_ms=now_ms(), signed_for=validator.hotkey)
    headers = env.to_headers() | {"Epistula-Timestamp": "¹²³".encode()}
    connection = http.client.HTTPConnection("127.0.0.1", validator.api_port, timeout=10)
    try:
        connection.request("POST", "/v1/message", body=env.body, headers=headers)
        response = connection.getresponse()
        code, raw = response.status, response.read()
    finally:
        connection.close()
    assert code == 401, raw[:300]
    assert json.loads(raw)["reason"] == "malformed_envelope"
    assert http_get(validator.api_port, "/health")[0] == 200
