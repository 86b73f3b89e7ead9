"""The Brainlock subnet's HTTP protocol on a real miner (node/roles/brainlock_http.py).

The client here is written from the subnet's wire format, not through sealmesh's
helpers: Epistula v2 headers signed with sr25519 over
"{sha256(body)}.{uuid}.{timestamp_ms}.{signed_for}", multipart bodies laid out as the
subnet's validator lays them out (requests_toolbelt's MultipartEncoder: every file field
named "file", octet-stream), and /compute's answer read as u32 little-endian lengths
until a 0. The miner is a real MinerService (circuit, keys, keyring, engine) serving
BrainlockHttp in process; the validator decrypts with the client it compiled itself
(sealmesh validators never trust /get_client), and checks /get_client against it.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import trio

from crypto.identity import Hotkey
from node.fhe_service import FheConfig
from node.metrics import NodeMetrics
from node.roles.base import RoleContext
from node.roles.brainlock_http import BrainlockHttp
from protocol.brainlock import form_boundary, parse_form, signed_string
from node.roles.miner import MinerService
from node.settings import NodeSettings
from protocol.epistula import EnvelopeVerifier, Envelope, signing_payload
from protocol.membership import Member, Role, StaticDirectory

MODEL = "synthetic-cnv-tiny"
MINER, VALIDATOR, OTHER_VALIDATOR, TRAINER, STRANGER, POOR = (
    Hotkey.from_uri(u) for u in ("//BlMiner", "//BlVal", "//BlVal2", "//BlTrainer", "//BlStranger", "//BlPoor"))
DIRECTORY = StaticDirectory((
    Member(MINER.ss58_address, frozenset({Role.MINER})),
    Member(VALIDATOR.ss58_address, frozenset({Role.VALIDATOR}), stake=1000.0),
    Member(OTHER_VALIDATOR.ss58_address, frozenset({Role.VALIDATOR}), stake=1000.0),
    Member(TRAINER.ss58_address, frozenset({Role.TRAINER}), stake=1000.0),
    Member(POOR.ss58_address, frozenset({Role.VALIDATOR}), stake=1.0),
))


# --- the subnet's wire format, written out ---------------------------------------------


def epistula_headers(signer: Hotkey, body: bytes, signed_for: str, *, timestamp_ms: int | None = None,
                     uuid_str: str | None = None) -> dict[str, str]:
    timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    uuid_str = uuid_str or str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{uuid_str}.{timestamp}.{signed_for}"
    return {
        "Epistula-Version": "2",
        "Epistula-Timestamp": str(timestamp),
        "Epistula-Uuid": uuid_str,
        "Epistula-Signed-By": signer.ss58_address,
        "Epistula-Request-Signature": "0x" + signer.sign(message.encode()).hex(),
        "Epistula-Signed-For": signed_for,
    }


def multipart(files: dict[str, bytes], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, data in files.items():
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"file\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    for name, value in fields.items():
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode(),
                value.encode(), b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


class Answer:
    def __init__(self, status: int, body: bytes, chunks: list[tuple[float, bytes]] | None = None) -> None:
        self.status, self.body, self.chunks = status, body, chunks

    @property
    def reason(self) -> str:
        import json

        return json.loads(self.body)["reason"]


def call(port: int, method: str, path: str, body: bytes = b"", *, signer: Hotkey | None = VALIDATOR,
         signed_for: str | None = None, content_type: str | None = None, headers: dict | None = None,
         stream: bool = False) -> Answer:
    sent = dict(headers) if headers is not None else (
        epistula_headers(signer, body, MINER.ss58_address if signed_for is None else signed_for) if signer else {})
    if content_type:
        sent["Content-Type"] = content_type
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=body or None, headers=sent)
        started = time.monotonic()
        response = conn.getresponse()
        if not stream or response.status != 200:
            return Answer(response.status, response.read())
        chunks = []
        while True:
            length = int.from_bytes(response.read(4), "little")
            if length == 0:
                return Answer(200, b"", chunks)
            data = response.read(length)
            assert len(data) == length
            chunks.append((time.monotonic() - started, data))
    finally:
        conn.close()


def compute(port: int, ciphertext: bytes, uid: str, iterations, *, signer: Hotkey = VALIDATOR, stream=True,
            drop: str | None = None) -> Answer:
    files = {"model_input": ciphertext}
    fields = {"uid": uid, "iterations": str(iterations)}
    if drop in files:
        del files[drop]
    fields.pop(drop, None)
    body, kind = multipart(files, fields)
    return call(port, "POST", "/compute", body, signer=signer, content_type=kind, stream=stream)


def add_key(port: int, keys: bytes, *, signer: Hotkey = VALIDATOR) -> Answer:
    body, kind = multipart({"key": keys}, {})
    return call(port, "POST", "/add_key", body, signer=signer, content_type=kind)


def raw_head(port: int, path: str, headers: dict[str, str], content_length: int, first_bytes: bytes,
             hold: bool = False):
    """Headers announcing `content_length` and only `first_bytes` of the body; the
    answer that comes while the rest is still 'to come' (or the open socket, hold=True)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", "Host: miner", f"Content-Length: {content_length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first_bytes)
    if hold:
        return s
    try:
        return s.recv(65536)
    finally:
        s.close()


# --- a real miner --------------------------------------------------------------------


def shared_tiny_bundle(root: Path) -> Path:
    """The tiny synthetic CNV compiled once per machine (fhe.compile makes it composable:
    an output can be the next run's input); ensure_bundle checks its hashes each time."""
    from node.fhe_service import ensure_bundle

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_bundle(MODEL, root / f"bundle-{MODEL}")
    return root / f"bundle-{MODEL}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory.getbasetemp().parent / "sealmesh-fhe-cache")


@pytest.fixture(scope="module")
def validator_client(bundle):
    """The validator's own client from its own compiled bundle, with fresh keys."""
    import secrets

    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(str(bundle), key_dir=None)
    client.client.keys.generate(secret_seed=secrets.randbits(128), encryption_seed=secrets.randbits(128))
    return client


@pytest.fixture(scope="module")
def miner_server(bundle, tmp_path_factory):
    """A loaded MinerService with BrainlockHttp on a free port, on its own trio thread."""
    data = tmp_path_factory.mktemp("brainlock-miner")
    settings = NodeSettings(role=Role.MINER, data_dir=data)
    miner = MinerService(settings, FheConfig(model=MODEL, bundle_dir=str(bundle), max_challenges_per_epoch=50,
                                               brainlock_min_stake=10.0))
    metrics = NodeMetrics()
    miner.ctx = RoleContext(settings=settings, hotkey=MINER, genesis=None, mesh=None, store=None,
                            verifier=EnvelopeVerifier(DIRECTORY, MINER.ss58_address), metrics=metrics,
                            data_dir=data, publish=None, peer_of=lambda hotkey: None)
    server = BrainlockHttp(miner, "127.0.0.1", 0)
    up, state = threading.Event(), {}

    async def main():
        await miner._load()
        async with trio.open_nursery() as nursery:
            state["port"] = await nursery.start(server.serve)
            state["stop"], state["token"] = trio.Event(), trio.lowlevel.current_trio_token()
            up.set()
            await state["stop"].wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert up.wait(300), "the miner did not start"
    yield miner, server, state["port"], metrics
    trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
    thread.join(30)


def rejected(metrics: NodeMetrics, reason: str) -> float:
    text = metrics.render().decode()
    found = re.search(r'sealmesh_messages_rejected_total\{[^}]*reason="%s",source="brainlock"\} (\S+)' % reason, text) \
        or re.search(r'sealmesh_messages_rejected_total\{[^}]*source="brainlock",reason="%s"\} (\S+)' % reason, text)
    return float(found.group(1)) if found else 0.0


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- pure parts ----------------------------------------------------------------------


def test_signed_string_is_epistulas():
    envelope = Envelope("2", 1_700_000_000_123, str(uuid.uuid4()), VALIDATOR.ss58_address, MINER.ss58_address,
                        "0x" + "0" * 128, b"")
    body = os.urandom(1000)
    assert signed_string(hashlib.sha256(body).hexdigest(), envelope) == signing_payload(
        body, envelope.uuid, envelope.timestamp_ms, envelope.signed_for)


def test_form_parsing_is_strict():
    body, kind = multipart({"key": b"\r\n--abc\r\n" + os.urandom(100)}, {"uid": "u1"})
    parts = parse_form(body, form_boundary(kind))
    assert body[parts["key"].start:parts["key"].end].startswith(b"\r\n--abc")
    assert body[parts["uid"].start:parts["uid"].end] == b"u1" and parts["key"].filename == "file"
    for bad in (b"junk" + body, body.replace(b'name="uid"', b'name="key"'), body[:-20]):
        with pytest.raises(Exception) as info:
            parse_form(bad, form_boundary(kind))
        assert info.value.reason == "bad_form"
    with pytest.raises(Exception) as info:
        form_boundary("application/json")
    assert info.value.reason == "wrong_content_type"


def test_declared_bodies_and_upload_slots_are_judged_on_headers_alone():
    from protocol.brainlock import (BrainlockRefusal, check_declared_body, check_upload_slot, parse_compute_form,
                                    route_body_limit)

    limit = route_body_limit("/compute", evaluation_key_bytes=10**6, max_ciphertext_bytes=5000)
    assert route_body_limit("/get_client", evaluation_key_bytes=10**6, max_ciphertext_bytes=5000) == 0
    assert route_body_limit("/add_key", evaluation_key_bytes=10**6, max_ciphertext_bytes=5000) > 10**6 > limit > 5000
    kind = "multipart/form-data; boundary=abc"
    check_declared_body("/compute", kind, limit, limit)
    check_declared_body("/get_client", "", None, 0)
    for route, content_type, declared, reason in (
            ("/compute", kind, limit + 1, "body_too_large"), ("/compute", kind, None, "length_required"),
            ("/compute", "application/json", 10, "wrong_content_type"), ("/get_client", "", 1, "body_too_large")):
        with pytest.raises(BrainlockRefusal) as info:
            check_declared_body(route, content_type, declared, limit)
        assert info.value.reason == reason
    check_upload_slot({"other": 1}, "me", per_signer=1)
    with pytest.raises(BrainlockRefusal, match="one at a time"):
        check_upload_slot({"me": 1}, "me", per_signer=1)
    with pytest.raises(BrainlockRefusal) as info:
        check_upload_slot({f"s{i}": 1 for i in range(8)}, "me", per_signer=1)
    assert info.value.reason == "busy"
    body, kind = multipart({"model_input": b"ct"}, {"uid": "u-1", "iterations": " 7 "})
    form = parse_compute_form(body, kind)
    assert (form.uid, form.iterations, body[form.model_input.start:form.model_input.end]) == ("u-1", 7, b"ct")
    for iterations in ("-1", "1e3", "9999999", ""):
        body, kind = multipart({"model_input": b"ct"}, {"uid": "u-1", "iterations": iterations})
        with pytest.raises(BrainlockRefusal) as info:
            parse_compute_form(body, kind)
        assert info.value.reason == "bad_iterations"


# --- the validator's whole flow -------------------------------------------------------


@pytest.mark.slow
def test_a_brainlock_validator_runs_its_whole_flow(miner_server, bundle, validator_client):
    import torch

    from fhe.bundle import CLIENT_ZIP
    from fhe.zoo import get_model

    miner, server, port, metrics = miner_server
    client_zip = call(port, "GET", "/get_client")
    assert client_zip.status == 200 and client_zip.body == (bundle / CLIENT_ZIP).read_bytes()
    keys = validator_client.client.evaluation_keys.serialize()
    answer = add_key(port, keys)
    assert answer.status == 200, answer.body
    import json

    uid = json.loads(answer.body)["uid"]
    x = np.random.default_rng(7).uniform(-1.0, 0.99, (1, 3, 8, 8)).astype(np.float32)
    iterations = 5
    sent = time.monotonic()
    answer = compute(port, validator_client.quantize_encrypt_serialize(x), uid, iterations)
    total = time.monotonic() - sent
    assert answer.status == 200 and len(answer.chunks) == iterations
    arrivals = [at for at, _ in answer.chunks]
    # Streamed: each chunk as its iteration finished, not all at the end (Brainlock's own
    # check: the first 20 % of chunks before 70 % of the total time).
    assert arrivals[0] < 0.7 * total and arrivals == sorted(arrivals)

    # The clear references: the quantized circuit chained as the composable circuit chains
    # (each output's integers are the next input's), and the torch model chained on floats.
    # The synthetic CNV's output scale (1/8, 4 bits) is not its input's (1/128, 8 bits), so
    # from iteration 2 the two chains part: the circuit's is what a miner must return.
    from concrete.ml.common.serialization.loaders import loads

    from fhe.bundle import REFERENCE_JSON
    from fhe.zoo import chained_reference

    reference = loads((bundle / REFERENCE_JSON).read_text())
    circuit_chain = chained_reference(reference, x, iterations)
    model = get_model(MODEL).build(None)
    torch_x, q_x = torch.tensor(x), reference.quantize_input(x)
    report = []
    for i, (_, chunk) in enumerate(answer.chunks, 1):
        fhe_q = np.asarray(validator_client.deserialize_decrypt(chunk))
        fhe_out = validator_client.deserialize_decrypt_dequantize(chunk)
        with torch.no_grad():
            torch_x = model(torch_x)
        torch_out = torch_x.value.numpy() if hasattr(torch_x, "value") else torch_x.numpy()
        q_x = reference.quantized_forward(q_x, fhe="disable")
        same = float(np.mean(fhe_q == q_x))
        circuit_out = circuit_chain[i - 1]
        # The subnet's prediction: the channel argmax of every pixel (argmax over axis 1).
        pixels = float(np.mean(np.argmax(fhe_out, axis=1) == np.argmax(torch_out, axis=1)))
        report.append((i, round(same, 3), int(np.max(np.abs(fhe_q - q_x))),
                       round(cosine(fhe_out, circuit_out), 4) if np.any(circuit_out) else None,
                       round(cosine(fhe_out, torch_out), 4) if np.any(fhe_out) else None, round(pixels, 3)))
    print("\niteration, integers = clear circuit chain, max |diff|, cosine vs circuit chain, cosine vs torch "
          "chain, pixels whose channel argmax = torch's")
    for row in report:
        print(*row)
    print(f"total {total:.2f} s, chunk arrivals {[round(a, 2) for a in arrivals]} s, "
          f"chunk bytes {len(answer.chunks[0][1])}")
    _, _, _, _, torch_cosine, torch_pixels = report[0]
    assert torch_cosine >= 0.9 and torch_pixels >= 0.6  # iteration 1 is the torch model's (4-bit outputs tie often)
    # Every chunk is the chained circuit's output: honest FHE lands a step off in a few entries.
    assert all(same >= 0.8 and diff <= 1 for _, same, diff, *_ in report)
    assert server.served["compute"] >= 1 and miner.keyring.evaluations[VALIDATOR.ss58_address]

    # sealmesh's own validator over the same protocol (BrainlockClient): its own client
    # checked against /get_client, the same keys give the same uid, 2 chained iterations.
    from node.roles.brainlock_http import BrainlockClient

    sealmesh = BrainlockClient(VALIDATOR, MINER.ss58_address, "127.0.0.1", port)
    assert sealmesh.client_zip_matches((bundle / CLIENT_ZIP).read_bytes())
    assert not sealmesh.client_zip_matches(b"another client")
    assert sealmesh.add_key(keys) == uid
    result = sealmesh.compute(uid, validator_client.quantize_encrypt_serialize(x), 2, max_chunk_bytes=4 << 20)
    assert len(result.chunks) == 2 and result.arrivals_s[0] < result.total_s
    second = np.asarray(validator_client.deserialize_decrypt_dequantize(result.chunks[1]))
    assert np.mean(np.isclose(second, circuit_chain[1])) >= 0.8


# --- bad input on every route ----------------------------------------------------------


@pytest.fixture(scope="module")
def uid(miner_server, validator_client) -> str:
    import json

    _, _, port, _ = miner_server
    answer = add_key(port, validator_client.client.evaluation_keys.serialize())
    assert answer.status == 200, answer.body
    return json.loads(answer.body)["uid"]


@pytest.fixture(scope="module")
def ciphertext(validator_client) -> bytes:
    x = np.random.default_rng(3).uniform(-1.0, 0.99, (1, 3, 8, 8)).astype(np.float32)
    return validator_client.quantize_encrypt_serialize(x)


def refused_with(metrics: NodeMetrics, answer: Answer, status: int, reason: str, before: float) -> None:
    assert (answer.status, answer.reason) == (status, reason), answer.body[:300]
    assert rejected(metrics, reason) == before + 1


def route_request(route: str, uid: str, ciphertext: bytes) -> tuple[str, str, bytes, str | None]:
    if route == "/get_client":
        return "GET", route, b"", None
    if route == "/add_key":
        body, kind = multipart({"key": b"k" * 100}, {})
        return "POST", route, body, kind
    body, kind = multipart({"model_input": ciphertext}, {"uid": uid, "iterations": "5"})
    return "POST", route, body, kind


@pytest.mark.parametrize("route", ["/get_client", "/add_key", "/compute"])
def test_epistula_refusals_on_every_route(miner_server, uid, ciphertext, route):
    miner, server, port, metrics = miner_server
    method, path, body, kind = route_request(route, uid, ciphertext)
    now = int(time.time() * 1000)
    cases = [
        ("unsigned", dict(signer=None), 401, "malformed_envelope"),
        ("stale", dict(headers=epistula_headers(VALIDATOR, body, MINER.ss58_address, timestamp_ms=now - 20_000)),
         401, "stale_timestamp"),
        ("future", dict(headers=epistula_headers(VALIDATOR, body, MINER.ss58_address, timestamp_ms=now + 20_000)),
         401, "future_timestamp"),
        ("wrong signed-for", dict(signed_for=OTHER_VALIDATOR.ss58_address), 403, "wrong_recipient"),
        ("empty signed-for", dict(signed_for=""), 403, "wrong_recipient"),
        ("unknown signer", dict(signer=STRANGER), 401, "unknown_signer"),
        ("not a validator", dict(signer=TRAINER), 403, "signer_not_allowed"),
        ("too little stake", dict(signer=POOR), 403, "signer_not_allowed"),
        ("signed over another body", dict(headers=epistula_headers(VALIDATOR, body + b"x", MINER.ss58_address)),
         401, "bad_signature"),
    ]
    for name, how, status, reason in cases:
        before = rejected(metrics, reason)
        answer = call(port, method, path, body, content_type=kind, **how)
        refused_with(metrics, answer, status, reason, before)
    # A replay: the same headers twice. The first is judged on its body (a 100-byte key
    # is malformed, a compute runs), the second is refused as a replay before its body.
    if route != "/compute":  # a compute here would run 5 iterations: the slow test does that
        headers = epistula_headers(VALIDATOR, body, MINER.ss58_address)
        first = call(port, method, path, body, content_type=kind, headers=headers)
        assert first.status in (200, 400), first.body
        before = rejected(metrics, "replay")
        refused_with(metrics, call(port, method, path, body, content_type=kind, headers=headers), 401, "replay",
                     before)
    assert call(port, "GET", "/get_client").status == 200  # still serving


@pytest.mark.parametrize("route", ["/add_key", "/compute"])
def test_bodies_over_the_limit_are_refused_before_they_are_read(miner_server, route):
    """Issue 13: a 256 MiB junk POST was read whole before any check. Now the headers say
    how long the body is, and the answer comes with the body unsent."""
    miner, server, port, metrics = miner_server
    huge = 1 << 30
    headers = epistula_headers(VALIDATOR, b"", MINER.ss58_address)
    headers["Content-Type"] = "multipart/form-data; boundary=x"
    before = rejected(metrics, "body_too_large")
    answer = raw_head(port, route, headers, huge, b"\xff\xff\xff\xff")
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:300]
    assert rejected(metrics, "body_too_large") == before + 1
    # Just under the limit but from a stranger: refused on its headers, body unsent too.
    stranger = epistula_headers(STRANGER, b"", MINER.ss58_address)
    stranger["Content-Type"] = "multipart/form-data; boundary=x"
    answer = raw_head(port, route, stranger, server.body_limit(route) - 1, b"--x\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b"unknown_signer" in answer, answer[:300]
    # No Content-Length (chunked): refused, a length is what the limit is judged on.
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"POST {route} HTTP/1.1", "Host: miner", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n5\r\nhello\r\n").encode())
    answer = s.recv(65536)
    s.close()
    assert answer.startswith(b"HTTP/1.1 411") and b"length_required" in answer, answer[:300]
    # Not a form at all.
    before = rejected(metrics, "wrong_content_type")
    answer = call(port, "POST", route, b'{"key": 1}', content_type="application/json")
    refused_with(metrics, answer, 415, "wrong_content_type", before)
    assert call(port, "GET", "/get_client").status == 200


def test_compute_refuses_bad_fields_with_reasons(miner_server, uid, ciphertext):
    miner, server, port, metrics = miner_server
    cases = [
        (dict(drop="iterations"), 400, "missing_field"),
        (dict(drop="model_input"), 400, "missing_field"),
        (dict(drop="uid"), 400, "missing_field"),
        (dict(uid="not-a-uid"), 404, "unknown_uid"),
        (dict(signer=OTHER_VALIDATOR), 403, "foreign_uid"),  # another validator's uid
        (dict(iterations=0), 400, "bad_iterations"),
        (dict(iterations=1000), 400, "too_many_iterations"),
        (dict(iterations="five"), 400, "bad_iterations"),
        (dict(ciphertext=b"\x01" * 64), 400, None),  # garbage: the capnp guard names why
        (dict(ciphertext=os.urandom(len(ciphertext))), 400, None),
    ]
    for how, status, reason in cases:
        args = dict(ciphertext=ciphertext, uid=uid, iterations=5)
        args.update({k: v for k, v in how.items() if k in args})
        answer = compute(port, args["ciphertext"], args["uid"], args["iterations"], signer=how.get("signer", VALIDATOR),
                         drop=how.get("drop"), stream=False)
        assert answer.status == status, (how, answer.body[:300])
        if reason is not None:
            assert answer.reason == reason, (how, answer.body[:300])
        else:
            assert answer.reason.startswith(("capnp_", "malformed_ciphertext")), answer.body[:300]
        assert rejected(metrics, answer.reason) >= 1
    assert call(port, "GET", "/get_client").status == 200


def test_add_key_refusals_and_one_upload_per_signer(miner_server, uid):
    miner, server, port, metrics = miner_server
    body, kind = multipart({}, {"uid": "x"})
    answer = call(port, "POST", "/add_key", body, content_type=kind)
    assert (answer.status, answer.reason) == (400, "missing_field")
    assert add_key(port, b"k" * 1000).reason == "malformed_key"
    # An upload of VALIDATOR's in flight (headers passed, body still coming) holds its slot.
    headers = epistula_headers(VALIDATOR, b"", MINER.ss58_address)
    headers["Content-Type"] = "multipart/form-data; boundary=x"
    held = raw_head(port, "/add_key", headers, 1 << 20, b"--x\r\n", hold=True)
    try:
        deadline = time.monotonic() + 10
        while VALIDATOR.ss58_address not in server.uploading and time.monotonic() < deadline:
            time.sleep(0.05)
        before = rejected(metrics, "busy_signer")
        refused_with(metrics, add_key(port, b"k" * 1000), 429, "busy_signer", before)
        assert add_key(port, b"k" * 1000, signer=OTHER_VALIDATOR).reason == "malformed_key"  # others: not held
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while server.uploading and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.uploading
    assert add_key(port, b"k" * 1000).reason == "malformed_key"  # the slot came back
    assert server.refused["short_body"] >= 1


def test_a_miner_still_loading_answers_not_ready(tmp_path):
    settings = NodeSettings(role=Role.MINER, data_dir=tmp_path)
    miner = MinerService(settings, FheConfig(model=MODEL, serve=False))
    metrics = NodeMetrics()
    miner.ctx = RoleContext(settings=settings, hotkey=MINER, genesis=None, mesh=None, store=None,
                            verifier=EnvelopeVerifier(DIRECTORY, MINER.ss58_address), metrics=metrics,
                            data_dir=tmp_path, publish=None, peer_of=lambda hotkey: None)

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(BrainlockHttp(miner, "127.0.0.1", 0).serve)
            answers = [await trio.to_thread.run_sync(lambda: call(port, "GET", "/get_client")),
                       await trio.to_thread.run_sync(lambda: add_key(port, b"k" * 10))]
            nursery.cancel_scope.cancel()
        return answers

    for answer in trio.run(main):
        assert (answer.status, answer.reason) == (503, "not_ready")
    assert rejected(metrics, "not_ready") == 2


def test_sealmesh_client_hears_each_refusal_as_its_label(miner_server, uid, ciphertext):
    from node.fhe_service import ExchangeError
    from node.roles.brainlock_http import BrainlockClient

    _, _, port, _ = miner_server
    client = BrainlockClient(VALIDATOR, MINER.ss58_address, "127.0.0.1", port)
    for call_it, reason in ((lambda: client.add_key(b"k" * 1000), "malformed_key"),
                            (lambda: client.compute("nope", ciphertext, 5, max_chunk_bytes=1 << 22), "unknown_uid"),
                            (lambda: client.compute(uid, ciphertext, 11, max_chunk_bytes=1 << 22),
                             "too_many_iterations"),
                            (lambda: BrainlockClient(STRANGER, MINER.ss58_address, "127.0.0.1", port)
                             .client_zip_matches(b""), "unknown_signer")):
        with pytest.raises(ExchangeError) as info:
            call_it()
        assert info.value.reason == reason


# --- the engine's chained run (fhe.engine.FheEngine.run_chained) --------------------------


@pytest.mark.slow
def test_engine_run_chained_hands_each_output_over_as_computed(bundle, validator_client):
    from concrete.ml.common.serialization.loaders import loads

    from fhe.bundle import REFERENCE_JSON, load_manifest
    from fhe.engine import FheEngine
    from fhe.zoo import chained_reference

    engine = FheEngine(bundle, load_manifest(bundle).server_sha256, max_concurrency=1, timeout_s=60.0,
                       max_iterations=1, max_chained_iterations=3)
    owner = VALIDATOR.ss58_address
    key_id = engine.add_key(owner, validator_client.client.evaluation_keys.serialize())
    x = np.random.default_rng(11).uniform(-1.0, 0.99, (1, 3, 8, 8)).astype(np.float32)
    ciphertext = validator_client.quantize_encrypt_serialize(x)
    seen: list[tuple[int, float, bytes]] = []
    started = time.monotonic()
    last = engine.run_chained(owner, key_id, ciphertext, 3,
                              lambda iteration, output: seen.append((iteration, time.monotonic() - started, output)))
    total = time.monotonic() - started
    assert [i for i, _, _ in seen] == [1, 2, 3] and last == seen[-1][2]
    assert seen[0][1] < 0.7 * total  # handed over when computed, not all at the end
    reference = loads((bundle / REFERENCE_JSON).read_text())
    for (_, _, output), expected in zip(seen, chained_reference(reference, x, 3)):
        got = np.asarray(validator_client.deserialize_decrypt_dequantize(output))
        assert np.mean(np.isclose(got, expected)) >= 0.8  # honest FHE lands a step off in a few entries

    outputs: list[int] = []

    def hang_up(iteration: int, output: bytes) -> None:
        outputs.append(iteration)
        raise ConnectionResetError("the validator hung up")

    with pytest.raises(ConnectionResetError):
        engine.run_chained(owner, key_id, ciphertext, 3, hang_up)
    assert outputs == [1]  # the chain stopped at its first output
    assert engine._slots.acquire(timeout=1)  # ... and gave its slot back
    engine._slots.release()


def test_engine_run_chained_keeps_runs_bounds(miner_server, uid, ciphertext):
    """Iterations, ownership, the slots and the budget, on the miner's own engine (no
    circuit runs: every refusal comes before one)."""
    from fhe.engine import BadIterations, Timeout, TooManyIterations

    miner, server, _, _ = miner_server
    engine, key_id, owner = miner.engine, server.uids[uid].key_id, VALIDATOR.ss58_address
    assert engine.max_chained_iterations == miner.config.brainlock_max_iterations > engine.max_iterations
    with pytest.raises(TooManyIterations):
        engine.run_chained(owner, key_id, ciphertext, engine.max_chained_iterations + 1, lambda *_: None)
    for bad in (0, True, 1.5):
        with pytest.raises(BadIterations):
            engine.run_chained(owner, key_id, ciphertext, bad, lambda *_: None)
    with pytest.raises(Exception) as info:
        engine.run_chained(OTHER_VALIDATOR.ss58_address, key_id, ciphertext, 2, lambda *_: None)
    assert info.value.reason == "foreign_key"
    from fhe.engine import MalformedCiphertext

    with pytest.raises(MalformedCiphertext):  # fhe.capnp_guard's checks, before Concrete reads it
        engine.run_chained(owner, key_id, b"\xff" * 64, 2, lambda *_: None)
    timeout_s = engine.timeout_s
    assert engine._slots.acquire(timeout=30)  # every slot busy
    try:
        engine.timeout_s = 0.2
        started = time.monotonic()
        with pytest.raises(Timeout):
            trio.run(engine.run_chained_async, owner, key_id, ciphertext, 2, lambda *_: None)
        assert time.monotonic() - started < 2.0  # the chain's budget: 2 x 0.2 s, queueing included
    finally:
        engine.timeout_s = timeout_s
        engine._slots.release()


@pytest.mark.slow
def test_compute_streams_a_chain_through_the_engine(miner_server, uid, ciphertext, validator_client):
    miner, server, port, _ = miner_server
    before = server.served["compute"]
    answer = compute(port, ciphertext, uid, 3)
    assert answer.status == 200 and len(answer.chunks) == 3
    outputs = [np.asarray(validator_client.deserialize_decrypt(chunk)) for _, chunk in answer.chunks]
    assert not all(np.array_equal(outputs[0], later) for later in outputs[1:])  # chained, not the same input re-run
    assert server.served["compute"] == before + 1 and miner.pending == 0
