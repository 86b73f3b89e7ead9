"""A trainer's rounds: the shell around protocol/aggregation.TrainerRound.

On a RoundOpen: fetch the round's base adapter, train K steps on this trainer's own shard
(training/, in a worker thread) while the offline half of sealing runs in another
(crypto.contribution.precompute), then seal the delta under the committee key, store the
blob and publish its id. Nothing but the sealed, proven update leaves the node.

Until a round is final the trainer keeps, in memory only, the update it sealed and the
randomizers that encrypted it (at most MAX_KEPT_ROUNDS rounds): if the round's sum
overflows a slot, a round validator's BlameRequest asks every contributor to prove the
position in range (crypto.contribution.prove_slots; issue 11 finding 5), and a trainer
that cannot answer is named like one that cheated. The machine decides whom to answer.

A trainer trains on its own text (`--data`, training.load_texts), read on this node and
kept in memory here: nothing of it is published, stored for others or reported, only
the sealed update trained on it. Without --data it refuses to train and says so every
minute, except in `sealmesh testnet` (demo_corpus), where each trainer takes its shard of
the shipped corpus (split by sorted hotkeys of the genesis file). behaviour "cheat" (sealmesh
testnet --fault) tampers one ciphertext after proving: valid encoding, bad proof;
validators must exclude it with evidence.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Any

import trio

from node import committee as cm
from node.blobs import BlobFetchError
from node.clock import now_ms
from node.roles.base import GuardedWork, RoleContext, RoleService, remind
from node.roles.rounds import (REPORT_SECTION, STATE_DIR, Inbox, RoundConfig, StateFiles, adapter_values,
                               layout_of, load_training_model, members_with, mesh_rounds, vector_of_adapter)
from node.settings import NodeSettings
from protocol import aggregation as agg
from protocol.aggregation_messages import BlameRequest, ContributionVerdict, RoundAborted, RoundFinal, RoundOpen
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.membership import Role
from protocol.messages import Channel, Message
from training.errors import DataError
from training.privacy import PrivacyConfig, privacy_report, privatize

log = logging.getLogger("sealmesh.trainer")

RESEND_S = 3.0
MAX_KEPT_ROUNDS = 3  # rounds whose sealed update is kept for a blame step, newest first
BEHAVIOURS = ("honest", "cheat")


# A round in one of these is over for this trainer: retention may drop it once old.
TERMINAL_PHASES = frozenset({agg.TrainerPhase.FINAL, agg.TrainerPhase.ABORTED, agg.TrainerPhase.MISSED})


class TrainerUsageError(LocalProtocolError):
    reason = "trainer"


def shard_index(trainers: list[str], me: str) -> int:
    if me not in trainers:
        raise TrainerUsageError(f"{me} is not a trainer in the genesis file")
    return trainers.index(me)


def tamper(public, item):
    """A contribution whose first ciphertext is changed after proving: it still decodes
    (a unit mod n^2), but the range proof no longer verifies for it."""
    from dataclasses import replace

    first = item.ciphertexts[0] * (1 + public.n) % public.n_squared  # adds 1 to the plaintext
    return replace(item, ciphertexts=(first, *item.ciphertexts[1:]))


def round_seed(round_id: int, index: int) -> int:
    return 1_000_003 * round_id + index


def training_texts(settings: NodeSettings, trainers: int, index: int) -> tuple[list[str], str]:
    """(texts, where they come from) that this trainer trains on: its own --data; without
    one, in `sealmesh testnet` only (demo_corpus), its shard of the shipped corpus.
    DataError when there is none or it is unusable."""
    from training import demo_split, load_texts

    if settings.data is not None:
        return load_texts(settings.data), f"data {settings.data}"
    if settings.demo_corpus:
        return list(demo_split(trainers).shards[index]), f"demo corpus shard {index} of {trainers}"
    raise DataError("no training data", reason="no_data")


def data_fix(settings: NodeSettings) -> str:
    if settings.data is None:
        return ('pass --data PATH (a .txt or .jsonl file, or a folder of them) or set data = "PATH" in node.toml, '
                "then restart the node")
    return f"correct the data at {settings.data} (or pass another --data PATH); training starts once it loads"


class TrainerService(GuardedWork, RoleService):
    name = "trainer"
    channels = frozenset({Channel.TRAIN})
    disabled: str | None = None  # why this trainer does not train now (no or bad data), for its status
    data_source: str | None = None

    def __init__(self, settings: NodeSettings) -> None:
        if settings.behaviour not in BEHAVIOURS:
            raise TrainerUsageError(f"behaviour {settings.behaviour!r} is not a trainer behaviour {BEHAVIOURS}")
        self.settings = settings
        self.inbox = Inbox()
        self.machines: dict[int, agg.TrainerRound] = {}
        self.shell: dict[int, dict[str, Any]] = {}
        self.model_ready = trio.Event()
        self.model = self.tokenizer = None
        self.texts: list[str] = []  # our own training text: memory only, never sent
        self.blocks: dict[int, Any] = {}  # block_len -> token blocks of our texts
        self.errors: list[str] = []
        self.privacy = privacy_config(settings)
        # round -> (sealed update, its Precomputation's randomizers): secrets, memory only
        self.kept: OrderedDict[int, tuple[Any, Any]] = OrderedDict()

    def on_message(self, sender: str, message: Message, received_ms: int) -> None:
        self.inbox.put(sender, message, received_ms)

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ctx = ctx
        self.me = ctx.hotkey.ss58_address
        try:
            self.key = cm.load_committee(self.settings.data_dir / cm.COMMITTEE_DIR,
                                          insecure_small_committee=self.settings.insecure_small_committee)
        except cm.CommitteeKeyError as exc:  # no committee yet: nothing to train for, until it comes
            ctx.report(REPORT_SECTION, {"role": "trainer", "disabled": str(exc)})
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED  # started already: the nursery below must not say so again
            self.key = await remind(
                ctx, f"trainer: training disabled: {exc}",
                f"put this node's committee files in {self.settings.data_dir / cm.COMMITTEE_DIR} (`sealmesh "
                "committee deal` or `sealmesh committee keygen` writes them); training starts once they load",
                retry=lambda: cm.load_committee(self.settings.data_dir / cm.COMMITTEE_DIR, insecure_small_committee=
                                                self.settings.insecure_small_committee), still=cm.CommitteeKeyError)
        self.trainers = members_with(ctx.genesis, Role.TRAINER)
        self.mesh = mesh_rounds(ctx.genesis, self.key)  # who may open a round, with which bounds
        self.index = shard_index(self.trainers, self.me)

        def texts() -> tuple[list[str], str]:
            return training_texts(self.settings, len(self.trainers), self.index)

        try:
            self.texts, self.data_source = await trio.to_thread.run_sync(texts)
        except DataError as exc:  # said now and every minute; the node and its other roles go on
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            self.texts, self.data_source = await self._until_data(exc, retry=texts)
        self.states = StateFiles(ctx.data_dir / STATE_DIR, "trainer")
        self.train_lock = trio.Lock()  # one round's training at a time: one model
        self.report()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            self._start(self._load_model)
            for round_id, doc in self.states.load_all().items():
                self.machines[round_id] = machine = agg.TrainerRound.from_state(doc["machine"])
                self.shell[round_id] = doc.get("shell", {})
                if machine.round_open is not None and machine.phase not in (agg.TrainerPhase.FINAL,
                                                                            agg.TrainerPhase.ABORTED):
                    self._start(self._timer, round_id, machine.round_open.final_deadline_ms)
                await self._apply(round_id, machine.resume_effects())
            nursery.start_soon(self._inbox_loop)
            nursery.start_soon(self._resend_loop)

    async def _load_model(self) -> None:
        """The model, then our texts as token blocks of the default block_len: too little
        text is found at start, not at the first round."""
        self.tokenizer, self.model = await trio.to_thread.run_sync(load_training_model, self.settings)
        block_len = RoundConfig().block_len
        try:
            blocks = await trio.to_thread.run_sync(self._data_blocks, block_len)
        except DataError as exc:
            blocks = await self._until_data(exc, retry=lambda: self._reload_data(block_len))
        log.info("phase=model-ready %s: %d texts, %d blocks of %d tokens", self.data_source, len(self.texts),
                 len(blocks), block_len)
        self.model_ready.set()

    def _data_blocks(self, block_len: int):
        """Worker thread: our texts as token blocks; DataError, naming the data, if too short."""
        from training import token_blocks

        if block_len not in self.blocks:
            try:
                self.blocks[block_len] = token_blocks(self.tokenizer, self.texts, block_len)
            except DataError as exc:
                raise DataError(f"{self.data_source}: {exc}", reason=exc.reason) from exc
        return self.blocks[block_len]

    def _reload_data(self, block_len: int):
        self.texts, self.data_source = training_texts(self.settings, len(self.trainers), self.index)
        self.blocks.clear()
        return self._data_blocks(block_len)

    async def _until_data(self, problem: DataError, *, retry):
        """No training (RoundOpens are ignored) until `retry()` loads usable data: the
        problem and its fix in the log and in our status section now and every minute."""
        self.disabled = f"{problem}; fix: {data_fix(self.settings)}"
        self.report()
        result = await remind(self.ctx, f"trainer: training disabled: {problem}", data_fix(self.settings),
                              retry=retry, still=DataError)
        self.disabled = None
        self.report()
        return result

    # -- gossip --

    async def _inbox_loop(self) -> None:
        async for sender, message, _ in self.inbox.receive:
            await self._handle(sender, message)
            self.report()

    async def _handle(self, sender: str, message: Message) -> None:
        round_id = getattr(message, "round_id", -1)
        if isinstance(message, RoundOpen):
            await self._join(sender, message)
        elif round_id not in self.machines:
            if isinstance(message, BlameRequest):
                self.ctx.metrics.reject("round", "not_a_contributor")
                log.warning("round=%d BlameRequest refused reason=not_a_contributor", round_id)
        elif isinstance(message, RoundFinal):
            await self._feed(round_id, lambda m: m.receive_round_final(sender, message))
            machine = self.machines.get(round_id)  # retention may have dropped it just now
            if machine is None or machine.phase is agg.TrainerPhase.FINAL:
                self.kept.pop(round_id, None)  # an adapter came out: no blame step can follow
        elif isinstance(message, RoundAborted):
            await self._feed(round_id, lambda m: m.receive_round_aborted(sender, message))
        elif isinstance(message, BlameRequest):
            await self._feed(round_id, lambda m: m.receive_blame_request(sender, message))
        elif isinstance(message, ContributionVerdict) and message.trainer == self.me:
            self.shell[round_id].setdefault("verdicts", {})[sender] = message.reason or "accepted"
            self._persist(round_id)

    async def _join(self, sender: str, ro: RoundOpen) -> None:
        """A round gets a machine (and a state file) only once the machine joined it: a
        refused RoundOpen (agg.round_open_refusal: not the scheduled opener, an unexpected
        round id, another minimum, unbounded steps...) leaves nothing behind."""
        if self.disabled:  # no usable data: the reminder says so every minute
            return
        machine = self.machines.get(ro.round_id) or agg.TrainerRound(self.me)
        last = max((r for r, m in self.machines.items() if m.round_open is not None), default=None)
        try:
            effects = machine.join_round(sender, ro, mesh=self.mesh, now_ms=now_ms(), last_round_id=last)
        except RemoteProtocolError as exc:
            self.ctx.metrics.reject("round", exc.reason)
            log.warning("round=%d RoundOpen refused reason=%s: %s", ro.round_id, exc.reason, exc.hint)
            return
        self.machines[ro.round_id] = machine
        self.shell.setdefault(ro.round_id, {})
        self._persist(ro.round_id)
        await self._apply(ro.round_id, effects)
        self.report()

    async def _feed(self, round_id: int, event) -> None:
        machine = self.machines.get(round_id)
        if machine is None:  # a round retention dropped (its timer or a late re-send): nothing to do
            return
        try:
            effects = event(machine)
        except RemoteProtocolError as exc:
            self.ctx.metrics.reject("round", exc.reason)
            log.warning("round=%d rejected reason=%s: %s", round_id, exc.reason, exc.hint)
            return
        except LocalProtocolError as exc:
            self.errors.append(f"round {round_id}: {exc}")
            log.error("round=%d local protocol error: %s", round_id, exc)
            return
        self._persist(round_id)
        await self._apply(round_id, effects)
        if machine.phase in TERMINAL_PHASES:
            self._retain()
        self.report()

    def _retain(self) -> None:
        """Keep the newest keep_rounds rounds (protocol/retention.py): older state files,
        our contributions, slot proofs and fetched base adapters go."""
        from protocol.retention import RoundRecord, retention_plan

        records = [RoundRecord(r, m.phase in TERMINAL_PHASES, m.blob_ids(),
                               m.round_open.base_adapter_id if m.round_open else "",
                               m.adapter_id if m.phase is agg.TrainerPhase.FINAL else "")
                   for r, m in self.machines.items()]
        plan = retention_plan(records, self.settings.keep_rounds)
        for round_id in plan.drop_rounds:
            del self.machines[round_id]
            self.shell.pop(round_id, None)
            self.kept.pop(round_id, None)
            self.states.delete(round_id)
        for cid in plan.delete_blobs:
            self.ctx.store.delete(cid)
        if plan.drop_rounds:
            log.info("phase=retention dropped rounds=%s deleted_blobs=%d", list(plan.drop_rounds),
                     len(plan.delete_blobs))

    def _persist(self, round_id: int) -> None:
        self.states.save(round_id, {"machine": self.machines[round_id].to_state(), "shell": self.shell[round_id]})

    async def _apply(self, round_id: int, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, agg.Send):
                await self._publish(effect.message)
            elif isinstance(effect, agg.SetTimer):
                self._start(self._timer, round_id, effect.at_ms)
            elif isinstance(effect, agg.EnterPhase):
                self.shell[round_id].setdefault("phases", {})[effect.phase] = now_ms()
                log.info("phase=%s round=%d%s", effect.phase, round_id,
                         f" reason={effect.reason}" if effect.reason else "")
            elif isinstance(effect, agg.Train):
                self._start(self._train, round_id, effect.round_open)
            elif isinstance(effect, agg.ProveSlots):
                self._start(self._prove_slots, round_id, effect)
            else:
                raise LocalProtocolError(f"no trainer shell for effect {effect!r}")

    async def _publish(self, message: Message) -> None:
        try:
            await self.ctx.publish(message)
        except Exception as exc:  # resends cover a failed publish
            log.warning("publish %s failed: %s", message.TYPE, exc)

    async def _timer(self, round_id: int, at_ms: int) -> None:
        await trio.sleep(max(0.0, (at_ms - now_ms()) / 1000))
        await self._feed(round_id, lambda m: m.final_deadline(now_ms=max(now_ms(), at_ms)))

    async def _resend_loop(self) -> None:
        while True:
            await trio.sleep(RESEND_S)
            for round_id, machine in list(self.machines.items()):
                shell = self.shell[round_id]
                if (machine.phase is agg.TrainerPhase.CONTRIBUTED and machine.round_open is not None
                        and now_ms() < machine.round_open.deadline_ms):
                    from protocol.aggregation_messages import Contribution

                    await self._publish(Contribution(round_id, machine.blob_id, shell["ciphertexts"], shell["size"]))

    # -- one round's work --

    async def _train(self, round_id: int, ro: RoundOpen) -> None:
        from crypto import contribution

        shell = self.shell[round_id]
        try:
            base = await self._fetch_base(ro)
        except (BlobFetchError, RemoteProtocolError) as exc:
            self.errors.append(f"round {round_id}: base adapter {ro.base_adapter_id[:12]}: {exc}")
            log.error("round=%d cannot fetch the base adapter: %s", round_id, exc)
            return
        await self.model_ready.wait()
        if self._past(round_id):
            return
        layout = layout_of(ro)
        values = adapter_values(ro)
        if base.size != values:
            self.errors.append(f"round {round_id}: base adapter has {base.size} values, the round {values}")
            return
        hyper = ro.hyperparameters
        started = now_ms()
        async with self.train_lock:
            if self._past(round_id):  # another round's training took the time
                return
            results: dict[str, Any] = {}

            async def precompute() -> None:
                t0 = now_ms()
                results["pre"] = await trio.to_thread.run_sync(contribution.precompute, self.key.public, layout, values)
                shell["precompute_s"] = round((now_ms() - t0) / 1000, 3)

            async def train() -> None:
                from training import local_train

                def run():
                    blocks = self._data_blocks(int(hyper["block_len"]))
                    return local_train(self.model, base, blocks, steps=int(hyper["steps"]), lr=float(hyper["lr"]),
                                       batch_size=int(hyper["batch_size"]), seed=round_seed(round_id, self.index))

                t0 = now_ms()
                results["update"] = await trio.to_thread.run_sync(run)
                shell["train_s"] = round((now_ms() - t0) / 1000, 3)

            async with trio.open_nursery() as both:  # the offline crypto overlaps training
                both.start_soon(precompute)
                both.start_soon(train)
        update = results["update"]
        shell.update(first_loss=update.first_loss, last_loss=update.last_loss, train_loss=update.train_loss)
        await self._seal_and_contribute(round_id, ro, update.delta, results["pre"], started_ms=started)

    def _past(self, round_id: int) -> bool:
        """The round ended or its deadline passed while we waited (agg.TrainerRound.worth_training)."""
        machine = self.machines.get(round_id)
        if machine is not None and machine.worth_training(now_ms()):
            return False
        log.info("phase=skipped round=%d reason=the round ended or its deadline passed before training could start",
                 round_id)
        self.shell.get(round_id, {})["skipped"] = "deadline passed before training could start"
        return True

    async def _seal_and_contribute(self, round_id: int, ro: RoundOpen, delta, pre, *, started_ms: int) -> None:
        """Seal `delta` with the precomputation, keep what a blame step needs, store, contribute."""
        from crypto import contribution

        shell, layout = self.shell[round_id], layout_of(ro)
        t0 = now_ms()
        context = contribution.context_for(self.key.public, self.ctx.genesis.mesh_id, round_id, self.me)

        self._warn_if_noise_clipped(round_id, layout.clip_bound)

        def seal() -> tuple[bytes, Any]:
            # DP before quantize/pack/encrypt: the per-value clip and quantization are post-processing
            sealed_delta = privatize(delta, self.privacy)
            item = contribution.seal(self.key.public, layout, sealed_delta, context, precomputed=pre)
            if self.settings.behaviour == "cheat":
                item = tamper(self.key.public, item)
            return contribution.encode(self.key.public, item), sealed_delta

        blob, sealed_delta = await trio.to_thread.run_sync(seal)
        blob_id = self.ctx.store.put(blob)
        self._keep(round_id, sealed_delta, pre)
        shell.update(seal_s=round((now_ms() - t0) / 1000, 3), work_s=round((now_ms() - started_ms) / 1000, 3),
                     ciphertexts=ro.ciphertexts_per_contribution, size=len(blob), behaviour=self.settings.behaviour)
        if self.privacy.enabled:  # recorded before the blob is published: a released round always counts
            shell["dp_noise_multiplier"] = self.privacy.noise_multiplier
            self._persist(round_id)
            self._log_privacy(round_id)
        log.info("phase=sealed round=%d blob=%s bytes=%d loss %.4f -> %.4f%s", round_id, blob_id[:12], len(blob),
                 shell.get("first_loss", float("nan")), shell.get("last_loss", float("nan")),
                 " (tampered)" if self.settings.behaviour == "cheat" else "")
        await self._feed(round_id, lambda m: m.contribute(blob_id, ciphertext_count=ro.ciphertexts_per_contribution,
                                                          size_bytes=len(blob), now_ms=now_ms()))

    # -- the blame step (issue 11 finding 5) --

    def _keep(self, round_id: int, sealed_delta, pre) -> None:
        """What prove_slots needs until the round is final: the sealed update and the
        randomizers (the subset-proof masks are spent and dropped). Bounded: the oldest
        round goes first."""
        self.kept[round_id] = (sealed_delta, dataclasses.replace(pre, subsets=[]))
        self.kept.move_to_end(round_id)
        while len(self.kept) > MAX_KEPT_ROUNDS:
            self.kept.popitem(last=False)

    async def _prove_slots(self, round_id: int, effect: agg.ProveSlots) -> None:
        from crypto import contribution

        kept = self.kept.get(round_id)
        ro = self.machines[round_id].round_open
        if kept is None or ro is None:  # restarted, or the round fell out of the bound
            self.errors.append(f"round {round_id}: a blame step asks for a slot proof; the sealed update is gone")
            log.error("round=%d cannot answer the blame step: the sealed update is not kept", round_id)
            return
        p = effect.position
        blame = contribution.Blame(p.plaintext_index, p.slot, p.top)
        t0 = now_ms()

        def prove() -> bytes:
            context = contribution.slot_context_for(self.key.public, self.ctx.genesis.mesh_id, round_id, self.me,
                                                    blame)
            proof = contribution.prove_slots(self.key.public, layout_of(ro), kept[0], kept[1], blame, context)
            return contribution.encode_slot_proof(proof)

        blob_id = self.ctx.store.put(await trio.to_thread.run_sync(prove))
        self.shell[round_id].setdefault("slot_proofs", {})[str(p.to_state())] = round((now_ms() - t0) / 1000, 3)
        log.info("phase=slot-proof round=%d position=%s blob=%s", round_id, p.to_state(), blob_id[:12])
        await self._feed(round_id, lambda m: m.slot_proved(p, blob_id))

    async def _fetch_base(self, ro: RoundOpen):
        until = ro.deadline_ms
        while True:
            try:
                data = await self.ctx.fetch(ro.base_adapter_id, list(ro.validators), max_bytes=64 << 20, timeout_s=30)
                break
            except BlobFetchError:
                if now_ms() >= until:
                    raise
                await trio.sleep(1.0)
        # Decoded with torch only once the model loaded: torch's first use on two threads at
        # once (the loader's and ours) can deadlock the node (training.vector.warm_numpy_bridge).
        await self.model_ready.wait()
        return vector_of_adapter(data)[1]

    # -- privacy --

    def released_noise_multipliers(self) -> list[float]:
        """One entry per round whose noised update this trainer sealed (persisted with the round)."""
        return [shell["dp_noise_multiplier"] for _, shell in sorted(self.shell.items())
                if "dp_noise_multiplier" in shell]

    def privacy_status(self) -> dict | None:
        if not self.privacy.enabled and not self.released_noise_multipliers():
            return None
        return privacy_report(self.released_noise_multipliers(), self.privacy)

    def _log_privacy(self, round_id: int) -> None:
        spent = self.privacy_status()
        log.info("phase=privacy round=%d rounds_released=%d epsilon=%.3f delta=%g (replace-one %.3f) z=%g C=%g",
                 round_id, spent["rounds"], spent["epsilon"], spent["delta"], spent["epsilon_replace_one"],
                 spent["noise_multiplier"], spent["clip_norm"])

    def _warn_if_noise_clipped(self, round_id: int, clip_bound: float) -> None:
        # The packing clips each value to +-clip_bound: still private, but noise cut off there
        # no longer averages out across trainers.
        if self.privacy.enabled and 3 * self.privacy.sigma > clip_bound:
            log.warning("round=%d dp sigma=%g is over a third of the round's clip_bound=%g: the packing will "
                        "cut the noise off; lower dp_clip_norm or raise the round's clip_bound",
                        round_id, self.privacy.sigma, clip_bound)

    # -- status --

    def report(self) -> None:
        rounds = []
        for round_id, machine in sorted(self.machines.items()):
            shell = self.shell.get(round_id, {})
            rounds.append({"round": round_id, "phase": machine.phase.value, "blob_id": machine.blob_id,
                           "included": machine.included, "adapter_id": machine.adapter_id,
                           "abort_reason": machine.abort_reason,
                           **{k: shell[k] for k in ("train_s", "precompute_s", "seal_s", "work_s", "first_loss",
                                                    "last_loss", "verdicts") if k in shell}})
        self.ctx.report(REPORT_SECTION, {"role": "trainer", "behaviour": self.settings.behaviour,
                                         "disabled": self.disabled, "data": self.data_source,
                                         "model_ready": self.model_ready.is_set(),
                                         "shard": getattr(self, "index", None), "rounds": rounds,
                                         "privacy": self.privacy_status(), "errors": self.errors[-20:]})


def privacy_config(settings: NodeSettings) -> PrivacyConfig:
    """The trainer's DP settings (off unless dp_noise_multiplier > 0); bad values stop the node at start."""
    return PrivacyConfig(noise_multiplier=settings.dp_noise_multiplier, clip_norm=settings.dp_clip_norm,
                         delta=settings.dp_delta)


def make_service(settings: NodeSettings) -> TrainerService | None:
    return TrainerService(settings) if settings.role is Role.TRAINER else None


__all__ = ["TrainerService", "data_fix", "make_service", "privacy_config", "round_seed", "shard_index", "tamper",
           "training_texts"]
