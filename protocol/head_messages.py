"""Mesh messages of the settlement head (protocol/head.py); registered with protocol.messages on import."""

from __future__ import annotations
