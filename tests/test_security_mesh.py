"""Issue 11, findings 4, 9 (streams) and 10: the attacks run against real py-libp2p hosts
on 127.0.0.1, each host with the node's own gossip validator (node/daemon.py) over its
own EnvelopeVerifier, so the verdicts, the forwarder penalties and the bans are the ones
a running node applies."""

from __future__ import annotations

import time

import trio

from crypto.identity import Hotkey
from node.daemon import gossip_validator
from node.mesh import Mesh, MeshConfig, ValidationResult
from protocol.epistula import Envelope, EnvelopeVerifier, seal
from protocol.inbound import seal_message
from protocol.membership import Member, Role, StaticDirectory
from protocol.messages import Channel, Ping, decode, encode
from tests.test_mesh import collect, line, wait_line_ready

MESH_ID = "security"
LIMIT = 5  # invalid messages before a peer is disconnected (the node's default is 20)
KEYS = [Hotkey.from_uri(uri) for uri in ("//Alice", "//Bob", "//Charlie")]  # hosts A, X, B
DIRECTORY = StaticDirectory(tuple(Member(k.ss58_address, frozenset({Role.TRAINER})) for k in KEYS))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def subscribe_as_node(mesh: Mesh, key: Hotkey):
    """What Node._start_services does for the membership channel."""
    verifier = EnvelopeVerifier(DIRECTORY, key.ss58_address)
    return await mesh.subscribe(Channel.MEMBERSHIP.value, gossip_validator(
        Channel.MEMBERSHIP, verifier, mesh_id=MESH_ID, max_bytes=mesh.config.max_gossip_bytes))


async def subscribe_as_attacker(mesh: Mesh):
    """The attacker runs its own code: it publishes whatever it likes."""
    return await mesh.subscribe(Channel.MEMBERSHIP.value, lambda peer, data: (ValidationResult.ACCEPT, "ok"))


def run_on_line(configs: list[MeshConfig], scenario) -> None:
    """Run scenario(*meshes) on hosts in a line; a failed assertion is raised as itself, not
    from under the meshes' nested nurseries (too deep for the traceback to show it)."""
    failures: list[AssertionError] = []

    async def main() -> None:
        async with line(configs) as meshes:
            try:
                await scenario(*meshes)
            except AssertionError as exc:
                failures.append(exc)

    trio.run(main)
    if failures:
        raise failures[0]


def pings(received) -> list[int]:
    return [decode(Envelope.from_gossip_bytes(m.data).body).seq for m in received]


def test_finding4_gossip_signed_for_a_relay_does_not_get_it_disconnected() -> None:
    """A (a member) publishes pings signed *for* X. Before the fix X accepted them as its
    own and relayed them; B refused each as wrong_recipient charged to X and, past the
    limit, disconnected and blacklisted X (reasoned from the code: X's verifier returned on
    signed_for == own hotkey; reproduced by the unit test in test_epistula.py). Now X
    refuses them itself (charged to A, the peer that sent them), so B never sees one, and
    X's own traffic still reaches B."""
    a_key, x_key, b_key = KEYS
    config = MeshConfig(MESH_ID, invalid_message_limit=LIMIT)

    async def attack(a: Mesh, x: Mesh, b: Mesh) -> None:
        await subscribe_as_attacker(a)
        await subscribe_as_node(x, x_key)
        at_b = await subscribe_as_node(b, b_key)
        await wait_line_ready([a, x, b], Channel.MEMBERSHIP.value)
        await trio.sleep(1.5)  # let the heartbeat graft the line

        for seq in range(2 * LIMIT):
            framed = seal_message(a_key, Ping(seq, now_ms()), now_ms=now_ms(), signed_for=x_key.ss58_address)
            await a.publish(Channel.MEMBERSHIP.value, framed.to_gossip_bytes())
        with trio.move_on_after(10):  # until X drops A (the fix) or B drops X (the attack)
            while a.peer_id in x.connected_peers() and x.peer_id in b.connected_peers():
                await trio.sleep(0.05)
        assert x.peer_id in b.connected_peers(), b.stats.rejected_by_reason
        assert a.peer_id not in x.connected_peers()  # the attacker paid for its messages

        honest = seal_message(x_key, Ping(1000, now_ms()), now_ms=now_ms())
        await x.publish(Channel.MEMBERSHIP.value, honest.to_gossip_bytes())
        received: list = []
        await collect(at_b, 1, received, 10)
        await trio.sleep(0.5)  # anything wrongly relayed would have arrived by now

        assert x.stats.rejected_by_reason.get("wrong_recipient", 0) > LIMIT
        assert b.stats.rejected_by_reason == {}
        assert pings(received) == [1000]
        assert x.peer_id in b.connected_peers()
        assert b.stats.disconnects == 0 and b.peer_scores(Channel.MEMBERSHIP.value)[x.peer_id] == 0

    run_on_line([config] * 3, attack)


def test_finding10_a_member_squatting_a_uuid_on_gossip_does_not_drop_the_honest_message() -> None:
    """A learns the uuid of X's message (in flight, or announced) and publishes its own
    signed message with that uuid first. Before the fix the cache was keyed by uuid alone:
    X's own validator and B's refused X's message as a replay, so it was neither delivered
    nor relayed (reasoned from the code; the unit variant is in test_epistula.py). Now the
    uuid is A's to burn only for A."""
    a_key, x_key, b_key = KEYS

    async def attack(a: Mesh, x: Mesh, b: Mesh) -> None:
        await subscribe_as_node(a, a_key)
        await subscribe_as_node(x, x_key)
        at_b = await subscribe_as_node(b, b_key)
        await wait_line_ready([a, x, b], Channel.MEMBERSHIP.value)
        await trio.sleep(1.5)

        honest = seal_message(x_key, Ping(2, now_ms()), now_ms=now_ms())
        squat = seal(a_key, encode(Ping(1, now_ms())), now_ms=now_ms(), uuid=honest.uuid)
        await a.publish(Channel.MEMBERSHIP.value, squat.to_gossip_bytes())
        received: list = []
        await collect(at_b, 1, received, 10)
        await x.publish(Channel.MEMBERSHIP.value, honest.to_gossip_bytes())
        await collect(at_b, 2, received, 10)

        assert sorted(pings(received)) == [1, 2]
        assert "replay" not in x.stats.ignored_by_reason and "replay" not in b.stats.ignored_by_reason

    run_on_line([MeshConfig(MESH_ID)] * 3, attack)
