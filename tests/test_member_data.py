"""Each member's own data (issue 12 item 4): training.load_texts and its errors, a trainer
that trains on --data and refuses without it, a validator's --eval-data, and a marker
planted in a trainer's data that appears in nothing the trainer sends or stores."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
import trio.testing

from crypto.contribution import derive_layout
from crypto.identity import Hotkey
from node import committee as cm
from node.metrics import NodeMetrics
from node.registry.genesis import Genesis
from node.roles import rounds
from node.roles.base import RoleContext
from node.roles.trainer import TrainerService, training_texts
from node.settings import NodeSettings
from node.storage import LocalBlobStore
from protocol import aggregation as agg
from protocol.aggregation_messages import Contribution, RoundOpen
from protocol.membership import Member, Role
from protocol.messages import encode
from training import DataError, load_texts, token_blocks
from training.model import build_byte_tokenizer

VALIDATORS = ("5Validator-data-a", "5Validator-data-b", "5Validator-data-c")
TRAINER = Hotkey.from_uri("//MemberDataTrainer")
OPENER = sorted(VALIDATORS)[0]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def keys():
    return cm.deal_committee(VALIDATORS, 512)


def _public_only(key: cm.CommitteeKey) -> cm.CommitteeKey:
    return cm.CommitteeKey(key.public, key.verification_keys, key.threshold, key.members)


def _genesis() -> Genesis:
    members = [Member(v, frozenset({Role.VALIDATOR})) for v in VALIDATORS]
    return Genesis("member-data-mesh", tuple(members + [Member(TRAINER.ss58_address, frozenset({Role.TRAINER}))]))


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, "utf-8")
    return path


# --- training.load_texts: three formats ---------------------------------------------------


def test_txt_is_split_on_blank_lines_and_keeps_line_breaks_inside(tmp_path):
    path = _write(tmp_path / "notes.txt", "first line\nstill the first\n\n  \t\nsecond\n\n\n\nthird \n")
    assert load_texts(path) == ["first line\nstill the first", "second", "third"]
    assert load_texts(_write(tmp_path / "one.txt", "a\nb\nc\n")) == ["a\nb\nc"]  # no blank line: one document
    assert load_texts(_write(tmp_path / "crlf.txt", "a\r\n\r\nb\r\n")) == ["a", "b"]


def test_jsonl_takes_each_text_field_and_skips_blank_lines_and_empty_texts(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "alpha", "id": 1}\n\n{"text": "  "}\n{"text": "beta\\ngamma"}\n')
    assert load_texts(path) == ["alpha", "beta\ngamma"]


def test_folder_is_read_recursively_sorted_skipping_hidden_and_other_files(tmp_path):
    _write(tmp_path / "b.txt", "from b")
    _write(tmp_path / "a" / "z.jsonl", '{"text": "from a/z"}\n')
    _write(tmp_path / "a" / "y.txt", "from a/y")
    _write(tmp_path / ".hidden.txt", "hidden file")
    _write(tmp_path / ".git" / "notes.txt", "hidden folder")
    _write(tmp_path / "readme.md", "not data")
    _write(tmp_path / "image.png", b"\x89PNG\xff\xfe")
    assert load_texts(tmp_path) == ["from a/y", "from a/z", "from b"]


# --- training.load_texts: every bad-data case is a DataError naming the path ---------------


def _error(path) -> DataError:
    with pytest.raises(DataError) as err:
        load_texts(path)
    assert isinstance(err.value, ValueError)
    return err.value


def test_missing_path(tmp_path):
    err = _error(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err) and "does not exist" in str(err) and err.reason == "no_data"


def test_folder_without_data_files(tmp_path):
    _write(tmp_path / "data" / "readme.md", "x")
    _write(tmp_path / "data" / ".hidden.jsonl", '{"text": "hidden"}\n')
    err = _error(tmp_path / "data")
    assert str(tmp_path / "data") in str(err) and "no .txt or .jsonl files" in str(err)
    (tmp_path / "empty").mkdir()
    assert "no .txt or .jsonl files" in str(_error(tmp_path / "empty"))


def test_undecodable_file(tmp_path):
    bad = _write(tmp_path / "data" / "latin1.txt", "caf\xe9".encode("latin-1"))
    _write(tmp_path / "data" / "fine.txt", "fine")
    for path in (bad, tmp_path / "data"):
        err = _error(path)
        assert str(bad) in str(err) and "not UTF-8" in str(err) and "offset 3" in str(err)
        assert err.reason == "not_utf8"


@pytest.mark.parametrize("line, what", [
    ("not json", "not JSON"),
    ('["text", "x"]', 'an object with a string field "text"'),
    ('{"body": "x"}', 'an object with a string field "text"'),
    ('{"text": 7}', 'an object with a string field "text"'),
    ('{"text": null}', 'an object with a string field "text"'),
])
def test_bad_jsonl_line_names_its_number(tmp_path, line, what):
    path = _write(tmp_path / "d.jsonl", f'{{"text": "ok"}}\n\n{line}\n{{"text": "later"}}\n')
    err = _error(path)
    assert f"{path}:3:" in str(err) and what in str(err) and err.reason == "bad_data_format"


def test_only_empty_texts(tmp_path):
    _write(tmp_path / "data" / "a.txt", "\n  \n\n")
    _write(tmp_path / "data" / "b.jsonl", '{"text": ""}\n{"text": " "}\n')
    err = _error(tmp_path / "data")
    assert str(tmp_path / "data") in str(err) and "only empty texts" in str(err) and err.reason == "no_text"


def test_a_file_with_another_suffix(tmp_path):
    assert ".txt or .jsonl" in str(_error(_write(tmp_path / "notes.md", "text")))


def test_fewer_tokens_than_one_block(tokenizer):
    with pytest.raises(DataError) as err:
        token_blocks(tokenizer, ["short", "text"], block_len=64)
    assert str(err.value) == "11 tokens, fewer than one block of 64: add text"  # bytes, and an EOS after each
    assert err.value.reason == "not_enough_data"
    assert token_blocks(tokenizer, ["x" * 63], block_len=64).shape == (1, 64)  # 63 bytes + EOS: one block


# --- a trainer: --data, the demo corpus only in testnet, refusal otherwise ---------------------


def test_trainer_texts_come_from_data_else_demo_corpus_else_an_error(tmp_path):
    _write(tmp_path / "mine.txt", "my own text")
    mine = NodeSettings(role=Role.TRAINER, data=tmp_path / "mine.txt", demo_corpus=True)
    assert training_texts(mine, 2, 0) == (["my own text"], f"data {tmp_path / 'mine.txt'}")  # --data wins
    texts, source = training_texts(NodeSettings(role=Role.TRAINER, demo_corpus=True), 2, 1)
    assert len(texts) > 30 and source == "demo corpus shard 1 of 2"
    with pytest.raises(DataError, match="no training data"):
        training_texts(NodeSettings(role=Role.TRAINER), 2, 0)


def _trainer_ctx(settings: NodeSettings, published: list) -> RoleContext:
    async def publish(message):
        published.append(message)

    return RoleContext(settings=settings, hotkey=TRAINER, genesis=_genesis(), mesh=None,
                       store=LocalBlobStore(settings.data_dir / "blobs"), verifier=None, metrics=NodeMetrics(),
                       data_dir=settings.data_dir / "roles", publish=publish, peer_of=lambda hotkey: None)


def _trainer_settings(tmp_path: Path, keys, **changes) -> NodeSettings:
    settings = NodeSettings(role=Role.TRAINER, data_dir=tmp_path / "node", **changes)
    cm.save_committee(settings.data_dir / cm.COMMITTEE_DIR, _public_only(keys[0]))
    return settings


def test_trainer_without_data_refuses_says_how_to_fix_and_repeats_every_minute(tmp_path, keys, caplog):
    settings = _trainer_settings(tmp_path, keys)
    published: list = []
    ctx = _trainer_ctx(settings, published)
    service = TrainerService(settings)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run, ctx)  # starts: the node and its other roles go on
            await trio.sleep(150)  # mock clock: two and a half minutes
            service.on_message(OPENER, _round_open(keys[0], 1000), 0)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING):
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    section = ctx.sections()[rounds.REPORT_SECTION]
    assert "no training data" in section["disabled"]
    assert "--data PATH" in section["disabled"] and 'data = "PATH" in node.toml' in section["disabled"]
    assert [p["problem"] for p in ctx.problems()] == ["trainer: training disabled: no training data"]
    reminders = [r.getMessage() for r in caplog.records if "no training data" in r.getMessage()]
    assert len(reminders) == 3 and all("--data PATH" in line for line in reminders)  # at 0, 60 and 120 s
    assert published == [] and service.machines == {}  # joined no round


def test_trainer_with_a_missing_data_path_says_which(tmp_path, keys, caplog):
    settings = _trainer_settings(tmp_path, keys, data=tmp_path / "nowhere")
    ctx = _trainer_ctx(settings, [])
    service = TrainerService(settings)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run, ctx)
            await trio.sleep(61)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING):
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    disabled = ctx.sections()[rounds.REPORT_SECTION]["disabled"]
    assert f"data path {tmp_path / 'nowhere'} does not exist" in disabled and "correct the data at" in disabled
    assert sum("does not exist" in r.getMessage() for r in caplog.records) == 2


def test_trainer_with_too_little_text_says_so_at_start_before_any_round(tmp_path, keys):
    _write(tmp_path / "data" / "tiny.txt", "too short")
    settings = _trainer_settings(tmp_path, keys, data=tmp_path / "data")
    ctx = _trainer_ctx(settings, [])
    service = TrainerService(settings)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run, ctx)
            with trio.move_on_after(60):
                while not service.disabled:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    assert service.disabled.startswith(f"data {tmp_path / 'data'}: 10 tokens, fewer than one block of 64: add text")
    assert ctx.sections()[rounds.REPORT_SECTION]["disabled"] == service.disabled
    assert not service.model_ready.is_set()


# --- the data is really used ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    tokenizer, peft_model = rounds.load_training_model(NodeSettings(role=Role.TRAINER))
    return tokenizer, peft_model


def test_two_data_folders_give_different_losses(tmp_path, model):
    from training import adapter_vector, local_train

    tokenizer, peft_model = model
    _write(tmp_path / "words" / "w.txt", "\n\n".join(f"the cat sat on mat number {i}" for i in range(40)))
    _write(tmp_path / "digits" / "d.jsonl", "".join(json.dumps({"text": "7" * 90}) + "\n" for _ in range(40)))
    base = adapter_vector(peft_model)
    losses, deltas = {}, {}
    for name in ("words", "digits"):
        texts, _ = training_texts(NodeSettings(role=Role.TRAINER, data=tmp_path / name), 1, 0)
        update = local_train(peft_model, base, token_blocks(tokenizer, texts, 64), steps=2, lr=0.02,
                             batch_size=4, seed=3)
        losses[name], deltas[name] = (update.first_loss, update.last_loss), update.delta
    # same model, base, seed and steps: only the text differs, so do the losses and the update
    assert abs(losses["words"][0] - losses["digits"][0]) > 0.01 and abs(losses["words"][1] - losses["digits"][1]) > 0.01
    assert float(np.abs(deltas["words"] - deltas["digits"]).max()) > 1e-4


# --- the marker stays local --------------------------------------------------------------------------


def _round_open(key: cm.CommitteeKey, values: int, base_adapter_id: str = "ab" * 32) -> RoundOpen:
    """The opener's RoundOpen for round 0, as RoundsService._open builds it."""
    policy = key.round_policy
    layout = derive_layout(policy.clip_bound, policy.quant_bits, policy.max_contributors, key.public.bits)
    count = layout.plaintexts_needed(values)
    now = int(time.time() * 1000)
    return RoundOpen(
        round_id=0, base_adapter_id=base_adapter_id, public_key_id=key.public_key_id,
        hyperparameters={"steps": 2.0, "lr": 0.02, "batch_size": 4.0, "block_len": 64.0,
                         "adapter_values": float(values)},
        clip_bound=policy.clip_bound, quant_bits=policy.quant_bits, max_contributors=policy.max_contributors,
        key_bits=key.public.bits, ciphertexts_per_contribution=count,
        max_contribution_bytes=rounds.max_contribution_bytes(key.public.bits, count),
        deadline_ms=now + 120_000, final_deadline_ms=now + 180_000, min_contributors=policy.min_contributors,
        committee=list(key.members), threshold=key.threshold, validators=list(VALIDATORS))


def test_a_marker_in_a_trainers_data_is_in_nothing_it_sends_or_stores(tmp_path, keys, model):
    """A real TrainerService (run(): committee files, --data, model, the round's training,
    DP-free sealing, its blob store and state files) trains one round on a data folder
    whose every line carries a marker; the marker is in none of its published messages,
    none of the blobs and files under its data dir, and none of its status documents."""
    from training.adapter import adapter_bytes
    from training.vector import VectorLayout, tensors_from_bytes

    marker = f"MARKER-{secrets.token_hex(8)}"
    lines = [f"{marker} line {i}: private notes of this member, {marker} again" for i in range(120)]
    _write(tmp_path / "data" / "notes.txt", "\n\n".join(lines[:60]))
    _write(tmp_path / "data" / "more" / "notes.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in lines[60:]))
    settings = _trainer_settings(tmp_path, keys, data=tmp_path / "data")
    published: list = []
    ctx = _trainer_ctx(settings, published)
    initial = adapter_bytes(model[1])  # the validators' initial adapter: the round's base
    base_id = ctx.store.put(initial)
    values = VectorLayout.of(tensors_from_bytes(initial)).size
    ro = _round_open(keys[0], values, base_id)
    service = TrainerService(settings)

    async def scenario():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run, ctx)
            service.on_message(OPENER, ro, int(time.time() * 1000))
            with trio.move_on_after(120):
                while not any(isinstance(m, Contribution) for m in published):
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    assert any(marker in text for text in service.texts) and len(service.texts) == 120  # it read the data
    machine = service.machines[0]
    assert machine.phase is agg.TrainerPhase.CONTRIBUTED, service.errors
    assert service.shell[0]["first_loss"] > 0
    needle = marker.encode()
    sent = [encode(message) for message in published]
    assert sent and not [b for b in sent if needle in b]
    files = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    blobs = [p for p in files if p.parent.parent == settings.data_dir / "blobs"]
    assert machine.blob_id in {p.name for p in blobs}  # the sealed contribution is among them
    states = [p for p in files if p.suffix == ".msgpack"]
    assert states, "the round's state file"
    assert [p for p in files if needle in p.read_bytes()] == []
    status = json.dumps({"sections": ctx.sections(), "problems": ctx.problems()}).encode()
    assert b'"first_loss"' in status and needle not in status


# --- a validator: --eval-data, the demo held-out only in testnet, rounds without an eval loss --------


def _validator(tmp_path: Path, keys, **changes) -> tuple[rounds.RoundsService, RoleContext]:
    """The node's RoundsService as run() leaves it before its model loads (no network)."""
    settings = NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path / "validator", **changes)
    service = rounds.RoundsService(settings)
    me = keys[0].members[keys[0].share.index - 1]
    ctx = RoleContext(settings=settings, hotkey=TRAINER, genesis=_genesis(), mesh=None,
                      store=LocalBlobStore(settings.data_dir / "blobs"), verifier=None, metrics=NodeMetrics(),
                      data_dir=settings.data_dir / "roles", publish=None, peer_of=lambda hotkey: None)
    service.ctx, service.me, service.key, service.opener = ctx, me, keys[0], False
    service.config = rounds.RoundConfig()
    service.trainers = [TRAINER.ss58_address]
    return service, ctx


def _load_validator(service) -> float | None:
    """_load_model, then the held-out loss of the initial adapter (None: no eval loss)."""
    async def scenario():
        await service._load_model()
        return await service._loss_of(service.initial_adapter_id, [], rounds.now_ms() + 5_000)

    return trio.run(scenario)


def test_validator_evaluates_on_its_eval_data(tmp_path, keys, model):
    _write(tmp_path / "eval" / "held.txt", "\n\n".join(f"held out sentence {i} of this validator" for i in range(30)))
    service, ctx = _validator(tmp_path, keys, eval_data=tmp_path / "eval")
    loss = _load_validator(service)
    assert loss is not None and 3.0 < loss < 8.0
    assert ctx.sections()[rounds.REPORT_SECTION]["eval"] == f"eval data {tmp_path / 'eval'}: {len(service.heldout)} blocks of 64"
    demo, _ = _validator(tmp_path / "demo", keys, demo_corpus=True)  # testnet: the shipped held-out text
    assert _load_validator(demo) not in (None, loss) and demo.eval_status.startswith("demo corpus held-out: ")


def test_validator_without_eval_data_runs_rounds_without_an_eval_loss_and_says_so_once(tmp_path, keys, model, caplog):
    service, ctx = _validator(tmp_path, keys)
    with caplog.at_level(logging.WARNING):
        assert _load_validator(service) is None
    assert service.model_ready.is_set() and service.initial_adapter_id  # rounds can open and aggregate
    assert ctx.sections()[rounds.REPORT_SECTION]["eval"] == "no --eval-data"
    said = [r.getMessage() for r in caplog.records if "no eval loss" in r.getMessage()]
    assert len(said) == 1 and "--eval-data PATH" in said[0] and 'eval_data = "PATH" in node.toml' in said[0]


@pytest.mark.parametrize("case", ["missing", "too_short", "not_utf8"])
def test_validator_with_bad_eval_data_says_what_at_start(tmp_path, keys, model, caplog, case):
    path = {"missing": tmp_path / "absent.jsonl",
            "too_short": _write(tmp_path / "short.jsonl", '{"text": "tiny"}\n'),
            "not_utf8": _write(tmp_path / "bad.txt", b"\xff\xfe\xfa")}[case]
    service, ctx = _validator(tmp_path, keys, eval_data=path)
    with caplog.at_level(logging.ERROR):
        assert _load_validator(service) is None
    status = ctx.sections()[rounds.REPORT_SECTION]["eval"]
    assert status.startswith("eval data unusable: ") and str(path) in status
    assert {"missing": "does not exist", "too_short": "5 tokens, fewer than one block of 64: add text",
            "not_utf8": "not UTF-8"}[case] in status
    assert [r.levelname for r in caplog.records if "no eval loss" in r.getMessage()] == ["ERROR"]
    assert service.model_ready.is_set()


def test_a_trainer_decodes_a_base_adapter_only_once_its_model_is_loaded(tmp_path, keys):
    """A joiner gets a RoundOpen while its model loads (issue 15). It fetched and decoded
    the base adapter with torch on the event loop's thread while the loader thread was in
    torch's first numpy set-up: the node deadlocked for good (the loopback join test hung
    that way). The base is fetched at once but decoded only after model_ready."""
    import types

    from training.vector import tensors_to_bytes

    base = tensors_to_bytes({"a.lora_A.weight": torch.ones(2, 3)})
    fetched = []

    async def fetch(blob_id, holders, **kwargs):
        fetched.append(blob_id)
        return base

    service = TrainerService(_trainer_settings(tmp_path, keys))
    service.ctx = types.SimpleNamespace(fetch=fetch)
    ro = types.SimpleNamespace(base_adapter_id="ab" * 32, validators=[OPENER], deadline_ms=rounds.now_ms() + 60_000)
    got = []

    async def scenario():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(got, service._fetch_base(ro)))
            await trio.sleep(5)
            assert fetched == [ro.base_adapter_id] and got == []  # fetched, not decoded
            service.model_ready.set()
            await trio.sleep(1)
    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got and list(got[0]) == [1.0] * 6


async def _collect(into: list, awaitable) -> None:
    into.append(await awaitable)
