"""The metagraph re-read (node/registry/refresh.py): new registrations and
deregistrations reach the live directory; a failing or hanging chain keeps the last good
member list; the book of admitted members survives a re-read."""

import time

import trio
import trio.testing

from node.registry.refresh import keep_registry
from protocol import member_book as mb
from protocol.membership import Member, Role, StaticDirectory

V = Member("5V-validator", frozenset({Role.VALIDATOR}))
T1, T2 = Member("5T-one", frozenset({Role.TRAINER})), Member("5T-two", frozenset({Role.TRAINER}))


def test_reads_apply_and_failures_keep_the_last_good_list():
    directory = mb.LiveDirectory((V, T1))
    directory.apply(mb.MemberBook(members={"5J-joined": mb.Entry(("trainer",), 50, "p", (), 0)}, staked=50))
    answers = [StaticDirectory((V, T2)), ConnectionError("chain down"), "hang", StaticDirectory((V, T1, T2))]
    seen = []

    def load():
        answer = answers.pop(0)
        if answer == "hang":
            time.sleep(0.3)  # longer than the timeout below
            return StaticDirectory(())
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_registry(directory, load, period_s=0.01, timeout_s=0.1, retry_s=0.01,
                                                     reads=4, on_change=lambda a, r: seen.append((a, r))))
            await trio.sleep(0.05)
            assert directory.member("5T-two") and directory.member("5T-one") is None  # deregistered
            assert directory.member("5J-joined") is not None  # the book stays
    trio.run(main)
    assert seen[0] == (["5T-two"], ["5T-one"])
    assert directory.member("5T-one") is not None and directory.member("5T-two") is not None
    assert directory.member("5V-validator") is not None  # never emptied by the failures
    assert len(seen) == 2
