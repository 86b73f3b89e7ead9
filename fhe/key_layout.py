"""Evaluation keys must have exactly the layout of keys this circuit makes (issue 11 finding 3).

Concrete does not check evaluation keys against the circuit. Keys of the right size and
framing whose structure lies crash the whole miner: 39 MB with a valid segment table
and every other byte zero deserialize into an empty keyset, and the first run then
aborts the process (a failed `std::vector` bounds assertion in Concrete's keyswitch).

Everything in a serialized ServerKeyset except the key material is fixed by the circuit:
which keys there are, their ids, parameters and compression, the pointers, the segment
sizes. Two keysets generated independently (this module's, and a validator's through
Concrete-ML) match word for word outside their Data blobs; checked on digits-cnn. So the
miner derives the layout once per circuit, from a keyset it generates itself with
random seeds, and accepts only uploads whose layout digest equals it. Only the key
material differs, and Concrete reads that as numbers, never as sizes or indices.

Key generation holds the GIL (1.7 s for digits-cnn, which would stall the node's loop),
so the reference keyset is made in a child process that imports only concrete.fhe, reads
client.specs.json on stdin and writes the evaluation keys to stdout; the parent digests
them: 5-8 s on 2 idle cores, 37 s at load 9. The digest is then kept in the process and
in the bundle directory (LAYOUT_FILE, keyed by the client specs' sha256), so a miner pays
it once per bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from fhe.capnp_guard import CapnpShape, check_capnp_message

_REFERENCE_DIGESTS: dict[str, str] = {}  # sha256 of client.specs.json -> layout digest
_REFERENCE_LOCK = threading.Lock()
REFERENCE_TIMEOUT_S = 300.0
LAYOUT_FILE = "evaluation_key_layout.json"  # beside server.zip: the digest, once per bundle


def layout_digest(buf: bytes, shape: CapnpShape) -> str:
    """sha256 of everything in `buf` but the contents of its Data blobs: the segment
    sizes, where each blob lies and how long it is, and every other byte."""
    digest = hashlib.sha256(json.dumps([shape.segment_words, shape.data_spans]).encode())
    view, at = memoryview(buf), 0
    for offset, length in shape.data_spans:
        digest.update(view[at:offset])
        at = offset + length
    digest.update(view[at:])
    return digest.hexdigest()


# The child imports concrete.fhe alone (not this package, whose __init__ pulls in torch):
# it reads client.specs.json on stdin and writes fresh evaluation keys to stdout.
_CHILD = """
import secrets, sys
from concrete import fhe
client = fhe.Client(fhe.ClientSpecs.deserialize(sys.stdin.buffer.read()))
client.keys.generate(secret_seed=secrets.randbits(128), encryption_seed=secrets.randbits(128))
sys.stdout.buffer.write(client.evaluation_keys.serialize())
"""


def reference_layout_digest(client_specs_json: bytes, cache_dir: Path | None = None) -> str:
    """The layout digest of this circuit's evaluation keys: from this process's cache, from
    `cache_dir`/LAYOUT_FILE when it names the same client specs, else made in a child
    process and written there (best effort: a read-only bundle just recomputes)."""
    specs_sha = hashlib.sha256(client_specs_json).hexdigest()
    with _REFERENCE_LOCK:
        if specs_sha in _REFERENCE_DIGESTS:
            return _REFERENCE_DIGESTS[specs_sha]
        cached = _read_cached(cache_dir, specs_sha)
        if cached is not None:
            _REFERENCE_DIGESTS[specs_sha] = cached
            return cached
        done = subprocess.run([sys.executable, "-c", _CHILD], input=client_specs_json, capture_output=True,
                              timeout=REFERENCE_TIMEOUT_S, check=False)
        if done.returncode != 0 or not done.stdout:
            raise RuntimeError(f"could not make reference evaluation keys (exit {done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-500:]}")
        keys = done.stdout
        digest = layout_digest(keys, check_capnp_message(keys, max_bytes=len(keys)))
        _REFERENCE_DIGESTS[specs_sha] = digest
        _write_cached(cache_dir, specs_sha, digest)
        return digest


def _read_cached(cache_dir: Path | None, specs_sha: str) -> str | None:
    try:
        doc = json.loads((Path(cache_dir) / LAYOUT_FILE).read_text()) if cache_dir else None
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("client_specs_sha256") != specs_sha:
        return None
    digest = doc.get("layout_sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _write_cached(cache_dir: Path | None, specs_sha: str, digest: str) -> None:
    if cache_dir is None:
        return
    target = Path(cache_dir) / LAYOUT_FILE
    tmp = target.with_name(f"{LAYOUT_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"client_specs_sha256": specs_sha, "layout_sha256": digest}) + "\n")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def ensure_layout_file(bundle_dir: Path) -> str:
    """Derive the bundle's evaluation-key layout now (LAYOUT_FILE), e.g. before several
    miners that share the bundle start at once and would each derive it."""
    import zipfile

    with zipfile.ZipFile(Path(bundle_dir) / "server.zip") as archive:
        return reference_layout_digest(archive.read("client.specs.json"), Path(bundle_dir))
