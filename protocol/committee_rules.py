"""When a committee is too small to keep single updates private.

The committee decrypts only the sum of at least min_contributors updates; that is the
whole privacy of a round. It holds only if no coalition of `threshold` key holders works
against the mesh. A threshold of 1 lets any one member decrypt every single update by
itself, and with fewer than 3 members there is no honest majority left to outvote the
holders of the threshold (2-of-2 is the two operators of the mesh agreeing). The dealer
command, the ceremony and the node at start all ask these functions, so they agree.
"""

from __future__ import annotations

MIN_PRIVATE_MEMBERS = 3
MIN_PRIVATE_THRESHOLD = 2


def committee_shape_problem(members: int, threshold: int) -> str | None:
    """Why `threshold`-of-`members` is no threshold key at all; no flag excuses it."""
    if members < 1:
        return "the committee has no members (the genesis file names no validator)"
    if not 1 <= threshold <= members:
        return f"threshold {threshold} with {members} members: need 1 <= threshold <= {members}"
    return None


def committee_size_problem(members: int, threshold: int) -> str | None:
    """Why a `threshold`-of-`members` committee can decrypt single updates, or None."""
    if members < MIN_PRIVATE_MEMBERS:
        return (f"a committee of {members} member(s) can decrypt single updates "
                f"(at least {MIN_PRIVATE_MEMBERS} are needed)")
    if threshold < MIN_PRIVATE_THRESHOLD:
        return f"threshold {threshold}: any one member can decrypt single updates alone"
    return None


__all__ = ["MIN_PRIVATE_MEMBERS", "MIN_PRIVATE_THRESHOLD", "committee_shape_problem", "committee_size_problem"]
