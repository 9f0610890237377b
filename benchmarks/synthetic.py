"""Deterministic synthetic opportunities for the warehouse benchmarks: a baseline of N and a later snapshot of
the same tenant with 10% of them changed, 1% closed and 1% new. Generated page by page, never all at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta

from oppsync_pipeline.lib.record import Opportunity

CONNECTION, CRM = "bench", "salesforce"
OPEN_STAGES = ("Prospecting", "Qualification", "Proposal", "Negotiation")
T0 = datetime(2026, 1, 1)


# Values that repeat with i modulo something, made once: the generator stands in for the CRM, and both
# sides of a benchmark pay for it inside their timing, so it should cost as little as it can.
_CLIENTS = [f"Client {k}" for k in range(5000)]
_CITIES = [f"City {k}, ST" for k in range(300)]
_REPS = [f"Rep {k}" for k in range(200)]
_OWNERS = [f"005{k:012d}" for k in range(200)]
_CREATORS = [f"005{k:012d}" for k in range(150)]
_CLOSE_DATES = {(m, d): date(2026, 1 + m, 1 + d) for m in range(12) for d in range(28)}
_CREATED = [T0 - timedelta(days=k) for k in range(700)]
_PROBABILITIES = [float(10 * k) for k in range(10)]
_LATER = timedelta(days=30)


def _opportunity(i: int, *, changed: bool = False, closed: bool = False, new: bool = False) -> Opportunity:
    lost = i % 5 == 4  # a fifth of the baseline is already closed
    status = "won" if closed else ("lost" if lost and not new else "open")
    stage = "Closed Won" if status == "won" else ("Closed Lost" if status == "lost" else OPEN_STAGES[i % 4])
    amount = round(1000 + (i * 7919) % 250_000 + (0.5 if changed else 0.0), 2)
    modified = T0 + timedelta(seconds=i)
    if changed or closed or new:
        modified += _LATER
    sid = f"006{i:012d}"
    name = f"Project {i}"
    return Opportunity(
        CONNECTION,
        CRM,
        sid,
        name,
        _CLIENTS[i % 5000],
        _CITIES[i % 300],
        _REPS[i % 200],
        _OWNERS[i % 200],
        stage,
        status,
        amount,
        "USD",
        _CLOSE_DATES[i % 12, i % 28],
        _PROBABILITIES[i % 10],
        _CREATED[i % 700],
        _CREATORS[i % 150],
        modified,
        {"Id": sid, "Name": name, "StageName": stage, "Amount": amount},
    )


def baseline(n: int, page_size: int) -> Iterator[list[Opportunity]]:
    for start in range(0, n, page_size):
        yield [_opportunity(i) for i in range(start, min(n, start + page_size))]


def snapshot(n: int, page_size: int) -> Iterator[list[Opportunity]]:
    """The tenant later: ids 0..n-1 with every 10th changed and every 100th (offset 5, open before) closed won,
    then n/100 new ids."""

    def rows() -> Iterator[Opportunity]:
        for i in range(n):
            yield _opportunity(i, changed=i % 10 == 0, closed=i % 100 == 5)
        for i in range(n, n + n // 100):
            yield _opportunity(i, new=True)

    page: list[Opportunity] = []
    for o in rows():
        page.append(o)
        if len(page) == page_size:
            yield page
            page = []
    if page:
        yield page


def snapshot_size(n: int) -> int:
    return n + n // 100
