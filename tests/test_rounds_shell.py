"""The training-round shell's helpers, in process: committee files, decryption blocks and
cover, aggregate and partial blobs, round config, state files, cheating, the report."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from crypto import contribution, paillier
from node import committee as cm
from protocol import aggregation as agg
from node.roles import rounds
from node.roles.trainer import shard_index, tamper, TrainerUsageError
from protocol.errors import LocalProtocolError, RemoteProtocolError

MEMBERS = ["5Alice", "5Bob", "5Carol"]


@pytest.fixture(scope="module")
def keys():
    return cm.deal_committee(MEMBERS, 512)


def test_deal_gives_majority_threshold_and_one_share_each(keys):
    assert [k.threshold for k in keys] == [2, 2, 2]
    assert [k.share.index for k in keys] == [1, 2, 3]
    assert len({k.public_key_id for k in keys}) == 1
    assert cm.majority(2) == 2 and cm.majority(3) == 2 and cm.majority(5) == 3


def test_committee_files_round_trip_and_share_is_private(tmp_path, keys):
    key = keys[1]
    cm.save_committee(tmp_path, key)
    assert stat.S_IMODE(os.stat(tmp_path / cm.SHARE_FILE).st_mode) == 0o600
    loaded = cm.load_committee(tmp_path, "5Bob")
    assert loaded.share.index == 2 and loaded.share.secret == key.share.secret
    assert loaded.public.n == key.public.n and loaded.threshold == 2
    assert loaded.members == tuple(MEMBERS) and loaded.index_of("5Carol") == 3
    # a trainer (not a member) gets the public part only
    assert cm.load_committee(tmp_path, "5Trainer").share is None


def test_committee_files_missing_or_inconsistent_say_why(tmp_path, keys):
    with pytest.raises(cm.CommitteeKeyError, match="not found"):
        cm.load_committee(tmp_path, "5Bob")
    cm.save_committee(tmp_path, keys[1])
    info = json.loads((tmp_path / cm.INFO_FILE).read_text())
    info["members"] = ["5Bob", "5Alice", "5Carol"]  # Bob's share is number 2, not 1
    (tmp_path / cm.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(cm.CommitteeKeyError, match="share is number 2"):
        cm.load_committee(tmp_path, "5Bob")
    (tmp_path / cm.INFO_FILE).write_text("{not json")
    with pytest.raises(cm.CommitteeKeyError, match="unreadable"):
        cm.load_committee(tmp_path, "5Bob")
    other = cm.deal_committee(MEMBERS, 512)[0]
    cm.save_committee(tmp_path, other)
    (tmp_path / cm.SHARE_FILE).write_bytes(paillier.encode_key_share(keys[0].share))
    with pytest.raises(cm.CommitteeKeyError, match="another key"):
        cm.load_committee(tmp_path, "5Alice")
    with pytest.raises(cm.CommitteeKeyError, match="not a committee member"):
        other.index_of("5Mallory")


@pytest.mark.parametrize("n,t", [(2, 2), (3, 2), (5, 3)])
def test_each_block_gets_t_members_when_all_alive_and_when_one_is_gone(n, t):
    blocks = agg.blocks_for(100, n, t)
    everyone = set(range(1, n + 1))
    holders = {m: agg.blocks_to_decrypt(blocks, m, everyone, t) for m in everyone}
    assert agg.cover(blocks, holders, t) is not None
    assert all(len(h) == t for h in holders.values())  # t/n of the work each
    if n > t:
        gone = n  # the last member never shows up
        alive = everyone - {gone}
        holders = {m: agg.blocks_to_decrypt(blocks, m, alive, t) for m in alive}
        chosen = agg.cover(blocks, holders, t)
        assert chosen is not None and all(gone not in ms for ms in chosen.values())
        # without the cover, the survivors' own blocks alone do not suffice
        own = {m: [b for b, blk in enumerate(blocks) if m in blk.members] for m in alive}
        assert agg.cover(blocks, own, t) is None


@pytest.fixture(scope="module")
def sealed_round(keys):
    """Two real contributions under the dealt key, their aggregate, and the layout."""
    public = keys[0].public
    layout = contribution.derive_layout(1.0, 16, 16, public.bits)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.5, 0.5, 300).astype(np.float32) for _ in range(2)]
    items = [contribution.seal(public, layout, u, contribution.context_for(public, "m", 0, f"t{i}"))
             for i, u in enumerate(updates)]
    return layout, updates, items, contribution.aggregate(public, items)


def test_partials_by_block_combine_to_the_mean(keys, sealed_round):
    layout, updates, _, total = sealed_round
    public = keys[0].public
    blocks = agg.blocks_for(len(total), 3, 2)
    aggregate_id = "ab" * 32
    context = lambda b: cm.partial_context("m", 0, aggregate_id, b)  # noqa: E731
    batches = {}
    for key in keys[:2]:  # member 3 is gone: 1 and 2 cover its blocks
        mine = agg.blocks_to_decrypt(blocks, key.share.index, {1, 2}, 2)
        data = cm.encode_partial_blob(public, key.share.index, aggregate_id, {
            b: paillier.partial_decrypt_many(key.share, total[blocks[b].start:blocks[b].stop], context(b), workers=1)
            for b in mine})
        batches[key.share.index] = cm.decode_partial_blob(keys[0], data, member_index=key.share.index,
                                                          aggregate_id=aggregate_id, blocks=blocks)
    chosen = agg.cover(blocks, {m: list(b) for m, b in batches.items()}, 2)
    plaintexts = cm.combine_blocks(keys[0], total, blocks, batches, chosen, context)
    mean = contribution.decode_sum(plaintexts, 300, 2, layout)
    assert np.max(np.abs(mean - (updates[0] + updates[1]) / 2)) < 2 * layout.step


def test_partial_blob_of_another_member_or_aggregate_or_garbage_is_refused(keys, sealed_round):
    _, _, _, total = sealed_round
    public = keys[0].public
    blocks = agg.blocks_for(len(total), 3, 2)
    agg_id = "cd" * 32
    batch = paillier.partial_decrypt_many(keys[0].share, total[blocks[0].start:blocks[0].stop], b"x", workers=1)
    data = cm.encode_partial_blob(public, 1, agg_id, {0: batch})
    with pytest.raises(cm.BadPartialBlob) as exc:
        cm.decode_partial_blob(keys[0], data, member_index=2, aggregate_id=agg_id, blocks=blocks)
    assert exc.value.reason == "bad_partial_blob"
    with pytest.raises(cm.BadPartialBlob):
        cm.decode_partial_blob(keys[0], data, member_index=1, aggregate_id="ef" * 32, blocks=blocks)
    with pytest.raises(cm.BadPartialBlob, match="not msgpack"):
        cm.decode_partial_blob(keys[0], b"\xc1garbage", member_index=1, aggregate_id=agg_id, blocks=blocks)
    short = paillier.partial_decrypt_many(keys[0].share, total[blocks[0].start:blocks[0].stop - 1], b"x", workers=1)
    wrong_block = cm.encode_partial_blob(public, 1, agg_id, {0: short})  # one value short for block 0
    with pytest.raises(cm.BadPartialBlob, match="block 0"):
        cm.decode_partial_blob(keys[0], wrong_block, member_index=1, aggregate_id=agg_id, blocks=blocks)


def test_aggregate_blob_round_trips_and_refuses_bad_bytes(keys, sealed_round):
    public = keys[0].public
    total = sealed_round[3]
    data = cm.encode_aggregate(public, total)
    assert cm.encode_aggregate(public, total) == data  # deterministic: every validator gets one id
    assert cm.decode_aggregate(public, data, count=len(total)) == total
    with pytest.raises(cm.BadAggregateBlob):
        cm.decode_aggregate(public, data, count=len(total) + 1)
    with pytest.raises(cm.BadAggregateBlob):
        cm.decode_aggregate(public, cm.encode_aggregate(public, [0] * len(total)), count=len(total))
    with pytest.raises(RemoteProtocolError):
        cm.decode_aggregate(public, b"junk", count=1)


def test_tampered_contribution_decodes_but_fails_its_proof(keys, sealed_round):
    layout, _, items, _ = sealed_round
    public = keys[0].public
    context = contribution.context_for(public, "m", 0, "t0")
    bad = contribution.decode(public, contribution.encode(public, tamper(public, items[0])))
    assert bad.ciphertexts[1:] == items[0].ciphertexts[1:] and bad.ciphertexts[0] != items[0].ciphertexts[0]
    contribution.verify(public, layout, items[0], context, value_count=300)  # the honest one passes
    with pytest.raises(contribution.InvalidContribution) as exc:
        contribution.verify(public, layout, bad, context, value_count=300)
    assert exc.value.reason == "bad_proof"
    size = len(contribution.encode(public, items[0]))
    assert size <= rounds.max_contribution_bytes(public.bits, len(items[0].ciphertexts))


def test_round_config_file_defaults_overrides_and_errors(tmp_path):
    assert rounds.load_round_config(tmp_path) == rounds.RoundConfig()
    rounds.write_round_config(tmp_path, rounds.RoundConfig(collect_s=7.0, outer="diloco", outer_lr=0.7))
    loaded = rounds.load_round_config(tmp_path)
    assert loaded.collect_s == 7.0 and loaded.outer == "diloco"
    (tmp_path / rounds.ROUND_CONFIG_FILE).write_text(json.dumps({"colect_s": 3}))
    with pytest.raises(rounds.RoundConfigError, match="colect_s"):
        rounds.load_round_config(tmp_path)
    with pytest.raises(rounds.RoundConfigError, match="outer"):
        rounds.RoundConfig(outer="adam")
    with pytest.raises(rounds.RoundConfigError, match="steps"):
        rounds.RoundConfig(steps=0)
    with pytest.raises(rounds.RoundConfigError, match="min_contributors"):
        rounds.RoundConfig(min_contributors=5, max_contributors=4)


def test_crypto_threads_default_to_every_core_and_refuse_nonsense(monkeypatch):
    monkeypatch.setattr(rounds.os, "cpu_count", lambda: 6)
    assert rounds.RoundConfig().threads == 6
    assert rounds.RoundConfig(crypto_threads=1).threads == 1
    monkeypatch.setattr(rounds.os, "cpu_count", lambda: None)
    assert rounds.RoundConfig().threads == 1
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(rounds.RoundConfigError, match="crypto_threads"):
            rounds.RoundConfig(crypto_threads=bad)


def test_state_files_replace_atomically_and_refuse_garbage(tmp_path):
    files = rounds.StateFiles(tmp_path / "s", "validator")
    files.save(3, {"a": 1, "b": b"\x00"})
    files.save(3, {"a": 2, "b": b"\x01"})
    files.save(10, {"a": 3, "b": b""})
    assert files.load_all() == {3: {"a": 2, "b": b"\x01"}, 10: {"a": 3, "b": b""}}
    assert not list((tmp_path / "s").glob("*.tmp"))
    files.path(4).write_bytes(b"\xc1")
    with pytest.raises(LocalProtocolError, match="unreadable round state"):
        files.load_all()


def test_trainer_shard_index_and_unknown_trainer():
    assert shard_index(["5a", "5b", "5c"], "5c") == 2
    with pytest.raises(TrainerUsageError):
        shard_index(["5a"], "5z")


def test_evidence_blob_is_canonical_json():
    doc = dict(round_id=1, trainer="5t", blob_id="ab" * 32, reason="bad_proof", hint="x", public_key_id="cd" * 32,
               mesh_id="m")
    data = rounds.evidence_blob(**doc)
    assert data == rounds.evidence_blob(**doc)
    assert json.loads(data)["reason"] == "bad_proof" and json.loads(data)["blob_id"] == "ab" * 32


def _status(hotkey, section):
    return {"hotkey": hotkey, "sections": {"training": section}}


def _entry(round_id, *, adapter="aa" * 32, before=5.0, after=4.5, phase="final"):
    return {"round": round_id, "phase": phase, "abort_reason": "" if phase == "final" else "no_agreement",
            "base_adapter_id": "bb" * 32, "adapter_id": adapter, "contributors": ["5t0", "5t1"],
            "rejected": [{"trainer": "5t2", "blob_id": "cc" * 32, "reason": "bad_proof", "evidence_id": "dd" * 32}],
            "partials_used": {"0": ["5v0", "5v1"]}, "bad_partials": {}, "loss_before": before,
            "loss_after": after, "seconds": {"collect": 10.0}, "mean_stats": {}}


def test_summarize_names_nodes_and_reports_each_kind_of_problem():
    from node.testnet import TestnetPlan

    plan = TestnetPlan(validators=2, trainers=3, rounds=2)
    statuses = {
        "validator-0": _status("5v0", {"role": "validator", "rounds": [_entry(0), _entry(1, after=5.1)]}),
        "validator-1": _status("5v1", {"role": "validator", "rounds": [_entry(0, adapter="ee" * 32)]}),
        "trainer-0": _status("5t0", {"role": "trainer", "rounds": []}),
        "trainer-2": _status("5t2", {"role": "trainer", "rounds": []}),
        "trainer-1": None,
    }
    report = rounds.summarize(plan, statuses)
    first = report["rounds"][0]
    assert first["contributors"] == ["trainer-0", "5t1"]  # unknown hotkeys stay abbreviated
    assert first["rejected"] == [{"trainer": "trainer-2", "reason": "bad_proof", "evidence_id": "dd" * 32}]
    assert first["partials_used"] == {"0": ["validator-0", "validator-1"]}
    problems = "\n".join(report["problems"])
    assert "round 0: validators disagree" in problems
    assert "round 1: eval loss did not fall" in problems
    assert "round 1: validator-1 ended without the round" in problems
    clean = rounds.summarize(plan, {"validator-0": statuses["validator-0"]})
    assert not any("round 0" in p for p in clean["problems"])
    assert rounds.summarize(TestnetPlan(trainers=0), statuses) == {"rounds": [], "problems": []}
