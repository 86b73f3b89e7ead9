"""The CPU savings in node/_libp2p_tuning.py keep the library's answers."""

from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from node._libp2p_tuning import SignedRecordMemo


class FakeHost:
    def __init__(self, name: bytes) -> None:
        self._id = ID(name)

    def get_id(self) -> ID:
        return self._id


def test_signed_record_memo_verifies_each_distinct_record_once():
    calls = []

    def verify(msg, host, peer):
        calls.append(msg.senderRecord)
        return msg.senderRecord != b"forged"

    memo = SignedRecordMemo(verify, capacity=2)
    host, peer = FakeHost(b"h1"), ID(b"p1")
    record = rpc_pb2.RPC(senderRecord=b"record-1")
    assert memo(record, host, peer) and memo(record, host, peer)
    assert calls == [b"record-1"] and memo.hits == 1
    # A failed check is never remembered: it fails every time.
    forged = rpc_pb2.RPC(senderRecord=b"forged")
    assert not memo(forged, host, peer) and not memo(forged, host, peer)
    assert calls.count(b"forged") == 2
    # Another host, or another sender, verifies for itself.
    assert memo(record, FakeHost(b"h2"), peer) and memo(record, host, ID(b"p2"))
    assert calls.count(b"record-1") == 3
    # RPCs without a record pass, as in the library.
    assert memo(rpc_pb2.RPC(), host, peer)


def test_signed_record_memo_reverifies_after_refresh():
    calls = []
    memo = SignedRecordMemo(lambda m, h, p: calls.append(1) or True, refresh_s=0.0)
    rpc = rpc_pb2.RPC(senderRecord=b"r")
    memo(rpc, FakeHost(b"h"), ID(b"p"))
    memo(rpc, FakeHost(b"h"), ID(b"p"))
    assert len(calls) == 2
