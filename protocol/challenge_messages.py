"""Mesh messages of the FHE challenge (protocol/challenge.py); registered with protocol.messages on import."""

from __future__ import annotations
