"""lib/dashboard/queries.py on DuckDB and Postgres: every number equals direct SQL over marts.outcomes, and each
drill-down lists exactly the opportunities behind its number.

The marts are tables with the columns and types of their dbt contracts (read from _marts__models.yml, so they
follow the models), filled with a seeded world: marts.opportunities as generated, marts.outcomes computed from it
here in Python by the mart's crediting rule (tests/dbt prove the dbt models follow that rule)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from oppsync_pipeline.lib.dashboard import queries
from oppsync_pipeline.lib.dashboard.filters import Filters, period_start
from oppsync_pipeline.lib.dashboard.source import read_only
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
from tests.conftest import warehouse_database

CONTRACTS = Path(__file__).resolve().parents[2] / "dbt" / "models" / "marts" / "_marts__models.yml"
USERS = {"alice": "Alice Adams", "bob": "Bob Brown", "carol": "Carol Clark", "unmapped": "Unmapped"}
CONNECTIONS = {"sf": ("salesforce", "USD"), "hs": ("hubspot", "EUR")}
GRAINS = ("day", "week", "month")


def contract(model: str) -> list[tuple[str, str]]:
    models = yaml.safe_load(CONTRACTS.read_text(encoding="utf-8"))["models"]
    columns = next(m for m in models if m["name"] == model)["columns"]
    return [(c["name"], c["data_type"]) for c in columns]


def opportunities_world(n: int = 240, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        conn = rng.choice(list(CONNECTIONS))
        created = datetime(2026, 1, 1) + timedelta(minutes=rng.randrange(0, 120 * 24 * 60))
        status = rng.choice(["open", "open", "won", "lost"])
        closed = created + timedelta(hours=rng.randrange(1, 40 * 24)) if status != "open" else None
        owner = rng.choice(list(USERS)) if closed else None
        creator = rng.choice(list(USERS))
        rows.append(
            {
                "connection": conn,
                "crm": CONNECTIONS[conn][0],
                "source_id": f"{conn}-{i}",
                "project_name": f"Deal {i}",
                "stage": status,
                "status": status,
                "stage_category": status,
                "is_deleted": rng.random() < 0.05,
                "is_in_scope": rng.random() > 0.05,
                "amount": None if rng.random() < 0.05 else round(rng.uniform(100, 50_000), 2),
                "currency": CONNECTIONS[conn][1],
                "is_qualified": rng.random() < 0.6,
                "created_at": created,
                "created_at_local": created,  # reporting time zone UTC
                "created_by_user_id": creator,
                "created_by_user_name": USERS[creator],
                "closed_at": closed,
                "closed_at_local": closed,
                "owner_at_close_user_id": owner,
                "owner_at_close_user_name": USERS.get(owner),
                "last_synced_at": datetime(2026, 5, 1, 8, 0),
            }
        )
    return rows


def outcomes_of(opportunities: list[dict]) -> list[dict]:
    """marts.outcomes as the mart computes it: created -> creator at created_at, won / lost -> owner at close at
    closed_at; deleted and out-of-scope opportunities left out; per grain, period, connection and user."""
    cells: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    names, currencies = {}, defaultdict(set)
    for o in opportunities:
        if o["is_deleted"] or not o["is_in_scope"]:
            continue
        credits = [("created", o["created_by_user_id"], o["created_at_local"])]
        if o["status"] in ("won", "lost"):
            credits.append((o["status"], o["owner_at_close_user_id"], o["closed_at_local"]))
        for activity, user, at in credits:
            for grain in GRAINS:
                key = (grain, period_start(grain, at.date()), o["connection"], user)
                cell = cells[key]
                cell[f"opportunities_{activity}"] += 1
                cell[f"amount_{activity}"] += o["amount"] or 0
                cell[f"opportunities_{activity}_qualified"] += int(o["is_qualified"])
                names[key] = USERS[user]
                currencies[key].add(o["currency"])
    rows = []
    for (grain, start, conn, user), cell in cells.items():
        cur = currencies[(grain, start, conn, user)]
        won, lost = cell["opportunities_won"], cell["opportunities_lost"]
        rows.append(
            {
                "period_grain": grain,
                "period_start": start,
                "connection": conn,
                "crm": CONNECTIONS[conn][0],
                "user_id": user,
                "user_name": names[(grain, start, conn, user)],
                **{f"{m}_{a}": 0 for m in ("opportunities", "amount") for a in queries.ACTIVITIES},
                **{f"opportunities_{a}_qualified": 0 for a in queries.ACTIVITIES},
                **cell,
                "win_rate": won / (won + lost) if won + lost else None,
                "currency": next(iter(cur)) if len(cur) == 1 else "MIXED",
            }
        )
    # a user with a zero row in a later period (the mart fills periods without activity with zeros)
    rows.append({"period_grain": "week", "period_start": date(2026, 6, 1), "connection": "sf", "crm": "salesforce"})
    rows[-1].update(user_id="carol", user_name="Carol Clark", opportunities_created=0, opportunities_won=0)
    return rows


def fill_marts(url: str) -> list[dict]:
    opportunities = opportunities_world()
    engine = make_engine(url)
    try:
        with transaction(engine) as conn:
            conn.execute(text("CREATE SCHEMA IF NOT EXISTS marts"))
            for model, rows in (("opportunities", opportunities), ("outcomes", outcomes_of(opportunities))):
                columns = contract(model)
                conn.execute(text(f"CREATE TABLE marts.{model} ({', '.join(f'{c} {t}' for c, t in columns)})"))
                names = [c for c, _ in columns]
                insert = text(f"INSERT INTO marts.{model} ({', '.join(names)}) VALUES (:{', :'.join(names)})")
                conn.execute(insert, [{c: row.get(c) for c in names} for row in rows])
    finally:
        engine.dispose()
    return opportunities


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def marts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Both warehouses, filled once per module (the tests only read)."""
    with warehouse_database(request.param, tmp_path_factory.mktemp("marts")) as url:
        fill_marts(url)
        yield url


VIEWS = [
    Filters(),
    Filters(grain="day", start=date(2026, 2, 1), end=date(2026, 2, 28)),
    Filters(grain="month", connections=("hs",)),
    Filters(grain="week", start=date(2026, 1, 12), end=date(2026, 3, 30), user_ids=("alice", "unmapped")),
    Filters(grain="week", qualified=True, connections=("sf",), user_ids=("bob",)),
]


def direct(conn, f: Filters, group_by: str | None = None) -> list[tuple]:
    """The same numbers written out by hand, independently of queries.py."""
    suffix = "_qualified" if f.qualified else ""
    where = [f"period_grain = '{f.grain}'"]
    if f.start:
        where.append(f"period_start >= DATE '{f.start}'")
    if f.end:
        where.append(f"period_start <= DATE '{f.end}'")
    if f.connections:
        where.append("connection IN (" + ", ".join(f"'{c}'" for c in f.connections) + ")")
    if f.user_ids:
        where.append("user_id IN (" + ", ".join(f"'{u}'" for u in f.user_ids) + ")")
    select = (
        f"sum(opportunities_created{suffix}), sum(opportunities_won{suffix}), sum(opportunities_lost{suffix}), "
        "sum(amount_created), sum(amount_won)"
    )
    sql = f"SELECT {group_by + ', ' if group_by else ''}{select} FROM marts.outcomes WHERE {' AND '.join(where)}"
    if group_by:
        sql += f" GROUP BY {group_by} ORDER BY {group_by}"
    return [tuple(r) for r in conn.execute(text(sql))]


def as_tuple(row: dict, qualified: bool) -> tuple:
    amounts = (None, None) if qualified else (pytest.approx(row["amount_created"]), pytest.approx(row["amount_won"]))
    return (int(row["created"]), int(row["won"]), int(row["lost"]), *amounts)


def expected(row: tuple, qualified: bool) -> tuple:
    created, won, lost, amount_created, amount_won = row
    return (
        int(created or 0),
        int(won or 0),
        int(lost or 0),
        *((None, None) if qualified else (amount_created or 0, amount_won or 0)),
    )


@pytest.mark.parametrize(
    "view", VIEWS, ids=lambda f: f"{f.grain}-{len(f.connections)}c-{len(f.user_ids)}u-q{int(f.qualified)}"
)
def test_totals_periods_and_users_equal_direct_sql(marts: str, view: Filters):
    with read_only(marts) as conn:
        totals = queries.totals(conn, view)
        per_period = queries.per_period(conn, view)
        per_user = queries.per_user(conn, view)
        by_hand = direct(conn, view)[0]
        by_hand_period = direct(conn, view, "period_start")
        by_hand_user = direct(conn, view, "user_id")
    assert as_tuple(totals, view.qualified) == expected(by_hand, view.qualified)
    assert totals["created"] > 0
    assert [as_tuple(r, view.qualified) for r in per_period.to_dict("records")] == [
        expected(r[1:], view.qualified) for r in by_hand_period
    ]
    assert [str(p) for p in per_period["period_start"]] == [str(r[0])[:10] for r in by_hand_period]
    ours = {r["user_id"]: as_tuple(r, view.qualified) for r in per_user.to_dict("records")}
    assert ours == {r[0]: expected(r[1:], view.qualified) for r in by_hand_user}
    # the parts add up to the whole
    assert per_period["created"].sum() == per_user["created"].sum() == totals["created"]
    won, lost = totals["won"], totals["lost"]
    assert totals["win_rate"] == (pytest.approx(won / (won + lost)) if won + lost else None)


@pytest.mark.parametrize("qualified", [False, True])
def test_each_drill_down_lists_the_opportunities_behind_its_number(marts: str, qualified: bool):
    view = Filters(grain="week", qualified=qualified)
    suffix = "_qualified" if qualified else ""
    with read_only(marts) as conn:
        rows = conn.execute(
            text(
                f"SELECT user_id, period_start, sum(opportunities_created{suffix}), sum(opportunities_won{suffix}), "
                f"sum(opportunities_lost{suffix}) FROM marts.outcomes WHERE period_grain = 'week' "
                "GROUP BY user_id, period_start"
            )
        ).all()
        cells = {(user, str(start)[:10]): [int(n) for n in numbers] for user, start, *numbers in rows}
        for i, activity in enumerate(queries.ACTIVITIES):
            # every cell at once: the view's whole list, counted per credited user and period ...
            listed = queries.opportunities(conn, view, activity)
            user_col = queries.CREDIT[activity][0]
            counted = listed.groupby([listed[user_col], listed["period_start"].astype(str)]).size().to_dict()
            assert counted == {k: v[i] for k, v in cells.items() if v[i]}, activity
            if qualified:
                assert listed["is_qualified"].all()
            # ... and cells asked for one by one, as the page asks when a user or a bar is picked
            for (user, start), numbers in sorted(cells.items())[:: max(1, len(cells) // 6)]:
                one = queries.opportunities(conn, view, activity, user_id=user, period=date.fromisoformat(start))
                assert len(one) == numbers[i], (user, start, activity)
        assert len(queries.opportunities(conn, view, "won")) == queries.totals(conn, view)["won"] > 0


def test_drill_down_keeps_deleted_and_out_of_scope_opportunities_out(marts: str):
    with read_only(marts) as conn:
        listed = queries.opportunities(conn, Filters(grain="month"), "created")
        hidden = conn.execute(
            text("SELECT count(*) FROM marts.opportunities WHERE is_deleted OR NOT is_in_scope")
        ).scalar()
        total = conn.execute(text("SELECT count(*) FROM marts.opportunities")).scalar()
    assert hidden > 0 and len(listed) == total - hidden


def test_choices_trends_and_as_of(marts: str):
    with read_only(marts) as conn:
        options = queries.choices(conn)
        as_of = queries.as_of(conn)
        view = Filters(grain="week", start=date(2026, 1, 5), end=date(2026, 2, 23))
        per_period = queries.per_period(conn, view)
        user_periods = queries.per_user_period(conn, view)
        per_user = queries.per_user(conn, view)
    assert options["connections"] == ["hs", "sf"]
    assert options["users"] == {u: USERS[u] for u in sorted(USERS, key=USERS.get)}
    assert options["bounds"]["week"] == (date(2025, 12, 29), date(2026, 6, 1))
    assert as_of == datetime(2026, 5, 1, 8, 0)
    trend = queries.trends(user_periods, list(per_period["period_start"]))
    assert {u: sum(series) for u, series in trend.items()} == dict(zip(per_user["user_id"], per_user["created"]))
    assert all(len(series) == len(per_period) for series in trend.values())


def test_the_dashboard_connection_cannot_write(marts: str):
    with pytest.raises(Exception, match="(?i)read.only"), read_only(marts) as conn:
        conn.execute(text("DELETE FROM marts.outcomes"))
