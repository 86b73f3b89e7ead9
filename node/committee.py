"""The committee's threshold Paillier key on disk, who decrypts which block, partial blobs.

A node's committee directory (DATA_DIR/committee) holds:

    committee.json   members (hotkeys in key-share order: member i holds share i),
                     threshold, key bits, public key id, and the mesh's round policy
                     (protocol.aggregation.RoundPolicy: min/max contributors, layout,
                     bounds; absent: its defaults). Every node holds the same file, so
                     every node refuses a RoundOpen that names another minimum.
    public.msgpack   the public key and the members' verification keys
    share.msgpack    0600, members only: this member's secret share

`sealmesh testnet` and `sealmesh committee deal` (node/committee_cli.py) deal the key
(crypto.paillier.deal) and write these files; the dealer-free ceremony (`sealmesh
committee keygen`, node/keygen.py) writes them too, keeping its member_key.msgpack as
the share. A committee that can decrypt single updates (protocol/committee_rules.py)
loads only when the node's settings say insecure_small_committee, with a warning. Everything else in this module is the
shell's side of threshold decryption: the wire form of aggregates and partial-decryption
blobs, and combining the batches a validator's machine chose. Which member decrypts which
block (substitutes, cover) is protocol.aggregation's rule (_blocks.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import msgpack

from crypto import paillier
from crypto.contribution import DecryptionBlock
from crypto.paillier import BatchPartialDecryption, KeyShare, PublicKey, VerificationKeys
from node.files import write_atomic
from protocol.aggregation import RoundPolicy
from protocol.committee_rules import committee_size_problem
from crypto.wire import unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError

COMMITTEE_DIR = "committee"
INFO_FILE = "committee.json"
PUBLIC_FILE = "public.msgpack"
SHARE_FILE = "share.msgpack"
KEYGEN_FILE = "member_key.msgpack"  # node/keygen.py's result, when the ceremony made the key
WIRE_VERSION = 1

log = logging.getLogger("sealmesh.committee")


class CommitteeKeyError(LocalProtocolError):
    """Our committee files are missing or inconsistent; the hint says what to do."""

    reason = "committee_key"


class BadAggregateBlob(RemoteProtocolError):
    reason = "bad_aggregate_blob"


class BadPartialBlob(RemoteProtocolError):
    reason = "bad_partial_blob"


@dataclass(frozen=True)
class CommitteeKey:
    public: PublicKey
    verification_keys: VerificationKeys
    threshold: int
    members: tuple[str, ...]  # hotkeys; members[i - 1] holds share i
    share: KeyShare | None = None  # ours, when this node is a member
    plaintext_scale: int = 1  # a DKG key decrypts to scale * m (crypto/dkg.py); dealt keys to m
    round_policy: RoundPolicy = RoundPolicy()  # the mesh's, from committee.json, never from a RoundOpen

    @property
    def public_key_id(self) -> str:
        return public_key_id(self.public)

    def index_of(self, hotkey: str) -> int:
        """1-based share index of a member."""
        try:
            return self.members.index(hotkey) + 1
        except ValueError:
            raise CommitteeKeyError(f"{hotkey} is not a committee member") from None


def public_key_id(public: PublicKey) -> str:
    return hashlib.sha256(paillier.encode_public_key(public)).hexdigest()


def majority(n: int) -> int:
    """t for an n-member committee: a strict majority (2-of-2, 2-of-3, 3-of-5)."""
    return n // 2 + 1


# --- files ------------------------------------------------------------------------------


def save_committee(directory: Path, key: CommitteeKey) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    info = {"members": list(key.members), "threshold": key.threshold, "key_bits": key.public.bits,
            "public_key_id": key.public_key_id, "round_policy": key.round_policy.to_doc()}
    public = {"v": WIRE_VERSION, "public_key": paillier.encode_public_key(key.public),
              "verification_keys": paillier.encode_verification_keys(key.public, key.verification_keys),
              "plaintext_scale": key.plaintext_scale.to_bytes(key.public.ciphertext_bytes, "big")}
    write_atomic(directory / PUBLIC_FILE, msgpack.packb(public, use_bin_type=True))
    if key.share is not None:
        write_atomic(directory / SHARE_FILE, paillier.encode_key_share(key.share), mode=0o600)
    write_atomic(directory / INFO_FILE, json.dumps(info, indent=1).encode())


def load_committee(directory: Path, me: str | None = None, *,
                   insecure_small_committee: bool = False) -> CommitteeKey:
    """The committee key, with our share when `me` is a member; CommitteeKeyError says why not.
    A committee that can decrypt single updates loads only with insecure_small_committee."""
    info_path = directory / INFO_FILE
    if not info_path.exists():
        raise CommitteeKeyError(f"{info_path} not found: copy the directory that `sealmesh committee deal` "
                                f"or `sealmesh committee keygen` wrote for this node to {directory}")
    try:
        info = json.loads(info_path.read_text())
        members, threshold = tuple(info["members"]), int(info["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CommitteeKeyError(f"{info_path}: unreadable ({exc})") from exc
    try:
        policy = RoundPolicy.from_doc(info.get("round_policy", {}))
    except LocalProtocolError as exc:
        raise CommitteeKeyError(f"{info_path}: {exc}; every node of the mesh needs the same round_policy") from exc
    public, vks, scale = _load_public(directory)
    if vks.n_parties != len(members) or not 1 <= threshold <= len(members):
        raise CommitteeKeyError(f"{directory}: {len(members)} members, {vks.n_parties} verification "
                                f"keys, threshold {threshold}")
    if info.get("public_key_id") not in (None, public_key_id(public)):
        raise CommitteeKeyError(f"{directory}: public.msgpack is not the key committee.json names")
    share = _load_share(directory, public) if me in members else None
    if share is not None:
        if share.index != members.index(me) + 1 or share.threshold != threshold:
            raise CommitteeKeyError(f"{directory}: our share is number {share.index} of a {share.threshold}-"
                                    f"of-{share.n_parties} key, committee.json says otherwise")
        if vks.key_of(share.index) != share.v_i:
            raise CommitteeKeyError(f"{directory}: our share does not match its verification key")
    _check_size(directory, len(members), threshold, insecure_small_committee)
    return CommitteeKey(public, vks, threshold, members, share, scale, policy)


def _check_size(directory: Path, members: int, threshold: int, allowed: bool) -> None:
    """Refuse (or, when the operator allowed it, warn at every start about) a committee
    whose members can decrypt single updates."""
    problem = committee_size_problem(members, threshold)
    if problem is None:
        return
    if not allowed:
        raise CommitteeKeyError(f"{directory}: {problem}; use a committee of 3+ members with threshold 2+, "
                                "or set insecure_small_committee = true (--insecure-small-committee) "
                                "on a test mesh")
    log.warning("INSECURE committee (%s): %s; allowed by insecure_small_committee", directory, problem)


def _load_public(directory: Path) -> tuple[PublicKey, VerificationKeys, int]:
    keygen = directory / KEYGEN_FILE
    try:
        if not (directory / PUBLIC_FILE).exists() and keygen.exists():
            raw = msgpack.unpackb(keygen.read_bytes(), raw=False)
            public = paillier.decode_public_key(raw["public_key"])
            scale = _ceremony_scale(raw)
        else:
            raw = msgpack.unpackb((directory / PUBLIC_FILE).read_bytes(), raw=False)
            public = paillier.decode_public_key(raw["public_key"])
            scale = int.from_bytes(raw["plaintext_scale"], "big")
        vks = paillier.decode_verification_keys(public, raw["verification_keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommitteeKeyError(f"{directory}: no readable public key ({exc})") from exc
    return public, vks, scale % public.n


def _load_share(directory: Path, public: PublicKey) -> KeyShare:
    try:
        if (directory / SHARE_FILE).exists():
            share = paillier.decode_key_share((directory / SHARE_FILE).read_bytes())
        else:
            from crypto import dkg  # the ceremony's share format

            raw = msgpack.unpackb((directory / KEYGEN_FILE).read_bytes(), raw=False)
            share = dkg.decode_key_share(raw["key_share"]).share
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommitteeKeyError(f"{directory}: this member's share is unreadable ({exc}); it must be "
                                f"{SHARE_FILE} (dealt) or {KEYGEN_FILE} (ceremony)") from exc
    if share.public.n != public.n:
        raise CommitteeKeyError(f"{directory}: the share belongs to another key")
    return share


def _ceremony_scale(raw: Mapping) -> int:
    return int.from_bytes(bytes.fromhex(raw["plaintext_scale"]), "big", signed=True)


def deal_committee(members: Sequence[str], key_bits: int, threshold: int | None = None) -> list[CommitteeKey]:
    """A trusted dealer's key for `members` (sorted order is share order), t = majority
    unless given: one CommitteeKey per member, each holding only its own share. The
    dealer saw every share: for meshes that accept a trusted dealer."""
    ordered = tuple(sorted(members))
    t = majority(len(ordered)) if threshold is None else threshold
    public, shares, vks = paillier.deal(key_bits, t, len(ordered),
                                        allow_weak=key_bits not in paillier.SUPPORTED_BITS)
    return [CommitteeKey(public, vks, t, ordered, share) for share in shares]


def public_part(key: CommitteeKey) -> CommitteeKey:
    """What trainers and everyone outside the committee get: the same key, no share."""
    return replace(key, share=None)


def save_ceremony_committee(directory: Path, members: Sequence[str],
                            round_policy: RoundPolicy = RoundPolicy()) -> CommitteeKey:
    """Complete a finished ceremony's member directory for the node: committee.json and
    public.msgpack in this module's format beside member_key.msgpack, which stays the
    share (it is read as the share when share.msgpack is absent). `members`: the
    ceremony's roster, in --members order (member i holds share i). Returns the key."""
    try:
        raw = msgpack.unpackb((directory / KEYGEN_FILE).read_bytes(), raw=False)
        public = paillier.decode_public_key(raw["public_key"])
        vks = paillier.decode_verification_keys(public, raw["verification_keys"])
        threshold, scale = int(raw["threshold"]), _ceremony_scale(raw) % public.n
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommitteeKeyError(f"{directory}: no finished ceremony result ({exc})") from exc
    if vks.n_parties != len(members):
        raise CommitteeKeyError(f"{directory}: the ceremony made {vks.n_parties} shares, "
                                f"the roster names {len(members)} members")
    key = CommitteeKey(public, vks, threshold, tuple(members), None, scale, round_policy)
    save_committee(directory, key)
    return key


# --- blobs -------------------------------------------------------------------------------


def partial_context(mesh_id: str, round_id: int, aggregate_id: str, block: int) -> bytes:
    """What a block's batch proof is bound to: it cannot be replayed in another round or block."""
    return f"sealmesh/partial/v1/{mesh_id}/{round_id}/{aggregate_id}/{block}".encode()


def encode_aggregate(public: PublicKey, ciphertexts: Sequence[int]) -> bytes:
    width = public.ciphertext_bytes
    return msgpack.packb({"v": WIRE_VERSION, "kind": "aggregate",
                          "ciphertexts": b"".join(int(c).to_bytes(width, "big") for c in ciphertexts)},
                         use_bin_type=True)


_AGGREGATE_FIELDS = frozenset({"v", "kind", "ciphertexts"})  # what encode_aggregate writes
_PARTIAL_FIELDS = frozenset({"v", "kind", "index", "aggregate", "blocks"})  # what encode_partial_blob writes


def decode_aggregate(public: PublicKey, data: bytes, *, count: int) -> list[int]:
    try:
        obj = unpack_strict(data)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadAggregateBlob(f"aggregate is not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != WIRE_VERSION or obj.get("kind") != "aggregate":
        raise BadAggregateBlob("not an aggregate blob of a known version")
    if set(obj) != _AGGREGATE_FIELDS:  # strict: an extra field would change the blob id and mean nothing
        raise BadAggregateBlob(f"aggregate blob has fields {sorted(map(str, obj))}, "
                               f"expected exactly {sorted(_AGGREGATE_FIELDS)}")
    raw, width = obj.get("ciphertexts"), public.ciphertext_bytes
    if not isinstance(raw, bytes) or len(raw) != count * width:
        raise BadAggregateBlob(f"aggregate must hold {count} ciphertexts of {width} bytes")
    cs = [int.from_bytes(raw[i:i + width], "big") for i in range(0, len(raw), width)]
    if not all(public.is_valid_ciphertext(c) for c in cs):
        raise BadAggregateBlob("an aggregate ciphertext is not in Z*_{n^2}")
    return cs


def encode_partial_blob(public: PublicKey, index: int, aggregate_id: str,
                        batches: Mapping[int, BatchPartialDecryption]) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, "kind": "partial", "index": index, "aggregate": aggregate_id,
                          "blocks": [[b, paillier.encode_batch_partial(public, batches[b])]
                                     for b in sorted(batches)]}, use_bin_type=True)


def decode_partial_blob(key: CommitteeKey, data: bytes, *, member_index: int, aggregate_id: str,
                        blocks: Sequence[DecryptionBlock]) -> dict[int, BatchPartialDecryption]:
    """block number -> batch; BadPartialBlob if it is not member_index's for this aggregate."""
    try:
        obj = unpack_strict(data)
    except Exception as exc:
        raise BadPartialBlob(f"partial blob is not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != WIRE_VERSION or obj.get("kind") != "partial":
        raise BadPartialBlob("not a partial-decryption blob of a known version")
    if set(obj) != _PARTIAL_FIELDS:  # strict, as decode_aggregate
        raise BadPartialBlob(f"partial blob has fields {sorted(map(str, obj))}, "
                             f"expected exactly {sorted(_PARTIAL_FIELDS)}")
    if obj.get("index") != member_index or obj.get("aggregate") != aggregate_id:
        raise BadPartialBlob(f"blob is member {obj.get('index')!r}'s for {str(obj.get('aggregate'))[:12]}, "
                             f"expected member {member_index}'s for {aggregate_id[:12]}")
    entries = obj.get("blocks")
    if not isinstance(entries, list) or not 1 <= len(entries) <= len(blocks):
        raise BadPartialBlob(f"blocks: 1..{len(blocks)} entries expected")
    out: dict[int, BatchPartialDecryption] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and 0 <= entry[0] < len(blocks) and entry[0] not in out and isinstance(entry[1], bytes)):
            raise BadPartialBlob("each block entry is [block number, batch bytes], numbers distinct")
        block = blocks[entry[0]]
        try:
            batch = paillier.decode_batch_partial(key.public, len(key.members), entry[1],
                                                  count=block.stop - block.start)
        except ValueError as exc:
            raise BadPartialBlob(f"block {entry[0]}: {exc}") from exc
        if batch.index != member_index:
            raise BadPartialBlob(f"block {entry[0]} is signed for member {batch.index}")
        out[entry[0]] = batch
    return out


def combine_blocks(key: CommitteeKey, aggregate: Sequence[int], blocks: Sequence[DecryptionBlock],
                   batches: Mapping[int, Mapping[int, BatchPartialDecryption]], chosen: Mapping[int, list[int]],
                   context_of, workers: int = 1) -> list[int]:
    """Plaintexts of the whole aggregate: each block from its chosen members' batches
    (re-verified by combine_many on `workers` threads); `batches`: member -> block -> batch."""
    plaintexts: list[int] = []
    for number, block in enumerate(blocks):
        picked = [batches[m][number] for m in chosen[number]]
        cs = aggregate[block.start:block.stop]
        if key.plaintext_scale in (0, 1):
            plaintexts += paillier.combine_many(key.public, key.verification_keys, key.threshold, cs, picked,
                                                context_of(number), workers=workers)
        else:
            from crypto import dkg

            plaintexts += dkg.combine_many(key.public, key.verification_keys, key.threshold, cs, picked,
                                           context_of(number), key.plaintext_scale, workers=workers)
    return plaintexts


__all__ = [
    "BadAggregateBlob", "BadPartialBlob", "COMMITTEE_DIR", "CommitteeKey", "CommitteeKeyError",
    "combine_blocks", "deal_committee", "decode_aggregate",
    "decode_partial_blob",
    "encode_aggregate", "encode_partial_blob", "load_committee", "majority", "partial_context", "public_key_id",
    "public_part", "save_ceremony_committee", "save_committee", "write_atomic",
]
