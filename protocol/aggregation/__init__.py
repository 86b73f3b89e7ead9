"""Transitional (one commit): protocol/aggregation.py moved here whole, so that its history
follows; the next commit splits it into the package's modules."""

from protocol.aggregation._validator import *  # noqa: F401,F403
from protocol.aggregation._validator import (MAX_BLAME_MS, MAX_HOTKEY_CHARS, MAX_NAME_CHARS, BlameRequest,  # noqa: F401
                                             Exclusion, PartialDecryption, SetView, SlotProof, open_wait_reason)
from protocol.aggregation._validator import __all__  # noqa: F401
