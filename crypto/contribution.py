"""A trainer's update as it leaves the trainer: packed, encrypted, proven; and the sum.

seal():   clip, quantize and pack the float update (crypto/packing.py), encrypt every
          plaintext with DJN randomness (crypto/djn.py: one multiplication online when
          the randomizers were precomputed), and prove all ciphertexts in range with one
          subset-sum proof (crypto/subset_range.py) bound to the round's ProofContext.
verify(): the validator's check of all of that; raises InvalidContribution with a reason.
aggregate(): the position-wise product of accepted contributions: the encrypted sum.
decryption_blocks(): which committee members partially decrypt which positions, so
          each member does t/n of the work (with a fallback when a member is gone).
blame_for(), prove_slots(), verify_slots(): after a SlotOverflow, every contributor proves
          the overflowing position in range with an exact proof, and who cannot is named
          (the range proof bounds plaintexts, not slots: docs/crypto-contribution.md).

Pure library: no I/O. Wire form: versioned msgpack, every value range-checked on decode.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np
from gmpy2 import mpz

from crypto import djn, packing, proofs, subset_range
from crypto.packing import PackingLayout
from crypto.paillier import PublicKey
from crypto.wire import unpack_strict  # the strict reader the message layer uses too

WIRE_VERSION = 1
PURPOSE_CONTRIBUTION = "contribution"
# A contribution of this many ciphertexts carries ~85M parameters at 2048 bits; the
# layout's slack (subset_range.slack_bits) is sized for it.
MAX_CIPHERTEXTS = subset_range.MAX_CIPHERTEXTS


class InvalidContribution(ValueError):
    """A contribution that must be rejected; `.reason` goes to logs, metrics and evidence."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason, self.hint = reason, hint


def derive_layout(clip_bound: float, quant_bits: int, max_contributors: int, key_bits: int) -> PackingLayout:
    """The packing layout whose top margin covers what the subset range proof lets through."""
    return packing.derive_layout(clip_bound, quant_bits, max_contributors, key_bits,
                                 plaintext_slack_bits=subset_range.slack_bits(MAX_CIPHERTEXTS))


def context_for(public: PublicKey, mesh_id: str, round_id: int, sender: str) -> bytes:
    return proofs.ProofContext(public.n, mesh_id, round_id, sender, 0, PURPOSE_CONTRIBUTION).encode()


@dataclass(frozen=True)
class Contribution:
    value_count: int  # float parameters carried (the last plaintext is zero-padded)
    ciphertexts: tuple[int, ...]
    proof: subset_range.SubsetRangeProof



@dataclass
class Precomputation:
    """The offline half of seal() for one contribution: secrets, use once, keep in memory."""

    public_n: int
    layout: PackingLayout
    value_count: int
    randomizers: list[tuple[Any, Any]]  # (rho, h_n^rho)
    subsets: list[subset_range.SubsetPrecomputation]


def precompute(public: PublicKey, layout: PackingLayout, value_count: int, *, workers: int = 1) -> Precomputation:
    """Everything of seal() that depends on neither the update nor the challenge.

    Run it while the trainer trains. `workers` threads split the work; the fixed-base
    loops hold the GIL between multiplications, so expect less than linear gains.
    """
    count = layout.plaintexts_needed(value_count)
    n = public.n
    djn.table(n)  # build the shared table once, before the threads race to
    with ThreadPoolExecutor(max(1, workers)) as pool:
        randomizers = list(pool.map(lambda _: djn.randomizer(n), range(count), chunksize=256))
        subsets = list(pool.map(lambda _: subset_range.precompute_one(n, layout.plaintext_bits, count),
                                range(subset_range.SUBSETS)))
    return Precomputation(n, layout, value_count, randomizers, subsets)


def seal(public: PublicKey, layout: PackingLayout, update: np.ndarray, context: bytes,
         *, precomputed: Precomputation | None = None) -> Contribution:
    """The encrypted, proven contribution of `update` (float32 values, clipped to ±B)."""
    values = np.asarray(update, dtype=np.float32).ravel()
    plaintexts = packing.pack(packing.quantize(values, layout), layout)
    if precomputed is None:
        precomputed = precompute(public, layout, len(values))
    if (precomputed.public_n, precomputed.layout, precomputed.value_count) != (public.n, layout, len(values)):
        raise ValueError("precomputation was made for another key, layout or size")
    n, n2 = mpz(public.n), mpz(public.n_squared)
    cs = [(1 + mpz(m) * n) * h % n2 for m, (_, h) in zip(plaintexts, precomputed.randomizers)]
    proof = subset_range.prove(public.n, cs, plaintexts, [rho for rho, _ in precomputed.randomizers],
                               layout.plaintext_bits, context, precomputed=precomputed.subsets)
    return Contribution(len(values), tuple(int(c) for c in cs), proof)


def verify(public: PublicKey, layout: PackingLayout, contribution: Contribution, context: bytes,
           *, value_count: int) -> None:
    """Raises InvalidContribution unless the contribution is well formed and proven."""
    if contribution.value_count != value_count:
        raise InvalidContribution("wrong_size", f"carries {contribution.value_count} values, "
                                                f"the round expects {value_count}")
    expected = layout.plaintexts_needed(value_count)
    if len(contribution.ciphertexts) != expected:
        raise InvalidContribution("wrong_size", f"{len(contribution.ciphertexts)} ciphertexts, "
                                                f"the layout needs {expected}")
    if not subset_range.verify(public.n, contribution.ciphertexts, contribution.proof,
                               layout.plaintext_bits, context):
        raise InvalidContribution("bad_proof", "the range proof does not verify for this round "
                                               "and sender")


def aggregate(public: PublicKey, contributions: Sequence[Contribution]) -> list[int]:
    """The encrypted position-wise sum of verified contributions (same size each)."""
    if not contributions:
        raise ValueError("nothing to aggregate")
    sizes = {len(c.ciphertexts) for c in contributions}
    if len(sizes) != 1:
        raise ValueError(f"contributions differ in size: {sorted(sizes)}")
    n2 = mpz(public.n_squared)
    acc = [mpz(c) for c in contributions[0].ciphertexts]
    for contribution in contributions[1:]:
        acc = [a * c % n2 for a, c in zip(acc, contribution.ciphertexts)]
    return [int(a) for a in acc]


def decode_sum(plaintexts: Sequence[int], value_count: int, contributors: int,
               layout: PackingLayout) -> np.ndarray:
    """The mean update from the decrypted aggregate plaintexts."""
    sums = packing.unpack(list(plaintexts), value_count, layout)
    return packing.decode_mean(sums, contributors, layout)


# --- who decrypts what ----------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptionBlock:
    start: int
    stop: int
    members: tuple[int, ...]  # committee indices asked first (t of them)


def decryption_blocks(count: int, members: Sequence[int], threshold: int) -> list[DecryptionBlock]:
    """Split `count` positions into len(members) blocks; block b goes to members b..b+t-1.

    Every member then partially decrypts t/n of the positions instead of all of them, and
    every block still has t members. If one of a block's members is gone, any other
    member (not yet in that block) covers it: the node decides that at run time.
    """
    members = sorted(set(members))
    if not 1 <= threshold <= len(members):
        raise ValueError(f"threshold {threshold} needs at least that many members, got {len(members)}")
    k = len(members)
    bounds = [count * b // k for b in range(k + 1)]
    return [DecryptionBlock(bounds[b], bounds[b + 1], tuple(members[(b + i) % k] for i in range(threshold)))
            for b in range(k) if bounds[b] < bounds[b + 1]]


# --- wire -----------------------------------------------------------------------------------


def encode(public: PublicKey, contribution: Contribution) -> bytes:
    width = public.ciphertext_bytes
    return msgpack.packb({
        "v": WIRE_VERSION, "kind": "contribution", "values": contribution.value_count,
        "ciphertexts": b"".join(int(c).to_bytes(width, "big") for c in contribution.ciphertexts),
        "proof": contribution.proof.to_wire(),
    }, use_bin_type=True)


def decode(public: PublicKey, data: bytes, *, max_ciphertexts: int = MAX_CIPHERTEXTS) -> Contribution:
    """Strict decode; raises InvalidContribution("malformed_contribution", ...) on anything off."""
    try:
        obj = unpack_strict(data)
    except Exception as exc:
        raise InvalidContribution("malformed_contribution", f"not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"v", "kind", "values", "ciphertexts", "proof"}:
        raise InvalidContribution("malformed_contribution", "wrong top-level fields")
    if obj["v"] != WIRE_VERSION or obj["kind"] != "contribution":
        raise InvalidContribution("malformed_contribution", f"unsupported version/kind {obj['v']!r}/{obj['kind']!r}")
    values, blob = obj["values"], obj["ciphertexts"]
    width = public.ciphertext_bytes
    if not isinstance(values, int) or isinstance(values, bool) or values < 1:
        raise InvalidContribution("malformed_contribution", "values must be a positive integer")
    if not isinstance(blob, bytes) or len(blob) % width or not 0 < len(blob) // width <= max_ciphertexts:
        raise InvalidContribution("malformed_contribution", f"ciphertexts must be 1..{max_ciphertexts} "
                                                            f"values of {width} bytes")
    cs = tuple(int.from_bytes(blob[i:i + width], "big") for i in range(0, len(blob), width))
    if not all(public.is_valid_ciphertext(c) for c in cs):
        raise InvalidContribution("malformed_contribution", "a ciphertext is not in Z*_{n^2}")
    try:
        proof = subset_range.SubsetRangeProof.from_wire(obj["proof"])
    except ValueError as exc:
        raise InvalidContribution("malformed_contribution", f"proof: {exc}") from exc
    return Contribution(values, cs, proof)


# --- blame after an overflow (issue 11 finding 5) -------------------------------------------
#
# The contribution proof bounds plaintexts, not slots, so an accepted contribution can still
# make the aggregate's slot sums unreachable (SlotOverflow at decode). The position is known
# from the decrypted aggregate; every contributor then proves, with the exact slot proof of
# crypto/subset_range.py, that the slots 0..i of its plaintext j were in range (all of them,
# and nothing above, when the plaintext itself overflowed). If they all do, no slot sum can
# overflow at (j, i): slots 0..i of c in-range plaintexts add without a carry. So at least
# one contributor cannot prove, and whoever cannot is the one to name. This names an
# overflow's author; it does not stop a value that stays inside the decode window (see
# docs/crypto-contribution.md, "Per-slot bounds").

PURPOSE_SLOT_RANGE = "slot-range"
SLOT_PROOF_VERSION = 1


@dataclass(frozen=True)
class Blame:
    """The position an overflowing aggregate asks every contributor to prove in range."""

    plaintext_index: int
    slot: int
    top: bool  # the whole plaintext: every slot in range and nothing above the last


def slot_shape(layout: PackingLayout) -> subset_range.SlotLayout:
    return subset_range.SlotLayout(layout.slot_bits, layout.quant_bits, layout.plaintext_bits,
                                   layout.slots_per_plaintext)


def blame_for(overflow: packing.SlotOverflow, layout: PackingLayout) -> Blame | None:
    """Where the blame step looks after this SlotOverflow (None: the error names no position)."""
    k = layout.slots_per_plaintext
    if overflow.value_index is not None:
        plaintext, slot = divmod(overflow.value_index, k)
        return Blame(plaintext, slot, False)
    if overflow.plaintext_index is not None:
        return Blame(overflow.plaintext_index, k - 1, True)
    return None


def spot_check_blames(beacon: bytes, layout: PackingLayout, value_count: int, count: int) -> list[Blame]:
    """`count` whole plaintexts to prove in range in a round that did not overflow.

    A contributor with out-of-range slots in a fraction f of its plaintexts is named with
    probability 1 - (1 - f)^count. `beacon` must be unknown to every contributor until its
    contribution is fixed (for example a hash of the validators' signatures on the agreed
    contributor set); a hash of the contributions alone can be ground by the last one.
    """
    plaintexts = layout.plaintexts_needed(value_count)
    if not 1 <= count <= plaintexts:
        raise ValueError(f"count must be in 1..{plaintexts}")
    stream = hashlib.shake_256(b"sealmesh/spot-check/v1" + bytes(beacon)).digest(8 * 4 * count + 64)
    chosen: list[int] = []
    for offset in range(0, len(stream) - 7, 8):
        j = int.from_bytes(stream[offset:offset + 8], "big") % plaintexts  # bias < 2^-40
        if j not in chosen:
            chosen.append(j)
        if len(chosen) == count:
            break
    k = layout.slots_per_plaintext
    return [Blame(j, k - 1, True) for j in chosen]


def slot_context_for(public: PublicKey, mesh_id: str, round_id: int, sender: str, blame: Blame) -> bytes:
    return proofs.ProofContext(public.n, mesh_id, round_id, sender, blame.plaintext_index,
                               PURPOSE_SLOT_RANGE).encode()


def prove_slots(public: PublicKey, layout: PackingLayout, update: np.ndarray, precomputed: Precomputation,
                blame: Blame, context: bytes) -> subset_range.SlotRangeProof:
    """The trainer's answer to a blame: its plaintext at blame.plaintext_index is in range there.

    Needs the update and the Precomputation that seal() used (its randomizers open the
    ciphertexts, so keep it as secret as the update until the round is over).
    """
    values = np.asarray(update, dtype=np.float32).ravel()
    plaintexts = packing.pack(packing.quantize(values, layout), layout)
    j = blame.plaintext_index
    if not 0 <= j < len(plaintexts) or len(precomputed.randomizers) != len(plaintexts):
        raise ValueError("the blame's plaintext index or the precomputation does not fit this update")
    rho, h = precomputed.randomizers[j]
    n, n2 = mpz(public.n), mpz(public.n_squared)
    c = (1 + mpz(plaintexts[j]) * n) * h % n2
    return subset_range.prove_slots(public.n, int(c), plaintexts[j], rho, slot_shape(layout), blame.slot,
                                    context, top=blame.top)


def verify_slots(public: PublicKey, layout: PackingLayout, contribution: Contribution, blame: Blame,
                 proof: subset_range.SlotRangeProof, context: bytes) -> None:
    """Raises InvalidContribution("bad_slot_proof") unless the proof answers the blame for it.

    A blame that does not fit the layout or the contribution is the caller's mistake
    (ValueError, SubsetRangeError), never evidence against the contributor.
    """
    if not 0 <= blame.plaintext_index < len(contribution.ciphertexts):
        raise ValueError(f"the blame names plaintext {blame.plaintext_index}; the contribution has "
                         f"{len(contribution.ciphertexts)}")
    c = contribution.ciphertexts[blame.plaintext_index]
    ok = subset_range.verify_slots(public.n, c, proof, slot_shape(layout), blame.slot, context, top=blame.top)
    if not ok:
        raise InvalidContribution("bad_slot_proof", f"slots 0..{blame.slot} of plaintext "
                                                    f"{blame.plaintext_index} are not proven in range")


def encode_slot_proof(proof: subset_range.SlotRangeProof) -> bytes:
    return msgpack.packb({"v": SLOT_PROOF_VERSION, "kind": "slot-range", "proof": proof.to_wire()},
                         use_bin_type=True)


def decode_slot_proof(data: bytes) -> subset_range.SlotRangeProof:
    """Strict decode; raises InvalidContribution("malformed_slot_proof", ...) on anything off."""
    try:
        obj = unpack_strict(data)
    except Exception as exc:
        raise InvalidContribution("malformed_slot_proof", f"not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"v", "kind", "proof"} or obj["v"] != SLOT_PROOF_VERSION \
            or obj["kind"] != "slot-range":
        raise InvalidContribution("malformed_slot_proof", "wrong fields, version or kind")
    try:
        return subset_range.SlotRangeProof.from_wire(obj["proof"])
    except ValueError as exc:
        raise InvalidContribution("malformed_slot_proof", str(exc)) from exc
