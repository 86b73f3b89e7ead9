"""What a long-running node keeps (protocol/retention.py): the newest rounds and what they
still need; never a running round, the newest adapter, or a blob a kept round names."""

from __future__ import annotations

from protocol.retention import MIN_KEEP_ROUNDS, RoundRecord, retention_plan


def chain(n: int, *, aborted: frozenset[int] = frozenset(), running: frozenset[int] = frozenset()):
    """n rounds, each contributing c<r>, aggregating a<r> and (if final) making adapter A<r> on
    the newest earlier final adapter (A-init at first)."""
    records, base = [], "A-init"
    for r in range(n):
        final = r not in aborted and r not in running
        adapter = f"A{r}" if final else ""
        blobs = frozenset({f"c{r}", f"a{r}"} | ({adapter} if adapter else set()))
        records.append(RoundRecord(r, r not in running, blobs, base, adapter))
        base = adapter or base
    return records


def test_the_newest_rounds_are_kept_and_older_ones_dropped_with_their_blobs():
    plan = retention_plan(chain(30), keep=10, pinned=["A-init"])
    assert plan.drop_rounds == tuple(range(20))
    assert "c0" in plan.delete_blobs and "a19" in plan.delete_blobs and "A18" in plan.delete_blobs
    assert "A19" not in plan.delete_blobs  # the base of round 20, which is kept
    assert "A-init" not in plan.delete_blobs  # pinned
    assert not any(b.endswith(("20", "25", "29")) for b in plan.delete_blobs)


def test_growth_is_bounded_whatever_the_history():
    for n in (10, 100, 1000):
        plan = retention_plan(chain(n), keep=10, pinned=["A-init"])
        assert n - len(plan.drop_rounds) == min(n, 10)


def test_a_running_round_is_never_dropped_however_old():
    plan = retention_plan(chain(30, running=frozenset({3})), keep=10)
    assert 3 not in plan.drop_rounds and "c3" not in plan.delete_blobs


def test_the_newest_final_round_survives_a_long_run_of_aborts():
    """Rounds 6..29 all abort: round 5's adapter is still the base of the next round, so round
    5 (and its adapter) stays while the aborted ones between are dropped."""
    plan = retention_plan(chain(30, aborted=frozenset(range(6, 30))), keep=10)
    assert 5 not in plan.drop_rounds and "A5" not in plan.delete_blobs
    assert set(plan.drop_rounds) == set(range(20)) - {5}


def test_keep_has_a_floor_for_the_blame_cool_down():
    plan = retention_plan(chain(10), keep=1)
    assert 10 - len(plan.drop_rounds) == MIN_KEEP_ROUNDS


def test_a_blob_shared_with_a_kept_round_is_not_deleted():
    records = chain(12)
    shared = RoundRecord(11, True, records[11].blobs | {"c0"}, records[11].base_adapter_id, records[11].adapter_id)
    plan = retention_plan(records[:11] + [shared], keep=5)
    assert 0 in plan.drop_rounds and "c0" not in plan.delete_blobs and "a0" in plan.delete_blobs
