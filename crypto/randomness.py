"""Paillier randomizers r^n mod n^2, computed ahead of time off the critical path.

Encrypting m under n with g = n + 1 is (1 + m*n) * r^n mod n^2. The exponentiation
r^n dominates (a 2048-bit exponent modulo a 4096-bit number) and does not depend on
m, so a pool computes it in background threads while the trainer is still training;
the online step is then one multiplication (`encrypt_with`).

gmpy2 releases the GIL in powmod only when the calling thread's context says
allow_release_gil, and contexts are per thread, so each worker sets it on its own.
With it, threads run in parallel and no processes (nor pickling) are needed.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import gmpy2


class PoolClosed(RuntimeError):
    """take() on a pool after close(): a bug in the caller."""


@dataclass(frozen=True)
class PoolStats:
    hits: int  # taken from the pool
    misses: int  # computed synchronously because the pool was empty
    precomputed: int  # computed in the background so far
    available: int  # waiting in the pool now


def fresh_randomizer(n) -> gmpy2.mpz:
    """r^n mod n^2 for a uniformly random unit r of Z_n."""
    return fresh_randomizer_pair(n)[1]


def fresh_randomizer_pair(n) -> tuple[gmpy2.mpz, gmpy2.mpz]:
    """(r, r^n mod n^2): proofs about the ciphertext need r itself, not only r^n."""
    n = gmpy2.mpz(n)
    while True:
        r = gmpy2.mpz(secrets.randbelow(n - 1) + 1)
        if gmpy2.gcd(r, n) == 1:  # fails only if r reveals a factor of n
            return r, gmpy2.powmod(r, n, n * n)


def encrypt_with(n, plaintext, randomizer) -> gmpy2.mpz:
    """The online half of Paillier encryption: (1 + m*n) * r^n mod n^2."""
    n = gmpy2.mpz(n)
    n_square = n * n
    return (1 + (gmpy2.mpz(plaintext) % n) * n) * randomizer % n_square


class RandomizerPool:
    """Keeps up to `size` randomizers ready; each is handed out once, then forgotten.

    Use as a context manager, or call close(), so that the worker threads stop.
    `make(n)` builds one item; by default r^n mod n^2, but a contributor that also
    proves its ciphertexts pools everything the proof can compute ahead of time
    (see bench/secagg.py): the pool does not care what an item is.
    """

    def __init__(self, n: int, size: int, workers: int = 1,
                 make: Callable[[gmpy2.mpz], Any] = None):  # type: ignore[assignment]
        if n < 3 or size < 1 or workers < 1:
            raise ValueError(f"need n >= 3, size >= 1, workers >= 1; got {n}, {size}, {workers}")
        self._make = make or fresh_randomizer
        self._n, self._size = gmpy2.mpz(n), size
        self._ready: deque = deque()
        self._reserved = 0  # being computed now; counted so workers never overfill
        self._hits = self._misses = self._precomputed = 0
        self._closed = False
        self._cond = threading.Condition()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"randomizers-{id(self)}")
        self._workers = [self._executor.submit(self._fill) for _ in range(workers)]

    def _reserve(self) -> bool:
        with self._cond:
            while not self._closed and len(self._ready) + self._reserved >= self._size:
                self._cond.wait()
            if self._closed:
                return False
            self._reserved += 1
            return True

    def _fill(self) -> None:
        gmpy2.get_context().allow_release_gil = True  # this worker thread's context only
        while self._reserve():
            value = self._make(self._n)
            with self._cond:
                self._reserved -= 1
                if self._closed:  # close() already dropped the rest; drop this one too
                    return
                self._precomputed += 1
                self._ready.append(value)
                self._cond.notify_all()

    def take(self) -> gmpy2.mpz:
        """A randomizer no one else has had; computed now (a miss) if none is ready."""
        return self.take_many(1)[0]

    def take_many(self, count: int) -> list[gmpy2.mpz]:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._cond:
            if self._closed:
                raise PoolClosed("randomizer pool is closed")
            ready = [self._ready.popleft() for _ in range(min(count, len(self._ready)))]
            self._hits += len(ready)
            self._misses += count - len(ready)
            self._cond.notify_all()  # room for the workers to refill
        return ready + [self._make(self._n) for _ in range(count - len(ready))]

    @property
    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(self._hits, self._misses, self._precomputed, len(self._ready))

    def wait_until_full(self) -> None:
        """Blocks until `size` randomizers are ready (for benchmarks and tests)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or len(self._ready) >= self._size)

    def close(self) -> None:
        """Stops the workers (each finishes at most the one it is computing) and
        drops unused randomizers, which must never be reused elsewhere."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        self._executor.shutdown(wait=True)
        for worker in self._workers:
            worker.result()  # re-raises a worker's exception instead of hiding it

    def __enter__(self) -> "RandomizerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
