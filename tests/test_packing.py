"""crypto/packing.py (layout, quantize, pack) and crypto/randomness.py (randomizer pool)."""

import random
import threading

import gmpy2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from crypto.packing import (LayoutError, PackingError, SlotOverflow, decode_mean, dequantize,
                            derive_layout, pack, quantize, unpack)
from crypto.randomness import PoolClosed, RandomizerPool, encrypt_with, fresh_randomizer

FAST = settings(max_examples=60, deadline=None)


def log2_ceil(x):
    return (x - 1).bit_length()


@st.composite
def layouts(draw, max_slack=8):
    clip_bound = draw(st.floats(1e-3, 1e3))
    quant_bits = draw(st.integers(2, 32))
    max_contributors = draw(st.integers(1, 300))
    slack = draw(st.integers(0, max_slack))
    key_bits = draw(st.integers(64, 1024))
    try:
        return derive_layout(clip_bound, quant_bits, max_contributors, key_bits, slack)
    except LayoutError:
        assume(False)


def codes_for(layout, count, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 1 << layout.quant_bits, size=count, dtype=np.uint64)


def tolerance(layout):
    """Half a quantization step, plus float32 rounding of the output (matters for b > 24)."""
    return layout.step / 2 + layout.clip_bound * 2.0**-23


def floats_for(layout, count, seed):
    # a quarter of the values fall outside [-B, B], to exercise clipping
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1.25, 1.25, count) * layout.clip_bound).astype(np.float32)


def add_plaintexts(contributions):
    """What multiplying the ciphertexts does to the plaintexts (all well below n)."""
    return [sum(column) for column in zip(*contributions)]


# --- layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("slack, slot_bits, slots, plaintexts_for_1m", [
    (0, 21, 97, 10310),
    (169, 190, 9, 111112),
])
def test_layout_vectors(slack, slot_bits, slots, plaintexts_for_1m):
    layout = derive_layout(1.0, 16, 10, 2048, slack)
    assert (layout.slot_bits, layout.slots_per_plaintext) == (slot_bits, slots)
    assert layout.plaintext_bits == slot_bits * slots
    assert layout.plaintexts_needed(1_000_000) == plaintexts_for_1m


@FAST
@given(st.floats(1e-3, 1e3), st.integers(2, 32), st.integers(1, 10**6), st.integers(16, 4096),
       st.integers(0, 300))
def test_layout_never_overflows_or_refuses(clip_bound, b, n_max, key_bits, slack):
    try:
        layout = derive_layout(clip_bound, b, n_max, key_bits, slack)
    except LayoutError:
        assert key_bits - 2 - slack - log2_ceil(n_max) < b + log2_ceil(n_max) + slack + 1
        return
    w, k = layout.slot_bits, layout.slots_per_plaintext
    assert w == b + log2_ceil(n_max) + slack + 1 and k >= 1
    # N_max contributions, each shifting a slot by up to the proof's slack, fit below the guard bit
    assert n_max * (1 << (b + slack)) <= 1 << (w - 1)
    # N_max whole plaintexts inflated by the slack stay well below any key_bits-bit n
    assert k * w + slack + log2_ceil(n_max) <= key_bits - 2


@pytest.mark.parametrize("args", [
    (0.0, 16, 10, 2048), (-1.0, 16, 10, 2048), (float("nan"), 16, 10, 2048),
    (float("inf"), 16, 10, 2048), (1.0, 1, 10, 2048), (1.0, 33, 10, 2048), (1.0, 16, 0, 2048),
    (1.0, 16, 10, 20), (1.0, 16, 10, 2048, -1), (1.0, 16, 10, 2048, 2000), (1.0, 16.0, 10, 2048),
    (1.0, 32, 2**31, 2048),
])
def test_layout_refuses_nonsense(args):
    with pytest.raises(LayoutError):
        derive_layout(*args)


def test_layout_error_is_a_value_error_with_a_hint():
    with pytest.raises(ValueError, match="larger key"):
        derive_layout(1.0, 16, 10, 64, 40)


# --- pack / unpack ----------------------------------------------------------------------

@FAST
@given(layouts(), st.integers(0, 700), st.integers(0, 2**32))
def test_pack_unpack_round_trip(layout, count, seed):
    codes = codes_for(layout, count, seed)
    plaintexts = pack(codes, layout)
    assert len(plaintexts) == layout.plaintexts_needed(count)
    assert all(0 <= p < 1 << layout.plaintext_bits for p in plaintexts)
    assert np.array_equal(unpack(plaintexts, count, layout), codes)


def test_slot_zero_is_least_significant_and_last_plaintext_zero_padded():
    layout = derive_layout(1.0, 8, 4, 128)
    k, w = layout.slots_per_plaintext, layout.slot_bits
    codes = np.arange(1, k + 4, dtype=np.uint64)
    first, last = pack(codes, layout)
    assert first == sum(int(c) << (i * w) for i, c in enumerate(codes[:k]))
    assert last == (k + 1) | (k + 2) << w | (k + 3) << 2 * w


def test_pack_refuses_unquantized_codes():
    layout = derive_layout(1.0, 8, 4, 256)
    with pytest.raises(PackingError):
        pack(np.array([0, 5], dtype=np.uint64), layout)
    with pytest.raises(PackingError):
        pack(np.array([256], dtype=np.uint64), layout)


def test_unpack_needs_enough_plaintexts():
    layout = derive_layout(1.0, 8, 4, 256)
    with pytest.raises(PackingError):
        unpack([1], layout.slots_per_plaintext + 1, layout)


def test_pack_unpack_a_million_values():
    layout = derive_layout(1.0, 16, 10, 2048)
    codes = codes_for(layout, 1_000_000, 7)
    plaintexts = pack(codes, layout)
    assert len(plaintexts) == 10310
    assert np.array_equal(unpack(plaintexts, len(codes), layout), codes)


# --- quantization and aggregation ----------------------------------------------------------

@FAST
@given(layouts(), st.integers(1, 500), st.integers(0, 2**32))
def test_quantize_dequantize_within_error_after_clipping(layout, count, seed):
    values = floats_for(layout, count, seed)
    codes = quantize(values, layout)
    assert codes.dtype == np.uint64
    assert codes.min() >= 1 and codes.max() < 1 << layout.quant_bits
    clipped = np.clip(values.astype(np.float64), -layout.clip_bound, layout.clip_bound)
    error = np.abs(dequantize(codes, layout) - clipped)
    assert error.max() <= tolerance(layout)
    assert layout.step / 2 <= layout.clip_bound / 2 ** (layout.quant_bits - 1)


def test_out_of_range_values_are_clipped_and_zero_is_exact():
    layout = derive_layout(2.0, 12, 4, 512)
    codes = quantize(np.array([-1e9, -2.5, 0.0, 2.5, np.inf], dtype=np.float32), layout)
    top = (1 << layout.quant_bits) - 1
    assert codes.tolist() == [1, 1, layout.offset, top, top]
    assert dequantize(codes, layout).tolist() == [-2.0, -2.0, 0.0, 2.0, 2.0]


def test_nan_is_refused():
    layout = derive_layout(1.0, 8, 4, 256)
    with pytest.raises(PackingError, match="NaN"):
        quantize(np.array([0.1, np.nan], dtype=np.float32), layout)


@FAST
@given(layouts(), st.integers(1, 300), st.data())
def test_sum_of_packed_contributions_decodes_to_the_mean(layout, count, data):
    contributors = data.draw(st.integers(1, min(layout.max_contributors, 12)))
    seeds = data.draw(st.lists(st.integers(0, 2**32), min_size=contributors,
                               max_size=contributors))
    updates = [floats_for(layout, count, seed) for seed in seeds]
    total = add_plaintexts([pack(quantize(u, layout), layout) for u in updates])
    mean = decode_mean(unpack(total, count, layout), contributors, layout)
    assert mean.dtype == np.float32
    clipped = [np.clip(u.astype(np.float64), -layout.clip_bound, layout.clip_bound)
               for u in updates]
    error = np.abs(mean - np.mean(clipped, axis=0))
    assert error.max() <= tolerance(layout)


@pytest.mark.parametrize("slack", [0, 7])
@pytest.mark.parametrize("extreme", [-1.0, 1.0])
def test_max_contributors_of_extreme_values_never_carry(slack, extreme):
    layout = derive_layout(1.0, 16, 1000, 2048, slack)
    count = 3 * layout.slots_per_plaintext
    one = pack(quantize(np.full(count, 5 * extreme, dtype=np.float32), layout), layout)
    total = [p * layout.max_contributors for p in one]
    sums = unpack(total, count, layout)
    code = 1 if extreme < 0 else (1 << layout.quant_bits) - 1
    assert (sums == code * layout.max_contributors).all()
    assert (decode_mean(sums, layout.max_contributors, layout) == extreme).all()


@pytest.mark.parametrize("slack", [0, 5, 20])
def test_slack_headroom_absorbs_max_contributors_at_the_proof_bound(slack):
    # a contributor the range proof accepts may put up to 2^(b + slack) - 1 in a slot
    layout = derive_layout(1.0, 16, 100, 2048, slack)
    worst = (1 << (layout.quant_bits + slack)) - 1
    k, w = layout.slots_per_plaintext, layout.slot_bits
    plaintext = sum(worst << (i * w) for i in range(k))
    sums = unpack([plaintext * layout.max_contributors], k, layout)
    assert (sums == worst * layout.max_contributors).all()
    assert (sums < 1 << (w - 1)).all()  # the guard bit is never reached


def test_sums_out_of_reach_of_honest_contributions_are_flagged():
    layout = derive_layout(1.0, 8, 4, 256)
    with pytest.raises(SlotOverflow):
        decode_mean(np.array([2 * 255 + 1], dtype=np.uint64), 2, layout)
    with pytest.raises(SlotOverflow):
        unpack([1 << layout.plaintext_bits], 1, layout)
    wide = derive_layout(1.0, 8, 4, 2048, 100)
    with pytest.raises(SlotOverflow):
        unpack([1 << 70], 1, wide)
    with pytest.raises(PackingError):
        decode_mean(np.array([1], dtype=np.uint64), 5, layout)


# --- randomizer pool ----------------------------------------------------------------------

class TinyPaillier:
    """Just enough Paillier (g = n + 1) to decrypt; built here, not from crypto/paillier.py."""

    def __init__(self, seed):
        rng = random.Random(seed)
        p, q = (gmpy2.next_prime(rng.getrandbits(256) | 1 << 255) for _ in range(2))
        self.n, self.n2 = p * q, (p * q) ** 2
        self.lam = gmpy2.lcm(p - 1, q - 1)
        self.mu = gmpy2.invert(self.lam, self.n)

    def decrypt(self, c):
        return (gmpy2.powmod(c, self.lam, self.n2) - 1) // self.n * self.mu % self.n

    def is_nth_residue(self, x):
        return gmpy2.powmod(x, self.lam, self.n2) == 1


@pytest.fixture(scope="module")
def key():
    return TinyPaillier(2024)


def pool_threads(pool):
    return [t for t in threading.enumerate() if t.name.startswith(f"randomizers-{id(pool)}")]


def test_randomizers_are_distinct_residues_that_encrypt_correctly(key):
    with RandomizerPool(key.n, size=8, workers=2) as pool:
        values = [pool.take() for _ in range(5)] + pool.take_many(30)
    assert len(set(values)) == len(values) == 35
    assert all(key.is_nth_residue(v) for v in values)
    messages = [random.Random(i).randrange(key.n) for i in range(len(values))]
    for m, rn in zip(messages, values):
        assert key.decrypt(encrypt_with(key.n, m, rn)) == m
    assert encrypt_with(key.n, 5, values[0]) != encrypt_with(key.n, 5, values[1])


def test_fresh_randomizer_is_an_nth_residue(key):
    assert key.is_nth_residue(fresh_randomizer(key.n))
    assert key.decrypt(encrypt_with(key.n, 42, fresh_randomizer(key.n))) == 42


def test_pool_fills_to_size_then_refills_after_takes(key):
    with RandomizerPool(key.n, size=6, workers=2) as pool:
        pool.wait_until_full()
        assert pool.stats.available == 6 and pool.stats.precomputed == 6
        pool.take_many(4)
        assert pool.stats.hits == 4 and pool.stats.misses == 0
        pool.wait_until_full()
        assert pool.stats.precomputed == 10 and pool.stats.available == 6


def test_misses_are_counted_when_the_pool_is_empty(key):
    with RandomizerPool(key.n, size=2) as pool:
        taken = pool.take_many(12)
        stats = pool.stats
    assert len(set(taken)) == 12
    assert stats.hits + stats.misses == 12 and stats.misses >= 10


def test_close_stops_the_workers(key):
    pool = RandomizerPool(key.n, size=1000, workers=2)
    assert pool_threads(pool)
    pool.close()
    assert not pool_threads(pool)
    computed = pool.stats.precomputed
    assert pool.stats.available == 0  # unused randomizers are dropped, never reused
    with pytest.raises(PoolClosed):
        pool.take()
    assert pool.stats.precomputed == computed


def test_pool_refuses_bad_arguments(key):
    with pytest.raises(ValueError):
        RandomizerPool(key.n, size=0)
    with RandomizerPool(key.n, size=1) as pool, pytest.raises(ValueError):
        pool.take_many(-1)


def test_whole_plaintext_slack_only_narrows_the_top_margin():
    from crypto.packing import derive_layout
    per_slot = derive_layout(1.0, 16, 10, 2048, slack_bits=257)
    whole = derive_layout(1.0, 16, 10, 2048, plaintext_slack_bits=257)
    assert per_slot.slots_per_plaintext == 6
    assert whole.slot_bits == 21 and whole.slots_per_plaintext == (2048 - 2 - 257 - 4) // 21
    # the packed integer plus the proof's slack and N_max-fold sum stays below 2^(key-2)
    assert whole.plaintext_bits + 257 + 4 <= 2048 - 2


def test_pool_hands_out_items_of_any_maker_once():
    from crypto.randomness import RandomizerPool, fresh_randomizer_pair
    n = (2**127 - 1) * (2**89 - 1)
    with RandomizerPool(n, size=4, workers=2, make=fresh_randomizer_pair) as pool:
        pool.wait_until_full()
        pairs = pool.take_many(6)  # 4 precomputed, 2 made on the spot
    assert len({r for r, _ in pairs}) == 6
    assert all(rn == pow(int(r), n, n * n) for r, rn in pairs)
