"""Mesh messages of the secure-aggregation round (protocol/aggregation.py); registered with protocol.messages on import."""

from __future__ import annotations
