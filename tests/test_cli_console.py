"""The console of `oppsync run` / `oppsync sync`: each page a sync stages is a progress event (to a callback: the
Dagster run log at INFO; to a logger: the terminal), the terminal shows it as plain lines when it is not a TTY
(at most one per connection every few seconds, and the last state), and the output of everything else (dbt's
subprocess included) goes to a log file. The whole `oppsync run` (under 40 lines on an incremental run, progress
lines present) is checked in tests/test_cli_run.py, on the runs that test already makes."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import dagster as dg

from oppsync_pipeline.defs.crm.assets import connection_assets
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import load_config
from oppsync_pipeline.lib.progress import LOGGER_NAME, ConsoleProgress, PageProgress, ProgressTracker
from tests.dagster.conftest import start_servers, stop_servers, write_config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_page_goes_to_the_callback_and_the_progress_logger(caplog):
    clock, seen = Clock(), []
    tracker = ProgressTracker("acme-sf", "salesforce", seen.append, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        clock.now += 2
        tracker.page("open set", 200, requests=5, expected=450)
        clock.now += 2
        tracker.page("open set", 200, requests=6, expected=450)
        tracker.page("not-open set", 50, requests=7)
        tracker.done(requests=8)
    assert [(e.phase, e.page, e.total_records, e.total_pages) for e in seen] == [
        ("open set", 1, 200, 1),
        ("open set", 2, 400, 2),
        ("not-open set", 1, 450, 3),
        ("done", 0, 450, 3),
    ]
    assert seen[1].rate == 100.0
    assert seen[1].line() == (
        "acme-sf: open set page 2 (200 records of 450); 400 records in 2 pages, 100 records/s, 6 requests, 4.0s"
    )
    assert seen[-1].line() == "acme-sf: read 450 records in 3 pages, 112 records/s, 8 requests, 4.0s"
    assert [r.progress for r in caplog.records] == seen


def event(name: str, total: int, seconds: float) -> PageProgress:
    return PageProgress(name, "hubspot", "open set", total // 100, 100, total, total // 100, 3, seconds)


def test_plain_lines_at_most_every_few_seconds_and_the_last_state_at_the_end():
    clock, out = Clock(), io.StringIO()
    shown = ConsoleProgress(out, tty=False, every=5.0, clock=clock)
    shown.start("hs")
    for i in range(1, 13):  # a page a second for 12 s
        clock.now += 1
        shown.update(event("hs", 100 * i, i))
    shown.finish("hs")
    shown.start("quick")  # an incremental sync of one page: one line, at its end
    shown.update(event("quick", 100, 0.5))
    shown.update(PageProgress("quick", "hubspot", "done", 0, 0, 100, 1, 4, 0.6))
    shown.finish("quick")
    lines = out.getvalue().splitlines()
    assert [line.split(";")[0] for line in lines] == [
        "hs: open set page 5 (100 records)",
        "hs: open set page 10 (100 records)",
        "hs: open set page 12 (100 records)",
        "quick: read 100 records in 1 page, 167 records/s, 4 requests, 0.6s",
    ]
    assert "1,200 records in 12 pages" in lines[2]


def test_a_tty_gets_a_live_line_per_connection():
    out = io.StringIO()
    shown = ConsoleProgress(out, tty=True)
    shown.start("hs")
    shown.update(event("hs", 300, 1.5))
    shown.finish("hs")
    shown.close()
    assert "hs" in out.getvalue() and "300 records" in out.getvalue()


CHILD = """
import logging, subprocess, sys
from pathlib import Path
from oppsync_pipeline.lib.progress import console
with console(False, Path(sys.argv[1]), "test") as (terminal, path):
    print("dbt says a lot", flush=True)
    subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"])
    logging.getLogger("dagster").warning("a Dagster warning")
    print("shown", file=terminal)
print("after", path.name)
"""


def test_everything_but_the_console_goes_to_the_log_file(tmp_path: Path):
    logging_setup = "import logging; logging.basicConfig()\n"
    done = subprocess.run(
        [sys.executable, "-c", logging_setup + CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    (log,) = tmp_path.glob("oppsync-test-*.log")
    assert done.stdout.splitlines() == ["shown", f"after {log.name}"] and done.stderr == ""
    text = log.read_text()
    for line in ("dbt says a lot", "child stdout", "child stderr", "a Dagster warning"):
        assert line in text


def test_the_dagster_run_log_names_each_page_and_the_reconcile_shows_status_names(tmp_path: Path):
    servers = start_servers({"sf": "salesforce"}, opportunities=40)
    try:
        config = write_config(tmp_path / "oppsync.yaml", servers, f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
        conn = load_config(config).connection("sf")
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                connection_assets(conn),
                instance=instance,
                resources={"oppsync": OppsyncResource(config_path=str(config))},
            )
            assert result.success
            infos = [
                e.message
                for e in instance.all_logs(result.run_id)
                if e.level == logging.INFO and e.message.startswith("sf: ")
            ]
    finally:
        stop_servers(servers)
    assert any(m.startswith("sf: open set page 1 (") for m in infos), infos
    assert any(m.startswith("sf: not-open set page 1 (") for m in infos), infos
    assert infos[-1].startswith("sf: read 40 records in ")
    # the reconcile's metadata: unchanged rows are `rows_unchanged` (a run `skipped` is a quota stop), with the
    # connection's status fields (lib/status.py)
    meta = result.asset_materializations_for_node("oppsync__sf__opportunities")[0].metadata
    assert meta["rows_unchanged"].value == 0 and meta["rows_created"].value == 40 and "rows_skipped" not in meta
    assert meta["api_requests"].value > 0 and meta["schedule"].value == "30 * * * * (UTC)"
    assert meta["next_scheduled_run_utc"].value.endswith(":30:00")
    assert all("records/s" in m and "requests" in m for m in infos)
