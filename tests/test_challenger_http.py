"""A sealmesh validator challenges a miner over the Brainlock subnet's HTTP protocol
(node/roles/challenger.py with brainlock_endpoints): keys through /add_key, a chained
/compute, the first chunk scored as a libp2p result is; a stream that fails Brainlock's
streaming check is the error outcome late_stream."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import trio

from node.fhe_service import FheConfig
from node.roles.challenger import ChallengerService, confident_seed_in_worker, load_brainlock_endpoints
from node.settings import NodeSettings
from protocol.challenge import ChallengeConfig, ChallengeMachine, RecordOutcome, SendChallenge, UploadKey
from protocol.membership import Role
from protocol.scoring import Outcome
from tests.test_brainlock_http import MINER, MODEL, VALIDATOR, bundle, miner_server  # noqa: F401 (fixtures)


def http_challenger(tmp_path, bundle_dir, port: int, iterations: int = 2) -> ChallengerService:
    from fhe.bundle import ValidatorClient, load_manifest

    svc = ChallengerService(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path),
                            FheConfig(model=MODEL, bundle_dir=str(bundle_dir)),
                            brainlock_endpoints={MINER.ss58_address: ("127.0.0.1", port)})
    svc.ctx = SimpleNamespace(hotkey=VALIDATOR, peer_of=lambda hotkey: None)  # no libp2p peer at all
    svc.me = VALIDATOR.ss58_address
    svc.client = ValidatorClient(bundle_dir, tmp_path / "keys")
    svc.manifest = load_manifest(bundle_dir)
    svc.machine = ChallengeMachine(ChallengeConfig("mesh-http", 1, 120.0, iterations=iterations), svc.me)
    return svc


def one_challenge(svc: ChallengerService, seed: int):
    """The epoch's effects for one miner, carried out as _drive does; the outcome record."""
    async def main():
        queue = svc.machine.start_epoch(0, offers={MINER.ss58_address: MODEL},
                                        key_ids={MODEL: svc.client.key_id()}, validators=[svc.me], now=time.time())
        queue += svc.machine.issue(MINER.ss58_address, input_seed=seed, now=time.time())
        records = []
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, UploadKey):
                queue += await svc._upload_key(effect)
            elif isinstance(effect, SendChallenge):
                queue += await svc._send(effect)
            elif isinstance(effect, RecordOutcome):
                records.append(effect.record)
        return records

    records = trio.run(main)
    assert len(records) == 1
    return records[0]


@pytest.mark.slow
def test_a_challenger_scores_a_miner_over_brainlock_http(miner_server, bundle, tmp_path):  # noqa: F811
    miner, server, port, _ = miner_server
    svc = http_challenger(tmp_path, bundle, port)
    seed = confident_seed_in_worker(svc.client, MODEL, tries=8)
    record = one_challenge(svc, seed)
    assert record.outcome is Outcome.OK, record
    assert record.cosine is not None and record.cosine >= svc.machine.config.min_cosine
    assert record.latency_s is not None and record.latency_s > 0
    assert server.served["add_key"] >= 1 and server.served["compute"] >= 1  # over HTTP, not libp2p
    assert svc.brainlock_uids[MINER.ss58_address] in server.uids


class LateMiner(BaseHTTPRequestHandler):
    """A miner that holds every chunk back to the end: Brainlock's check fails it."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/add_key":
            body = json.dumps({"uid": "late-uid"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.6)
        for _ in range(2):
            self.wfile.write((16).to_bytes(4, "little") + b"\0" * 16)
        self.wfile.write((0).to_bytes(4, "little"))
        self.wfile.flush()

    def log_message(self, *args):
        pass


def test_a_late_stream_is_recorded_as_late_stream(bundle, tmp_path):  # noqa: F811
    http = ThreadingHTTPServer(("127.0.0.1", 0), LateMiner)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        svc = http_challenger(tmp_path, bundle, http.server_address[1])
        record = one_challenge(svc, seed=1)
    finally:
        http.shutdown()
    assert (record.outcome, record.error_reason) == (Outcome.ERROR, "late_stream")


def test_brainlock_endpoints_file(tmp_path):
    from node.cli import UserError

    assert load_brainlock_endpoints(tmp_path) == {}
    (tmp_path / "brainlock_endpoints.json").write_text(json.dumps({"5Miner": "10.0.0.2:8091"}))
    assert load_brainlock_endpoints(tmp_path) == {"5Miner": ("10.0.0.2", 8091)}
    (tmp_path / "brainlock_endpoints.json").write_text(json.dumps({"5Miner": "10.0.0.2"}))
    with pytest.raises(UserError, match="host:port"):
        load_brainlock_endpoints(tmp_path)


def test_judge_chain_names_the_first_straying_iteration():
    from protocol.brainlock import CHAINED_MIN_EQUAL, equal_fraction, judge_chain

    assert equal_fraction([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert equal_fraction([1, 2], [1, 2, 3]) == 0.0  # a length mismatch is no match at all
    assert judge_chain([]) is None and judge_chain([0.95, CHAINED_MIN_EQUAL]) is None
    fault = judge_chain([0.99, 0.93, 0.1, 0.0])
    assert (fault.iteration, fault.equal_fraction) == (4, 0.1)  # iterations numbered from 2
    assert "iteration 4 of 5" in fault.detail(5)
    assert judge_chain([float("nan")]).iteration == 2  # NaN is no agreement


@pytest.mark.slow
def test_a_miner_that_stops_chaining_is_caught_at_its_first_wrong_chunk(miner_server, bundle, tmp_path):  # noqa: F811
    """Chunks 1 and 2 right, chunk 3 the first output again (behaviour stale_chain, a real
    miner path): scored wrong_chained_output at iteration 3, not ok on chunk 1 alone."""
    miner, server, port, _ = miner_server
    svc = http_challenger(tmp_path, bundle, port, iterations=3)
    seed = confident_seed_in_worker(svc.client, MODEL)  # chunk 1 must pass for chunk 3 to matter
    miner.behaviour = "stale_chain"
    try:
        record = one_challenge(svc, seed)
    finally:
        miner.behaviour = "honest"
    assert (record.outcome, record.error_reason) == (Outcome.ERROR, "wrong_chained_output"), record
    detail = svc.outcome_details[record.challenge_id]  # _record files it with the outcome
    assert detail.startswith("iteration 3 of 3"), detail


def test_the_challenger_dials_the_endpoint_the_miners_offer_names(bundle, tmp_path):  # noqa: F811
    """No brainlock_endpoints.json: the signed ModelOffer's brainlock_port on the host the
    miner announced is where the challenge goes (the LateMiner there answers, so the
    outcome is late_stream, not a libp2p error); the operator's file still wins."""
    from protocol.challenge_messages import FHE_PROTOCOL, ModelOffer

    http = ThreadingHTTPServer(("127.0.0.1", 0), LateMiner)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        svc = http_challenger(tmp_path, bundle, http.server_address[1])
        svc.brainlock_endpoints = {}
        svc.ctx.addrs_of = lambda hotkey: ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWmine"]
        assert svc._brainlock_endpoint(MINER.ss58_address) is None  # no offer yet: libp2p
        svc.on_message(MINER.ss58_address, ModelOffer(MODEL, svc.manifest.server_sha256, "12D3KooWmine", FHE_PROTOCOL,
                                                      1, 0, brainlock_port=http.server_address[1]), 0)
        assert svc._brainlock_endpoint(MINER.ss58_address) == ("127.0.0.1", http.server_address[1])
        record = one_challenge(svc, seed=1)
        svc.brainlock_endpoints = {MINER.ss58_address: ("10.9.9.9", 1)}  # the operator's override wins
        assert svc._brainlock_endpoint(MINER.ss58_address) == ("10.9.9.9", 1)
    finally:
        http.shutdown()
    assert (record.outcome, record.error_reason) == (Outcome.ERROR, "late_stream")
