"""Settlement backends: the embedded multi-signed head in SQLite (default), a hydra-node client.

The role service that runs them in a node is node/roles/settlement.py. The hydra client
loads lazily: it pulls in pycardano and httpx, which an embedded-only node never needs.
"""

from typing import Any

from node.settlement.embedded import EmbeddedHead, Outbound

_HYDRA = ("HydraClient", "HydraSettings", "HeadView")


def __getattr__(name: str) -> Any:
    if name in _HYDRA:
        from node.settlement import hydra
        return getattr(hydra, name)
    raise AttributeError(f"module 'node.settlement' has no attribute {name!r}")


__all__ = ["EmbeddedHead", "HeadView", "HydraClient", "HydraSettings", "Outbound"]
