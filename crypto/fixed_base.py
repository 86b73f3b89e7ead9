"""Fixed-base modular exponentiation with a precomputed byte-window table.

When one base is raised to many exponents (a generator, the DJN randomness base), a
table of base^(d·256^i) for every byte position i and digit d turns each exponentiation
into one multiplication per non-zero byte of the exponent: ~bits/8 multiplications
instead of ~1.2·bits for square-and-multiply.
"""

from __future__ import annotations

import gmpy2
from gmpy2 import mpz

WINDOW = 8  # bits per table row; digits come straight from int.to_bytes


class FixedBase:
    """base^e mod modulus for 0 <= e < 2^max_bits through the table, else plain powmod.

    Memory: ceil(max_bits / 8) rows of 255 residues (about 21 MB for a 1300-bit
    exponent modulo a 4096-bit n^2), built once in ceil(max_bits / 8) * 255 mulmods.
    """

    def __init__(self, base: int, modulus: int, max_bits: int) -> None:
        if max_bits < 1:
            raise ValueError("max_bits must be >= 1")
        self.base, self.modulus = mpz(base) % modulus, mpz(modulus)
        self.max_bits = max_bits
        self._row_count = -(-max_bits // WINDOW)
        rows, step = [], self.base
        for _ in range(self._row_count):
            row, acc = [mpz(1)], mpz(1)
            for _ in range(1, 1 << WINDOW):
                acc = acc * step % self.modulus
                row.append(acc)
            rows.append(tuple(row))
            step = acc * step % self.modulus  # step^256: the next byte's weight
        self._rows = tuple(rows)

    def pow(self, exponent: int) -> mpz:
        exponent = int(exponent)
        if exponent < 0 or exponent.bit_length() > self._row_count * WINDOW:
            return gmpy2.powmod(self.base, exponent, self.modulus)
        acc, modulus = mpz(1), self.modulus
        for row, digit in zip(self._rows, exponent.to_bytes(self._row_count, "little")):
            if digit:
                acc = acc * row[digit] % modulus
        return acc
