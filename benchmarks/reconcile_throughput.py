"""Reconcile throughput (issues 9, 4, 21): a snapshot of N+1% opportunities (10% changed, 1% closed, 1% new)
applied to a warehouse already holding N, through the real engine (store.StagingWriter page by page, then
reconcile.reconcile as a full run), against two others in the same run on the same snapshot:

- the floor: the fastest plain load a database engineer would write. The records become one Arrow table
  (its construction timed) applied with one upsert: DuckDB `INSERT OR REPLACE` on the primary key; Postgres
  COPY (CSV written by Arrow) into a temporary table, then `INSERT ... ON CONFLICT DO UPDATE ... WHERE ...
  IS DISTINCT FROM`. No events, no history, no staging: what the database itself can do.
- dlt's `merge` of the same rows into the same database (its documented defaults: delete-insert merge, Python
  rows; telemetry off, pipeline files in a temp dir).

All three time the same logical operation on the same in-memory records, generated once before any timing:
loading the changed snapshot on top of the initial one. The initial load of each is not timed.
`--reconcile-profile` adds the cProfile top lines of the engine's timed part to the details.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Date, DateTime, Double, event, text
from sqlalchemy.engine import make_url

from benchmarks import synthetic
from benchmarks.common import Figure, postgres_available, progress, scratch_postgres, timed, verdict
from oppsync_pipeline.lib.columnar import ARROW_TYPES
from oppsync_pipeline.lib.reconcile import reconcile
from oppsync_pipeline.lib.record import CANONICAL, FIELDS
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.warehouse.store import S

NAME = "reconcile"
FIELD_TYPES = {f.name: f.sql_type for f in FIELDS}
# issue 21, at 1,000,000 vs 1,000,000 with 10% changed: ours / dlt (throughput) at least, ours / floor (time) at most
TARGET_DLT = {"duckdb": 50.0, "postgres": 10.0}
TARGET_FLOOR = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reconcile")
    g.add_argument("--rows", type=int, default=1_000_000, help="opportunities already in the warehouse (N)")
    g.add_argument(
        "--floor-rows",
        type=int,
        help="N for the engine against the floor, when it differs from --rows (the dlt comparison's N): make bench "
        "measures the floor at the brief's 1,000,000 and dlt at a size its merge can finish in minutes",
    )
    g.add_argument("--page-size", type=int, default=10_000, help="rows per staged page")
    g.add_argument(
        "--no-dlt", action="store_true", help="do not run dlt (a timing already in --dlt-timings is still reported)"
    )
    g.add_argument("--no-floor", action="store_true", help="skip the plain-upsert floor")
    g.add_argument(
        "--dlt-timings",
        help="a JSON file of dlt merge timings: one measured earlier on the same snapshot (same N, page size, "
        "backend and dlt version) is reused and said so, a new one is added (dlt's merge at 1,000,000 takes "
        "~10-25 min and does not depend on our code)",
    )
    g.add_argument(
        "--reconcile-profile", action="store_true", help="cProfile the engine's timed part (top lines in details)"
    )


@lru_cache(maxsize=1)
def snapshot_pages(n: int, page_size: int) -> tuple[list, ...]:
    """The snapshot's records, generated once (untimed) and held in memory: the engine, the floor and dlt all
    load these same records (about 1 kB each: ~1 GB at 1,000,000)."""
    return tuple(synthetic.snapshot(n, page_size))


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    try:
        return _run(args, workdir)
    finally:
        snapshot_pages.cache_clear()


def _run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    """The engine against the floor at `--floor-rows`, against dlt at `--rows`: one engine run serves both where
    the two sizes are the same. Each size's snapshot is generated once (untimed) for both backends."""
    floor_n = args.floor_rows or args.rows
    with_dlt = not args.no_dlt or bool(args.dlt_timings)
    sizes = [floor_n] if floor_n == args.rows or not with_dlt else [floor_n, args.rows]
    backends = ["duckdb"] + (["postgres"] if postgres_available() else [])
    figures: dict[str, list[Figure]] = {b: [] for b in backends}
    for n in sizes:
        progress(f"reconcile: generating the snapshot of {synthetic.snapshot_size(n):,} records (untimed)")
        snapshot_pages.cache_clear()  # one size held at a time (~1 GB at 1,000,000)
        snapshot_pages(n, args.page_size)
        against = {"floor": n == floor_n, "dlt": n == args.rows and with_dlt, "sizes": len(sizes)}
        for backend in backends:
            if backend == "duckdb":
                url = f"duckdb:///{workdir / f'reconcile-{n}.duckdb'}"
                figures[backend] += _one_backend(url, backend, args, workdir, n, against)
            else:
                with scratch_postgres() as url:
                    figures[backend] += _one_backend(url, backend, args, workdir, n, against)
    out = [f for b in backends for f in figures[b]]
    if len(backends) == 1:
        out.append(Figure(NAME, "postgres", "not run", "-", "MISS", "Postgres did not answer"))
    return out


def _one_backend(
    url: str, backend: str, args: argparse.Namespace, workdir: Path, n: int, against: dict
) -> list[Figure]:
    """The engine at N, then what it is compared with at this N (`against`: the floor, dlt). Where make bench
    compares the two at different sizes, the dlt comparison's figures name their N."""
    page = args.page_size
    progress(f"reconcile: engine on {backend}, N={n:,}")
    ours = engine_load(url, n, page, profile=getattr(args, "reconcile_profile", False))
    progress(f"reconcile: engine on {backend}: stage {ours['stage_s']:.1f}s, reconcile {ours['reconcile_s']:.1f}s")
    rows = synthetic.snapshot_size(n)
    ours_rps = rows / ours["total_s"]
    at = f" at {n:,}" if against["sizes"] > 1 and not against["floor"] else ""
    out = [
        Figure(
            NAME,
            f"{backend} engine{at}",
            f"{ours_rps:,.0f} rows/s",
            "-",
            "info",
            f"N={n:,}, snapshot {rows:,} rows: staging {ours['stage_s']:.1f}s + reconcile "
            f"{ours['reconcile_s']:.1f}s = {ours['total_s']:.1f}s; {ours['result']}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times on a shared machine)",
        )
    ]
    if ours.get("profile"):
        out.append(Figure(NAME, f"{backend} engine profile", "-", "-", "info", ours["profile"]))
    if against["floor"] and not getattr(args, "no_floor", False):
        progress(f"reconcile: floor (Arrow table + one upsert) on {backend}")
        floor = floor_load(url if backend == "postgres" else f"duckdb:///{workdir / f'floor-{n}.duckdb'}", n, page)
        times = ours["total_s"] / floor["s"]
        out.append(
            Figure(
                NAME,
                f"{backend} floor",
                f"{rows / floor['s']:,.0f} rows/s",
                "-",
                "info",
                f"Arrow table {floor['build_s']:.1f}s + one upsert {floor['upsert_s']:.1f}s = {floor['s']:.1f}s "
                f"({floor['how']}); no events, no history",
            )
        )
        out.append(
            Figure(
                NAME,
                f"{backend} ours/floor",
                f"{times:.1f}x floor",
                f"<= {TARGET_FLOOR:.0f}x floor",
                verdict(times <= TARGET_FLOOR),
                f"N={n:,}: engine {ours['total_s']:.1f}s vs floor {floor['s']:.1f}s for the same snapshot",
            )
        )
    reuse_only = args.no_dlt
    if not against["dlt"]:
        return out
    dlt_s, dlt_when = dlt_seconds(url, backend, n, page, workdir / f"dlt-{backend}-{n}", args.dlt_timings, reuse_only)
    if dlt_s is None:
        return out
    dlt_rps = rows / dlt_s
    ratio = ours_rps / dlt_rps
    out.append(
        Figure(
            NAME,
            f"{backend} dlt merge",
            f"{dlt_rps:,.0f} rows/s",
            "-",
            "info",
            f"N={n:,}: dlt {dlt_s:.1f}s for the same snapshot"
            + (f" (measured {dlt_when} by an earlier run of this benchmark, reused)" if dlt_when else ""),
        )
    )
    out.append(
        Figure(
            NAME,
            f"{backend} ours/dlt",
            f"{ratio:.1f}x",
            f">= {TARGET_DLT[backend]:.0f}x dlt",
            verdict(ratio >= TARGET_DLT[backend]),
            f"N={n:,}: {ours_rps:,.0f} vs {dlt_rps:,.0f} rows/s"
            + (f" (the floor's comparison is at {args.floor_rows:,}: dlt's merge there takes 10-25 min)" if at else ""),
        )
    )
    return out


def _stage_extract(engine, extract_id: str, pages) -> None:
    """Stage the pages as run_extract does (sync.py): through a StagingWriter, the open set and the
    not-open set of each page separately."""
    store.begin_extract(
        engine,
        extract_id=extract_id,
        connection=synthetic.CONNECTION,
        crm=synthetic.CRM,
        mode="full",
        started_at=datetime(2026, 3, 1),
        since=None,
    )
    staging = store.StagingWriter(engine, extract_id)
    seq = 0
    for p in pages:
        open_rows = [o for o in p if o.status == "open"]
        closed_rows = [o for o in p if o.status != "open"]
        for rows, is_open in ((open_rows, True), (closed_rows, False)):
            if rows:
                seq += staging.add(rows, is_open, seq)
    staging.flush()
    store.finish_extract(engine, extract_id, status="complete", finished_at=datetime(2026, 3, 1), counts={"open": seq})


def _reconcile(engine, extract_id: str, observed: datetime):
    return reconcile(
        engine,
        extract_id=extract_id,
        connection=synthetic.CONNECTION,
        crm=synthetic.CRM,
        mode="full",
        run_id=extract_id,
        observed_at=observed,
        recorded_at=observed,
        check_lock=False,
    )


def engine_load(url: str, n: int, page_size: int, profile: bool = False) -> dict[str, Any]:
    """Initial N (untimed), then the snapshot: staging and reconcile timed separately (and profiled: the
    profile's top lines by own time, when asked; cProfile slows Python code, so the times are then higher)."""
    engine = make_engine(url)
    ensure_schema(engine)
    _stage_extract(engine, "initial", synthetic.baseline(n, page_size))
    _reconcile(engine, "initial", datetime(2026, 2, 1))
    if engine.dialect.name == "postgresql":
        # Between two real runs autovacuum has analyzed the freshly loaded table; here the snapshot follows
        # at once, and without statistics Postgres plans the delete inference as a nested loop (see RESULTS.md).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"ANALYZE {S}.opportunities"))
    # CPU time, not wall: on a shared machine the wall clock mostly measures the other processes
    profiler = cProfile.Profile(time.process_time) if profile else None
    clock = StatementClock(engine) if profile else None
    with profiler or nullcontext():
        with timed() as t_stage:
            _stage_extract(engine, "snapshot", snapshot_pages(n, page_size))
        with timed() as t_rec:
            result = _reconcile(engine, "snapshot", datetime(2026, 3, 1))
    if clock:
        clock.close()
    with engine.connect() as c:
        live = c.execute(text(f"SELECT count(*) FROM {S}.opportunities WHERE deleted_at IS NULL")).scalar()
    engine.dispose()
    expected = synthetic.snapshot_size(n)
    if live != expected:
        raise AssertionError(f"engine holds {live} live opportunities, expected {expected}")
    r = result.as_dict()
    summary = f"created {r['created']:,}, updated {r['updated']:,}, closed {r['closed']:,}, same {r['skipped']:,}"
    return {
        "stage_s": t_stage["s"],
        "reconcile_s": t_rec["s"],
        "total_s": t_stage["s"] + t_rec["s"],
        "result": summary,
        "profile": f"{top_lines(profiler)}. {clock.top_lines()}" if profiler and clock else None,
    }


class StatementClock:
    """Each SQL statement's wall time and, for a Postgres server on this machine, its backend's CPU time (from
    /proc: the server's own CPU, which cProfile does not see). COPY goes around SQLAlchemy and is not listed."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    @staticmethod
    def _backend_cpu(cursor) -> float | None:
        info = getattr(cursor.connection, "info", None)
        stat = Path(f"/proc/{getattr(info, 'backend_pid', 0)}/stat")
        if not stat.exists():
            return None
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info["clock"] = (time.perf_counter(), self._backend_cpu(cursor))

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        t0, c0 = conn.info.pop("clock", (None, None))
        if t0 is None:
            return
        key = " ".join(statement.split())[:44]
        self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - t0
        c1 = self._backend_cpu(cursor) if c0 is not None else None
        if c1 is not None:
            self.cpu[key] = self.cpu.get(key, 0.0) + c1 - c0

    def top_lines(self, count: int = 6) -> str:
        def top(d: dict[str, float]) -> str:
            rows = sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:count]
            return f"{sum(d.values()):.1f}s in all: " + "; ".join(f"{v:.2f}s {k}" for k, v in rows)

        out = f"Statements by wall time, {top(self.wall)}"
        if self.cpu:
            out += f". Statements by the Postgres backend's own CPU time (/proc, 10 ms ticks), {top(self.cpu)}"
        return out


def top_lines(profiler: cProfile.Profile, count: int = 8) -> str:
    """The profile's `count` functions of most own CPU time, as `seconds function` pairs on one line."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:count]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    parts = [f"{tt:.2f}s {Path(file).name}:{line}({fn})" for (file, line, fn), (_, _, tt, _, _) in rows]
    return f"cProfile, own CPU time (all threads), of {total:.1f}s profiled: " + "; ".join(parts)


# -- the floor: one Arrow table, one upsert ----------------------------------------------------------------------

FLOOR_TABLE = "floor_opportunities"
FLOOR_COLUMNS = ("connection", "source_id", *CANONICAL, "raw")
_FLOOR_KEY = ("connection", "source_id")
_FLOOR_VALUES = tuple(c for c in FLOOR_COLUMNS if c not in _FLOOR_KEY)


def floor_table(pages) -> pa.Table:
    """The records as one Arrow table, built the plain way (a list per column, one conversion each)."""
    records = [o for p in pages for o in p]
    columns = {c: pa.array([getattr(o, c) for o in records], type=_floor_type(c)) for c in FLOOR_COLUMNS if c != "raw"}
    columns["raw"] = pa.array([orjson.dumps(o.raw).decode() for o in records], type=pa.string())
    return pa.table(columns)


def _floor_type(column: str) -> pa.DataType:
    return ARROW_TYPES[FIELD_TYPES[column]] if column in FIELD_TYPES else pa.string()


def floor_load(url: str, n: int, page_size: int) -> dict[str, Any]:
    """The baseline loaded (untimed), then the snapshot: Arrow table construction and the upsert timed."""
    if url.startswith("duckdb:"):
        return _floor_duckdb(url.split(":///", 1)[1], n, page_size)
    return _floor_postgres(url, n, page_size)


def _floor_duckdb(path: str, n: int, page_size: int) -> dict[str, Any]:
    import duckdb

    con = duckdb.connect(path)  # DuckDB's defaults: a plain load takes no tuning
    key = ", ".join(_FLOOR_KEY)
    baseline = floor_table(synthetic.baseline(n, page_size))
    con.register("batch", baseline)
    con.execute(f"CREATE TABLE {FLOOR_TABLE} AS SELECT * FROM batch")
    con.execute(f"ALTER TABLE {FLOOR_TABLE} ADD PRIMARY KEY ({key})")
    con.unregister("batch")
    del baseline
    with timed() as t_build:
        table = floor_table(snapshot_pages(n, page_size))
    with timed() as t_upsert:
        con.register("batch", table)
        con.execute(f"INSERT OR REPLACE INTO {FLOOR_TABLE} SELECT * FROM batch")
        con.unregister("batch")
    rows = con.execute(f"SELECT count(*) FROM {FLOOR_TABLE}").fetchone()[0]
    con.close()
    _check_rows("floor", rows, n)
    s = t_build["s"] + t_upsert["s"]
    return {"s": s, "build_s": t_build["s"], "upsert_s": t_upsert["s"], "how": "INSERT OR REPLACE on the key"}


def _floor_postgres(url: str, n: int, page_size: int) -> dict[str, Any]:
    engine = make_engine(url)
    cols, key = ", ".join(FLOOR_COLUMNS), ", ".join(_FLOOR_KEY)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _FLOOR_VALUES)
    changed = f"({', '.join(f'f.{c}' for c in _FLOOR_VALUES)}) IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in _FLOOR_VALUES)})"
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        types = ", ".join(f"{c} {_pg_type(c)}" for c in FLOOR_COLUMNS)
        cur.execute(f"CREATE TABLE {FLOOR_TABLE} ({types}, PRIMARY KEY ({key}))")
        _copy(cur, FLOOR_TABLE, cols, floor_table(synthetic.baseline(n, page_size)))
        raw.commit()
        cur.execute(f"ANALYZE {FLOOR_TABLE}")
        raw.commit()
        with timed() as t_build:
            table = floor_table(snapshot_pages(n, page_size))
        with timed() as t_upsert:
            cur.execute(f"CREATE TEMPORARY TABLE batch (LIKE {FLOOR_TABLE}) ON COMMIT DROP")
            _copy(cur, "batch", cols, table)
            cur.execute(
                f"INSERT INTO {FLOOR_TABLE} AS f ({cols}) SELECT {cols} FROM batch "
                f"ON CONFLICT ({key}) DO UPDATE SET {sets} WHERE {changed}"
            )
            raw.commit()
        cur.execute(f"SELECT count(*) FROM {FLOOR_TABLE}")
        rows = cur.fetchone()[0]
    finally:
        raw.close()
        engine.dispose()
    _check_rows("floor", rows, n)
    s = t_build["s"] + t_upsert["s"]
    how = "COPY (CSV by Arrow) into a temp table + INSERT ... ON CONFLICT DO UPDATE ... WHERE IS DISTINCT FROM"
    return {"s": s, "build_s": t_build["s"], "upsert_s": t_upsert["s"], "how": how}


def _pg_type(column: str) -> str:
    sql_type = FIELD_TYPES.get(column)
    return {Double: "double precision", Date: "date", DateTime: "timestamp"}.get(sql_type, "text")


def _copy(cur, table: str, cols: str, data: pa.Table) -> None:
    # valid values quoted, nulls empty and unquoted: in CSV mode an empty quoted field is an empty text
    buf = io.BytesIO()
    pa_csv.write_csv(data, buf, pa_csv.WriteOptions(include_header=False, quoting_style="all_valid"))
    buf.seek(0)
    cur.copy_expert(f"COPY {table} ({cols}) FROM STDIN WITH (FORMAT csv)", buf)


def _check_rows(side: str, rows: int, n: int) -> None:
    if rows != synthetic.snapshot_size(n):
        raise AssertionError(f"{side} holds {rows} rows, expected {synthetic.snapshot_size(n)}")


def _as_dlt_row(o) -> dict[str, Any]:
    return {
        "connection": o.connection,
        "source_id": o.source_id,
        "crm": o.crm,
        "project_name": o.project_name,
        "client_name": o.client_name,
        "service_location": o.service_location,
        "sales_executive": o.sales_executive,
        "owner_crm_id": o.owner_crm_id,
        "stage": o.stage,
        "status": o.status,
        "amount": o.amount,
        "currency": o.currency,
        "close_date": o.close_date,
        "probability": o.probability,
        "created_at": o.created_at,
        "created_by_crm_id": o.created_by_crm_id,
        "modified_at": o.modified_at,
        "raw": json.dumps(o.raw),
        "row_hash": o.row_hash(),
    }


def dlt_seconds(
    url: str, backend: str, n: int, page_size: int, pipelines_dir: Path, timings: str | None, reuse_only: bool = False
) -> tuple[float | None, str | None]:
    """dlt's merge time for this snapshot, and when it was measured if an earlier run's (from `timings`);
    None when `reuse_only` and no earlier run measured it."""
    from importlib.metadata import version

    key = f"{backend} n={n} page={page_size} dlt={version('dlt')}"
    known = json.loads(Path(timings).read_text()) if timings and Path(timings).exists() else {}
    if key in known:
        progress(f"reconcile: dlt merge on {backend}: {known[key]['s']:.1f}s, measured {known[key]['at']}")
        return known[key]["s"], known[key]["at"]
    if reuse_only:
        return None, None
    progress(f"reconcile: dlt merge on {backend}")
    s = dlt_merge(url, n, page_size, pipelines_dir)
    if timings:
        known = json.loads(Path(timings).read_text()) if Path(timings).exists() else {}
        known[key] = {"s": s, "at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}"}
        Path(timings).write_text(json.dumps(known, indent=1) + "\n", encoding="utf-8")
    return s, None


def dlt_merge(url: str, n: int, page_size: int, pipelines_dir: Path) -> float:
    """dlt merge of the baseline (untimed) then of the snapshot (timed: extract + normalize + load)."""
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "ERROR")
    import dlt

    pipelines_dir.mkdir(parents=True, exist_ok=True)
    if url.startswith("duckdb:"):
        destination = dlt.destinations.duckdb(credentials=url.split(":///", 1)[1])
    else:
        # dlt insists on a password even where the server trusts the user: a placeholder does no harm there
        pg = make_url(url)
        pg = pg.set(drivername="postgresql", password=pg.password or "unused")
        destination = dlt.destinations.postgres(credentials=pg.render_as_string(hide_password=False))
    pipeline = dlt.pipeline(
        pipeline_name="oppsync_bench",
        destination=destination,
        dataset_name="dlt_bench",
        pipelines_dir=str(pipelines_dir),
        progress=None,
    )

    def resource(pages):
        @dlt.resource(name="opportunities", write_disposition="merge", primary_key=("connection", "source_id"))
        def opportunities():
            for p in pages:
                yield [_as_dlt_row(o) for o in p]

        return opportunities

    pipeline.run(resource(synthetic.baseline(n, page_size)))
    progress("reconcile: dlt initial load done")
    with timed() as t:
        pipeline.run(resource(snapshot_pages(n, page_size)))
    with pipeline.sql_client() as client:
        rows = client.execute_sql("SELECT count(*) FROM opportunities")[0][0]
    if rows != synthetic.snapshot_size(n):
        raise AssertionError(f"dlt holds {rows} rows, expected {synthetic.snapshot_size(n)}")
    return t["s"]


if __name__ == "__main__":  # a quick look: python -m benchmarks.reconcile_throughput
    p = argparse.ArgumentParser()
    add_arguments(p)
    with tempfile.TemporaryDirectory() as d:
        for f in run(p.parse_args(), Path(d)):
            print(f)
