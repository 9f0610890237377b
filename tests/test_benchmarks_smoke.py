"""Each benchmark runs at a tiny size and produces its row(s) of figures, and a run writes RESULTS.md.

No timing assertions: speed and memory targets live in the benchmarks' own report, never in the test suite.
The end-to-end benchmark (Dagster + dbt, minutes even when tiny) is marked slow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import api_efficiency, end_to_end, memory, reconcile_throughput
from benchmarks.__main__ import main, parse_args
from benchmarks.common import Figure, postgres_available

TINY = [
    "--rows",
    "1000",
    "--floor-rows",
    "1000",
    "--page-size",
    "250",
    "--api-opportunities",
    "300",
    "--latency-opportunities",
    "300",
    "--latency-connectwise",
    "30",
    "--latency-rounds",
    "2",
    "--memory-opportunities",
    "300",
    "--memory-dagster-opportunities",
    "300",
    "--e2e-opportunities",
    "300",
    "--e2e-connectwise",
    "50",
]


def figures_ok(figures: list[Figure]) -> None:
    assert figures
    for f in figures:
        assert f.measured and f.measured != "FAILED", f
        assert f.verdict in ("PASS", "MISS", "info"), f


def test_reconcile_engine_floor_and_dlt_on_duckdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Postgres has its own test below; here only DuckDB, to keep this file fast.
    monkeypatch.setattr(reconcile_throughput, "postgres_available", lambda: False)
    figures = reconcile_throughput.run(parse_args(TINY), tmp_path)
    subjects = [f.subject for f in figures]
    assert subjects[:5] == ["duckdb engine", "duckdb floor", "duckdb ours/floor", "duckdb dlt merge", "duckdb ours/dlt"]
    figures_ok(figures[:5])


def test_reconcile_compares_the_floor_and_dlt_at_their_own_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # make bench: the floor at the brief's size, dlt where its merge finishes in minutes; each ratio on one snapshot
    monkeypatch.setattr(reconcile_throughput, "postgres_available", lambda: False)
    figures = reconcile_throughput.run(parse_args(TINY + ["--floor-rows", "600"]), tmp_path)
    subjects = [f.subject for f in figures]
    assert subjects[:6] == [
        "duckdb engine",
        "duckdb floor",
        "duckdb ours/floor",
        "duckdb engine at 1,000",
        "duckdb dlt merge",
        "duckdb ours/dlt",
    ]
    figures_ok(figures[:6])
    assert "N=600" in figures[0].notes and "N=600" in figures[2].notes
    assert "N=1,000" in figures[3].notes and "N=1,000" in figures[5].notes and "at 600" in figures[5].notes


@pytest.mark.postgres
def test_reconcile_engine_and_floor_on_postgres(tmp_path: Path):
    if not postgres_available():
        pytest.skip("Postgres unreachable")
    figures = reconcile_throughput.run(parse_args(TINY + ["--no-dlt", "--reconcile-profile"]), tmp_path)
    assert [f.subject for f in figures] == [
        f"{backend} {what}"
        for backend in ("duckdb", "postgres")
        for what in ("engine", "engine profile", "floor", "ours/floor")
    ]
    figures_ok(figures)
    assert "cProfile" in figures[1].notes


def test_api_efficiency(tmp_path: Path):
    # two CRMs keep this fast: HubSpot (search windows, lookups per page) and ConnectWise (forecasts in the minimum)
    figures = api_efficiency.run(parse_args(TINY + ["--api-crm", "hubspot", "--api-crm", "connectwise"]), tmp_path)
    assert [f.subject for f in figures] == ["hubspot", "connectwise"]
    figures_ok(figures)
    assert all("requests" in f.measured for f in figures)


def test_memory_in_a_child_process(tmp_path: Path):
    # two CRMs keep this fast: Salesforce (the Dagster comparison's) and ConnectWise (its lean options)
    figures = memory.run(parse_args(TINY + ["--memory-crm", "salesforce", "--memory-crm", "connectwise"]), tmp_path)
    figures_ok(figures)
    assert [f.subject for f in figures[:2]] == ["salesforce -> duckdb", "connectwise -> duckdb"]
    assert all(f.measured.endswith("MB peak RSS") for f in figures[:2])
    assert "{'forecast': False}" in figures[1].notes
    # the same sync through the library and through Dagster's sync job, compared
    assert figures[2].subject.endswith("Dagster / library") and figures[2].measured.endswith("x")


def test_a_run_prints_one_table_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Through the command line, with the latency benchmark at a tiny size on one CRM."""
    results = tmp_path / "RESULTS.md"
    assert (
        main(
            [
                "--only",
                "latency",
                "--latency-opportunities",
                "300",
                "--latency-crm",
                "salesforce",
                "--workdir",
                str(tmp_path / "w"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "benchmark" in out and "latency floor" in out
    text = results.read_text()
    assert "MemTotal" in text and "--latency-opportunities 300" in text and "| latency floor | salesforce |" in text
    # three rounds by default, interleaved; the fastest of each side compared, every wall shown
    assert re.search(r"best of 3 rounds \(at 50 ms: [\d.]+ / [\d.]+ / [\d.]+s; with no latency: [\d.]+ / ", text)
    # the overlap figure: the same sync with no latency measured beside it
    hidden = re.search(
        r"\| latency hidden \| salesforce \| ([\d.]+)s = ([\d.]+)x \| <= 1.3x max\(floor, no latency\) \(([\d.]+)s\)",
        text,
    )
    assert hidden, text
    wall, ratio, overlap = map(float, hidden.groups())
    # the table prints seconds to 0.1 s and the ratio to 0.01: the ratio lies within what the rounding allows
    assert (
        overlap > 0
        and (wall - 0.05) / (overlap + 0.05) - 0.005 <= ratio <= (wall + 0.05) / max(overlap - 0.05, 0.01) + 0.005
    )
    assert "the same sync with no latency" in text


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path: Path):
    # two CRMs keep this fast (the hourly run is the same code per connection; `make bench` runs all five):
    # Salesforce, and ConnectWise at its own size (--e2e-connectwise)
    figures = end_to_end.run(parse_args(TINY + ["--e2e-crm", "salesforce", "--e2e-crm", "connectwise"]), tmp_path)
    figures_ok(figures)
    assert "all jobs succeeded" in figures[0].notes
    assert figures[0].subject == "2 connections x 300/50"
    assert (
        "salesforce " in figures[0].notes and "connectwise " in figures[0].notes and "build_mart " in figures[0].notes
    )


def test_fail_fast_measures_a_permanent_failure(tmp_path: Path):
    """benchmarks/fail_fast.py (the seconds the permanent-error tests no longer assert), one CRM and fault."""
    from benchmarks import fail_fast

    figure = fail_fast.measure("connectwise", "forbidden", 20, tmp_path)
    figures_ok([figure])
    assert "permanent;" in figure.notes and "client retries 0" in figure.notes


def test_simulator_scale_checks_every_crm():
    """benchmarks/simulator_scale.py builds 100,000-opportunity tenants (minutes): here only that it covers
    every CRM; `make bench` runs it."""
    from benchmarks import simulator_scale
    from oppsync_pipeline.sandbox.cluster import CRMS

    assert set(simulator_scale.CHECKS) == set(CRMS)


def test_freshness_breakdown_follows_each_change_through_its_runs():
    """make bench, freshness: each change's time split over the runs that carried it (a pure reading of run times)."""
    from benchmarks.freshness import Change, Run, breakdown

    runs = [
        Run("sandbox-hubspot", created=101.0, started=103.0, ended=105.0),  # carries the change at 100
        Run("sandbox-salesforce", created=101.5, started=102.0, ended=104.0),  # another connection
        Run(None, created=104.0, started=104.5, ended=110.0),  # a build that started before the sync ended
        Run(None, created=106.0, started=111.0, ended=116.0),  # the build after the sync
    ]
    text = breakdown([Change("sandbox-hubspot", made=100.0, seen=117.0)], runs)
    assert text.startswith("notification to sync run queued 1.0/1.0s; sync queued to started")
    assert "sync run 2.0/2.0s" in text
    assert "mart queued to started (queue, run worker start) 5.0/5.0s; mart build (dbt run) 5.0/5.0s" in text
    assert "build done to row read 1.0/1.0s (1 of 1 changes matched)" in text
    assert breakdown([Change("sandbox-dynamics", made=100.0, seen=117.0)], runs) == (
        "no change could be matched to its runs"
    )


def test_wire_overhead_replays_the_syncs_requests(tmp_path: Path):
    """benchmarks/wire_overhead.py on one CRM (HubSpot: its replay keeps to the documented search rate), the
    simulator in its own process; the replay got the answers the sync got."""
    from benchmarks import wire_overhead

    args = parse_args(["--wire-opportunities", "150", "--wire-crm", "hubspot", "--wire-profile"])
    figures = wire_overhead.run(args, tmp_path)
    assert [f.subject for f in figures] == ["hubspot", "hubspot sync profile"]
    figures_ok(figures)
    assert figures[0].measured.endswith("x wire") and "requests replayed" in figures[0].notes
    assert "differ" not in figures[0].notes
    assert "cProfile" in figures[1].notes
