"""Settlement backends: the embedded multi-signed head in SQLite (default), a hydra-node client."""

from node.settlement.embedded import EmbeddedHead, Outbound

__all__ = ["EmbeddedHead", "Outbound"]
