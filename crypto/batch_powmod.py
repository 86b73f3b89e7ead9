"""Many bases, one exponent, one modulus: [b^e mod N for b in bases], as fast as this CPU allows.

A committee member's partial decryption is exactly this (every aggregate ciphertext
raised to 2·Δ·s_i mod n^2), and it is the largest cost of a round. Two engines:

- "ifma": crypto/native/modexp_ifma.c, eight bases per instruction with AVX-512 IFMA
  (about 3x gmpy2 for a 4096-bit modulus on a Zen 4 core). `make install` compiles it
  to crypto/native/_modexp_ifma.so; it is used when that file exists and the CPU has
  the instructions.
- "gmpy2": gmpy2.powmod per base, the portable path and the reference.

Both run on `workers` threads (threaded_map, also used for other crypto work): ctypes
and gmpy2 drop the GIL, so two cores do twice the work. SEALMESH_POWMOD=gmpy2
forces the portable engine (benchmarks use it as their baseline).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import gmpy2
from gmpy2 import mpz

LIBRARY = Path(__file__).resolve().parent / "native" / "_modexp_ifma.so"
LANES = 8  # bases per vector pass; chunks are multiples of it


class PowmodError(RuntimeError):
    """The native engine refused its input (a bug in the caller, or memory)."""


@lru_cache(maxsize=1)
def _native() -> ctypes.CDLL | None:
    if os.environ.get("SEALMESH_POWMOD", "").lower() == "gmpy2" or not LIBRARY.exists():
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        return None
    lib.sm_ifma_available.restype = ctypes.c_int
    lib.sm_max_limbs.restype = ctypes.c_int
    lib.sm_powmod_batch.restype = ctypes.c_int
    lib.sm_powmod_batch.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
    ]
    return lib if lib.sm_ifma_available() else None


def engine() -> str:
    """The engine powmod_many will use: "ifma" or "gmpy2"."""
    return "ifma" if _native() is not None else "gmpy2"


def _window(exponent_bits: int) -> int:
    # Table of 2^w entries against exponent_bits/w multiplications; measured best at
    # w = 6 for 4,100-bit exponents (6.3 ms against 6.4 ms at w = 5, 6.7 ms at w = 4).
    for bits, window in ((2048, 6), (512, 5), (128, 4), (24, 3)):
        if exponent_bits >= bits:
            return window
    return 1


@lru_cache(maxsize=8)
def _montgomery(modulus: int) -> tuple[int, int, int, bytes, bytes]:
    """(nwords, limbs, n0inv, N as words, R^2 mod N as words) for an odd N."""
    bits = modulus.bit_length()
    nwords = (bits + 1 + 63) // 64  # room for results up to 2N - 1
    limbs = max(2, (bits + 2 + 51) // 52)  # R = 2^(52 limbs) >= 4N; the kernel wants >= 2
    r2 = pow(1 << (52 * limbs), 2, modulus)
    n0inv = -pow(modulus, -1, 1 << 52) % (1 << 52)
    size = nwords * 8
    return nwords, limbs, n0inv, modulus.to_bytes(size, "little"), r2.to_bytes(size, "little")


def _native_chunk(lib: ctypes.CDLL, bases: Sequence[int], exponent: int, modulus: int) -> list[int]:
    nwords, limbs, n0inv, n_words, r2_words = _montgomery(modulus)
    size = nwords * 8
    data = b"".join((int(b) % modulus).to_bytes(size, "little") for b in bases)
    ebits = exponent.bit_length()
    exp_words = exponent.to_bytes(max(1, (ebits + 63) // 64) * 8, "little")
    out = ctypes.create_string_buffer(len(data))
    rc = lib.sm_powmod_batch(out, data, len(bases), nwords, exp_words, ebits, n_words, r2_words,
                             n0inv, limbs, _window(ebits))
    if rc != 0:
        raise PowmodError(f"native powmod refused its input (code {rc})")
    raw = out.raw
    # Results are below 2N: one reduction each.
    return [int.from_bytes(raw[k * size:(k + 1) * size], "little") % modulus for k in range(len(bases))]


def _gmpy2_chunk(bases: Sequence[int], exponent: int, modulus: int) -> list[int]:
    e, m = mpz(exponent), mpz(modulus)
    return [int(gmpy2.powmod(b, e, m)) for b in bases]


def chunks(count: int, workers: int, multiple: int = 1) -> list[range]:
    """range(count) cut into a few chunks per worker, each a multiple of `multiple` long
    (but the last): one descheduled core then does not leave the other idle at the end,
    and task overhead stays negligible."""
    size = -(-count // (workers * 4))
    size = max(multiple, -(-size // multiple) * multiple)
    return [range(lo, min(lo + size, count)) for lo in range(0, count, size)]


def threaded_map(fn: Callable[[range], list[Any]], count: int, workers: int, *, multiple: int = 1) -> list[Any]:
    """fn over the chunks of range(count), concatenated in order, on up to `workers` threads.

    gmpy2 (2.3) releases the GIL in powmod only when the calling thread's own context has
    allow_release_gil; contexts are per thread, so each worker sets it on itself and the
    caller's context is never touched (workers=1 runs inline). ctypes calls drop the GIL
    anyway. Threads, not processes: no pickling of big numbers, no process start-up.
    """
    parts = chunks(count, workers, multiple)
    if workers == 1 or len(parts) <= 1:
        return [x for part in parts for x in fn(part)]

    def run(part: range) -> list[Any]:
        gmpy2.get_context().allow_release_gil = True  # this worker thread's context only
        return fn(part)

    out: list[Any] = []
    with ThreadPoolExecutor(min(workers, len(parts)), thread_name_prefix="crypto") as pool:
        for result in pool.map(run, parts):
            out.extend(result)
    return out


def powmod_many(bases: Sequence[int], exponent: int, modulus: int, *, workers: int = 1) -> list[int]:
    """[b^exponent mod modulus for b in bases] with exponent >= 0 and an odd modulus > 1."""
    exponent, modulus = int(exponent), int(modulus)
    if exponent < 0:
        raise ValueError("exponent must be >= 0")
    if modulus < 3 or modulus % 2 == 0:
        raise ValueError("modulus must be odd and > 1")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    lib = _native()
    if lib is not None and _montgomery(modulus)[1] > lib.sm_max_limbs():
        lib = None
    if lib is not None:
        def work(chunk: range) -> list[int]:
            return _native_chunk(lib, [bases[j] for j in chunk], exponent, modulus)
    else:
        def work(chunk: range) -> list[int]:
            return _gmpy2_chunk([bases[j] for j in chunk], exponent, modulus)
    return threaded_map(work, len(bases), workers, multiple=LANES)
