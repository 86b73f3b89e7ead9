"""The strict msgpack reader for the protocol's own modules (messages, envelopes, blobs,
the head's snapshots and transactions).

Defined in crypto/wire.py, because crypto/ decodes its own encodings with it and may not
import protocol/; outside protocol/ import it from crypto.wire.
"""

from __future__ import annotations

from crypto.wire import unpack_strict

__all__ = ["unpack_strict"]
