"""Named tensors as canonical safetensors bytes: equal tensors, equal cids; untrusted bytes checked."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from node.storage import LocalBlobStore, content_id
from node.storage.tensors import (FORMAT_KEY, MAX_TENSORS, TensorDecodeError, TensorEncodeError, decode_tensors,
                                  decode_torch_tensors, decode_vector, encode_tensors, encode_vector, get_tensors,
                                  put_tensors)
from protocol.errors import LocalProtocolError, RemoteProtocolError

META = {"round": "7", "base_adapter": "ab" * 32, "layout": "q16x4", "kind": "delta"}


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"lora_A": rng.standard_normal((8, 4)).astype(np.float32),
            "lora_B": rng.standard_normal((4, 8)).astype(np.float16),
            "packed": rng.integers(0, 2**63, 5, dtype=np.uint64),
            "mask": rng.integers(0, 2, 6).astype(bool)}


def test_round_trip_keeps_names_values_dtypes_and_metadata():
    tensors = _tensors()
    decoded = decode_tensors(encode_tensors(tensors, metadata=META))
    assert decoded.metadata == META and set(decoded.tensors) == set(tensors)
    for name, value in tensors.items():
        assert decoded.tensors[name].dtype == value.dtype and np.array_equal(decoded.tensors[name], value)


def test_equal_tensors_give_equal_bytes_whatever_the_order_or_layout():
    tensors = _tensors()
    reordered = dict(reversed(list(tensors.items())))
    relaid = {name: np.asfortranarray(value.astype(value.dtype.newbyteorder(">"))) for name, value in tensors.items()}
    blobs = {encode_tensors(t, metadata=m) for t, m in ((tensors, META), (reordered, dict(reversed(META.items()))),
                                                         (relaid, META))}
    assert len(blobs) == 1
    changed = {**tensors, "lora_A": tensors["lora_A"] + np.float32(1e-3)}
    assert encode_tensors(changed, metadata=META) not in blobs
    assert encode_tensors(tensors, metadata={**META, "round": "8"}) not in blobs


_ENCODE_IN_A_FRESH_PROCESS = """
import sys, numpy as np
from node.storage.tensors import encode_tensors
rng = np.random.default_rng(1)
t = {"b": rng.standard_normal(16).astype(np.float32), "a": np.arange(9, dtype=np.int64).reshape(3, 3)}
sys.stdout.write(encode_tensors(t, metadata={"x": "1", "y": "2", "z": "3", "w": "4"}).hex())
"""


def test_bytes_are_identical_across_processes():
    # safetensors writes __metadata__ from a Rust HashMap whose order is random per process;
    # several raw metadata keys would give different bytes run to run. Ours must not.
    runs = {subprocess.run([sys.executable, "-c", _ENCODE_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                           check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent)).stdout
            for _ in range(2)}
    assert len(runs) == 1
    decoded = decode_tensors(bytes.fromhex(runs.pop()))
    assert decoded.metadata == {"w": "4", "x": "1", "y": "2", "z": "3"}


def test_store_helpers_content_address_tensors(tmp_path):
    store = LocalBlobStore(tmp_path)
    cid = put_tensors(store, _tensors(), metadata=META)
    assert put_tensors(store, dict(reversed(list(_tensors().items()))), metadata=META) == cid
    assert cid == content_id(encode_tensors(_tensors(), metadata=META))
    assert np.array_equal(get_tensors(store, cid).tensors["packed"], _tensors()["packed"])


def test_vectors():
    vector = np.arange(1000, dtype=np.int64) * 7
    blob = encode_vector(vector, metadata={"clip": "1.0"})
    assert np.array_equal(decode_vector(blob, dtype=np.int64, length=1000), vector)
    with pytest.raises(TensorDecodeError) as caught:
        decode_vector(blob, length=999)
    assert caught.value.reason == "wrong_length"
    with pytest.raises(TensorDecodeError) as caught:
        decode_vector(blob, dtype=np.float32)
    assert caught.value.reason == "wrong_dtype"
    with pytest.raises(TensorDecodeError) as caught:
        decode_vector(encode_tensors(_tensors()))
    assert caught.value.reason == "too_many"
    with pytest.raises(TensorDecodeError) as caught:
        decode_vector(encode_tensors({"vector": np.zeros((2, 2))}))
    assert caught.value.reason == "not_a_vector"
    with pytest.raises(TensorEncodeError) as caught:
        encode_vector(np.zeros((2, 2)))
    assert caught.value.reason == "not_a_vector"


@pytest.mark.parametrize("tensors, metadata, reason", [
    ({}, None, "empty"),
    ({"": np.zeros(1)}, None, "bad_name"),
    ({"__metadata__": np.zeros(1)}, None, "bad_name"),
    ({"x": np.array(["a", "b"])}, None, "bad_dtype"),
    ({"x": np.zeros(2, dtype=np.complex64)}, None, "bad_dtype"),
    ({"x": np.array([object()])}, None, "bad_dtype"),
    ({"x": [1.0, 2.0]}, None, "bad_tensor"),
    ({"x": np.zeros(1)}, {"round": 7}, "bad_metadata"),
])
def test_encoding_refuses_what_has_no_canonical_form(tensors, metadata, reason):
    with pytest.raises(TensorEncodeError) as caught:
        encode_tensors(tensors, metadata=metadata)
    assert caught.value.reason == reason and isinstance(caught.value, LocalProtocolError)


def _with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


_OURS = {FORMAT_KEY: json.dumps({"version": 1, "metadata": {}})}


@pytest.mark.parametrize("blob, reason", [
    (b"", "truncated"),
    (b"\x00" * 7, "truncated"),
    ((10**9).to_bytes(8, "little") + b"{}", "bad_header"),
    ((4).to_bytes(8, "little") + b"\xff\xfe{}", "bad_header"),
    (_with_header([]), "bad_header"),
    ((2).to_bytes(8, "little") + b"[]", "bad_header"),
    ((60).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":1}',
     "bad_header"),  # duplicate key
    (_with_header({"__metadata__": _OURS, "x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
     "bad_dtype"),
    (_with_header({"__metadata__": _OURS, "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(4)),
     "bad_tensors"),
    (_with_header({"__metadata__": _OURS, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
     "bad_tensors"),
    (_with_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "bad_format"),
    (_with_header({"__metadata__": {FORMAT_KEY: "{not json"}}), "bad_format"),
    (_with_header({"__metadata__": {FORMAT_KEY: json.dumps({"version": 2, "metadata": {}})}}), "bad_version"),
    (_with_header({"__metadata__": {FORMAT_KEY: json.dumps({"version": 1, "metadata": {"a": 1}})}}), "bad_format"),
    (_with_header({"__metadata__": {**_OURS, "extra": "x"}}), "bad_format"),
])
def test_untrusted_bytes_are_refused_with_a_reason(blob, reason):
    with pytest.raises(TensorDecodeError) as caught:
        decode_tensors(blob)
    assert caught.value.reason == reason and isinstance(caught.value, RemoteProtocolError)


def test_pickles_and_foreign_safetensors_are_refused():
    with pytest.raises(TensorDecodeError):
        decode_tensors(pickle.dumps({"w": np.zeros(3)}))
    plain = safetensors.numpy.save({"w": np.zeros(3, dtype=np.float32)}, metadata={"format": "pt"})
    with pytest.raises(TensorDecodeError) as caught:
        decode_tensors(plain)
    assert caught.value.reason == "bad_format"


def test_tensor_count_limit():
    many = {f"t{i}": np.zeros(1, dtype=np.uint8) for i in range(20)}
    assert len(decode_tensors(encode_tensors(many)).tensors) == 20
    with pytest.raises(TensorDecodeError) as caught:
        decode_tensors(encode_tensors(many), max_tensors=19)
    assert caught.value.reason == "too_many" and MAX_TENSORS > 20


def test_torch_tensors_share_the_numpy_encoding_and_keep_bfloat16():
    torch = pytest.importorskip("torch")
    tensors = _tensors()
    as_torch = {name: torch.from_numpy(value.copy()) for name, value in tensors.items()}
    assert encode_tensors(as_torch, metadata=META) == encode_tensors(tensors, metadata=META)
    base = torch.arange(12, dtype=torch.float32)
    views = {"first": base[:6], "second": base[6:].view(2, 3)}  # one storage: safetensors alone refuses
    decoded = decode_torch_tensors(encode_tensors(views))
    assert torch.equal(decoded.tensors["second"], base[6:].view(2, 3))
    adapter = {"lora_A": torch.randn(4, 8, dtype=torch.bfloat16)}
    blob = encode_tensors(adapter, metadata={"dtype": "bf16"})
    back = decode_torch_tensors(blob)
    assert back.tensors["lora_A"].dtype == torch.bfloat16 and torch.equal(back.tensors["lora_A"], adapter["lora_A"])
    with pytest.raises(TensorDecodeError):
        decode_tensors(blob)  # numpy has no bfloat16: a typed error, not a crash
    with pytest.raises(TensorEncodeError):
        encode_tensors({"z": torch.zeros(2, dtype=torch.complex64)})
