"""The miner's execution engine: one pinned circuit, a key cache, bounded FHE runs.

No networking. node/roles/miner.py feeds it what validators send:
    key_id = engine.add_key(validator_hotkey, evaluation_key_bytes)
    result = await engine.run_async(validator_hotkey, key_id, ciphertext, iterations)
    await engine.run_chained_async(validator_hotkey, key_id, ciphertext, iterations, on_output)

Runs happen in worker threads (Concrete releases the GIL while it computes), so the
trio event loop never blocks. Concrete reads a peer's bytes only after fhe.capnp_guard
found them to be one well-framed, non-aliased message under this circuit's size cap
(issue 11 finding 3), and only on a worker thread: its reader holds the GIL, so what it
may cost is bounded by those checks, not by the thread. At most `max_concurrency` circuits run at once, across
sync and async callers. A challenge that passes `timeout_s` (queueing included) raises
Timeout at once; its worker stops after the iteration it is in, still holding its slot,
so a burst of timeouts cannot oversubscribe the CPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fhe.bundle import SERVER_ZIP, BundleError, BundleHashMismatch, sha256_bytes
from fhe.capnp_guard import check_capnp_message
from fhe.key_layout import layout_digest, reference_layout_digest
from protocol.errors import RemoteProtocolError

_CIPHERTEXT_SLACK_BYTES = 4096  # capnp framing and seeds around the raw LWE payload
_KEY_SLACK_BYTES = 1024  # the same around evaluation keys, plus per-key headers below
_KEY_SLACK_PER_KEY_BYTES = 256


class EngineError(Exception):
    """Our side could not serve a request (not the peer's fault). Has a `.reason`."""

    reason = "engine"

    def __init__(self, hint: str, *, reason: str | None = None) -> None:
        super().__init__(hint)
        if reason is not None:
            self.reason = reason


class Timeout(EngineError):
    reason = "timeout"


class KeyCacheFull(EngineError):
    """Other validators' keys fill the cache: this upload would have to evict them."""

    reason = "key_cache_full"


class MalformedCiphertext(RemoteProtocolError):
    reason = "malformed_ciphertext"


class MalformedKey(RemoteProtocolError):
    reason = "malformed_key"


class UnknownKey(RemoteProtocolError):
    """No such key here (never uploaded, or evicted): upload the evaluation keys again."""

    reason = "unknown_key"


class ForeignKey(RemoteProtocolError):
    """The key id exists but was uploaded by another hotkey."""

    reason = "foreign_key"


class OversizedInput(RemoteProtocolError):
    reason = "oversized_input"


class BadIterations(RemoteProtocolError):
    reason = "bad_iterations"


class TooManyIterations(BadIterations):
    reason = "too_many_iterations"


@dataclass
class _StoredKey:
    evaluation_keys: Any  # concrete.fhe.EvaluationKeys, deserialized once
    size: int
    owners: set[str] = field(default_factory=set)


def _client_specs_json(server_zip: bytes) -> bytes:
    import zipfile
    from io import BytesIO

    with zipfile.ZipFile(BytesIO(server_zip)) as archive:
        return archive.read("client.specs.json")


def expected_ciphertext_bytes(specs: dict[str, Any]) -> int:
    """Upper bound on one serialized input: raw LWE payload plus framing."""
    total = 0
    for circuit in specs["circuits"]:
        for gate in circuit["inputs"]:
            raw = gate["rawInfo"]
            total += math.prod(raw["shape"]["dimensions"]) * raw["integerPrecision"] // 8
    return total + _CIPHERTEXT_SLACK_BYTES


def expected_evaluation_key_bytes(specs: dict[str, Any]) -> int:
    """Serialized size of evaluation keys for this circuit's parameters. Seeded keys
    store only the bodies. Keys for other parameters would make Concrete read past its
    buffers, so add_key checks the size against this first."""
    keyset = specs["keyset"]
    total = 0
    count = 0
    for bsk in keyset.get("lweBootstrapKeys", []):
        p = bsk["params"]
        glwe = p["glweDimension"] + 1
        masks = 1 if bsk.get("compression") == "seed" else glwe
        total += p["inputLweDimension"] * p["levelCount"] * glwe * masks * p["polynomialSize"] * 8
        count += 1
    for ksk in keyset.get("lweKeyswitchKeys", []):
        p = ksk["params"]
        width = 1 if ksk.get("compression") == "seed" else p["outputLweDimension"] + 1
        total += p["inputLweDimension"] * p["levelCount"] * width * 8
        count += 1
    for pksk in keyset.get("packingKeyswitchKeys", []):
        p = pksk["params"]
        glwe = p["glweDimension"] + 1
        total += (p["inputLweDimension"] + 1) * p["levelCount"] * glwe * p["polynomialSize"] * 8
        count += 1
    return total + _KEY_SLACK_BYTES + count * _KEY_SLACK_PER_KEY_BYTES


class FheEngine:
    """Serve one compiled circuit (server.zip pinned by sha256) to many key owners."""

    def __init__(self, server_bundle_dir: str | Path, expected_sha256: str, *,
                 key_cache_bytes: int = 1 << 30, max_concurrency: int = 1,
                 timeout_s: float = 120.0, max_iterations: int = 4,
                 max_ciphertext_bytes: int | None = None, max_keys_per_owner: int = 2,
                 owner_key_bytes: int | None = None, max_chained_iterations: int = 10) -> None:
        """`max_keys_per_owner` and `owner_key_bytes` (default: that many keys of this
        circuit, within `key_cache_bytes`) bound what one validator holds here.
        `max_chained_iterations` bounds run_chained (the Brainlock subnet sends 5-10),
        `max_iterations` run."""
        from concrete.ml.deployment import FHEModelServer

        if min(max_concurrency, max_iterations, max_keys_per_owner, max_chained_iterations) < 1 or timeout_s <= 0 \
                or key_cache_bytes <= 0 or (owner_key_bytes is not None and owner_key_bytes <= 0):
            raise ValueError("max_concurrency, max_iterations, max_chained_iterations, max_keys_per_owner, timeout_s, "
                             "key_cache_bytes and owner_key_bytes must be positive")
        path = Path(server_bundle_dir) / SERVER_ZIP
        try:
            server_zip = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {path}: {exc}", reason="missing_bundle_file") from exc
        actual = sha256_bytes(server_zip)
        if actual != expected_sha256:
            raise BundleHashMismatch(f"{path} has sha256 {actual}, expected {expected_sha256}: "
                                     "fetch the announced bundle again")
        self.server_sha256 = actual
        specs_json = _client_specs_json(server_zip)
        specs = json.loads(specs_json)
        # Load the bytes we hashed from a private copy: the file could change under us.
        with tempfile.TemporaryDirectory() as private:
            (Path(private) / SERVER_ZIP).write_bytes(server_zip)
            try:
                self._server = FHEModelServer(private)
            except (ValueError, RuntimeError, OSError) as exc:
                raise BundleError(f"cannot load {path}: {exc}", reason="bad_server_bundle") from exc
        self.key_cache_bytes = key_cache_bytes
        self.max_iterations = max_iterations
        self.max_chained_iterations = max_chained_iterations
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.max_ciphertext_bytes = max_ciphertext_bytes or expected_ciphertext_bytes(specs)
        self.evaluation_key_bytes = expected_evaluation_key_bytes(specs)
        # What honest keys for this circuit look like outside their key material (a
        # keyset made in a child process, once per circuit): add_key holds uploads to it.
        try:
            self.key_layout = reference_layout_digest(specs_json, Path(server_bundle_dir))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise BundleError(f"cannot derive the evaluation-key layout of {path}: {exc}",
                              reason="bad_server_bundle") from exc
        self.max_keys_per_owner = max_keys_per_owner
        self.owner_key_bytes = owner_key_bytes or min(
            key_cache_bytes, max_keys_per_owner * (self.evaluation_key_bytes + _KEY_SLACK_BYTES * 4))
        self._keys: OrderedDict[str, _StoredKey] = OrderedDict()  # least recently used first
        self._owned: dict[str, OrderedDict[str, None]] = {}  # owner -> its key ids, LRU first
        self._keys_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)

    # ------------------------------------------------------------------ keys
    #
    # Quotas per owner (issue 11 finding 9): one LRU shared by every validator let one
    # validator's uploads push everyone else's keys out. Now each owner has its own LRU,
    # bounded in count (`max_keys_per_owner`) and bytes (`owner_key_bytes`), and an upload
    # evicts only keys of its uploader. A key stays stored while any owner holds it. When
    # the shared budget (`key_cache_bytes`) cannot take an upload even after the uploader
    # dropped its own old keys, the upload is refused (KeyCacheFull), nobody is evicted.

    @property
    def cache_bytes(self) -> int:
        with self._keys_lock:
            return self._stored_bytes()

    def _stored_bytes(self) -> int:
        return sum(stored.size for stored in self._keys.values())

    def key_ids(self) -> list[str]:
        """Cached key ids, least recently used first."""
        with self._keys_lock:
            return list(self._keys)

    def owner_key_ids(self, owner_hotkey: str) -> list[str]:
        """The key ids `owner_hotkey` holds here, its least recently used first."""
        with self._keys_lock:
            return list(self._owned.get(owner_hotkey, ()))

    def _own_evictions(self, owner: str, key_id: str, size: int) -> list[str]:
        """The owner's own oldest keys to drop so that it holds `key_id` within its quota."""
        keep = [k for k in self._owned.get(owner, ()) if k != key_id]
        count, used = len(keep) + 1, size + sum(self._keys[k].size for k in keep)
        evict = []
        while keep and (count > self.max_keys_per_owner or used > self.owner_key_bytes):
            oldest = keep.pop(0)
            evict.append(oldest)
            count, used = count - 1, used - self._keys[oldest].size
        return evict

    def _check_room(self, owner: str, key_id: str, size: int) -> list[str]:
        """Raise KeyCacheFull unless `key_id` fits once `owner` dropped its own old keys;
        returns those keys. Call with the lock held."""
        evict = self._own_evictions(owner, key_id, size)
        freed = sum(self._keys[k].size for k in evict if self._keys[k].owners == {owner})
        added = 0 if key_id in self._keys else size
        if self._stored_bytes() - freed + added > self.key_cache_bytes:
            raise KeyCacheFull(f"the key cache ({self.key_cache_bytes} bytes) is full with other "
                               "validators' keys; retry later or ask the miner for a larger cache")
        return evict

    def _unbind(self, owner: str, key_id: str) -> None:
        stored = self._keys[key_id]
        stored.owners.discard(owner)
        self._owned[owner].pop(key_id, None)
        if not stored.owners:
            del self._keys[key_id]

    def _bind(self, owner: str, key_id: str) -> None:
        self._keys.move_to_end(key_id)
        self._owned.setdefault(owner, OrderedDict())[key_id] = None
        self._owned[owner].move_to_end(key_id)
        self._keys[key_id].owners.add(owner)

    def add_key(self, owner_hotkey: str, eval_key_bytes: bytes) -> str:
        """Store `owner_hotkey`'s evaluation keys; returns their key id (sha256 hex).
        Uploading the same bytes again (by anyone) binds that owner too. Drops the
        uploader's own least recently used keys until it is within its quota; never
        another owner's. Deserializing takes a fraction of a second for tens of MB: call
        it from a thread (add_key_async)."""
        if not isinstance(eval_key_bytes, bytes) or not eval_key_bytes:
            raise MalformedKey("evaluation keys must be non-empty bytes")
        size = len(eval_key_bytes)
        if size > min(self.key_cache_bytes, self.owner_key_bytes):
            raise OversizedInput(f"evaluation keys are {size} bytes, this miner caches at most "
                                 f"{min(self.key_cache_bytes, self.owner_key_bytes)} per validator")
        if abs(size - self.evaluation_key_bytes) > _KEY_SLACK_BYTES * 4:
            raise MalformedKey(f"evaluation keys are {size} bytes; keys for this circuit are "
                               f"about {self.evaluation_key_bytes}: wrong circuit or parameters")
        key_id = sha256_bytes(eval_key_bytes)
        with self._keys_lock:
            evict = self._check_room(owner_hotkey, key_id, size)  # before any Concrete work
            if key_id in self._keys:
                for old in evict:
                    self._unbind(owner_hotkey, old)
                self._bind(owner_hotkey, key_id)
                return key_id
        shape = check_capnp_message(eval_key_bytes, max_bytes=self.evaluation_key_bytes + _KEY_SLACK_BYTES * 4,
                                    error=MalformedKey)
        if layout_digest(eval_key_bytes, shape) != self.key_layout:
            raise MalformedKey("these evaluation keys are not laid out like keys for this circuit (keys, ids, "
                               "parameters or sizes differ): generate them from this bundle's client",
                               reason="key_layout_mismatch")
        from concrete import fhe

        try:
            evaluation_keys = fhe.EvaluationKeys.deserialize(eval_key_bytes)
        except (RuntimeError, ValueError) as exc:
            raise MalformedKey(f"evaluation keys do not deserialize: {exc}") from exc
        with self._keys_lock:
            evict = self._check_room(owner_hotkey, key_id, size)  # others may have uploaded meanwhile
            for old in evict:
                self._unbind(owner_hotkey, old)
            self._keys.setdefault(key_id, _StoredKey(evaluation_keys, size))
            self._bind(owner_hotkey, key_id)
        return key_id

    async def add_key_async(self, owner_hotkey: str, eval_key_bytes: bytes) -> str:
        import trio

        return await trio.to_thread.run_sync(self.add_key, owner_hotkey, eval_key_bytes)

    def _lookup(self, owner_hotkey: str, key_id: str) -> _StoredKey:
        with self._keys_lock:
            stored = self._keys.get(key_id)
            if stored is None:
                raise UnknownKey(f"no evaluation keys with id {key_id[:16]}: upload them again")
            if owner_hotkey not in stored.owners:
                raise ForeignKey(f"evaluation keys {key_id[:16]} belong to another hotkey")
            self._bind(owner_hotkey, key_id)
            return stored

    # ------------------------------------------------------------------ runs

    def _admit(self, owner_hotkey: str, key_id: str, ciphertext: bytes, iterations: int,
               max_iterations: int | None = None) -> _StoredKey:
        """Every check that needs no FHE work, cheapest first (microseconds: fine on the
        event loop). Concrete has not seen the ciphertext yet."""
        bound = self.max_iterations if max_iterations is None else max_iterations
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise BadIterations(f"iterations must be a positive integer, got {iterations!r}")
        if iterations > bound:
            raise TooManyIterations(f"{iterations} iterations asked, at most {bound} allowed")
        if not isinstance(ciphertext, bytes) or not ciphertext:
            raise MalformedCiphertext("ciphertext must be non-empty bytes")
        if len(ciphertext) > self.max_ciphertext_bytes:
            raise OversizedInput(f"ciphertext is {len(ciphertext)} bytes, at most "
                                 f"{self.max_ciphertext_bytes} for this circuit")
        stored = self._lookup(owner_hotkey, key_id)
        check_capnp_message(ciphertext, max_bytes=self.max_ciphertext_bytes, error=MalformedCiphertext)
        return stored

    @staticmethod
    def _deserialize(ciphertext: bytes) -> Any:
        """Concrete reads the (checked) ciphertext: on the worker thread, never the loop."""
        from concrete import fhe

        try:
            return fhe.Value.deserialize(ciphertext)
        except (RuntimeError, ValueError) as exc:
            raise MalformedCiphertext(f"ciphertext does not deserialize: {exc}") from exc

    def _execute(self, stored: _StoredKey, ciphertext: bytes, iterations: int, deadline: float,
                 abandoned: threading.Event) -> bytes:
        """Worker-thread body: read the ciphertext, take a slot, run the circuit
        `iterations` times."""
        value = self._deserialize(ciphertext)
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Timeout(f"no free slot within {self.timeout_s} s "
                          f"({self.max_concurrency} running)")
        try:
            result = None
            for _ in range(iterations):
                if abandoned.is_set() or time.monotonic() > deadline:
                    raise Timeout(f"challenge passed its {self.timeout_s} s budget")
                try:
                    result = self._server.server.run(value, evaluation_keys=stored.evaluation_keys)
                except RuntimeError as exc:
                    raise MalformedCiphertext(f"ciphertext does not fit this circuit: {exc}") \
                        from exc
            if time.monotonic() > deadline:
                raise Timeout(f"challenge passed its {self.timeout_s} s budget")
            return result.serialize()
        finally:
            self._slots.release()

    def run(self, owner_hotkey: str, key_id: str, ciphertext: bytes,
            iterations: int = 1) -> bytes:
        """Blocking run on the calling thread; returns the serialized encrypted result of
        the last iteration (every iteration recomputes the same input: a load test)."""
        deadline = time.monotonic() + self.timeout_s
        stored = self._admit(owner_hotkey, key_id, ciphertext, iterations)
        return self._execute(stored, ciphertext, iterations, deadline, threading.Event())

    async def run_async(self, owner_hotkey: str, key_id: str, ciphertext: bytes,
                        iterations: int = 1) -> bytes:
        """run() in a worker thread under a trio cancel scope of `timeout_s`."""
        import trio

        deadline = time.monotonic() + self.timeout_s
        stored = self._admit(owner_hotkey, key_id, ciphertext, iterations)
        abandoned = threading.Event()
        with trio.move_on_after(self.timeout_s):
            try:
                return await trio.to_thread.run_sync(
                    self._execute, stored, ciphertext, iterations, deadline, abandoned,
                    abandon_on_cancel=True)
            finally:
                abandoned.set()  # no-op when finished; stops the worker when abandoned
        raise Timeout(f"challenge passed its {self.timeout_s} s budget")

    # ------------------------------------------------------------------ chained runs
    #
    # The Brainlock subnet's /compute: each iteration's output is the next one's input,
    # and each output goes to the validator as soon as it exists. The output stays a
    # Concrete value between iterations and is never re-read from its bytes: it is this
    # miner's own value (nothing a peer sent), and serialized it is far larger than an
    # input (3.1 MB against 4.9 KB for the tiny synthetic CNV: uncompressed LWE), so the
    # input checks would refuse it. The circuit must be compiled composable (its output
    # encoding equal to its input's), or Concrete refuses the second run.
    #
    # Budget: `timeout_s` per iteration, queueing included (one deadline for the chain,
    # timeout_s * iterations from the call): a chain of n is n challenges' worth of work.

    def _execute_chain(self, stored: _StoredKey, ciphertext: bytes, iterations: int, deadline: float,
                       abandoned: threading.Event, on_output: Callable[[int, bytes], None]) -> bytes:
        """Worker-thread body: read the ciphertext, take one slot for the whole chain,
        run, hand each serialized output to `on_output(iteration, output)` (1-based, on
        this thread); an exception from on_output stops the chain."""
        value = self._deserialize(ciphertext)
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Timeout(f"no free slot within {self.timeout_s * iterations:g} s "
                          f"({self.max_concurrency} running)")
        try:
            output = b""
            for iteration in range(1, iterations + 1):
                if abandoned.is_set() or time.monotonic() > deadline:
                    raise Timeout(f"the chain passed its {self.timeout_s * iterations:g} s budget "
                                  f"before iteration {iteration}")
                try:
                    value = self._server.server.run(value, evaluation_keys=stored.evaluation_keys)
                except RuntimeError as exc:
                    if iteration == 1:
                        raise MalformedCiphertext(f"ciphertext does not fit this circuit: {exc}") from exc
                    raise EngineError(f"iteration {iteration} refused our own output (is the circuit "
                                      f"compiled composable?): {str(exc)[:160]}", reason="chain_failed") from exc
                output = value.serialize()
                if time.monotonic() > deadline:
                    raise Timeout(f"the chain passed its {self.timeout_s * iterations:g} s budget "
                                  f"in iteration {iteration}")
                on_output(iteration, output)
            return output
        finally:
            self._slots.release()

    def run_chained(self, owner_hotkey: str, key_id: str, ciphertext: bytes, iterations: int,
                    on_output: Callable[[int, bytes], None]) -> bytes:
        """Blocking chained run on the calling thread: `iterations` runs, each on the
        previous one's output, each output handed to `on_output` as soon as it is
        computed; returns the last. Same key ownership, slots and input checks as run;
        iterations bounded by `max_chained_iterations`."""
        stored = self._admit(owner_hotkey, key_id, ciphertext, iterations, self.max_chained_iterations)
        deadline = time.monotonic() + self.timeout_s * iterations
        return self._execute_chain(stored, ciphertext, iterations, deadline, threading.Event(), on_output)

    async def run_chained_async(self, owner_hotkey: str, key_id: str, ciphertext: bytes, iterations: int,
                                on_output: Callable[[int, bytes], None]) -> bytes:
        """run_chained in a worker thread under a trio cancel scope of the chain's budget.
        `on_output` is called on the worker thread: it must be thread-safe (hand the bytes
        over, do not compute in it)."""
        import trio

        stored = self._admit(owner_hotkey, key_id, ciphertext, iterations, self.max_chained_iterations)
        budget = self.timeout_s * iterations
        deadline = time.monotonic() + budget
        abandoned = threading.Event()
        with trio.move_on_after(budget):
            try:
                return await trio.to_thread.run_sync(
                    self._execute_chain, stored, ciphertext, iterations, deadline, abandoned, on_output,
                    abandon_on_cancel=True)
            finally:
                abandoned.set()  # no-op when finished; stops the worker when abandoned
        raise Timeout(f"the chain passed its {budget:g} s budget")
