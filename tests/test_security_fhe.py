"""Issue 11, findings 3 (peer bytes Concrete reads) and 9 (the miner's key cache): the
attacks run against the real digits-cnn circuit, real keys, a real FHE result and the
miner's own request handler.

Before the fix (measured on 2 shared cores, Concrete 2.10): a genuine result whose segment
1 declares 8 MiB held the validator's GIL 2.6 s idle, 3.9 s under load, in Concrete's
"Premature EOF" loop (0.9 MB of stack traces on stderr), and the trio loop, although the
decrypt ran on a worker thread, stalled exactly as long (3.92 s); a 1.8 KB ciphertext
declaring 16 MiB kept the miner's handler 5.3 s idle, 8.7 s under load; a 164 KB result whose
4000 payload pointers share one 128 KB blob made Concrete build a 512 MB copy (peak RSS
538 -> 1514 MiB in 0.7 s). After: each is refused in milliseconds, Concrete never called.
"""

from __future__ import annotations

import struct
import time

import pytest
import trio

from fhe.bundle import MalformedResult, ValidatorClient, load_manifest
from fhe.capnp_guard import CapnpFramingError, check_capnp_message
from fhe.engine import FheEngine, MalformedCiphertext, MalformedKey
from fhe.inputs import draw_challenge_input
from protocol.challenge_messages import AddKey, KeyAdded
from tests.test_miner import VALIDATOR, ask, make_miner, refused, request, shared_digits_bundle

EIGHT_MIB = 8 << 20


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_digits_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory) -> ValidatorClient:
    validator = ValidatorClient(bundle, tmp_path_factory.mktemp("security-fhe-keys"))
    validator.ensure_keys()
    return validator


@pytest.fixture(scope="module")
def genuine(bundle, client):
    """(input image, ciphertext, the miner's genuine encrypted result): one real FHE run."""
    engine = FheEngine(bundle, load_manifest(bundle).server_sha256)
    key_id = engine.add_key("5Validator", client.evaluation_keys())
    image = draw_challenge_input("digits-cnn", 1).image
    ciphertext = client.encrypt(image)
    return image, ciphertext, engine.run("5Validator", key_id, ciphertext)


class ConcreteSpy:
    """Counts the times Concrete is asked to read bytes (the real readers still run)."""

    def __init__(self, monkeypatch) -> None:
        from concrete import fhe

        self.calls = 0
        for cls in (fhe.Value, fhe.EvaluationKeys):
            real = cls.deserialize

            def spy(buffer, _real=real):
                self.calls += 1
                return _real(buffer)

            monkeypatch.setattr(cls, "deserialize", staticmethod(spy))


def declare_total(message: bytes, total_bytes: int) -> bytes:
    """Overwrite bytes 8-11 (segment 1's declared size, in words) so the table declares
    `total_bytes` in all: the attack of finding 3."""
    count = struct.unpack_from("<I", message, 0)[0] + 1
    sizes = struct.unpack_from(f"<{count}I", message, 4)
    header = 8 * ((4 + 4 * count + 7) // 8)
    segment1 = (total_bytes - header) // 8 - (sum(sizes) - sizes[1])
    return message[:8] + struct.pack("<I", segment1) + message[12:]


def shared_blob(result: bytes, pointers: int, blob_words: int) -> bytes:
    """The result's payload, a List(Data) (pointer at word 4 of segment 0 in Concrete's
    layout, one element), rewritten as `pointers` Data pointers that all name one blob of
    `blob_words` words, in the same bytes."""
    out = bytearray(result)
    header = 16  # a 2-segment table: 4 + 2 x 4 bytes, padded to a word

    def put(index: int, target: int, size_code: int, count: int) -> None:
        offset = (target - index - 1) & ((1 << 30) - 1)
        struct.pack_into("<Q", out, header + 8 * index, 1 | offset << 2 | size_code << 32 | count << 35)

    assert 5 + pointers + blob_words < struct.unpack_from("<I", result, 4)[0] - 32
    put(4, 5, 6, pointers)
    for i in range(pointers):
        put(5 + i, 5 + pointers, 2, blob_words * 8)
    return bytes(out)


def stalls_of(work) -> tuple[object, float, float]:
    """Run `work` on a worker thread as the challenger does; (outcome, seconds, the event
    loop's longest gap between 10 ms ticks)."""
    longest = 0.0

    async def main():
        nonlocal longest
        done = trio.Event()

        async def ticker():
            nonlocal longest
            last = time.perf_counter()
            while not done.is_set():
                await trio.sleep(0.01)
                now = time.perf_counter()
                longest, last = max(longest, now - last), now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            started = time.perf_counter()
            try:
                outcome = await trio.to_thread.run_sync(work)
            except Exception as exc:  # noqa: BLE001 - the outcome under test
                outcome = exc
            elapsed = time.perf_counter() - started
            done.set()
        return outcome, elapsed

    outcome, elapsed = trio.run(main)
    return outcome, elapsed, longest


# -- finding 3 -----------------------------------------------------------------------------


def test_finding3_capnp_layout_of_concretes_own_bytes(client, genuine):
    """What the guard assumes, checked on this circuit's real bytes: each is one unpacked
    message, exactly framed, no pointer reached twice."""
    _, ciphertext, result = genuine
    keys = client.evaluation_keys()
    for name, data in (("ciphertext", ciphertext), ("result", result), ("keys", keys)):
        shape = check_capnp_message(data, max_bytes=len(data))
        assert shape.total_bytes == len(data), name
        assert shape.words_reached <= sum(shape.segment_words), name
    assert len(check_capnp_message(result, max_bytes=len(result)).segment_words) == 2
    assert len(check_capnp_message(keys, max_bytes=len(keys)).segment_words) == 3


def test_finding3_forged_segment_size_in_a_result_is_refused_before_concrete(client, genuine, monkeypatch):
    image, _, result = genuine
    spy = ConcreteSpy(monkeypatch)
    for declared in (EIGHT_MIB, 16 << 20, 32 << 30):
        forged = declare_total(result, declared)
        assert forged[8:12] != result[8:12] and len(forged) == len(result)
        outcome, elapsed, stall = stalls_of(lambda: client.compare(forged, image))
        assert isinstance(outcome, MalformedResult), outcome
        assert outcome.reason in ("capnp_oversized", "capnp_size_mismatch")
        assert elapsed < 0.5 and stall < 0.5, (declared, elapsed, stall)  # before: 2.6 s at 8 MiB
    assert spy.calls == 0  # Concrete never saw the forged bytes
    # Trailing bytes after an exact message are refused too.
    with pytest.raises(MalformedResult) as info:
        client.decrypt(result + bytes(8))
    assert info.value.reason == "capnp_size_mismatch"
    assert spy.calls == 0
    # The genuine result still decrypts and agrees with the clear reference.
    assert client.compare(result, image).argmax_match
    assert spy.calls == 1


def test_finding3_result_whose_pointers_share_one_blob_is_refused(client, genuine, monkeypatch):
    _, _, result = genuine
    spy = ConcreteSpy(monkeypatch)
    forged = shared_blob(result, 4000, 16000)  # before: a 512 MB copy of a 164 KB message
    started = time.perf_counter()
    with pytest.raises(MalformedResult) as info:
        client.decrypt(forged)
    assert info.value.reason == "capnp_amplified"
    assert time.perf_counter() - started < 0.5 and spy.calls == 0


def test_finding3_miner_refuses_a_small_ciphertext_declaring_16_mib_and_forged_keys(
        bundle, tmp_path, client, genuine, monkeypatch):
    miner = make_miner(bundle, tmp_path)
    trio.run(miner._load)
    keys = client.evaluation_keys()
    spy = ConcreteSpy(monkeypatch)
    forged_keys = declare_total(keys, len(keys) + EIGHT_MIB)
    assert len(forged_keys) == len(keys)  # passes the size check: only the table lies
    started = time.perf_counter()
    assert refused(ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", forged_keys), forged_keys)[0]) \
        == "capnp_oversized"  # declares more than keys for this circuit can be
    assert spy.calls == 0 and time.perf_counter() - started < 1.0
    answer, _ = ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)
    assert isinstance(answer, KeyAdded) and spy.calls == 1

    _, ciphertext, _ = genuine
    assert len(ciphertext) < 2000
    forged = declare_total(ciphertext, 16 << 20)  # before: 5.3 s with the miner's loop frozen
    started = time.perf_counter()
    answer, _ = ask(miner, VALIDATOR, request(client, answer.key_id, forged), forged)
    assert refused(answer) == "capnp_oversized"
    assert spy.calls == 1 and time.perf_counter() - started < 0.5
    assert miner.refused["capnp_oversized"] == 2


def test_finding3_the_engine_names_each_framing_fault(bundle, client, genuine):
    _, ciphertext, _ = genuine
    engine = FheEngine(bundle, load_manifest(bundle).server_sha256)
    key_id = engine.add_key("5Validator", client.evaluation_keys())
    faults = {
        "capnp_truncated": ciphertext[:6],
        "capnp_segment_count": struct.pack("<I", 999) + ciphertext[4:],
        "capnp_size_mismatch": ciphertext[:-8],
        # the root pointer (segment 0, word 0: byte 16) aimed past the segment, or a capability
        "capnp_pointer_out_of_bounds": ciphertext[:16] + struct.pack("<Q", 0x7FFF << 2 | 1 << 48) + ciphertext[24:],
        "capnp_capability": ciphertext[:16] + struct.pack("<Q", 3) + ciphertext[24:],
    }
    for reason, bad in faults.items():
        with pytest.raises(MalformedCiphertext) as info:
            engine.run("5Validator", key_id, bad)
        assert info.value.reason == reason, (reason, info.value)
    with pytest.raises(MalformedKey) as info:
        engine.add_key("5Validator", bytes(len(client.evaluation_keys())))
    assert info.value.reason == "capnp_truncated"
    with pytest.raises(CapnpFramingError) as info:
        check_capnp_message(ciphertext, max_bytes=len(ciphertext) - 1)
    assert info.value.reason == "capnp_oversized"


def test_finding3_keys_framed_right_but_laid_out_otherwise_are_refused(bundle, client, monkeypatch):
    """39 MB with the genuine segment table and every other byte zero: before the fix the
    engine stored it (Concrete read it as an empty keyset) and the first challenge under it
    killed the miner process (SIGSEGV after a failed vector bounds assertion, exit 139).
    Keys must now match the layout of keys this circuit makes, outside the key material."""
    keys = client.evaluation_keys()
    engine = FheEngine(bundle, load_manifest(bundle).server_sha256)
    spy = ConcreteSpy(monkeypatch)
    hollow = keys[:16] + bytes(len(keys) - 16)
    other_ids = bytearray(keys)
    other_ids[16 + 8 * 7] ^= 1  # the bootstrap key's info: its id (word 7 of segment 0)
    for forged in (hollow, bytes(other_ids)):
        with pytest.raises(MalformedKey) as info:
            engine.add_key("5Validator", forged)
        assert info.value.reason == "key_layout_mismatch"
    assert spy.calls == 0 and engine.key_ids() == []
    engine.add_key("5Validator", keys)  # honest keys, made through Concrete-ML, pass
    assert spy.calls == 1


# -- finding 9 (the key cache) -------------------------------------------------------------


def test_finding9_one_validator_cannot_evict_anothers_keys(bundle, tmp_path, client, genuine):
    """The victim uploads its keys; another validator then uploads five different key
    sets (one flipped byte each: Concrete does not check contents). Before the fix the one
    LRU (3.5 keys here) dropped the victim's keys at the attacker's third upload and the
    victim's challenge was refused unknown_key (measured on the tree before the fix). Now the attacker's uploads evict only its
    own keys (2 per validator by default), and the victim's challenge is served."""
    from node.roles.miner import MinerService
    from protocol.challenge_messages import ChallengeResponse
    from tests.test_fhe_engine import key_variant
    from tests.test_miner import OTHER_VALIDATOR

    keys = client.evaluation_keys()
    miner: MinerService = make_miner(bundle, tmp_path, key_cache_bytes=3 * len(keys) + len(keys) // 2)
    trio.run(miner._load)
    victim_key = ask(miner, VALIDATOR, AddKey.for_keys("digits-cnn", keys), keys)[0].key_id
    attacker_keys = []
    for n in range(5):
        variant = key_variant(keys, n)
        answer, _ = ask(miner, OTHER_VALIDATOR, AddKey.for_keys("digits-cnn", variant), variant)
        assert isinstance(answer, KeyAdded), answer
        attacker_keys.append(answer.key_id)
    attacker = OTHER_VALIDATOR.ss58_address
    assert miner.engine.owner_key_ids(attacker) == attacker_keys[-2:]  # its own oldest went
    assert miner.engine.owner_key_ids(VALIDATOR.ss58_address) == [victim_key]
    assert set(miner.keyring.bindings) == {victim_key, *attacker_keys[-2:]}
    image, ciphertext, _ = genuine
    answer, result = ask(miner, VALIDATOR, request(client, victim_key, ciphertext), ciphertext)
    assert isinstance(answer, ChallengeResponse), answer  # before the fix: Refused unknown_key
    assert client.compare(result, image).argmax_match
