"""Sealed contributions: DJN encryption, the subset-sum range proof, aggregation, wire form."""

import functools
import warnings

import gmpy2
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import contribution as C
from crypto import djn, paillier, subset_range

BITS, T, N_PARTIES = 1024, 2, 3
MESH, ROUND = "test-mesh", 7


@functools.cache
def key():
    return paillier.deal(BITS, T, N_PARTIES, allow_weak=True)


@functools.cache
def layout():
    return C.derive_layout(1.0, 8, 4, BITS)


def ctx(sender="trainer-a", round_id=ROUND):
    return C.context_for(key()[0], MESH, round_id, sender)


def sealed(values, sender="trainer-a"):
    return C.seal(key()[0], layout(), values, ctx(sender))


def threshold_decrypt(cs, shares=None):
    public, all_shares, vks = key()
    shares = shares or all_shares[:T]
    batches = [paillier.partial_decrypt_many(s, cs, b"agg", workers=1) for s in shares]
    return paillier.combine_many(public, vks, T, cs, batches, b"agg", workers=1)


def test_djn_ciphertexts_are_ordinary_paillier_ciphertexts():
    public, p, q = paillier.keypair_for_interop(512)
    for m in (0, 1, 12345, public.n - 1):
        rho, h = djn.randomizer(public.n)
        c = djn.encrypt(public.n, m, h)
        assert public.is_valid_ciphertext(int(c))
        assert paillier.decrypt(p, q, int(c)) == m
    assert djn.randomizer(public.n)[1] != djn.randomizer(public.n)[1]  # randomized


def test_djn_ciphertext_decrypts_with_tno():
    from tno.mpc.encryption_schemes.paillier import (
        Paillier, PaillierCiphertext, PaillierPublicKey, PaillierSecretKey)

    public, p, q = paillier.keypair_for_interop(512)
    n, lam = public.n, (p - 1) * (q - 1)
    scheme = Paillier(PaillierPublicKey(n, n + 1), PaillierSecretKey(lam, int(gmpy2.invert(lam, n)), n),
                      precision=0)
    try:
        c = djn.encrypt(n, 987654321, djn.randomizer(n)[1])
        assert int(scheme.decrypt(PaillierCiphertext(int(c), scheme))) == 987654321
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheme.shut_down()


@given(st.lists(st.lists(st.floats(-2.0, 2.0, width=32), min_size=70, max_size=70), min_size=1, max_size=4))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sealed_updates_verify_aggregate_and_decode_to_the_mean(updates):
    public = key()[0]
    arrays = [np.array(u, dtype=np.float32) for u in updates]
    items = [sealed(a, sender=f"trainer-{i}") for i, a in enumerate(arrays)]
    for i, item in enumerate(items):
        C.verify(public, layout(), item, ctx(f"trainer-{i}"), value_count=70)
    mean = C.decode_sum(threshold_decrypt(C.aggregate(public, items)), 70, len(items), layout())
    expected = np.mean([np.clip(a, -1.0, 1.0) for a in arrays], axis=0)
    assert np.max(np.abs(mean - expected)) <= layout().step / 2 + 1e-6


@pytest.fixture(scope="module")
def honest():
    values = np.linspace(-1, 1, 150, dtype=np.float32)
    return values, sealed(values)


def test_wrong_context_is_rejected(honest):
    _, item = honest
    public = key()[0]
    for other in (ctx("trainer-b"), ctx(round_id=ROUND + 1), C.context_for(public, "other-mesh", ROUND, "trainer-a")):
        with pytest.raises(C.InvalidContribution) as err:
            C.verify(public, layout(), item, other, value_count=150)
        assert err.value.reason == "bad_proof"


def test_tampered_ciphertext_is_rejected(honest):
    _, item = honest
    public = key()[0]
    cs = list(item.ciphertexts)
    cs[1] = cs[1] * (1 + public.n) % public.n_squared  # adds 1 to that plaintext
    with pytest.raises(C.InvalidContribution, match="bad_proof"):
        C.verify(public, layout(), C.Contribution(150, tuple(cs), item.proof), ctx(), value_count=150)


def test_proof_from_another_contribution_is_rejected(honest):
    _, item = honest
    other = sealed(np.zeros(150, dtype=np.float32))
    with pytest.raises(C.InvalidContribution, match="bad_proof"):
        C.verify(key()[0], layout(), C.Contribution(150, item.ciphertexts, other.proof), ctx(), value_count=150)


def test_wrong_size_is_rejected(honest):
    _, item = honest
    with pytest.raises(C.InvalidContribution) as err:
        C.verify(key()[0], layout(), item, ctx(), value_count=149 + layout().slots_per_plaintext * 3)
    assert err.value.reason == "wrong_size"


def test_out_of_range_plaintext_cannot_be_proven(monkeypatch):
    """A cheater who runs the prover on a huge plaintext (n/2: no small representative)."""
    public = key()[0]
    n = public.n
    count = 4
    bound = layout().plaintext_bits
    ms = [5, (n - 1) // 2, 7, 9]
    rs = [djn.randomizer(n) for _ in ms]
    cs = [int(djn.encrypt(n, m, h)) for m, (_, h) in zip(ms, rs)]
    with pytest.raises(subset_range.SubsetRangeError):
        subset_range.prove(n, cs, ms, [r for r, _ in rs], bound, ctx())
    monkeypatch.setattr(subset_range, "_check_plaintexts", lambda ms, bound_bits: None)
    with pytest.raises(subset_range.SubsetRangeError, match="not in range"):
        subset_range.prove(n, cs, ms, [r for r, _ in rs], bound, ctx())  # responses overflow
    # Publish the oversized responses anyway: the verifier's bound check stops them ...
    monkeypatch.setattr(subset_range, "_responses_in_bound", lambda z1, b, c: True)
    forged = subset_range.prove(n, cs, ms, [r for r, _ in rs], bound, ctx())
    monkeypatch.undo()
    assert not subset_range.verify(n, cs, forged, bound, ctx())
    # ... and with the bound check switched off the equations still hold, which is why it exists.
    monkeypatch.setattr(subset_range, "_responses_in_bound", lambda z1, b, c: True)
    assert subset_range.verify(n, cs, forged, bound, ctx())
    monkeypatch.undo()
    honest_ms = [5, 6, 7, 9]
    honest_cs = [int(djn.encrypt(n, m, h)) for m, (_, h) in zip(honest_ms, rs)]
    proof = subset_range.prove(n, honest_cs, honest_ms, [r for r, _ in rs], bound, ctx())
    assert subset_range.verify(n, honest_cs, proof, bound, ctx())
    assert count == len(subset_range.subset_masks(b"x" * 32, count)[0])


def test_every_subset_row_is_a_fair_coin():
    masks = subset_range.subset_masks(b"d" * 32, 4000)
    assert masks.shape == (subset_range.SUBSETS, 4000)
    assert 0.45 < masks.mean() < 0.55
    assert not np.array_equal(masks, subset_range.subset_masks(b"e" * 32, 4000))


def test_wire_round_trip_and_rejections(honest):
    _, item = honest
    public = key()[0]
    data = C.encode(public, item)
    assert C.decode(public, data) == item
    obj = msgpack.unpackb(data, raw=False)

    def broken(**changes):
        return msgpack.packb({**obj, **changes}, use_bin_type=True)

    width = public.ciphertext_bytes
    zero_first = b"\x00" * width + obj["ciphertexts"][width:]
    too_big = public.n_squared.to_bytes(width, "big") + obj["ciphertexts"][width:]
    short_proof = {**obj["proof"], "z1": obj["proof"]["z1"][:-1]}
    for bad in (data[:-5], b"\x01\x02", broken(v=2), broken(kind="other"), broken(values=-1),
                broken(ciphertexts=obj["ciphertexts"][:-1]), broken(ciphertexts=zero_first),
                broken(ciphertexts=too_big), broken(proof=short_proof), broken(extra=1)):
        with pytest.raises(C.InvalidContribution) as err:
            C.decode(public, bad)
        assert err.value.reason == "malformed_contribution"
    with pytest.raises(C.InvalidContribution):
        C.decode(public, data, max_ciphertexts=len(item.ciphertexts) - 1)


@pytest.mark.parametrize("count,members,t", [(11765, [1, 2, 3, 4, 5], 3), (10, [2, 5, 7], 2), (2, [1, 2, 3], 3)])
def test_decryption_blocks_cover_every_position_t_times(count, members, t):
    blocks = C.decryption_blocks(count, members, t)
    covered = [0] * count
    load = {m: 0 for m in members}
    for block in blocks:
        assert len(set(block.members)) == t and set(block.members) <= set(members)
        for j in range(block.start, block.stop):
            covered[j] += 1
        for m in block.members:
            load[m] += block.stop - block.start
    assert covered == [1] * count
    assert max(load.values()) <= -(-count * t // len(members)) + t
    with pytest.raises(ValueError):
        C.decryption_blocks(count, members, len(members) + 1)


def test_any_t_members_decrypt_each_block(honest):
    values, item = honest
    public, shares, vks = key()
    cs = C.aggregate(public, [item])
    plain = []
    for b, block in enumerate(C.decryption_blocks(len(cs), [s.index for s in shares], T)):
        part = cs[block.start:block.stop]
        batches = [paillier.partial_decrypt_many(shares[i - 1], part, b"blk%d" % b, workers=1)
                   for i in block.members]
        plain.extend(paillier.combine_many(public, vks, T, part, batches, b"blk%d" % b, workers=1))
    mean = C.decode_sum(plain, 150, 1, layout())
    assert np.max(np.abs(mean - values)) <= layout().step / 2 + 1e-6
