"""The simulators' shared machinery, without HTTP: the request window, the token store, paging snapshots, the
datetime formats and the tokenizer."""

import re
from datetime import date, datetime, timedelta

import pytest

from oppsync_pipeline.sandbox.kit.formats import fmt_datetime, parse_iso
from oppsync_pipeline.sandbox.kit.lexer import TokenCursor, lex
from oppsync_pipeline.sandbox.kit.limits import Window
from oppsync_pipeline.sandbox.kit.snapshots import Snapshots
from oppsync_pipeline.sandbox.kit.tokens import TokenStore


class FakeClock:
    def __init__(self) -> None:
        self.t = datetime(2024, 6, 11, 9, 0, 0)

    def __call__(self) -> datetime:
        return self.t


def test_window_slides_on_its_clock_and_reports_retry_after():
    clock = FakeClock()
    window = Window(2, timedelta(minutes=1), clock)
    assert window.take() == 0 and window.take() == 1
    assert window.take() is None and window.full() and window.remaining() == 0
    clock.t += timedelta(seconds=20)
    assert window.retry_after() == timedelta(seconds=40)
    clock.t += timedelta(seconds=40)
    assert window.used() == 0 and window.take() == 0


def test_an_allocation_never_drains_and_a_limit_may_change_while_serving():
    limit = {"n": 3}
    allocation = Window(lambda: limit["n"])
    assert [allocation.take() for _ in range(4)] == [0, 1, 2, None]
    limit["n"] = 10
    assert allocation.take() == 3 and allocation.spent == 4
    assert Window(0).take() == 0  # 0: unlimited


def test_tokens_expire_on_their_clock_and_all_at_once():
    clock = FakeClock()
    store = TokenStore(clock, seconds=1800)
    store.issue("a")
    assert store.valid("a") and not store.valid("b") and not store.known("b")
    clock.t += timedelta(seconds=1801)
    assert store.known("a") and store.expired_for("a") == timedelta(seconds=1)
    forever = TokenStore(clock)
    forever.issue("s")
    clock.t += timedelta(days=365)
    assert forever.valid("s")
    forever.expire_all()
    assert not forever.valid("s")


def test_snapshots_keep_the_most_recently_used():
    snaps = Snapshots(2)
    a, b = snaps.put([1]), snaps.put([2])
    assert snaps.get(a) == [1]
    c = snaps.put([3])
    assert snaps.get(b) is None and snaps.get(a) == [1] and snaps.get(c) == [3]
    assert snaps.put([4], "stale-id") == "stale-id" and snaps.get("stale-id") == [4]


def test_datetime_spellings():
    dt = datetime(2024, 6, 11, 9, 12, 44, 120_000)
    assert fmt_datetime(dt, ms=True, zone="+0000") == "2024-06-11T09:12:44.120+0000"
    assert fmt_datetime(dt, ms=True) == "2024-06-11T09:12:44.120Z"
    assert fmt_datetime(dt) == "2024-06-11T09:12:44Z"
    assert fmt_datetime(dt, ms="trim") == "2024-06-11T09:12:44.12Z"
    assert fmt_datetime(dt.replace(microsecond=0), ms="trim") == "2024-06-11T09:12:44Z"
    assert fmt_datetime(date(2024, 1, 2)) == "2024-01-02T00:00:00Z" and fmt_datetime(None) is None
    assert parse_iso("2024-06-11T11:12:44+0200") == parse_iso("2024-06-11T09:12:44Z") == dt.replace(microsecond=0)


def test_lexer_and_cursor():
    pattern = re.compile(r"(?P<ws>\s+)|(?P<num>\d+)|(?P<word>[a-z]+)")
    toks = lex(pattern, "ab 12", lambda pos: ValueError(pos))
    assert toks == [("word", "ab", 0), ("num", "12", 3)]
    with pytest.raises(ValueError, match="2"):
        lex(pattern, "ab?", lambda pos: ValueError(pos))
    cursor = TokenCursor(toks)
    assert cursor.peek() == toks[0]
    cursor.i = 2
    assert cursor.peek() is None


def test_account_by_native_finds_what_a_scan_finds():
    """World.account_by_native answers from an index (a scan of 300,000 accounts per ConnectWise site request
    made the simulator a 1,000,000 sync's bottleneck): the same account a scan finds, None for unknown ids, and
    accounts added later are found."""
    from dataclasses import replace

    from oppsync_pipeline.sandbox import connectwise as cw

    world = cw.build(seed=3, opportunities=200).world
    for a in world.accounts[::7]:
        assert world.account_by_native(a.native_id) is a
    assert world.account_by_native("no such id") is None
    extra = replace(world.accounts[0], native_id="added-later")
    world.accounts.append(extra)
    assert world.account_by_native("added-later") is extra
