"""The settlement role service, in one process: real EmbeddedHeads in SQLite, real sr25519
signatures, three validators' services joined by a router that plays the settle topic
(each message encoded and strictly decoded, as gossip would carry it)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import trio

from crypto.identity import Hotkey
from node.metrics import NodeMetrics
from node.registry.genesis import Genesis
from node.roles import settlement as st
from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings, SettingsError
from node.settlement import EmbeddedHead
from protocol import head as h
from protocol.head_messages import HeadClose, HeadSync
from protocol.membership import Member, Role
from protocol.messages import Channel, Message, decode, encode

KEYS = sorted((Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie")), key=lambda k: k.ss58_address)
A, B, C = (k.ss58_address for k in KEYS)
T1, T2 = Hotkey.from_uri("//Dave").ss58_address, Hotkey.from_uri("//Eve").ss58_address
GENESIS = Genesis("svc-test", tuple(Member(k.ss58_address, frozenset({Role.VALIDATOR}), 100.0) for k in KEYS)
                  + (Member(T1, frozenset({Role.TRAINER}), 10.0), Member(T2, frozenset({Role.TRAINER}), 10.0)))
DEPOSITS = 3 * (st.ESCROW + st.OPENING_BALANCE + st.POOL_SHARE)


def trio_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))
    return run


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(st, "RESEND_MS", 300)
    monkeypatch.setattr(st, "STEP_S", 0.05)


class Router:
    """The settle topic: what one service publishes reaches every other running one."""

    def __init__(self) -> None:
        self.services: dict[str, st.SettlementService] = {}
        self.contexts: dict[str, RoleContext] = {}
        self.down: set[str] = set()
        self.stops: dict[str, tuple[trio.CancelScope, trio.Event]] = {}

    def publisher(self, sender: str):
        async def publish(message: Message) -> None:
            raw = encode(message)
            for hotkey, service in self.services.items():
                if hotkey != sender and hotkey not in self.down:
                    service.on_message(sender, decode(raw, channel=Channel.SETTLE), 0)
        return publish

    async def start(self, nursery: trio.Nursery, key: Hotkey, root: Path, *, busy: bool = False,
                    **settings) -> None:
        me = key.ss58_address
        service = st.SettlementService(NodeSettings(role=Role.VALIDATOR, data_dir=root / me,
                                                    contestation_period_s=0.5, **settings))
        ctx = RoleContext(settings=service.settings, hotkey=key, genesis=GENESIS, mesh=None, store=None,
                          verifier=None, metrics=NodeMetrics(), data_dir=root / me / "roles",
                          publish=self.publisher(me), peer_of=lambda hotkey: "peer",
                          services={"settlement": service})
        if busy:  # another role of this node is still working: rank 0 must not close yet
            ctx.report("training", {"done": False})
        self.services[me], self.contexts[me] = service, ctx
        self.down.discard(me)
        scope, stopped = trio.CancelScope(), trio.Event()
        self.stops[me] = (scope, stopped)

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await service.run(ctx, task_status=task_status)
            stopped.set()
        await nursery.start(run)

    async def crash(self, hotkey: str) -> None:
        """Stop a service where it stands (cancelled mid-whatever; its file is closed)."""
        scope, stopped = self.stops[hotkey]
        self.down.add(hotkey)
        scope.cancel()
        await stopped.wait()

    def section(self, hotkey: str) -> dict:
        return self.contexts[hotkey].sections()[st.REPORT_SECTION]

    def phase(self, hotkey: str) -> h.Phase:
        return self.services[hotkey].head.machine.phase

    async def until(self, ready, timeout_s: float = 15.0) -> None:
        with trio.fail_after(timeout_s):
            while not ready():
                await trio.sleep(0.02)


def _round(n: int) -> dict:
    return {"round": n, "adapter_id": f"adapter-{n}", "contributors": [T1, T2], "rejected": []}


def _record_everywhere(router: Router, doc: dict, parties=(A, B, C)) -> None:
    """Every validator's rounds service hands over the round it saw (each its own view)."""
    for hotkey in parties:
        router.services[hotkey].record_round(doc)


async def _open_mesh(nursery, router: Router, tmp_path: Path, **settings) -> None:
    for key in KEYS:
        await router.start(nursery, key, tmp_path, busy=key is KEYS[0] and not settings.get("rounds"),
                           **settings)
    await router.until(lambda: all(router.phase(k) is h.Phase.OPEN for k in (A, B, C)))


@trio_test
async def test_three_validators_open_record_close_and_fan_out(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=2)
        for hotkey in (A, B, C):  # every validator's rounds service hands over each round
            router.services[hotkey].record_round(_round(0))
            router.services[hotkey].record_round(_round(1))
        assert router.services[A].is_author()
        assert [r["kind"] for r in router.services[B].queue] == ["observe_round"] * 2  # B only co-signs
        await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in (A, B, C)))
        nursery.cancel_scope.cancel()
    sections = [router.section(k) for k in (A, B, C)]
    for doc in sections:
        assert doc["done"] and doc["state"] == "Final" and doc["conserved"]
        assert doc["rounds"] == [0, 1] and doc["slashed"] == [] and doc["rejected"] == {}
        assert sum(doc["balances"].values()) == doc["deposits"] == DEPOSITS
    assert sections[0]["balances"] == sections[1]["balances"] == sections[2]["balances"]
    assert sections[0]["balances"][T1] == sections[0]["balances"][T2] == st.ROUND_REWARD  # half of two rounds
    assert [r["round"] for r in sections[0]["records"]] == [0, 1]
    assert all(r["author"] == A for r in sections[0]["records"])


@trio_test
async def test_a_validator_that_closes_early_is_slashed_by_the_majority(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await router.start(nursery, KEYS[0], tmp_path, rounds=1)
        await router.start(nursery, KEYS[1], tmp_path, rounds=1)
        await router.start(nursery, KEYS[2], tmp_path, rounds=1, behaviour="close-early")
        await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in (A, B)), timeout_s=20)
        nursery.cancel_scope.cancel()
    a, b, c = (router.section(k) for k in (A, B, C))
    assert c["done"] and c["behaviour"] == "close-early"
    assert a["slashed"] == b["slashed"] == [C]
    assert a["balances"] == b["balances"] and a["conserved"] and b["conserved"]
    # C's escrow is split between A and B; C gets back only its ledger balance.
    assert a["balances"][C] == st.OPENING_BALANCE
    assert a["balances"][A] + a["balances"][B] == 2 * (st.OPENING_BALANCE + st.ESCROW) + st.ESCROW
    assert sum(a["balances"].values()) == DEPOSITS


@trio_test
async def test_a_forged_snapshot_signature_is_refused_and_counted(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=2)
        _record_everywhere(router, _round(0))
        await router.until(lambda: all(router.section(k)["snapshots_confirmed"] == 1 for k in (A, B, C)))
        confirmed = router.services[B].head.machine.confirmed
        head_id = router.services[B].head.machine.parameters.head_id
        # B re-signs snapshot 1 "for" C with its own key: every party must refuse it.
        forged = h.Snapshot(2, confirmed.tx_ids, "", confirmed.ledger,
                            {**confirmed.signatures, C: KEYS[1].sign(b"not the payload")})
        publish = router.publisher(B)
        await publish(HeadSync(head_id, forged.encode()))
        await publish(HeadClose(head_id, forged.encode(), st.now_ms(), []))
        await router.until(lambda: router.section(A)["rejected"].get("bad_snapshot_signature", 0) >= 1
                           and sum(router.section(C)["rejected"].values()) >= 2)
        for hotkey in (A, C):
            assert router.phase(hotkey) is h.Phase.OPEN
            assert router.section(hotkey)["snapshots_confirmed"] == 1
        metrics = router.contexts[A].metrics.render().decode()
        assert 'reason="bad_snapshot_signature",source="settle"' in metrics
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_validator_restarted_mid_snapshot_catches_up(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path, rounds=2)
        router.down.add(C)  # C hears nothing from here on
        _record_everywhere(router, _round(0), parties=(A, B))
        await router.until(lambda: router.services[A].head.machine.proposal is not None)
        old = router.services[C]
        await router.crash(C)
        assert old.head.machine.confirmed.number == 0  # it went down before snapshot 1
        await trio.sleep(0.2)
        await router.start(nursery, KEYS[2], tmp_path, rounds=2)
        assert router.services[C] is not old and router.services[C].head.reloaded
        router.services[C].record_round(_round(0))  # its own rounds service, once it is back
        await router.until(lambda: all(router.section(k)["snapshots_confirmed"] == 1 for k in (A, B, C)))
        _record_everywhere(router, _round(1))
        await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in (A, B, C)), timeout_s=20)
        nursery.cancel_scope.cancel()
    assert router.section(C)["balances"] == router.section(A)["balances"]
    assert router.section(C)["slashed"] == [] and router.section(C)["rounds"] == [0, 1]


@trio_test
async def test_operator_commands_close_and_fan_out_through_command_files(tmp_path):
    router = Router()
    async with trio.open_nursery() as nursery:
        await _open_mesh(nursery, router, tmp_path)  # rounds=0: closing any time is not early
        folder = router.contexts[B].data_dir / st.COMMANDS_DIR
        (folder / "reboot.request").write_text("")
        await router.until(lambda: (folder / "reboot.result").exists())
        assert json.loads((folder / "reboot.result").read_text())["reason"] == "unknown_command"
        (folder / "fanout.request").write_text("")
        await router.until(lambda: (folder / "fanout.result").exists())
        refused = json.loads((folder / "fanout.result").read_text())
        assert not refused["ok"] and refused["reason"] == "wrong_phase"
        (folder / "close.request").write_text("")
        await router.until(lambda: (folder / "close.result").exists())
        assert json.loads((folder / "close.result").read_text()) == {"ok": True, "state": "Closed"}
        await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in (A, B, C)))
        nursery.cancel_scope.cancel()


def test_split_reward_always_pays_the_whole_amount():
    assert st.split_reward(100, {"a": 1, "b": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}
    assert st.split_reward(10, {"a": 3.0, "b": 1.0, "z": 0.0, "n": -1.0}) == {"a": 8, "b": 2}
    assert st.split_reward(10, {}) == {} and st.split_reward(0, {"a": 1}) == {}
    for total in (1, 7, 120):
        assert sum(st.split_reward(total, {"a": 0.2, "b": 0.3, "c": 0.5}).values()) == total


def test_make_service_picks_the_backend_by_role_and_settings():
    assert st.make_service(NodeSettings(role=Role.TRAINER)) is None
    assert isinstance(st.make_service(NodeSettings(role=Role.VALIDATOR)), st.SettlementService)
    with pytest.raises(SettingsError, match="unknown settlement backend"):
        st.make_service(NodeSettings(role=Role.VALIDATOR, settlement="ledger-on-paper"))


def _final(name_of_me: str, balances: dict, state: str = "Final", conserved: bool = True) -> dict:
    return {"sections": {"settlement": {
        "me": name_of_me, "backend": "embedded", "state": state, "snapshots_confirmed": 1,
        "balances": balances, "deposits": sum(balances.values()), "held": sum(balances.values()),
        "conserved": conserved, "slashed": [], "behaviour": "honest", "rejected": {},
        "records": [{"kind": "round_result", "round": 0, "adapter_id": "x", "contributors": [T1],
                     "rewards": {T1: 120}, "snapshot": 1, "author": A}]}}}


def test_summary_flags_disagreement_unfinished_heads_and_missing_rounds():
    from node.testnet import TestnetPlan
    plan = TestnetPlan(validators=3, trainers=1, rounds=2)
    good = _final(A, {A: 10, B: 10})
    report = st.summarize(plan, {"validator-0": good, "validator-1": _final(B, {A: 10, B: 10}),
                                 "validator-2": _final(C, {A: 11, B: 9}, state="Closed", conserved=False)})
    assert report["balances"] == {"validator-0": 10, "validator-1": 10}
    assert report["rounds"]["0"]["rewards"] == {T1: 120}
    problems = "\n".join(report["problems"])
    assert "validator-2 head is Closed" in problems and "does not conserve" in problems
    assert "1 of 2 rounds recorded" in problems
    ok = st.summarize(TestnetPlan(validators=1, trainers=1, rounds=1), {"validator-0": good, "miner-0": None})
    assert ok["problems"] == [] and ok["state"] == "Final"


def test_section_of_a_fresh_head_reports_idle(tmp_path):
    head = EmbeddedHead(tmp_path / "head.sqlite", KEYS[0])
    doc = st.section_of(head, [A, B], A)
    assert doc["state"] == "Idle" and doc["rank"] == 0 and not doc["done"] and doc["conserved"]
    head.close()


@trio_test
async def test_hydra_backend_settles_a_round_on_a_hydra_node(tmp_path):
    from pycardano import Address, Network, PaymentSigningKey, PaymentVerificationKey

    from node.settlement.hydra import HydraSettings
    from node.settlement.hydra_schema import HydraApiSchema, find_hydra_api_dir
    from node.settlement.hydra_tx import RoundResultRecord, records_in, tx_from_envelope
    api_dir = find_hydra_api_dir(Path(__file__).resolve().parent.parent)
    if api_dir is None:
        pytest.skip("hydra-node API schema not found at ../shared/hydra-api")
    from tests.hydra_peer import HydraPeer
    key = PaymentSigningKey.generate()
    owner = str(Address(payment_part=PaymentVerificationKey.from_signing_key(key).hash(), network=Network.TESTNET))
    funds = {f"{'ab' * 32}#0": {"address": owner, "value": {"lovelace": 30_000_000}}}
    peer = HydraPeer(HydraApiSchema.load(api_dir), l1_utxo=funds).start()
    roles = tmp_path / "roles"
    roles.mkdir()
    key.save(str(roles / "hydra-payment.skey"))
    (roles / "hydra-l1-utxo.json").write_text(json.dumps(funds))
    settings = NodeSettings(role=Role.VALIDATOR, settlement="hydra", hydra_url=peer.ws_url, rounds=1)
    service = st.HydraSettlementService(settings, api_dir=api_dir, client_settings=HydraSettings(
        ws_url=peer.ws_url, http_url=peer.http_url, reconnect_initial_s=0.02))
    genesis = Genesis("hydra-test", (Member(A, frozenset({Role.VALIDATOR}), 100.0),))
    ctx = RoleContext(settings=settings, hotkey=KEYS[0], genesis=genesis, mesh=None, store=None, verifier=None,
                      metrics=NodeMetrics(), data_dir=roles, publish=None, peer_of=lambda h: None,
                      services={"settlement": service})
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run, ctx)
                while not any(o["address"] == owner for o in service.client.head.confirmed_utxo.values()):
                    await trio.sleep(0.02)
                service.record_round(_round(0))
                while not ctx.sections()["settlement"]["done"]:
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
    finally:
        peer.stop()
    assert peer.violations == [] and peer.errors == []
    section = ctx.sections()["settlement"]
    assert section["state"] == "Final" and section["rounds"] == [0] and section["errors"] == []
    assert [m["tag"] for m in peer.received] == ["Init", "NewTx", "Close", "Fanout"]
    carried = [r for snap in peer.snapshots for tx in snap.confirmed for r in records_in(tx_from_envelope(tx))]
    assert carried == [RoundResultRecord(0, "adapter-0", tuple(sorted([T1, T2])), {T1: 60, T2: 60})]


def test_both_backends_are_settlement_backends_reached_through_the_role_context(tmp_path):
    import inspect

    from node.roles.base import SettlementBackend

    for backend in (st.SettlementService, st.HydraSettlementService):
        assert issubclass(backend, SettlementBackend), backend
        assert inspect.iscoroutinefunction(backend.step), backend
    embedded = st.make_service(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path))
    hydra = st.make_service(NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path, settlement="hydra",
                                         hydra_url="ws://127.0.0.1:1"))

    def context(services: dict) -> RoleContext:
        return RoleContext(settings=embedded.settings, hotkey=KEYS[0], genesis=GENESIS, mesh=None, store=None,
                           verifier=None, metrics=NodeMetrics(), data_dir=tmp_path / "roles",
                           publish=None, peer_of=lambda hotkey: None, services=services)

    assert context({"settlement": embedded}).settlement is embedded
    assert context({"settlement": hydra}).settlement is hydra
    assert context({}).settlement is None  # trainers and miners run none

    class NotABackend(RoleService):
        name = "settlement"

    with pytest.raises(TypeError, match="NotABackend lacks the SettlementBackend methods"):
        context({"settlement": NotABackend()}).settlement


def test_hydra_backend_needs_a_hydra_url():
    with pytest.raises(SettingsError, match="hydra_url"):
        st.make_service(NodeSettings(role=Role.VALIDATOR, settlement="hydra"))


def test_head_status_reads_a_head_file_read_only(tmp_path, capsys):
    from node.cli import main
    from node.head_cli import HeadCliError, ask_node, read_head
    (tmp_path / "roles").mkdir()
    path = tmp_path / "roles" / "head.sqlite"
    head = EmbeddedHead(path, KEYS[0])
    head.handle(h.Init(h.HeadParameters("solo", (A,), 1_000, 1_000, 1_000, 1, st.ESCROW, round_limit=1,
                                        round_reward=st.ROUND_REWARD), 1))
    head.handle(h.Commit(st.ESCROW, st.OPENING_BALANCE, st.POOL_SHARE, 2))
    head.handle(h.ObserveRound(0, "adapter-0", [T1], 3))
    head.record_round_result(0, "adapter-0", [T1], {T1: 120}, 3)
    head.close()
    doc = read_head(path)
    assert doc["state"] == "Open" and doc["snapshot"] == 1 and doc["balances"][T1] == 120
    assert [r["round"] for r in doc["records"] if r["kind"] == "round_result"] == [0]
    assert doc["invariants_violated"] == []
    assert main(["head", "status", "--data-dir", str(tmp_path)]) == 0
    assert "solo: Open, snapshot 1" in capsys.readouterr().out
    assert main(["head", "status", "--data-dir", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(HeadCliError, match="is it running"):
        (tmp_path / "roles" / st.COMMANDS_DIR).mkdir()
        ask_node(tmp_path, "close", timeout_s=0.2)
