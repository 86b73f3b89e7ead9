"""The head's two kinds of error: our own misuse of the machine, a peer's bad input."""

from __future__ import annotations

from protocol.errors import LocalProtocolError, RemoteProtocolError


class HeadMisuse(LocalProtocolError):
    """We asked our own machine for something the head's rules forbid."""

    def __init__(self, hint: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason = reason


def reject(reason: str, hint: str) -> RemoteProtocolError:
    return RemoteProtocolError(hint, reason=reason)


class AwaitingOwnView(RemoteProtocolError):
    """A request holds a record this party cannot judge yet: its own RoundFinal (or epoch
    scores) has not come. The request waits and is judged again when it comes."""
