"""Clip, quantize and pack many float updates into few Paillier plaintexts.

The scheme follows BatchCrypt (Zhang et al., USENIX ATC 2020): each value becomes a
small unsigned integer, k of them sit side by side in one plaintext, and adding
plaintexts (what multiplying Paillier ciphertexts does) adds every slot at once. Each
slot is wide enough that the sum of all contributions never carries into the next.

Quantization is symmetric with an integer offset, so that 0.0 is exact:

    M      = 2^(b-1) - 1                       levels on each side of zero
    q(x)   = round(clip(x, -B, B) / B * M) + 2^(b-1)      in [1, 2^b - 1]
    x'(q)  = (q - 2^(b-1)) * B / M

A sum of `c` contributions therefore carries the known offset c * 2^(b-1), which
`decode_mean` removes exactly in integers before scaling back.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

MAX_QUANT_BITS = 32  # keeps every honest slot sum in uint64 for any realistic N_max
_CHUNK_BITS = 1 << 23  # ~8 MiB of 0/1 bytes per pack/unpack chunk bounds peak memory


class PackingError(ValueError):
    """Parameters or inputs that the packing cannot honour; the message says why."""


class LayoutError(PackingError):
    """A layout that does not fit, or would let slot sums overflow."""


class SlotOverflow(PackingError):
    """A slot sum that no set of in-range contributions could have produced.

    `value_index` (a slot sum out of reach) or `plaintext_index` (a plaintext wider than the
    layout) says where, so that a blame step can ask every contributor to prove that
    position in range (crypto.contribution.blame_for); None when not known.
    """

    def __init__(self, message: str, *, value_index: int | None = None,
                 plaintext_index: int | None = None) -> None:
        super().__init__(message)
        self.value_index, self.plaintext_index = value_index, plaintext_index


@dataclass(frozen=True)
class PackingLayout:
    clip_bound: float
    quant_bits: int
    max_contributors: int
    slot_bits: int
    slots_per_plaintext: int
    plaintext_bits: int
    slack_bits: int

    @property
    def offset(self) -> int:
        """The integer that encodes 0.0; each contribution adds it to every slot."""
        return 1 << (self.quant_bits - 1)

    @property
    def levels(self) -> int:
        """M: quantization steps between 0.0 and the clip bound."""
        return (1 << (self.quant_bits - 1)) - 1

    @property
    def step(self) -> float:
        """Distance between adjacent quantized values; error is at most half of it."""
        return self.clip_bound / self.levels

    def plaintexts_needed(self, count: int) -> int:
        return -(-count // self.slots_per_plaintext)


def _log2_ceil(x: int) -> int:
    return (x - 1).bit_length()


def _check_parameters(clip_bound, quant_bits, max_contributors, key_bits, slack_bits):
    real = isinstance(clip_bound, numbers.Real) and not isinstance(clip_bound, bool)
    finite = real and math.isfinite(clip_bound)
    if not (finite and clip_bound > 0):
        raise LayoutError(f"clip_bound must be a finite number > 0, got {clip_bound!r}")
    minimums = (("quant_bits", quant_bits, 2), ("max_contributors", max_contributors, 1),
                ("key_bits", key_bits, 1), ("slack_bits", slack_bits, 0))
    for name, value, low in minimums:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LayoutError(f"{name} must be an integer >= {low}, got {value!r}")
    if quant_bits > MAX_QUANT_BITS:
        raise LayoutError(f"quant_bits must be <= {MAX_QUANT_BITS}, got {quant_bits}")


def derive_layout(clip_bound: float, quant_bits: int, max_contributors: int, key_bits: int,
                  slack_bits: int = 0, *, plaintext_slack_bits: int = 0) -> PackingLayout:
    """The packing layout for these parameters, or LayoutError if none is safe.

    Slot width w = b + ceil(log2 N_max) + slack_bits + 1. An honest slot holds
    q < 2^b, so N_max of them sum below 2^(b + ceil(log2 N_max)). `slack_bits` comes
    from the range proof (crypto/proofs.py's slack_bits(), passed in by the caller):
    a contributor proven to lie in the interval with that slack can shift a slot by
    at most 2^(b + slack_bits), and the layout reserves exactly that headroom, so even
    N_max such contributors stay below 2^(w-1). The last bit is a guard: a slot sum
    in the top half of its slot is misbehaviour, never a silent carry.

    k = floor(usable / w) with usable = key_bits - 2 - slack_bits - ceil(log2 N_max).
    The -2 keeps the packed integer below 2^(key_bits-2) < n / 2. The rest covers a
    proof over a whole plaintext, whose slack can inflate the top slot past k * w bits:
    a wrap modulo n would corrupt every slot, not just one, so it gets its own margin.

    `plaintext_slack_bits` is for a range proof over the whole packed plaintext (what
    crypto/proofs.py proves): it bounds the packed integer, not each slot, so it needs
    no headroom inside the slots, only the top margin that keeps the sum below n.
    """
    _check_parameters(clip_bound, quant_bits, max_contributors, key_bits, slack_bits)
    if plaintext_slack_bits < 0:
        raise LayoutError("plaintext_slack_bits must be >= 0")
    contributor_bits = _log2_ceil(max_contributors)
    if quant_bits + contributor_bits > 62:
        raise LayoutError(
            f"{max_contributors} contributors of {quant_bits} bits can sum past the 62 bits "
            "that decoding handles; lower quant_bits or max_contributors")
    slot_bits = quant_bits + contributor_bits + slack_bits + 1
    usable_bits = key_bits - 2 - max(slack_bits, plaintext_slack_bits) - contributor_bits
    slots = usable_bits // slot_bits if usable_bits > 0 else 0
    if slots < 1:
        raise LayoutError(
            f"a {slot_bits}-bit slot does not fit a {key_bits}-bit key with {slack_bits} slack "
            f"bits ({max(usable_bits, 0)} usable bits); use a larger key or fewer quant_bits")
    return PackingLayout(float(clip_bound), quant_bits, max_contributors, slot_bits, slots,
                         slots * slot_bits, slack_bits)


def quantize(values: np.ndarray, layout: PackingLayout) -> np.ndarray:
    """Clip to [-B, B] and map to uint64 codes in [1, 2^b - 1]; 0.0 maps to 2^(b-1)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(x).any():  # infinities clip like any out-of-range value; NaN has no place
        raise PackingError("values contain NaN; drop or replace them before packing")
    # float64 so that B * M (up to 2^31 levels) rounds the same on every machine
    scaled = np.clip(x, -layout.clip_bound, layout.clip_bound) * (layout.levels / layout.clip_bound)
    signed = np.clip(np.rint(scaled), -layout.levels, layout.levels).astype(np.int64)
    return (signed + layout.offset).astype(np.uint64)


def dequantize(quantized: np.ndarray, layout: PackingLayout) -> np.ndarray:
    signed = np.asarray(quantized, dtype=np.uint64).astype(np.int64) - layout.offset
    return (signed * layout.step).astype(np.float32)


def _bits_of(codes: np.ndarray, width: int) -> np.ndarray:
    """(len, width) array of 0/1, least significant bit first."""
    low = np.unpackbits(codes.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1,
                        bitorder="little")
    if width <= 64:
        return low[:, :width]
    return np.pad(low, ((0, 0), (0, width - 64)))


def _pack_chunk(codes: np.ndarray, layout: PackingLayout) -> list[int]:
    k, w = layout.slots_per_plaintext, layout.slot_bits
    rows = -(-len(codes) // k)
    padded = np.zeros(rows * k, dtype=np.uint64)
    padded[:len(codes)] = codes
    bits = _bits_of(padded, w).reshape(rows, k * w)
    row_bytes = np.packbits(bits, axis=1, bitorder="little")
    raw, size = row_bytes.tobytes(), row_bytes.shape[1]
    return [int.from_bytes(raw[i * size:(i + 1) * size], "little") for i in range(rows)]


def _chunk_plaintexts(layout: PackingLayout) -> int:
    return max(1, _CHUNK_BITS // (layout.slots_per_plaintext * max(layout.slot_bits, 64)))


def pack(quantized: np.ndarray, layout: PackingLayout) -> list[int]:
    """Codes to plaintexts: slot i of plaintext j holds code j*k + i, slot 0 lowest.

    Slots are bit-exact (w need not be a multiple of 8): bit-level numpy is as fast as a
    byte reshape here and gives up to 7 bits per slot back, 12% more slots at b=16.
    The last plaintext is zero-padded.
    """
    codes = np.asarray(quantized).ravel()
    if codes.size and (codes.min() < 1 or codes.max() >= (1 << layout.quant_bits)):
        raise PackingError(f"codes must lie in [1, 2^{layout.quant_bits} - 1]; quantize first")
    codes = codes.astype(np.uint64)
    per_chunk = _chunk_plaintexts(layout) * layout.slots_per_plaintext
    plaintexts: list[int] = []
    for start in range(0, len(codes), per_chunk):
        plaintexts.extend(_pack_chunk(codes[start:start + per_chunk], layout))
    return plaintexts


def _plaintext_bytes(plaintexts, layout: PackingLayout, start: int = 0) -> bytes:
    size = -(-layout.plaintext_bits // 8)
    out = []
    for index, p in enumerate(plaintexts, start):
        p = int(p)
        if p < 0 or p.bit_length() > layout.plaintext_bits:
            raise SlotOverflow(f"plaintext {index} of {p.bit_length()} bits exceeds the layout's "
                               f"{layout.plaintext_bits}; a contribution was out of range",
                               plaintext_index=index)
        out.append(p.to_bytes(size, "little"))
    return b"".join(out)


def _unpack_chunk(plaintexts, layout: PackingLayout, start: int = 0) -> np.ndarray:
    k, w = layout.slots_per_plaintext, layout.slot_bits
    raw = np.frombuffer(_plaintext_bytes(plaintexts, layout, start), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(plaintexts), -1), axis=1, count=k * w,
                         bitorder="little").reshape(-1, w)
    if w > 64 and bits[:, 64:].any():
        raise SlotOverflow("a slot sum does not fit 64 bits; a contribution was out of range")
    low = bits if w == 64 else (bits[:, :64] if w > 64 else np.pad(bits, ((0, 0), (0, 64 - w))))
    return np.packbits(low, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


def unpack(plaintexts: list[int], count: int, layout: PackingLayout) -> np.ndarray:
    """The first `count` slot values (sums, after homomorphic addition) as uint64."""
    needed = layout.plaintexts_needed(count)
    if count < 0 or len(plaintexts) < needed:
        raise PackingError(f"{count} values need {needed} plaintexts, got {len(plaintexts)}")
    step = _chunk_plaintexts(layout)
    chunks = [_unpack_chunk(plaintexts[i:i + step], layout, i) for i in range(0, needed, step)]
    sums = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)
    return sums[:count]


def decode_mean(slot_sums: np.ndarray, contributors: int, layout: PackingLayout) -> np.ndarray:
    """Mean of the dequantized contributions: (sum - c * 2^(b-1)) * step / c."""
    if not 1 <= contributors <= layout.max_contributors:
        raise PackingError(f"contributors must be in [1, {layout.max_contributors}], "
                           f"got {contributors}")
    sums = np.asarray(slot_sums, dtype=np.uint64)
    # Every in-range code is in [1, 2^b - 1], so c of them sum to [c, c·(2^b - 1)]. Above it,
    # some contribution put an out-of-range value in that slot (the range proof bounds
    # plaintexts, not slots): refuse, and say where, for the blame step
    # (crypto.contribution.blame_for; docs/crypto-contribution.md, "Per-slot bounds").
    over = sums > contributors * ((1 << layout.quant_bits) - 1)
    if over.any():
        index = int(np.flatnonzero(over)[0])
        raise SlotOverflow(f"slot sum {index} ({int(sums[index])}) exceeds what {contributors} "
                           "in-range contributions can reach; some contribution was out of range",
                           value_index=index)
    # Below c takes a code of 0, which the slot proof allows (it proves [0, 2^b)): at most one
    # step past -B. Clamped, so that the mean never leaves [-B, B] and nothing aborts unnamed.
    sums = np.maximum(sums, np.uint64(contributors))
    signed = sums.astype(np.int64) - contributors * layout.offset
    return (signed * (layout.step / contributors)).astype(np.float32)
