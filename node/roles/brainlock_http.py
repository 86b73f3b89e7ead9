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

The rules (what is accepted or refused, and in which order) are protocol/brainlock.py's;
this module carries the requests and asks them. Order of the checks, cheapest first,
every one before the body is read except the last:
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

from node.clock import now_ms
from protocol.brainlock import (BrainlockRefusal, check_body_complete, check_body_progress,
                                check_body_signature, check_declared_body, check_headers, check_upload_slot,
                                form_boundary, parse_compute_form, parse_form, require_field, route_body_limit,
                                status_of)
from protocol.challenge_messages import VALIDATORS_ONLY
from protocol.epistula import Envelope
from protocol.errors import RemoteProtocolError
from protocol.membership import SenderPolicy

log = logging.getLogger("sealmesh.brainlock")

METRICS_SOURCE = "brainlock"
CHUNK_BYTES = 1 << 16


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
        return route_body_limit(route, evaluation_key_bytes=engine.evaluation_key_bytes,
                                max_ciphertext_bytes=engine.max_ciphertext_bytes)

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

    async def run_chain(self, owner: str, key_id: str, ciphertext: bytes, iterations: int, deliver) -> None:
        """The engine's chained run (fhe.engine.FheEngine.run_chained_async): `deliver`
        gets each output as soon as it is computed (called on the engine's worker thread),
        then None when the chain is done or the exception that ended it; never raises."""
        miner = self.miner
        miner.pending += 1
        try:
            if miner.behaviour == "slow":
                await trio.sleep(miner.config.slow_delay_s)
            if miner.behaviour == "garbage":
                for _ in range(iterations):
                    deliver(os.urandom(miner.garbage_bytes))
            elif miner.behaviour == "stale_chain":  # chunks 1-2 right, then chunk 1 again
                outputs: list[bytes] = []
                await miner.engine.run_chained_async(owner, key_id, ciphertext, min(iterations, 2),
                                                     lambda _iteration, output: outputs.append(output) or
                                                     deliver(output))
                for _ in range(iterations - len(outputs)):
                    deliver(outputs[0])
            else:
                await miner.engine.run_chained_async(owner, key_id, ciphertext, iterations,
                                                     lambda _iteration, output: deliver(output))
        except Exception as exc:
            deliver(exc)
        else:
            deliver(None)
        finally:
            miner.pending -= 1

    def done(self, route: str, elapsed_s: float | None = None) -> None:
        self.served[route] += 1
        self.miner.served[f"brainlock_{route}"] += 1
        if elapsed_s is not None:
            self.miner.compute_s.append(round(elapsed_s, 3))
        self.miner._report()  # /status and status.json show what was served over HTTP too

    # -- the aiohttp thread --

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import asyncio

        from aiohttp import web

        from node.http_thread import serve_app_in_thread, trio_caller

        on_trio = trio_caller(trio.lowlevel.current_trio_token())

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
            declared, limit = request.content_length, self.body_limit(route)
            check_declared_body(route, request.headers.get("Content-Type", ""), declared, limit)
            signer = await on_trio(self.admit, envelope, arrived)
            if route == "/get_client":
                await on_trio(self.verify_body, envelope, hashlib.sha256(b"").hexdigest(), arrived)
                return signer, b""
            check_upload_slot(self.uploading, signer, per_signer=self.miner.config.uploads_per_signer)
            self.uploading[signer] += 1
            try:
                digest, got = hashlib.sha256(), 0
                sink = tempfile.NamedTemporaryFile(dir=self.spool_dir(), prefix="key-", delete=False) \
                    if spool else None
                chunks: list[bytes] = []
                try:
                    async for chunk in _chunks(request.content):
                        got += len(chunk)
                        check_body_progress(route, got, limit)
                        digest.update(chunk)
                        if sink is not None:
                            sink.write(chunk)
                        else:
                            chunks.append(chunk)
                    check_body_complete(got, declared)
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
                form = parse_compute_form(body, request.headers["Content-Type"])
                uid, iterations = form.uid, form.iterations
                ciphertext = body[form.model_input.start:form.model_input.end]
                key_id = await on_trio(self.start_compute, signer, uid, iterations)
                started = time.monotonic()
                chain = ChainStream(asyncio.get_running_loop())
                running = asyncio.ensure_future(on_trio(self.run_chain, signer, key_id, ciphertext, iterations,
                                                        chain.deliver))
                # The first output before the response starts: a garbage ciphertext or a
                # refusal of the engine still gets its status and reason.
                output = await chain.next()
            except RemoteProtocolError as exc:
                return await refusal(exc.reason, exc.hint)
            except Exception as exc:
                log.warning("brainlock compute failed on our side: %s", exc)
                return await refusal(getattr(exc, "reason", "miner_error"), str(exc)[:200])
            try:
                response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                await response.prepare(request)
                for done_runs in range(1, iterations + 1):
                    await response.write(len(output).to_bytes(4, "little") + output)  # flushed as it goes
                    if done_runs == iterations:
                        break
                    try:
                        output = await chain.next()
                    except Exception as exc:  # mid-stream: no terminator, so the validator sees a cut stream
                        reason = getattr(exc, "reason", "miner_error")
                        await on_trio(_sync(self.refuse, reason, f"iteration {done_runs + 1}: {exc}"))
                        return response
                await response.write((0).to_bytes(4, "little"))
                await response.write_eof()
            finally:
                chain.abandon()  # the validator hung up (or we are done): the engine stops at the next output
                try:
                    await asyncio.shield(running)  # the pending count and the slot are back before we answer
                except Exception as exc:  # the trio loop is shutting down
                    log.debug("brainlock chain after the response: %s", exc)
            await on_trio(_sync(self.done, "compute", time.monotonic() - started))
            log.info("brainlock compute for %s: %d chained iterations in %.2f s", signer, iterations,
                     time.monotonic() - started)
            return response

        def make_app() -> web.Application:
            # bodies are streamed, never request.read(): client_max_size does not apply, keep it small
            app = web.Application(client_max_size=1 << 20)
            app.router.add_get("/get_client", get_client)
            app.router.add_post("/add_key", add_key)
            app.router.add_post("/compute", compute)
            return app

        def bound(port: int) -> None:
            self.port = port
            log.info("brainlock http on http://%s:%d (/get_client, /add_key, /compute)", self.host, port)

        await serve_app_in_thread(make_app, self.host, self.port, name="sealmesh-brainlock-http", on_bound=bound,
                                  task_status=task_status)


class ChainAbandoned(Exception):
    """The response is gone: the engine's chain stops at its next output."""


class ChainStream:
    """A chained run's outputs crossing from the engine's worker thread to the aiohttp
    loop, in order: bytes per iteration, then None (done) or the exception that ended it.
    (call_soon_threadsafe keeps the order across the two threads that deliver.)"""

    def __init__(self, loop) -> None:
        import asyncio

        self.loop, self.items, self.gone = loop, asyncio.Queue(), threading.Event()

    def deliver(self, item) -> None:
        if self.gone.is_set() and isinstance(item, bytes):
            raise ChainAbandoned("the validator is gone")
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    async def next(self) -> bytes:
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise BrainlockRefusal("miner_error", "the chain ended before its last iteration")
        return item

    def abandon(self) -> None:
        self.gone.set()


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


__all__ = ["BrainlockClient", "BrainlockHttp", "StreamedResult"]
