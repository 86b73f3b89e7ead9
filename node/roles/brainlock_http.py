"""The Brainlock subnet's own HTTP protocol on a sealmesh miner (issue 13).

A Brainlock validator, as the subnet ships it, does per query:
    GET  /get_client                     -> client.zip (bytes)
    POST /add_key   multipart: key       -> JSON {"uid": ...}
    POST /compute   multipart: model_input, uid, iterations
                                         -> a stream: per iteration u32 little-endian length
                                            + a bare serialized Concrete ciphertext (that
                                            iteration's output, fed back as the next one's
                                            input), then a 0 length
each request Epistula-signed in HTTP headers (Epistula-Version, -Timestamp, -Uuid,
-Signed-By, -Signed-For, -Request-Signature) over "{sha256(body)}.{uuid}.{timestamp}.
{signed_for}" (protocol/epistula.py implements that exact string).

Order of the checks, cheapest first, every one before the body is read except the last:
    headers well-formed -> Content-Type and Content-Length within the route's limit ->
    signer in the registry with the validator role and stake -> signed for this miner ->
    fresh (judged at the time the headers arrived) -> uuid not seen -> a free upload slot
    for the signer -> [body streamed: to disk for keys, hashed on the way] -> signature
    over the body (the body hash is in the signed string, so the signature cannot be
    checked before the body is in: the route's size limit is what bounds that cost) ->
    the uuid is spent -> the form's fields.
A refusal is JSON {"error": hint, "reason": label} with an HTTP status, counted in
/metrics as sealmesh_rejected{source="brainlock", reason=...}; nothing else changes.

aiohttp runs on its own thread (node/api.py says why); every decision that touches the
miner's state (verifier, keyring, engine) crosses to the trio loop with trio.from_thread.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
import threading
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from crypto.identity import verify_signature
from node.fhe_service import now_ms
from protocol.challenge_messages import VALIDATORS_ONLY
from protocol.epistula import (BadSignature, Envelope, FutureTimestamp, Replay, SignerNotAllowed, StaleTimestamp,
                               UnknownSigner, WrongRecipient)
from protocol.errors import RemoteProtocolError
from protocol.membership import Member, SenderPolicy

log = logging.getLogger("sealmesh.brainlock")

METRICS_SOURCE = "brainlock"
CHUNK_BYTES = 1 << 16
FORM_OVERHEAD_BYTES = 16 * 1024  # boundaries and part headers around the fields
MAX_FORM_PARTS = 8
MAX_PART_HEADER_BYTES = 4096
MAX_UPLOADS_AT_ONCE = 8  # bodies in flight across every signer (disk and memory bound)

# reason -> HTTP status. Everything else a peer causes is 400.
STATUS = {
    "malformed_envelope": 401, "unknown_signer": 401, "bad_signature": 401, "stale_timestamp": 401,
    "future_timestamp": 401, "replay": 401, "replay_quota": 429, "signer_not_allowed": 403,
    "wrong_recipient": 403, "length_required": 411, "body_too_large": 413, "wrong_content_type": 415,
    "busy_signer": 429, "busy": 503, "not_ready": 503, "unknown_uid": 404, "foreign_uid": 403,
    "too_many_challenges": 429, "key_cache_full": 503, "timeout": 504, "miner_error": 500,
}


class BrainlockRefusal(RemoteProtocolError):
    """A request this route will not serve, with its label."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(hint, reason=reason)


def status_of(reason: str) -> int:
    return STATUS.get(reason, 400)


# --- Epistula over HTTP: the checks that need no body -----------------------------------


def check_headers(verifier: Any, envelope: Envelope, *, now_ms: int, policy: SenderPolicy) -> Member:
    """Every Epistula check that needs no body, in the order EnvelopeVerifier.preflight
    runs them: known signer, allowed (role and stake), signed for this node (an empty
    signed-for is refused: the subnet's own verifier accepts it), fresh, not a replay.
    Raises an EpistulaError. The signature is check_body_signature's, once the body is in."""
    member = verifier.directory.member(envelope.signed_by)
    if member is None:
        raise UnknownSigner(f"{envelope.signed_by} is not a member of this mesh")
    if not policy.allows(member):
        raise SignerNotAllowed(f"{envelope.signed_by} (roles {sorted(r.value for r in member.roles)}, stake "
                               f"{member.stake}) may not call this route: validators with stake >= "
                               f"{policy.min_stake} only")
    if envelope.signed_for != verifier.own_hotkey:
        raise WrongRecipient(f"signed for {envelope.signed_for or 'nobody'}, not this miner "
                             f"({verifier.own_hotkey})")
    age = now_ms - envelope.timestamp_ms
    if age > verifier.window_ms:
        raise StaleTimestamp(f"signed {age} ms before the request arrived; the window is {verifier.window_ms} ms")
    if -age > verifier.window_ms:
        raise FutureTimestamp(f"signed {-age} ms in the future; the window is {verifier.window_ms} ms")
    if verifier.replays.seen(envelope.signed_by, envelope.uuid, envelope.timestamp_ms):
        raise Replay(f"uuid {envelope.uuid} was already used by {envelope.signed_by}")
    return member


def signed_string(body_sha256: str, envelope: Envelope) -> bytes:
    """protocol.epistula.signing_payload's string, from a body hashed while it streamed
    (tests/test_brainlock_http.py holds the two equal)."""
    return f"{body_sha256}.{envelope.uuid}.{envelope.timestamp_ms}.{envelope.signed_for}".encode()


def check_body_signature(verifier: Any, envelope: Envelope, body_sha256: str, *, now_ms: int,
                         policy: SenderPolicy) -> Member:
    """The headers again (another request may have spent the uuid meanwhile), then the
    signature over the body; spends the uuid. Raises an EpistulaError."""
    member = check_headers(verifier, envelope, now_ms=now_ms, policy=policy)
    if not verify_signature(envelope.signed_by, signed_string(body_sha256, envelope),
                            bytes.fromhex(envelope.signature[2:])):
        raise BadSignature(f"signature does not verify for {envelope.signed_by} over this body")
    verifier.spend(envelope, now_ms=now_ms)
    return member


# --- multipart/form-data, judged only once the signature holds --------------------------


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    start: int  # the field's bytes are buffer[start:end]
    end: int


def form_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; BrainlockRefusal otherwise."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise BrainlockRefusal("wrong_content_type", f"expected multipart/form-data, got {kind.strip()!r}")
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            value = value.strip('"')
            if 1 <= len(value) <= 70 and value.isascii():
                return value.encode()
    raise BrainlockRefusal("wrong_content_type", "multipart/form-data without a valid boundary")


def _disposition(headers: bytes) -> tuple[str, str | None]:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        fields: dict[str, str] = {}
        kind, *params = value.decode("utf-8", errors="replace").split(";")
        if kind.strip().lower() != "form-data":
            break
        for param in params:
            k, _, v = param.strip().partition("=")
            fields[k.lower()] = v.strip().strip('"')
        if "name" in fields:
            return fields["name"], fields.get("filename")
    raise BrainlockRefusal("bad_form", "a form part without Content-Disposition: form-data; name=...")


def parse_form(buffer: Any, boundary: bytes) -> dict[str, FormPart]:
    """The parts of a multipart/form-data body (bytes or an mmap), by field name, as
    offsets: a 40 MB key field is located, not copied. Strict: the body starts with the
    first delimiter and ends at the closing one; a repeated field is refused."""
    delimiter = b"--" + boundary
    if buffer[:len(delimiter)] != delimiter:
        raise BrainlockRefusal("bad_form", "the body does not start with the form's boundary")
    parts: dict[str, FormPart] = {}
    at = len(delimiter)
    while True:
        if buffer[at:at + 2] == b"--":
            return parts
        if buffer[at:at + 2] != b"\r\n":
            raise BrainlockRefusal("bad_form", "a boundary not followed by CRLF or --")
        head_end = buffer.find(b"\r\n\r\n", at + 2, at + 2 + MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise BrainlockRefusal("bad_form", f"part headers missing or over {MAX_PART_HEADER_BYTES} bytes")
        name, filename = _disposition(bytes(buffer[at + 2:head_end]))
        start = head_end + 4
        end = buffer.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise BrainlockRefusal("bad_form", f"field {name!r} is not closed by the boundary")
        if name in parts:
            raise BrainlockRefusal("bad_form", f"field {name!r} appears twice")
        if len(parts) >= MAX_FORM_PARTS:
            raise BrainlockRefusal("bad_form", f"more than {MAX_FORM_PARTS} form fields")
        parts[name] = FormPart(name, filename, start, end)
        at = end + 2 + len(delimiter)


def require_field(parts: dict[str, FormPart], name: str) -> FormPart:
    part = parts.get(name)
    if part is None:
        raise BrainlockRefusal("missing_field", f"the form has no field {name!r} (fields: {sorted(parts)})")
    return part


def parse_iterations(raw: bytes) -> int:
    """The iterations field as a number; its bound is the keyring's (check_iterations)."""
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii() or len(text) > 6:
        raise BrainlockRefusal("bad_iterations", f"iterations must be a whole number, got {text[:20]!r}")
    return int(text)


# --- chained runs -----------------------------------------------------------------------


class ChainedRun:
    """One /compute: the validator's ciphertext, then each output fed back as the next
    input, kept as a Concrete value in memory between iterations.

    An output is not re-read from its bytes: it is this miner's own value (nothing a peer
    sent), and serialized it is far larger than an input (3.1 MB against 4.9 KB for the
    tiny synthetic CNV: uncompressed LWE), so the engine's input checks would refuse it.
    The engine has no chained run of its own yet, so this drives its parts: its checks
    of the first input, its slots, its circuit. The circuit must be compiled composable
    (its output encoding equal to its input's), or the second run is refused by Concrete.
    """

    def __init__(self, miner: Any, owner: str, key_id: str, ciphertext: bytes) -> None:
        engine = miner.engine
        self.engine = engine
        self.stored = engine._admit(owner, key_id, ciphertext, 1)  # size, capnp framing, ownership
        self.ciphertext: bytes | None = ciphertext
        self.value: Any = None
        self.abandoned = threading.Event()

    def step(self) -> bytes:
        """Worker-thread body of one iteration: the serialized output."""
        from fhe.engine import MalformedCiphertext, Timeout

        engine = self.engine
        if self.value is None:
            self.value = engine._deserialize(self.ciphertext)
            self.ciphertext = None
        if not engine._slots.acquire(timeout=engine.timeout_s):
            raise Timeout(f"no free slot within {engine.timeout_s} s")
        try:
            if self.abandoned.is_set():
                raise Timeout("the request was abandoned")
            try:
                self.value = engine._server.server.run(self.value, evaluation_keys=self.stored.evaluation_keys)
            except RuntimeError as exc:
                raise MalformedCiphertext(f"the value does not fit this circuit: {str(exc)[:160]}") from exc
        finally:
            engine._slots.release()
        return self.value.serialize()


# --- the server -------------------------------------------------------------------------


@dataclass
class Uid:
    owner: str
    key_id: str


class BrainlockHttp:
    """GET /get_client, POST /add_key, POST /compute for Brainlock validators, beside the
    libp2p protocol and MinerHttp; the same keyring, engine and quotas."""

    def __init__(self, miner: Any, host: str, port: int) -> None:
        self.miner, self.host, self.port = miner, host, port
        self.policy = SenderPolicy(VALIDATORS_ONLY.roles, min_stake=miner.config.brainlock_min_stake)
        self.uids: dict[str, Uid] = {}  # uid -> whose keys; on the trio side
        self.uploading: Counter[str] = Counter()  # signer -> bodies in flight; on the aiohttp side
        self.served: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    # -- limits --

    def body_limit(self, route: str) -> int:
        engine = self.miner.engine
        if route == "/add_key":
            return engine.evaluation_key_bytes + 16 * 1024 + FORM_OVERHEAD_BYTES
        return engine.max_ciphertext_bytes + FORM_OVERHEAD_BYTES

    def spool_dir(self) -> Path:
        path = Path(self.miner.settings.data_dir) / "fhe" / "brainlock-uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- on the trio loop --

    def refuse(self, reason: str, hint: str) -> None:
        self.refused[reason] += 1
        self.miner.refused[reason] += 1  # the miner's /status section counts both protocols
        ctx = self.miner.ctx
        if ctx is not None:
            ctx.metrics.reject(METRICS_SOURCE, reason)
        log.warning("refused brainlock request reason=%s: %s", reason, hint)

    async def admit(self, envelope: Envelope, arrived_ms: int) -> str:
        if not self.miner.ready.is_set():
            raise BrainlockRefusal("not_ready", "the miner is still loading its circuit; retry shortly")
        return check_headers(self.miner.ctx.verifier, envelope, now_ms=arrived_ms, policy=self.policy).hotkey

    async def verify_body(self, envelope: Envelope, body_sha256: str, arrived_ms: int) -> str:
        return check_body_signature(self.miner.ctx.verifier, envelope, body_sha256, now_ms=arrived_ms,
                                    policy=self.policy).hotkey

    async def store_key(self, owner: str, key_bytes: bytes) -> str:
        miner = self.miner
        key_id = hashlib.sha256(key_bytes).hexdigest()
        bound = miner.keyring.bindings.get(key_id)
        if bound is not None and bound.owner != owner:
            raise BrainlockRefusal("key_id_taken", f"these keys ({key_id[:16]}) belong to another validator")
        key_id = await miner.engine.add_key_async(owner, key_bytes)  # size, layout, format
        miner.forget_evicted_keys()
        miner.keyring.add_key(owner, key_id, model=miner.manifest.model)
        self._forget_stale_uids()
        for uid, held in self.uids.items():  # the same keys again: the same uid
            if held == Uid(owner, key_id):
                return uid
        uid = str(uuidlib.uuid4())
        self.uids[uid] = Uid(owner, key_id)
        log.info("stored evaluation keys %s (%d bytes) of %s as uid %s", key_id[:16], len(key_bytes), owner, uid)
        return uid

    def _forget_stale_uids(self) -> None:
        """A uid lives as long as the engine holds its owner's keys (its quotas decide)."""
        engine = self.miner.engine
        for uid, held in list(self.uids.items()):
            if held.key_id not in engine.owner_key_ids(held.owner):
                del self.uids[uid]

    async def start_compute(self, owner: str, uid: str, iterations: int) -> str:
        """Every check before the first circuit run; counts the request in the quota."""
        miner = self.miner
        miner.keyring.check_iterations(iterations, miner.config.brainlock_max_iterations)
        miner.forget_evicted_keys()
        self._forget_stale_uids()
        held = self.uids.get(uid)
        if held is None:
            raise BrainlockRefusal("unknown_uid", f"no keys under uid {uid[:40]!r} here: upload them with /add_key")
        if held.owner != owner:
            raise BrainlockRefusal("foreign_uid", f"uid {uid} belongs to another validator")
        if miner.pending >= miner.config.max_pending:
            raise BrainlockRefusal("busy", f"{miner.pending} challenges queued or running; retry later")
        miner.keyring.evaluate(owner, held.key_id, model=miner.manifest.model, now=time.time(),
                               iterations=iterations, max_iterations=miner.config.brainlock_max_iterations)
        return held.key_id

    async def open_chain(self, owner: str, key_id: str, ciphertext: bytes) -> "ChainedRun":
        """The engine's checks of the validator's ciphertext (size, framing, ownership),
        before any circuit runs."""
        return ChainedRun(self.miner, owner, key_id, ciphertext)

    async def run_once(self, chain: "ChainedRun") -> bytes:
        """One circuit run; its output is the next iteration's input."""
        miner = self.miner
        miner.pending += 1
        try:
            if miner.behaviour == "slow":
                await trio.sleep(miner.config.slow_delay_s)
            if miner.behaviour == "garbage":
                return os.urandom(miner.garbage_bytes)
            with trio.move_on_after(miner.engine.timeout_s):
                return await trio.to_thread.run_sync(chain.step, abandon_on_cancel=True)
            chain.abandoned.set()
            from fhe.engine import Timeout

            raise Timeout(f"an iteration passed its {miner.engine.timeout_s} s budget")
        finally:
            miner.pending -= 1

    def done(self, route: str, elapsed_s: float | None = None) -> None:
        self.served[route] += 1
        self.miner.served[f"brainlock_{route}"] += 1
        if elapsed_s is not None:
            self.miner.compute_s.append(round(elapsed_s, 3))

    # -- the aiohttp thread --

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import asyncio

        from aiohttp import web

        token = trio.lowlevel.current_trio_token()
        bound, stop = threading.Event(), {}

        async def on_trio(fn, *args):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: trio.from_thread.run(fn, *args, trio_token=token))

        async def refusal(reason: str, hint: str) -> web.Response:
            await on_trio(_sync(self.refuse, reason, hint))
            return web.json_response({"error": hint, "reason": reason}, status=status_of(reason))

        async def headers_then_body(request: web.Request, route: str, spool: bool):
            """(signer, body or spool file path) once everything up to the signature
            passed; raises RemoteProtocolError. Nothing of the body is read before the
            headers, the length and the signer passed."""
            arrived = now_ms()
            if self.miner.engine is None:  # the limits come from the loaded circuit
                raise BrainlockRefusal("not_ready", "the miner is still loading its circuit; retry shortly")
            envelope = Envelope.from_headers(request.headers, b"")  # MalformedEnvelope
            if route != "/get_client":
                form_boundary(request.headers.get("Content-Type", ""))
            declared = request.content_length
            limit = self.body_limit(route) if route != "/get_client" else 0
            if declared is None and route != "/get_client":
                raise BrainlockRefusal("length_required", "send a Content-Length (chunked bodies are refused)")
            if (declared or 0) > limit:
                raise BrainlockRefusal("body_too_large", f"{route} takes at most {limit} bytes, "
                                                         f"Content-Length says {declared}")
            signer = await on_trio(self.admit, envelope, arrived)
            if route == "/get_client":
                await on_trio(self.verify_body, envelope, hashlib.sha256(b"").hexdigest(), arrived)
                return signer, b""
            if self.uploading[signer] >= self.miner.config.uploads_per_signer:
                raise BrainlockRefusal("busy_signer", f"{self.uploading[signer]} uploads of yours are in "
                                                      "flight; send one at a time")
            if sum(self.uploading.values()) >= MAX_UPLOADS_AT_ONCE:
                raise BrainlockRefusal("busy", f"{MAX_UPLOADS_AT_ONCE} uploads in flight; retry shortly")
            self.uploading[signer] += 1
            try:
                digest, got = hashlib.sha256(), 0
                sink = tempfile.NamedTemporaryFile(dir=self.spool_dir(), prefix="key-", delete=False) \
                    if spool else None
                chunks: list[bytes] = []
                try:
                    async for chunk in _chunks(request.content):
                        got += len(chunk)
                        if got > limit:
                            raise BrainlockRefusal("body_too_large", f"{route} body passed {limit} bytes")
                        digest.update(chunk)
                        if sink is not None:
                            sink.write(chunk)
                        else:
                            chunks.append(chunk)
                    if got != declared:
                        raise BrainlockRefusal("short_body", f"the body ended after {got} of {declared} bytes")
                    if sink is not None:
                        sink.close()
                    signer = await on_trio(self.verify_body, envelope, digest.hexdigest(), arrived)
                except BaseException:
                    if sink is not None:
                        sink.close()
                        os.unlink(sink.name)
                    raise
                return signer, Path(sink.name) if sink is not None else b"".join(chunks)
            finally:
                self.uploading[signer] -= 1
                if not self.uploading[signer]:
                    del self.uploading[signer]

        async def get_client(request: web.Request) -> web.StreamResponse:
            try:
                await headers_then_body(request, "/get_client", spool=False)
            except RemoteProtocolError as exc:
                return await refusal(exc.reason, exc.hint)
            from fhe.bundle import CLIENT_ZIP

            data = (self.miner.config.bundle_path(self.miner.settings.data_dir) / CLIENT_ZIP).read_bytes()
            await on_trio(_sync(self.done, "get_client"))
            return web.Response(body=data, content_type="application/zip")

        async def add_key(request: web.Request) -> web.StreamResponse:
            try:
                signer, path = await headers_then_body(request, "/add_key", spool=True)
            except RemoteProtocolError as exc:
                return await refusal(exc.reason, exc.hint)
            try:
                if path.stat().st_size == 0:
                    raise BrainlockRefusal("bad_form", "an empty body")
                with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as body:
                    boundary = form_boundary(request.headers["Content-Type"])
                    part = require_field(parse_form(body, boundary), "key")
                    key_bytes = body[part.start:part.end]
                uid = await on_trio(self.store_key, signer, key_bytes)
            except RemoteProtocolError as exc:
                return await refusal(exc.reason, exc.hint)
            except Exception as exc:  # an engine failure is ours, not the peer's
                log.warning("brainlock add_key failed on our side: %s", exc)
                return await refusal(getattr(exc, "reason", "miner_error"), str(exc)[:200])
            finally:
                os.unlink(path)
            await on_trio(_sync(self.done, "add_key"))
            return web.json_response({"uid": uid})

        async def compute(request: web.Request) -> web.StreamResponse:
            try:
                signer, body = await headers_then_body(request, "/compute", spool=False)
                parts = parse_form(body, form_boundary(request.headers["Content-Type"]))
                model_input = require_field(parts, "model_input")
                uid_part, iterations_part = require_field(parts, "uid"), require_field(parts, "iterations")
                uid = body[uid_part.start:uid_part.end].decode("utf-8", errors="replace").strip()
                iterations = parse_iterations(body[iterations_part.start:iterations_part.end])
                ciphertext = body[model_input.start:model_input.end]
                key_id = await on_trio(self.start_compute, signer, uid, iterations)
                started = time.monotonic()
                chain = await on_trio(self.open_chain, signer, key_id, ciphertext)
                # The first run before the response starts: a garbage ciphertext or a
                # refusal of the engine still gets its status and reason.
                output = await on_trio(self.run_once, chain)
            except RemoteProtocolError as exc:
                return await refusal(exc.reason, exc.hint)
            except Exception as exc:
                log.warning("brainlock compute failed on our side: %s", exc)
                return await refusal(getattr(exc, "reason", "miner_error"), str(exc)[:200])
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            for done_runs in range(1, iterations + 1):
                await response.write(len(output).to_bytes(4, "little") + output)  # flushed as it goes
                if done_runs == iterations:
                    break
                try:
                    output = await on_trio(self.run_once, chain)
                except Exception as exc:  # mid-stream: no terminator, so the validator sees a cut stream
                    reason = getattr(exc, "reason", "miner_error")
                    await on_trio(_sync(self.refuse, reason, f"iteration {done_runs + 1}: {exc}"))
                    return response
            await response.write((0).to_bytes(4, "little"))
            await response.write_eof()
            await on_trio(_sync(self.done, "compute", time.monotonic() - started))
            log.info("brainlock compute for %s: %d chained iterations in %.2f s", signer, iterations,
                     time.monotonic() - started)
            return response

        async def main() -> None:
            # client_max_size is moot (bodies are streamed, never request.read()), small anyway;
            # lingering_time 0: a refused body is not read and discarded for 10 s, the
            # connection closes once the answer is out.
            app = web.Application(client_max_size=1 << 20)
            app.router.add_get("/get_client", get_client)
            app.router.add_post("/add_key", add_key)
            app.router.add_post("/compute", compute)
            runner = web.AppRunner(app, access_log=None, lingering_time=0)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            stop["event"], stop["loop"] = asyncio.Event(), asyncio.get_running_loop()
            bound.set()
            try:
                await stop["event"].wait()
            finally:
                await runner.cleanup()

        thread = threading.Thread(target=lambda: asyncio.run(main()), name="sealmesh-brainlock-http", daemon=True)
        thread.start()
        await trio.to_thread.run_sync(bound.wait)
        log.info("brainlock http on http://%s:%d (/get_client, /add_key, /compute)", self.host, self.port)
        task_status.started(self.port)
        try:
            await trio.sleep_forever()
        finally:
            stop["loop"].call_soon_threadsafe(stop["event"].set)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, 10)


async def _chunks(content):
    """The body's chunks; a body cut short (the peer hung up) is the peer's short_body."""
    while True:
        try:
            chunk = await content.readany()
        except Exception as exc:  # aiohttp's payload errors on a reset connection
            raise BrainlockRefusal("short_body", f"the body broke off: {exc}") from exc
        if not chunk:
            return
        yield chunk


def _sync(fn, *args):
    async def call():
        return fn(*args)
    return call




# --- the validator's side: challenging a miner over this protocol ------------------------


@dataclass(frozen=True)
class StreamedResult:
    chunks: tuple[bytes, ...]
    arrivals_s: tuple[float, ...]  # each chunk's arrival, seconds after the request was sent
    total_s: float


class BrainlockClient:
    """A sealmesh validator speaking the subnet's protocol to one miner (blocking: run it in
    a worker thread). It never uses /get_client's archive to encrypt or decrypt: it has
    compiled its own client, and only checks that the miner serves the same one.

    Each refusal raises node.fhe_service.ExchangeError with the miner's reason label (or
    http_<status>), a cut stream `cut_stream`, a stream that fails Brainlock's check
    protocol.challenge.LATE_STREAM: labels a ChallengeRecord's error_reason can hold.
    """

    def __init__(self, signer: Any, miner_hotkey: str, host: str, port: int, *, timeout_s: float = 300.0) -> None:
        self.signer, self.miner_hotkey, self.host, self.port, self.timeout_s = signer, miner_hotkey, host, port, timeout_s

    def _headers(self, body: bytes) -> dict[str, str]:
        from protocol.epistula import seal

        return seal(self.signer, body, now_ms=now_ms(), signed_for=self.miner_hotkey).to_headers()

    @staticmethod
    def _form(files: dict[str, bytes], fields: dict[str, str]) -> tuple[bytes, str]:
        boundary = uuidlib.uuid4().hex
        out: list[bytes] = []
        for name, data in files.items():
            out += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="file"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
        for name, value in fields.items():
            out += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
                    value.encode(), b"\r\n"]
        out.append(f"--{boundary}--\r\n".encode())
        return b"".join(out), f"multipart/form-data; boundary={boundary}"

    def _request(self, method: str, path: str, body: bytes = b"", content_type: str | None = None):
        import http.client

        headers = self._headers(body)
        if content_type:
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        conn.request(method, path, body=body or None, headers=headers)
        return conn, conn.getresponse()

    @staticmethod
    def _refused(response) -> Exception:
        import json

        from node.fhe_service import ExchangeError

        raw = response.read(64 * 1024)
        try:
            doc = json.loads(raw)
            return ExchangeError(str(doc["reason"])[:48], str(doc.get("error", ""))[:256])
        except (ValueError, KeyError, TypeError):
            return ExchangeError(f"http_{response.status}", raw[:200].decode(errors="replace"))

    def client_zip_matches(self, own_client_zip: bytes) -> bool:
        conn, response = self._request("GET", "/get_client")
        try:
            if response.status != 200:
                raise self._refused(response)
            return response.read(len(own_client_zip) + 1) == own_client_zip
        finally:
            conn.close()

    def add_key(self, evaluation_keys: bytes) -> str:
        import json

        from node.fhe_service import ExchangeError

        body, kind = self._form({"key": evaluation_keys}, {})
        conn, response = self._request("POST", "/add_key", body, kind)
        try:
            if response.status != 200:
                raise self._refused(response)
            try:
                uid = json.loads(response.read(4096))["uid"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ExchangeError("bad_answer", f"/add_key answered no uid: {exc}") from exc
            if not isinstance(uid, str) or not uid or len(uid) > 128:
                raise ExchangeError("bad_answer", "/add_key answered a uid that is not a short string")
            return uid
        finally:
            conn.close()

    def compute(self, uid: str, ciphertext: bytes, iterations: int, *, max_chunk_bytes: int) -> StreamedResult:
        """The streamed chunks; checks the framing, each chunk's size, the count and
        Brainlock's streaming rule."""
        from node.fhe_service import ExchangeError
        from protocol.challenge import LATE_STREAM, streamed_in_time

        body, kind = self._form({"model_input": ciphertext}, {"uid": uid, "iterations": str(iterations)})
        sent = time.monotonic()
        conn, response = self._request("POST", "/compute", body, kind)
        try:
            if response.status != 200:
                raise self._refused(response)
            chunks, arrivals = [], []
            while True:
                head = response.read(4)
                if len(head) != 4:
                    raise ExchangeError("cut_stream", f"the stream ended after {len(chunks)} chunks")
                length = int.from_bytes(head, "little")
                if length == 0:
                    break
                if length > max_chunk_bytes or len(chunks) >= iterations:
                    raise ExchangeError("bad_stream", f"chunk {len(chunks) + 1} of {length} bytes "
                                                      f"(at most {iterations} of {max_chunk_bytes})")
                data = response.read(length)
                if len(data) != length:
                    raise ExchangeError("cut_stream", f"chunk {len(chunks) + 1} ended after {len(data)} bytes")
                chunks.append(data)
                arrivals.append(time.monotonic() - sent)
            total = time.monotonic() - sent
        finally:
            conn.close()
        if len(chunks) != iterations:
            raise ExchangeError("bad_stream", f"{len(chunks)} chunks for {iterations} iterations")
        if not streamed_in_time(arrivals, total):
            raise ExchangeError(LATE_STREAM, f"the first chunks came at {arrivals[:2]} s of {total:.2f} s")
        return StreamedResult(tuple(chunks), tuple(arrivals), total)


__all__ = ["BrainlockClient", "BrainlockHttp", "BrainlockRefusal", "StreamedResult", "check_body_signature",
           "check_headers", "form_boundary", "parse_form", "signed_string"]
