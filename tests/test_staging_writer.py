"""StagingWriter: an extract's pages reach staging in batches (one short transaction each), bounded by rows
and by raw payload, and whatever is staged is exactly what the pages held, on both warehouses."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib import staging
from oppsync_pipeline.lib.record import Opportunity
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine, transaction


def page(start: int, n: int, raw_size: int = 10) -> list[Opportunity]:
    return [
        Opportunity(
            connection="c1",
            crm="salesforce",
            source_id=f"id{i}",
            project_name=f"Deal {i}",
            client_name="Acme",
            service_location=None,
            sales_executive=None,
            owner_crm_id="005A",
            stage="Prospecting",
            status="open",
            amount=1000.0 + i,
            currency="USD",
            close_date=None,
            probability=10.0,
            created_at=datetime(2026, 1, 1),
            created_by_crm_id="005A",
            modified_at=datetime(2026, 1, 1) + timedelta(seconds=i),
            raw={"pad": "x" * raw_size},
        )
        for i in range(start, start + n)
    ]


def staged(engine) -> list[tuple]:
    with transaction(engine) as c:
        return c.execute(
            text("SELECT source_id, seq, in_open_set, amount, row_hash FROM oppsync.stage_opportunities ORDER BY seq")
        ).fetchall()


def started(url: str):
    engine = make_engine(url)
    ensure_schema(engine)
    store.begin_extract(
        engine,
        extract_id="x",
        connection="c1",
        crm="salesforce",
        mode="full",
        started_at=datetime(2026, 3, 1),
        since=None,
    )
    return engine


def test_pages_are_written_a_batch_at_a_time(warehouse_url):
    engine = started(warehouse_url)
    writer = store.StagingWriter(engine, "x", batch_rows=5, batch_chars=10**9)
    writer.add(page(0, 3), True, 0)
    assert staged(engine) == []  # under the batch size: nothing written yet
    writer.add(page(3, 3), False, 3)  # the batch filled: written in one go, behind the read
    writer.wait()
    assert len(staged(engine)) == 6 and writer.written == 6
    writer.add(page(6, 2), True, 6)
    assert len(staged(engine)) == 6
    assert writer.flush() == 2 and writer.flush() == 0
    rows = staged(engine)
    assert [r.source_id for r in rows] == [f"id{i}" for i in range(8)]
    assert [r.seq for r in rows] == list(range(8))
    assert [r.in_open_set for r in rows] == [True] * 3 + [False] * 3 + [True] * 2
    # the same digest as staging a page at once (and as record.row_hash, whichever side computed it)
    assert [r.row_hash for r in rows] == [o.row_hash() for o in page(0, 8)]
    engine.dispose()


def test_a_batch_is_also_bounded_by_raw_payload(warehouse_url):
    engine = started(warehouse_url)
    writer = store.StagingWriter(engine, "x", batch_rows=10**6, batch_chars=5_000, convert_rows=1)
    writer.add(page(0, 2, raw_size=1_000), True, 0)
    assert staged(engine) == []
    writer.add(page(2, 3, raw_size=1_000), True, 2)  # 5 records of ~1 kB: the payload bound is reached
    writer.wait()
    assert len(staged(engine)) == 5
    engine.dispose()


def test_consecutive_pages_of_a_set_are_converted_together(warehouse_url, monkeypatch):
    """Pages are converted to Arrow a group at a time (convert_rows), a group never spanning two sets or a gap
    in seq; what is staged is the same as page by page, scopes included."""
    conversions = []
    real_stage_batch = staging.stage_batch

    def counted(*args, **kwargs):
        conversions.append(len(args[1]))
        return real_stage_batch(*args, **kwargs)

    monkeypatch.setattr(staging, "stage_batch", counted)
    engine = started(warehouse_url)
    writer = store.StagingWriter(engine, "x", convert_rows=5)
    writer.add(page(0, 2), True, 0)
    writer.add(page(2, 2), True, 2, scopes=["in", "filtered_out"])
    assert conversions == []  # 4 records: not yet
    writer.add(page(4, 2), True, 4)  # 6 records: converted together
    writer.add(page(6, 1), True, 6)
    writer.add(page(7, 2), False, 7)  # another set: what the set before left is converted alone
    writer.add(page(20, 1), False, 20)  # a gap in seq: likewise
    writer.flush()
    assert conversions == [6, 1, 2, 1]
    rows = staged(engine)
    assert [r.seq for r in rows] == [*range(9), 20]
    assert [r.in_open_set for r in rows] == [True] * 7 + [False] * 3
    with transaction(engine) as c:
        scopes = [r[0] for r in c.execute(text("SELECT scope FROM oppsync.stage_opportunities ORDER BY seq"))]
    assert scopes == ["in"] * 3 + ["filtered_out"] + ["in"] * 6
    engine.dispose()


def test_an_extract_that_fails_before_its_flush_stages_nothing_more(warehouse_url):
    """Buffered pages of a failed extract never reach the warehouse; what was flushed is dropped with the
    extract (finish_extract with a failure status), as before batching."""
    engine = started(warehouse_url)
    writer = store.StagingWriter(engine, "x", batch_rows=4, batch_chars=10**9)
    writer.add(page(0, 4), True, 0)
    writer.add(page(4, 2), True, 4)
    writer.abandon()  # as run_extract does when the extract fails: the write under way lands first
    assert len(staged(engine)) == 4
    store.finish_extract(engine, "x", status="failed", finished_at=datetime(2026, 3, 1), error="boom")
    assert staged(engine) == []
    engine.dispose()


class GatedWrites:
    """staging.write_batch, each call held until the test opens its gate: when the writes happen, not what they
    write (the real write follows)."""

    def __init__(self, monkeypatch, fail_first: bool = False) -> None:
        self.real, self.fail_first = staging.write_batch, fail_first
        self.started, self.gate, self.calls = threading.Semaphore(0), threading.Event(), []
        monkeypatch.setattr(staging, "write_batch", self)

    def __call__(self, engine, table):
        self.calls.append((threading.current_thread().name, table.num_rows))
        self.started.release()
        assert self.gate.wait(30)
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("the warehouse refused the batch")
        return self.real(engine, table)


def test_a_full_batch_is_written_behind_the_read(warehouse_url, monkeypatch):
    """`add` hands a full batch to a helper thread and returns: the caller goes on reading and converting while
    it is written. One batch at a time: the next full batch waits for it; `flush` returns once all is written."""
    engine = started(warehouse_url)
    writes = GatedWrites(monkeypatch)
    writer = store.StagingWriter(engine, "x", batch_rows=4, batch_chars=10**9)
    writer.add(page(0, 4), True, 0)  # full: handed on, and add returned while it waits at the gate
    assert writes.started.acquire(timeout=30)
    writer.add(page(4, 2), True, 4)  # held, not full: the caller is not kept waiting
    assert writes.calls == [("oppsync-stage_0", 4)] and writer.written == 0
    flushed = threading.Thread(target=writer.flush)
    flushed.start()
    flushed.join(0.3)
    assert flushed.is_alive()  # flush waits for the batch under way before it writes the rest
    writes.gate.set()
    flushed.join(30)
    assert [c[1] for c in writes.calls] == [4, 2] and writer.written == 6
    assert [r.source_id for r in staged(engine)] == [f"id{i}" for i in range(6)]
    engine.dispose()


def test_a_batch_that_fails_behind_the_read_raises_in_the_next_call(warehouse_url, monkeypatch):
    """A failed write is not lost in its thread: the next `add` that hands on a batch, or `flush`, raises it,
    and the batch after it is not written (the extract fails; its staging is dropped)."""
    engine = started(warehouse_url)
    writes = GatedWrites(monkeypatch, fail_first=True)
    writes.gate.set()
    writer = store.StagingWriter(engine, "x", batch_rows=4, batch_chars=10**9)
    writer.add(page(0, 4), True, 0)
    with pytest.raises(RuntimeError, match="refused the batch"):
        writer.add(page(4, 4), True, 4)
    assert len(writes.calls) == 1 and staged(engine) == []
    engine.dispose()


def test_abandon_waits_for_the_write_under_way_and_keeps_the_extracts_failure(warehouse_url, monkeypatch, caplog):
    engine = started(warehouse_url)
    writes = GatedWrites(monkeypatch, fail_first=True)
    writer = store.StagingWriter(engine, "x", batch_rows=4, batch_chars=10**9)
    writer.add(page(0, 4), True, 0)
    writer.add(page(4, 2), True, 4)
    assert writes.started.acquire(timeout=30)
    threading.Timer(0.2, writes.gate.set).start()
    writer.abandon()  # returns once the write ended (here: failed), raising nothing; what was held is dropped
    assert writes.gate.is_set() and len(writes.calls) == 1
    assert "failed to write as well" in caplog.text
    writer.flush()
    assert len(writes.calls) == 1 and staged(engine) == []
    engine.dispose()


def awkward_page() -> list[Opportunity]:
    """Values the columnar path converts in bulk that the row path converted one by one: NUL bytes, empty text,
    a text that reads \\N, a time zone, an integer amount, NULLs, a year before 1000, quotes and line breaks."""
    base = page(0, 4)
    base[0].project_name, base[0].client_name, base[0].sales_executive = "a\x00b", "", "\\N"
    base[1].created_at = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5)))
    base[1].amount, base[1].probability = 1000, None  # an int amount keeps record.row_hash's "1000"
    base[2].project_name, base[2].stage, base[2].raw = 'say "hi",\nbye', None, {"k": "\x00", "n": None}
    base[3].created_at, base[3].amount = datetime(999, 12, 31, 23, 59, 59, 5), 0.1 + 0.2
    return base


def test_columnar_staging_stores_what_the_row_path_defines(warehouse_url):
    """Every staged column, as the row-at-a-time definition (store.staged_rows, Python hashes) has it."""
    engine = started(warehouse_url)
    records = awkward_page()
    writer = store.StagingWriter(engine, "x")
    writer.add(records[:2], True, 0, scopes=["in", "filtered_out"])
    writer.add(records[2:], False, 2)
    writer.flush()
    with transaction(engine) as c:
        cols = ", ".join(store.STAGE_COLUMNS)
        stored = [tuple(r) for r in c.execute(text(f"SELECT {cols} FROM oppsync.stage_opportunities ORDER BY seq"))]
    expected = store.staged_rows("x", records[:2], True, 0, scopes=["in", "filtered_out"])
    expected += store.staged_rows("x", records[2:], False, 2)
    assert stored == expected
    engine.dispose()


def test_a_forked_process_hashes_with_a_duckdb_of_its_own():
    """Postgres-bound batches are hashed by an in-process DuckDB; a forked child (a run worker, a Celery worker)
    must not use the parent's, whose threads did not come along: it starts its own and hashes the same."""
    import os

    import pyarrow as pa

    from oppsync_pipeline.lib import staging
    from oppsync_pipeline.lib.columnar import STAGE_SCHEMA

    batch = pa.Table.from_pylist(
        [
            {
                "extract_id": "x",
                "connection": "c",
                "source_id": "1",
                "seq": 0,
                "in_open_set": True,
                "crm": "salesforce",
                "status": "open",
                "amount": 12.5,
                "project_name": "Deal",
            }
        ],
        schema=STAGE_SCHEMA,
    )
    parent_digest = staging._hashed(batch).column("row_hash")[0].as_py()
    parent_hasher = staging._hasher()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got a new hasher and the digest it computes, then leave at once
        try:
            digest = staging._hashed(batch).column("row_hash")[0].as_py()
            os.write(write, f"{staging._hasher() is not parent_hasher} {digest}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    answer = os.read(read, 200).decode().split()
    os.close(read)
    assert answer == ["True", parent_digest]
    assert staging._hasher() is parent_hasher  # the parent keeps its own


def test_reported_counts_take_each_ids_latest_staged_version(warehouse_url):
    """finish_extract counts what the reconcile will track: each id once, as its latest staged version (latest
    modified_at, a missing one older than any, ties to the one staged last), in scope or already tracked."""
    engine = started(warehouse_url)
    base = page(0, 8)
    t = datetime(2026, 2, 1)

    def version(i: int, status: str, modified: datetime | None) -> Opportunity:
        o = base[i]
        return dataclasses.replace(o, status=status, modified_at=modified)

    writer = store.StagingWriter(engine, "x")
    # id0: open, then won later (latest: won); id1: won, then open at the same time, staged last (latest: open);
    # id2: lost with no modified_at, then open (latest: open); id3, id4: once each, open and lost;
    # id5: open but filtered out; id6: open before the stage trigger, not tracked; id7: lost, seen twice the same
    writer.add([version(0, "open", t), version(1, "won", t), version(2, "lost", None)], True, 0)
    writer.add([version(3, "open", t), version(4, "lost", t)], True, 3)
    writer.add([version(5, "open", t), version(6, "open", t)], True, 5, scopes=["filtered_out", "before_stage"])
    writer.add([version(7, "lost", t), version(7, "lost", t)], False, 7)
    writer.add([version(0, "won", t + timedelta(hours=1)), version(1, "open", t), version(2, "open", t)], False, 9)
    writer.flush()
    store.finish_extract(engine, "x", status="complete", finished_at=datetime(2026, 3, 1), counts={"open": 12})
    row = store.load_extract(engine, "x")
    # open: id1, id2, id3; not open: id0 (won), id4, id7
    assert (row["reported_open"], row["reported_closed"]) == (3, 3)
    engine.dispose()
