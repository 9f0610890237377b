"""A sync's staging batches are written behind the read (StagingWriter): when the CRM fails the run while a batch
is still being written, the write lands before the extract closes, and closing drops it with the rest of the
failed extract's staging. Over HTTP against the Salesforce simulator, into both warehouses."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib import staging
from oppsync_pipeline.lib.sync import ExtractFailed, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import salesforce as sf
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import OPPORTUNITY_PAGES


def staged_rows(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM oppsync.stage_opportunities")).scalar()


def test_a_run_failed_by_the_crm_while_a_batch_is_written_leaves_no_staging(
    warehouse_url: str, tmp_path: Path, monkeypatch
):
    sim = sf.build(seed=31, opportunities=2000)
    monkeypatch.setattr(staging, "STAGING_BATCH_ROWS", 150)  # a batch a page: one is written mid-read
    real_write = staging.write_batch
    began, landed = threading.Event(), []

    def slow_write(engine, table):
        began.set()
        time.sleep(1.0)  # still being written when the CRM's bad page fails the run
        n = real_write(engine, table)
        landed.append(time.monotonic())
        return n

    monkeypatch.setattr(staging, "write_batch", slow_write)
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"salesforce": srv}, warehouse_url, tmp_path, extra={"salesforce": {"page_size": 200}})
        engine = make_engine(cfg.warehouse.url)
        try:
            sim.faults = FaultPlan([FaultRule("wrong_shape", after=6, count=1, path=OPPORTUNITY_PAGES["salesforce"])])
            with pytest.raises(ExtractFailed):
                sync_connection(cfg, cfg.connections[0], engine, run_id="r1", mode="full")
            failed_at = time.monotonic()
            assert began.is_set(), "no batch was handed on before the run failed: the test proves nothing"
            assert landed and max(landed) <= failed_at, "the run closed its extract with a write under way"
            time.sleep(1.2)  # a write left running would have landed by now
            assert staged_rows(engine) == 0
        finally:
            engine.dispose()
