"""MemberSlash authored from what a round proved (issue 15): three validators' settlement
services in one process (real EmbeddedHeads, real signatures, the settle topic played by
tests/test_settlement_service.Router). The record author slashes an admitted member that
a round named; an operator's `member slash` goes through the same co-signer rule; a slash
that some validator's own round does not support is refused and changes nothing."""

from __future__ import annotations

import json

import trio

from crypto.identity import Hotkey
from node.roles import settlement as st
from protocol import head as h
from protocol import member_book as mb
from protocol.admission import JoinRequest
from protocol.inbound import seal_message
from tests.test_settlement_service import KEYS, A, B, C, T1, T2, Router, _open_mesh, quick, trio_test  # noqa: F401

FERDIE = Hotkey.from_uri("//Ferdie")
F = FERDIE.ss58_address
STAKE = 50


def join_bytes(joins_before: int = 0) -> bytes:
    now = st.now_ms()
    request = JoinRequest("svc-test", "12D3KooWFerdie", [], ["trainer"], STAKE, joins_before, now)
    return seal_message(FERDIE, request, now_ms=now).to_gossip_bytes()


def round_doc(n: int, rejected: dict[str, str] | None = None, bad: dict[str, str] | None = None) -> dict:
    return {"round": n, "adapter_id": f"adapter-{n}", "contributors": [T1, T2],
            "rejected": [{"trainer": t, "blob_id": "b" * 64, "reason": why, "evidence_id": "e" * 64}
                         for t, why in (rejected or {}).items()],
            "aborted": "", "bad_contributors": dict(bad or {})}


def ledgers(router: Router) -> list[h.Ledger]:
    return [router.services[k].head.machine.confirmed.ledger for k in (A, B, C)]


async def admit_ferdie(router: Router) -> None:
    await router.services[A].submit_tx(mb.Admit(A, join_bytes()))
    await router.until(lambda: all(F in lg.book.members for lg in ledgers(router)))


async def command(router: Router, party: str, payload: dict) -> dict:
    folder = router.contexts[party].data_dir / st.COMMANDS_DIR
    (folder / "member_slash.request").write_text(json.dumps(payload))
    await router.until(lambda: (folder / "member_slash.result").exists())
    result = json.loads((folder / "member_slash.result").read_text())
    (folder / "member_slash.result").unlink()
    return result


@trio_test
async def test_a_round_that_rejects_an_admitted_members_proof_gets_it_slashed(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=5)
        await admit_ferdie(router)
        pool_before = ledgers(router)[0].balances[h.POOL]
        for party in (A, B, C):  # every validator's round 0 rejected Ferdie's range proof
            router.services[party].record_round(round_doc(0, rejected={F: "bad_proof"}))
        for party in (A, B, C):  # and round 1 named him again before the slash was confirmed
            router.services[party].record_round(round_doc(1, bad={F: "slot_out_of_range"}))
        await router.until(lambda: all(F in lg.book.slashed for lg in ledgers(router)))
        after = ledgers(router)
        assert len({lg.hash() for lg in after}) == 1
        assert F not in after[0].book.members and after[0].book.slashed == {F: after[0].book.slashed[F]}
        await router.until(lambda: all(lg.rounds_settled == 2 for lg in ledgers(router))
                           and not router.services[A].queue)
        after = ledgers(router)
        # the escrow went to the pool, which paid two rounds' rewards; one slash only
        assert after[0].balances[h.POOL] == pool_before + STAKE - 2 * st.ROUND_REWARD and after[0].escrowed == 0
        assert router.section(A)["errors"] == []  # the second slash found him gone, quietly
        # the cool-down started: a new join of Ferdie is refused, by every party's rule
        machine = router.services[A].head.machine
        problem = mb.record_problem(mb.Admit(A, join_bytes(joins_before=1)), machine.confirmed.ledger,
                                    machine.membership)
        assert problem is not None and problem[0] == "slashed_cooldown"
        kept = json.loads((router.contexts[B].data_dir / st.OFFENCES_FILE).read_text())
        assert kept == {"0": {F: "invalid_contribution"}, "1": {F: "invalid_contribution"}}  # B's own views
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_slash_without_evidence_is_refused_and_changes_nothing(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=5)
        await admit_ferdie(router)
        for party in (A, C):  # round 0 accepted Ferdie's contribution here
            router.services[party].record_round(round_doc(0))
        router.services[B].record_round(round_doc(0, rejected={F: "bad_proof"}))  # B's view differs
        await router.until(lambda: all(lg.rounds_settled == 1 for lg in ledgers(router)))
        before = ledgers(router)[0]
        # A's operator: its own round 0 named nobody, so nothing is proposed
        refused = await command(router, A, {"hotkey": F, "grounds": "invalid_contribution", "round": 0})
        assert not refused["ok"] and refused["reason"] == "no_offence_evidence", refused
        unseen = await command(router, A, {"hotkey": F, "grounds": "invalid_contribution", "round": 3})
        assert unseen["reason"] == "round_not_observed", unseen
        bad = await command(router, A, {"hotkey": F, "grounds": "treason", "round": 0})
        assert bad["reason"] == "bad_request", bad
        # B's operator: B's round named Ferdie, so B proposes it; A and C refuse to co-sign
        proposed = await command(router, B, {"hotkey": F, "grounds": "invalid_contribution", "round": 0})
        assert proposed["ok"], proposed
        await router.until(lambda: all(router.section(k)["rejected"].get("no_offence_evidence", 0) >= 1
                                       for k in (A, C)))
        await trio.sleep(1.0)  # time for a snapshot, were anyone to sign one
        assert all(lg == before for lg in ledgers(router)) and F in before.book.members
        assert before.book.members[F].stake == STAKE and not before.book.slashed
        nursery.cancel_scope.cancel()


@trio_test
async def test_an_operator_slashes_a_founding_member_its_round_named(tmp_path):
    """A founding member is not slashed unasked (no escrow in the head; the genesis set is
    its operators' call): the command does it, with the same evidence at every party."""
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=5)
        for party in (A, B, C):
            router.services[party].record_round(round_doc(0, bad={T2: "slot_out_of_range"}))
        await router.until(lambda: all(lg.rounds_settled == 1 for lg in ledgers(router)))
        assert not any(r["kind"] == "member_slash" for r in router.services[A].queue)
        assert T2 not in ledgers(router)[0].book.departed
        proposed = await command(router, C, {"hotkey": T2, "grounds": "invalid_contribution", "round": 0})
        assert proposed["ok"], proposed
        await router.until(lambda: all(T2 in lg.book.departed and T2 in lg.book.slashed for lg in ledgers(router)))
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_validator_restarted_keeps_its_round_views_and_cosigns_on_them(tmp_path):
    """B's view of round 0 is on disk when it restarts; a slash proposed after that (of a
    founding member, so not one the author proposes unasked) is judged against it."""
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=5)
        for party in (A, B, C):
            router.services[party].record_round(round_doc(0, rejected={T1: "malformed_contribution"}))
        await router.until(lambda: all(lg.rounds_settled == 1 for lg in ledgers(router)))
        await router.crash(B)
        await router.start(nursery, next(k for k in KEYS if k.ss58_address == B), tmp_path, rounds=5)
        assert router.services[B].offences.rounds == {0: {T1: "invalid_contribution"}}
        proposed = await command(router, C, {"hotkey": T1, "grounds": "invalid_contribution", "round": 0})
        assert proposed["ok"], proposed
        await router.until(lambda: all(T1 in lg.book.slashed for lg in ledgers(router)), timeout_s=30)
        nursery.cancel_scope.cancel()
