"""One range proof for a whole contribution: 128 random subset sums of its ciphertexts.

Statement: for ciphertexts c_1..c_L (DJN randomness, crypto/djn.py) the prover knows
plaintexts with every m_j ≡ m'_j (mod n) for an integer |m'_j| < 2^(bound_bits + S - 1),
S = slack_bits(L). Honest plaintexts are in [0, 2^bound_bits).

How: the statement digest (context, n, bound, every ciphertext) seeds SUBSETS = 128
random subsets S_k of {1..L}. For each, C_k = prod_{j in S_k} c_j encrypts
M_k = sum m_j with randomness R_k = sum rho_j (integers: DJN randomness adds up), and
the prover gives the interval proof with tolerance of crypto/proofs.py (integer
commitment h1^M·h2^mu mod n, responses over the integers) for (C_k, M_k, R_k).

Why subsets bound every ciphertext: take a j whose m_j has no small representative
(|m'_j| >= 2^(Mb + slack)) and fix every subset bit but j's. If both A (j left out) and
A + m_j (j in) had representatives below 2^(Mb + slack - 1), m_j would have one below
2^(Mb + slack). So at most one of the two choices passes: each subset catches a bad
ciphertext w.p. >= 1/2, and 128 independent subsets miss it w.p. <= 2^-128 (random
bits, not small integers: with coefficients in {0..K} a prover could pass with m_j =
1/2 mod n, a value near n/2). Rewinding the subsets extracts every m_j, so this is
also the proof of plaintext knowledge for each ciphertext (a copied foreign ciphertext
sits in about half the subsets, whose sums its copier cannot know).

Cost: the prover adds integers (no exponentiation per ciphertext online); the verifier
multiplies each ciphertext into about 64 subset products, cut to about 32
multiplications per ciphertext by grouping 6 ciphertexts and tabulating their 64
subset products. Everything else is 128 small proofs, checked together with
Bellare–Garay–Rabin small exponents (a wrong equation passes w.p. <= 2^-64, up to a
factor of order 2, which changes neither a plaintext nor a committed integer's size).

What it does not bound: a slot. The plaintext bound leaves every slot free in [0, 2^w).
prove_slots/verify_slots at the end of this module prove the digits of ONE plaintext
exactly (about two commitments per bit: seconds per plaintext), for the blame step after
an overflow (crypto/contribution.py, docs/crypto-contribution.md "Per-slot bounds").
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from gmpy2 import mpz, powmod
import gmpy2

from crypto import djn, proofs
from crypto.fixed_base import FixedBase

SUBSETS = 128
MAX_CIPHERTEXTS = 1 << 20
_GROUP = 6  # ciphertexts per tabulated group in the verifier (2^6 products each)
_DOMAIN = b"sealmesh/subset-range/v1"


class SubsetRangeError(ValueError):
    """Parameters the proof does not support (a caller's mistake, not a bad proof)."""


def slack_bits(count: int = MAX_CIPHERTEXTS) -> int:
    """Headroom over bound_bits that an accepted plaintext may use: accepted |m'| < 2^(bound + S - 1).

    The subset-sum proof bounds M_k with the range proof's own slack over
    bound + bits(count); the subset argument doubles that for one ciphertext.
    """
    return proofs.slack_bits() + count.bit_length() + 1


def _check(n: mpz, bound_bits: int, count: int) -> None:
    if not isinstance(count, int) or not 1 <= count <= MAX_CIPHERTEXTS:
        raise SubsetRangeError(f"count must be in 1..{MAX_CIPHERTEXTS}, got {count!r}")
    if not isinstance(bound_bits, int) or bound_bits < 1:
        raise SubsetRangeError("bound_bits must be a positive int")
    if bound_bits + slack_bits(count) >= n.bit_length() - 2:
        raise SubsetRangeError(f"bound_bits + slack {bound_bits + slack_bits(count)} must be "
                               f"< bits(n) - 2 = {n.bit_length() - 2}")


def _check_plaintexts(ms: Sequence[mpz], bound_bits: int) -> None:
    if any(not 0 <= m < (1 << bound_bits) for m in ms):
        raise SubsetRangeError("a plaintext is outside [0, 2^bound_bits): refusing to prove")


def _responses_in_bound(z1: Sequence[mpz], bound_bits: int, count: int) -> bool:
    return all(z < 1 << _z1_bits(bound_bits, count) for z in z1)


def _sum_bits(bound_bits: int, count: int) -> int:
    return bound_bits + count.bit_length()  # M_k < count·2^bound_bits


def _z1_bits(bound_bits: int, count: int) -> int:
    return _sum_bits(bound_bits, count) + proofs.T + proofs.KAPPA


def _z2_bits(n: mpz, count: int) -> int:
    return djn.exponent_bits(n) + count.bit_length() + proofs.T + proofs.KAPPA


def _mu_bits(n: mpz) -> int:
    return n.bit_length() + proofs.KAPPA


def _y_bits(n: mpz) -> int:
    return _mu_bits(n) + proofs.T + proofs.KAPPA


@dataclass(frozen=True)
class SubsetPrecomputation:
    """The masks of one subset proof and what depends only on them. USE ONCE, never log."""

    n: int
    bound_bits: int
    count: int
    x: mpz = field(repr=False)
    sigma: mpz = field(repr=False)
    y: mpz = field(repr=False)
    mu: mpz = field(repr=False)
    a: mpz = field(repr=False)  # (1 + x·n)·h_n^sigma mod n^2
    a_aux: mpz = field(repr=False)  # h1^x·h2^y mod n
    h2_mu: mpz = field(repr=False)


def precompute_one(n: int, bound_bits: int, count: int) -> SubsetPrecomputation:
    n = mpz(n)
    _check(n, bound_bits, count)
    h2 = proofs._generators(n)[1]
    x = mpz(secrets.randbits(_z1_bits(bound_bits, count)))
    sigma = mpz(secrets.randbits(_z2_bits(n, count)))
    y = mpz(secrets.randbits(_y_bits(n)))
    mu = mpz(secrets.randbits(_mu_bits(n)))
    a = (1 + x * n) * djn.table(int(n)).pow(sigma) % (n * n)
    a_aux = proofs._h1_pow(n, x) * powmod(h2, y, n) % n
    return SubsetPrecomputation(int(n), bound_bits, count, x, sigma, y, mu, a, a_aux, powmod(h2, mu, n))


def precompute(n: int, bound_bits: int, count: int) -> list[SubsetPrecomputation]:
    """Everything of a proof that depends on neither the plaintexts nor the challenge."""
    return [precompute_one(n, bound_bits, count) for _ in range(SUBSETS)]


@dataclass(frozen=True)
class SubsetRangeProof:
    commitments: tuple[int, ...]  # h1^M_k·h2^mu_k mod n
    a: tuple[int, ...]
    a_aux: tuple[int, ...]
    z1: tuple[int, ...]  # x_k + e_k·M_k
    z2: tuple[int, ...]  # sigma_k + e_k·R_k
    z3: tuple[int, ...]  # y_k + e_k·mu_k

    FIELDS = ("commitments", "a", "a_aux", "z1", "z2", "z3")

    def to_wire(self) -> dict[str, list[bytes]]:
        return {name: [_to_bytes(v) for v in getattr(self, name)] for name in self.FIELDS}

    @classmethod
    def from_wire(cls, obj: object) -> "SubsetRangeProof":
        if not isinstance(obj, dict) or set(obj) != set(cls.FIELDS):
            raise ValueError(f"a subset range proof is a map with exactly {cls.FIELDS}")
        values = {}
        for name in cls.FIELDS:
            items = obj[name]
            if not isinstance(items, list) or len(items) != SUBSETS:
                raise ValueError(f"{name}: expected a list of {SUBSETS} entries")
            if not all(isinstance(b, bytes) and len(b) <= 1024 for b in items):
                raise ValueError(f"{name}: entries must be byte strings of at most 1024 bytes")
            values[name] = tuple(int.from_bytes(b, "big") for b in items)
        return cls(**values)


def _to_bytes(x: int) -> bytes:
    x = int(x)
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


def statement_digest(n: int, cs: Sequence[int], bound_bits: int, context: bytes) -> bytes:
    n = mpz(n)
    width = (2 * n.bit_length() + 7) // 8
    h = hashlib.sha256()
    for part in (_DOMAIN, bytes(context), _to_bytes(n), _to_bytes(bound_bits), _to_bytes(len(cs))):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(b"".join(int(c).to_bytes(width, "big") for c in cs))
    return h.digest()


def subset_masks(digest: bytes, count: int) -> np.ndarray:
    """(SUBSETS, count) array of 0/1: row k says which ciphertexts subset k sums."""
    row_bytes = -(-count // 8)
    raw = hashlib.shake_256(_DOMAIN + b"/subsets" + digest).digest(SUBSETS * row_bytes)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(SUBSETS, row_bytes),
                         axis=1, bitorder="little")
    return bits[:, :count]


def _challenges(digest: bytes, commitments, a, a_aux) -> list[int]:
    h = hashlib.shake_256(_DOMAIN + b"/challenge" + digest)
    for value in itertools.chain(commitments, a, a_aux):
        b = _to_bytes(value)
        h.update(len(b).to_bytes(4, "big") + b)
    raw = h.digest(SUBSETS * proofs.T // 8)
    step = proofs.T // 8
    return [int.from_bytes(raw[i:i + step], "big") for i in range(0, len(raw), step)]


def prove(
    n: int,
    cs: Sequence[int],
    ms: Sequence[int],
    rhos: Sequence[int],
    bound_bits: int,
    context: bytes,
    *,
    precomputed: Sequence[SubsetPrecomputation] | None = None,
    _attempt: int = 1,
) -> SubsetRangeProof:
    """Proof for ciphertexts cs = (1 + m_j·n)·h_n^rho_j with 0 <= m_j < 2^bound_bits.

    `precomputed`: SUBSETS fresh precomputations for (n, bound_bits, len(cs)); each may
    serve one proof only (reusing masks reveals the plaintext sums outright).
    """
    n = mpz(n)
    count = len(cs)
    _check(n, bound_bits, count)
    if not len(ms) == len(rhos) == count:
        raise SubsetRangeError("cs, ms and rhos must have the same length")
    ms = [mpz(m) for m in ms]
    _check_plaintexts(ms, bound_bits)
    if precomputed is None:
        precomputed = precompute(n, bound_bits, count)
    if len(precomputed) != SUBSETS or any(
            (p.n, p.bound_bits, p.count) != (n, bound_bits, count) for p in precomputed):
        raise SubsetRangeError(f"need {SUBSETS} precomputations made for this n, bound and count")
    rhos = [mpz(r) for r in rhos]
    digest = statement_digest(n, cs, bound_bits, context)
    masks = subset_masks(digest, count)
    sums = []
    for row in masks:
        chosen = row.tobytes()  # bytes of 0/1: compress() walks them at C speed
        sums.append((sum(itertools.compress(ms, chosen), mpz(0)),
                     sum(itertools.compress(rhos, chosen), mpz(0))))
    commitments = [proofs._h1_pow(n, m_sum) * pre.h2_mu % n for (m_sum, _), pre in zip(sums, precomputed)]
    es = _challenges(digest, commitments, [p.a for p in precomputed], [p.a_aux for p in precomputed])
    z1 = [pre.x + e * m_sum for (m_sum, _), pre, e in zip(sums, precomputed, es)]
    if not _responses_in_bound(z1, bound_bits, count):
        # Happens w.p. < 2^-KAPPA per subset for honest plaintexts; fresh masks keep honest
        # proofs in bound, and the failed ones were never published.
        if _attempt >= 3:
            raise SubsetRangeError("responses keep leaving the bound: the plaintexts are not in range")
        return prove(n, cs, ms, rhos, bound_bits, context, _attempt=_attempt + 1)
    return SubsetRangeProof(
        commitments=tuple(int(c) for c in commitments),
        a=tuple(int(p.a) for p in precomputed),
        a_aux=tuple(int(p.a_aux) for p in precomputed),
        z1=tuple(int(z) for z in z1),
        z2=tuple(int(pre.sigma + e * r_sum) for (_, r_sum), pre, e in zip(sums, precomputed, es)),
        z3=tuple(int(pre.y + e * pre.mu) for pre, e in zip(precomputed, es)),
    )


def _subset_products(cs: Sequence[mpz], masks: np.ndarray, n2: mpz) -> list[mpz]:
    """prod_{j in S_k} c_j mod n^2 for every subset k, groups of _GROUP at a time."""
    count = len(cs)
    groups = -(-count // _GROUP)
    padded = np.zeros((SUBSETS, groups * _GROUP), dtype=np.int64)
    padded[:, :count] = masks
    weights = 1 << np.arange(_GROUP, dtype=np.int64)
    codes = (padded.reshape(SUBSETS, groups, _GROUP) * weights).sum(axis=2).T.tolist()
    acc = [mpz(1)] * SUBSETS
    for g, row in enumerate(codes):
        table = [mpz(1)]
        for c in cs[g * _GROUP:(g + 1) * _GROUP]:
            table += [t * c % n2 for t in table]
        for k, code in enumerate(row):
            if code:
                acc[k] = acc[k] * table[code] % n2
    return acc


def verify(n: int, cs: Sequence[int], proof: SubsetRangeProof, bound_bits: int, context: bytes) -> bool:
    """True iff the proof holds for these ciphertexts, bound and context."""
    n = mpz(n)
    count = len(cs)
    _check(n, bound_bits, count)
    n2 = n * n
    if not all(len(getattr(proof, name)) == SUBSETS for name in SubsetRangeProof.FIELDS):
        return False
    mcs = [mpz(c) for c in cs]
    if not all(0 < c < n2 and gmpy2.gcd(c, n) == 1 for c in mcs):
        return False
    if not all(0 < a < n2 and gmpy2.gcd(a, n) == 1 for a in proof.a):
        return False
    if not all(0 < x < n and gmpy2.gcd(x, n) == 1 for x in proof.commitments + proof.a_aux):
        return False
    z2_max, z3_max = 1 << (_z2_bits(n, count) + 1), 1 << (_y_bits(n) + 1)
    if not (all(z1 >= 0 for z1 in proof.z1) and _responses_in_bound(proof.z1, bound_bits, count)):
        return False
    if not (all(0 <= z < z2_max for z in proof.z2) and all(0 <= z < z3_max for z in proof.z3)):
        return False
    digest = statement_digest(n, cs, bound_bits, context)
    products = _subset_products(mcs, subset_masks(digest, count), n2)
    es = _challenges(digest, proof.commitments, proof.a, proof.a_aux)
    h1, h2 = proofs._generators(n)
    rhos = [mpz(secrets.randbits(proofs.BATCH_RHO_BITS) | 1) for _ in range(SUBSETS)]
    sum_z1 = sum((r * z for r, z in zip(rhos, proof.z1)), mpz(0))
    sum_z2 = sum((r * z for r, z in zip(rhos, proof.z2)), mpz(0))
    sum_z3 = sum((r * z for r, z in zip(rhos, proof.z3)), mpz(0))
    rhs_paillier, rhs_commit = mpz(1), mpz(1)
    for k in range(SUBSETS):
        e, r = mpz(es[k]), rhos[k]
        rhs_paillier = rhs_paillier * powmod(proof.a[k] * powmod(products[k], e, n2) % n2, r, n2) % n2
        rhs_commit = rhs_commit * powmod(proof.a_aux[k] * powmod(proof.commitments[k], e, n) % n, r, n) % n
    lhs_paillier = (1 + (sum_z1 % n) * n) * djn.table(int(n)).pow(sum_z2) % n2
    if lhs_paillier != rhs_paillier:
        return False
    return powmod(h1, sum_z1, n) * powmod(h2, sum_z3, n) % n == rhs_commit



# --- the exact digits of one plaintext: the slot proof (issue 11 finding 5) ---------------
#
# The subset proof above bounds plaintexts, not slots, and no amortized argument over the
# packed ciphertexts can bound a slot tightly (docs/crypto-contribution.md, "Per-slot
# bounds"). This proof is exact but costs about 2 commitments per bit, so it is for one
# plaintext at a time: the blame step after a SlotOverflow, where every contributor of the
# round proves that the overflowing slot of the overflowing plaintext was in range.
#
# Statement, for a ciphertext c, slot width w, code bits b and a slot index i: the prover
# knows integers d_0..d_i in [0, 2^b), an integer H and rho with
#     c = (1 + (V + X^(i+1)·H)·n)·h_n^rho mod n^2,  V = sum_l d_l·X^l,  X = 2^w
# (H = 0 when `top`: then the plaintext is V exactly, every digit of it in range).
#
# How: every bit beta of every d_l is committed, C = h1^beta·h2^r mod n, with the
# Damgard-Fujisaki product proof that C·h2^0 also opens to beta·beta: C = C^beta·h2^(r(1-beta)).
# Under strong RSA an opening is an integer and beta·beta = beta, so beta is 0 or 1 exactly,
# no tolerance. The verifier folds the bit commitments into D = prod C^(2^(l·w + t)), a
# commitment to V, and one sigma protocol shows that D's V, a committed integer H and rho
# make c. Sizes: |X^(i+1)·H| < 2^(P + T + KAPPA + 1) and |m'| < 2^(P + S - 1) (the subset
# proof) are both below n/4, so the congruence mod n that the Paillier equation gives is an
# equality of integers: m' = V + X^(i+1)·H, and the low i+1 base-X digits of m' are the d_l.

SLOT_DOMAIN = b"sealmesh/slot-range/v1"
SLOT_FIELDS = ("bits", "bit_a", "bit_a2", "bit_z", "bit_zr", "bit_zr2", "high", "link_a", "link_z")
_MAX_SLOT_BITS = 1 << 12  # 4096 committed bits: 128 slots of 32 code bits


@dataclass(frozen=True)
class SlotLayout:
    """What the slot proof needs of a packing layout (crypto/packing.PackingLayout)."""

    slot_bits: int  # w
    quant_bits: int  # b
    plaintext_bits: int  # P
    slots: int  # k


@dataclass(frozen=True)
class SlotRangeProof:
    bits: tuple[int, ...]  # C_{l,t} = h1^beta·h2^r mod n, slot-major, bit t of slot l
    bit_a: tuple[int, ...]  # h1^u·h2^v mod n
    bit_a2: tuple[int, ...]  # C^u·h2^v' mod n
    bit_z: tuple[int, ...]  # u + e·beta
    bit_zr: tuple[int, ...]  # v + e·r
    bit_zr2: tuple[int, ...]  # v' + e·r·(1 - beta)
    high: int  # E = h1^H·h2^r_H mod n (1 when top)
    link_a: tuple[int, int, int]  # h1^x_V·h2^x_R mod n, h1^x_H·h2^x_rH mod n, (1 + (x_V + X^(i+1)·x_H)·n)·h_n^x_rho
    link_z: tuple[int, int, int, int, int]  # z_V, z_R, z_H, z_rH, z_rho

    def to_wire(self) -> dict[str, list[bytes]]:
        return {name: [_to_bytes(v) for v in _as_tuple(getattr(self, name))] for name in SLOT_FIELDS}

    @classmethod
    def from_wire(cls, obj: object) -> "SlotRangeProof":
        if not isinstance(obj, dict) or set(obj) != set(SLOT_FIELDS):
            raise ValueError(f"a slot range proof is a map with exactly {SLOT_FIELDS}")
        lengths = {"high": 1, "link_a": 3, "link_z": 5}
        values = {}
        for name in SLOT_FIELDS:
            items = obj[name]
            if not isinstance(items, list) or not all(isinstance(b, bytes) and len(b) <= 1024 for b in items):
                raise ValueError(f"{name}: expected a list of byte strings of at most 1024 bytes")
            if len(items) != lengths.get(name, len(obj["bits"])) or len(items) > _MAX_SLOT_BITS:
                raise ValueError(f"{name}: wrong number of entries")
            values[name] = tuple(int.from_bytes(b, "big") for b in items)
        values["high"] = values["high"][0]
        return cls(**values)


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _slot_check(n: mpz, shape: SlotLayout, slot: int, top: bool) -> None:
    if not isinstance(slot, int) or not 0 <= slot < shape.slots:
        raise SubsetRangeError(f"slot must be in 0..{shape.slots - 1}, got {slot!r}")
    if (slot + 1) * shape.quant_bits > _MAX_SLOT_BITS or shape.quant_bits >= shape.slot_bits:
        raise SubsetRangeError("the layout's slots are too many or too narrow for a slot proof")
    if shape.plaintext_bits + proofs.T + proofs.KAPPA + 1 >= n.bit_length() - 2:
        raise SubsetRangeError("plaintext_bits + T + KAPPA must stay below bits(n) - 3")
    if top and slot != shape.slots - 1:
        raise SubsetRangeError("`top` proves the whole plaintext: slot must be the last one")


def _randomness_bits(n: mpz) -> int:
    return n.bit_length() + proofs.KAPPA  # h2^r statistically hides h1^beta


def _high_bits(shape: SlotLayout, slot: int) -> int:
    return max(shape.plaintext_bits - (slot + 1) * shape.slot_bits, 1)


def _mask(bits: int) -> mpz:
    return mpz(secrets.randbits(bits + proofs.T + proofs.KAPPA))


def _z_max(bits: int) -> int:
    return 1 << (bits + proofs.T + proofs.KAPPA + 1)


@functools.lru_cache(maxsize=2)  # ~20 MB at 2048 bits
def _h2_table(n: mpz) -> FixedBase:
    return FixedBase(proofs._generators(n)[1], n, _randomness_bits(n) + proofs.T + proofs.KAPPA + 1)


def _commit(n: mpz, value: int, randomness: int) -> mpz:
    return proofs._h1_pow(n, value) * _h2_table(n).pow(randomness) % n


def _fold(n: mpz, commitments: Sequence[int], shape: SlotLayout, slots: int) -> mpz:
    """prod C_{l,t}^(2^(l·w + t)): a commitment to V = sum d_l·X^l (Horner, high bits first)."""
    b = shape.quant_bits
    acc = mpz(1)
    for l in reversed(range(slots)):
        acc = powmod(acc, 1 << (shape.slot_bits - b), n) if l < slots - 1 else acc
        for t in reversed(range(b)):
            acc = acc * acc % n * mpz(commitments[l * b + t]) % n
    return acc


def _slot_challenge(n, c, shape, slot, top, context, proof_parts) -> mpz:
    h = hashlib.shake_256(SLOT_DOMAIN + b"/challenge")
    head = (bytes(context), _to_bytes(n), _to_bytes(c), _to_bytes(shape.slot_bits), _to_bytes(shape.quant_bits),
            _to_bytes(shape.plaintext_bits), _to_bytes(shape.slots), _to_bytes(slot), bytes([top]))
    for part in head:
        h.update(len(part).to_bytes(4, "big") + part)
    for value in proof_parts:
        b = _to_bytes(value)
        h.update(len(b).to_bytes(4, "big") + b)
    return mpz(int.from_bytes(h.digest(proofs.T // 8), "big"))


def _first_messages(bits, bit_a, bit_a2, high, link_a):
    return itertools.chain(bits, bit_a, bit_a2, (high,), link_a)


def prove_slots(n: int, c: int, m: int, rho: int, shape: SlotLayout, slot: int, context: bytes,
                *, top: bool = False) -> SlotRangeProof:
    """Proof that digits 0..slot of c's plaintext m (base 2^w) are in [0, 2^b); refuses otherwise."""
    n, m, rho = mpz(n), mpz(m), mpz(rho)
    _slot_check(n, shape, slot, top)
    w, b = shape.slot_bits, shape.quant_bits
    digits = [int(m >> (l * w)) & ((1 << w) - 1) for l in range(slot + 1)]
    high = m >> ((slot + 1) * w)
    for l, d in enumerate(digits):
        if d >= 1 << b:
            raise SubsetRangeError(f"slot {l} holds {d}, outside [0, 2^{b}): refusing to prove")
    if top and high:
        raise SubsetRangeError("the plaintext has digits above its last slot: refusing to prove")
    if not 0 <= m < 1 << shape.plaintext_bits:
        raise SubsetRangeError("the plaintext is outside [0, 2^plaintext_bits): refusing to prove")
    rb = _randomness_bits(n)
    betas = [(d >> t) & 1 for d in digits for t in range(b)]
    rs = [mpz(secrets.randbits(rb)) for _ in betas]
    us = [_mask(1) for _ in betas]
    vs = [_mask(rb) for _ in betas]
    v2s = [_mask(rb) for _ in betas]
    bits = [_commit(n, beta, r) for beta, r in zip(betas, rs)]
    bit_a = [_commit(n, u, v) for u, v in zip(us, vs)]
    h2 = _h2_table(n)
    bit_a2 = [powmod(C, u, n) * h2.pow(v2) % n for C, u, v2 in zip(bits, us, v2s)]

    value = sum((mpz(d) << (l * w) for l, d in enumerate(digits)), mpz(0))
    big_r = sum((r << (i // b * w + i % b) for i, r in enumerate(rs)), mpz(0))
    hb, x_bits = _high_bits(shape, slot), (slot + 1) * w
    r_high = mpz(0) if top else mpz(secrets.randbits(rb))
    big_e = mpz(1) if top else _commit(n, high, r_high)
    x_v, x_r = _mask(x_bits), _mask(rb + x_bits)
    x_h, x_rh = (mpz(0), mpz(0)) if top else (_mask(hb), _mask(rb))
    x_rho = _mask(djn.exponent_bits(n))
    shift = mpz(1) << ((slot + 1) * w)
    link_a = (_commit(n, x_v, x_r), mpz(1) if top else _commit(n, x_h, x_rh),
              (1 + (x_v + shift * x_h) % n * n) * djn.table(int(n)).pow(x_rho) % (n * n))
    e = _slot_challenge(n, c, shape, slot, top, context, _first_messages(bits, bit_a, bit_a2, big_e, link_a))
    return SlotRangeProof(
        bits=tuple(int(x) for x in bits), bit_a=tuple(int(x) for x in bit_a), bit_a2=tuple(int(x) for x in bit_a2),
        bit_z=tuple(int(u + e * beta) for u, beta in zip(us, betas)),
        bit_zr=tuple(int(v + e * r) for v, r in zip(vs, rs)),
        bit_zr2=tuple(int(v2 + e * r * (1 - beta)) for v2, r, beta in zip(v2s, rs, betas)),
        high=int(big_e), link_a=tuple(int(x) for x in link_a),
        link_z=(int(x_v + e * value), int(x_r + e * big_r), int(x_h + e * high), int(x_rh + e * r_high),
                int(x_rho + e * rho)),
    )


def _units_mod(values: Sequence[int], modulus: mpz, n: mpz) -> bool:
    return all(0 < v < modulus and gmpy2.gcd(v, n) == 1 for v in values)


def _bits_hold(n: mpz, proof: SlotRangeProof, e: mpz) -> bool:
    """Every bit's two equations, batched with Bellare-Garay-Rabin small exponents:

        h1^z·h2^zr = a·C^e         (C opens to beta)
        C^z·h2^zr2 = a2·C^e        (... and to beta·beta)

    raised to random odd rho, rho' and multiplied: one h1 and one h2 exponentiation in all,
    and per bit a^rho·a2^rho'·C^(e·(rho + rho') - rho'·z). A false equation passes w.p.
    <= 2^-64 up to a factor of order 2, as in the subset proof.
    """
    rhos = [mpz(secrets.randbits(proofs.BATCH_RHO_BITS) | 1) for _ in range(2 * len(proof.bits))]
    sum_z = sum_h2 = mpz(0)
    rhs = mpz(1)
    for k, (C, a, a2, z, zr, zr2) in enumerate(zip(proof.bits, proof.bit_a, proof.bit_a2, proof.bit_z,
                                                   proof.bit_zr, proof.bit_zr2)):
        r1, r2 = rhos[2 * k], rhos[2 * k + 1]
        sum_z += r1 * z
        sum_h2 += r1 * zr + r2 * zr2
        rhs = rhs * powmod(a, r1, n) % n * powmod(a2, r2, n) % n * powmod(C, e * (r1 + r2) - r2 * z, n) % n
    return proofs._h1_pow(n, sum_z) * powmod(proofs._generators(n)[1], sum_h2, n) % n == rhs


def verify_slots(n: int, c: int, proof: SlotRangeProof, shape: SlotLayout, slot: int, context: bytes,
                 *, top: bool = False) -> bool:
    """True iff the proof shows digits 0..slot of c's plaintext in [0, 2^b) (and none above, if top)."""
    n = mpz(n)
    _slot_check(n, shape, slot, top)
    n2, b, count = n * n, shape.quant_bits, (slot + 1) * shape.quant_bits
    rb, hb, x_bits = _randomness_bits(n), _high_bits(shape, slot), (slot + 1) * shape.slot_bits
    per_bit = (proof.bits, proof.bit_a, proof.bit_a2, proof.bit_z, proof.bit_zr, proof.bit_zr2)
    if any(len(values) != count for values in per_bit) or len(proof.link_a) != 3 or len(proof.link_z) != 5:
        return False
    if not (0 < c < n2 and gmpy2.gcd(c, n) == 1):
        return False
    if not _units_mod(proof.bits + proof.bit_a + proof.bit_a2 + proof.link_a[:2] + (proof.high,), n, n):
        return False
    if not _units_mod(proof.link_a[2:], n2, n):
        return False
    z_v, z_r, z_h, z_rh, z_rho = (mpz(z) for z in proof.link_z)
    in_range = (all(0 <= z < _z_max(1) for z in proof.bit_z)
                and all(0 <= z < _z_max(rb) for z in proof.bit_zr + proof.bit_zr2)
                and 0 <= z_v < _z_max(x_bits) and 0 <= z_r < _z_max(rb + x_bits)
                and 0 <= z_h < _z_max(hb) and 0 <= z_rh < _z_max(rb) and 0 <= z_rho < _z_max(djn.exponent_bits(n)))
    if not in_range:
        return False
    if top and not (proof.high == 1 and proof.link_a[1] == 1 and z_h == 0 and z_rh == 0):
        return False
    e = _slot_challenge(n, c, shape, slot, top, context,
                        _first_messages(proof.bits, proof.bit_a, proof.bit_a2, proof.high, proof.link_a))
    if not _bits_hold(n, proof, e):
        return False
    d = _fold(n, proof.bits, shape, slot + 1)
    a_d, a_e, a_c = (mpz(x) for x in proof.link_a)
    if proofs._h1_pow(n, z_v) * powmod(proofs._generators(n)[1], z_r, n) % n != a_d * powmod(d, e, n) % n:
        return False
    if not top and _commit(n, z_h, z_rh) != a_e * powmod(mpz(proof.high), e, n) % n:
        return False
    shift = mpz(1) << ((slot + 1) * shape.slot_bits)
    lhs = (1 + (z_v + shift * z_h) % n * n) * djn.table(int(n)).pow(z_rho) % n2
    return lhs == a_c * powmod(mpz(c), e, n2) % n2
