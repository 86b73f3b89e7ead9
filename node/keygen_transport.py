"""TNO's HTTP Pool with every request signed and sealed (protocol/keygen_channel.py).

TNO's `DistributedPaillier` talks to a `tno.mpc.communication.Pool`: `send`, `asend`,
`broadcast` serialize a message once and post the bytes to each member's HTTPClient
(`_send`); the HTTPServer unpacks what arrives and files it under the sending member,
which plain TNO finds from the source IP and a port cookie. Here:

- `SealedHTTPClient._send` seals the serialized bytes for its member (one sequence
  number per message) and posts them inside a fresh Epistula envelope per attempt, so a
  retry after a slow start is never stale. It waits for the member's channel key first.
- `SealedHTTPServer._post_handler` hands every body to the channel before anything else
  reads it: a body that is not a fresh, signed, sealed frame from a roster member for us
  is refused (401 with the reason in `X-Keygen-Refused`) and never deserialized; the
  sender is the member whose hotkey signed it, not whoever the IP says.
- `SealedPool` announces this member's channel key to every member at start (retrying
  until each has it) and keeps the refusals no retry can cure, for the watchdog.

The protocol code above (TNO's and node/keygen.py's) is unchanged: it still calls the
Pool's verbs with member names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientTimeout, web
from tno.mpc.communication import Pool
from tno.mpc.communication.httphandlers import HTTPClient, HTTPServer
from tno.mpc.communication.serialization import Serialization

from node.clock import now_ms
from protocol.epistula import Envelope, EpistulaError
from protocol.errors import RemoteProtocolError
from protocol.keygen_channel import (MAX_WIRE_BYTES, PERMANENT_REASONS, DuplicateSequence,
                                     KeygenChannel)

log = logging.getLogger("sealmesh.keygen.transport")

REFUSED_HEADER = "X-Keygen-Refused"
_RETRY_DELAY_S = 1.0


@dataclass(frozen=True)
class Refusal:
    member: int | None  # the roster member it concerns, if known
    reason: str
    hint: str
    by_us: bool  # True: we refused its message; False: it refused ours


class SealedHTTPClient(HTTPClient):
    """The sending end towards one member."""

    def __init__(self, pool: "SealedPool", addr: str, port: int, member: int) -> None:
        super().__init__(pool, addr, port, None)
        self.member = member
        self.key_arrived = asyncio.Event()

    async def _send(self, data: bytes, retry_delay: float = _RETRY_DELAY_S,
                    timeout: ClientTimeout = ClientTimeout(total=300),
                    num_retries: int = -1) -> None:
        await self.key_arrived.wait()
        channel = self.pool.channel
        frame = channel.seal(self.member, data)  # numbered once; re-signed per attempt
        await self._post(lambda now: channel.sign(self.member, frame, now_ms=now),
                         retry_delay, timeout, num_retries)

    async def announce(self) -> None:
        channel = self.pool.channel
        await self._post(lambda now: channel.announce(self.member, now_ms=now),
                         _RETRY_DELAY_S, self.pool.default_timeout, -1)

    async def _post(self, make_body: Callable[[int], bytes], retry_delay: float,
                    timeout: ClientTimeout, num_retries: int) -> None:
        url = f"http://{self.addr}:{self.port}"
        while True:
            body = make_body(now_ms())
            try:
                async with self.session.post(url, data=body, timeout=timeout) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        self.total_bytes_sent += len(body)
                        return
                    reason = resp.headers.get(REFUSED_HEADER, f"http_{resp.status}")
                    log.warning("member %d refused our message: %s", self.member, text)
                    self.pool.note_refusal(Refusal(self.member, reason, text, by_us=False))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the member is not up yet, or restarting: retry
                log.debug("sending to member %d failed: %r", self.member, exc)
            if num_retries == 0 or not retry_delay:
                log.debug("giving up on a message to member %d", self.member)
                return
            num_retries = max(num_retries - 1, -1)
            await asyncio.sleep(retry_delay)


class SealedHTTPServer(HTTPServer):
    """The receiving end: the channel opens every body before TNO sees a byte of it."""

    pool: "SealedPool"

    async def _post_handler(self, request: web.Request) -> web.Response:
        length = request.content_length
        if length is None or length > MAX_WIRE_BYTES:
            return self._refuse(None, RemoteProtocolError(
                f"a request needs a Content-Length of at most {MAX_WIRE_BYTES}",
                reason="request_size"), status=413)
        wire = await request.read()
        try:
            delivery = self.pool.channel.receive(wire, now_ms=now_ms())
        except DuplicateSequence:
            return web.Response(text="already received")  # the sender's retry: stop it
        except RemoteProtocolError as exc:
            return self._refuse(wire, exc, status=401, remote=request.remote)
        client = self.pool.by_member[delivery.sender]
        client.key_arrived.set()
        if delivery.payload is None:
            return web.Response(text="channel key received")
        try:
            msg_id, message = await self.loop.run_in_executor(None, functools.partial(
                Serialization.unpack, obj=delivery.payload, use_pickle=False,
                option=self.option, origin=client))
        except Exception as exc:  # a member's authentic bytes that TNO cannot read
            return self._refuse(None, RemoteProtocolError(
                f"member {delivery.sender}'s payload does not unpack: {exc!r}",
                reason="bad_payload"), status=400, remote=request.remote)
        self._file(client, msg_id, message)
        self.msg_recv_counter += 1
        self.total_bytes_recv += len(wire)
        return web.Response(text="Message received")

    def _refuse(self, wire: bytes | None, exc: RemoteProtocolError, *, status: int,
                remote: str | None = None) -> web.Response:
        member = self._signer_position(wire) if exc.reason in PERMANENT_REASONS else None
        log.warning("refused a ceremony message from %s: %s: %s", remote, exc.reason, exc)
        self.pool.note_refusal(Refusal(member, exc.reason, str(exc), by_us=True))
        return web.Response(status=status, text=f"refused: {exc.reason}: {exc}",
                            headers={REFUSED_HEADER: exc.reason})

    def _signer_position(self, wire: bytes | None) -> int | None:
        """Who signed a message refused after its signature was verified."""
        try:
            return self.pool.channel.roster.index_of(Envelope.from_gossip_bytes(wire or b"").signed_by)
        except EpistulaError:
            return None

    @staticmethod
    def _file(client: HTTPClient, msg_id: Any, message: Any) -> None:
        """TNO's buffer: resolve the receiver's future, or keep it until asked for."""
        waiting = client.buffer.get(msg_id)
        if isinstance(waiting, asyncio.Future):
            client.buffer.pop(msg_id)
            if not waiting.done():
                waiting.set_result(message)
        else:
            client.buffer[msg_id] = message


class SealedPool(Pool):
    """A Pool whose members are roster positions, reached over sealed channels."""

    def __init__(self, channel: KeygenChannel) -> None:
        super().__init__()
        self.channel = channel
        self.by_member: dict[int, SealedHTTPClient] = {}
        self.refusals: list[Refusal] = []
        self._announcing: list[asyncio.Task[None]] = []

    def add_http_server(self, port: int | None = None, addr: str = "0.0.0.0",
                        external_port: int | None = None) -> None:
        assert port is not None
        self.http_server = SealedHTTPServer(self, addr=addr, port=port)

    def add_member(self, name: str, member: int, addr: str, port: int) -> None:
        client = SealedHTTPClient(self, addr, port, member)
        self.pool_handlers[name] = client
        self.by_member[member] = client
        # No handlers_lookup entry: a sender is whoever signed, never an IP and a port.

    def start_announcing(self) -> None:
        self._announcing = [self.loop.create_task(c.announce()) for c in self.by_member.values()]

    def note_refusal(self, refusal: Refusal) -> None:
        if refusal.reason in PERMANENT_REASONS:
            self.refusals.append(refusal)

    async def shutdown(self) -> None:
        for task in self._announcing:
            task.cancel()
        await super().shutdown()


__all__ = ["SealedPool", "SealedHTTPClient", "SealedHTTPServer", "Refusal", "REFUSED_HEADER"]
