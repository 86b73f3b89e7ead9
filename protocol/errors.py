"""The two kinds of protocol error, after h11: our own misuse vs a peer's bad input.

Defined in crypto/errors.py (crypto/ raises them too and may not import protocol/);
this is where the protocol and the node import them from.
"""

from __future__ import annotations

from crypto.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["LocalProtocolError", "RemoteProtocolError"]
