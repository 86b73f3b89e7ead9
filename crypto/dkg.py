"""Dealer-free threshold Paillier: from TNO's distributed key to crypto.paillier shares.

TNO's protocol (tno.mpc.protocols.distributed_keygen, after Boneh–Franklin and Nishide–
Sakurai) leaves member i with F(i), F a degree-2t polynomial over the integers with
F(0) = Δ²·φ(N)·β (Δ = n!, β random), and a public θ = Δ³·φ(N)·β mod N. Decrypting with
those needs 2t+1 members, and TNO even fixes them to indices 1..2t+1.

This module turns that into a degree-t sharing in the form crypto/paillier.py uses, so
any t+1 members decrypt with our partial_decrypt / combine and Shoup-style proofs:

1. degree reduction (BGW): each member i of S = {1..2t+1} re-shares x_i = Δ·ℓ_i^S·F(i)
   with a degree-t integer Shamir polynomial H_i (H_i(0) = Δ·x_i, coefficients hiding
   x_i statistically); member j's new share is G(j) = Σ_i H_i(j), so G(0) = Δ⁴·φ·β =: E.
2. a public shift s_j = G(j) + K·j (K bounds |G|) makes every share non-negative without
   touching G(0): proofs and exponentiations want exponents >= 0.
3. E ≡ Δ·θ (mod N) is not 1, so `combine` returns E·m; `plaintext_scale` = E mod N is
   public and the wrappers here divide it out. (Scaling the shares by E^-1 mod N instead
   would add bits(N) to every share and break crypto/proofs.py's exponent bound at 2048.)

Everything is integers in, integers out: no sockets, no files, no TNO imports. The node's
ceremony runner (node/keygen.py) moves these values between members.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Mapping, Sequence

import gmpy2
import msgpack
from gmpy2 import mpz

from crypto import paillier
from crypto.paillier import (
    BatchPartialDecryption,
    KeyShare,
    PaillierError,
    PartialDecryption,
    PublicKey,
    VerificationKeys,
)
from crypto.proofs import MAX_EXPONENT_EXCESS_BITS
from crypto.errors import LocalProtocolError, RemoteProtocolError

# Statistical hiding of every integer sharing (TNO's and ours), in bits. TNO defaults to
# 40; 80 keeps shares within crypto/proofs.py's exponent headroom for committees up to ~25.
STAT_SEC_BITS = 80
MIN_PARTIES = 3  # t >= 1 and n >= 2t+1; t = 0 would hand every member φ(N)
WIRE_VERSION = 1


class DkgError(PaillierError):
    """Base of this module's errors; `reason` is a stable label for logs and metrics."""

    reason = "dkg"

    def __init__(self, hint: str, *, reason: str | None = None) -> None:
        super().__init__(hint)
        if reason is not None:
            self.reason = reason


class InvalidCeremony(DkgError, LocalProtocolError):
    """Parameters the ceremony cannot run with (our caller's mistake)."""

    reason = "parameters"


class BadPeerValue(DkgError, RemoteProtocolError):
    """A value a member sent that cannot be honest; `.member` names it."""

    reason = "bad_value"

    def __init__(self, member: int, hint: str, *, reason: str | None = None) -> None:
        super().__init__(f"member {member}: {hint}", reason=reason)
        self.member = member


class DkgDecodeError(DkgError, RemoteProtocolError):
    """Bytes that do not decode to a well-formed DKG key share."""

    reason = "decode"


# ---------------------------------------------------------------------------------------
# Parameters and public bounds


@dataclass(frozen=True)
class CeremonyParameters:
    """n_parties members; any `threshold` of them decrypt (TNO's corruption threshold is
    threshold - 1, and TNO needs n_parties >= 2·(threshold - 1) + 1)."""

    n_parties: int
    threshold: int
    bits: int
    stat_sec: int = STAT_SEC_BITS

    def __post_init__(self) -> None:
        for name in ("n_parties", "threshold", "bits", "stat_sec"):
            value = getattr(self, name)
            if type(value) is not int:
                raise InvalidCeremony(f"{name} must be an int, got {value!r}")
        if self.n_parties < MIN_PARTIES or self.n_parties > paillier.MAX_PARTIES:
            raise InvalidCeremony(
                f"a dealer-free ceremony needs {MIN_PARTIES}..{paillier.MAX_PARTIES} members, "
                f"got {self.n_parties}")
        if not 2 <= self.threshold or self.n_parties < 2 * self.threshold - 1:
            raise InvalidCeremony(
                f"threshold {self.threshold} with {self.n_parties} members: need "
                f"2 <= threshold <= (members + 1) / 2 (TNO requires n >= 2t+1, t = threshold-1)")
        if self.bits % 2 or not paillier.MIN_BITS <= self.bits <= paillier.MAX_BITS:
            raise InvalidCeremony(
                f"bits must be even and in [{paillier.MIN_BITS}, {paillier.MAX_BITS}]")
        if self.stat_sec < 40:
            raise InvalidCeremony("stat_sec below 40 bits hides nothing worth hiding")

    @property
    def corruption_threshold(self) -> int:
        return self.threshold - 1

    @property
    def delta(self) -> int:
        return math.factorial(self.n_parties)

    @property
    def reduction_set(self) -> tuple[int, ...]:
        """TNO indices whose degree-2t shares are re-shared: any 2t+1 would do; all members
        must agree, so it is the first ones."""
        return tuple(range(1, 2 * self.corruption_threshold + 2))


def _poly_growth(n_parties: int, degree: int) -> int:
    """Σ_{k=1..degree} x^k for x <= n_parties: how far random coefficients can push a value."""
    return sum(n_parties**k for k in range(1, degree + 1))


def tno_share_bound(params: CeremonyParameters, modulus: int) -> int:
    """Bound on |F(i)| for TNO's degree-2t sharing of λ·β (see the module docstring).

    Each member shares an additive part below N with TNO's IntegerShamir (constant Δ·part,
    coefficients in [-A, A], A = Δ²·2^κ·N); n such sharings are summed, for λ and for β.
    """
    delta, t = params.delta, params.corruption_threshold
    a = delta * delta * (1 << params.stat_sec) * modulus
    one = params.n_parties * (delta * modulus + a * _poly_growth(params.n_parties, t))
    return one * one


def _max_lagrange(params: CeremonyParameters) -> int:
    s = params.reduction_set
    return max(abs(paillier.lagrange_at_zero(i, s, params.delta)) for i in s)


def _coefficient_bound(params: CeremonyParameters, secret_bound: int) -> int:
    return params.delta * params.delta * (1 << params.stat_sec) * secret_bound


def sub_share_bound(params: CeremonyParameters, modulus: int) -> int:
    """Bound on |H_i(j)|, the re-shared piece member i sends member j."""
    x_bound = _max_lagrange(params) * tno_share_bound(params, modulus)
    growth = _poly_growth(params.n_parties, params.corruption_threshold)
    return params.delta * x_bound + _coefficient_bound(params, x_bound) * growth


def share_shift(params: CeremonyParameters, modulus: int) -> int:
    """K with |G(j)| <= K: s_j = G(j) + K·j is then in [0, (j+1)·K]."""
    return len(params.reduction_set) * sub_share_bound(params, modulus)


def max_share_bits(params: CeremonyParameters, modulus: int) -> int:
    return (share_shift(params, modulus) * (params.n_parties + 1)).bit_length()


def check_exponent_room(params: CeremonyParameters, modulus: int) -> None:
    """Refuse a committee whose shares would exceed crypto/proofs.py's exponent bound
    (Δ·s_i below 2^(bits(n^2) + MAX_EXPONENT_EXCESS_BITS)); better now than after hours."""
    need = params.delta.bit_length() + max_share_bits(params, modulus)
    room = (modulus * modulus).bit_length() + MAX_EXPONENT_EXCESS_BITS
    if need > room:
        raise InvalidCeremony(
            f"{params.n_parties} members make shares of {need} bits; the decryption-share "
            f"proofs take at most {room}: use fewer members or a lower stat_sec")


# ---------------------------------------------------------------------------------------
# Degree reduction


def _integer_shamir(secret: int, degree: int, points: Sequence[int], delta: int,
                    coefficient_bound: int) -> dict[int, int]:
    """{x: H(x)} for H(0) = Δ·secret and coefficients uniform in [-bound, bound]."""
    coeffs = [delta * secret] + [
        secrets.randbelow(2 * coefficient_bound + 1) - coefficient_bound for _ in range(degree)
    ]
    out = {}
    for x in points:
        acc = 0
        for a in reversed(coeffs):  # Horner
            acc = acc * x + a
        out[x] = acc
    return out


def deal_sub_shares(params: CeremonyParameters, modulus: int, tno_index: int,
                    tno_share: int) -> dict[int, int]:
    """Member with TNO index `tno_index` (in the reduction set): {member j: H_i(j)} for every
    member j = 1..n (its own included)."""
    if tno_index not in params.reduction_set:
        raise InvalidCeremony(f"TNO index {tno_index} is not in the reduction set")
    bound = tno_share_bound(params, modulus)
    if abs(tno_share) > bound:
        raise InvalidCeremony("TNO share exceeds its bound: wrong parameters or modulus")
    x = paillier.lagrange_at_zero(tno_index, params.reduction_set, params.delta) * tno_share
    x_bound = _max_lagrange(params) * bound
    return _integer_shamir(
        x, params.corruption_threshold, range(1, params.n_parties + 1), params.delta,
        _coefficient_bound(params, x_bound))


def combine_sub_shares(params: CeremonyParameters, modulus: int, member_index: int,
                       sub_shares: Mapping[int, int]) -> int:
    """This member's share s_j = Σ_i H_i(j) + K·j from one sub-share per reduction-set
    member (keyed by that member's index, used in errors)."""
    if len(sub_shares) != len(params.reduction_set):
        raise InvalidCeremony(
            f"need {len(params.reduction_set)} sub-shares, got {len(sub_shares)}")
    bound = sub_share_bound(params, modulus)
    total = 0
    for sender, value in sub_shares.items():
        if type(value) is not int:
            raise BadPeerValue(sender, f"sub-share is {type(value).__name__}, not an int",
                               reason="sub_share_type")
        if abs(value) > bound:
            raise BadPeerValue(sender, "sub-share exceeds the public bound",
                               reason="sub_share_range")
        total += value
    return total + share_shift(params, modulus) * member_index


def plaintext_scale(params: CeremonyParameters, modulus: int, theta: int) -> int:
    """E mod N for the shared exponent E = Δ⁴·φ·β: Δ·θ, from TNO's public θ = Δ³·φ·β."""
    scale = params.delta * theta % modulus
    if math.gcd(scale, modulus) != 1:
        # TNO's own check (gcd != 0) never retries; a non-unit θ would reveal a factor.
        raise DkgError("θ is not a unit mod N: run the ceremony again", reason="theta")
    return scale


# ---------------------------------------------------------------------------------------
# Verification keys


def _hash_to_unit(modulus_sq: int, n: int, tag: bytes) -> int:
    counter = 0
    width = (modulus_sq.bit_length() + 7) // 8 + 16  # 128 extra bits: negligible bias
    while True:
        h = hashlib.shake_256(b"sealmesh/dkg/" + tag + n.to_bytes((n.bit_length() + 7) // 8, "big")
                              + counter.to_bytes(4, "big"))
        x = int.from_bytes(h.digest(width), "big") % modulus_sq
        if x > 1 and math.gcd(x, n) == 1:
            return x
        counter += 1


def verification_base(public: PublicKey, session: bytes) -> int:
    """v: a square in Z*_{n^2} every member derives alike from n and the session, so no
    round is spent agreeing on it (semi-honest members; nobody knows its discrete log)."""
    x = _hash_to_unit(public.n_squared, public.n, b"verification-base/" + session)
    return int(gmpy2.powmod(x, 2, public._n2))


def verification_key(public: PublicKey, v: int, secret: int, n_parties: int) -> int:
    return int(gmpy2.powmod(v, math.factorial(n_parties) * secret, public._n2))


def _lagrange_at(x: int, index: int, indices: Sequence[int], delta: int) -> int:
    """Δ·Π_{m≠index} (x−m)/(index−m): an integer for integer points in 1..n_parties."""
    num, den = delta, 1
    for m in indices:
        if m != index:
            num *= x - m
            den *= index - m
    assert num % den == 0
    return num // den


def check_verification_keys(public: PublicKey, vks: VerificationKeys, threshold: int) -> None:
    """Every v_j lies on one degree-(threshold-1) polynomial in the exponent: v_j^Δ equals
    the interpolation from the first `threshold` keys. Raises BadPeerValue naming j."""
    n_parties = vks.n_parties
    delta = math.factorial(n_parties)
    base = list(range(1, threshold + 1))
    n2 = public._n2
    for j in range(threshold + 1, n_parties + 1):
        acc = mpz(1)
        for k in base:
            acc = acc * paillier._signed_powmod(vks.key_of(k), _lagrange_at(j, k, base, delta),
                                                n2) % n2
        if gmpy2.powmod(vks.key_of(j), delta, n2) != acc:
            raise BadPeerValue(j, "verification key is off the shared polynomial",
                               reason="verification_key")


# ---------------------------------------------------------------------------------------
# A member's key and decryption with it


@dataclass(frozen=True)
class DkgKeyShare:
    """A crypto.paillier KeyShare from the ceremony, plus the public plaintext scale."""

    share: KeyShare
    plaintext_scale: int

    @property
    def public(self) -> PublicKey:
        return self.share.public


def unscale(public: PublicKey, scale: int, combined: int) -> int:
    """m from E·m mod n, which is what paillier.combine yields on a DKG key."""
    return int(combined * gmpy2.invert(scale, public._n) % public._n)


def combine(public: PublicKey, vks: VerificationKeys, threshold: int, c: int,
            partials: Sequence[PartialDecryption], context: bytes, scale: int) -> int:
    """paillier.combine (every proof verified) followed by `unscale`."""
    return unscale(public, scale, paillier.combine(public, vks, threshold, c, partials, context))


def combine_many(public: PublicKey, vks: VerificationKeys, threshold: int, cs: Sequence[int],
                 batches: Sequence[BatchPartialDecryption], context: bytes, scale: int,
                 workers: int = 2) -> list[int]:
    inverse = gmpy2.invert(scale, public._n)
    out = paillier.combine_many(public, vks, threshold, cs, batches, context, workers)
    return [int(m * inverse % public._n) for m in out]


def self_test_ciphertext(public: PublicKey, session: bytes) -> tuple[int, int]:
    """(m, Enc(m)) that every member derives alike, decrypted once at the end of a ceremony."""
    m = _hash_to_unit(public.n_squared, public.n, b"self-test-m/" + session) % public.n
    r = _hash_to_unit(public.n_squared, public.n, b"self-test-r/" + session) % public.n
    if math.gcd(r, public.n) != 1 or r == 0:
        r = 1
    return m, public.encrypt(m, r)


# ---------------------------------------------------------------------------------------
# Wire format of a member's secret (paillier.encode_key_share bounds secrets by n^2,
# which DKG shares exceed by a few hundred bits)


def encode_key_share(key: DkgKeyShare) -> bytes:
    share = key.share
    size = share.public.ciphertext_bytes
    body = {
        "v": WIRE_VERSION, "t": "dkg/key_share",
        "n": share.public.n.to_bytes((share.public.n.bit_length() + 7) // 8, "big"),
        "index": share.index, "threshold": share.threshold, "parties": share.n_parties,
        "secret": share.secret.to_bytes(max(1, (share.secret.bit_length() + 7) // 8), "big"),
        "base": share.v.to_bytes(size, "big"), "key": share.v_i.to_bytes(size, "big"),
        "scale": key.plaintext_scale.to_bytes(size, "big"),
    }
    return msgpack.packb(body, use_bin_type=True)


def _field_int(obj: dict, name: str, low: int, high: int) -> int:
    x = obj.get(name)
    if type(x) is not int or not low <= x <= high:
        raise DkgDecodeError(f"{name}: expected an integer in [{low}, {high}], got {x!r}")
    return x


def _field_bytes(obj: dict, name: str, max_len: int, exact: bool = False) -> int:
    raw = obj.get(name)
    if not isinstance(raw, bytes) or not 1 <= len(raw) <= max_len or (
            exact and len(raw) != max_len):
        how = "exactly" if exact else "at most"
        raise DkgDecodeError(f"{name}: expected {how} {max_len} bytes")
    return int.from_bytes(raw, "big")


def decode_key_share(data: bytes) -> DkgKeyShare:
    if not isinstance(data, (bytes, bytearray)):
        raise DkgDecodeError("dkg/key_share: expected bytes")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DkgDecodeError(f"dkg/key_share: not msgpack ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("v") != WIRE_VERSION or obj.get("t") != "dkg/key_share":
        raise DkgDecodeError("not a dkg/key_share of a known version")
    n = _field_bytes(obj, "n", paillier.MAX_BITS // 8)
    if not paillier.MIN_BITS <= n.bit_length() <= paillier.MAX_BITS or n % 2 == 0:
        raise DkgDecodeError("n: not an odd modulus of a supported size")
    public = PublicKey(n)
    parties = _field_int(obj, "parties", MIN_PARTIES, paillier.MAX_PARTIES)
    index = _field_int(obj, "index", 1, parties)
    threshold = _field_int(obj, "threshold", 2, parties)
    size = public.ciphertext_bytes
    # The proofs' bound is the only hard limit on a share's size.
    secret_bytes = size + MAX_EXPONENT_EXCESS_BITS // 8
    secret = _field_bytes(obj, "secret", secret_bytes)
    v, v_i, scale = (_field_bytes(obj, name, size, exact=True) for name in ("base", "key", "scale"))
    if not (public.is_valid_ciphertext(v) and public.is_valid_ciphertext(v_i)):
        raise DkgDecodeError("base/key: not in Z*_{n^2}")
    if not 0 < scale < n or math.gcd(scale, n) != 1:
        raise DkgDecodeError("scale: not a unit mod n")
    if verification_key(public, v, secret, parties) != v_i:
        raise DkgDecodeError("key: does not match v^(Δ·secret)")
    return DkgKeyShare(KeyShare(public, index, threshold, parties, secret, v, v_i), scale)
