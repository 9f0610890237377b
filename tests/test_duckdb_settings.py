"""`warehouse.duckdb:` settings: typed in the configuration (a wrong value names its key), applied by the engine,
overridable for one process by the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import ConfigError, DuckDBSettings, parse_config
from oppsync_pipeline.lib.warehouse.engine import (
    LEAN_MEMORY_LIMIT_MB,
    _checkpoint_memory,
    make_engine,
    transaction,
)


def settings_of(engine) -> tuple[str, int]:
    with engine.connect() as c:
        return (
            c.execute(text("SELECT current_setting('memory_limit')")).scalar(),
            int(c.execute(text("SELECT current_setting('threads')")).scalar()),
        )


def test_the_configured_settings_reach_duckdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("OPPSYNC_DUCKDB_THREADS", raising=False)
    cfg = parse_config(
        {"warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}", "duckdb": {"memory_limit": "300MB", "threads": 1}}}
    )
    limit, threads = settings_of(make_engine(cfg.warehouse.url, cfg.warehouse.duckdb))
    assert (limit, threads) == ("286.1 MiB", 1)  # DuckDB reports 300 MB (10^6 bytes) in MiB


def test_the_environment_overrides_them_for_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPPSYNC_DUCKDB_THREADS", "2")
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(threads=1))
    assert settings_of(engine)[1] == 2


@pytest.mark.parametrize(
    "duckdb, key",
    [
        ({"memory_limit": "lots"}, "warehouse.duckdb.memory_limit"),
        ({"threads": 0}, "warehouse.duckdb.threads"),
        ({"memroy_limit": "1GB"}, "warehouse.duckdb.memroy_limit"),
    ],
)
def test_a_wrong_setting_names_its_key(duckdb: dict, key: str):
    with pytest.raises(ConfigError) as err:
        parse_config({"warehouse": {"url": "duckdb:///w.duckdb", "duckdb": duckdb}})
    assert key in str(err.value)


def test_the_checkpoint_at_close_runs_under_a_lower_limit_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """engine.transaction lowers DuckDB's memory limit after the commit, for the checkpoint that closing runs;
    the statements ran under the configured limit, and the next transaction has it again."""
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(memory_limit="300MB"))
    seen = []
    with transaction(engine) as c:
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
        c.execute(text("CREATE TABLE t AS SELECT range AS i, repeat('x', 200) AS s FROM range(50000)"))
        _checkpoint_memory(c)
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
    with transaction(engine) as c:
        seen.append(c.execute(text("SELECT current_setting('memory_limit')")).scalar())
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 50000
    assert seen == ["286.1 MiB", f"{LEAN_MEMORY_LIMIT_MB:.1f} MiB", "286.1 MiB"]


def test_the_checkpoint_limit_is_never_above_the_configured_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(memory_limit="64MiB"))
    with engine.connect() as c:
        _checkpoint_memory(c)
        assert c.execute(text("SELECT current_setting('memory_limit')")).scalar() == "64.0 MiB"


def test_a_wrong_environment_setting_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", "256MB'; DROP TABLE x; --")
    with pytest.raises(ConfigError) as err:
        make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}")
    assert "OPPSYNC_DUCKDB_MEMORY_LIMIT" in str(err.value)


def test_transactions_share_one_duckdb_instance_and_release_the_file_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Starting a DuckDB instance costs ~25 ms and attaching the file ~3 ms: the engine starts one per process and
    attaches the warehouse per connection. Between transactions the file is free for another process (a Dagster
    run of another connection, dbt), and what one transaction committed is in the file itself (checkpointed)."""
    import subprocess
    import sys

    import duckdb

    started = []
    real_connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: started.append(a) or real_connect(*a, **k))
    path = tmp_path / "w.duckdb"
    engine = make_engine(f"duckdb:///{path}")
    other_process = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
        "print(c.execute('SELECT count(*) FROM t').fetchone()[0]); c.execute('INSERT INTO t VALUES (0)')"
    )
    with transaction(engine) as c:
        c.execute(text("CREATE TABLE t (i INTEGER)"))
    for i in range(1, 4):
        with transaction(engine) as c:
            c.execute(text("INSERT INTO t VALUES (:i)"), {"i": i})
            assert c.execute(text("SELECT current_database()")).scalar() == "warehouse"
        seen = subprocess.run([sys.executable, "-c", other_process, str(path)], capture_output=True, text=True)
        assert seen.returncode == 0, seen.stderr
        assert int(seen.stdout) == 2 * i - 1  # ours and the other process's rows so far
    assert not Path(f"{path}.wal").exists()
    with transaction(engine) as c:
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 6
    assert started == [(":memory:",)]


def test_a_failed_detach_starts_a_new_instance(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """If the file could not be detached (its checkpoint failed), the instance that may still hold it is closed
    and the next connection starts a new one: the file is never left attached, and nothing committed is lost."""
    import duckdb

    path = tmp_path / "w.duckdb"
    engine = make_engine(f"duckdb:///{path}")
    with transaction(engine) as c:
        raw = c.connection.dbapi_connection
        instance, real_execute = raw._instance, raw.execute

        def execute(statement: str, *args):
            if statement.startswith("DETACH"):
                raise duckdb.IOException("disk full (simulated)")
            return real_execute(statement, *args)

        raw.execute = execute
        c.execute(text("CREATE TABLE t AS SELECT 1 AS i"))
    assert instance._db is None
    assert "could not detach" in caplog.text
    with duckdb.connect(str(path)) as other:  # the file is free
        assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    with transaction(engine) as c:
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 1


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_the_shared_instance_hands_back_a_transactions_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The process's one DuckDB instance outlives its transactions; what a transaction used must not stay
    resident after it (a live instance kept ~125 MB after a 100,000-row transaction until its memory limit was
    set again, and a sync's next read peaked on top of it)."""
    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings(memory_limit="256MB"))
    with transaction(engine) as c:  # the instance started, the file attached once
        c.execute(text("SELECT 1"))
    before = _rss_mb()
    with transaction(engine) as c:
        c.execute(text("CREATE TABLE t AS SELECT range AS id, repeat(md5(range::VARCHAR), 40) AS s FROM range(100000)"))
        c.execute(text("CREATE TEMP TABLE x AS SELECT id, md5(s) AS h FROM t"))
        assert c.execute(text("SELECT count(DISTINCT h) FROM x")).scalar() == 100_000
        during = _rss_mb()
    after = _rss_mb()
    assert during - before > 60, "the transaction used too little memory to show anything"
    assert after - before < 40, f"{after - before:.0f} MB stayed resident after the transaction"


def test_importing_the_sync_starts_no_duckdb_instance():
    """`limit_malloc_arenas` (lib/memory.py) bounds glibc's arenas only for threads that have not allocated yet.
    Importing duckdb_engine opens a DuckDB instance, whose threads would take arenas of their own first: a
    100,000-opportunity Salesforce full sync peaked ~55 MB higher when engine.py imported it at the top."""
    import subprocess
    import sys

    probe = (
        "import sys, oppsync_pipeline.lib.sync, oppsync_pipeline.lib.warehouse.engine, oppsync_pipeline.cli; "
        "print('duckdb_engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "importing the sync imported duckdb_engine"


def _child_keeps_the_parents_instance(expected: int, done) -> None:
    from oppsync_pipeline.lib.warehouse import engine as engine_module

    done.put(any(id(db) == expected for db in engine_module._INHERITED))


def test_a_forked_child_keeps_the_parents_duckdb_instance_referenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A forked child must never close the parent's DuckDB instance (its threads did not come along): the engine
    keeps every live instance referenced in the child (os.register_at_fork)."""
    import multiprocessing

    from oppsync_pipeline.lib.warehouse import engine as engine_module

    monkeypatch.delenv("OPPSYNC_DUCKDB_MEMORY_LIMIT", raising=False)
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}")
    with transaction(engine) as c:
        c.execute(text("SELECT 1"))
    [instance] = [
        i
        for i in engine_module._INSTANCES
        if i._db is not None and i.config["temp_directory"].startswith(str(tmp_path))
    ]
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    child = ctx.Process(target=_child_keeps_the_parents_instance, args=(id(instance._db), done))
    child.start()
    child.join(30)
    assert done.get(timeout=5) is True
    engine.dispose()
