"""The HTTP client's limits: RollingWindowPacer (at most `limit` requests in any window, shared by threads; pure,
with a fake clock) and the run's quota budget's message."""

from __future__ import annotations

import threading

import pytest

from oppsync_pipeline.lib.crm.http import QuotaBudget, QuotaExhausted, RequestStats, RollingWindowPacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_the_limit_goes_at_once_and_the_next_waits_for_the_first_to_age_out():
    clock = Clock()
    pacer = RollingWindowPacer(3, 10.0, clock=clock)
    assert [pacer.take() for _ in range(3)] == [0, 0, 0]
    assert pacer.take() == 10.0  # slot 110: the first request leaves the window
    assert pacer.take() == 10.0
    clock.now = 104.0
    assert pacer.take() == 6.0  # the third of the burst leaves at 110 too
    assert pacer.take() == 16.0  # the fourth took slot 110: it leaves at 120


def test_slots_never_put_more_than_the_limit_in_any_window():
    clock = Clock()
    pacer = RollingWindowPacer(5, 1.0, clock=clock)
    slots = []
    for step in range(200):
        clock.now = 100.0 + step * 0.013  # requests asked faster than the limit allows
        slots.append(clock.now + pacer.take())
    assert slots == sorted(slots)
    for i in range(len(slots) - 5):
        assert slots[i + 5] - slots[i] >= 1.0 - 1e-9


def test_threads_share_the_slots():
    clock = Clock()
    pacer = RollingWindowPacer(10, 1.0, clock=clock)
    waits: list[float] = []
    lock = threading.Lock()

    def ask() -> None:
        for _ in range(25):
            wait = pacer.take()
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 100 requests at one instant: 10 now, then 10 per second, each slot taken once
    assert sorted(waits) == [float(i // 10) for i in range(100)]


def test_a_changed_limit_applies_to_the_next_request_and_zero_paces_nothing():
    clock = Clock()
    pacer = RollingWindowPacer(2, 10.0, clock=clock)
    assert [pacer.take(), pacer.take(), pacer.take()] == [0, 0, 10.0]
    pacer.limit = 4  # the CRM reports a higher limit: the window ending at 110 holds four (the slots stay in order)
    assert [pacer.take(), pacer.take(), pacer.take(), pacer.take()] == [10.0, 10.0, 10.0, 20.0]
    pacer.limit = 0
    assert pacer.take() == 0


def test_a_spent_run_share_names_the_setting_that_raises_it():
    """Autotask's hourly 10,000 at the default 25% stops a 1,000,000-opportunity full sync (about 6,000 requests)
    at 2,500: the message says which setting lets it through."""
    stats = RequestStats(requests=2500, quota_limit=10_000, quota_used=2600)
    with pytest.raises(QuotaExhausted, match=r"quota\.run_share"):
        QuotaBudget(run_share=0.25).check(stats)


def test_requests_sent_side_by_side_never_pass_the_usage_stop_together():
    """Parallel reads: 20 threads ask to send at once with the CRM's usage 5 short of the stop line. Checking and
    counting is one step, and the requests still unanswered count as used: exactly 5 are admitted."""
    stats = RequestStats(quota_limit=10_000, quota_used=9_495)
    budget = QuotaBudget(run_share=1.0, stop_at_usage=0.95)
    barrier = threading.Barrier(20)
    admitted, refused = [], []

    def send() -> None:
        barrier.wait()
        try:
            budget.admit(stats)
            admitted.append(1)
        except QuotaExhausted as err:
            refused.append(str(err))

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5 and stats.requests == 5 and stats.unanswered == 5
    assert len(refused) == 15 and "unanswered" in refused[0]
    stats.count(unanswered=-5)  # their answers came back, reporting the usage they made
    stats.quota_used = 9_500
    with pytest.raises(QuotaExhausted, match="9500/10000 of its quota used;"):
        budget.admit(stats)
