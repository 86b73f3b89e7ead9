"""The two kinds of protocol error, after h11: our own misuse vs a peer's bad input.

Every RemoteProtocolError carries a short machine-readable `reason` (a /metrics label
and a log field) and a human hint.

They live in crypto/ because crypto/'s decoders and the key ceremony raise them too and
crypto/ sits below protocol/ (protocol/ may import crypto/, never the reverse);
protocol/errors.py re-exports them, and the protocol's code imports them from there.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """We asked a machine to do something its rules forbid: a bug on our side."""


class RemoteProtocolError(Exception):
    """A peer sent something the protocol rejects. `reason` is a stable label."""

    reason = "invalid"

    def __init__(self, hint: str, *, reason: str | None = None) -> None:
        super().__init__(hint)
        if reason is not None:
            self.reason = reason

    @property
    def hint(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, hint={self.hint!r})"
