"""Paillier randomness in the Damgård–Jurik–Nielsen form: h_n^rho with a short rho.

A standard Paillier randomizer is r^n mod n^2 for a random unit r: a 2048-bit exponent
modulo a 4096-bit number. DJN ("A generalization of Paillier's public-key system with
applications to electronic voting", 2010, section 4.1) fix one n-th power h_n = h^n mod n^2
with h = -y^2 mod n and use h_n^rho for a random rho of bits(n)/2 bits. The result is
still an n-th power, so the ciphertext (1 + m·n)·h_n^rho is an ordinary Paillier
ciphertext: it decrypts, adds and threshold-decrypts exactly like any other, and third-party
Paillier code decrypts it. Two things change:

- cost: h_n is fixed, so h_n^rho goes through a fixed-base table (crypto/fixed_base.py):
  about 128 multiplications modulo n^2 instead of about 2,500;
- proofs: rho is an integer, so a proof's response for the randomness is rho·e + sigma
  over the integers (no r^e mod n), and randomness adds up: the product of ciphertexts
  has randomness sum(rho) (crypto/subset_range.py builds on both).

Security: semantic security rests on DCR plus DJN's assumption that h_n^rho with a short
rho is indistinguishable from a random n-th power (a short-exponent assumption for the
subgroup of n-th powers; DJN prove it from DCR for rho of bits(n)/2 bits under a
standard conjecture). h is hashed from n, so nobody knows a discrete log relation that
could matter, and every party derives the same h_n without a new key field.
"""

from __future__ import annotations

import hashlib
import secrets
from functools import lru_cache

import gmpy2
from gmpy2 import mpz

from crypto.fixed_base import FixedBase

_DOMAIN = b"sealmesh/djn-base/v1"
# The table also serves the proofs' responses rho·e + sigma, which are longer than rho by
# the challenge, the statistical mask, the log of the number of ciphertexts summed and
# (in batch verification) a 64-bit random coefficient.
TABLE_EXTRA_BITS = 128 + 128 + 64 + 24


def exponent_bits(n: int) -> int:
    """Length of rho: bits(n)/2, as DJN section 4.1 suggests."""
    return int(n).bit_length() // 2


@lru_cache(maxsize=4)
def base(n: int) -> mpz:
    """h_n = (-y^2)^n mod n^2 with y hashed from n (a unit of Z_n)."""
    n = mpz(n)
    counter = 0
    while True:
        digest = hashlib.shake_256(_DOMAIN + counter.to_bytes(4, "big") + int(n).to_bytes(
            (n.bit_length() + 7) // 8, "big")).digest((n.bit_length() + 128 + 7) // 8)
        y = mpz(int.from_bytes(digest, "big")) % n
        counter += 1
        if y > 1 and gmpy2.gcd(y, n) == 1:
            h = (-(y * y)) % n
            return gmpy2.powmod(h, n, n * n)


@lru_cache(maxsize=2)  # ~21 MB each at 2048 bits; a process normally serves one key
def table(n: int) -> FixedBase:
    n = mpz(n)
    return FixedBase(base(n), n * n, exponent_bits(n) + TABLE_EXTRA_BITS)


def randomizer(n: int) -> tuple[mpz, mpz]:
    """(rho, h_n^rho mod n^2) with rho uniform in [0, 2^(bits(n)/2))."""
    rho = mpz(secrets.randbits(exponent_bits(n)))
    return rho, table(int(n)).pow(rho)


def encrypt(n: int, m: int, randomizer_value: int) -> mpz:
    """(1 + m·n)·h_n^rho mod n^2, the online half: one multiplication."""
    n = mpz(n)
    if not 0 <= m < n:
        raise ValueError("plaintext must be in [0, n)")
    return (1 + mpz(m) * n) * randomizer_value % (n * n)
