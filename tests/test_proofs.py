"""Zero-knowledge proofs in crypto/proofs.py, over 512-bit test moduli."""

import dataclasses
import secrets

import gmpy2
import msgpack
import pytest
from gmpy2 import mpz, powmod
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import proofs
from crypto.proofs import (
    DecryptionShareProof,
    PlaintextKnowledgeProof,
    ProofContext,
    RangeProof,
    prove_decryption_share,
    prove_plaintext_knowledge,
    prove_range,
    slack_bits,
    verify_decryption_share,
    verify_plaintext_knowledge,
    verify_range,
    verify_range_batch,
)

BOUND = 64  # bound_bits for most range tests
FEW = settings(max_examples=30, deadline=None)


def _prime(bits: int) -> int:
    return int(gmpy2.next_prime(mpz(secrets.randbits(bits)) | (1 << (bits - 1))))


def _safe_prime(bits: int) -> int:
    while True:
        p = _prime(bits - 1)
        if gmpy2.is_prime(2 * p + 1):
            return 2 * p + 1


@pytest.fixture(scope="module")
def n() -> int:
    return _prime(256) * _prime(256)


def _encrypt(n: int, m: int) -> tuple[int, int]:
    r = secrets.randbelow(n - 2) + 2
    return (1 + m * n) * pow(r, n, n * n) % (n * n), r


def _ctx(n: int, purpose: str = proofs.PURPOSE_RANGE, **changes) -> ProofContext:
    base = ProofContext(public_n=n, mesh_id="mesh-a", round_id=7, sender="5Alice", index=3, purpose=purpose)
    return dataclasses.replace(base, **changes)


CONTEXT_CHANGES = [
    {"public_n": 12345},
    {"mesh_id": "mesh-b"},
    {"round_id": 8},
    {"sender": "5Bob"},
    {"index": 4},
    {"purpose": "something-else"},
]


def _bump(proof, name: str):
    return dataclasses.replace(proof, **{name: getattr(proof, name) + 1})


def _roundtrip(proof):
    wire = msgpack.packb(proof.to_dict())
    return type(proof).from_dict(msgpack.unpackb(wire))


# --- context ----------------------------------------------------------------------------


def test_context_encoding_separates_every_field(n):
    encodings = {_ctx(n).encode()} | {_ctx(n, **ch).encode() for ch in CONTEXT_CHANGES}
    assert len(encodings) == len(CONTEXT_CHANGES) + 1
    # Length prefixes: moving a character between adjacent strings changes the encoding.
    assert _ctx(n, mesh_id="ab", sender="c").encode() != _ctx(n, mesh_id="a", sender="bc").encode()


def test_context_validation_and_roundtrip(n):
    with pytest.raises(ValueError):
        _ctx(n, round_id=-1)
    with pytest.raises(ValueError):
        _ctx(n, sender=b"bytes")
    ctx = _ctx(n)
    assert ProofContext.from_dict(msgpack.unpackb(msgpack.packb(ctx.to_dict()))) == ctx


# --- plaintext knowledge ----------------------------------------------------------------


@FEW
@given(st.data())
def test_plaintext_knowledge_accepts_honest(n, data):
    m = data.draw(st.integers(0, n - 1))
    c, r = _encrypt(n, m)
    ctx = _ctx(n, proofs.PURPOSE_PLAINTEXT_KNOWLEDGE).encode()
    assert verify_plaintext_knowledge(n, c, prove_plaintext_knowledge(n, c, m, r, ctx), ctx)


def test_plaintext_knowledge_rejects_tampering(n):
    m = 42
    c, r = _encrypt(n, m)
    ctx = _ctx(n, proofs.PURPOSE_PLAINTEXT_KNOWLEDGE)
    proof = prove_plaintext_knowledge(n, c, m, r, ctx.encode())
    n2 = n * n
    assert not verify_plaintext_knowledge(n, c * (1 + n) % n2, proof, ctx.encode())
    assert not verify_plaintext_knowledge(n, c * pow(5, n, n2) % n2, proof, ctx.encode())
    for change in CONTEXT_CHANGES:
        assert not verify_plaintext_knowledge(n, c, proof, dataclasses.replace(ctx, **change).encode())
    for f in dataclasses.fields(proof):
        assert not verify_plaintext_knowledge(n, c, _bump(proof, f.name), ctx.encode()), f.name
    # A proof made with the wrong witness does not verify.
    wrong = prove_plaintext_knowledge(n, c, m + 1, r, ctx.encode())
    assert not verify_plaintext_knowledge(n, c, wrong, ctx.encode())


def test_plaintext_knowledge_roundtrip(n):
    c, r = _encrypt(n, 5)
    ctx = _ctx(n).encode()
    proof = prove_plaintext_knowledge(n, c, 5, r, ctx)
    assert _roundtrip(proof) == proof
    assert verify_plaintext_knowledge(n, c, _roundtrip(proof), ctx)
    with pytest.raises(ValueError):
        PlaintextKnowledgeProof.from_dict({"a": b"\x01", "z1": b"\x01"})
    with pytest.raises(ValueError):
        PlaintextKnowledgeProof.from_dict({"a": 1, "z1": b"\x01", "z2": b"\x01"})


# --- range --------------------------------------------------------------------------------


@FEW
@given(st.data())
def test_range_accepts_honest(n, data):
    bound_bits = data.draw(st.sampled_from([1, 8, 64, 200]))
    m = data.draw(st.integers(0, (1 << bound_bits) - 1))
    c, r = _encrypt(n, m)
    ctx = _ctx(n).encode()
    proof = prove_range(n, c, m, r, bound_bits, ctx)
    assert 0 <= proof.z1 < 1 << (bound_bits + slack_bits() - 1)
    assert verify_range(n, c, proof, bound_bits, ctx)


def test_slack_and_parameter_limits(n):
    assert slack_bits() == proofs.T + proofs.KAPPA + 1 == 257
    c, r = _encrypt(n, 1)
    largest = n.bit_length() - 3 - slack_bits()
    assert verify_range(n, c, prove_range(n, c, 1, r, largest, b"x"), largest, b"x")
    for call in (
        lambda: prove_range(n, c, 1, r, largest + 1, b"x"),
        lambda: verify_range(n, c, RangeProof(1, 1, 1, 1, 1, 1), largest + 1, b"x"),
        lambda: prove_range(n, c, 1, r, 0, b"x"),
    ):
        with pytest.raises(ValueError):
            call()


def test_range_prover_refuses_out_of_range(n):
    for m in (1 << BOUND, (1 << BOUND) + 5, n - 1, -1):
        c, r = _encrypt(n, m % n)
        with pytest.raises(ValueError):
            prove_range(n, c, m, r, BOUND, b"ctx")


def test_range_rejects_tampering(n):
    m = (1 << BOUND) - 1
    c, r = _encrypt(n, m)
    ctx = _ctx(n)
    proof = prove_range(n, c, m, r, BOUND, ctx.encode())
    assert verify_range(n, c, proof, BOUND, ctx.encode())
    n2 = n * n
    assert not verify_range(n, c * (1 + n) % n2, proof, BOUND, ctx.encode())
    assert not verify_range(n, c * pow(3, n, n2) % n2, proof, BOUND, ctx.encode())
    assert not verify_range(n, c, proof, BOUND + 1, ctx.encode())  # bound is part of the statement
    for change in CONTEXT_CHANGES:
        assert not verify_range(n, c, proof, BOUND, dataclasses.replace(ctx, **change).encode()), change
    for f in dataclasses.fields(proof):
        assert not verify_range(n, c, _bump(proof, f.name), BOUND, ctx.encode()), f.name
    assert not verify_range(n, c, dataclasses.replace(proof, z1=1 << (BOUND + 256)), BOUND, ctx.encode())
    assert not verify_range(n, c, dataclasses.replace(proof, a=0), BOUND, ctx.encode())
    assert not verify_range(n, c, dataclasses.replace(proof, commitment=n), BOUND, ctx.encode())


def _forge_range(n, c, m, r, bound_bits, ctx, committed=None, reduce_z1=False, want_even_e=False):
    """Run the prover's steps by hand, without its range check, for a cheating m."""
    n2, (h1, h2) = n * n, proofs._generators(mpz(n))
    committed = m if committed is None else committed
    mu = secrets.randbits(proofs._mu_bits(mpz(n)))
    commitment = int(powmod(h1, committed, n) * powmod(h2, mu, n) % n)
    while True:
        x = secrets.randbits(proofs._z1_bits(bound_bits))
        y = secrets.randbits(proofs._mu_bits(mpz(n)) + proofs.T + proofs.KAPPA)
        s = secrets.randbelow(n - 2) + 2
        a = (1 + x * n) * pow(s, n, n2) % n2
        a_aux = int(powmod(h1, x, n) * powmod(h2, y, n) % n)
        e = proofs._range_challenge(mpz(n), c, bound_bits, commitment, a, a_aux, ctx)
        if not want_even_e or e % 2 == 0:  # Fiat–Shamir grinding: retry until e suits us
            break
    z1 = (x + e * m) % n if reduce_z1 else x + e * m
    return RangeProof(commitment, a, a_aux, z1, s * pow(r, e, n) % n, y + e * mu)


@FEW
@given(st.data())
def test_range_rejects_cheating_prover_with_big_m(n, data):
    big = 1 << (BOUND + slack_bits())
    m = data.draw(st.integers(big, n - big))
    reduce_z1 = data.draw(st.booleans())
    c, r = _encrypt(n, m)
    ctx = _ctx(n).encode()
    proof = _forge_range(n, c, m, r, BOUND, ctx, reduce_z1=reduce_z1)
    assert not verify_range(n, c, proof, BOUND, ctx)
    assert not verify_range_batch(n, [c], [proof], BOUND, [ctx])


def test_range_rejects_half_attack(n):
    """m = 1/2 mod n (about n/2) passes a Paillier-only interval proof whenever e is even.

    The integer commitment is what stops it: committing to 1/2 needs a square root of h1.
    """
    m = (n + 1) // 2
    c, r = _encrypt(n, m)
    ctx = _ctx(n).encode()
    proof = _forge_range(n, c, m, r, BOUND, ctx, committed=0, reduce_z1=True, want_even_e=True)
    e = proofs._range_challenge(mpz(n), c, BOUND, proof.commitment, proof.a, proof.a_aux, ctx)
    n2 = n * n
    assert 0 <= proof.z1 < 1 << proofs._z1_bits(BOUND)  # passes the integer bound ...
    # ... and the Paillier equation:
    assert proofs._paillier_lhs(mpz(n), mpz(n2), proof.z1, proof.z2) == proof.a * pow(c, e, n2) % n2
    assert not verify_range(n, c, proof, BOUND, ctx)
    assert not verify_range_batch(n, [c], [proof], BOUND, [ctx])


def test_negative_plaintext_within_slack_is_accepted(n):
    """Documents the tolerance: a cheater can encrypt -1 (that is, n - 1) and still pass."""
    c, r = _encrypt(n, n - 1)
    ctx = _ctx(n).encode()
    # Commit to -1 (h1 inverted); z1 = x - e stays non-negative because x >> e.
    proof = _forge_range(n, c, -1, r, BOUND, ctx)
    assert verify_range(n, c, proof, BOUND, ctx)


# --- batch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(n):
    cs, ps, ctxs = [], [], []
    for i in range(8):
        m = secrets.randbits(BOUND)
        c, r = _encrypt(n, m)
        ctx = _ctx(n, index=i).encode()
        cs.append(c)
        ps.append(prove_range(n, c, m, r, BOUND, ctx))
        ctxs.append(ctx)
    return cs, ps, ctxs


def test_batch_accepts_honest(n, batch):
    cs, ps, ctxs = batch
    assert verify_range_batch(n, cs, ps, BOUND, ctxs)
    assert verify_range_batch(n, [], [], BOUND, [])


@pytest.mark.parametrize("where", [0, 5, 7])
@pytest.mark.parametrize("how", ["z1", "z2", "z3", "a", "a_aux", "commitment", "c", "context", "swap"])
def test_batch_rejects_one_bad_proof(n, batch, where, how):
    cs, ps, ctxs = (list(x) for x in batch)
    if how == "c":
        cs[where] = cs[where] * (1 + n) % (n * n)
    elif how == "context":
        ctxs[where] = ctxs[(where + 1) % len(ctxs)]
    elif how == "swap":
        j = (where + 1) % len(ps)
        ps[where], ps[j] = ps[j], ps[where]
    else:
        ps[where] = _bump(ps[where], how)
    assert not verify_range_batch(n, cs, ps, BOUND, ctxs)


def test_batch_rejects_wrong_plaintext_even_if_equations_balance(n, batch):
    """Two proofs whose errors cancel for fixed exponents still fail under random rho_j."""
    cs, ps, ctxs = (list(x) for x in batch)
    cs[0] = cs[0] * (1 + n) % (n * n)  # plaintext +1
    cs[1] = cs[1] * gmpy2.invert(1 + n, n * n) % (n * n)  # plaintext -1
    assert not verify_range_batch(n, cs, ps, BOUND, ctxs)


def test_batch_length_mismatch(n, batch):
    cs, ps, ctxs = batch
    with pytest.raises(ValueError):
        verify_range_batch(n, cs, ps[:-1], BOUND, ctxs)


def test_range_roundtrip(n, batch):
    cs, ps, ctxs = batch
    back = _roundtrip(ps[0])
    assert back == ps[0] and verify_range(n, cs[0], back, BOUND, ctxs[0])
    assert all(isinstance(v, bytes) for v in ps[0].to_dict().values())


# --- decryption share ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def share(n):
    """A Shoup-style share: v a random square, exponent = Δ·s_i, c_i = c^(2·exponent)."""
    n2 = n * n
    delta = 1
    for k in range(2, 11):  # Δ = 10!
        delta *= k
    exponent = delta * secrets.randbelow(n2 // 4)
    v = pow(secrets.randbelow(n2), 2, n2)
    c, _ = _encrypt(n, 99)
    return v, pow(v, exponent, n2), c, pow(c, 2 * exponent, n2), exponent


def test_decryption_share_accepts_honest(n, share):
    v, v_i, c, c_i, exponent = share
    ctx = _ctx(n, proofs.PURPOSE_DECRYPTION_SHARE).encode()
    proof = prove_decryption_share(n, v, v_i, c, c_i, exponent, ctx)
    assert verify_decryption_share(n, v, v_i, c, c_i, proof, ctx)
    assert verify_decryption_share(n, v, v_i, c, c_i, _roundtrip(proof), ctx)


@FEW
@given(st.data())
def test_decryption_share_accepts_honest_random(n, data):
    n2 = n * n
    exponent = data.draw(st.integers(0, n2 * (1 << proofs.MAX_EXPONENT_EXCESS_BITS) - 1))
    v = pow(data.draw(st.integers(2, n2 - 1)), 2, n2)
    c, _ = _encrypt(n, data.draw(st.integers(0, n - 1)))
    if gmpy2.gcd(v, n) != 1:
        return
    v_i, c_i = pow(v, exponent, n2), pow(c, 2 * exponent, n2)
    proof = prove_decryption_share(n, v, v_i, c, c_i, exponent, b"ctx")
    assert verify_decryption_share(n, v, v_i, c, c_i, proof, b"ctx")


def test_decryption_share_rejects_wrong_share(n, share):
    v, v_i, c, c_i, exponent = share
    n2 = n * n
    ctx = _ctx(n, proofs.PURPOSE_DECRYPTION_SHARE)
    enc = ctx.encode()
    # Wrong exponent: a share computed with another s_i, proved with either exponent.
    bad_c_i = pow(c, 2 * (exponent + 1), n2)
    for claimed in (exponent, exponent + 1):
        bad = prove_decryption_share(n, v, v_i, c, bad_c_i, claimed, enc)
        assert not verify_decryption_share(n, v, v_i, c, bad_c_i, bad, enc)
    proof = prove_decryption_share(n, v, v_i, c, c_i, exponent, enc)
    assert not verify_decryption_share(n, v, v_i, c, c_i * 3 % n2, proof, enc)
    assert not verify_decryption_share(n, v, v_i * 3 % n2, c, c_i, proof, enc)
    assert not verify_decryption_share(n, v, v_i, c * (1 + n) % n2, c_i, proof, enc)
    assert not verify_decryption_share(n, v * 4 % n2, v_i, c, c_i, proof, enc)
    for change in CONTEXT_CHANGES:
        other = dataclasses.replace(ctx, **change).encode()
        assert not verify_decryption_share(n, v, v_i, c, c_i, proof, other)
    for f in dataclasses.fields(proof):
        assert not verify_decryption_share(n, v, v_i, c, c_i, _bump(proof, f.name), enc), f.name
    too_big = 1 << (proofs._share_mask_bits(mpz(n)) + 1)
    assert not verify_decryption_share(n, v, v_i, c, c_i, dataclasses.replace(proof, z=too_big), enc)
    assert not verify_decryption_share(n, v, v_i, c, c_i, proof, b"")


def test_decryption_share_refuses_oversized_exponent(n, share):
    v, v_i, c, c_i, _ = share
    with pytest.raises(ValueError):
        too_big = 1 << ((n * n).bit_length() + proofs.MAX_EXPONENT_EXCESS_BITS)
        prove_decryption_share(n, v, v_i, c, c_i, too_big, b"x")
    with pytest.raises(ValueError):
        prove_decryption_share(n, v, v_i, c, c_i, -1, b"x")
    assert DecryptionShareProof.from_dict(prove_decryption_share(n, v, v_i, c, c_i, 3, b"x").to_dict())


def test_safe_prime_modulus():
    """Shoup's setting proper: n = p·q with safe primes (v generates the squares)."""
    n = _safe_prime(256) * _safe_prime(256)
    m = 77
    c, r = _encrypt(n, m)
    assert verify_range(n, c, prove_range(n, c, m, r, BOUND, b"x"), BOUND, b"x")


# --- offline/online range proof ---------------------------------------------------------------


def test_fixed_base_table_matches_powmod(n):
    nm = mpz(n)
    h1 = proofs._generators(nm)[0]
    top = proofs._fixed_base_bits(nm)
    for exponent in (0, 1, 255, 256, (1 << top) - 1, 1 << top, secrets.randbits(top), secrets.randbits(600)):
        assert proofs._h1_pow(nm, exponent) == powmod(h1, exponent, nm), exponent


@FEW
@given(st.data())
def test_precomputed_range_proof_verifies(n, data):
    bound = data.draw(st.sampled_from([1, BOUND, n.bit_length() - 3 - slack_bits()]))
    m = data.draw(st.integers(0, (1 << bound) - 1))
    c, r = _encrypt(n, m)
    pre = proofs.precompute_range(n, bound)
    proof = prove_range(n, c, m, r, bound, b"ctx", precomputed=pre)
    assert (proof.a, proof.a_aux) == (pre.a, pre.a_aux)
    assert verify_range(n, c, proof, bound, b"ctx")
    assert verify_range(n, c, _roundtrip(proof), bound, b"ctx")
    assert not verify_range(n, c, proof, bound, b"other")


def test_precomputed_proofs_pass_batch_verification(n):
    items = []
    for k in range(6):
        m = secrets.randbits(BOUND)
        c, r = _encrypt(n, m)
        ctx = _ctx(n, index=k).encode()
        items.append((c, prove_range(n, c, m, r, BOUND, ctx, precomputed=proofs.precompute_range(n, BOUND)), ctx))
    cs, ps, ctxs = map(list, zip(*items))
    assert verify_range_batch(n, cs, ps, BOUND, ctxs)
    ps[2] = _bump(ps[2], "z1")
    assert not verify_range_batch(n, cs, ps, BOUND, ctxs)


def test_precomputation_is_bound_to_parameters_and_hides_secrets(n):
    pre = proofs.precompute_range(n, BOUND)
    c, r = _encrypt(n, 5)
    with pytest.raises(ValueError):
        prove_range(n, c, 5, r, BOUND + 1, b"x", precomputed=pre)
    other_n = _prime(256) * _prime(256)
    with pytest.raises(ValueError):
        prove_range(other_n, c, 5, r, BOUND, b"x", precomputed=pre)
    assert str(pre.x) not in repr(pre) and str(pre.mu) not in repr(pre)


def test_precomputation_reuse_leaks_plaintext(n):
    """Why the once-only rule: two proofs from one precomputation reveal m."""
    m = secrets.randbits(BOUND)
    c, r = _encrypt(n, m)
    pre = proofs.precompute_range(n, BOUND)
    p1 = prove_range(n, c, m, r, BOUND, b"one", precomputed=pre)
    p2 = prove_range(n, c, m, r, BOUND, b"two", precomputed=pre)
    e1 = proofs._range_challenge(mpz(n), c, BOUND, p1.commitment, p1.a, p1.a_aux, b"one")
    e2 = proofs._range_challenge(mpz(n), c, BOUND, p2.commitment, p2.a, p2.a_aux, b"two")
    assert (p1.z1 - p2.z1) // (e1 - e2) == m


def test_precomputed_overflow_falls_back_to_fresh_masks(n):
    m = (1 << BOUND) - 1
    c, r = _encrypt(n, m)
    top = (1 << proofs._z1_bits(BOUND)) - 1
    pre = dataclasses.replace(proofs.precompute_range(n, BOUND), x=top)  # z1 = top + e·m overflows
    proof = prove_range(n, c, m, r, BOUND, b"x", precomputed=pre)
    assert proof.a != pre.a
    assert verify_range(n, c, proof, BOUND, b"x")


# --- batch of decryption shares -----------------------------------------------------------------


def _shares(n, share, count):
    v, v_i, _, _, exponent = share
    n2 = n * n
    cs = [_encrypt(n, secrets.randbelow(n))[0] for _ in range(count)]
    return v, v_i, cs, [pow(c, 2 * exponent, n2) for c in cs], exponent


@pytest.mark.parametrize("count", [1, 5, proofs._MULTI_POW_MIN + 6])
def test_decryption_shares_accepts_honest(n, share, count):
    v, v_i, cs, c_is, exponent = _shares(n, share, count)
    ctx = _ctx(n, proofs.PURPOSE_DECRYPTION_SHARE).encode()
    proof = proofs.prove_decryption_shares(n, v, v_i, cs, c_is, exponent, ctx)
    assert proofs.verify_decryption_shares(n, v, v_i, cs, c_is, proof, ctx)
    assert proofs.verify_decryption_shares(n, v, v_i, cs, c_is, _roundtrip(proof), ctx)


def test_decryption_shares_rejects_any_wrong_share(n, share):
    v, v_i, cs, c_is, exponent = _shares(n, share, 6)
    n2 = n * n
    ctx = b"batch-ctx"
    for j in range(len(cs)):
        for bad in (pow(cs[j], 2 * (exponent + 1), n2), c_is[j] * 3 % n2, c_is[j] * (1 + n) % n2):
            forged = c_is[:j] + [bad] + c_is[j + 1 :]
            proof = proofs.prove_decryption_shares(n, v, v_i, cs, forged, exponent, ctx)
            assert not proofs.verify_decryption_shares(n, v, v_i, cs, forged, proof, ctx), j
        # An honest proof does not carry over to a batch with one share changed either.
    honest = proofs.prove_decryption_shares(n, v, v_i, cs, c_is, exponent, ctx)
    for j in range(len(cs)):
        forged = c_is[:j] + [c_is[j] * 4 % n2] + c_is[j + 1 :]
        assert not proofs.verify_decryption_shares(n, v, v_i, cs, forged, honest, ctx), j
    non_unit = c_is[:2] + [n] + c_is[3:]
    assert not proofs.verify_decryption_shares(n, v, v_i, cs, non_unit, honest, ctx)
    assert not proofs.verify_decryption_shares(n, v, v_i, [2 * n] + cs[1:], c_is, honest, ctx)
    assert not proofs.verify_decryption_shares(n, v, v_i, cs, c_is[:-1] + [n * n + 1], honest, ctx)


def test_decryption_shares_rejects_wrong_statement(n, share):
    v, v_i, cs, c_is, exponent = _shares(n, share, 4)
    n2 = n * n
    ctx = _ctx(n, proofs.PURPOSE_DECRYPTION_SHARE)
    enc = ctx.encode()
    proof = proofs.prove_decryption_shares(n, v, v_i, cs, c_is, exponent, enc)
    verify = proofs.verify_decryption_shares
    # Swapped order: the pairs still match, but the proof is for the other sequence.
    assert not verify(n, v, v_i, cs[::-1], c_is[::-1], proof, enc)
    # Swapping only the shares breaks the pairing itself; a fresh proof cannot fix it.
    swapped = [c_is[1], c_is[0]] + c_is[2:]
    swapped_proof = proofs.prove_decryption_shares(n, v, v_i, cs, swapped, exponent, enc)
    assert not verify(n, v, v_i, cs, swapped, swapped_proof, enc)
    # Wrong exponent (claimed against the true shares).
    wrong = proofs.prove_decryption_shares(n, v, v_i, cs, c_is, exponent + 1, enc)
    assert not verify(n, v, v_i, cs, c_is, wrong, enc)
    assert not verify(n, v, v_i * 3 % n2, cs, c_is, proof, enc)
    for change in CONTEXT_CHANGES:
        assert not verify(n, v, v_i, cs, c_is, proof, dataclasses.replace(ctx, **change).encode())
    # A batch proof is not a single-share proof, nor the other way round.
    assert not verify_decryption_share(n, v, v_i, cs[0], c_is[0], proof, enc)
    single = prove_decryption_share(n, v, v_i, cs[0], c_is[0], exponent, enc)
    assert not verify(n, v, v_i, cs[:1], c_is[:1], single, enc)
    # Length mismatch, dropped pairs and empty batches.
    assert not verify(n, v, v_i, cs, c_is[:-1], proof, enc)
    assert not verify(n, v, v_i, cs[:-1], c_is[:-1], proof, enc)
    assert not verify(n, v, v_i, [], [], proof, enc)
    with pytest.raises(ValueError):
        proofs.prove_decryption_shares(n, v, v_i, cs, c_is[:-1], exponent, enc)
    with pytest.raises(ValueError):
        proofs.prove_decryption_shares(n, v, v_i, [], [], exponent, enc)
