"""Who decrypts which block of the aggregate: the pure rules behind a partial decryption,
its substitutes and its cover (issue 11 finding 7, issue 14 item 1).

The aggregate's ciphertexts are split into one block per committee member
(crypto.contribution.decryption_blocks): block b is asked first of members b..b+t-1, so
every member decrypts t/n of the positions. A combine needs, for every block, t valid
batches from distinct members; a batch is valid when its proof verifies against the
agreed aggregate, whether it came in the member's first partial or in its cover partial.

Member numbers here are 1-based key-share indices (position in the committee + 1);
"holders" maps a member to the block numbers of its valid batches. Every member and
validator with the same view computes the same answer, so the work is not duplicated
and every validator combines the same batches.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from crypto.contribution import DecryptionBlock, decryption_blocks


def blocks_for(count: int, committee_size: int, threshold: int) -> list[DecryptionBlock]:
    """The decryption blocks of an aggregate of `count` ciphertexts."""
    return decryption_blocks(count, range(1, committee_size + 1), threshold)


def blocks_to_decrypt(blocks: Sequence[DecryptionBlock], me: int, alive: Iterable[int],
                      threshold: int) -> list[int]:
    """Block numbers member `me` decrypts: its own, and a gone member's where it is needed.

    A block whose assigned members are not all alive needs substitutes: the alive members
    outside it, lowest index first, as many as are missing. Every member that sees the
    same alive set picks the same substitutes, so the work is not duplicated.
    """
    alive = set(alive) | {me}
    chosen = []
    for number, block in enumerate(blocks):
        if me in block.members:
            chosen.append(number)
            continue
        missing = sum(1 for m in block.members if m not in alive)
        substitutes = sorted(m for m in alive if m not in block.members)[:missing]
        if me in substitutes:
            chosen.append(number)
    return chosen


def _members_by_block(block_count: int, holders: Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
    by_block: dict[int, set[int]] = {b: set() for b in range(block_count)}
    for member, numbers in holders.items():
        for b in numbers:
            if b in by_block:
                by_block[b].add(member)
    return by_block


def cover_for_missing(blocks: Sequence[DecryptionBlock], holders: Mapping[int, Iterable[int]], me: int,
                      threshold: int) -> list[int]:
    """Block numbers member `me` covers once the partials are in: blocks with fewer than t
    valid batches get substitutes from the members that released valid partials (so are
    live) and hold none for that block, lowest index first, as many as are missing.
    `holders`: member -> block numbers of its valid batches. Every member with the same
    view picks the same substitutes (issue 11 finding 7)."""
    if me not in holders:
        return []
    live = sorted(holders)
    chosen = []
    for number, have in sorted(_members_by_block(len(blocks), holders).items()):
        missing = threshold - len(have)
        if missing > 0 and me in [m for m in live if m not in have][:missing]:
            chosen.append(number)
    return chosen


def cover(blocks: Sequence[DecryptionBlock], holders: Mapping[int, Iterable[int]],
          threshold: int) -> dict[int, list[int]] | None:
    """For each block, the t members (lowest index first) whose valid partials cover it;
    None while some block has fewer than t. `holders`: member -> block numbers it gave."""
    by_block = _members_by_block(len(blocks), holders)
    if any(len(m) < threshold for m in by_block.values()):
        return None
    return {b: sorted(m)[:threshold] for b, m in by_block.items()}
