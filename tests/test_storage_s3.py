"""Blob backends against a real S3 server on loopback (`rclone serve s3`), plus the
factory, the Storj gateway path and the native-uplink error path."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from node.storage import (BlobCorrupt, BlobNotFound, BlobStore, BlobTooLarge, InvalidContentId, LocalBlobStore,
                          S3Location, S3Store, S3Tuning, StorageError, StoreConfigError, StoreUnavailable,
                          UplinkStore, content_id, open_store, register_access_grant)

RCLONE = Path(sys.executable).parent / "rclone"
# rclone refuses very short keys (InvalidAccessKeyId), so these are full-length strings.
ACCESS, SECRET = "sealmeshtestaccess", "sealmeshtestsecretkey"
BUCKET = "blobs"
FAST = S3Tuning(max_attempts=2, connect_timeout_s=2, read_timeout_s=30,
                multipart_threshold=8 << 20, multipart_chunksize=8 << 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3 API over a directory: objects are files at DIR/bucket/key."""
    if not RCLONE.exists():
        pytest.skip(f"no rclone binary at {RCLONE}")
    root = tmp_path_factory.mktemp("s3")
    (root / BUCKET).mkdir()
    port = _free_port()
    proc = subprocess.Popen([str(RCLONE), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                             "--auth-key", f"{ACCESS},{SECRET}", "--config", "/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"rclone serve s3 did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
    yield types.SimpleNamespace(root=root, endpoint=f"http://127.0.0.1:{port}")
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _store(server, *, prefix="sealmesh", secret=SECRET, bucket=BUCKET, **kwargs) -> S3Store:
    location = S3Location(bucket=bucket, prefix=prefix, endpoint_url=server.endpoint,
                          access_key=ACCESS, secret_key=secret)
    return S3Store(location, tuning=kwargs.pop("tuning", FAST), **kwargs)


def test_s3_put_get_has_delete_keyed_by_sha256(s3_server):
    store = _store(s3_server, prefix="round/1")
    assert isinstance(store, BlobStore)
    blob = os.urandom(4096)
    cid = store.put(blob)
    assert cid == content_id(blob)
    assert (s3_server.root / BUCKET / "round" / "1" / cid).read_bytes() == blob
    assert store.has(cid) and store.get(cid) == blob
    assert store.put(blob) == cid  # idempotent
    assert store.delete(cid) is True and not store.has(cid) and store.delete(cid) is False


def test_s3_refuses_an_object_corrupted_on_the_server(s3_server):
    store = _store(s3_server, prefix="corrupt")
    blob = b"encrypted update " * 1000
    cid = store.put(blob)
    path = s3_server.root / BUCKET / "corrupt" / cid
    flipped = bytearray(path.read_bytes())
    flipped[100] ^= 0x01  # bit rot, same length
    path.write_bytes(bytes(flipped))
    with pytest.raises(BlobCorrupt) as caught:
        store.get(cid)
    assert caught.value.cid == cid and cid in str(caught.value) and caught.value.reason == "corrupt"
    path.write_bytes(blob[:10])  # truncated under the server: still never returned
    with pytest.raises(StorageError) as caught:
        store.get(cid)
    assert cid in str(caught.value)


def test_s3_missing_object_and_bad_ids(s3_server):
    store = _store(s3_server)
    missing = content_id(b"never stored")
    with pytest.raises(BlobNotFound) as caught:
        store.get(missing)
    assert caught.value.reason == "not_found" and missing in str(caught.value)
    assert not store.has(missing) and store.delete(missing) is False
    with pytest.raises(InvalidContentId, match="content id"):
        store.get("../../etc/passwd")
    with pytest.raises(InvalidContentId):
        store.has("A" * 64)  # upper-case hex is not our id form


def test_s3_big_blob_goes_up_in_parts(s3_server):
    store = _store(s3_server, prefix="big")
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    blob = os.urandom(20 << 20)
    started = time.perf_counter()
    cid = store.put(blob)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    assert store.get(cid) == blob
    get_s = time.perf_counter() - started
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3
    assert "CompleteMultipartUpload" in calls and "PutObject" not in calls
    print(f"20 MiB: put {put_s:.2f} s ({len(calls)} calls), get {get_s:.2f} s")


def test_s3_size_limits(s3_server):
    small = _store(s3_server, prefix="limits", max_blob_bytes=1000)
    with pytest.raises(BlobTooLarge) as caught:
        small.put(bytes(1001))
    assert caught.value.reason == "too_large"
    cid = _store(s3_server, prefix="limits").put(os.urandom(5000))
    with pytest.raises(BlobTooLarge, match=cid):
        small.get(cid)  # refused from Content-Length, before reading the body


def test_s3_wrong_credentials_are_a_clear_error(s3_server):
    good = _store(s3_server, prefix="auth")
    cid = good.put(b"secret adapter")
    bad = _store(s3_server, prefix="auth", secret="not-the-secret-key")
    for operation in (lambda: bad.get(cid), lambda: bad.has(cid), lambda: bad.put(b"x")):
        with pytest.raises(StoreUnavailable) as caught:
            operation()
        assert caught.value.reason == "access_denied" and "credentials" in str(caught.value)


def test_s3_missing_bucket_and_unreachable_endpoint(s3_server, tmp_path):
    store = _store(s3_server, bucket="no-such-bucket")
    with pytest.raises(StoreUnavailable) as caught:
        store.put(b"x")
    assert caught.value.reason == "no_bucket" and "no-such-bucket" in str(caught.value)
    store.ensure_bucket()
    assert store.get(store.put(b"x")) == b"x"
    dead = S3Store(S3Location(bucket=BUCKET, endpoint_url=f"http://127.0.0.1:{_free_port()}",
                              access_key=ACCESS, secret_key=SECRET),
                   tuning=S3Tuning(max_attempts=2, connect_timeout_s=1))
    with pytest.raises(StoreUnavailable) as caught:
        dead.get(content_id(b"x"))
    assert caught.value.reason == "unreachable"


def test_s3_location_rejects_half_credentials():
    with pytest.raises(StoreConfigError) as caught:
        S3Location(bucket="b", access_key="only-the-key")
    assert caught.value.reason == "missing_credentials"
    with pytest.raises(StoreConfigError, match="bucket"):
        S3Location(bucket="a/b")


# --- local store: the same interface and rules ---------------------------------------------

def test_local_store_limits_delete_and_repair(tmp_path):
    store = LocalBlobStore(tmp_path, max_blob_bytes=100)
    assert isinstance(store, BlobStore)
    with pytest.raises(BlobTooLarge):
        store.put(bytes(101))
    cid = store.put(b"weights")
    (tmp_path / cid[:2] / cid).write_bytes(b"WEIGHTS")
    with pytest.raises(BlobCorrupt, match=cid):
        store.get(cid)
    assert store.put(b"weights") == cid and store.get(cid) == b"weights"  # put rewrites a damaged copy
    (tmp_path / cid[:2] / cid).write_bytes(bytes(200))
    with pytest.raises(BlobTooLarge, match=cid):
        store.get(cid)
    assert store.delete(cid) and not store.has(cid) and not store.delete(cid)
    with pytest.raises(BlobNotFound) as caught:
        store.get(cid)
    assert isinstance(caught.value, KeyError) and str(caught.value).startswith("no blob")


# --- factory ---------------------------------------------------------------------------------

def _s3_env(**extra: str) -> dict[str, str]:
    return {"SEALMESH_S3_ACCESS_KEY": ACCESS, "SEALMESH_S3_SECRET_KEY": SECRET, **extra}


def test_open_store_local_and_file(tmp_path):
    store = open_store(None, tmp_path, env={})
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "blobs"
    elsewhere = open_store(f"file://{tmp_path / 'other'}", tmp_path, env={})
    assert elsewhere.get(elsewhere.put(b"a")) == b"a" and (tmp_path / "other").is_dir()
    for spec, reason in (("file://relative/path", "bad_spec"), ("ipfs://x", "bad_spec"), ("nope", "bad_spec")):
        with pytest.raises(StoreConfigError) as caught:
            open_store(spec, tmp_path, env={})
        assert caught.value.reason == reason


def test_open_store_s3_spec(s3_server, tmp_path):
    spec = f"s3://{BUCKET}/factory/blobs?endpoint={s3_server.endpoint}"
    store = open_store(spec, tmp_path, env=_s3_env())
    assert isinstance(store, S3Store) and store.location.prefix == "factory/blobs"
    cid = store.put(b"from the factory")
    assert (s3_server.root / BUCKET / "factory" / "blobs" / cid).exists()
    aws_named = open_store(spec, tmp_path, env={"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert aws_named.get(cid) == b"from the factory"
    with pytest.raises(StoreConfigError, match="SEALMESH_S3_SECRET_KEY") as caught:
        open_store(spec, tmp_path, env={"SEALMESH_S3_ACCESS_KEY": ACCESS})
    assert caught.value.reason == "missing_credentials"
    with pytest.raises(StoreConfigError, match="unknown s3 spec option") as caught:
        open_store(spec + "&secret=leaked", tmp_path, env=_s3_env())
    with pytest.raises(StoreConfigError, match="bucket"):
        open_store("s3:///prefix", tmp_path, env=_s3_env())


def test_s3_without_any_credentials_says_what_to_set(tmp_path, monkeypatch):
    # Block boto3's fallbacks (shared files, instance metadata) so "none" means none.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store(f"s3://{BUCKET}?endpoint=http://127.0.0.1:{_free_port()}", tmp_path, env={})
    with pytest.raises(StoreConfigError, match="SEALMESH_S3_ACCESS_KEY") as caught:
        store.get(content_id(b"x"))
    assert caught.value.reason == "missing_credentials"


# --- Storj -----------------------------------------------------------------------------------

def test_storj_needs_bucket_and_credentials(tmp_path):
    with pytest.raises(StoreConfigError, match="MY_BUCKET"):
        open_store("storj", tmp_path, env={})
    with pytest.raises(StoreConfigError) as caught:
        open_store("storj", tmp_path, env={"MY_BUCKET": "b"})
    assert caught.value.reason == "missing_credentials"
    assert "uplink access register" in str(caught.value) and "SEALMESH_S3_ACCESS_KEY" in str(caught.value)
    with pytest.raises(StoreConfigError, match="go together"):
        open_store("storj", tmp_path, env={"MY_BUCKET": "b", "SEALMESH_S3_ACCESS_KEY": ACCESS})


def test_storj_gateway_with_s3_keys(s3_server, tmp_path):
    # The hosted gateway speaks plain S3; pointing SEALMESH_S3_ENDPOINT at our server
    # exercises exactly the requests a node sends to gateway.storjshare.io.
    env = _s3_env(MY_BUCKET=BUCKET, SEALMESH_S3_ENDPOINT=s3_server.endpoint)
    store = open_store("storj", tmp_path, env=env)
    assert isinstance(store, S3Store) and store.location.prefix == "sealmesh/blobs"
    cid = store.put(b"storj blob")
    assert (s3_server.root / BUCKET / "sealmesh" / "blobs" / cid).exists()
    named = open_store(f"storj://{BUCKET}/mesh-a", tmp_path, env=env)
    assert named.location.prefix == "mesh-a" and not named.has(cid)


class _AuthService(http.server.BaseHTTPRequestHandler):
    """Storj's auth service API: POST /v1/access {access_grant, public} -> S3 credentials."""

    endpoint = ""
    grants: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).grants.append(body)
        if self.path != "/v1/access" or body.get("access_grant") != "1GoodGrant":
            self._reply(400, {"error": "invalid access grant"})
            return
        self._reply(200, {"access_key_id": ACCESS, "secret_key": SECRET, "endpoint": self.endpoint})

    def _reply(self, status, doc):
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_service(s3_server):
    _AuthService.endpoint, _AuthService.grants = s3_server.endpoint, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_storj_access_grant_is_registered_for_gateway_keys(auth_service, tmp_path):
    env = {"MY_BUCKET": BUCKET, "SEALMESH_STORJ_ACCESS": "1GoodGrant", "SEALMESH_STORJ_AUTH_SERVICE": auth_service}
    store = open_store("storj", tmp_path, env=env)
    assert _AuthService.grants == [{"access_grant": "1GoodGrant", "public": False}]
    assert store.get(store.put(b"via a registered grant")) == b"via a registered grant"
    with pytest.raises(StoreUnavailable) as caught:
        register_access_grant("1WrongGrant", auth_service=auth_service)
    assert caught.value.reason == "register_refused" and "invalid access grant" in str(caught.value)
    with pytest.raises(StoreConfigError):
        register_access_grant("not a grant!", auth_service=auth_service)
    with pytest.raises(StoreUnavailable) as caught:
        register_access_grant("1GoodGrant", auth_service=f"http://127.0.0.1:{_free_port()}", timeout_s=2)
    assert caught.value.reason == "unreachable"


MY_ENV = {"MY_API_KEY": "13Yq-api-key", "MY_SATELLITE": "12EayR@us1.storj.io:7777",
          "MY_ENCRYPTION_PASSPHRASE": "correct horse", "MY_BUCKET": "sealmesh"}


def test_uplink_store_without_the_package_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uplink_python", None)  # as on a machine without it
    monkeypatch.setitem(sys.modules, "uplink_python.uplink", None)
    with pytest.raises(StoreConfigError) as caught:
        open_store("storj", tmp_path, env=MY_ENV)
    assert caught.value.reason == "uplink_missing"
    assert "libuplinkc.so" in str(caught.value) and "SEALMESH_S3_ACCESS_KEY" in str(caught.value)
    with pytest.raises(StoreConfigError, match="MY_ENCRYPTION_PASSPHRASE") as caught:
        UplinkStore(satellite="s", api_key="k", passphrase="", bucket="b")
    assert caught.value.reason == "missing_credentials"


def test_uplink_store_without_the_native_library(tmp_path, monkeypatch):
    # uplink-python installed but libuplinkc.so absent: its Uplink() raises LibUplinkSoError
    # (code 0x9999), which is what this stand-in package reproduces.
    package = tmp_path / "pkgs" / "uplink_python"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "uplink.py").write_text(
        "class LibUplinkSoError(Exception):\n"
        "    code = 0x9999\n"
        "    details = 'libuplinkc.so not found'\n"
        "class Uplink:\n"
        "    def __init__(self):\n"
        "        raise LibUplinkSoError('libuplinkc.so not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    for name in ("uplink_python", "uplink_python.uplink"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(StoreConfigError) as caught:
        open_store("storj", tmp_path, env=MY_ENV)
    assert caught.value.reason == "uplink_missing" and "native library" in str(caught.value)


def test_storage_errors_carry_reason_and_hint():
    error = BlobNotFound("no blob x", cid="x")
    assert error.reason == "not_found" and error.hint == "no blob x" and error.cid == "x"
    assert "reason='not_found'" in repr(error)
