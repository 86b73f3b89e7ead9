"""crypto/batch_powmod: the IFMA engine agrees with Python's pow everywhere, and the
portable engine is what runs when the native library is absent or switched off."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import batch_powmod

needs_ifma = pytest.mark.skipif(
    batch_powmod.engine() != "ifma",
    reason="no AVX-512 IFMA engine here (CPU without IFMA, or crypto/native not built: make install)",
)


@pytest.fixture
def portable(monkeypatch):
    monkeypatch.setenv("SEALMESH_POWMOD", "gmpy2")
    batch_powmod._native.cache_clear()
    yield
    monkeypatch.delenv("SEALMESH_POWMOD")
    batch_powmod._native.cache_clear()


def odd_modulus(bits: int) -> int:
    return secrets.randbits(bits) | 1 | (1 << (bits - 1))


@st.composite
def problems(draw):
    bits = draw(st.sampled_from([3, 64, 100, 521, 1024, 2047, 4096, 6144]))
    modulus = draw(st.integers(1 << (bits - 1), (1 << bits) - 1).map(lambda m: m | 1))
    if modulus < 3:
        modulus = 3
    exponent = draw(st.one_of(st.integers(0, 70), st.integers(0, 1 << draw(st.integers(1, 4200)))))
    bases = draw(st.lists(st.one_of(st.integers(0, modulus - 1), st.sampled_from([0, 1, modulus - 1]),
                                    st.integers(modulus, 4 * modulus)), min_size=1, max_size=19))
    return bases, exponent, modulus


@needs_ifma
@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([1, 2, 3]))
def test_ifma_engine_matches_pow(problem, workers):
    bases, exponent, modulus = problem
    assert batch_powmod.powmod_many(bases, exponent, modulus, workers=workers) == \
        [pow(b, exponent, modulus) for b in bases]


@needs_ifma
def test_ifma_engine_at_the_decryption_size():
    # n^2 of a 2048-bit key and a share-sized exponent; 37 bases = 4 full passes and 5 lanes.
    modulus, exponent = odd_modulus(4096), secrets.randbits(4104)
    bases = [secrets.randbelow(modulus) for _ in range(37)]
    got = batch_powmod.powmod_many(bases, exponent, modulus, workers=2)
    assert got == [pow(b, exponent, modulus) for b in bases]


def test_portable_engine_when_switched_off(portable):
    assert batch_powmod.engine() == "gmpy2"
    modulus, exponent = odd_modulus(1024), secrets.randbits(1030)
    bases = [secrets.randbelow(modulus) for _ in range(21)]
    assert batch_powmod.powmod_many(bases, exponent, modulus, workers=2) == \
        [pow(b, exponent, modulus) for b in bases]


def test_portable_engine_when_the_library_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(batch_powmod, "LIBRARY", tmp_path / "absent.so")
    batch_powmod._native.cache_clear()
    try:
        assert batch_powmod.engine() == "gmpy2"
        assert batch_powmod.powmod_many([2, 3], 10, 1001) == [1024 % 1001, 59049 % 1001]
    finally:
        batch_powmod._native.cache_clear()


def test_a_modulus_beyond_the_native_limit_still_answers():
    modulus = odd_modulus(13_000)  # over 240 limbs of 52 bits: the gmpy2 path takes it
    bases = [secrets.randbelow(modulus) for _ in range(3)]
    assert batch_powmod.powmod_many(bases, 65537, modulus) == [pow(b, 65537, modulus) for b in bases]


@pytest.mark.parametrize("exponent, modulus, workers, match", [
    (-1, 101, 1, "exponent"), (3, 100, 1, "odd"), (3, 1, 1, "odd"),
    (3, 101, 0, "workers"), (3, 101, True, "workers"), (3, 101, 1.5, "workers"),
])
def test_bad_arguments_are_refused(exponent, modulus, workers, match):
    with pytest.raises(ValueError, match=match):
        batch_powmod.powmod_many([2], exponent, modulus, workers=workers)


def test_empty_input_gives_empty_output():
    assert batch_powmod.powmod_many([], 5, 101, workers=2) == []
