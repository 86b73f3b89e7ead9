"""Errors of the training library, split as in protocol/errors.py (after h11).

TrainingUsageError: we (or the user configuring this node) asked for something the
library cannot do: bad hyper-parameters, a missing model directory, a malformed local
data file. AdapterRejected: bytes or vectors that came from elsewhere (a stored
adapter, an aggregate, an outer-optimizer state) do not fit this model.
DataError, a TrainingUsageError (and a ValueError): a member's own text data is unusable.
All carry a stable `reason` label for logs and /metrics.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError, RemoteProtocolError


class TrainingUsageError(LocalProtocolError):
    """Our own misuse or a user's configuration; the message says what to fix."""

    def __init__(self, hint: str, *, reason: str) -> None:
        super().__init__(hint)
        self.reason = reason

    @property
    def hint(self) -> str:
        return str(self)


class AdapterRejected(RemoteProtocolError):
    """An adapter, delta, aggregate or optimizer state from outside that does not fit."""

    reason = "bad_adapter"


class DataError(TrainingUsageError, ValueError):
    """A member's own text data cannot be trained or evaluated on (missing, empty, not
    UTF-8, a malformed .jsonl line, too few tokens). The message names the path and what
    to do; a node shows it at start and keeps reminding instead of training."""

    def __init__(self, hint: str, *, reason: str = "bad_data") -> None:
        super().__init__(hint, reason=reason)
