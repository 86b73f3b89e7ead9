"""Zero-knowledge proofs for Paillier ciphertexts (g = n + 1) and threshold decryption shares.

Non-interactive sigma protocols (Fiat–Shamir with SHAKE-256, domain separated by a caller-
chosen context):

- plaintext knowledge: c = (1 + m·n)·r^n mod n^2 and the prover knows m and r;
- range: the same, plus m ≡ m' (mod n) for an integer |m'| < 2^(bound_bits + T + KAPPA)
  (interval proof with tolerance, Cramer–Damgård–Schoenmakers / Lipmaa). The response z1
  is over the integers, and m is also committed in Z*_n with generators of hidden order
  (Damgård–Fujisaki integer commitment): without that commitment the (1 + n) part of the
  ciphertext has known order n, so a prover could pass with m = 1/2 mod n (a value near n/2)
  by grinding for an even challenge;
- decryption share: Shoup's equality of discrete logs ("Practical threshold signatures",
  Eurocrypt 2000) over Z*_{n^2}, with the exponent not reduced modulo the unknown order;
- many decryption shares at once: the same proof on a random linear combination of the
  ciphertexts and shares, with coefficients hashed from the whole statement.

Range proofs split into an offline part (precompute_range: everything independent of m, r
and the challenge) and a cheap online part, so a contributor can prepare masks ahead of time.

Pure library: plain ints in, frozen dataclasses out, no I/O, no clocks. Statements,
parameters and costs: docs/crypto-proofs.md.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Sequence

import gmpy2
from gmpy2 import mpz, powmod

KAPPA = 128  # statistical hiding of every masked secret, in bits
T = 128  # challenge length: a forger needs ~2^T hash evaluations (Fiat–Shamir grinding)
BATCH_RHO_BITS = 64  # small-exponent batch test: a bad proof slips through w.p. <= 2^-64
# Decryption-share exponents are Δ·s_i with s_i < n^2 and Δ = l!; this headroom covers
# l! <= 2^1024 (up to 170 parties) while the mask length stays fixed, so z leaks no size.
MAX_EXPONENT_EXCESS_BITS = 1024

PURPOSE_PLAINTEXT_KNOWLEDGE = "plaintext-knowledge"
PURPOSE_RANGE = "plaintext-range"
PURPOSE_DECRYPTION_SHARE = "decryption-share"

_DOMAIN = b"sealmesh/proofs/v1"
_CONTEXT_TAG = b"sealmesh/proof-context/v1"


def slack_bits() -> int:
    """Headroom a range proof needs above bound_bits: honest m < 2^b, accepted |m'| < 2^(b+slack-1)."""
    return T + KAPPA + 1


# --- encoding -----------------------------------------------------------------------------


def _int_to_bytes(x: int) -> bytes:
    x = int(x)
    if x < 0:
        raise ValueError("only non-negative integers are encoded")
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


def _bytes_to_int(data: Any) -> int:
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"expected bytes, got {type(data).__name__}")
    return int.from_bytes(data, "big")


def _frame(data: bytes) -> bytes:
    # Length prefixes make the concatenation unambiguous (no field can bleed into the next).
    return len(data).to_bytes(4, "big") + data


class _IntRecord:
    """to_dict/from_dict for frozen dataclasses whose fields are all non-negative ints."""

    def to_dict(self) -> dict[str, bytes]:
        return {f.name: _int_to_bytes(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"{cls.__name__} needs exactly the fields {sorted(names)}")
        return cls(**{name: _bytes_to_int(data[name]) for name in names})


@dataclass(frozen=True)
class ProofContext:
    """What a proof is about, bound into its challenge so it cannot be replayed elsewhere."""

    public_n: int
    mesh_id: str
    round_id: int
    sender: str  # hotkey (SS58) of the prover
    index: int  # ciphertext index or party index
    purpose: str  # one of the PURPOSE_* labels

    def __post_init__(self) -> None:
        for name in ("public_n", "round_id", "index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int")
        for name in ("mesh_id", "sender", "purpose"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str")

    def encode(self) -> bytes:
        parts = (
            _CONTEXT_TAG,
            self.purpose.encode(),
            _int_to_bytes(self.public_n),
            self.mesh_id.encode(),
            _int_to_bytes(self.round_id),
            self.sender.encode(),
            _int_to_bytes(self.index),
        )
        return b"".join(_frame(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "public_n": _int_to_bytes(self.public_n),
            "mesh_id": self.mesh_id,
            "round_id": self.round_id,
            "sender": self.sender,
            "index": self.index,
            "purpose": self.purpose,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ProofContext":
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise ValueError("malformed ProofContext")
        return cls(**{**data, "public_n": _bytes_to_int(data["public_n"])})


# --- shared helpers ---------------------------------------------------------------------


def _challenge(kind: bytes, context: bytes, *values: int) -> int:
    if not isinstance(context, (bytes, bytearray)):
        raise TypeError("context must be bytes (ProofContext.encode())")
    h = hashlib.shake_256()
    for part in (_DOMAIN, kind, bytes(context)):
        h.update(_frame(part))
    for value in values:
        h.update(_frame(_int_to_bytes(value)))
    return int.from_bytes(h.digest(T // 8), "big")


def _check_modulus(n: int) -> mpz:
    if not isinstance(n, (int, type(mpz(0)))):
        raise TypeError("n must be an int")
    if n < 15 or n % 2 == 0:
        raise ValueError("n must be an odd composite modulus")
    return mpz(n)


def _is_unit(x: int, modulus: mpz, n: mpz) -> bool:
    return 0 < x < modulus and gmpy2.gcd(x, n) == 1


def _random_unit(n: mpz) -> mpz:
    while True:
        x = mpz(secrets.randbelow(n))
        if x > 0 and gmpy2.gcd(x, n) == 1:
            return x


def _paillier_lhs(n: mpz, n2: mpz, z1: int, z2: int) -> mpz:
    # (1 + n)^z1 = 1 + z1·n mod n^2, so no exponentiation is needed for the message part.
    return (1 + mpz(z1) * n) * powmod(z2, n, n2) % n2


# --- plaintext knowledge ----------------------------------------------------------------


@dataclass(frozen=True)
class PlaintextKnowledgeProof(_IntRecord):
    a: int  # (1 + x·n)·s^n mod n^2
    z1: int  # x + e·m mod n
    z2: int  # s·r^e mod n


def prove_plaintext_knowledge(n: int, c: int, m: int, r: int, context: bytes) -> PlaintextKnowledgeProof:
    """Proof that the caller knows m, r with c = (1 + m·n)·r^n mod n^2."""
    n = _check_modulus(n)
    n2 = n * n
    x, s = mpz(secrets.randbelow(n)), _random_unit(n)
    a = (1 + x * n) * powmod(s, n, n2) % n2
    e = _challenge(b"plaintext-knowledge", context, n, c, a)
    z1 = (x + e * mpz(m)) % n
    z2 = s * powmod(r, e, n) % n
    return PlaintextKnowledgeProof(a=int(a), z1=int(z1), z2=int(z2))


def verify_plaintext_knowledge(n: int, c: int, proof: PlaintextKnowledgeProof, context: bytes) -> bool:
    n = _check_modulus(n)
    n2 = n * n
    if not (_is_unit(c, n2, n) and _is_unit(proof.a, n2, n) and _is_unit(proof.z2, n, n)):
        return False
    if not 0 <= proof.z1 < n:
        return False
    e = _challenge(b"plaintext-knowledge", context, n, c, proof.a)
    return _paillier_lhs(n, n2, proof.z1, proof.z2) == proof.a * powmod(c, e, n2) % n2


# --- range (interval proof with tolerance) ----------------------------------------------


@lru_cache(maxsize=32)
def _generators(n: mpz) -> tuple[mpz, mpz]:
    """Two hashed elements of Z*_n, Jacobi symbol +1, with unknown roots and mutual logs.

    Hashed, not squared: a public square root of h1 would let a prover commit to 1/2. The
    Jacobi filter stops the one character anyone can compute from leaking m's parity.
    """
    found: list[mpz] = []
    counter = 0
    while len(found) < 2:
        seed = _frame(_DOMAIN + b"/generator") + _frame(_int_to_bytes(n)) + counter.to_bytes(4, "big")
        digest = hashlib.shake_256(seed).digest((n.bit_length() + KAPPA + 7) // 8)
        g = mpz(int.from_bytes(digest, "big")) % n
        counter += 1
        if 1 < g < n - 1 and gmpy2.gcd(g, n) == 1 and gmpy2.jacobi(g, n) == 1:
            found.append(g)
    return found[0], found[1]


@dataclass(frozen=True)
class RangeProof(_IntRecord):
    commitment: int  # h1^m·h2^mu mod n: integer commitment to m
    a: int  # (1 + x·n)·s^n mod n^2
    a_aux: int  # h1^x·h2^y mod n
    z1: int  # x + e·m over the integers, must lie in [0, 2^(bound_bits + T + KAPPA))
    z2: int  # s·r^e mod n
    z3: int  # y + e·mu over the integers


def _check_range_params(n: mpz, bound_bits: int) -> None:
    if not isinstance(bound_bits, int) or bound_bits < 1:
        raise ValueError("bound_bits must be a positive int")
    # Keeps the accepted interval (-2^(b+slack-1), 2^(b+slack-1)) far below n: no wrap mod n.
    if bound_bits + slack_bits() >= n.bit_length() - 2:
        raise ValueError(f"bound_bits + slack_bits() = {bound_bits + slack_bits()} must be < bits(n) - 2")


def _z1_bits(bound_bits: int) -> int:
    return bound_bits + T + KAPPA


def _mu_bits(n: mpz) -> int:
    return n.bit_length() + KAPPA


def _range_challenge(n: mpz, c: int, bound_bits: int, commitment: int, a: int, a_aux: int, context: bytes) -> int:
    return _challenge(b"plaintext-range", context, n, c, bound_bits, commitment, a, a_aux)


# Fixed-base exponentiation for h1: one row per byte of the exponent, row i holding
# h1^(d·256^i) for d in 0..255, so h1^m costs one multiplication mod n per non-zero byte of m
# (~224 for a 1785-bit m) instead of ~2000 squarings. Window 8 is the largest whose table stays
# under ~20 MB at 2048 bits (224 rows × 255 entries × ~300 B ≈ 17 MB); window 8 also lets the
# digits come straight from int.to_bytes, with no shifting and masking in the Python loop.
_FIXED_BASE_WINDOW = 8


def _fixed_base_bits(n: mpz) -> int:
    # Every m prove_range accepts is below 2^bound_bits <= 2^(bits(n) - 3 - slack_bits()).
    return max(n.bit_length() - 3 - slack_bits(), 8)


@lru_cache(maxsize=2)  # ~17 MB each at 2048 bits; a process normally serves one modulus
def _h1_table(n: mpz) -> tuple[tuple[mpz, ...], ...]:
    h1 = _generators(n)[0]
    rows = []
    base = h1
    for _ in range((_fixed_base_bits(n) + _FIXED_BASE_WINDOW - 1) // _FIXED_BASE_WINDOW):
        row = [mpz(1)]
        acc = mpz(1)
        for _ in range(1, 1 << _FIXED_BASE_WINDOW):
            acc = acc * base % n
            row.append(acc)
        rows.append(tuple(row))
        base = acc * base % n  # base^256: the next byte's weight
    return tuple(rows)


def _h1_pow(n: mpz, exponent: int) -> mpz:
    """h1^exponent mod n, through the fixed-base table when the exponent fits in it."""
    rows = _h1_table(n)
    if exponent < 0 or exponent.bit_length() > len(rows) * _FIXED_BASE_WINDOW:
        return powmod(_generators(n)[0], exponent, n)
    acc = mpz(1)
    for row, digit in zip(rows, int(exponent).to_bytes(len(rows), "little")):
        if digit:
            acc = acc * row[digit] % n
    return acc


@dataclass(frozen=True)
class RangePrecomputation:
    """Everything in a range proof that depends on neither m, r nor the challenge.

    USE EACH ONCE. Two proofs from one precomputation share x, s and y, so their responses
    give (e − e')·m = z1 − z1' and r^(e − e') = z2/z2': the plaintext leaks outright. It holds
    secrets: keep it in memory, never serialise or log it (repr is suppressed for that reason).
    """

    n: int
    bound_bits: int
    x: int = field(repr=False)  # mask of m, in [0, 2^(bound_bits + T + KAPPA))
    y: int = field(repr=False)  # mask of mu, in [0, 2^(bits(n) + KAPPA + T + KAPPA))
    mu: int = field(repr=False)  # commitment randomness, in [0, 2^(bits(n) + KAPPA))
    s: int = field(repr=False)  # unit of Z*_n
    a: int = field(repr=False)  # (1 + x·n)·s^n mod n^2
    a_aux: int = field(repr=False)  # h1^x·h2^y mod n
    h2_mu: int = field(repr=False)  # h2^mu mod n


def precompute_range(n: int, bound_bits: int) -> RangePrecomputation:
    """The offline part of prove_range (s^n mod n^2 and three long exponentiations mod n)."""
    n = _check_modulus(n)
    _check_range_params(n, bound_bits)
    h2 = _generators(n)[1]
    x = mpz(secrets.randbits(_z1_bits(bound_bits)))
    y = mpz(secrets.randbits(_mu_bits(n) + T + KAPPA))
    mu = mpz(secrets.randbits(_mu_bits(n)))
    s = _random_unit(n)
    n2 = n * n
    a = (1 + x * n) * powmod(s, n, n2) % n2
    a_aux = _h1_pow(n, x) * powmod(h2, y, n) % n
    return RangePrecomputation(
        int(n), bound_bits, int(x), int(y), int(mu), int(s), int(a), int(a_aux), int(powmod(h2, mu, n))
    )


def prove_range(
    n: int,
    c: int,
    m: int,
    r: int,
    bound_bits: int,
    context: bytes,
    *,
    precomputed: RangePrecomputation | None = None,
) -> RangeProof:
    """Proof that c = (1 + m·n)·r^n with the caller knowing m, r and 0 <= m < 2^bound_bits.

    The verifier learns only |m'| < 2^(bound_bits + slack_bits() - 1) for some m' ≡ m mod n.
    With `precomputed` (from precompute_range(n, bound_bits), used for this proof only) the
    work left is h1^m from the fixed-base table, one hash, r^e mod n with a 128-bit e, and
    integer arithmetic.
    """
    n = _check_modulus(n)
    _check_range_params(n, bound_bits)
    if not 0 <= m < 1 << bound_bits:
        raise ValueError("m is outside [0, 2^bound_bits): refusing to prove")
    if precomputed is None:
        precomputed = precompute_range(n, bound_bits)
    elif precomputed.n != n or precomputed.bound_bits != bound_bits:
        raise ValueError("precomputation was made for another n or bound_bits")
    pre = precomputed
    commitment = _h1_pow(n, m) * pre.h2_mu % n
    e = _range_challenge(n, c, bound_bits, commitment, pre.a, pre.a_aux, context)
    z1 = pre.x + e * mpz(m)
    if z1 >= 1 << _z1_bits(bound_bits):
        # Happens w.p. < 2^-KAPPA. Retrying with fresh masks keeps honest proofs inside the
        # verifier's bound; the failed masks were never published, so nothing leaks.
        return prove_range(n, c, m, r, bound_bits, context)
    z2 = pre.s * powmod(r, e, n) % n
    return RangeProof(int(commitment), pre.a, pre.a_aux, int(z1), int(z2), int(pre.y + e * mpz(pre.mu)))


def _range_precheck(n: mpz, c: int, proof: RangeProof, bound_bits: int, context: bytes) -> int | None:
    """The challenge if every cheap (no exponentiation) check passes, else None."""
    n2 = n * n
    units = (c, n2), (proof.a, n2), (proof.z2, n), (proof.commitment, n), (proof.a_aux, n)
    if not all(_is_unit(x, modulus, n) for x, modulus in units):
        return None
    if not 0 <= proof.z1 < 1 << _z1_bits(bound_bits):
        return None
    if not 0 <= proof.z3 < 1 << (_mu_bits(n) + T + KAPPA + 1):
        return None
    return _range_challenge(n, c, bound_bits, proof.commitment, proof.a, proof.a_aux, context)


def verify_range(n: int, c: int, proof: RangeProof, bound_bits: int, context: bytes) -> bool:
    n = _check_modulus(n)
    _check_range_params(n, bound_bits)
    e = _range_precheck(n, c, proof, bound_bits, context)
    if e is None:
        return False
    n2, (h1, h2) = n * n, _generators(n)
    if _paillier_lhs(n, n2, proof.z1, proof.z2) != proof.a * powmod(c, e, n2) % n2:
        return False
    lhs = powmod(h1, proof.z1, n) * powmod(h2, proof.z3, n) % n
    return lhs == proof.a_aux * powmod(proof.commitment, e, n) % n


def verify_range_batch(
    n: int, cs: Sequence[int], proofs: Sequence[RangeProof], bound_bits: int, contexts: Sequence[bytes]
) -> bool:
    """All proofs at once: small-exponent batch test (Bellare–Garay–Rabin, Eurocrypt 1998).

    Each equation is raised to a secret random 64-bit rho_j and the products compared, so the
    expensive z2^n and h1^z1·h2^z3 are computed once for the whole batch. False says only that
    some proof is bad; verify_range one by one to find which.
    """
    if not len(cs) == len(proofs) == len(contexts):
        raise ValueError("cs, proofs and contexts must have the same length")
    n = _check_modulus(n)
    _check_range_params(n, bound_bits)
    n2, (h1, h2) = n * n, _generators(n)
    sum_z1, sum_z3 = mpz(0), mpz(0)
    prod_z2, rhs_paillier, rhs_aux = mpz(1), mpz(1), mpz(1)
    for c, proof, context in zip(cs, proofs, contexts):
        e = _range_precheck(n, c, proof, bound_bits, context)
        if e is None:
            return False
        rho = mpz(secrets.randbelow((1 << BATCH_RHO_BITS) - 1) + 1)
        sum_z1 += rho * proof.z1
        sum_z3 += rho * proof.z3
        # z2^n mod n^2 depends only on z2 mod n, so the z2 product can stay mod n.
        prod_z2 = prod_z2 * powmod(proof.z2, rho, n) % n
        rhs_paillier = rhs_paillier * powmod(proof.a, rho, n2) * powmod(c, rho * e, n2) % n2
        rhs_aux = rhs_aux * powmod(proof.a_aux, rho, n) * powmod(proof.commitment, rho * e, n) % n
    if (1 + sum_z1 * n) * powmod(prod_z2, n, n2) % n2 != rhs_paillier:
        return False
    return powmod(h1, sum_z1, n) * powmod(h2, sum_z3, n) % n == rhs_aux


# --- decryption share (Shoup's equality of discrete logs) -------------------------------


@dataclass(frozen=True)
class DecryptionShareProof(_IntRecord):
    a: int  # (c^4)^w mod n^2
    b: int  # v^w mod n^2
    z: int  # w + e·exponent over the integers


def _share_mask_bits(n: mpz) -> int:
    return (n * n).bit_length() + MAX_EXPONENT_EXCESS_BITS + T + KAPPA


def _share_challenge(n: mpz, v: int, v_i: int, c: int, c_i: int, a: int, b: int, context: bytes) -> int:
    return _challenge(b"decryption-share", context, n, v, v_i, c, c_i, a, b)


def prove_decryption_share(
    n: int, v: int, v_i: int, c: int, c_i: int, exponent: int, context: bytes
) -> DecryptionShareProof:
    """Proof that log_{c^4}(c_i^2) = log_v(v_i) (= exponent = Δ·s_i, kept secret)."""
    n = _check_modulus(n)
    if exponent < 0 or exponent.bit_length() > (n * n).bit_length() + MAX_EXPONENT_EXCESS_BITS:
        raise ValueError("exponent must be in [0, 2^(bits(n^2) + MAX_EXPONENT_EXCESS_BITS))")
    n2 = n * n
    w = mpz(secrets.randbits(_share_mask_bits(n)))
    a = powmod(powmod(c, 4, n2), w, n2)
    b = powmod(v, w, n2)
    e = _share_challenge(n, v, v_i, c, c_i, a, b, context)
    return DecryptionShareProof(a=int(a), b=int(b), z=int(w + e * mpz(exponent)))


def verify_decryption_share(
    n: int, v: int, v_i: int, c: int, c_i: int, proof: DecryptionShareProof, context: bytes
) -> bool:
    n = _check_modulus(n)
    n2 = n * n
    if not all(_is_unit(x, n2, n) for x in (v, v_i, c, c_i, proof.a, proof.b)):
        return False
    if not 0 <= proof.z < 1 << (_share_mask_bits(n) + 1):
        return False
    e = _share_challenge(n, v, v_i, c, c_i, proof.a, proof.b, context)
    if powmod(powmod(c, 4, n2), proof.z, n2) != proof.a * powmod(c_i, 2 * e, n2) % n2:
        return False
    return powmod(v, proof.z, n2) == proof.b * powmod(v_i, e, n2) % n2


# --- batch of decryption shares (one proof for many ciphertexts) ------------------------

_BATCH_SHARE_KIND = b"decryption-share-batch"
_BATCH_SHARE_RHO_BITS = 128  # Fiat–Shamir coefficients: the prover can grind the hash, so 2^-64 would not do
_MULTI_POW_MIN = 64  # below this many bases, separate powmods beat the bucket method's fixed cost


def _batch_share_coefficients(
    n: mpz, v: int, v_i: int, cs: Sequence[int], c_is: Sequence[int], context: bytes
) -> tuple[bytes, list[int]]:
    """(statement digest, rho_j): hashed from the whole statement, so the verifier recomputes
    them and the prover must fix every share before learning any coefficient."""
    if not isinstance(context, (bytes, bytearray)):
        raise TypeError("context must be bytes (ProofContext.encode())")
    h = hashlib.shake_256()
    for part in (_DOMAIN, _BATCH_SHARE_KIND, bytes(context)):
        h.update(_frame(part))
    for value in (n, v, v_i, len(cs), *cs, *c_is):
        h.update(_frame(_int_to_bytes(value)))
    width = _BATCH_SHARE_RHO_BITS // 8
    out = h.digest(32 + width * len(cs))
    rhos = [int.from_bytes(out[32 + width * j : 32 + width * (j + 1)], "big") for j in range(len(cs))]
    return out[:32], rhos


def _multi_pow(bases: Sequence[int], exponents: Sequence[int], bits: int, modulus: mpz) -> mpz:
    """Π bases[j]^exponents[j] mod modulus for exponents below 2^bits.

    Bucket (Pippenger) method with 8-bit windows: per window one multiplication per base plus
    ~510 to fold the buckets, and the squarings are shared by all bases. For 1,000 bases and
    128-bit exponents that is ~24,000 multiplications against ~150,000 inside separate powmods.
    """
    if len(bases) < _MULTI_POW_MIN:
        acc = mpz(1)
        for b, e in zip(bases, exponents):
            acc = acc * powmod(b, e, modulus) % modulus
        return acc
    width = (bits + 7) // 8
    digits = [e.to_bytes(width, "big") for e in exponents]
    bases = [mpz(b) for b in bases]
    acc = mpz(1)
    for k in range(width):  # most significant byte first
        if acc != 1:
            for _ in range(8):
                acc = acc * acc % modulus
        buckets: list[mpz | None] = [None] * 256
        for b, d in zip(bases, digits):
            digit = d[k]
            if digit:
                held = buckets[digit]
                buckets[digit] = b if held is None else held * b % modulus
        # Σ_d d·bucket_d via running products: bucket_d is multiplied in d times.
        running, total = mpz(1), mpz(1)
        for digit in range(255, 0, -1):
            if buckets[digit] is not None:
                running = running * buckets[digit] % modulus
            if running != 1:
                total = total * running % modulus
        acc = acc * total % modulus
    return acc


def _batch_share_combine(
    n: mpz, v: int, v_i: int, cs: Sequence[int], c_is: Sequence[int], context: bytes,
    exponent: int | None = None,
) -> tuple[mpz, mpz, bytes]:
    """(C, C_i, inner context). The prover passes its `exponent`: its own c_is[j] are
    cs[j]^(2·exponent), so C_i = C^(2·exponent), one powmod instead of a second
    multi-exponentiation over every share. The verifier recomputes C_i from the shares."""
    digest, rhos = _batch_share_coefficients(n, v, v_i, cs, c_is, context)
    n2 = n * n
    big_c = _multi_pow(cs, rhos, _BATCH_SHARE_RHO_BITS, n2)
    if exponent is None:
        big_c_i = _multi_pow(c_is, rhos, _BATCH_SHARE_RHO_BITS, n2)
    else:
        big_c_i = powmod(big_c, 2 * exponent, n2)
    # The inner proof's challenge binds the whole batch (through the digest), not only C, C_i.
    inner = _frame(_DOMAIN + b"/" + _BATCH_SHARE_KIND) + _frame(bytes(context)) + _frame(digest)
    return big_c, big_c_i, inner


def prove_decryption_shares(
    n: int, v: int, v_i: int, cs: Sequence[int], c_is: Sequence[int], exponent: int, context: bytes
) -> DecryptionShareProof:
    """One proof that c_is[j] = cs[j]^(2·exponent) mod n^2 for every j and v_i = v^exponent.

    Shoup's proof on the random linear combination C = Π cs[j]^rho_j, C_i = Π c_is[j]^rho_j,
    with 128-bit rho_j derived by hashing the whole statement (Fiat–Shamir).
    """
    n = _check_modulus(n)
    if len(cs) != len(c_is):
        raise ValueError("cs and c_is must have the same length")
    if not cs:
        raise ValueError("nothing to prove: empty batch")
    big_c, big_c_i, inner = _batch_share_combine(n, v, v_i, cs, c_is, context, exponent)
    return prove_decryption_share(n, v, v_i, big_c, big_c_i, exponent, inner)


def verify_decryption_shares(
    n: int,
    v: int,
    v_i: int,
    cs: Sequence[int],
    c_is: Sequence[int],
    proof: DecryptionShareProof,
    context: bytes,
) -> bool:
    n = _check_modulus(n)
    if len(cs) != len(c_is) or not cs:
        return False
    n2 = n * n
    # Every element must be a unit: the combination could otherwise hide a non-unit share.
    # One gcd for all: a product mod n is a unit iff every factor is (a shared prime divides it).
    product = mpz(1)
    for x in (*cs, *c_is):
        if not 0 < x < n2:
            return False
        product = product * x % n
    if gmpy2.gcd(product, n) != 1:
        return False
    big_c, big_c_i, inner = _batch_share_combine(n, v, v_i, cs, c_is, context)
    return verify_decryption_share(n, v, v_i, big_c, big_c_i, proof, inner)
