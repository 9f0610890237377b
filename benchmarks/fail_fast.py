"""Fail fast (issue 16 moved it here from tests/dagster/test_permanent_errors.py and the CRM tenant tests): the
wall seconds from the start of a sync to its failure when the CRM refuses the opportunity read for good (403,
400). The tests assert the behaviour without a clock (the refused read is sent once: no retry, no wait); the
seconds depend on the machine, so they are a figure here, against the 10 s the tests used to assert.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import Figure, progress, sandbox_config, timed, verdict
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

NAME = "fail fast"
TARGET_SECONDS = 10.0
FAULTS = ("forbidden", "bad_request")
# The opportunity reads of each CRM (required: a refusal there fails the run), as in the Dagster test.
OPPORTUNITY_PATH = {
    "salesforce": r"/query",
    "hubspot": r"/crm/v3/objects/deals",
    "dynamics": r"/opportunities",
    "connectwise": r"/sales/opportunities$",
    "autotask": r"/Opportunities/query",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fail fast")
    g.add_argument("--fail-fast-opportunities", type=int, default=30, help="tenant size per CRM")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    return [
        measure(crm, fault, args.fail_fast_opportunities, workdir / f"fail-fast-{crm}-{fault}")
        for crm in CRMS
        for fault in FAULTS
    ]


def measure(crm: str, fault: str, n: int, workdir: Path) -> Figure:
    progress(f"fail fast: {crm}, {fault} on the opportunity read")
    rule = FaultRule(fault, count=0, path=OPPORTUNITY_PATH[crm])
    sim = build_simulator(crm, seed=11, opportunities=n, faults=FaultPlan(rules=[rule]))
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir)
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        connector = build_connector(cfg, cfg.connections[0])
        failed_permanently = False
        with timed() as t:
            try:
                sync_connection(cfg, cfg.connections[0], engine, run_id="fail-fast", mode="full", connector=connector)
            except ExtractFailed as err:
                failed_permanently = err.permanent
        engine.dispose()
    ok = failed_permanently and t["s"] < TARGET_SECONDS
    stats = connector.stats
    notes = (
        f"{'permanent' if failed_permanently else 'NOT a permanent failure'}; refused path answered "
        f"{rule.fired}x (optional reads included); client retries {stats.retries}, waited "
        f"{stats.seconds_waited:.1f}s"
    )
    return Figure(NAME, f"{crm} {fault}", f"{t['s']:.1f}s", f"< {TARGET_SECONDS:.0f}s", verdict(ok), notes)
