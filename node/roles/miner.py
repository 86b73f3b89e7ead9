"""A miner: FHE inference on inputs it cannot read, for the validators that challenge it.

Serves one compiled circuit (server.zip pinned by its sha256) on FHE_PROTOCOL
(protocol/challenge_messages.py) and, when fhe.json names an http_port, on
Brainlock-shaped HTTP endpoints (MinerHttp below). It announces what it serves
with a ModelOffer on the FHE channel.

Two guards answer every request, cheapest first: protocol.challenge.MinerKeyring (who
owns which key id, the per-epoch quota, the iteration bound) and fhe.engine.FheEngine
(key size and format, ciphertext size and format, ownership again, the concurrency limit
and the per-challenge timeout). A refusal is a signed Refused with the guard's reason
label; nothing else on the miner changes. FHE runs in the engine's worker threads, so
the trio loop (gossip, other streams) never waits on a circuit.

behaviour (sealmesh testnet --fault, never on a real node): "garbage" answers random
bytes of a result's size without computing; "slow" sleeps slow_delay_s first;
"stale_chain" (the Brainlock /compute only) computes two chained iterations and sends
its first output again for every later one, the cheat of a miner that stops chaining.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from typing import Any

import trio

from node.fhe_service import (BEHAVIOURS, REPORT_SECTION, FheConfig, FheSettingsError, ensure_bundle,
                              load_fhe_config, now_ms, result_bytes_estimate)
from node.mesh import request_started_ms
from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings
from protocol.challenge import MinerKeyring
from protocol.challenge_messages import (FHE_PROTOCOL, MAX_ENVELOPE_BYTES, MAX_REQUEST_BYTES, AddKey, BadFrame,
                                         ChallengeRequest, ChallengeResponse, KeyAdded, ModelOffer, Refused,
                                         StreamMessage, open_frame, seal_frame)
from protocol.challenge_messages import MAX_RESULT_BYTES
from protocol.epistula import Envelope
from protocol.inbound import admit_stream_envelope
from protocol.errors import RemoteProtocolError
from protocol.membership import Role
from protocol.messages import Channel

log = logging.getLogger("sealmesh.miner")


class Refusal(Exception):
    """A request this miner will not serve: becomes a signed Refused."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason, self.hint = reason, hint


class MinerService(RoleService):
    name = "miner"
    channels = frozenset({Channel.FHE})

    def __init__(self, settings: NodeSettings, config: FheConfig | None = None) -> None:
        if settings.behaviour not in BEHAVIOURS:
            raise FheSettingsError(f"behaviour {settings.behaviour!r} is not a miner behaviour {BEHAVIOURS}")
        self.settings = settings
        self.config = config or load_fhe_config(settings.data_dir)
        if self.config.serve:
            # Import Concrete now, before the node joins the mesh: importing it later, even in
            # a worker thread, holds the GIL for seconds and starves the node's gossip.
            import fhe.engine  # noqa: F401
            from concrete.ml.deployment import FHEModelServer  # noqa: F401
        self.behaviour = settings.behaviour
        self.keyring = MinerKeyring(self.config.max_challenges_per_epoch, window_s=self.config.quota_window_s)
        self.engine: Any = None  # fhe.engine.FheEngine once loaded
        self.manifest: Any = None
        self.ctx: RoleContext | None = None
        self.ready = trio.Event()
        self.pending = 0
        self.served = Counter()  # request type -> answered ok
        self.refused = Counter()  # reason -> count
        self.compute_s: list[float] = []
        self.garbage_bytes = 0
        self.brainlock_port = 0  # the Brainlock HTTP server's bound port once it listens; 0: none
        self.last_offer: ModelOffer | None = None  # the ModelOffer last published (shown on /status)

    # -- the seam --

    def stream_handlers(self):
        return {FHE_PROTOCOL: (self.handle_stream, MAX_REQUEST_BYTES)}

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ctx = ctx
        self._report()
        task_status.started()
        if not self.config.serve:
            return
        await self._load()
        async with trio.open_nursery() as nursery:
            if self.config.http_port is not None:
                await nursery.start(MinerHttp(self, self.settings.api_host, self.config.http_port).serve)
            if self.config.brainlock_port is not None:
                from node.roles.brainlock_http import BrainlockHttp

                # the port it bound (brainlock_port 0: any free one) goes into our ModelOffer
                self.brainlock_port = await nursery.start(
                    BrainlockHttp(self, self.settings.api_host, self.config.brainlock_port).serve)
            nursery.start_soon(self._offer_loop)

    async def _load(self) -> None:
        from fhe.bundle import SERVER_ZIP
        from fhe.engine import FheEngine

        bundle = self.config.bundle_path(self.settings.data_dir)
        self.manifest = await trio.to_thread.run_sync(ensure_bundle, self.config.model, bundle)
        self.engine = await trio.to_thread.run_sync(lambda: FheEngine(
            bundle, self.manifest.server_sha256, key_cache_bytes=self.config.key_cache_bytes,
            max_concurrency=self.config.max_concurrency, timeout_s=self.config.response_timeout_s,
            max_iterations=self.keyring.max_iterations, max_keys_per_owner=self.config.max_keys_per_validator,
            owner_key_bytes=self.config.validator_key_bytes,
            max_chained_iterations=self.config.brainlock_max_iterations))
        # The engine's per-validator quotas decide which keys go; the keyring follows it
        # (forget_evicted_keys) and must never evict on its own, across validators.
        smallest_key = max(1, self.engine.evaluation_key_bytes - 4096)
        self.keyring.max_keys = max(self.keyring.max_keys, self.engine.key_cache_bytes // smallest_key + 1)
        self.garbage_bytes = result_bytes_estimate(bundle / SERVER_ZIP)
        if self.garbage_bytes > MAX_RESULT_BYTES and self.config.brainlock_port is None:
            # e.g. the 32x32 synthetic CNV (50 MB a result): served over Brainlock HTTP only (docs/fhe.md)
            log.warning("%s's results (about %d bytes) are over the libp2p result cap (%d): no libp2p challenge "
                        "can succeed; set brainlock_port in fhe.json to serve it over HTTP", self.manifest.model,
                        self.garbage_bytes, MAX_RESULT_BYTES)
        self.ready.set()
        log.info("phase=miner-ready model=%s server_sha256=%s behaviour=%s", self.manifest.model,
                 self.manifest.server_sha256[:16], self.behaviour)
        self._report()

    def offer(self) -> ModelOffer:
        assert self.ctx is not None and self.manifest is not None
        return ModelOffer(self.manifest.model, self.manifest.server_sha256, self.ctx.mesh.peer_id, FHE_PROTOCOL,
                          self.keyring.max_iterations, now_ms(), brainlock_port=self.brainlock_port)

    async def _offer_loop(self) -> None:
        assert self.ctx is not None
        while True:
            first = self.last_offer is None
            self.last_offer = self.offer()
            await self.ctx.publish(self.last_offer)
            if first:
                self._report()
            quiet = sum(self.served.values()) > 0  # a validator found us: late joiners only
            await trio.sleep(self.config.offer_interval_s * (10 if quiet else 1))

    # -- requests --

    async def handle_stream(self, peer_id: str, raw: bytes) -> bytes:
        return await self.handle_frame(raw, arrived_ms=request_started_ms())

    async def admit_envelope(self, envelope: bytes, arrived_ms: int) -> int:
        """The payload length a request's envelope signs for, judged before its payload is
        read (MinerHttp; the libp2p stream does the same in node/mesh.py)."""
        if self.ctx is None:
            raise RemoteProtocolError("the miner has not started", reason="not_ready")
        return admit_stream_envelope(envelope, verifier=self.ctx.verifier, now_ms=arrived_ms,
                                     expect=(AddKey, ChallengeRequest))

    def refuse_unverifiable(self, reason: str, hint: str) -> None:
        """Count and log a request refused before anyone could be answered."""
        self._refuse_count(reason)
        if self.ctx is not None:
            self.ctx.metrics.reject("fhe", reason)
        log.warning("refused fhe request reason=%s: %s", reason, hint)

    async def handle_frame(self, raw: bytes, *, arrived_ms: int | None = None) -> bytes:
        """One request frame in, one signed answer frame out (empty when the request is
        not even verifiable: there is nobody to sign an answer for).

        `arrived_ms`: when the frame began to arrive. The signature must have been fresh
        then; the upload's own duration (evaluation keys are ~40 MB) does not age it.
        """
        ctx = self.ctx
        if ctx is None:
            return b""
        checked_at = now_ms() if arrived_ms is None else min(arrived_ms, now_ms())
        try:
            verified, payload = open_frame(raw, verifier=ctx.verifier, now_ms=checked_at,
                                           expect=(AddKey, ChallengeRequest))
        except RemoteProtocolError as exc:
            self.refuse_unverifiable(exc.reason, exc.hint)
            return b""
        requester, request = verified.member.hotkey, verified.message
        try:
            if Role.VALIDATOR not in verified.member.roles:
                raise Refusal("not_a_validator", "only validators challenge miners")
            if not self.ready.is_set():
                raise Refusal("not_ready", "the miner is still loading its circuit; retry shortly")
            if isinstance(request, AddKey):
                answer, out = await self._add_key(requester, request, payload), b""
            else:
                answer, out = await self._challenge(requester, request, payload)
        except Refusal as exc:
            answer, out = self._refusal(request, exc.reason, exc.hint), b""
        except RemoteProtocolError as exc:  # the keyring's and the engine's typed refusals
            answer, out = self._refusal(request, exc.reason, exc.hint), b""
        except Exception as exc:  # an engine failure (timeout, a Concrete error) is not the peer's
            reason = getattr(exc, "reason", "miner_error")
            log.warning("challenge failed on our side reason=%s: %s", reason, exc)
            answer, out = self._refusal(request, reason, str(exc)), b""
        else:
            self.served[request.TYPE] += 1
        self._report()
        return seal_frame(ctx.hotkey, answer, out, now_ms=now_ms(), signed_for=requester)

    async def _add_key(self, owner: str, request: AddKey, key_bytes: bytes) -> KeyAdded:
        if request.model != self.manifest.model:
            raise Refusal("unknown_model", f"this miner serves {self.manifest.model}, not {request.model}")
        bound = self.keyring.bindings.get(request.key_id)
        if bound is not None and bound.owner != owner:
            raise Refusal("key_id_taken", f"key {request.key_id[:16]} belongs to another validator")
        key_id = await self.engine.add_key_async(owner, key_bytes)  # checks size and format first
        self.forget_evicted_keys()  # the upload may have dropped the owner's own older keys
        if key_id != request.key_id:  # open_frame checked the sha256; the engine names keys the same way
            raise Refusal("payload_mismatch", "key id is not the sha256 of the keys")
        self.keyring.add_key(owner, key_id, model=request.model)
        log.info("stored evaluation keys %s (%d bytes) of %s", key_id[:16], len(key_bytes), owner)
        return KeyAdded(key_id)

    async def _challenge(self, requester: str, request: ChallengeRequest,
                         ciphertext: bytes) -> tuple[ChallengeResponse, bytes]:
        if request.model != self.manifest.model:
            raise Refusal("unknown_model", f"this miner serves {self.manifest.model}, not {request.model}")
        if self.pending >= self.config.max_pending:
            raise Refusal("busy", f"{self.pending} challenges queued or running; retry later")
        self.forget_evicted_keys()
        # The miner's clock, never request.epoch: that is the requester's to choose (issue 13).
        self.keyring.evaluate(requester, request.key_id, model=request.model, now=time.time(),
                              iterations=request.iterations)
        self.pending += 1
        started = time.monotonic()
        try:
            if self.behaviour == "slow":
                await trio.sleep(self.config.slow_delay_s)
            if self.behaviour == "garbage":
                result = os.urandom(self.garbage_bytes)
            else:
                result = await self.engine.run_async(requester, request.key_id, ciphertext, request.iterations)
        finally:
            self.pending -= 1
        elapsed = time.monotonic() - started
        self.compute_s.append(round(elapsed, 3))
        log.info("challenge %s for %s: %d iterations in %.2f s", request.challenge_id[:12], requester,
                 request.iterations, elapsed)
        return ChallengeResponse.for_result(request.challenge_id, result, int(elapsed * 1000)), result

    def forget_evicted_keys(self) -> None:
        """Keys the engine no longer holds leave the keyring too, so their owner hears
        unknown_key and uploads again. The engine's per-validator quotas choose them."""
        held = set(self.engine.key_ids())
        for key_id in [k for k in self.keyring.bindings if k not in held]:
            del self.keyring.bindings[key_id]
            self.keyring.used_by.pop(key_id, None)

    def _refusal(self, request: StreamMessage, reason: str, hint: str) -> Refused:
        self._refuse_count(reason)
        ref = request.key_id if isinstance(request, AddKey) else request.challenge_id  # type: ignore[attr-defined]
        reason = reason if reason.replace("_", "a").isalnum() and reason.islower() else "miner_error"
        return Refused(request.TYPE, ref, reason[:48], hint.encode()[:256].decode(errors="ignore"))

    def _refuse_count(self, reason: str) -> None:
        self.refused[reason] += 1
        if self.ctx is not None:
            self._report()

    def _report(self) -> None:
        if self.ctx is None:
            return
        self.ctx.report(REPORT_SECTION, {
            "role": "miner", "done": True, "ready": self.ready.is_set(), "behaviour": self.behaviour,
            "model": self.manifest.model if self.manifest else self.config.model,
            "server_sha256": self.manifest.server_sha256 if self.manifest else None,
            "served": dict(self.served), "refused": dict(self.refused),
            "keys": len(self.engine.key_ids()) if self.engine else 0,
            "key_cache_bytes": self.engine.cache_bytes if self.engine else 0,
            "compute_s": self.compute_s[-20:],
            "offered_brainlock_port": self.last_offer.brainlock_port if self.last_offer else None,
        })


class MinerHttp:
    """Brainlock-shaped HTTP endpoints for validators that speak HTTP instead of libp2p.

    POST /add_key and POST /compute take the same signed frame as FHE_PROTOCOL (Epistula
    envelope, then evaluation keys or ciphertext). /add_key answers with the signed answer
    frame; /compute streams 4-byte little-endian length-prefixed frames, as Brainlock's
    does: the signed answer frame (ChallengeResponse + result, or Refused). An unverifiable
    request gets 401. aiohttp runs on its own thread (see node/api.py for why); each
    request crosses to the trio loop, where handle_frame runs as for a stream.
    """

    def __init__(self, miner: MinerService, host: str, port: int) -> None:
        self.miner, self.host, self.port = miner, host, port
        self.uploading: Counter[str] = Counter()  # signer -> bodies being read; on the aiohttp thread

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import asyncio

        from aiohttp import web

        from node.http_thread import serve_app_in_thread, trio_caller

        on_trio = trio_caller(trio.lowlevel.current_trio_token())

        async def answer(request: web.Request) -> bytes:
            """The frame read envelope first (issue 11 finding 9): a stranger, a member that
            may not send it, a stale or replayed envelope, or a payload over the type's
            limit is refused having sent its envelope only, never its 40 MB body."""
            arrived = now_ms()  # headers are in; the body may take a while
            signer = None
            try:
                prefix = await request.content.readexactly(4)
                length = int.from_bytes(prefix, "big")
                if length > MAX_ENVELOPE_BYTES:
                    raise BadFrame(f"envelope length {length} is over {MAX_ENVELOPE_BYTES}")
                envelope = await request.content.readexactly(length)
                declared = await on_trio(self.miner.admit_envelope, envelope, arrived)
                signer = Envelope.from_gossip_bytes(envelope).signed_by  # admitted: well-formed
                if self.uploading[signer] >= self.miner.config.uploads_per_signer:
                    signer = None
                    raise RemoteProtocolError("an upload of this signer is in flight; send one at a time",
                                              reason="busy_signer")
                self.uploading[signer] += 1
                payload = await request.content.readexactly(declared)
                if await request.content.read(1):
                    raise BadFrame(f"the body runs past the {declared} payload bytes its envelope signs for")
            except asyncio.IncompleteReadError as exc:
                self.miner.refuse_unverifiable("bad_frame", f"the body ended after {len(exc.partial)} bytes")
                return b""
            except ConnectionError as exc:  # the peer hung up mid-body
                self.miner.refuse_unverifiable("bad_frame", f"the connection broke off: {exc}")
                return b""
            except RemoteProtocolError as exc:
                self.miner.refuse_unverifiable(exc.reason, exc.hint)
                return b""
            finally:
                if signer is not None:
                    self.uploading[signer] -= 1
                    if not self.uploading[signer]:
                        del self.uploading[signer]
            return await on_trio(functools.partial(self.miner.handle_frame, prefix + envelope + payload,
                                                   arrived_ms=arrived))

        async def add_key(request: web.Request) -> web.Response:
            frame = await answer(request)
            if not frame:
                return web.json_response({"error": "request not verifiable", "reason": "unauthorized"}, status=401)
            return web.Response(body=frame, content_type="application/octet-stream")

        async def compute(request: web.Request) -> web.StreamResponse:
            frame = await answer(request)
            if not frame:
                return web.json_response({"error": "request not verifiable", "reason": "unauthorized"}, status=401)
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            await response.write(len(frame).to_bytes(4, "little") + frame)
            await response.write_eof()
            return response

        def make_app() -> web.Application:
            # bodies are streamed, never request.read(): client_max_size does not apply, keep it small
            app = web.Application(client_max_size=1 << 20)
            app.router.add_post("/add_key", add_key)
            app.router.add_post("/compute", compute)
            return app

        def bound(port: int) -> None:
            self.port = port
            log.info("miner http on http://%s:%d (/add_key, /compute)", self.host, port)

        await serve_app_in_thread(make_app, self.host, self.port, name="sealmesh-miner-http", on_bound=bound,
                                  task_status=task_status)


def make_service(settings: NodeSettings) -> MinerService | None:
    return MinerService(settings) if settings.role is Role.MINER else None


__all__ = ["MinerHttp", "MinerService", "Refusal", "make_service"]
