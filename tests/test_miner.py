"""The miner's request handling, in process: real circuit, real keys, signed frames.

Every bad request gets a signed Refused with its reason label and leaves the miner as it
was: the last test runs a real FHE challenge after all of them and checks the answer.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import trio

from crypto.identity import Hotkey
from node.fhe_service import FheConfig, ensure_bundle, now_ms, result_bytes_estimate
from node.metrics import NodeMetrics
from node.roles.base import RoleContext
from node.roles.miner import MinerService
from node.settings import NodeSettings
from protocol.challenge import DEFAULT_MIN_COSINE, MAX_ITERATIONS
from protocol.challenge_messages import (AddKey, ChallengeRequest, ChallengeResponse, KeyAdded, Refused, open_frame,
                                         seal_frame)
from protocol.epistula import EnvelopeVerifier
from protocol.membership import Member, Role, StaticDirectory

MINER, VALIDATOR, OTHER_VALIDATOR, TRAINER = (Hotkey.from_uri(u) for u in ("//Miner", "//Val", "//Val2", "//Tr"))
DIRECTORY = StaticDirectory((
    Member(MINER.ss58_address, frozenset({Role.MINER})),
    Member(VALIDATOR.ss58_address, frozenset({Role.VALIDATOR})),
    Member(OTHER_VALIDATOR.ss58_address, frozenset({Role.VALIDATOR})),
    Member(TRAINER.ss58_address, frozenset({Role.TRAINER})),
))
CID = "ab" * 16


def shared_digits_bundle(tmp_path_factory) -> Path:
    """One compiled digits bundle for every test session on this machine (compiling costs
    10-20 s on 2 cores); ensure_bundle checks its hashes each time."""
    root = tmp_path_factory.getbasetemp().parent / "sealmesh-fhe-cache"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_bundle("digits-cnn", root / "bundle-digits-cnn")
    return root / "bundle-digits-cnn"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return shared_digits_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def clients(bundle, tmp_path_factory):
    from fhe.bundle import ValidatorClient

    keys = tmp_path_factory.mktemp("validator-keys")
    mine = ValidatorClient(bundle, keys / "v1")
    mine.ensure_keys()
    return mine


def make_miner(bundle: Path, tmp_path: Path, behaviour: str = "honest", **config) -> MinerService:
    settings = NodeSettings(role=Role.MINER, data_dir=tmp_path, behaviour=behaviour)
    miner = MinerService(settings, FheConfig(bundle_dir=str(bundle), **config))
    miner.ctx = RoleContext(settings=settings, hotkey=MINER, genesis=None, mesh=None, store=None,
                            verifier=EnvelopeVerifier(DIRECTORY, MINER.ss58_address), metrics=NodeMetrics(),
                            data_dir=tmp_path, publish=None, peer_of=lambda hotkey: None)
    return miner


def ask(miner: MinerService, signer: Hotkey, message, payload: bytes = b""):
    """One request through the miner's handler; the verified answer (message, payload)."""
    frame = seal_frame(signer, message, payload, now_ms=now_ms(), signed_for=MINER.ss58_address)
    raw = trio.run(miner.handle_frame, frame)
    verified, out = open_frame(raw, verifier=EnvelopeVerifier(DIRECTORY, signer.ss58_address), now_ms=now_ms(),
                               expect=(KeyAdded, ChallengeResponse, Refused))
    assert verified.member.hotkey == MINER.ss58_address
    return verified.message, out


def refused(answer) -> str:
    assert isinstance(answer, Refused), answer
    return answer.reason


def request(client, key_id: str, ciphertext: bytes, *, epoch: int = 0, iterations: int = 1,
            model: str = "digits-cnn", cid: str = CID) -> ChallengeRequest:
    return ChallengeRequest.for_input(cid, epoch, model, key_id, iterations, ciphertext)


def test_refuses_before_the_circuit_is_loaded_and_unverifiable_frames(bundle, tmp_path, clients):
    miner = make_miner(bundle, tmp_path)
    keys = clients.evaluation_keys()
    answer, _ = ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)
    assert refused(answer) == "not_ready"
    # Not even a verifiable request: nobody to answer, counted as a rejection.
    assert trio.run(miner.handle_frame, b"\x00\x00\x00\x05junk!") == b""
    frame = seal_frame(VALIDATOR, request(clients, "0" * 64, b"x"), b"x", now_ms=now_ms(),
                       signed_for=OTHER_VALIDATOR.ss58_address)  # signed for someone else
    assert trio.run(miner.handle_frame, frame) == b""
    assert miner.refused["malformed_envelope"] == 1 and miner.refused["wrong_recipient"] == 1


def test_freshness_is_judged_when_the_upload_began_to_arrive(bundle, tmp_path, clients):
    # Evaluation keys are ~40 MB: on a loaded link the upload alone can outlast the 8 s
    # Epistula window. What must be fresh is the signature when the bytes started to come.
    miner = make_miner(bundle, tmp_path)
    keys = clients.evaluation_keys()
    signed = now_ms() - 11_000
    frame = seal_frame(VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys, now_ms=signed,
                       signed_for=MINER.ss58_address)
    assert trio.run(miner.handle_frame, frame) == b""  # judged now: 11 s old
    assert miner.refused["stale_timestamp"] == 1
    began = functools.partial(miner.handle_frame, frame, arrived_ms=signed + 300)
    raw = trio.run(began)  # judged from arrival: fresh, so answered (not ready yet)
    verified, _ = open_frame(raw, verifier=EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address), now_ms=now_ms(),
                             expect=(KeyAdded, Refused))
    assert refused(verified.message) == "not_ready"
    late = functools.partial(miner.handle_frame, frame, arrived_ms=signed + 9_000)
    assert trio.run(late) == b""  # began to arrive after the window: still stale
    assert miner.refused["stale_timestamp"] == 2


def test_bad_requests_are_refused_and_disturb_nothing(bundle, tmp_path, clients):
    miner = make_miner(bundle, tmp_path, max_challenges_per_epoch=2)
    trio.run(miner._load)
    keys = clients.evaluation_keys()
    key_id = hashlib.sha256(keys).hexdigest()
    x = np.random.default_rng(0).uniform(0, 1, clients.input_shape).astype(np.float32)
    ciphertext = clients.encrypt(x)

    # A challenge before any key: unknown key, the validator must upload.
    assert refused(ask(miner, VALIDATOR, request(clients, key_id, ciphertext), ciphertext)[0]) == "unknown_key"
    # Keys for another model, and keys of the wrong size for this circuit.
    assert refused(ask(miner, VALIDATOR, AddKey.for_keys("cnv-cifar10", keys), keys)[0]) == "unknown_model"
    assert refused(ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", b"k" * 1000), b"k" * 1000)[0]) == "malformed_key"
    answer, _ = ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)
    assert isinstance(answer, KeyAdded) and answer.key_id == key_id
    assert miner.keyring.bindings[key_id].owner == VALIDATOR.ss58_address
    # The same bytes uploaded by another validator: the key id stays bound to its owner.
    assert refused(ask(miner, OTHER_VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)[0]) == "key_id_taken"
    # Another validator naming our key id: foreign key.
    assert refused(ask(miner, OTHER_VALIDATOR, request(clients, key_id, ciphertext), ciphertext)[0]) == "foreign_key"
    # Malformed ciphertexts (a segment table that does not frame the bytes; oversized for the circuit).
    assert refused(ask(miner, VALIDATOR, request(clients, key_id, b"\x01" * 64), b"\x01" * 64)[0]) \
        == "capnp_segment_count"
    big = os.urandom(miner.engine.max_ciphertext_bytes + 1)
    assert refused(ask(miner, VALIDATOR, request(clients, key_id, big), big)[0]) == "oversized_input"
    # The quota of 2 is spent (both malformed ones counted): the next is refused.
    assert refused(ask(miner, VALIDATOR, request(clients, key_id, ciphertext), ciphertext)[0]) == "too_many_challenges"
    # A quota window later (the miner's clock; the request's epoch no longer resets it).
    stamps = miner.keyring.evaluations[VALIDATOR.ss58_address]
    stamps.extend([t - miner.keyring.window_s for t in [stamps.popleft() for _ in range(len(stamps))]])
    # Too many iterations for this miner's bound (a stricter miner than the protocol's).
    miner.keyring.max_iterations = 1
    assert refused(ask(miner, VALIDATOR, request(clients, key_id, ciphertext, epoch=1, iterations=2),
                       ciphertext)[0]) == "too_many_iterations"
    miner.keyring.max_iterations = MAX_ITERATIONS
    # A payload that does not match what the signed message says: refused before anything.
    frame = seal_frame(VALIDATOR, request(clients, key_id, ciphertext, epoch=1), ciphertext, now_ms=now_ms(),
                       signed_for=MINER.ss58_address)
    assert trio.run(miner.handle_frame, frame[:-1] + bytes([frame[-1] ^ 1])) == b""
    assert miner.refused["payload_mismatch"] == 1
    # A trainer cannot challenge (the message's sender policy).
    frame = seal_frame(TRAINER, request(clients, key_id, ciphertext, epoch=1), ciphertext, now_ms=now_ms(),
                       signed_for=MINER.ss58_address)
    assert trio.run(miner.handle_frame, frame) == b""

    # Nothing was disturbed: the key is still there and a real FHE challenge is answered right.
    answer, result = ask(miner, VALIDATOR, request(clients, key_id, ciphertext, epoch=1), ciphertext)
    assert isinstance(answer, ChallengeResponse) and answer.challenge_id == CID
    comparison = clients.compare(result, x)
    assert comparison.argmax_match and comparison.cosine >= DEFAULT_MIN_COSINE
    assert miner.served == {"fhe_add_key": 1, "fhe_challenge": 1}


def test_garbage_miner_answers_noise_of_a_results_size(bundle, tmp_path, clients):
    from fhe.bundle import SERVER_ZIP, MalformedResult

    miner = make_miner(bundle, tmp_path, behaviour="garbage")
    trio.run(miner._load)
    keys = clients.evaluation_keys()
    assert isinstance(ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)[0], KeyAdded)
    x = np.full(clients.input_shape, 0.5, dtype=np.float32)
    ciphertext = clients.encrypt(x)
    answer, result = ask(miner, VALIDATOR, request(clients, hashlib.sha256(keys).hexdigest(), ciphertext), ciphertext)
    assert isinstance(answer, ChallengeResponse)
    assert len(result) == result_bytes_estimate(bundle / SERVER_ZIP) > 10_000
    with pytest.raises(MalformedResult):
        clients.decrypt(result)


def test_unknown_behaviour_and_bad_settings_are_refused(tmp_path):
    from node.fhe_service import FheSettingsError, load_fhe_config

    with pytest.raises(FheSettingsError, match="behaviour"):
        MinerService(NodeSettings(role=Role.MINER, data_dir=tmp_path, behaviour="cheat"), FheConfig(serve=False))
    with pytest.raises(FheSettingsError, match="response_timeout_s"):
        FheConfig(response_timeout_s=0)
    (tmp_path / "fhe.json").write_text('{"modle": "digits-cnn"}')
    with pytest.raises(FheSettingsError, match="modle"):
        load_fhe_config(tmp_path)


def test_http_endpoints_answer_signed_frames(bundle, tmp_path, clients):
    import urllib.error
    import urllib.request

    from node.roles.miner import MinerHttp

    miner = make_miner(bundle, tmp_path)  # not loaded: every verified request is refused "not_ready"
    x = np.full(clients.input_shape, 0.5, dtype=np.float32)
    ciphertext = clients.encrypt(x)
    frame = seal_frame(VALIDATOR, request(clients, "0" * 64, ciphertext), ciphertext, now_ms=now_ms(),
                       signed_for=MINER.ss58_address)

    def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                                               method="POST"), timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(MinerHttp(miner, "127.0.0.1", 0).serve)
            computed = await trio.to_thread.run_sync(post, port, "/compute", frame)
            junk = await trio.to_thread.run_sync(post, port, "/add_key", b"junk")
            nursery.cancel_scope.cancel()
        return computed, junk

    (status, body), (junk_status, _) = trio.run(main)
    assert status == 200 and junk_status == 401
    length = int.from_bytes(body[:4], "little")  # Brainlock's framing
    assert length == len(body) - 4
    verified, _ = open_frame(body[4:], verifier=EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address),
                             now_ms=now_ms(), expect=(Refused,))
    assert verified.message.reason == "not_ready" and verified.message.ref == CID


STRANGER = Hotkey.from_uri("//Stranger")


@pytest.mark.parametrize("signer, reason", [(STRANGER, "unknown_signer"), (TRAINER, "signer_not_allowed")],
                         ids=["stranger", "trainer"])
def test_finding9_miner_http_refuses_a_strangers_large_body(bundle, tmp_path, signer, reason):
    """Issue 11 finding 9 on the HTTP endpoints: a stranger (or a member that may not
    challenge) announces a 40 MB AddKey and sends its envelope only. Before the fix the
    miner read the whole body first (request.read(), up to the request cap) and only then
    looked at the signer; now the answer is 401 after the envelope, with the body unsent."""
    import socket

    from node.roles.miner import MinerHttp

    miner = make_miner(bundle, tmp_path)
    declared = 40 << 20
    from protocol.challenge_messages import pack_frame
    from protocol.inbound import seal_message

    envelope = seal_message(signer, AddKey("digits", "cd" * 32, declared), now_ms=now_ms(),
                            signed_for=MINER.ss58_address).to_gossip_bytes()
    head = pack_frame(envelope)  # prefix + envelope: the 40 MB never follow

    def send_envelope_only(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST /add_key HTTP/1.1\r\nHost: miner\r\nContent-Length: {len(head) + declared}\r\n"
                      "\r\n".encode() + head)
            return s.recv(65536)  # the answer, while 40 MB are still "to come"

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(MinerHttp(miner, "127.0.0.1", 0).serve)
            answer = await trio.to_thread.run_sync(send_envelope_only, port)
            nursery.cancel_scope.cancel()
        return answer

    answer = trio.run(main)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert miner.refused[reason] == 1


def test_issue13_out_of_range_fields_get_a_signed_reasoned_refusal(bundle, tmp_path, clients):
    """Issue 13: a validly signed request with iterations=5 (over the miner's bound) or 0
    was refused while decoding, before its signature was looked at, so the miner answered
    nothing (HTTP 401) and the keyring's too_many_iterations could never be sent. Now the
    wire bound is wide and the miner's bound is judged after the signature: signed Refused."""
    miner = make_miner(bundle, tmp_path)
    trio.run(miner._load)
    keys = clients.evaluation_keys()
    assert isinstance(ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)[0], KeyAdded)
    key_id = hashlib.sha256(keys).hexdigest()
    for iterations, reason in ((MAX_ITERATIONS + 1, "too_many_iterations"), (0, "bad_iterations"),
                               (1000, "too_many_iterations")):
        answer, _ = ask(miner, VALIDATOR, request(clients, key_id, b"x", iterations=iterations), b"x")
        assert refused(answer) == reason and answer.ref == CID
    assert miner.served == {"fhe_add_key": 1}


def test_issue13_a_rising_epoch_field_does_not_reset_the_quota(bundle, tmp_path, clients):
    """Issue 13: 2 challenges, refused, then epoch+1 accepted and epoch 2**62 accepted (the
    count reset whenever the requester's epoch rose). The miner counts on its own clock."""
    miner = make_miner(bundle, tmp_path, max_challenges_per_epoch=2)
    trio.run(miner._load)
    keys = clients.evaluation_keys()
    assert isinstance(ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)[0], KeyAdded)
    key_id = hashlib.sha256(keys).hexdigest()
    junk = b"\x01" * 64  # refused by the engine after the quota counted it: no circuit run
    for epoch in (0, 1):
        assert refused(ask(miner, VALIDATOR, request(clients, key_id, junk, epoch=epoch), junk)[0]) \
            == "capnp_segment_count"
    for epoch in (2, 2**62):
        assert refused(ask(miner, VALIDATOR, request(clients, key_id, junk, epoch=epoch), junk)[0]) \
            == "too_many_challenges"
    # Another validator's quota is its own (it owns no key here: refused further on).
    assert refused(ask(miner, OTHER_VALIDATOR, request(clients, key_id, junk, epoch=0), junk)[0]) == "foreign_key"


def test_issue13_miner_http_refuses_junk_unread_and_one_upload_per_signer(bundle, tmp_path):
    """Issue 13: a 256 MiB junk POST to /add_key (first 4 bytes ffffffff) was read before
    any check. It is refused on its first 4 bytes, and the connection is closed instead of
    the rest being read and discarded. A validator's second upload while its first is in
    flight is refused too (busy_signer), another validator's is not."""
    import socket
    import time

    from node.roles.miner import MinerHttp
    from protocol.challenge_messages import pack_frame
    from protocol.inbound import seal_message

    miner = make_miner(bundle, tmp_path)
    http = MinerHttp(miner, "127.0.0.1", 0)

    def upload_head(port: int, signer: Hotkey, declared: int, keys: bytes | None = None) -> socket.socket:
        message = AddKey("digits-cnn", "cd" * 32, declared) if keys is None else AddKey.for_keys("digits-cnn", keys)
        envelope = seal_message(signer, message, now_ms=now_ms(), signed_for=MINER.ss58_address).to_gossip_bytes()
        head = pack_frame(envelope)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"POST /add_key HTTP/1.1\r\nHost: miner\r\nContent-Length: {len(head) + declared}\r\n"
                  "\r\n".encode() + head)
        return s

    def scenario(port: int):
        # 5 s: before the fix aiohttp read on and discarded the junk for 10 s before closing.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"POST /add_key HTTP/1.1\r\nHost: miner\r\nContent-Length: {256 << 20}\r\n\r\n".encode()
                      + b"\xff\xff\xff\xff")
            junk_answer, rest = s.recv(65536), b""
            while chunk := s.recv(65536):  # closed by the miner, with 256 MiB still unsent
                rest += chunk
        held = upload_head(port, VALIDATOR, 40 << 20)
        deadline = time.monotonic() + 10
        while VALIDATOR.ss58_address not in http.uploading and time.monotonic() < deadline:
            time.sleep(0.05)
        second = upload_head(port, VALIDATOR, 40 << 20)
        busy_answer = second.recv(65536)
        second.close()
        other = upload_head(port, OTHER_VALIDATOR, 1000, b"k" * 1000)
        other.sendall(b"k" * 1000)
        other_answer = other.recv(65536)
        other.close()
        held.close()
        return junk_answer, rest, busy_answer, other_answer

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(http.serve)
            answers = await trio.to_thread.run_sync(scenario, port)
            nursery.cancel_scope.cancel()
        return answers

    junk_answer, rest, busy_answer, other_answer = trio.run(main)
    assert junk_answer.startswith(b"HTTP/1.1 401") and rest == b"", junk_answer[:200]
    assert miner.refused["bad_frame"] >= 1  # the junk, and the held upload once it hung up
    assert busy_answer.startswith(b"HTTP/1.1 401") and miner.refused["busy_signer"] == 1
    # Another validator is not held back by it: its upload is read and answered (signed, not ready).
    assert other_answer.startswith(b"HTTP/1.1 200"), other_answer[:200]
