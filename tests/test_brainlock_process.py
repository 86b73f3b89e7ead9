"""A Brainlock validator's whole flow against a REAL miner process (issue 13, first proof).

The miner is started the way a user starts one: `python -m node.cli node --config
node.toml` (node/testnet.py's _spawn), its genesis and wallets written by
node.testnet.prepare, and DATA_DIR/fhe.json naming the model synthetic-cnv-tiny and
`brainlock_port` 0 (any free port): the test learns the port from the miner's published
ModelOffer (its /status shows the last one), as a validator does. Nothing of the miner
runs in this process.

The client below is written from the subnet's wire format only; of sealmesh it uses the
sr25519 signing primitive (crypto.identity.Hotkey.sign) and the validator's OWN compiled
bundle (a Brainlock validator compiles its own client and never trusts /get_client):
    Epistula v2 headers: Epistula-Version "2", -Timestamp (ms), -Uuid, -Signed-By (ss58),
        -Signed-For (the miner's ss58), -Request-Signature "0x" + sr25519 over
        "{sha256(body).hex}.{uuid}.{timestamp}.{signed_for}"
    GET  /get_client                     -> the client.zip bytes
    POST /add_key   multipart file "key" -> {"uid": ...}
    POST /compute   multipart file "model_input", fields "uid", "iterations"
        -> per iteration: u32 little-endian length + a bare serialized ciphertext (that
           iteration's output, fed back as the next one's input), then a 0 length.
Every chunk is decrypted with the validator's own client and compared with (a) the
torch model run chained the same number of times and (b) the quantized module chained in
the clear (what the composable circuit computes: fhe.zoo.chained_reference says why the
two part from iteration 2). The transcript is printed and written to
/tmp/sealmesh-artifacts/brainlock-process-<iterations>.txt.

Both runs are marked slow: starting the miner process (Concrete's import, the circuit's
load) took 68 s and one iteration of the tiny circuit ~20 s on the busy 2-core machine, so
even the 2-iteration variant (~110 s with its miner) is over the CI budget. Run them with
SEALMESH_SLOW=1; the in-process routes stay in CI (tests/test_brainlock_http.py).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from node.fhe_service import FheConfig, write_fhe_config
from node.testnet import TestnetPlan, prepare
from node.wallet import load_hotkey
from tests.nodes import _spawn, _stop_all, http_get, wait_ready
from tests.test_brainlock_http import shared_tiny_bundle

MODEL = "synthetic-cnv-tiny"
ARTIFACTS = Path("/tmp/sealmesh-artifacts")
MINER_LOAD_TIMEOUT_S = 240.0


# --- the subnet's wire format, by hand ------------------------------------------------


def epistula(signer, body: bytes, signed_for: str) -> dict[str, str]:
    timestamp, request_uuid = str(int(time.time() * 1000)), str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{request_uuid}.{timestamp}.{signed_for}"
    return {"Epistula-Version": "2", "Epistula-Timestamp": timestamp, "Epistula-Uuid": request_uuid,
            "Epistula-Signed-By": signer.ss58_address, "Epistula-Signed-For": signed_for,
            "Epistula-Request-Signature": "0x" + signer.sign(message.encode()).hex()}


def form(files: dict[str, bytes], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out: list[bytes] = []
    for name, data in files.items():
        out += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="file"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    for name, value in fields.items():
        out += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
                value.encode(), b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, signer, miner: str, body: bytes = b"",
            content_type: str | None = None, stream: bool = False):
    """(status, body) or, streamed, (status, [(seconds since sent, chunk)...], total s)."""
    headers = epistula(signer, body, miner)
    if content_type:
        headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        sent = time.monotonic()
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        if not stream or response.status != 200:
            return response.status, response.read()
        chunks = []
        while True:
            length = int.from_bytes(response.read(4), "little")
            if length == 0:
                return 200, chunks, time.monotonic() - sent
            data = response.read(length)
            assert len(data) == length, f"chunk {len(chunks) + 1} cut after {len(data)} of {length} bytes"
            chunks.append((time.monotonic() - sent, data))
    finally:
        conn.close()


# --- a miner process ------------------------------------------------------------------


def offered_port(miner, timeout_s: float) -> int:
    """The Brainlock port the miner's published ModelOffer names (its /status shows the
    last offer): fhe.json asks for port 0, so only the offer says where the server is."""
    log = miner.data_dir / "node.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if miner.process.poll() is not None:
            raise RuntimeError(f"the miner exited: {log.read_text()[-3000:]}")
        status, body = http_get(miner.api_port, "/status")
        if status == 200:
            port = (json.loads(body).get("sections", {}).get("fhe") or {}).get("offered_brainlock_port")
            if port:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening
                return port
        time.sleep(0.5)
    raise TimeoutError(f"no ModelOffer with a Brainlock port after {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def miner_process(tmp_path_factory):
    bundle = shared_tiny_bundle(tmp_path_factory.getbasetemp().parent / "sealmesh-fhe-cache")
    root = tmp_path_factory.mktemp("brainlock-process")
    validator, miner = prepare(TestnetPlan(validators=1, trainers=0, miners=1, pings=0, directory=root))
    # port 0: the miner binds any free port and its signed ModelOffer names the one it got
    write_fhe_config(miner.data_dir, FheConfig(model=MODEL, bundle_dir=str(bundle), brainlock_port=0))
    miner.process = _spawn(miner)
    try:
        wait_ready(miner, timeout_s=MINER_LOAD_TIMEOUT_S)
        port = offered_port(miner, MINER_LOAD_TIMEOUT_S)
        yield bundle, port, miner, load_hotkey("testnet", validator.name, root / "wallets")
    finally:
        _stop_all([miner])


@pytest.fixture(scope="module")
def own_client(miner_process):
    """The validator's own client, from the bundle it compiled, with fresh keys."""
    import secrets

    from concrete.ml.deployment import FHEModelClient

    bundle = miner_process[0]
    client = FHEModelClient(str(bundle), key_dir=None)
    client.client.keys.generate(secret_seed=secrets.randbits(128), encryption_seed=secrets.randbits(128))
    return client


def cosine(a, b) -> float | None:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return round(float(a @ b / norm), 4) if norm else None


def run_flow(miner_process, own_client, iterations: int) -> list[str]:
    import torch
    from concrete.ml.common.serialization.loaders import loads

    from fhe.bundle import CLIENT_ZIP, REFERENCE_JSON
    from fhe.zoo import chained_reference, get_model

    bundle, port, miner, validator = miner_process
    lines = [f"miner process pid {miner.process.pid} ({MODEL}), Brainlock HTTP on 127.0.0.1:{port} "
             "(its ModelOffer's port), "
             f"miner hotkey {miner.hotkey}, validator {validator.ss58_address}"]

    status, client_zip = request(port, "GET", "/get_client", validator, miner.hotkey)
    assert status == 200, client_zip[:300]
    ours = (bundle / CLIENT_ZIP).read_bytes()
    digest = hashlib.sha256(client_zip).hexdigest()[:16]
    lines.append(f"GET /get_client -> {status}, {len(client_zip)} bytes, sha256 {digest}"
                 f" (= our own compiled client: {client_zip == ours}; we decrypt with ours either way)")

    keys = own_client.client.evaluation_keys.serialize()
    body, kind = form({"key": keys}, {})
    started = time.monotonic()
    status, answer = request(port, "POST", "/add_key", validator, miner.hotkey, body, kind)
    assert status == 200, answer[:300]
    uid = json.loads(answer)["uid"]
    lines.append(f"POST /add_key ({len(keys)} bytes of evaluation keys) -> {status} uid {uid} "
                 f"in {time.monotonic() - started:.2f} s")

    x = np.random.default_rng(2026).uniform(-1.0, 0.99, (1, 3, 8, 8)).astype(np.float32)
    body, kind = form({"model_input": own_client.quantize_encrypt_serialize(x)},
                      {"uid": uid, "iterations": str(iterations)})
    status, chunks, total = request(port, "POST", "/compute", validator, miner.hotkey, body, kind, stream=True)
    assert status == 200, chunks[:300]
    assert len(chunks) == iterations, f"{len(chunks)} chunks for {iterations} iterations"
    arrivals = [at for at, _ in chunks]
    lines.append(f"POST /compute iterations={iterations} -> {status}, {len(chunks)} chunks + terminator in "
                 f"{total:.2f} s; arrivals {[round(a, 2) for a in arrivals]} s; chunk bytes "
                 f"{[len(c) for _, c in chunks]}")
    first = max(1, int(0.2 * iterations))
    lines.append(f"Brainlock's streaming check (first 20 % of chunks before 70 % of the time): "
                 f"{arrivals[first - 1]:.2f} s <= {0.7 * total:.2f} s: {arrivals[first - 1] <= 0.7 * total}")

    reference = loads((bundle / REFERENCE_JSON).read_text())
    circuit_chain = chained_reference(reference, x, iterations)
    model = get_model(MODEL).build(None)
    torch_x = torch.tensor(x)
    lines.append("iteration | cosine vs torch chain | argmax(ch) = torch | cosine vs clear circuit chain | "
                 "argmax(ch) = circuit | entries = circuit")
    rows = []
    for i, (_, chunk) in enumerate(chunks, 1):
        fhe_out = np.asarray(own_client.deserialize_decrypt_dequantize(chunk))
        with torch.no_grad():
            torch_x = model(torch_x)
        torch_out = torch_x.value.numpy() if hasattr(torch_x, "value") else torch_x.numpy()
        circuit = circuit_chain[i - 1]
        # The subnet's prediction is the channel argmax of every pixel (axis 1).
        row = (i, cosine(fhe_out, torch_out),
               round(float(np.mean(np.argmax(fhe_out, 1) == np.argmax(torch_out, 1))), 3),
               cosine(fhe_out, circuit),
               round(float(np.mean(np.argmax(fhe_out, 1) == np.argmax(circuit, 1))), 3),
               round(float(np.mean(np.isclose(fhe_out, circuit))), 3))
        rows.append(row)
        lines.append(" | ".join(str(v) for v in row))
    transcript = "\n".join(lines)
    print("\n" + transcript)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"brainlock-process-{iterations}.txt").write_text(transcript + "\n")

    assert arrivals == sorted(arrivals) and arrivals[0] < 0.7 * total  # streamed, not all at the end
    assert rows[0][1] >= 0.9 and rows[0][2] >= 0.6  # iteration 1 is the torch model's (4-bit outputs tie)
    # Every chunk is the chained circuit's output: honest FHE lands a step off in a few entries.
    assert all(entries >= 0.8 for *_, entries in rows), rows
    assert not all(np.array_equal(circuit_chain[0], later) for later in circuit_chain[1:])  # really chained
    return lines


@pytest.mark.slow
def test_brainlock_validator_flow_against_a_miner_process_2_iterations(miner_process, own_client):
    run_flow(miner_process, own_client, 2)


@pytest.mark.slow
def test_brainlock_validator_flow_against_a_miner_process_5_iterations(miner_process, own_client):
    run_flow(miner_process, own_client, 5)


@pytest.mark.slow
def test_a_sealmesh_validator_process_challenges_a_miner_over_its_offered_brainlock_port(tmp_path,
                                                                                       tmp_path_factory):
    """A validator process and a miner process on the mesh, no brainlock_endpoints.json:
    the miner's signed ModelOffer names its Brainlock port, the validator dials it on the
    host the miner announced, and scores every chunk of the chained /compute."""
    import shutil

    from node.roles.challenger import BRAINLOCK_ENDPOINTS_FILE
    from node.testnet import _watch, build_report
    from test_miner import shared_digits_bundle

    bundle = shared_tiny_bundle(tmp_path_factory.getbasetemp().parent / "sealmesh-fhe-cache")
    root = tmp_path / "tn"
    (root / "fhe").mkdir(parents=True)  # prepare's digits bundle, copied, not compiled
    shutil.copytree(shared_digits_bundle(tmp_path_factory), root / "fhe" / "bundle-digits-cnn")
    plan = TestnetPlan(validators=1, trainers=0, miners=1, pings=1, epochs=1, directory=root, timeout_s=420)
    nodes = prepare(plan)
    validator, miner = nodes
    for node in nodes:
        write_fhe_config(node.data_dir, FheConfig(model=MODEL, bundle_dir=str(bundle), iterations=2,
                                                  response_timeout_s=300.0, brainlock_port=0))
    assert not (validator.data_dir / BRAINLOCK_ENDPOINTS_FILE).exists()
    try:
        for node in nodes:
            node.process = _spawn(node)
        _watch(plan, nodes, deadline=time.monotonic() + plan.timeout_s)
    finally:
        _stop_all(nodes)
    report = build_report(plan, nodes, True, 0.0)
    fhe = report["fhe"]
    outcomes = json.loads((validator.data_dir / "status.json").read_text())["sections"]["fhe"]["outcomes"]
    print(json.dumps({"miners": fhe["miners"], "outcomes": outcomes}, indent=1))
    served = json.loads((miner.data_dir / "status.json").read_text())["sections"]["fhe"]["served"]
    assert served.get("brainlock_add_key") == 1 and served.get("brainlock_compute") == 1, served  # over HTTP
    assert "fhe_challenge" not in served  # not over libp2p
    assert [o["outcome"] for o in outcomes] == ["ok"], outcomes
