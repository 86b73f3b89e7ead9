"""Threshold Paillier (crypto/paillier.py).

Keys are 512-bit and made once per module: the math is the same at 2048 bits, only slower.
Tests that need crypto/proofs.py (another module) skip with a reason when it is absent;
the combine logic is also checked without it through a stand-in verifier.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import warnings

import gmpy2
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import paillier as P

BITS = 512
T, N_PARTIES = 3, 5
CTX = b"round-1"

fast = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def threshold_key():
    return P.deal(BITS, T, N_PARTIES, allow_weak=True)


@functools.cache
def plain_key():
    return P.keypair_for_interop(BITS)


def proofs_or_skip():
    return pytest.importorskip(
        "crypto.proofs", reason="crypto/proofs.py (decryption-share proofs) not written yet"
    )


def raw_partials(c):
    """Partial decryptions without proofs, for the combining math alone."""
    _, shares, _ = threshold_key()
    return [P.PartialDecryption(s.index, P._partial_value(s, c), None) for s in shares]


def threshold_decrypt(c):
    return P._combine_verified(threshold_key()[0], N_PARTIES, raw_partials(c)[:T])


plaintexts = st.integers(min_value=0, max_value=(1 << (BITS - 1)))


# --- dealing -----------------------------------------------------------------------------


def test_deal_shapes_and_verification_keys():
    public, shares, vks = threshold_key()
    assert public.bits == BITS and public.g == public.n + 1
    assert [s.index for s in shares] == list(range(1, N_PARTIES + 1))
    assert all(s.threshold == T and s.n_parties == N_PARTIES for s in shares)
    assert vks.n_parties == N_PARTIES
    for s in shares:
        assert s.public == public and s.v == vks.v and s.v_i == vks.key_of(s.index)
        assert s.v_i == gmpy2.powmod(vks.v, math.factorial(N_PARTIES) * s.secret, public.n_squared)
    assert "secret=" not in repr(shares[0])  # shares end up in logs otherwise


@pytest.mark.parametrize(
    "bits, t, n, weak",
    [(1024, 2, 3, False), (513, 2, 3, True), (256, 2, 3, True), (BITS, 0, 3, True),
     (BITS, 4, 3, True), (BITS, 1, 0, True)],
)
def test_deal_rejects_bad_parameters(bits, t, n, weak):
    with pytest.raises(P.InvalidParameters):
        P.deal(bits, t, n, allow_weak=weak)


@pytest.mark.parametrize("bits", [64, 256, 512])
def test_safe_prime(bits):
    p = P.safe_prime(bits)
    assert p.bit_length() == bits and p >> (bits - 2) == 0b11
    assert gmpy2.is_prime(p, 50) and gmpy2.is_prime((p - 1) // 2, 50)


def test_safe_prime_refuses_sizes_the_sieve_cannot_handle():
    with pytest.raises(P.InvalidParameters):
        P.safe_prime(16)


@given(st.lists(st.integers(min_value=0, max_value=10**40), min_size=1, max_size=5),
       st.data())
@settings(max_examples=50, deadline=None)
def test_scaled_lagrange_recovers_delta_times_secret(coeffs, data):
    # Integer identity behind combine: Σ λ_i f(i) = Δ·f(0) for any t of the n points.
    n_parties = 6
    t = len(coeffs)
    subset = data.draw(st.lists(st.integers(1, n_parties), min_size=t, max_size=t, unique=True))
    delta = math.factorial(n_parties)
    f = lambda x: sum(a * x**k for k, a in enumerate(coeffs))  # noqa: E731
    total = sum(P.lagrange_at_zero(i, subset, delta) * f(i) for i in subset)
    assert total == delta * coeffs[0]


# --- encryption and homomorphism ---------------------------------------------------------


@given(plaintexts)
@fast
def test_round_trip_threshold_and_plain(m):
    public, p, q = plain_key()
    assert P.decrypt(p, q, public.encrypt(m)) == m
    assert threshold_decrypt(threshold_key()[0].encrypt(m)) == m


@given(plaintexts, plaintexts)
@fast
def test_homomorphic_add(a, b):
    public, p, q = plain_key()
    total = public.add(public.encrypt(a), public.encrypt(b))
    assert P.decrypt(p, q, total) == (a + b) % public.n


@given(st.lists(plaintexts, max_size=8))
@fast
def test_add_many(ms):
    public, p, q = plain_key()
    assert P.decrypt(p, q, public.add_many(public.encrypt(m) for m in ms)) == sum(ms) % public.n


@given(plaintexts, st.integers(min_value=-(1 << 600), max_value=1 << 600))
@fast
def test_mul_const(m, k):
    public, p, q = plain_key()
    assert P.decrypt(p, q, public.mul_const(public.encrypt(m), k)) == (k * m) % public.n


@given(plaintexts)
@fast
def test_encrypt_with_rn_equals_encrypt_with_r(m):
    public = plain_key()[0]
    r = public.random_r()
    assert public.encrypt_with_rn(m, public.precompute_rn(r)) == public.encrypt(m, r)


def test_encryption_is_randomized_and_valid():
    public = plain_key()[0]
    c1, c2 = public.encrypt(5), public.encrypt(5)
    assert c1 != c2 and public.is_valid_ciphertext(c1) and public.is_valid_ciphertext(c2)


def test_bad_inputs_raise_value_errors():
    public, p, _ = plain_key()
    for m in (-1, public.n, 1.5, "1", True):
        with pytest.raises(P.PlaintextOutOfRange):
            public.encrypt(m)
    for c in (0, public.n_squared):
        with pytest.raises(P.InvalidCiphertext):
            public.add(c, 1)
        with pytest.raises(P.InvalidCiphertext):
            public.mul_const(c, 2)
    with pytest.raises(P.PaillierError):
        public.encrypt(1, r=p)  # r must be a unit
    with pytest.raises(P.PaillierError):
        public.mul_const(public.encrypt(1), 2.0)
    assert not public.is_valid_ciphertext(p) and not public.is_valid_ciphertext(0)
    assert issubclass(P.PaillierError, ValueError)


# --- threshold decryption ----------------------------------------------------------------


def test_every_t_subset_combines_raw():
    public = threshold_key()[0]
    m = 314159265358979
    partials = raw_partials(public.encrypt(m))
    for subset in itertools.combinations(partials, T):
        assert P._combine_verified(public, N_PARTIES, subset) == m


def test_fewer_than_t_raw_partials_give_garbage():
    # Why combine insists on t: t-1 shares interpolate a different exponent.
    public = threshold_key()[0]
    partials = raw_partials(public.encrypt(42))
    assert P._combine_verified(public, N_PARTIES, partials[: T - 1]) != 42


@pytest.fixture
def recomputing_verifier(monkeypatch):
    """Stand-in for the proof check: recompute c_i from the dealer's shares. Lets the
    control flow of combine be tested before crypto/proofs.py exists."""
    shares = {s.index: s for s in threshold_key()[1]}

    def verify(public, vks, c, partial, context):
        if context != CTX or partial.index not in shares:
            return False
        return partial.value == P._partial_value(shares[partial.index], c)

    monkeypatch.setattr(P, "verify_partial", verify)


def test_combine_logic_with_stand_in_verifier(recomputing_verifier):
    public, _, vks = threshold_key()
    c = public.encrypt(2718)
    partials = raw_partials(c)
    for subset in itertools.combinations(partials, T):
        assert P.combine(public, vks, T, c, list(subset), CTX) == 2718
    assert P.combine(public, vks, T, c, partials, CTX) == 2718
    with pytest.raises(P.NotEnoughPartials):
        P.combine(public, vks, T, c, partials[: T - 1], CTX)
    bad = P.PartialDecryption(4, partials[3].value * 2 % public.n_squared, None)
    with pytest.raises(P.InvalidPartial, match="party 4") as info:
        P.combine(public, vks, T, c, partials[:3] + [bad], CTX)
    assert info.value.index == 4
    with pytest.raises(P.InvalidPartial, match="duplicate"):
        P.combine(public, vks, T, c, [partials[0], partials[1], partials[0]], CTX)
    with pytest.raises(P.InvalidParameters):
        P.combine(public, vks, N_PARTIES + 1, c, partials, CTX)


@functools.cache
def proven_partials(m):
    proofs_or_skip()
    public, shares, _ = threshold_key()
    c = public.encrypt(m)
    return c, [P.partial_decrypt(s, c, CTX) for s in shares]


def test_partials_with_proofs_verify_and_every_subset_combines():
    public, _, vks = threshold_key()
    c, partials = proven_partials(1234567)
    assert all(P.verify_partial(public, vks, c, p, CTX) for p in partials)
    for subset in itertools.combinations(partials, T):
        assert P.combine(public, vks, T, c, list(subset), CTX) == 1234567


def test_too_few_proven_partials():
    public, _, vks = threshold_key()
    c, partials = proven_partials(1234567)
    with pytest.raises(P.NotEnoughPartials):
        P.combine(public, vks, T, c, partials[: T - 1], CTX)


def test_tampered_partial_is_named():
    public, _, vks = threshold_key()
    c, partials = proven_partials(1234567)
    good = partials[2]
    tampered = P.PartialDecryption(good.index, good.value * 4 % public.n_squared, good.proof)
    assert not P.verify_partial(public, vks, c, tampered, CTX)
    with pytest.raises(P.InvalidPartial) as info:
        P.combine(public, vks, T, c, [partials[0], tampered, partials[4]], CTX)
    assert info.value.index == good.index and f"party {good.index}" in str(info.value)


def test_partial_for_other_ciphertext_or_context_or_party_fails():
    public, _, vks = threshold_key()
    c, partials = proven_partials(1234567)
    other = public.encrypt(1234567)
    assert not P.verify_partial(public, vks, other, partials[0], CTX)
    assert not P.verify_partial(public, vks, c, partials[0], b"round-2")
    moved = P.PartialDecryption(2, partials[0].value, partials[0].proof)
    assert not P.verify_partial(public, vks, c, moved, CTX)
    with pytest.raises(P.InvalidPartial):
        P.combine(public, vks, T, other, partials[:T], CTX)


# --- serialization -----------------------------------------------------------------------


def repack(data, **changes):
    obj = msgpack.unpackb(data, raw=False)
    obj.update(changes)
    return msgpack.packb(obj, use_bin_type=True)


def test_public_key_round_trip_and_rejections():
    public = threshold_key()[0]
    data = P.encode_public_key(public)
    assert P.decode_public_key(data) == public
    for bad in (repack(data, v=2), repack(data, t="paillier/ciphertext"),
                repack(data, n=(public.n + 1).to_bytes(64, "big")),
                repack(data, n=(2**255 + 1).to_bytes(32, "big")), b"\xc1", b"", 5,
                msgpack.packb([1, 2])):
        with pytest.raises(P.DecodeError):
            P.decode_public_key(bad)


def test_ciphertext_round_trip_and_rejections():
    public = threshold_key()[0]
    c = public.encrypt(7)
    raw = P.ciphertext_to_bytes(public, c)
    assert len(raw) == public.ciphertext_bytes == 128
    assert P.ciphertext_from_bytes(public, raw) == c
    assert P.decode_ciphertext(public, P.encode_ciphertext(public, c)) == c
    small = public.encrypt(0, r=1)  # == 1: still a full-length encoding
    assert len(P.ciphertext_to_bytes(public, small)) == 128
    size = public.ciphertext_bytes
    for value in (0, public.n, public.n_squared, public.n_squared + 1):
        with pytest.raises(P.DecodeError):
            P.ciphertext_from_bytes(public, value.to_bytes(size, "big"))
        data = P._pack("paillier/ciphertext", {"c": value.to_bytes(size, "big")})
        with pytest.raises(P.DecodeError):
            P.decode_ciphertext(public, data)
    for bad in (raw[1:], b"\x00" + raw):
        with pytest.raises(P.DecodeError):
            P.ciphertext_from_bytes(public, bad)
    data = P.encode_ciphertext(public, c)
    for bad in (repack(data, v=0), repack(data, c=raw[1:]), repack(data, c=7)):
        with pytest.raises(P.DecodeError):
            P.decode_ciphertext(public, bad)


def test_key_share_round_trip_and_rejections():
    for share in threshold_key()[1]:
        assert P.decode_key_share(P.encode_key_share(share)) == share
    data = P.encode_key_share(threshold_key()[1][0])
    for change in ({"index": 0}, {"index": N_PARTIES + 1}, {"threshold": N_PARTIES + 1},
                   {"parties": 0}, {"index": "1"}, {"v": 9}, {"secret": b"\x01"},
                   {"base": b"\x00" * 128}, {"secret": (5).to_bytes(128, "big")}):
        with pytest.raises(P.DecodeError):
            P.decode_key_share(repack(data, **change))
    obj = msgpack.unpackb(data)
    del obj["secret"]
    with pytest.raises(P.DecodeError, match="missing secret"):
        P.decode_key_share(msgpack.packb(obj))


def test_verification_keys_round_trip_and_rejections():
    public, _, vks = threshold_key()
    data = P.encode_verification_keys(public, vks)
    assert P.decode_verification_keys(public, data) == vks
    zero = b"\x00" * public.ciphertext_bytes
    for change in ({"keys": []}, {"keys": [zero]}, {"base": zero}, {"keys": "x"}):
        with pytest.raises(P.DecodeError):
            P.decode_verification_keys(public, repack(data, **change))


def test_partial_round_trip_and_rejections():
    proofs = proofs_or_skip()
    if not hasattr(proofs.DecryptionShareProof, "from_dict"):
        pytest.skip("DecryptionShareProof has no to_dict/from_dict yet")
    public, _, vks = threshold_key()
    c, partials = proven_partials(1234567)
    data = P.encode_partial(public, partials[1])
    back = P.decode_partial(public, N_PARTIES, data)
    assert back.index == partials[1].index and back.value == partials[1].value
    assert P.verify_partial(public, vks, c, back, CTX)
    for change in ({"index": 0}, {"index": N_PARTIES + 1}, {"value": b"\x00" * 128},
                   {"v": 2}):
        with pytest.raises(P.DecodeError):
            P.decode_partial(public, N_PARTIES, repack(data, **change))


def test_big_ints_in_proof_dicts_survive_msgpack():
    obj = {"e": 2**300 + 5, "z": -(2**200), "small": 3, "l": [2**70, 1], "b": b"x"}
    packed = msgpack.packb(P._bigints_to_ext(obj), use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False, ext_hook=P._ext_hook) == obj


# --- interop with tno.mpc.encryption_schemes.paillier ------------------------------------

needs_tno = pytest.mark.skipif(
    importlib.util.find_spec("tno.mpc.encryption_schemes.paillier") is None,
    reason="tno.mpc.encryption_schemes.paillier not installed",
)


@pytest.fixture(scope="module")
def tno_scheme():
    """TNO's scheme object built from our p, q (g = n + 1, λ = φ(n), μ = λ^-1 mod n)."""
    from tno.mpc.encryption_schemes.paillier import (
        Paillier, PaillierPublicKey, PaillierSecretKey)

    public, p, q = plain_key()
    n, lam = public.n, (p - 1) * (q - 1)
    secret = PaillierSecretKey(lam, int(gmpy2.invert(lam, n)), n)
    scheme = Paillier(PaillierPublicKey(n, n + 1), secret, precision=0)
    yield scheme
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheme.shut_down()


@needs_tno
@given(st.integers(min_value=0, max_value=(1 << (BITS - 2))))
@settings(max_examples=10, deadline=None)
def test_ours_decrypts_with_tno(tno_scheme, m):
    from tno.mpc.encryption_schemes.paillier import PaillierCiphertext

    scheme = tno_scheme
    c = plain_key()[0].encrypt(m)
    assert int(scheme.decrypt(PaillierCiphertext(c, scheme))) == m


@needs_tno
@given(st.integers(min_value=0, max_value=(1 << (BITS - 2))))
@settings(max_examples=10, deadline=None)
def test_tno_decrypts_here(tno_scheme, m):
    public, p, q = plain_key()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TNO warns when it makes randomness on the fly
        ciphertext = tno_scheme.encrypt(m)
        c = int(ciphertext.get_value())  # get_value applies TNO's lazy randomization
    assert public.is_valid_ciphertext(c)
    assert P.decrypt(p, q, c) == m


@pytest.mark.slow
def test_full_size_2048_end_to_end():
    proofs_or_skip()
    public, shares, vks = P.deal(2048, 2, 3)
    assert public.bits == 2048
    c = public.add(public.encrypt(40), public.encrypt(2))
    partials = [P.partial_decrypt(s, c, CTX) for s in shares[1:]]
    assert P.combine(public, vks, 2, c, partials, CTX) == 42


# --- batch threshold decryption (one proof per vector) -----------------------------------

VECTOR = [0, 1, 2, 3, 99, 2**64, 2**200 + 7] + [1000 + 37 * k for k in range(13)]  # 20


@functools.cache
def vector_ciphertexts():
    public = threshold_key()[0]
    return tuple(public.encrypt(m) for m in VECTOR)


def _install_stand_in_batch_proofs(monkeypatch):
    """Stand-in for prove/verify_decryption_shares: the 'proof' names v_i and the check
    recomputes every c_i from the dealer's shares. Exercises everything paillier.py does
    around the proof, before (or regardless of whether) crypto/proofs.py has the batch API."""
    proofs = pytest.importorskip("crypto.proofs")
    shares = {s.v_i: s for s in threshold_key()[1]}
    n2 = threshold_key()[0].n_squared

    def prove(n, v, v_i, cs, c_is, exponent, context):
        assert shares[v_i].delta * shares[v_i].secret == exponent
        return proofs.DecryptionShareProof(a=v_i, b=len(cs), z=1)

    def verify(n, v, v_i, cs, c_is, proof, context):
        share = shares.get(v_i)
        if share is None or context != CTX or proof.a != v_i or proof.b != len(cs):
            return False
        e = 2 * share.delta * share.secret
        return all(int(gmpy2.powmod(c, e, n2)) == ci for c, ci in zip(cs, c_is, strict=True))

    monkeypatch.setattr(proofs, "prove_decryption_shares", prove, raising=False)
    monkeypatch.setattr(proofs, "verify_decryption_shares", verify, raising=False)


@pytest.fixture(params=["stand-in", "real"])
def batch_proofs(request, monkeypatch):
    """Runs each batch test twice: with the stand-in proofs (always) and with the real
    batch proofs from crypto/proofs.py (skipped until that API exists)."""
    if request.param == "stand-in":
        _install_stand_in_batch_proofs(monkeypatch)
    else:
        proofs = proofs_or_skip()
        if not hasattr(proofs, "prove_decryption_shares"):
            pytest.skip("crypto/proofs.py has no prove/verify_decryption_shares yet")
    return request.param


def all_batches(workers=2):
    _, shares, _ = threshold_key()
    cs = vector_ciphertexts()
    return [P.partial_decrypt_many(s, cs, CTX, workers=workers) for s in shares]


def test_batch_round_trip_for_several_subsets(batch_proofs):
    public, _, vks = threshold_key()
    cs = vector_ciphertexts()
    batches = all_batches()
    assert all(P.verify_partial_many(public, vks, cs, b, CTX) for b in batches)
    for subset in [(0, 1, 2), (0, 2, 4), (1, 3, 4), (4, 3, 2), (2, 0, 3)]:
        chosen = [batches[k] for k in subset]
        assert P.combine_many(public, vks, T, cs, chosen, CTX) == VECTOR
    # All five: the first t are used, all are verified.
    assert P.combine_many(public, vks, T, cs, batches, CTX, workers=1) == VECTOR


def test_batch_values_match_single_partials_and_workers_agree(batch_proofs):
    _, shares, _ = threshold_key()
    cs = vector_ciphertexts()
    one = P.partial_decrypt_many(shares[1], cs, CTX, workers=1)
    two = P.partial_decrypt_many(shares[1], cs, CTX, workers=2)
    three = P.partial_decrypt_many(shares[1], cs, CTX, workers=3)
    assert one.values == two.values == three.values
    assert one.values == tuple(P._partial_value(shares[1], c) for c in cs)
    assert one.index == two.index == shares[1].index
    public, _, vks = threshold_key()
    batches = all_batches()[:T]
    assert (P.combine_many(public, vks, T, cs, batches, CTX, workers=1)
            == P.combine_many(public, vks, T, cs, batches, CTX, workers=2) == VECTOR)


def test_tampered_value_in_one_batch_names_that_member(batch_proofs):
    public, _, vks = threshold_key()
    cs = vector_ciphertexts()
    batches = all_batches()
    bad = batches[3]
    values = list(bad.values)
    values[11] = values[11] * 4 % public.n_squared  # still a unit, just wrong
    tampered = P.BatchPartialDecryption(bad.index, tuple(values), bad.proof)
    assert not P.verify_partial_many(public, vks, cs, tampered, CTX)
    with pytest.raises(P.InvalidPartial) as info:
        P.combine_many(public, vks, T, cs, [batches[0], tampered, batches[4]], CTX)
    assert info.value.index == bad.index and f"party {bad.index}" in str(info.value)
    # Shifted, reordered, truncated or moved to another party or context: all fail.
    assert not P.verify_partial_many(public, vks, cs[::-1], bad, CTX)
    assert not P.verify_partial_many(public, vks, cs[:-1], bad, CTX)
    assert not P.verify_partial_many(public, vks, cs, bad, b"round-2")
    moved = P.BatchPartialDecryption(1 + bad.index % N_PARTIES, bad.values, bad.proof)
    assert not P.verify_partial_many(public, vks, cs, moved, CTX)
    nobody = P.BatchPartialDecryption(0, bad.values, bad.proof)
    assert not P.verify_partial_many(public, vks, cs, nobody, CTX)


def test_too_few_or_duplicate_batches(batch_proofs):
    public, _, vks = threshold_key()
    cs = vector_ciphertexts()
    batches = all_batches()
    with pytest.raises(P.NotEnoughPartials):
        P.combine_many(public, vks, T, cs, batches[: T - 1], CTX)
    with pytest.raises(P.InvalidPartial, match="duplicate") as info:
        P.combine_many(public, vks, T, cs, [batches[0], batches[1], batches[0]], CTX)
    assert info.value.index == batches[0].index
    with pytest.raises(P.InvalidParameters):
        P.combine_many(public, vks, N_PARTIES + 1, cs, batches, CTX)


def test_batch_rejects_bad_inputs(batch_proofs):
    public, shares, vks = threshold_key()
    cs = list(vector_ciphertexts())
    for bad in (0, public.n_squared, public.n * 3):
        with pytest.raises(P.InvalidCiphertext, match="ciphertext 5"):
            P.partial_decrypt_many(shares[0], cs[:5] + [bad] + cs[5:], CTX)
    with pytest.raises(P.PaillierError):
        P.partial_decrypt_many(shares[0], [], CTX)
    for workers in (0, -1, 1.5, True):
        with pytest.raises(P.InvalidParameters):
            P.partial_decrypt_many(shares[0], cs, CTX, workers=workers)
    with pytest.raises(P.InvalidCiphertext):
        P.combine_many(public, vks, T, cs[:3] + [0], all_batches()[:T], CTX)


def test_batch_partial_encoding_round_trip_and_rejections(batch_proofs):
    proofs = proofs_or_skip()
    if not hasattr(proofs.DecryptionShareProof, "from_dict"):
        pytest.skip("DecryptionShareProof has no to_dict/from_dict yet")
    public, _, vks = threshold_key()
    cs = vector_ciphertexts()
    batch = all_batches()[2]
    data = P.encode_batch_partial(public, batch)
    back = P.decode_batch_partial(public, N_PARTIES, data, count=len(cs))
    assert back == batch and P.verify_partial_many(public, vks, cs, back, CTX)
    assert P.decode_batch_partial(public, N_PARTIES, data) == batch
    values = msgpack.unpackb(data, raw=False)["values"]
    assert all(len(x) == public.ciphertext_bytes for x in values)
    zero, short = b"\x00" * 128, values[0][1:]
    n2 = public.n_squared.to_bytes(128, "big")
    for change in ({"index": 0}, {"index": N_PARTIES + 1}, {"index": "1"}, {"v": 2},
                   {"t": "paillier/partial"}, {"values": []}, {"values": values[0]},
                   {"values": values[:4] + [zero] + values[5:]},
                   {"values": values[:4] + [short] + values[5:]},
                   {"values": values[:4] + [n2] + values[5:]},
                   {"values": values[:4] + [5] + values[5:]}, {"proof": {"a": b"\x01"}}):
        with pytest.raises(P.DecodeError):
            P.decode_batch_partial(public, N_PARTIES, repack(data, **change))
    with pytest.raises(P.DecodeError, match="expected 19 values"):
        P.decode_batch_partial(public, N_PARTIES, data, count=len(cs) - 1)
    with pytest.raises(P.DecodeError):
        P.decode_batch_partial(public, N_PARTIES, P.encode_partial(public, P.PartialDecryption(
            1, batch.values[0], batch.proof)))
