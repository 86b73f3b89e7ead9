"""A validator's epoch waits for each miner's offer and its membership announcement, so a
miner whose announcement lags its offer (a loaded start) is not scored unreachable."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from node.fhe_service import ExchangeError, FheConfig
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
