"""The locked stack works together in one process, despite the protobuf override.

concrete-ml 1.9.0 declares protobuf<6 while libp2p 0.8.1's generated code needs
protobuf>=6.31 (see deps/overrides.txt). This test exercises both sides in one
interpreter, so a version bump that breaks either is caught here first.
"""

import numpy as np
import pytest
from google import protobuf


def test_protobuf_is_the_overridden_version():
    major, minor = (int(x) for x in protobuf.__version__.split(".")[:2])
    assert (major, minor) >= (6, 31), protobuf.__version__


def test_libp2p_protobuf_messages_round_trip():
    from libp2p.pubsub.pb import rpc_pb2

    rpc = rpc_pb2.RPC()
    msg = rpc.publish.add()
    msg.data, msg.topicIDs[:] = b"payload", ["/sealmesh/t/1/membership"]
    parsed = rpc_pb2.RPC.FromString(rpc.SerializeToString())
    assert parsed.publish[0].data == b"payload"


def test_concrete_ml_compiles_and_runs_in_fhe_next_to_libp2p(tmp_path):
    import libp2p  # noqa: F401  (both sides loaded in one interpreter)
    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer
    from concrete.ml.sklearn import LogisticRegression
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x[:200].astype(np.float32), (y[:200] % 2)
    model = LogisticRegression(n_bits=4).fit(x, y)
    model.compile(x[:50])
    clear = model.predict(x[:1])
    assert np.array_equal(model.predict(x[:1], fhe="execute"), clear)

    FHEModelDev(str(tmp_path / "bundle"), model).save()
    client = FHEModelClient(str(tmp_path / "bundle"), key_dir=str(tmp_path / "keys"))
    server = FHEModelServer(str(tmp_path / "bundle"))
    server.load()
    encrypted = client.quantize_encrypt_serialize(x[:1])
    result = server.run(encrypted, client.get_serialized_evaluation_keys())
    decrypted = client.deserialize_decrypt_dequantize(result)
    assert np.argmax(decrypted, axis=1).tolist() == clear.tolist()
