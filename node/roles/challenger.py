"""A validator's FHE challenges: the shell around protocol/challenge.ChallengeMachine.

The validator compiles or loads its OWN bundle (never a miner's client files) and its
own keys (fhe.bundle.ValidatorClient: generated once, kept 0600 under the role's data
dir). Each epoch it waits for the miners' ModelOffers, keeps those whose server.zip
sha256 is the one it compiled, lets the machine split the miners among the validators,
and for each of its miners: uploads its evaluation keys once, draws an input
(fhe.inputs), encrypts it, sends it, times the miner's part only (send to answer),
decrypts, and compares with its own clear quantized run. Every challenge ends in
exactly one outcome in node/history.py; the epoch's scores (protocol/scoring.py) are
gossiped as ScoreReports, handed to the settlement service if it takes them, and set as
weights on Bittensor when the node runs on a subnet (settings.network).

A miner is challenged over the Brainlock subnet's HTTP protocol (issue 13) when its signed
ModelOffer names a brainlock_port: dialled on the host of its announced addresses (never
a URL it chose; ModelOffer says why). DATA_DIR/brainlock_endpoints.json
({"<miner hotkey>": "host:port"}) is an operator's override that wins over the offer (a
miner behind a proxy or NAT whose announced host is not where its HTTP server is reached).
Keys go through /add_key, the challenge
through /compute with the same iterations, chained. The first chunk is the circuit once
on our input and is scored exactly as a libp2p result; every later chunk is decrypted
and compared with our own clear chain, and one that strays is the error outcome
`wrong_chained_output` (which iteration in the outcome's detail); a stream that fails
Brainlock's own streaming check is an error outcome `late_stream`. libp2p stays the
default.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import trio

from node.cli_errors import UserError
from node.fhe_service import (REPORT_SECTION, ExchangeError, FheConfig, ensure_bundle, exchange, load_fhe_config,
                              write_fhe_config)
from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings
from protocol.brainlock import WRONG_CHAINED_OUTPUT, offered_endpoint, parse_endpoint
from protocol.challenge import (UNKNOWN_KEY, ChallengeConfig, ChallengeMachine, Effect, GossipScore,
                                RecordOutcome, SendChallenge, UploadKey)
from protocol.challenge_messages import AddKey, ChallengeRequest, ChallengeResponse, KeyAdded, ModelOffer, ScoreReport
from protocol.membership import Role
from protocol.messages import Channel, Message
from protocol.scoring import Outcome, WindowEntry, score_window
from protocol.scoring import weights as score_weights

log = logging.getLogger("sealmesh.challenger")

KEY_UPLOAD_TIMEOUT_S = 120.0
MAX_OUTCOMES_REPORTED = 200
BRAINLOCK_ENDPOINTS_FILE = "brainlock_endpoints.json"


def load_brainlock_endpoints(data_dir: Path) -> dict[str, tuple[str, int]]:
    """miner hotkey -> (host, port) from DATA_DIR/brainlock_endpoints.json; {} without it."""
    path = Path(data_dir) / BRAINLOCK_ENDPOINTS_FILE
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not an object of miner hotkey -> host:port")
        return {str(miner): parse_endpoint(endpoint) for miner, endpoint in doc.items()}
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; write {{\"<miner hotkey>\": \"host:port\"}} or delete the file") from exc


class ChallengerService(RoleService):
    name = "challenger"
    channels = frozenset({Channel.FHE})

    def __init__(self, settings: NodeSettings, config: FheConfig | None = None, *,
                 brainlock_endpoints: dict[str, tuple[str, int]] | None = None) -> None:
        self.settings = settings
        self.config = config or load_fhe_config(settings.data_dir)
        # miners challenged over the Brainlock HTTP protocol instead of libp2p, and the uid
        # each one's /add_key issued for our keys
        self.brainlock_endpoints = dict(brainlock_endpoints) if brainlock_endpoints is not None \
            else load_brainlock_endpoints(settings.data_dir)
        self.brainlock_uids: dict[str, str] = {}
        self.outcome_details: dict[str, str] = {}  # challenge id -> what was wrong (e.g. which iteration)
        # Import Concrete and SQLAlchemy now, before the node joins the mesh: importing them
        # later, even in a worker thread, holds the GIL for seconds and starves gossip.
        import fhe.bundle, fhe.inputs, node.history  # noqa: F401, E401
        from concrete.ml.deployment import FHEModelClient  # noqa: F401
        self.offers: dict[str, ModelOffer] = {}  # miner -> its latest offer
        self.offer_seen = trio.Event()
        self.scores_heard: dict[str, dict[str, Any]] = {}  # "epoch/validator/miner" -> report
        self.outcomes: list[dict[str, Any]] = []
        self.epochs_done: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.epoch_plan: dict[str, tuple[str, ...]] = {}  # validator -> its miners, this epoch
        self.weights_set: list[dict[str, Any]] = []  # per epoch: what went to settlement and the chain
        self.timings: dict[str, float] = {}
        self.client: Any = None
        self.history: Any = None
        self.done = False

    def on_message(self, sender: str, message: Message, received_ms: int) -> None:
        if isinstance(message, ModelOffer):
            self.offers[sender] = message
            self.offer_seen.set()
        elif isinstance(message, ScoreReport):
            self.scores_heard[f"{message.epoch}/{sender}/{message.miner}"] = {
                "epoch": message.epoch, "validator": sender, "miner": message.miner, "score": message.score,
                "challenges": message.challenges, "ok": message.ok}

    # -- start-up --

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from node.history import History

        self.ctx = ctx
        self.me = ctx.hotkey.ss58_address
        self.validators = sorted(m.hotkey for m in ctx.genesis.members if Role.VALIDATOR in m.roles)
        self.miners = sorted(m.hotkey for m in ctx.genesis.members if Role.MINER in m.roles)
        self.history = History(self.settings.db, data_dir=self.settings.data_dir)
        self._report()
        task_status.started()
        try:
            await self._load_client(ctx)
            first = 1 + max((r.epoch for r in self.history.records()), default=-1)  # resume after a restart
            self.machine = ChallengeMachine(
                ChallengeConfig(ctx.genesis.mesh_id, self.config.challenges_per_miner,
                                self.config.response_timeout_s, iterations=self.config.iterations),
                self.me, windows=self.history.windows())
            for epoch in range(first, first + self.settings.epochs):
                await self.run_epoch(epoch)
        finally:
            self.done = True
            self._report()
        await trio.sleep_forever()

    async def _load_client(self, ctx: RoleContext) -> None:
        from fhe.bundle import ValidatorClient

        started = time.monotonic()
        bundle = self.config.bundle_path(self.settings.data_dir)
        self.manifest = await trio.to_thread.run_sync(ensure_bundle, self.config.model, bundle)
        self.timings["bundle_s"] = round(time.monotonic() - started, 3)
        started = time.monotonic()

        def load() -> Any:
            client = ValidatorClient(bundle, ctx.data_dir / "fhe-keys")
            client.ensure_keys()
            client.key_id()  # serializes the evaluation keys once
            return client

        self.client = await trio.to_thread.run_sync(load)
        self.timings["keys_s"] = round(time.monotonic() - started, 3)
        log.info("phase=challenger-ready model=%s key_id=%s", self.manifest.model, self.client.key_id()[:16])

    # -- one epoch --

    async def _await_offers(self) -> dict[str, str]:
        """miner -> model, for every miner whose offer matches our own compiled circuit.

        Waits (up to offers_wait_s) for every miner's offer *and* its membership announcement:
        on a loaded start the offer can arrive before the announcement that binds the miner's
        hotkey to its peer id, and challenging then would score an honest miner unreachable.
        """
        with trio.move_on_after(self.config.offers_wait_s):
            while not all(self._announced(m) for m in self.miners):
                self.offer_seen = trio.Event()
                with trio.move_on_after(0.5):  # announcements arrive without an offer event
                    await self.offer_seen.wait()
        offers = {}
        for miner in self.miners:
            offer = self.offers.get(miner)
            if offer is None:
                self._problem(f"no ModelOffer from miner {miner} within {self.config.offers_wait_s:.0f} s")
            elif offer.model != self.manifest.model or offer.server_sha256 != self.manifest.server_sha256:
                self._problem(f"miner {miner} offers {offer.model} {offer.server_sha256[:16]}, not our "
                              f"{self.manifest.model} {self.manifest.server_sha256[:16]}")
            else:
                offers[miner] = offer.model
        return offers

    async def run_epoch(self, epoch: int) -> None:
        offers = await self._await_offers()
        started = time.time()
        await self._drive(self.machine.start_epoch(epoch, offers=offers, key_ids={self.manifest.model: self.client.key_id()},
                                                   validators=self.validators, now=started))
        self.epoch_plan = self.machine.plan  # the machine's split (assign_miners), not a second one
        log.info("phase=epoch-start epoch=%d my_miners=%d of %d", epoch, len(self.machine.assigned), len(offers))
        for miner in self.machine.assigned:
            while self.machine.can_issue(miner):
                seed = await trio.to_thread.run_sync(confident_seed_in_worker, self.client, self.manifest.model)
                await self._drive(self.machine.issue(miner, input_seed=seed, now=time.time()))
        await self._drive(self.machine.close_epoch(now=time.time()))
        self.epochs_done.append({"epoch": epoch, "miners": list(self.machine.assigned),
                                 "seconds": round(time.time() - started, 3)})
        log.info("phase=epoch-closed epoch=%d", epoch)
        self._report()

    async def _drive(self, effects: list[Effect]) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, UploadKey):
                queue += await self._upload_key(effect)
            elif isinstance(effect, SendChallenge):
                queue += await self._send(effect)
            elif isinstance(effect, RecordOutcome):
                self._record(effect)
            elif isinstance(effect, GossipScore):
                await self._gossip_scores(effect)
        self._report()

    def _announced(self, miner: str) -> bool:
        offer = self.offers.get(miner)
        return offer is not None and self.ctx.peer_of(miner) == offer.peer_id

    def _peer(self, miner: str) -> str:
        if not self._announced(miner):
            raise ExchangeError("unreachable", f"miner {miner} has no announced peer id matching its offer")
        return self.offers[miner].peer_id

    async def _upload_key(self, effect: UploadKey) -> list[Effect]:
        if self._brainlock_endpoint(effect.miner) is not None:
            return await self._upload_key_http(effect)
        started = time.monotonic()
        try:
            keys = self.client.evaluation_keys()
            answer, _ = await exchange(self.ctx.mesh, self.ctx.hotkey, self.ctx.verifier, peer_id=self._peer(effect.miner),
                                       peer_hotkey=effect.miner, message=AddKey.for_keys(effect.model, keys),
                                       payload=keys, expect=(KeyAdded,), timeout_s=KEY_UPLOAD_TIMEOUT_S)
            if answer.key_id != effect.key_id:
                raise ExchangeError("wrong_key_id", f"miner acknowledged {answer.key_id[:16]}")
        except ExchangeError as exc:
            return self.machine.error(effect.challenge_id, reason=exc.reason, now=time.time())
        except TimeoutError:
            return self.machine.error(effect.challenge_id, reason="key_upload_timeout", now=time.time())
        self.timings["last_key_upload_s"] = round(time.monotonic() - started, 3)
        return self.machine.key_uploaded(effect.challenge_id, now=time.time())

    async def _send(self, effect: SendChallenge) -> list[Effect]:
        from fhe.bundle import MalformedResult
        from fhe.inputs import draw_challenge_input

        if self._brainlock_endpoint(effect.miner) is not None:
            return await self._send_http(effect)
        cid = effect.challenge_id
        drawn = draw_challenge_input(effect.model, effect.input_seed)
        ciphertext = await trio.to_thread.run_sync(self.client.encrypt, drawn.image)
        request = ChallengeRequest.for_input(cid, effect.epoch, effect.model, effect.key_id, effect.iterations,
                                             ciphertext)
        sent_wall, sent = time.time(), time.monotonic()
        self.machine.sent(cid, at=sent_wall)
        try:
            answer, result = await exchange(self.ctx.mesh, self.ctx.hotkey, self.ctx.verifier,
                                            peer_id=self._peer(effect.miner), peer_hotkey=effect.miner,
                                            message=request, payload=ciphertext, expect=(ChallengeResponse,),
                                            timeout_s=effect.timeout_s)
        except TimeoutError:
            return self.machine.timeout(cid, now=sent_wall + max(effect.timeout_s, time.monotonic() - sent))
        except ExchangeError as exc:
            return self.machine.error(cid, reason=exc.reason, now=time.time())
        at = sent_wall + (time.monotonic() - sent)  # the miner's part: monotonic, from send to answer
        if answer.challenge_id != cid:
            return self.machine.error(cid, reason="wrong_challenge", now=time.time())
        return await self._judge(cid, at, result, drawn.image)

    async def _judge(self, cid: str, at: float, result: bytes, image: Any) -> list[Effect]:
        """Decrypt the miner's result and score it against our clear reference (worker thread)."""
        from fhe.bundle import MalformedResult

        try:
            comparison = await trio.to_thread.run_sync(compare_in_worker, self.client, result, image)
        except MalformedResult as exc:
            return self.machine.error(cid, reason=exc.reason, now=time.time())
        except Exception as exc:  # our own failure: still exactly one outcome, and say so loudly
            log.exception("could not check challenge %s", cid)
            self._problem(f"checking a result failed on this validator: {exc!r}")
            return self.machine.error(cid, reason="validator_error", now=time.time())
        return self.machine.response_received(cid, at=at, argmax_agrees=comparison.argmax_match,
                                              cosine=comparison.cosine)

    # -- the Brainlock HTTP protocol (node/roles/brainlock_http.BrainlockClient) --

    def _brainlock_endpoint(self, miner: str) -> tuple[str, int] | None:
        """The operator's override (brainlock_endpoints.json) first, else the port the
        miner's signed ModelOffer names on the host its Announce gave; None: libp2p."""
        if miner in self.brainlock_endpoints:
            return self.brainlock_endpoints[miner]
        offer = self.offers.get(miner)
        if offer is None or not offer.brainlock_port:
            return None
        return offered_endpoint(self.ctx.addrs_of(miner), offer.brainlock_port)

    def _brainlock_client(self, miner: str, timeout_s: float) -> Any:
        from node.roles.brainlock_http import BrainlockClient

        host, port = self._brainlock_endpoint(miner)
        return BrainlockClient(self.ctx.hotkey, miner, host, port, timeout_s=timeout_s)

    async def _upload_key_http(self, effect: UploadKey) -> list[Effect]:
        started = time.monotonic()
        client = self._brainlock_client(effect.miner, KEY_UPLOAD_TIMEOUT_S)
        try:
            uid = await trio.to_thread.run_sync(client.add_key, self.client.evaluation_keys())
        except ExchangeError as exc:
            return self.machine.error(effect.challenge_id, reason=exc.reason, now=time.time())
        except OSError as exc:  # refused, reset, or the socket's timeout
            log.info("brainlock /add_key to %s failed: %s", effect.miner, exc)
            return self.machine.error(effect.challenge_id, reason="unreachable", now=time.time())
        self.brainlock_uids[effect.miner] = uid
        self.timings["last_key_upload_s"] = round(time.monotonic() - started, 3)
        return self.machine.key_uploaded(effect.challenge_id, now=time.time())

    async def _send_http(self, effect: SendChallenge) -> list[Effect]:
        from fhe.bundle import MalformedResult
        from fhe.inputs import draw_challenge_input

        cid = effect.challenge_id
        uid = self.brainlock_uids.get(effect.miner)
        if uid is None:  # a restart lost the uid: upload again next time
            return self.machine.error(cid, reason=UNKNOWN_KEY, now=time.time())
        drawn = draw_challenge_input(effect.model, effect.input_seed)
        ciphertext = await trio.to_thread.run_sync(self.client.encrypt, drawn.image)
        client = self._brainlock_client(effect.miner, effect.timeout_s)
        compute = functools.partial(client.compute, uid, ciphertext, effect.iterations,
                                    max_chunk_bytes=self.client.max_result_bytes)
        sent_wall, sent = time.time(), time.monotonic()
        self.machine.sent(cid, at=sent_wall)
        result = None
        with trio.move_on_after(effect.timeout_s):
            try:
                result = await trio.to_thread.run_sync(compute, abandon_on_cancel=True)
            except ExchangeError as exc:
                if exc.reason == "unknown_uid":  # the miner dropped our keys: the machine re-uploads
                    self.brainlock_uids.pop(effect.miner, None)
                    return self.machine.error(cid, reason=UNKNOWN_KEY, now=time.time())
                return self.machine.error(cid, reason=exc.reason, now=time.time())
            except OSError as exc:
                if time.monotonic() - sent < effect.timeout_s:
                    log.info("brainlock /compute to %s failed: %s", effect.miner, exc)
                    return self.machine.error(cid, reason="unreachable", now=time.time())
        if result is None:  # the socket's timeout or ours
            return self.machine.timeout(cid, now=sent_wall + max(effect.timeout_s, time.monotonic() - sent))
        at = sent_wall + result.total_s  # the miner's part: from the send to the terminator
        return await self._judge_chain(cid, at, result.chunks, drawn.image)

    async def _judge_chain(self, cid: str, at: float, chunks: tuple[bytes, ...], image: Any) -> list[Effect]:
        """Every chunk of a chained /compute: chunk 1 is the circuit once on our input and
        is scored as a libp2p result is; each later chunk is decrypted and compared with
        our own clear chain (protocol.brainlock.judge_chain). A later chunk that strays is
        the error outcome wrong_chained_output, its iteration in the detail."""
        from fhe.bundle import MalformedResult

        try:
            comparison, fault = await trio.to_thread.run_sync(judge_chain_in_worker, self.client, chunks, image)
        except MalformedResult as exc:
            self.outcome_details[cid] = str(exc)[:300]
            return self.machine.error(cid, reason=exc.reason, now=time.time())
        except Exception as exc:  # our own failure: still exactly one outcome, and say so loudly
            log.exception("could not check challenge %s", cid)
            self._problem(f"checking a result failed on this validator: {exc!r}")
            return self.machine.error(cid, reason="validator_error", now=time.time())
        if fault is not None and comparison.argmax_match:  # a wrong chunk 1 is scored WRONG below
            self.outcome_details[cid] = fault.detail(len(chunks))
            return self.machine.error(cid, reason=WRONG_CHAINED_OUTPUT, now=time.time())
        return self.machine.response_received(cid, at=at, argmax_agrees=comparison.argmax_match,
                                              cosine=comparison.cosine)

    def _record(self, effect: RecordOutcome) -> None:
        record = effect.record
        self.history.record_outcome(record)
        self.outcomes.append({"challenge_id": record.challenge_id, "epoch": record.epoch, "miner": record.miner,
                              "issued_at": record.issued_at, "outcome": record.outcome.value,
                              "latency_s": record.latency_s, "cosine": record.cosine,
                              "error_reason": record.error_reason,
                              "detail": self.outcome_details.pop(record.challenge_id, None)})
        log.info("challenge %s miner=%s outcome=%s latency_s=%s reason=%s %s", record.challenge_id[:12],
                 record.miner, record.outcome.value, record.latency_s, record.error_reason,
                 self.outcomes[-1]["detail"] or "")

    async def _gossip_scores(self, effect: GossipScore) -> None:
        self.history.record_scores(effect)
        for score in effect.scores:
            await self.ctx.publish(ScoreReport.of(effect.epoch, score))
        scores = await self._epoch_scores(effect)
        weights = score_weights(scores)
        doc = {"epoch": effect.epoch, "validator": effect.validator, "scores": scores, "weights": weights}
        self.weights_set.append(doc)
        settlement = self.ctx.settlement
        if settlement is not None:
            settlement.record_scores(doc)
        if self.settings.network:
            try:
                await trio.to_thread.run_sync(set_weights_on_subnet, self.settings, weights)
            except Exception as exc:  # the chain being down must not stop the challenges
                self._problem(f"set_weights on {self.settings.network} failed: {exc}")

    async def _epoch_scores(self, effect: GossipScore) -> dict[str, float]:
        """Every miner's score this epoch: ours, and the other validators' ScoreReports for
        the miners the epoch's split gave them (waited for, within a bound), so settlement
        and weights cover the whole mesh, not only our share of it."""
        scores = {s.miner: s.score for s in effect.scores}
        theirs = {miner: validator for validator, miners in self.epoch_plan.items() if validator != self.me
                  for miner in miners}
        bound = 30.0 + self.config.response_timeout_s * self.config.challenges_per_miner * max(
            (len(m) for m in self.epoch_plan.values()), default=0)
        with trio.move_on_after(bound):
            while any(f"{effect.epoch}/{v}/{m}" not in self.scores_heard for m, v in theirs.items()):
                await trio.sleep(0.5)
        for miner, validator in theirs.items():
            heard = self.scores_heard.get(f"{effect.epoch}/{validator}/{miner}")
            if heard is None:
                self._problem(f"epoch {effect.epoch}: no score for miner {miner} from {validator} in {bound:.0f} s")
            else:
                scores[miner] = heard["score"]
        return scores

    # -- status --

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            log.warning("fhe: %s", text)
            self.problems.append(text)

    def _report(self) -> None:
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            return
        summary = self.history.summary() if self.history is not None else {"miners": {}}
        ctx.report(REPORT_SECTION, {
            "role": "validator", "done": self.done, "epochs": self.settings.epochs,
            "epochs_done": list(self.epochs_done),
            "model": self.config.model,
            "server_sha256": getattr(getattr(self, "manifest", None), "server_sha256", None),
            "key_id": self.client.key_id() if self.client is not None else None,
            "offers": {m: o.server_sha256 for m, o in self.offers.items()},
            "miners": summary["miners"],
            "outcomes": self.outcomes[-MAX_OUTCOMES_REPORTED:],
            "scores_heard": list(self.scores_heard.values()),
            "weights": self.weights_set[-1]["weights"] if self.weights_set else {},
            "timings": dict(self.timings), "problems": list(self.problems),
        })


def set_weights_on_subnet(settings: NodeSettings, weights: dict[str, float]) -> None:
    """Set the epoch's weights on the subnet through the bittensor SDK (blocking).

    Weights are by hotkey here and by uid on chain: the metagraph maps them, and miners
    no longer registered are left out. The SDK conforms the weights to the subnet's
    hyperparameters and picks commit-reveal when the subnet uses it. Not exercised by
    the tests: it needs a running subtensor and a registered, staked validator hotkey.
    """
    import bittensor

    metagraph = bittensor.Subtensor(settings.network).subnets.metagraph(settings.netuid)
    uid_of = {neuron.hotkey: neuron.uid for neuron in metagraph.neurons}
    by_uid = {uid_of[miner]: weight for miner, weight in weights.items() if miner in uid_of}
    if not by_uid or not any(by_uid.values()):
        return
    wallet = bittensor.Wallet(settings.wallet_name, settings.hotkey, str(settings.wallet_path))
    bittensor.set_weights(settings.netuid, by_uid, wallet=wallet, network=settings.network)


def _tag_stack_here() -> None:
    """Concrete keeps its tag stack in a thread-local that only the importing thread
    initializes (concrete/fhe/extensions/tag.py), so the clear reference run fails on any
    other thread until the stack exists there."""
    tag = importlib.import_module("concrete.fhe.extensions.tag")  # the module; the package exports a function
    if not hasattr(tag.tag_context, "stack"):
        tag.tag_context.stack = []


def compare_in_worker(client: Any, result: bytes, image: Any) -> Any:
    """client.compare on a worker thread."""
    _tag_stack_here()
    return client.compare(result, image)


def judge_chain_in_worker(client: Any, chunks: tuple[bytes, ...], image: Any) -> tuple[Any, Any]:
    """(chunk 1's Comparison, the first straying later chunk's ChainFault or None), on a
    worker thread. Stops decrypting at the first fault; MalformedResult names the chunk."""
    from fhe.bundle import MalformedResult
    from protocol.brainlock import equal_fraction, judge_chain

    _tag_stack_here()
    comparison = client.compare(chunks[0], image)
    if len(chunks) == 1:
        return comparison, None
    expected = client.chained_reference_integers(image, len(chunks))
    for iteration in range(2, len(chunks) + 1):
        try:
            got = client.decrypt_integers(chunks[iteration - 1])
        except MalformedResult as exc:
            raise MalformedResult(f"iteration {iteration} of {len(chunks)}: {exc}") from exc
        fault = judge_chain([equal_fraction(got.tolist(), expected[iteration - 1].tolist())], first=iteration)
        if fault is not None:
            return comparison, fault
    return comparison, None


CONFIDENT_SEED_TRIES = 64


def confident_seed_in_worker(client: Any, model: str, tries: int = CONFIDENT_SEED_TRIES) -> int:
    """A fresh random input seed whose clear reference has a top-2 margin of at least
    MIN_CHALLENGE_MARGIN (about a third of digits inputs do; a few clear forward passes),
    so an honest FHE result agrees with it. After `tries` draws, the last seed anyway."""
    from fhe.bundle import MIN_CHALLENGE_MARGIN, reference_margin
    from fhe.inputs import draw_challenge_input

    _tag_stack_here()
    seed = secrets.randbits(63)
    for _ in range(max(1, tries)):
        if reference_margin(client.reference(draw_challenge_input(model, seed).image)) >= MIN_CHALLENGE_MARGIN:
            return seed
        seed = secrets.randbits(63)
    log.warning("no challenge input with a reference margin >= %.2f in %d draws; sending a plain one",
                MIN_CHALLENGE_MARGIN, tries)
    return seed


# --- sealmesh testnet ----------------------------------------------------------------------


def prepare_testnet(plan, nodes, root: Path) -> None:
    """Compile the model once into ROOT/fhe (every node's own copy would cost each a compile
    on 2 cores) and write fhe.json for validators and miners. The validators still load
    their client side from their own manifest check and make their own keys."""
    if not plan.epochs or not plan.miners:
        for node in nodes:  # no epochs: miners need not compile a circuit nobody asks for
            if node.role is Role.MINER:
                write_fhe_config(node.data_dir, FheConfig(serve=False))
        return
    config = FheConfig(bundle_dir=str(root / "fhe" / "bundle-digits-cnn"))
    ensure_bundle(config.model, Path(config.bundle_dir))
    from fhe.key_layout import ensure_layout_file

    ensure_layout_file(Path(config.bundle_dir))  # once here, not in every miner at start (finding 3)
    for node in nodes:
        if node.role in (Role.VALIDATOR, Role.MINER):
            write_fhe_config(node.data_dir, config)


def summarize(plan, statuses: dict[str, dict | None]) -> dict[str, Any]:
    """report.json "fhe": per miner, over every validator's outcomes: challenges, ok, wrong,
    timeout, error, median ok latency and the score of the merged window; problems when a
    miner was never challenged, an honest one failed, or a faulty one scored no lower."""
    if not plan.epochs or not plan.miners:
        return {"miners": {}, "problems": []}
    names = {s["hotkey"]: n for n, s in statuses.items() if s and "hotkey" in s}
    sections = {n: (s or {}).get("sections", {}).get(REPORT_SECTION) for n, s in statuses.items()}
    validators = {n: d for n, d in sections.items() if d and d.get("role") == "validator"}
    miner_names = sorted(n for n, d in sections.items() if d and d.get("role") == "miner")
    behaviour = {n: (sections[n] or {}).get("behaviour", "honest") for n in miner_names}
    problems: list[str] = []
    if not validators:
        return {"miners": {}, "problems": ["fhe: no validator reported an fhe section"]}
    outcomes: dict[str, list[dict[str, Any]]] = {n: [] for n in miner_names}
    for vname, doc in sorted(validators.items()):
        if not doc.get("done"):
            problems.append(f"fhe: {vname} did not finish its {doc.get('epochs')} epochs")
        problems.extend(f"fhe: {vname}: {p}" for p in doc.get("problems", []))
        for o in doc.get("outcomes", []):
            outcomes.setdefault(names.get(o["miner"], o["miner"][:8]), []).append(o)
    miners: dict[str, Any] = {}
    for name, entries in sorted(outcomes.items()):
        entries.sort(key=lambda o: o["issued_at"])
        window = [WindowEntry(Outcome(o["outcome"]), o["latency_s"] if o["outcome"] == "ok" else None)
                  for o in entries]
        score = score_window(name, window)
        counts = {o.value: sum(1 for e in window if e.outcome is o) for o in Outcome}
        miners[name] = {"behaviour": behaviour.get(name, "honest"), "challenges": len(window), **counts,
                        "median_latency_s": score.median_latency_s, "score": score.score,
                        "errors": sorted({o["error_reason"] for o in entries if o["error_reason"]})}
        if not window:
            problems.append(f"fhe: {name} was never challenged")
    honest = {n: m for n, m in miners.items() if m["behaviour"] == "honest" and m["challenges"]}
    for name, m in honest.items():
        if m["ok"] == 0:
            problems.append(f"fhe: honest {name} had no ok challenge ({m['errors']})")
    floor = min((m["score"] for m in honest.values()), default=None)
    for name, m in miners.items():
        if m["behaviour"] != "honest" and m["challenges"] and floor is not None and not m["score"] < floor:
            problems.append(f"fhe: {m['behaviour']} {name} scored {m['score']:.4g}, not below honest {floor:.4g}")
    first = validators[sorted(validators)[0]]  # every validator hands settlement the same merged scores
    weights = {names.get(m, m[:8]): round(w, 6) for m, w in first.get("weights", {}).items()}
    return {"model": first.get("model"), "epochs": plan.epochs, "weights": weights,
            "challenges": sum(m["challenges"] for m in miners.values()), "miners": miners,
            "problems": problems}


def make_service(settings: NodeSettings) -> ChallengerService | None:
    if settings.role is not Role.VALIDATOR or settings.epochs <= 0:
        return None
    return ChallengerService(settings)


__all__ = ["BRAINLOCK_ENDPOINTS_FILE", "REPORT_SECTION", "ChallengerService", "load_brainlock_endpoints", "make_service",
           "prepare_testnet", "set_weights_on_subnet", "summarize"]
