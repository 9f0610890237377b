"""The outcomes dashboard in a real headless browser (Debian's chromium through Playwright), started by
`oppsync dashboard` on a sandbox warehouse synced by the real sync code with the mart built by dbt: the page
loads, the numbers shown equal SQL over the mart, filters change them as SQL says, a drill-down lists as many
opportunities as the number it explains, and a sync writes the DuckDB file while the page is open.
Screenshots are test artefacts in tests/artifacts/dashboard/ (gitignored; the paths are printed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import requests
from sqlalchemy import bindparam, text

from oppsync_pipeline.lib.dashboard import queries
from oppsync_pipeline.lib.dashboard.filters import Filters
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
from tests.dashboard.sandbox_mart import SandboxMart, sandbox_mart

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by `make browser` (never `playwright install`)
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts" / "dashboard"

pytestmark = [
    pytest.mark.slow,  # a sync, a dbt run and a browser: ~60 s on the shared 2-core machine
    pytest.mark.skipif(
        not CHROMIUM.exists() and os.environ.get("CI") != "true",
        reason="no /usr/bin/chromium: run `make browser` (CI installs it through make test)",
    ),
]


@pytest.fixture(scope="module")
def mart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxMart]:
    m = sandbox_mart(tmp_path_factory.mktemp("dashboard"))
    yield m
    m.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(mart: SandboxMart) -> Iterator[str]:
    """`oppsync dashboard` in a subprocess (it imports this checkout: PYTHONPATH is inherited), until healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "oppsync_pipeline.cli", "dashboard", "--config", str(mart.config_path)]
    log = mart.config_path.with_name("dashboard.log")
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, f"oppsync dashboard exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer on {url}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def busiest_user_created(mart: SandboxMart, f: Filters) -> int:
    """The per-user table's first row (most created first): its number of opportunities created."""
    suffix = "_qualified" if f.qualified else ""
    sql = (
        f"SELECT sum(opportunities_created{suffix}) FROM marts.outcomes WHERE period_grain = :grain "
        "AND period_start >= :start AND period_start <= :end AND connection IN :connections "
        "GROUP BY user_id ORDER BY 1 DESC LIMIT 1"
    )
    engine = make_engine(mart.url)
    try:
        with transaction(engine) as conn:
            stmt = text(sql).bindparams(bindparam("connections", expanding=True))
            params = {"grain": f.grain, "start": f.start, "end": f.end, "connections": list(f.connections)}
            return int(conn.execute(stmt, params).scalar())
    finally:
        engine.dispose()


def expected(mart: SandboxMart, f: Filters) -> dict:
    """The view's totals written as plain SQL over marts.outcomes (not through the page's query module)."""
    suffix = "_qualified" if f.qualified else ""
    sql = (
        f"SELECT sum(opportunities_created{suffix}), sum(opportunities_won{suffix}), sum(opportunities_lost{suffix}) "
        "FROM marts.outcomes WHERE period_grain = :grain AND period_start >= :start AND period_start <= :end"
    )
    params = {"grain": f.grain, "start": f.start, "end": f.end}
    if f.connections:
        sql += " AND connection = :connection"
        params["connection"] = f.connections[0]
    engine = make_engine(mart.url)
    try:
        with transaction(engine) as conn:
            created, won, lost = conn.execute(text(sql), params).one()
    finally:
        engine.dispose()
    return {"Created": int(created), "Won": int(won), "Lost": int(lost)}


def default_view(mart: SandboxMart) -> Filters:
    """What the page shows first: the last 12 weeks of the mart, every connection and user."""
    engine = make_engine(mart.url)
    try:
        with transaction(engine) as conn:
            weeks = conn.execute(
                text(
                    "SELECT DISTINCT period_start FROM marts.outcomes WHERE period_grain = 'week' "
                    "ORDER BY 1 DESC LIMIT 12"
                )
            ).scalars()
            weeks = sorted(weeks)
    finally:
        engine.dispose()
    return Filters(grain="week", start=weeks[0], end=weeks[-1])


def test_the_page_shows_the_marts_numbers_and_filters_change_them(mart: SandboxMart, dashboard: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    def metric(label: str):
        box = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True))
        return box.locator('[data-testid="stMetricValue"]')

    def expect_numbers(numbers: dict) -> None:
        for label, value in numbers.items():
            expect(metric(label)).to_have_text(f"{value:,}", timeout=30_000)

    def shot(name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    view = default_view(mart)
    everything = expected(mart, view)
    qualified = expected(mart, Filters(grain="week", start=view.start, end=view.end, qualified=True))
    sf_view = Filters(grain="week", start=view.start, end=view.end, qualified=True, connections=("sandbox-salesforce",))
    qualified_sf = expected(mart, sf_view)
    # the filters must change the numbers, or this test would prove nothing
    assert everything != qualified != qualified_sf and everything["Created"] > 0

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(dashboard)
            expect_numbers(everything)
            # the current, partial week is marked as such
            expect(page.get_by_text("is partial (not over yet)")).to_be_visible()
            # the drill-down under the page lists as many opportunities as the total it explains
            expect(page.get_by_text(f"{everything['Created']:,} opportunities created")).to_be_visible()
            shot("default")

            # a sync writes the DuckDB file while the page is open: the page holds no connection between loads
            writer = duckdb.connect(str(mart.duckdb_path))  # no retry: it would fail if a reader held the file
            writer.execute("CREATE TABLE IF NOT EXISTS oppsync.dashboard_probe AS SELECT 1 AS x")
            writer.close()
            mart.servers["sandbox-salesforce"].simulator.world.advance(hours=2, rate=0.05)  # activity to write
            mart.sync(only="sandbox-salesforce")

            page.locator('[data-testid="stCheckbox"]').filter(has_text="Qualified only").locator("label").click()
            expect_numbers(qualified)
            connection = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Connection")
            connection.locator("input").click()
            page.keyboard.type("sandbox-salesforce")
            page.keyboard.press("Enter")
            page.keyboard.press("Escape")
            expect_numbers(qualified_sf)
            expect(page.get_by_text(f"{qualified_sf['Created']:,} opportunities created")).to_be_visible()
            shot("qualified-salesforce")

            # drill-down from the per-user table: selecting its first row lists that user's opportunities
            table = page.locator('.st-key-user_table [data-testid="stDataFrame"]')
            box = table.bounding_box()
            page.mouse.click(box["x"] + 15, box["y"] + 35 + 17)  # the row's selection box (35 px header and rows)
            top = busiest_user_created(mart, sf_view)
            assert top < qualified_sf["Created"]  # else the view's list and the user's could not be told apart
            noun = "opportunity" if top == 1 else "opportunities"
            expect(page.get_by_text(f"{top:,} {noun} created")).to_be_visible(timeout=30_000)
            shot("drill-down")
        finally:
            browser.close()


def test_drill_downs_on_the_built_mart_add_up_to_its_numbers(mart: SandboxMart) -> None:
    """On the dbt-built mart (not only on hand-made tables): per user, each outcome's opportunity list is as long
    as the user's number over every week."""
    engine = make_engine(mart.url)
    try:
        with transaction(engine) as conn:
            view = Filters(grain="week")
            per_user = queries.per_user(conn, view)
            for activity in queries.ACTIVITIES:
                listed = queries.opportunities(conn, view, activity)
                counted = listed.groupby(queries.CREDIT[activity][0]).size().to_dict()
                numbers = {u: n for u, n in zip(per_user["user_id"], per_user[activity], strict=True) if n}
                assert counted == numbers, activity
    finally:
        engine.dispose()


def test_the_page_waits_while_a_sync_holds_the_file_then_reads(mart: SandboxMart) -> None:
    """A writer in another process holds DuckDB's file lock: the dashboard's read waits for it rather than
    failing, and says so clearly when the wait is too long."""
    from oppsync_pipeline.lib.dashboard.source import WarehouseBusy, read_only

    hold = (
        "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
        "time.sleep(float(sys.argv[2])); c.close()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", hold, str(mart.duckdb_path), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseBusy, match="locked by a writer"), read_only(mart.url, wait_seconds=0.3):
            pass
        started = time.monotonic()
        with read_only(mart.url, wait_seconds=30) as conn:
            assert conn.execute(text("SELECT count(*) FROM marts.outcomes")).scalar() > 0
        assert time.monotonic() - started < 20
    finally:
        child.wait(timeout=30)
