"""The validator's challenger: an epoch waits for each miner's offer and its membership
announcement (a miner whose announcement lags its offer is not scored unreachable), and
challenge inputs are drawn where an honest FHE result agrees with the clear reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import trio

from node.fhe_service import ExchangeError, FheConfig
from node.roles import challenger
from node.roles.challenger import ChallengerService
from node.settings import NodeSettings
from protocol.challenge_messages import ModelOffer
from protocol.membership import Role

PEER = "12D3KooWRcWDTQ2KtNWFqiCn2HoJRaWoqETLJef9cY6hjDgBx7Wu"
SHA = "ab" * 32


def make_challenger(tmp_path, wait_s: float) -> tuple[ChallengerService, dict]:
    peers: dict[str, str] = {}
    svc = ChallengerService(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path),
                            FheConfig(offers_wait_s=wait_s))
    svc.ctx = SimpleNamespace(peer_of=peers.get)
    svc.miners = ["miner-a"]
    svc.manifest = SimpleNamespace(model="digits-cnn", server_sha256=SHA)
    svc.on_message("miner-a", ModelOffer("digits-cnn", SHA, PEER, "/sealmesh/fhe/1", 4, 0), 0)
    return svc, peers


def test_epoch_waits_for_the_announcement_that_follows_the_offer(tmp_path):
    svc, peers = make_challenger(tmp_path, wait_s=20)

    async def main():
        returned_at = []

        async def announce_later():
            await trio.sleep(1.2)
            assert not returned_at, "the epoch started before the miner was announced"
            peers["miner-a"] = PEER

        async with trio.open_nursery() as nursery:
            nursery.start_soon(announce_later)
            offers = await svc._await_offers()
            returned_at.append(trio.current_time())
        return offers

    assert trio.run(main) == {"miner-a": "digits-cnn"}
    assert svc._peer("miner-a") == PEER
    assert svc.problems == []


def test_a_miner_never_announced_is_offered_after_the_wait_and_then_unreachable(tmp_path):
    svc, _ = make_challenger(tmp_path, wait_s=1.0)

    async def main():
        began = trio.current_time()
        offers = await svc._await_offers()
        return offers, trio.current_time() - began

    offers, waited = trio.run(main)
    assert offers == {"miner-a": "digits-cnn"} and waited >= 0.9
    with pytest.raises(ExchangeError, match="unreachable"):
        svc._peer("miner-a")


class FakeClient:
    """reference(): wide margins only for images whose mean is above `threshold`."""

    def __init__(self, threshold: float) -> None:
        self.threshold, self.calls = threshold, 0

    def reference(self, image):
        self.calls += 1
        if float(np.mean(image)) > self.threshold:
            return np.array([0.0, 1.0, 10.0, 2.0])  # margin 8/10
        return np.array([0.0, 9.5, 10.0, 2.0])  # margin 0.5/10


def test_challenge_inputs_are_drawn_with_a_wide_reference_margin(monkeypatch):
    from fhe.bundle import MIN_CHALLENGE_MARGIN, reference_margin
    from fhe.inputs import draw_challenge_input

    means = [float(np.mean(draw_challenge_input("digits-cnn", s).image)) for s in range(200)]
    client = FakeClient(float(np.percentile(means, 70)))  # about 30 % of inputs pass
    for _ in range(5):
        seed = challenger.confident_seed_in_worker(client, "digits-cnn")
        assert reference_margin(client.reference(draw_challenge_input("digits-cnn", seed).image)) >= \
            MIN_CHALLENGE_MARGIN
    assert client.calls > 10  # it did have to skip inputs

    never = FakeClient(float("inf"))
    seed = challenger.confident_seed_in_worker(never, "digits-cnn", tries=7)
    assert isinstance(seed, int) and never.calls == 7  # bounded: gives up and sends one anyway


def test_reference_margin():
    from fhe.bundle import reference_margin

    assert reference_margin([0.0, 1.0, 10.0, 2.0]) == pytest.approx(0.8)
    assert reference_margin([3.0, 3.0, 3.0]) == 0.0
    assert reference_margin([1.0, 1.0, 0.0]) == 0.0  # a tie at the top
