"""Deterministic synthetic opportunities for the warehouse benchmarks: a baseline of N and a later snapshot of
the same tenant with 10% of them changed, 1% closed and 1% new. Generated page by page, never all at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta

from oppsync_pipeline.lib.record import Opportunity

CONNECTION, CRM = "bench", "salesforce"
OPEN_STAGES = ("Prospecting", "Qualification", "Proposal", "Negotiation")
T0 = datetime(2026, 1, 1)


def _opportunity(i: int, *, changed: bool = False, closed: bool = False, new: bool = False) -> Opportunity:
    lost = i % 5 == 4                          # a fifth of the baseline is already closed
    status = "won" if closed else ("lost" if lost and not new else "open")
    stage = {"won": "Closed Won", "lost": "Closed Lost"}.get(status, OPEN_STAGES[i % len(OPEN_STAGES)])
    amount = round(1000 + (i * 7919) % 250_000 + (0.5 if changed else 0.0), 2)
    modified = T0 + timedelta(seconds=i) + (timedelta(days=30) if (changed or closed or new) else timedelta())
    sid = f"006{i:012d}"
    return Opportunity(
        connection=CONNECTION, crm=CRM, source_id=sid, project_name=f"Project {i}", client_name=f"Client {i % 5000}",
        service_location=f"City {i % 300}, ST", sales_executive=f"Rep {i % 200}", owner_crm_id=f"005{i % 200:012d}",
        stage=stage, status=status, amount=amount, currency="USD", close_date=date(2026, 1 + i % 12, 1 + i % 28),
        probability=float(10 * (i % 10)), created_at=T0 - timedelta(days=i % 700),
        created_by_crm_id=f"005{i % 150:012d}", modified_at=modified,
        raw={"Id": sid, "Name": f"Project {i}", "StageName": stage, "Amount": amount})


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
