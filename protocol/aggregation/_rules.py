"""Pure rules of a round once it is open: which contributions are aggregated (the draw),
which blocks a partial must carry, and the blame step after a slot overflow."""

from __future__ import annotations

import functools
import hashlib
from typing import Iterable, Mapping

from crypto.contribution import derive_layout
from protocol.aggregation._blocks import blocks_for
from protocol.aggregation._effects import BlamePosition
from protocol.aggregation_messages import MAX_ROUND_CONTRIBUTORS, RoundOpen


# --- which contributions are aggregated (issue 11 finding 8) ---------------------------
#
# First come, first served let k-1 colluders contribute first so that one honest trainer
# filled the last place: its update is then count x mean minus theirs. Validators now take
# every valid contribution up to candidate_limit and, after the deadline, draw
# max_contributors of them; the draw is seeded by the hash of the accepted (trainer, blob
# id) pairs themselves, so no single party picks it and every validator with the same
# accepted contributions draws the same set (docs/aggregation.md says what this does not
# protect against).

CANDIDATES_PER_PLACE = 4  # how many candidates a validator verifies per place in the set


def candidate_limit(ro: RoundOpen) -> int:
    """Contributions a validator receives (and verifies) at most: each costs a proof check."""
    return min(MAX_ROUND_CONTRIBUTORS, CANDIDATES_PER_PLACE * ro.max_contributors)


def draw_seed(ro: RoundOpen, accepted: Mapping[str, str]) -> bytes:
    """sha256 over the round (id, key, base) and every accepted (trainer, blob id) pair."""
    lines = [f"sealmesh/draw/v1/{ro.round_id}/{ro.public_key_id}/{ro.base_adapter_id}"]
    lines += [f"{t}:{accepted[t]}" for t in sorted(accepted)]
    return hashlib.sha256("\n".join(lines).encode()).digest()


def draw_contributors(ro: RoundOpen, accepted: Mapping[str, str]) -> list[str]:
    """The trainers whose contributions are aggregated, sorted: all of them up to
    max_contributors, else the max_contributors with the lowest sha256(seed || trainer)."""
    if len(accepted) <= ro.max_contributors:
        return sorted(accepted)
    seed = draw_seed(ro, accepted)
    ranked = sorted(accepted, key=lambda t: hashlib.sha256(seed + t.encode()).digest())
    return sorted(ranked[:ro.max_contributors])


# --- which blocks a partial must carry (issue 11 finding 7) ---------------------------


def own_blocks(ro: RoundOpen, member: str) -> tuple[int, ...]:
    """The decryption blocks (crypto.contribution.decryption_blocks over the aggregate's
    ciphertexts) that `member` is asked to decrypt first."""
    index = ro.committee.index(member) + 1
    blocks = round_blocks(ro)
    return tuple(b for b, block in enumerate(blocks) if index in block.members)


def round_blocks(ro: RoundOpen):
    """The decryption blocks of this round's aggregate (_blocks.blocks_for)."""
    return blocks_for(ro.ciphertexts_per_contribution, len(ro.committee), ro.threshold)


def partial_coverage_problem(ro: RoundOpen, member: str, blocks: Iterable[int]) -> str | None:
    """A member's (first) partial must carry each of its own blocks; one that carries only
    some would stall the combine while its member looks alive, so it is a bad partial and
    its blocks are covered by others. More blocks (cover for a gone member) are fine."""
    missing = sorted(set(own_blocks(ro, member)) - set(blocks))
    return f"blocks {missing} of {member}'s are missing" if missing else None


# --- the blame step after a slot overflow (issue 11 finding 5) -----------------------
#
# The contribution proof bounds plaintexts, not slots, so an accepted contribution can make
# the decrypted sum unpackable (SlotOverflow, with its position). Every contributor of the
# agreed set then proves that position in range with the exact slot proof; an honest one
# always can, and if all could, no slot sum could overflow there. So whoever fails or stays
# silent until the blame deadline is named, and only they: the round is aborted (no
# re-aggregation without them in the same round: docs/aggregation.md) and validators refuse
# their contributions for COOLDOWN_ROUNDS rounds.

BLAME_MS = 60_000  # proofs take 2-4 s each at 2048 bits, every contributor in parallel
MAX_BLAME_MS = 10 * 60_000
COOLDOWN_ROUNDS = 3
NAMED_OUT_OF_RANGE = "slot_out_of_range"  # its proof does not verify
NAMED_SILENT = "no_slot_proof"  # no proof (or none fetchable) by the blame deadline


@functools.lru_cache(maxsize=64)
def _slots_per_plaintext(clip_bound: float, quant_bits: int, max_contributors: int, key_bits: int) -> int | None:
    try:
        return derive_layout(clip_bound, quant_bits, max_contributors, key_bits).slots_per_plaintext
    except ValueError:
        return None


def blame_position_problem(ro: RoundOpen, position: BlamePosition) -> str | None:
    """Why `position` cannot be a blamed position of this round's layout, or None."""
    k = _slots_per_plaintext(ro.clip_bound, ro.quant_bits, ro.max_contributors, ro.key_bits)
    if k is None:
        return "the round's layout cannot be derived"
    if not 0 <= position.plaintext_index < ro.ciphertexts_per_contribution:
        return f"plaintext {position.plaintext_index} is outside 0..{ro.ciphertexts_per_contribution - 1}"
    if not 0 <= position.slot < k or (position.top and position.slot != k - 1):
        return f"slot {position.slot} (top={position.top}) does not fit {k} slots per plaintext"
    return None


def cooling_down(named_by_round: Mapping[int, Iterable[str]], round_id: int,
                 rounds: int = COOLDOWN_ROUNDS) -> frozenset[str]:
    """Trainers named by this validator's blame step in one of the `rounds` rounds before
    round_id: their contributions to round_id are refused (blamed_cooling_down)."""
    return frozenset(t for r, named in named_by_round.items() if round_id - rounds <= r < round_id for t in named)
