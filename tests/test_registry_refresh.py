"""The metagraph re-read (node/registry/refresh.py): new registrations and
deregistrations reach the live directory; a failing or hanging chain keeps the last good
member list; the book of admitted members survives a re-read; an unknown hotkey that speaks
brings a read forward, at most one per gap however many speak."""

import functools
import random
import threading
import time
from types import SimpleNamespace

import trio

from node.registry.metagraph import members_from_neurons
from node.registry.refresh import MIN_GAP_S, RegistryRefresher, keep_registry, next_read_at
from protocol import member_book as mb
from protocol.membership import Member, Role, StaticDirectory

V = Member("5V-validator", frozenset({Role.VALIDATOR}))
T1, T2 = Member("5T-one", frozenset({Role.TRAINER})), Member("5T-two", frozenset({Role.TRAINER}))


def test_reads_apply_and_failures_keep_the_last_good_list():
    directory = mb.LiveDirectory((V, T1))
    directory.apply(mb.MemberBook(members={"5J-joined": mb.Entry(("trainer",), 50, "p", (), 0)}, staked=50))
    answers = [StaticDirectory((V, T2)), ConnectionError("chain down"), "hang", StaticDirectory((V, T1, T2))]
    seen = []

    def load():
        answer = answers.pop(0)
        if answer == "hang":
            time.sleep(0.3)  # longer than the timeout below
            return StaticDirectory(())
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_registry(directory, load, period_s=0.01, timeout_s=0.1, retry_s=0.01,
                                                     reads=4, on_change=lambda a, r: seen.append((a, r))))
            await trio.sleep(0.05)
            assert directory.member("5T-two") and directory.member("5T-one") is None  # deregistered
            assert directory.member("5J-joined") is not None  # the book stays
    trio.run(main)
    assert seen[0] == (["5T-two"], ["5T-one"])
    assert directory.member("5T-one") is not None and directory.member("5T-two") is not None
    assert directory.member("5V-validator") is not None  # never emptied by the failures
    assert len(seen) == 2


# --- on demand: when an unknown hotkey speaks (issue 15 item 4) --------------------------



class Chain:
    """The subnet's registrations as the metagraph client returns them (neurons with a
    hotkey, a validator permit and a stake), mapped by the real members_from_neurons.
    `read` is what the refresher calls in place of load_metagraph_directory."""

    def __init__(self, *hotkeys: tuple[str, bool]) -> None:
        self.neurons = [SimpleNamespace(hotkey=k, validator_permit=v, total_stake=1.0) for k, v in hotkeys]
        self.reads = 0
        self.in_flight = self.most_in_flight = 0
        self.hold: threading.Event | None = None  # set: reads block until it is released
        self.lock = threading.Lock()

    def register(self, hotkey: str) -> None:
        self.neurons.append(SimpleNamespace(hotkey=hotkey, validator_permit=False, total_stake=1.0))

    def read(self) -> StaticDirectory:
        with self.lock:
            self.reads += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                self.hold.wait(60)
            return StaticDirectory(members_from_neurons(list(self.neurons)))
        finally:
            with self.lock:
                self.in_flight -= 1


def rule(**over):
    args = dict(last_started=100.0, last_finished=101.0, failures=0, nudged_at=None, period_s=300.0, retry_s=5.0,
                min_gap_s=30.0)
    return next_read_at(**{**args, **over})


def test_next_read_at_vectors():
    assert rule() == 401.0  # the period, from the end of the last read
    assert rule(failures=1) == 106.0 and rule(failures=3) == 121.0 and rule(failures=20) == 401.0  # backoff
    assert rule(nudged_at=200.0) == 200.0  # a stranger long after the last read: read now
    assert rule(nudged_at=110.0) == 130.0  # soon after one: not before the gap has passed
    assert rule(nudged_at=110.0, failures=1) == 106.0  # the retry is sooner anyway
    assert rule(nudged_at=110.0, period_s=20.0) == 121.0  # so is a short period


def simulated_reads(nudges: list[float], *, until: float, min_gap_s: float) -> list[float]:
    """When the reads start, by the rule, for strangers speaking at `nudges` (reads are instant)."""
    started = finished = 0.0
    reads, pending = [0.0], None
    for t in sorted(nudges) + [until]:
        while True:  # the reads due before this nudge
            due = next_read_at(last_started=started, last_finished=finished, failures=0, nudged_at=pending,
                               period_s=300.0, retry_s=5.0, min_gap_s=min_gap_s)
            if due > t:
                break
            started = finished = due
            reads.append(due)
            pending = None
        if t < until and pending is None:
            pending = t
    return reads


def test_a_flood_of_strangers_costs_one_read_per_window_by_the_rule():
    """1000 unknown hotkeys over 10 minutes: one read per 30-s window at most, and the
    strangers do bring reads forward (the period alone would make 3)."""
    rng = random.Random(15)
    nudges = [rng.uniform(0, 600) for _ in range(1000)]
    reads = simulated_reads(nudges, until=600.0, min_gap_s=MIN_GAP_S)
    assert min(b - a for a, b in zip(reads, reads[1:])) >= MIN_GAP_S - 1e-9
    assert 600 / MIN_GAP_S - 1 <= len(reads) <= 600 / MIN_GAP_S + 1  # 21: the first, then one per window
    assert len(simulated_reads(nudges, until=600.0, min_gap_s=0.0)) > 900  # what the gap prevents


async def _wait(predicate, deadline_s=60.0):
    with trio.fail_after(deadline_s):
        while not predicate():
            await trio.sleep(0.01)


def test_a_stranger_brings_one_read_forward_and_a_flood_no_more_than_one_per_gap():
    chain = Chain(("5V", True))
    directory = mb.LiveDirectory(())
    refresher = RegistryRefresher(directory, chain.read, period_s=3600.0, min_gap_s=0.3)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresher.run)
            await _wait(lambda: chain.reads == 1 and directory.member("5V") is not None)
            await trio.sleep(0.4)
            assert chain.reads == 1  # no stranger, no read before the period
            refresher.nudge()
            await _wait(lambda: chain.reads == 2)
            await trio.sleep(0.4)
            assert chain.reads == 2  # one stranger, one read
            start, reads_before = trio.current_time(), chain.reads
            for _ in range(1000):  # a flood of strangers over about a second
                refresher.nudge()
                await trio.sleep(0.001)
            elapsed = trio.current_time() - start
            await trio.sleep(0.4)
            floods = chain.reads - reads_before
            assert 1 <= floods <= elapsed / 0.3 + 2, (floods, elapsed)
            assert refresher.nudges == 1001
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_nudges_during_a_read_in_flight_make_one_follow_up_read():
    chain = Chain(("5V", True))
    refresher = RegistryRefresher(mb.LiveDirectory(()), chain.read, period_s=3600.0, min_gap_s=0.05,
                                  timeout_s=60.0)

    async def main():
        async with trio.open_nursery() as nursery:
            chain.hold = threading.Event()
            nursery.start_soon(refresher.run)
            await _wait(lambda: chain.in_flight == 1)
            for _ in range(1000):
                refresher.nudge()
            await trio.sleep(0.2)
            assert chain.reads == 1  # deduplicated: the read in flight is the only one
            chain.hold.set()
            await _wait(lambda: chain.reads == 2)
            await trio.sleep(0.3)
            assert chain.reads == 2 and chain.most_in_flight == 1
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_a_hotkey_registered_on_the_chain_is_accepted_without_a_restart(tmp_path):
    """A real Node's verifier and gossip validator: Dave registers on the chain after the
    node's last read; his first message is IGNOREd as unknown_signer (never charged to
    the relay), which nudges the re-read; his next message is accepted. The period is an
    hour, so only the nudge can have done it."""
    from crypto.identity import Hotkey
    from node.daemon import Node, gossip_validator
    from node.mesh import ValidationResult
    from node.registry.genesis import Genesis
    from node.settings import NodeSettings
    from protocol.inbound import seal_message
    from protocol.messages import Channel, Ping

    alice, dave, eve = (Hotkey.from_uri(u) for u in ("//Alice", "//Dave", "//Eve"))
    chain = Chain((alice.ss58_address, True))
    founding = members_from_neurons(chain.neurons)  # what the node read at start
    node = Node(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "node"), alice,
                Genesis("bittensor-15", founding))
    node.membership.registry = RegistryRefresher(node.genesis.directory, chain.read, period_s=3600.0,
                                                 min_gap_s=0.2)
    validate = gossip_validator(Channel.MEMBERSHIP, node.verifier, mesh_id="bittensor-15", max_bytes=65536,
                                on_reject=functools.partial(node._rejected, "gossip"))

    def now_ms():
        return time.time_ns() // 1_000_000

    def ping(seq):
        return seal_message(dave, Ping(seq, now_ms()), now_ms=now_ms()).to_gossip_bytes()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.membership.registry.run)
            await _wait(lambda: chain.reads == 1 and chain.in_flight == 0)  # its first read is over
            chain.register(dave.ss58_address)
            assert validate("12D3KooWRelay", ping(1)) == (ValidationResult.IGNORE, "unknown_signer")
            assert validate("12D3KooWRelay", ping(2)) == (ValidationResult.IGNORE, "unknown_signer")
            await _wait(lambda: node.genesis.directory.member(dave.ss58_address) is not None)
            assert validate("12D3KooWRelay", ping(3)) == (ValidationResult.ACCEPT, "ok")
            assert chain.reads == 2  # two strangers' messages, one read
            # a stranger over HTTP nudges too
            chain.register(eve.ss58_address)
            envelope = seal_message(eve, Ping(4, now_ms()), now_ms=now_ms())
            code, reply = await node._on_http_message(envelope.to_headers(), envelope.body)
            assert (code, reply["reason"]) == (401, "unknown_signer")
            await _wait(lambda: node.genesis.directory.member(eve.ss58_address) is not None)
            assert node.membership.registry.nudges == 3
            assert node.membership.status()["registry"] == {"reads": 3, "nudges": 3, "nudged_reads": 2}
            nursery.cancel_scope.cancel()
    trio.run(main)
    assert node.metrics.rejected.labels(source="gossip", reason="unknown_signer")._value.get() == 2


def test_with_a_genesis_file_a_stranger_reads_nothing(tmp_path):
    from crypto.identity import Hotkey
    from node.daemon import Node
    from node.registry.genesis import Genesis
    from node.settings import NodeSettings

    alice = Hotkey.from_uri("//Alice")
    node = Node(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "node"), alice,
                Genesis("m", (Member(alice.ss58_address, frozenset({Role.VALIDATOR})),)))
    assert node.membership.registry is None and node.membership.status()["registry"] is None
    node._rejected("http", "unknown_signer")  # nothing to nudge: no error, no read
