"""Private training rounds, validator and committee side: the shell around protocol/aggregation/.

Every validator runs one RoundsService. It feeds the round machines (ValidatorRound, and
CommitteeRound when it holds a key share) with gossip, timers and the results of the
heavy work they ask for, and carries out their effects:

  collect    fetch each trainer's sealed contribution, decode and verify its proof
             (crypto.contribution) in a worker thread; a bad one is rejected with an
             evidence blob that names it and why
  aggregate  multiply the accepted ciphertexts (worker thread), store the aggregate
  decrypt    committee members partially decrypt their decryption blocks (plus a gone
             member's block, after a short wait), validators verify the batches
  combine    t batches per block -> plaintexts -> mean update -> outer step (FedAvg or
             DiLoCo) -> the new adapter, stored; every validator gets the same bytes
  final      held-out loss before/after, settlement record, status section "training"
  blame      the sum overflowed a slot (SlotOverflow at decode, issue 11 finding 5): the
             machine asks every contributor for a slot proof of that position; each
             answer is fetched and checked (crypto.contribution.verify_slots) in a worker
             thread; the machine names who failed or stayed silent and aborts the round

Validator rank 0 (sorted hotkeys) opens the rounds, one after another, up to
settings.rounds. Who may open and with which minimum, layout and hyper-parameters is
the mesh's configuration (mesh_rounds: the genesis validators, the committee files'
round policy); every RoundOpen, ours included, goes through agg.check_round_open.
Each machine's to_state() is written atomically after every event, so
a validator killed mid-round resumes from resume_effects() when it starts again.
Heavy CPU work runs in worker threads; the trio loop keeps serving the mesh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import trio

from node import committee as cm
from node.blobs import BlobFetchError
from node.roles.base import GuardedWork, RoleContext, RoleService, now_ms, remind
from node.settings import NodeSettings
from protocol import aggregation as agg
from protocol import round_catchup as rc
from protocol.aggregation_messages import (AcceptedSet, BlameRequest, Contribution, ContributionVerdict,
                                           PartialDecryption, RoundAborted, RoundFinal, RoundOpen, SlotProof)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.liveness import live_members, liveness_window_ms
from protocol.membership import Role
from protocol.messages import Channel, Message

log = logging.getLogger("sealmesh.rounds")

REPORT_SECTION = "training"
ROUND_CONFIG_FILE = "rounds.json"  # in the node's data dir; absent: RoundConfig() defaults
STATE_DIR = "rounds"


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundConfig:
    """What the opening validator puts in each RoundOpen, and the shell's patience.

    min_contributors, max_contributors, clip_bound and quant_bits are the mesh's, not a
    node's: the committee files' round policy sets them (RoundPolicy), and a value here
    that differs is ignored with a warning (issue 11 finding 1)."""

    collect_s: float = 25.0  # contributions window: training + sealing on a loaded CPU
    first_round_extra_s: float = 20.0  # trainers load the model while round 0 is open
    decrypt_s: float = 120.0  # deadline -> final deadline: aggregate, decrypt, combine
    steps: int = 20
    lr: float = 0.02
    batch_size: int = 8
    block_len: int = 64
    clip_bound: float = 1.0
    quant_bits: int = 16
    max_contributors: int = 16
    # Decrypting a sum of one contribution reveals it: 2 is the floor that keeps the
    # mean private at all; a real mesh sets more.
    min_contributors: int = 2
    outer: str = "fedavg"  # or "diloco"
    outer_lr: float = 1.0  # FedAvg 1.0 = the average model; DiLoCo's paper uses 0.7
    outer_momentum: float = 0.9
    cover_wait_s: float = 5.0  # how long a member waits to learn who is gone before decrypting
    # After a slot overflow: how long contributors have to answer with a slot proof (2-4 s
    # of proving at 2048 bits, plus fetching); who has not by then is named no_slot_proof.
    blame_s: float = 60.0
    resend_s: float = 3.0  # gossip may drop: round messages are re-sent this often
    # The opener opens a round at most this often (0: the next as soon as one ends).
    round_period_s: float = 0.0
    # Threads for this node's partial decryption and combining (0: one per core). Local:
    # not part of RoundOpen.
    crypto_threads: int = 0

    def __post_init__(self) -> None:
        if self.outer not in ("fedavg", "diloco"):
            raise RoundConfigError(f"outer must be fedavg or diloco, got {self.outer!r}")
        positive = ("collect_s", "decrypt_s", "steps", "lr", "batch_size", "block_len", "clip_bound",
                    "max_contributors", "min_contributors", "outer_lr", "resend_s", "blame_s")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise RoundConfigError(f"{name} must be a positive number, got {value!r}")
        if self.min_contributors > self.max_contributors:
            raise RoundConfigError("min_contributors must not exceed max_contributors")
        if 1000 * self.blame_s > agg.MAX_BLAME_MS:
            raise RoundConfigError(f"blame_s must be at most {agg.MAX_BLAME_MS // 1000} s, got {self.blame_s!r}")
        if not isinstance(self.crypto_threads, int) or isinstance(self.crypto_threads, bool) \
                or self.crypto_threads < 0:
            raise RoundConfigError(f"crypto_threads must be an integer >= 0, got {self.crypto_threads!r}")

    @property
    def threads(self) -> int:
        return self.crypto_threads or os.cpu_count() or 1


class RoundConfigError(LocalProtocolError):
    reason = "round_config"


def load_round_config(data_dir: Path) -> RoundConfig:
    path = Path(data_dir) / ROUND_CONFIG_FILE
    if not path.exists():
        return RoundConfig()
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise RoundConfigError(f"{path}: not JSON ({exc})") from exc
    known = {f.name for f in fields(RoundConfig)}
    if not isinstance(doc, dict) or set(doc) - known:
        raise RoundConfigError(f"{path}: unknown keys {sorted(set(doc) - known) if isinstance(doc, dict) else doc}; "
                               f"known: {sorted(known)}")
    return RoundConfig(**doc)


def write_round_config(data_dir: Path, config: RoundConfig) -> None:
    cm.write_atomic(Path(data_dir) / ROUND_CONFIG_FILE, json.dumps(asdict(config), indent=1).encode())


# --- shared by trainers and validators ------------------------------------------------------


def members_with(genesis, role: Role) -> list[str]:
    return sorted(m.hotkey for m in genesis.members if role in m.roles)


def mesh_rounds(genesis, key: cm.CommitteeKey) -> agg.MeshRounds:
    """The mesh's round rules as this node's configuration says: every RoundOpen is checked
    against them (agg.round_open_refusal), never the other way round."""
    return agg.MeshRounds(validators=tuple(members_with(genesis, Role.VALIDATOR)), committee=tuple(key.members),
                          threshold=key.threshold, public_key_id=key.public_key_id, key_bits=key.public.bits,
                          policy=key.round_policy)


def config_problems(config: RoundConfig, policy: agg.RoundPolicy) -> tuple[list[str], str | None]:
    """(ignored local values, the error that stops the opener) of rounds.json against the
    mesh's policy."""
    ignored = [f"{name}={getattr(config, name)!r} (the mesh's is {getattr(policy, name)!r})"
               for name in ("min_contributors", "max_contributors", "clip_bound", "quant_bits")
               if getattr(config, name) != getattr(policy, name)]
    collect_ms = int(1000 * (config.collect_s + config.first_round_extra_s))
    if collect_ms > policy.max_collect_ms or int(1000 * config.decrypt_s) > policy.max_decrypt_ms:
        return ignored, (f"collect_s + first_round_extra_s ({collect_ms} ms) and decrypt_s must fit the mesh's "
                         f"max_collect_ms={policy.max_collect_ms}, max_decrypt_ms={policy.max_decrypt_ms}")
    problem = agg.hyperparameters_problem(policy, {**hyperparameters_of(config), "adapter_values": 1.0})
    return ignored, problem


def hyperparameters_of(config: RoundConfig) -> dict[str, float]:
    return {"steps": float(config.steps), "lr": config.lr, "batch_size": float(config.batch_size),
            "block_len": float(config.block_len)}


def layout_of(ro: RoundOpen):
    from crypto.contribution import derive_layout

    return derive_layout(ro.clip_bound, ro.quant_bits, ro.max_contributors, ro.key_bits)


def adapter_values(ro: RoundOpen) -> int:
    return int(ro.hyperparameters["adapter_values"])


def max_contribution_bytes(key_bits: int, ciphertexts: int) -> int:
    """Ciphertexts plus the subset-range proof (~120 KB at 1024 bits, ~240 KB at 2048)."""
    width = 2 * ((key_bits + 7) // 8)
    return 2 * ciphertexts * width + 512 * width + (1 << 20)


def vector_of_adapter(data: bytes):
    """(VectorLayout, float32 vector) of adapter safetensors bytes; AdapterRejected if not one."""
    from training.vector import VectorLayout, tensors_from_bytes

    tensors = tensors_from_bytes(data)
    layout = VectorLayout.of(tensors)
    return layout, layout.to_vector(tensors)


def load_training_model(settings: NodeSettings):
    """(tokenizer, peft model): the base (NF4 on CPU, or the fallback) with the seeded LoRA."""
    import torch

    from training import LoRASettings, attach_lora, load_base_model
    from training.vector import warm_numpy_bridge

    torch.set_num_threads(1)  # a shared CPU: OpenMP threads spin (docs/training.md)
    warm_numpy_bridge()  # this thread first: the roles use torch only once the model is ready
    base = load_base_model(settings.model, quantize_4bit=True, device="cpu")
    return base.tokenizer, attach_lora(base, LoRASettings())


class StateFiles:
    """One msgpack file per round under DATA_DIR/roles/rounds, replaced atomically."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.directory, self.kind = directory, kind
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, round_id: int) -> Path:
        return self.directory / f"{self.kind}-{round_id:06d}.msgpack"

    def save(self, round_id: int, doc: dict) -> None:
        cm.write_atomic(self.path(round_id), msgpack.packb(doc, use_bin_type=True))

    def delete(self, round_id: int) -> None:
        self.path(round_id).unlink(missing_ok=True)

    def load_all(self) -> dict[int, dict]:
        docs = {}
        for path in sorted(self.directory.glob(f"{self.kind}-*.msgpack")):
            try:
                docs[int(path.stem.rsplit("-", 1)[1])] = msgpack.unpackb(path.read_bytes(), raw=False)
            except (ValueError, msgpack.UnpackException) as exc:
                raise LocalProtocolError(f"{path}: unreadable round state ({exc}); move it away to "
                                         "drop that round") from exc
        return docs


class Inbox:
    """Gossip handed over by the daemon (trio thread) to the role's own loop."""

    def __init__(self, size: int = 4096) -> None:
        self.send, self.receive = trio.open_memory_channel(size)
        self.dropped = 0

    def put(self, sender: str, message: Message, received_ms: int) -> None:
        try:
            self.send.send_nowait((sender, message, received_ms))
        except trio.WouldBlock:
            self.dropped += 1  # the sender re-sends round messages; a full inbox only delays


def evidence_blob(*, round_id: int, trainer: str, blob_id: str, reason: str, hint: str,
                  public_key_id: str, mesh_id: str) -> bytes:
    """What lets anyone re-check a rejection: the contribution's id (fetchable from us) and
    the round context its proof must verify under."""
    return json.dumps({"kind": "contribution_rejection", "mesh_id": mesh_id, "round": round_id,
                       "trainer": trainer, "blob_id": blob_id, "reason": reason, "hint": hint[:400],
                       "public_key_id": public_key_id}, sort_keys=True, separators=(",", ":")).encode()


# --- one round as this validator sees it ------------------------------------------------------


class RoundSlot:
    def __init__(self, ro: RoundOpen) -> None:
        self.ro = ro
        self.validator: agg.ValidatorRound | None = None
        self.committee: agg.CommitteeRound | None = None
        self.shell: dict[str, Any] = {"phases": {}, "committee_phases": {}, "finals": {}, "verdicts": {},
                                      "partials_used": {}, "evaluation": {}, "seconds": {}, "recorded": False}
        self.alive: set[str] = set()  # validators heard from in this round
        self.batches: dict[str, dict] = {}  # partial or cover blob id -> block -> verified BatchPartialDecryption
        self.changed = trio.Event()
        self.ended = trio.Event()

    @property
    def round_id(self) -> int:
        return self.ro.round_id

    def touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def to_state(self) -> dict:
        return {"validator": self.validator.to_state() if self.validator else None,
                "committee": self.committee.to_state() if self.committee else None,
                "shell": self.shell, "alive": sorted(self.alive)}

    @classmethod
    def from_state(cls, doc: dict) -> "RoundSlot":
        validator = agg.ValidatorRound.from_state(doc["validator"])
        slot = cls(validator.round_open)
        slot.validator = validator
        slot.committee = agg.CommitteeRound.from_state(doc["committee"]) if doc.get("committee") else None
        slot.shell.update(doc.get("shell") or {})
        slot.alive = set(doc.get("alive") or ())
        return slot

    def terminal(self) -> bool:
        return self.validator is not None and self.validator.phase in (agg.Phase.FINAL, agg.Phase.ABORTED)


class RoundsService(GuardedWork, RoleService):
    name = "rounds"
    channels = frozenset({Channel.TRAIN})

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.inbox = Inbox()
        self.slots: dict[int, RoundSlot] = {}
        self.early: dict[int, list] = {}  # round -> messages heard before its RoundOpen
        self.aggregates: dict[tuple[str, ...], str] = {}
        self.aggregating: dict[tuple[str, ...], trio.Event] = {}
        self.model_ready = trio.Event()
        self.model_lock = trio.Lock()
        self.model = self.tokenizer = self.heldout = None
        self.eval_status: str | None = None  # where the held-out loss comes from, or why there is none
        self.initial_adapter_id: str | None = None
        self.evaluations: dict[str, float] = {}  # adapter id -> held-out loss
        self.errors: list[str] = []
        # Catch-up (protocol/round_catchup.py): outcomes others sent of rounds we have no
        # slot of, the rounds adopted so, and when we last re-published each ended round.
        self.outcomes_heard: rc.OutcomesHeard | None = None
        self.adopted: list[int] = []
        self.republished: dict[int, int] = {}

    def on_message(self, sender: str, message: Message, received_ms: int) -> None:
        self.inbox.put(sender, message, received_ms)

    # -- start-up --

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ctx = ctx
        self.me = ctx.hotkey.ss58_address
        self.config = load_round_config(self.settings.data_dir)
        try:
            self.key = cm.load_committee(self.settings.data_dir / cm.COMMITTEE_DIR, self.me,
                                          insecure_small_committee=self.settings.insecure_small_committee)
        except cm.CommitteeKeyError as exc:
            if self.settings.rounds:
                raise  # told to run rounds without a key: the message says how to get one
            ctx.report(REPORT_SECTION, {"role": "validator", "done": True, "disabled": str(exc)})
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED  # started already: the nursery below must not say so again
            self.key = await remind(
                ctx, f"validator: rounds disabled: {exc}",
                f"put this node's committee files in {self.settings.data_dir / cm.COMMITTEE_DIR} (`sealmesh "
                "committee deal` or `sealmesh committee keygen` writes them); rounds start once they load",
                retry=lambda: cm.load_committee(self.settings.data_dir / cm.COMMITTEE_DIR, self.me, insecure_small_committee=
                                                self.settings.insecure_small_committee),
                still=cm.CommitteeKeyError)
        self.validators = members_with(ctx.genesis, Role.VALIDATOR)
        self.trainers = members_with(ctx.genesis, Role.TRAINER)
        self.mesh = mesh_rounds(ctx.genesis, self.key)
        self.opener = agg.scheduled_opener(self.mesh, 0) == self.me
        ignored, problem = config_problems(self.config, self.mesh.policy)
        if ignored:
            log.warning("rounds.json: ignored, the mesh's round policy decides: %s", ", ".join(ignored))
        if problem and self.opener:
            raise RoundConfigError(f"rounds.json does not fit the mesh's round policy: {problem}")
        self.states = StateFiles(ctx.data_dir / STATE_DIR, "validator")
        self.report()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            self._start(self._load_model)
            await self._resume()
            nursery.start_soon(self._inbox_loop)
            nursery.start_soon(self._resend_loop)
            if self.opener and self.trainers:  # a mesh without trainers has nothing to train
                nursery.start_soon(self._open_rounds)

    async def _load_model(self) -> None:
        """The model and the held-out blocks. Without usable eval data the validator still
        runs rounds (aggregation needs none) and reports no eval loss, saying why once."""
        from training import DataError
        from training.adapter import adapter_bytes

        def load():
            tokenizer, model = load_training_model(self.settings)
            return tokenizer, model, adapter_bytes(model)

        self.tokenizer, self.model, initial = await trio.to_thread.run_sync(load)
        try:
            self.heldout, source = await trio.to_thread.run_sync(self._heldout_blocks)
        except DataError as exc:
            self.eval_status = f"eval data unusable: {exc}"
            log.error("no eval loss: %s; fix: correct it (or pass another --eval-data PATH) and restart; rounds go "
                      "on without an eval loss", exc)
        else:
            if self.heldout is None:
                self.eval_status = "no --eval-data"
                log.warning('no eval loss: no --eval-data; fix: pass --eval-data PATH (a .txt or .jsonl file, or a '
                            'folder of them) or set eval_data = "PATH" in node.toml; rounds go on without an eval loss')
            else:
                self.eval_status = f"{source}: {len(self.heldout)} blocks of {self.config.block_len}"
        self.report()
        self.initial_adapter_id = self.ctx.store.put(initial)
        log.info("phase=model-ready initial_adapter=%s", self.initial_adapter_id[:12])
        self.model_ready.set()

    def _heldout_blocks(self):
        """Worker thread: (token blocks, where from) of the held-out text: --eval-data; in
        `sealmesh testnet` (demo_corpus) without it, the demo corpus's held-out texts; else
        (None, None). DataError naming the data when it is unusable or too short."""
        from training import DataError, demo_split, load_texts, token_blocks

        if self.settings.eval_data is not None:
            source = f"eval data {self.settings.eval_data}"
            texts = load_texts(self.settings.eval_data)
        elif self.settings.demo_corpus:
            source = "demo corpus held-out"
            texts = demo_split(max(1, len(self.trainers))).heldout
        else:
            return None, None
        try:
            return token_blocks(self.tokenizer, texts, self.config.block_len), source
        except DataError as exc:
            raise DataError(f"{source}: {exc}", reason=exc.reason) from exc

    async def _resume(self) -> None:
        for round_id, doc in self.states.load_all().items():
            slot = RoundSlot.from_state(doc)
            self.slots[round_id] = slot
            log.info("phase=resume round=%d validator=%s committee=%s", round_id, slot.validator.phase.value,
                     slot.committee.phase.value if slot.committee else "-")
            v = slot.validator
            if v.phase is agg.Phase.COLLECT:
                self._start(self._timer, slot, "validator", "close_collection", slot.ro.deadline_ms)
            if v.phase is agg.Phase.BLAME:
                self._start(self._timer, slot, "validator", "blame_deadline", v.blame_deadline_ms)
            if not slot.terminal():
                self._start(self._timer, slot, "validator", "final_deadline", slot.ro.final_deadline_ms)
            else:
                slot.ended.set()
                if v.phase is agg.Phase.FINAL:
                    self._start(self._after_final, slot)
            if slot.committee and slot.committee.phase not in (agg.CommitteePhase.RELEASED,
                                                               agg.CommitteePhase.ABORTED):
                self._start(self._timer, slot, "committee", "final_deadline",
                                        slot.ro.final_deadline_ms)
            await self._apply(slot, "validator", v.resume_effects())
            if slot.committee:
                await self._apply(slot, "committee", slot.committee.resume_effects())
                c = slot.committee
                if c.cover_pending():  # our cover may still be owed: the machine decides after the wait
                    self._start(self._cover_missing, slot)
        self.report()

    # -- opening rounds (rank 0) --

    async def _open_rounds(self) -> None:
        """Open round after round (settings.rounds of them, 0: until stopped), each once
        enough trainers are live (agg.open_wait_reason), at most one per round_period_s."""
        await self.model_ready.wait()
        for slot in sorted(self.slots.values(), key=lambda s: s.round_id):  # resumed rounds end first
            await slot.ended.wait()
        round_id = max(self.slots) + 1 if self.slots else 0
        while not self.settings.rounds or round_id < self.settings.rounds:
            opened = trio.current_time()
            await self._wait_for_live_trainers()
            await self._open(round_id)
            await self.slots[round_id].ended.wait()
            round_id += 1
            await trio.sleep_until(opened + self.config.round_period_s)

    def _live_trainers(self) -> set[str]:
        if hasattr(self.ctx, "genesis"):  # the live directory: trainers admitted since start count (issue 15)
            self.trainers = members_with(self.ctx.genesis, Role.TRAINER)
        seen = {t: self.ctx.last_seen(t) for t in self.trainers}
        window = liveness_window_ms(self.settings.announce_interval_s)
        return live_members({t: s for t, s in seen.items() if s is not None}, now_ms(), window)

    async def _wait_for_live_trainers(self) -> None:
        said = None
        while (why := agg.open_wait_reason(len(self._live_trainers()), self.mesh.policy)) is not None:
            if why != said:  # once per change, not every poll
                log.info("phase=waiting-for-trainers %s", why)
                self.report(waiting=why)
                said = why
            await trio.sleep(0.5)

    def _base_adapter_id(self, round_id: int) -> str:
        finals = {r: s.validator.adapter_id for r, s in self.slots.items()
                  if s.validator and s.validator.phase is agg.Phase.FINAL}
        return agg.expected_base_adapter(finals, round_id, self.initial_adapter_id)

    async def _open(self, round_id: int) -> None:
        from crypto.contribution import derive_layout

        c, policy = self.config, self.mesh.policy
        base_id = self._base_adapter_id(round_id)
        _, base_vector = vector_of_adapter(self.ctx.store.get(base_id))
        layout = derive_layout(policy.clip_bound, policy.quant_bits, policy.max_contributors, self.key.public.bits)
        count = layout.plaintexts_needed(base_vector.size)
        start = now_ms()
        deadline = start + int(1000 * (c.collect_s + (c.first_round_extra_s if round_id == 0 else 0)))
        ro = RoundOpen(
            round_id=round_id, base_adapter_id=base_id, public_key_id=self.key.public_key_id,
            hyperparameters={**hyperparameters_of(c), "adapter_values": float(base_vector.size)},
            clip_bound=policy.clip_bound, quant_bits=policy.quant_bits, max_contributors=policy.max_contributors,
            key_bits=self.key.public.bits, ciphertexts_per_contribution=count,
            max_contribution_bytes=max_contribution_bytes(self.key.public.bits, count),
            deadline_ms=deadline, final_deadline_ms=deadline + int(1000 * c.decrypt_s),
            min_contributors=policy.min_contributors, committee=list(self.key.members), threshold=self.key.threshold,
            validators=list(self.validators))
        log.info("phase=open round=%d base=%s ciphertexts=%d deadline_in=%.0fs", round_id, base_id[:12], count,
                 (deadline - start) / 1000)
        await self._join(self.me, ro)

    # -- gossip --

    async def _inbox_loop(self) -> None:
        async for sender, message, received_ms in self.inbox.receive:
            try:
                await self._handle(sender, message, received_ms)
            except RemoteProtocolError as exc:
                self.ctx.metrics.reject("round", exc.reason)
                log.warning("rejected round message reason=%s from=%s: %s", exc.reason,
                            self.ctx.genesis.name_of(sender), exc.hint)
            self.report()

    async def _handle(self, sender: str, message: Message, received_ms: int) -> None:
        round_id = getattr(message, "round_id", None)
        if isinstance(message, RoundOpen):
            await self._join(sender, message)
            return
        slot = self.slots.get(round_id)
        if slot is None and isinstance(message, (RoundFinal, RoundAborted)):
            await self._catch_up(sender, message)
        if slot is None:
            if not isinstance(round_id, int) or agg.round_id_problem(round_id, self._last_round_id(),
                                                                    self.mesh.policy.max_round_gap):
                return  # not a round this node could join next: nothing to keep it for
            queue = self.early.setdefault(round_id, [])
            if len(queue) < 256 and len(self.early) < 8:
                queue.append((sender, message, received_ms))
            return
        if sender in slot.ro.validators:
            if sender not in slot.alive:
                slot.alive.add(sender)
                slot.touch()
        if isinstance(message, Contribution):
            await self._feed(slot, "validator", lambda v: v.receive_contribution(sender, message, now_ms=now_ms()))
        elif isinstance(message, AcceptedSet):
            await self._feed(slot, "validator", lambda v: v.receive_accepted_set(sender, message))
            await self._feed(slot, "committee", lambda c: c.receive_accepted_set(sender, message))
        elif isinstance(message, PartialDecryption):
            await self._feed(slot, "validator", lambda v: v.receive_partial(sender, message))
        elif isinstance(message, SlotProof):
            await self._feed(slot, "validator", lambda v: v.receive_slot_proof(sender, message))
        elif isinstance(message, BlameRequest):  # another validator's blame step: its trainers answer it
            slot.shell.setdefault("blames_heard", {})[sender] = [message.plaintext_index, message.slot, message.top]
        elif isinstance(message, ContributionVerdict):
            slot.shell["verdicts"].setdefault(sender, {})[message.trainer] = message.reason or "accepted"
        elif isinstance(message, RoundFinal):
            slot.shell["finals"][sender] = message.adapter_id
        elif isinstance(message, RoundAborted):
            slot.shell["finals"][sender] = f"aborted:{message.reason}"

    def _last_round_id(self) -> int | None:
        return max(self.slots, default=None)

    def _cooling_down(self, round_id: int) -> frozenset[str]:
        """Trainers our blame steps named in the rounds just before (agg.cooling_down)."""
        return agg.cooling_down({r: s.validator.bad_contributors for r, s in self.slots.items() if s.validator},
                                round_id)

    async def _join(self, sender: str, ro: RoundOpen) -> None:
        known = self.slots.get(ro.round_id)
        if known is not None:
            known.validator.receive_round_open(sender, ro)  # a copy changes nothing; another is refused
            return
        if self.initial_adapter_id is None:  # cannot check the base yet: the opener re-sends it
            log.info("round=%d RoundOpen heard before our model is ready; waiting for a re-send", ro.round_id)
            return
        if any(r < ro.round_id and not s.terminal() for r, s in self.slots.items()):
            # the base it must name is the adapter of a round still ending here: judge it once
            # that round ended (the opener re-sends its RoundOpen while collecting)
            log.debug("round=%d RoundOpen heard before an earlier round ended here; waiting for a re-send",
                      ro.round_id)
            return
        expected_base = self._base_adapter_id(ro.round_id)
        last = self._last_round_id()
        validator = agg.ValidatorRound.join_round(sender, ro, me=self.me, mesh=self.mesh, now_ms=now_ms(),
                                                  last_round_id=last, expected_base=expected_base,
                                                  barred=self._cooling_down(ro.round_id))
        slot = RoundSlot(ro)
        slot.validator = validator
        slot.alive.update({sender, self.me})
        self.slots[ro.round_id] = slot
        if self.key.share is not None:
            slot.committee = agg.CommitteeRound(self.me)
            await self._feed(slot, "committee", lambda c: c.join_round(
                sender, ro, mesh=self.mesh, now_ms=now_ms(), last_round_id=last, expected_base=expected_base))
        if now_ms() < ro.deadline_ms:
            await self._feed(slot, "validator", lambda v: v.open_round(now_ms=now_ms()))
        else:  # heard too late to collect: the final deadline aborts it here
            self._persist(slot)
            self._start(self._timer, slot, "validator", "final_deadline", ro.final_deadline_ms)
        for sender_, message, received_ms in self.early.pop(ro.round_id, []):
            try:
                await self._handle(sender_, message, received_ms)
            except RemoteProtocolError as exc:
                self.ctx.metrics.reject("round", exc.reason)

    # -- driving the machines --

    async def _feed(self, slot: RoundSlot, role: str, event: Callable[[Any], list]) -> None:
        machine = slot.validator if role == "validator" else slot.committee
        if machine is None or self.slots.get(slot.round_id) is not slot:  # dropped by retention: a late timer
            return
        try:
            effects = event(machine)
        except RemoteProtocolError as exc:
            self.ctx.metrics.reject("round", exc.reason)
            log.warning("round=%d %s rejected reason=%s: %s", slot.round_id, role, exc.reason, exc.hint)
            return
        except LocalProtocolError as exc:
            self.errors.append(f"round {slot.round_id} {role}: {exc}")
            log.error("round=%d %s: local protocol error: %s", slot.round_id, role, exc)
            return
        self._persist(slot)
        await self._apply(slot, role, effects)
        slot.touch()
        self.report()

    def _persist(self, slot: RoundSlot) -> None:
        self.states.save(slot.round_id, slot.to_state())

    async def _apply(self, slot: RoundSlot, role: str, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, agg.Send):
                await self._publish(effect.message)
                if isinstance(effect.message, AcceptedSet) and role == "validator":
                    # our own gossip never comes back to us: our committee machine hears it here
                    await self._feed(slot, "committee", lambda c, m=effect.message: c.receive_accepted_set(self.me, m))
                if isinstance(effect.message, PartialDecryption):  # likewise our own partial
                    await self._feed(slot, "validator", lambda v, m=effect.message: v.receive_partial(self.me, m))
            elif isinstance(effect, agg.SetTimer):
                self._start(self._timer, slot, role, effect.name, effect.at_ms)
            elif isinstance(effect, agg.EnterPhase):
                self._enter(slot, role, effect)
            elif isinstance(effect, agg.VerifyContributionBlob):
                self._start(self._verify_contribution, slot, effect.trainer, effect.blob_id)
            elif isinstance(effect, agg.ComputeAggregate):
                self._start(self._compute_aggregate, slot, role, effect.blob_ids)
            elif isinstance(effect, agg.DecryptPartial):
                self._start(self._decrypt_partial, slot, effect.aggregate_id)
            elif isinstance(effect, agg.CoverBlocks):
                self._start(self._cover_blocks, slot, effect)
            elif isinstance(effect, agg.VerifyPartialBlob):
                self._start(self._verify_partial, slot, effect)
            elif isinstance(effect, agg.CombinePartials):
                self._start(self._combine, slot, effect)
            elif isinstance(effect, agg.VerifySlotProofBlob):
                self._start(self._verify_slot_proof, slot, effect)
            else:
                raise LocalProtocolError(f"no shell for effect {effect!r}")

    def _enter(self, slot: RoundSlot, role: str, effect: agg.EnterPhase) -> None:
        key = "phases" if role == "validator" else "committee_phases"
        slot.shell[key][effect.phase] = now_ms()
        log.info("phase=%s round=%d role=%s%s", effect.phase, slot.round_id, role,
                 f" reason={effect.reason}" if effect.reason else "")
        if role == "validator" and slot.terminal():
            slot.ended.set()
            self._start(self._finish, slot)

    async def _finish(self, slot: RoundSlot) -> None:
        """An ended round: evaluate a final one, hand it to settlement, then forget what
        the newest keep_rounds rounds no longer need."""
        if slot.validator.phase is agg.Phase.FINAL:
            await self._after_final(slot)  # records it too
        else:
            await self._record_settlement(slot)
        self._retain()

    def _retain(self) -> None:
        from protocol.retention import RoundRecord, retention_plan

        records = []
        for round_id, slot in self.slots.items():
            v = slot.validator
            own = v.blob_ids() | (slot.committee.blob_ids() if slot.committee else frozenset())
            records.append(RoundRecord(round_id, slot.terminal(), own, slot.ro.base_adapter_id,
                                       v.adapter_id if v.phase is agg.Phase.FINAL else ""))
        plan = retention_plan(records, self.settings.keep_rounds, pinned=[self.initial_adapter_id or ""])
        for round_id in plan.drop_rounds:
            del self.slots[round_id]
            self.states.delete(round_id)
        for cid in plan.delete_blobs:
            self.ctx.store.delete(cid)
            (self.states.directory / f"outer-{cid}.safetensors").unlink(missing_ok=True)  # DiLoCo state
            self.evaluations.pop(cid, None)
        self.aggregates = {k: a for k, a in self.aggregates.items() if a not in plan.delete_blobs}
        if plan.drop_rounds:
            log.info("phase=retention dropped rounds=%s deleted_blobs=%d keep_rounds=%d",
                     list(plan.drop_rounds), len(plan.delete_blobs), self.settings.keep_rounds)

    async def _publish(self, message: Message) -> None:
        try:
            await self.ctx.publish(message)
        except Exception as exc:  # a publish failure must not end the role; resends cover it
            log.warning("publish %s failed: %s", message.TYPE, exc)

    async def _timer(self, slot: RoundSlot, role: str, name: str, at_ms: int) -> None:
        await trio.sleep(max(0.0, (at_ms - now_ms()) / 1000))
        # a stale timer (collection already closed) is the machine's to ignore
        await self._feed(slot, role, lambda m: getattr(m, name)(now_ms=max(now_ms(), at_ms)))

    async def _resend_loop(self) -> None:
        """Gossip may lose a message; every round message that others still need is re-sent."""
        while True:
            await trio.sleep(self.config.resend_s)
            for slot in list(self.slots.values()):
                if now_ms() >= slot.ro.final_deadline_ms:
                    await self._republish_outcome(slot)
                    continue
                for message in self._still_needed(slot):
                    await self._publish(message)

    async def _republish_outcome(self, slot: RoundSlot) -> None:
        """After the final deadline, our RoundFinal (RoundAborted) again every
        rc.REPUBLISH_MS while our head has not confirmed the round: a validator that was
        down for the whole round adopts it from a majority of these (_catch_up)."""
        settlement = self.ctx.settlement
        if not slot.terminal() or settlement is None:
            return
        now = now_ms()
        if not rc.republish_due(now_ms=now, final_deadline_ms=slot.ro.final_deadline_ms,
                                confirmed=settlement.round_confirmed(slot.round_id),
                                last_ms=self.republished.get(slot.round_id)):
            return
        self.republished[slot.round_id] = now
        for message in slot.validator.still_needed():
            if isinstance(message, (RoundFinal, RoundAborted)):
                await self._publish(message)

    async def _catch_up(self, sender: str, message: RoundFinal | RoundAborted) -> None:
        """Another validator's outcome of a round we have no slot of (we were down for
        it): while our head waits for a view of that round, collect them; once a strict
        majority of the head's parties sent the same one, it is our view
        (rc.adopted_outcome) and goes to settlement like our own would."""
        settlement = self.ctx.settlement
        if settlement is None or not settlement.awaits_round_view(message.round_id):
            return
        parties = frozenset(getattr(settlement, "parties", ()))  # the head's parties (both backends)
        if self.outcomes_heard is None or self.outcomes_heard.parties != parties:
            self.outcomes_heard = rc.OutcomesHeard(parties, self.me)
        outcome = self.outcomes_heard.hear(sender, message)
        if outcome is None:
            return
        self.outcomes_heard.forget(outcome.round_id)
        log.info("phase=round-adopted round=%d aborted=%s adapter=%s quorum=%d of %d", outcome.round_id,
                 outcome.aborted, outcome.adapter_id[:12], rc.catchup_quorum(len(parties)), len(parties))
        doc = {"round": outcome.round_id, "base_adapter_id": outcome.base_adapter_id,
               "adapter_id": outcome.adapter_id, "aggregate_id": outcome.aggregate_id,
               "contributors": list(outcome.contributors), "rejected": [],
               "aborted": "adopted" if outcome.aborted else "", "bad_contributors": {}, "eval": {}, "adopted": True}
        try:
            settlement.record_round(doc)
        except Exception as exc:  # settlement is another service: its failure must not end rounds
            log.error("settlement record_round failed for adopted round %d: %s", outcome.round_id, exc)
            return
        self.adopted.append(outcome.round_id)  # the inbox loop reports it

    def _still_needed(self, slot: RoundSlot) -> list[Message]:
        """What the machines say others may still need (still_needed)."""
        return slot.validator.still_needed() + (slot.committee.still_needed() if slot.committee else [])

    # -- the work the machines ask for --

    async def _fetch(self, cid: str, holders: list[str], *, max_bytes: int, until_ms: int) -> bytes:
        """A blob from our store or a holder, retried until `until_ms` (peers may be busy)."""
        while True:
            try:
                return await self.ctx.fetch(cid, holders, max_bytes=max_bytes, timeout_s=30)
            except BlobFetchError:
                if now_ms() >= until_ms:
                    raise
                await trio.sleep(1.0)

    async def _verify_contribution(self, slot: RoundSlot, trainer: str, blob_id: str) -> None:
        from crypto import contribution

        ro = slot.ro
        reason, hint = "", ""
        try:
            data = await self._fetch(blob_id, [trainer, *ro.validators], max_bytes=ro.max_contribution_bytes,
                                     until_ms=ro.deadline_ms + 20_000)
        except BlobFetchError as exc:
            reason, hint = "unavailable", str(exc)
        else:
            def check() -> None:
                item = contribution.decode(self.key.public, data, max_ciphertexts=ro.ciphertexts_per_contribution)
                context = contribution.context_for(self.key.public, self.ctx.genesis.mesh_id, ro.round_id, trainer)
                contribution.verify(self.key.public, layout_of(ro), item, context, value_count=adapter_values(ro))

            try:
                await trio.to_thread.run_sync(check)
            except contribution.InvalidContribution as exc:
                reason, hint = exc.reason, exc.hint
        evidence = ""
        if reason:
            evidence = self.ctx.store.put(evidence_blob(
                round_id=ro.round_id, trainer=trainer, blob_id=blob_id, reason=reason, hint=hint,
                public_key_id=self.key.public_key_id, mesh_id=self.ctx.genesis.mesh_id))
            log.warning("phase=reject round=%d trainer=%s reason=%s evidence=%s", ro.round_id,
                        self.ctx.genesis.name_of(trainer), reason, evidence[:12])
        await self._feed(slot, "validator", lambda v: v.verify_contribution(
            trainer, valid=not reason, reason=reason, evidence_id=evidence))

    async def _aggregate_id(self, slot: RoundSlot, blob_ids: tuple[str, ...]) -> str:
        """The stored aggregate of these contributions (computed once per node)."""
        from crypto import contribution

        if blob_ids in self.aggregates:
            return self.aggregates[blob_ids]
        if blob_ids in self.aggregating:
            await self.aggregating[blob_ids].wait()
            return self.aggregates[blob_ids]
        self.aggregating[blob_ids] = done = trio.Event()
        ro = slot.ro
        try:
            holders = [*members_with(self.ctx.genesis, Role.TRAINER), *ro.validators]  # live (issue 15)
            blobs = [await self._fetch(b, holders, max_bytes=ro.max_contribution_bytes,
                                       until_ms=ro.final_deadline_ms) for b in blob_ids]
            items = await trio.to_thread.run_sync(
                lambda: [contribution.decode(self.key.public, b) for b in blobs])
            total = await trio.to_thread.run_sync(contribution.aggregate, self.key.public, items)
            self.aggregates[blob_ids] = self.ctx.store.put(cm.encode_aggregate(self.key.public, total))
        finally:
            del self.aggregating[blob_ids]
            done.set()
        return self.aggregates[blob_ids]

    async def _compute_aggregate(self, slot: RoundSlot, role: str, blob_ids: tuple[str, ...]) -> None:
        started = now_ms()
        aggregate_id = await self._aggregate_id(slot, tuple(blob_ids))
        slot.shell["seconds"].setdefault("aggregate", round((now_ms() - started) / 1000, 3))
        await self._feed(slot, role, lambda m: m.compute_aggregate(aggregate_id))

    def _aggregate(self, slot: RoundSlot, aggregate_id: str) -> list[int]:
        return cm.decode_aggregate(self.key.public, self.ctx.store.get(aggregate_id),
                                   count=slot.ro.ciphertexts_per_contribution)

    def _context(self, slot: RoundSlot, aggregate_id: str) -> Callable[[int], bytes]:
        mesh = self.ctx.genesis.mesh_id
        return lambda block: cm.partial_context(mesh, slot.round_id, aggregate_id, block)

    async def _decrypt_partial(self, slot: RoundSlot, aggregate_id: str) -> None:
        from crypto import batch_powmod, paillier

        ro, share = slot.ro, self.key.share
        # Learn who is gone before choosing blocks: a member that published nothing this
        # round by now will not decrypt, and its blocks need a substitute.
        with trio.move_on_after(self.config.cover_wait_s):
            while not set(ro.committee) <= slot.alive:
                await slot.changed.wait()
        alive = {ro.committee.index(h) + 1 for h in slot.alive if h in ro.committee}
        cs = self._aggregate(slot, aggregate_id)
        blocks = agg.round_blocks(ro)
        mine = agg.blocks_to_decrypt(blocks, share.index, alive, ro.threshold)
        context = self._context(slot, aggregate_id)
        started = now_ms()

        def decrypt() -> dict:
            return {b: paillier.partial_decrypt_many(share, cs[blocks[b].start:blocks[b].stop], context(b),
                                                   workers=self.config.threads)
                    for b in mine}

        batches = await trio.to_thread.run_sync(decrypt)
        blob_id = self.ctx.store.put(cm.encode_partial_blob(self.key.public, share.index, aggregate_id, batches))
        slot.shell["seconds"]["partial_decrypt"] = round((now_ms() - started) / 1000, 3)
        slot.shell["decrypted_blocks"] = mine
        slot.shell["alive_members"] = sorted(alive)
        log.info("phase=partial round=%d blocks=%s alive=%s seconds=%.2f engine=%s threads=%d", slot.round_id, mine,
                 sorted(alive), slot.shell["seconds"]["partial_decrypt"], batch_powmod.engine(), self.config.threads)
        await self._feed(slot, "committee", lambda c: c.release_partial(aggregate_id, blob_id))
        self._start(self._cover_missing, slot)

    async def _cover_missing(self, slot: RoundSlot) -> None:
        """Issue 11 finding 7: after cover_wait_s, and again whenever the round changes, our
        committee machine chooses the blocks we cover (CommitteeRound.choose_cover, from our
        validator machine's verified batches); its CoverBlocks effect does the work."""
        await trio.sleep(self.config.cover_wait_s)
        while slot.committee.cover_pending() and self.slots.get(slot.round_id) is slot:
            await self._feed(slot, "committee", lambda c: c.choose_cover(slot.validator.cover_view()))
            if not slot.committee.cover_pending():
                return
            with trio.move_on_after(self.config.cover_wait_s):
                await slot.changed.wait()

    async def _cover_blocks(self, slot: RoundSlot, effect: agg.CoverBlocks) -> None:
        """CoverBlocks: decrypt the blocks the machine chose, store them, release the cover."""
        from crypto import paillier

        share, mine = self.key.share, list(effect.blocks)
        cs = self._aggregate(slot, effect.aggregate_id)
        blocks = agg.round_blocks(slot.ro)
        context = self._context(slot, effect.aggregate_id)
        batches = await trio.to_thread.run_sync(lambda: {
            b: paillier.partial_decrypt_many(share, cs[blocks[b].start:blocks[b].stop], context(b),
                                             workers=self.config.threads) for b in mine})
        blob_id = self.ctx.store.put(cm.encode_partial_blob(self.key.public, share.index, effect.aggregate_id,
                                                            batches))
        slot.shell["cover_blocks"] = mine
        log.info("phase=cover round=%d blocks=%s", slot.round_id, mine)
        await self._feed(slot, "committee", lambda c: c.release_cover(effect.aggregate_id, blob_id))

    async def _partial_batches(self, slot: RoundSlot, member: str, member_index: int, blob_id: str,
                               aggregate_id: str, *, verify: bool) -> dict:
        from crypto import paillier

        ro = slot.ro
        data = await self._fetch(blob_id, [member, *ro.validators], max_bytes=64 << 20,
                                 until_ms=ro.final_deadline_ms)
        cs = self._aggregate(slot, aggregate_id)
        blocks = agg.round_blocks(ro)
        batches = cm.decode_partial_blob(self.key, data, member_index=member_index, aggregate_id=aggregate_id,
                                         blocks=blocks)
        if verify:
            context = self._context(slot, aggregate_id)

            def check() -> bool:
                return all(paillier.verify_partial_many(self.key.public, self.key.verification_keys,
                                                        cs[blocks[b].start:blocks[b].stop], batch, context(b))
                           for b, batch in batches.items())

            if not await trio.to_thread.run_sync(check):
                raise cm.BadPartialBlob("a block's batch proof of correct decryption does not verify",
                                        reason="bad_partial_proof")
        return batches

    async def _verify_partial(self, slot: RoundSlot, effect: agg.VerifyPartialBlob) -> None:
        try:
            batches = await self._partial_batches(slot, effect.member, effect.member_index, effect.partial_blob_id,
                                                  effect.aggregate_id, verify=True)
        except (RemoteProtocolError, BlobFetchError) as exc:
            reason = getattr(exc, "reason", "invalid")[:agg.MAX_NAME_CHARS]
            log.warning("phase=bad-partial round=%d member=%s reason=%s: %s", slot.round_id,
                        self.ctx.genesis.name_of(effect.member), reason, exc)
            await self._feed(slot, "validator", lambda v: v.verify_partial(effect.member, valid=False, reason=reason,
                                                                           cover=effect.cover))
            return
        # The machine decides whether the blocks are the member's (an incomplete first partial
        # names it) and which batches are combined (CombinePartials.batches).
        slot.batches[effect.partial_blob_id] = batches
        await self._feed(slot, "validator", lambda v: v.verify_partial(effect.member, valid=True, blocks=list(batches),
                                                                       cover=effect.cover))

    async def _combine(self, slot: RoundSlot, effect: agg.CombinePartials) -> None:
        """CombinePartials: the batches the machine chose (t per block, each from a partial or
        cover blob it verified; fetched again after a restart), combined, decoded, applied."""
        from crypto import packing, paillier
        from crypto.contribution import decode_sum

        ro = slot.ro
        cs = self._aggregate(slot, effect.aggregate_id)
        blocks = agg.round_blocks(ro)
        batches: dict[int, dict] = {}  # member index -> block -> batch
        for number, chosen_batches in effect.batches:
            for index, blob_id in chosen_batches:
                if blob_id not in slot.batches:  # verified before a restart
                    slot.batches[blob_id] = await self._partial_batches(
                        slot, ro.committee[index - 1], index, blob_id, effect.aggregate_id, verify=False)
                batches.setdefault(index, {})[number] = slot.batches[blob_id][number]
        chosen = {number: [index for index, _ in chosen_batches] for number, chosen_batches in effect.batches}
        started = now_ms()
        try:
            plaintexts = await trio.to_thread.run_sync(
                cm.combine_blocks, self.key, cs, blocks, batches, chosen, self._context(slot, effect.aggregate_id),
                self.config.threads)
            mean = await trio.to_thread.run_sync(decode_sum, plaintexts, adapter_values(ro), effect.contributors,
                                                 layout_of(ro))
        except packing.SlotOverflow as exc:  # a contribution's slots were out of range: find whose
            await self._blame(slot, exc)
            return
        except (paillier.PaillierError, packing.PackingError, ValueError) as exc:
            await self._combine_failed(slot, exc)
            return
        try:
            base_data = await self._fetch(ro.base_adapter_id, list(ro.validators), max_bytes=64 << 20,
                                          until_ms=ro.final_deadline_ms)
            adapter, stats = await trio.to_thread.run_sync(self._apply_mean, slot, mean, base_data)
        except (paillier.PaillierError, packing.PackingError, ValueError) as exc:
            await self._combine_failed(slot, exc)
            return
        adapter_id = self.ctx.store.put(adapter)
        slot.shell["seconds"]["combine"] = round((now_ms() - started) / 1000, 3)
        slot.shell["partials_used"] = {str(b): [ro.committee[i - 1] for i in members] for b, members in chosen.items()}
        await self._feed(slot, "validator", lambda m: m.finalize(adapter_id, stats))

    async def _combine_failed(self, slot: RoundSlot, exc: Exception) -> None:
        why = getattr(exc, "reason", type(exc).__name__)
        log.error("phase=combine-failed round=%d: %s", slot.round_id, exc)
        await self._feed(slot, "validator", lambda m: m.combine_fails(str(why)))

    async def _blame(self, slot: RoundSlot, overflow) -> None:
        """Issue 11 finding 5: the position the overflow names goes to the machine, which
        asks every contributor to prove it in range (BlameRequest)."""
        from crypto.contribution import blame_for

        blame = blame_for(overflow, layout_of(slot.ro))
        log.warning("phase=slot-overflow round=%d blame=%s: %s", slot.round_id, blame, overflow)
        if blame is None:  # no position to ask about: nobody can be named
            await self._combine_failed(slot, overflow)
            return
        await self._feed(slot, "validator", lambda m: m.slot_overflow(
            blame.plaintext_index, blame.slot, blame.top, now_ms=now_ms(), blame_ms=int(1000 * self.config.blame_s)))

    async def _verify_slot_proof(self, slot: RoundSlot, effect: agg.VerifySlotProofBlob) -> None:
        """Fetch a contributor's slot proof and its contribution; check the proof (worker thread)."""
        from crypto import contribution

        ro, p = slot.ro, effect.position
        blame = contribution.Blame(p.plaintext_index, p.slot, p.top)
        reason = ""
        try:
            holders = [effect.trainer, *ro.validators]
            until = slot.validator.blame_deadline_ms
            proof_data = await self._fetch(effect.proof_blob_id, holders, max_bytes=64 << 20, until_ms=until)
            item_data = await self._fetch(effect.contribution_blob_id, holders, max_bytes=ro.max_contribution_bytes,
                                          until_ms=until)
        except BlobFetchError as exc:
            reason = "unavailable"
            log.warning("phase=blame round=%d trainer=%s proof unavailable: %s", ro.round_id,
                        self.ctx.genesis.name_of(effect.trainer), exc)
        else:
            def check() -> None:
                proof = contribution.decode_slot_proof(proof_data)
                item = contribution.decode(self.key.public, item_data, max_ciphertexts=ro.ciphertexts_per_contribution)
                context = contribution.slot_context_for(self.key.public, self.ctx.genesis.mesh_id, ro.round_id,
                                                        effect.trainer, blame)
                contribution.verify_slots(self.key.public, layout_of(ro), item, blame, proof, context)

            try:
                await trio.to_thread.run_sync(check)
            except contribution.InvalidContribution as exc:
                reason = exc.reason
                log.warning("phase=blame round=%d trainer=%s slot proof refused: %s", ro.round_id,
                            self.ctx.genesis.name_of(effect.trainer), exc)
        await self._feed(slot, "validator", lambda v: v.verify_slot_proof(effect.trainer, valid=not reason,
                                                                          reason=reason))

    def _apply_mean(self, slot: RoundSlot, mean, base_data: bytes) -> tuple[bytes, dict[str, float]]:
        """Worker thread: the mean update applied to the base adapter by the outer optimizer."""
        from training import DiLoCoOuter, FedAvg
        from training.adapter import vector_to_adapter_bytes

        ro, c = slot.ro, self.config
        vector_layout, base_vector = vector_of_adapter(base_data)
        if c.outer == "diloco":
            outer = DiLoCoOuter(c.outer_lr, c.outer_momentum)
            state = self.states.directory / f"outer-{ro.base_adapter_id}.safetensors"
            if state.exists():
                outer.load_state(state)
        else:
            outer = FedAvg(c.outer_lr)
        new_vector = outer.step(base_vector, mean)
        adapter = vector_to_adapter_bytes(vector_layout, new_vector)
        if c.outer == "diloco":  # the momentum that the round after this one starts from
            cm.write_atomic(self.states.directory / f"outer-{hashlib.sha256(adapter).hexdigest()}.safetensors",
                            outer.state_bytes())
        stats = {"l2": float(np.linalg.norm(mean)), "max_abs": float(np.max(np.abs(mean))),
                 "outer": 1.0 if c.outer == "diloco" else 0.0}
        return adapter, stats

    # -- after the round --

    async def _loss_of(self, adapter_id: str, holders: list[str], until_ms: int) -> float | None:
        from training import evaluate
        from training.adapter import load_adapter_bytes

        if adapter_id not in self.evaluations:
            data = await self._fetch(adapter_id, holders, max_bytes=64 << 20, until_ms=until_ms)
            await self.model_ready.wait()
            if self.heldout is None:  # no usable eval data: no eval loss (eval_status says why)
                return None
            async with self.model_lock:
                def run() -> float:
                    load_adapter_bytes(self.model, data)
                    return evaluate(self.model, self.heldout).loss

                self.evaluations[adapter_id] = await trio.to_thread.run_sync(run)
        return self.evaluations[adapter_id]

    async def _after_final(self, slot: RoundSlot) -> None:
        ro, v = slot.ro, slot.validator
        evaluation = slot.shell["evaluation"]
        if "after" not in evaluation:
            started = now_ms()
            until = now_ms() + 120_000
            evaluation["before"] = await self._loss_of(ro.base_adapter_id, list(ro.validators), until)
            evaluation["after"] = await self._loss_of(v.adapter_id, list(ro.validators), until)
            slot.shell["seconds"]["evaluate"] = round((now_ms() - started) / 1000, 3)
            if evaluation["after"] is not None:
                log.info("phase=evaluated round=%d loss_before=%.4f loss_after=%.4f adapter=%s", slot.round_id,
                         evaluation["before"], evaluation["after"], v.adapter_id[:12])
            self._persist(slot)
        await self._record_settlement(slot)
        self.report()

    async def _record_settlement(self, slot: RoundSlot) -> None:
        """Hand the result to the settlement service, once, if this node runs one."""
        settlement = self.ctx.settlement
        if settlement is None or slot.shell.get("recorded"):
            return
        v = slot.validator
        doc = {"round": slot.round_id, "base_adapter_id": slot.ro.base_adapter_id, "adapter_id": v.adapter_id,
               "aggregate_id": v.agreed.aggregate_id if v.agreed else "",
               "contributors": list(v.agreed.contributors) if v.agreed and v.phase is agg.Phase.FINAL else [],
               "rejected": [{"trainer": e.trainer, "blob_id": e.blob_id, "reason": e.reason,
                             "evidence_id": e.evidence_id} for e in v.exclusions()],
               "aborted": v.abort_reason, "bad_contributors": dict(v.bad_contributors),
               "eval": dict(slot.shell["evaluation"])}
        try:
            settlement.record_round(doc)
        except Exception as exc:  # settlement is another service: its failure must not end rounds
            log.error("settlement record_round failed for round %d: %s", slot.round_id, exc)
            return
        slot.shell["recorded"] = True
        self._persist(slot)

    # -- status --

    def report(self, *, waiting: str | None = None) -> None:
        if waiting is not None:
            self.waiting = waiting
        rounds = [round_summary(slot) for _, slot in sorted(self.slots.items())]  # the kept ones only
        ended = {r for r, s in self.slots.items() if s.terminal() and (
            s.validator.phase is agg.Phase.ABORTED or "after" in s.shell["evaluation"])}
        # done: every planned round ended; a mesh without trainers plans none; rounds = 0
        # (until stopped) is never done
        # (retention drops only ended rounds: one below the oldest kept has ended)
        trainers, oldest = getattr(self, "trainers", None), min(self.slots, default=0)
        done = not trainers or (self.settings.rounds > 0 and all(
            r in ended or r < oldest or r in self.adopted for r in range(self.settings.rounds)))
        share = self.key.share if hasattr(self, "key") else None
        self.ctx.report(REPORT_SECTION, {
            "role": "validator", "done": done, "rounds_planned": self.settings.rounds, "opener": self.opener,
            "committee": {"member": share is not None, "index": share.index if share else None,
                          "threshold": self.key.threshold, "size": len(self.key.members)},
            "outer": self.config.outer, "eval": self.eval_status, "rounds": rounds, "errors": self.errors[-20:],
            "inbox_dropped": self.inbox.dropped, "waiting": getattr(self, "waiting", None),
            "keep_rounds": self.settings.keep_rounds, "rounds_adopted": self.adopted[-20:]})


def round_summary(slot: RoundSlot) -> dict[str, Any]:
    v, c, ro, shell = slot.validator, slot.committee, slot.ro, slot.shell
    phases = shell["phases"]
    marks = [("collect", "collect", "aggregate"), ("aggregate", "aggregate", "decrypt"),
             ("decrypt", "decrypt", "final")]
    seconds = {name: round((phases[b] - phases[a]) / 1000, 3) for name, a, b in marks if a in phases and b in phases}
    seconds.update(shell["seconds"])
    return {
        "round": slot.round_id, "phase": v.phase.value, "abort_reason": v.abort_reason,
        "base_adapter_id": ro.base_adapter_id, "adapter_id": v.adapter_id,
        "aggregate_id": v.agreed.aggregate_id if v.agreed else "",
        "contributors": list(v.agreed.contributors) if v.agreed else sorted(v.accepted),
        "received": sorted(v.contributions),
        "rejected": [{"trainer": e.trainer, "blob_id": e.blob_id, "reason": e.reason, "evidence_id": e.evidence_id}
                     for e in v.exclusions()],
        "partials_valid": sorted(v.partials_valid), "bad_partials": dict(v.bad_partials),
        "covers_valid": sorted(v.covers_valid), "bad_covers": dict(v.bad_covers),
        "bad_contributors": dict(v.bad_contributors),
        "blame": v.blame.to_state() if v.blame else None,
        "cover_blocks": shell.get("cover_blocks"),
        "partials_used": shell["partials_used"], "committee_phase": c.phase.value if c else None,
        "decrypted_blocks": shell.get("decrypted_blocks"), "alive_members": shell.get("alive_members"),
        "loss_before": shell["evaluation"].get("before"), "loss_after": shell["evaluation"].get("after"),
        "seconds": seconds, "mean_stats": dict(v.mean_stats), "finals_heard": dict(shell["finals"]),
        "deadline_ms": ro.deadline_ms,
    }


def make_service(settings: NodeSettings) -> RoundsService | None:
    return RoundsService(settings) if settings.role is Role.VALIDATOR and settings.training else None


# --- sealmesh testnet ----------------------------------------------------------------------


def prepare_testnet(plan, nodes, root: Path) -> None:
    """Deal the committee key to the validators (t = majority) and write every node's
    committee files and round configuration. Nothing to do without trainers or rounds."""
    if not plan.trainers or not plan.rounds:
        return
    validators = [n for n in nodes if n.role is Role.VALIDATOR]
    if not validators:
        raise ValueError("training rounds need at least one validator (the committee)")
    keys = cm.deal_committee([n.hotkey for n in validators], plan.key_bits)
    # The mesh's minimum, in every node's committee files: a RoundOpen cannot lower it.
    policy = agg.RoundPolicy(min_contributors=max(1, min(2, plan.trainers)))
    keys = [replace(k, round_policy=policy) for k in keys]
    public_only = cm.CommitteeKey(keys[0].public, keys[0].verification_keys, keys[0].threshold, keys[0].members,
                                  round_policy=policy)
    by_hotkey = {k.members[k.share.index - 1]: k for k in keys}
    config = RoundConfig(collect_s=10.0 + 2.0 * plan.trainers, first_round_extra_s=5.0 + len(nodes) / 2,
                         min_contributors=policy.min_contributors)
    for node in nodes:
        cm.save_committee(node.data_dir / cm.COMMITTEE_DIR, by_hotkey.get(node.hotkey, public_only))
        if not (node.data_dir / ROUND_CONFIG_FILE).exists():
            write_round_config(node.data_dir, config)


def summarize(plan, statuses: dict[str, dict | None]) -> dict[str, Any]:
    """report.json "training": per round, what the validators agree on, and what went wrong."""
    names = {s["hotkey"]: n for n, s in statuses.items() if s and s.get("hotkey")}
    sections = {n: s.get("sections", {}).get(REPORT_SECTION) for n, s in statuses.items() if s}
    validators = {n: d for n, d in sections.items() if d and d.get("role") == "validator"}
    trainers = {n: d for n, d in sections.items() if d and d.get("role") == "trainer"}
    problems: list[str] = []
    rounds = []
    if not plan.trainers or not plan.rounds:
        return {"rounds": [], "problems": []}
    if not validators:
        return {"rounds": [], "problems": ["training: no validator reported a training section"]}

    def name(hotkey: str) -> str:
        return names.get(hotkey, hotkey[:8])

    for r in range(plan.rounds):
        entries = {n: next((e for e in d["rounds"] if e["round"] == r), None) for n, d in validators.items()}
        finals = {n: e for n, e in entries.items() if e and e["phase"] == "final"}
        if not finals:
            phases = {n: (e["phase"] + (f":{e['abort_reason']}" if e["abort_reason"] else "")) if e else "never opened"
                      for n, e in entries.items()}
            problems.append(f"training round {r} did not complete: {phases}")
            rounds.append({"round": r, "complete": False, "phases": phases})
            continue
        for n, e in entries.items():
            if n not in finals:
                problems.append(f"training round {r}: {n} ended {e['phase'] if e else 'without the round'}")
        ids = {e["adapter_id"] for e in finals.values()}
        if len(ids) > 1:
            problems.append(f"training round {r}: validators disagree on the adapter: "
                            f"{ {n: e['adapter_id'][:12] for n, e in finals.items()} }")
        first = finals[sorted(finals)[0]]
        before, after = first["loss_before"], first["loss_after"]
        if before is None or after is None:
            problems.append(f"training round {r}: not evaluated")
        elif not after < before:
            problems.append(f"training round {r}: eval loss did not fall ({before:.4f} -> {after:.4f})")
        seconds: dict[str, float] = {}
        for e in finals.values():
            for k, value in e["seconds"].items():
                seconds[k] = max(seconds.get(k, 0.0), value)
        rounds.append({
            "round": r, "complete": True, "adapter_id": first["adapter_id"],
            "base_adapter_id": first["base_adapter_id"], "validators_agree": len(ids) == 1,
            "validators_final": sorted(finals),
            "contributors": [name(h) for h in first["contributors"]],
            "rejected": [{"trainer": name(x["trainer"]), "reason": x["reason"], "evidence_id": x["evidence_id"]}
                         for x in first["rejected"]],
            "partials_used": {b: [name(h) for h in members] for b, members in first["partials_used"].items()},
            "bad_partials": {name(h): why for h, why in first["bad_partials"].items()},
            "loss_before": before, "loss_after": after, "seconds": seconds, "mean_stats": first["mean_stats"],
        })
    trainer_rounds = {n: d.get("rounds", []) for n, d in sorted(trainers.items())}
    return {"rounds": rounds, "trainers": trainer_rounds, "problems": problems}


__all__ = ["REPORT_SECTION", "RoundConfig", "RoundConfigError", "RoundsService", "load_round_config",
           "make_service", "prepare_testnet", "summarize", "write_round_config"]
