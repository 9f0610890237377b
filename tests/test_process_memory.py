"""lib/memory.py: a sync process keeps few glibc malloc arenas (its read threads each kept one, fragmented:
a 1,000,000-opportunity Salesforce sync peaked at 668 MB with glibc's default and 577 MB with two), and an extract
runs with fewer garbage collector passes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oppsync_pipeline.lib.memory import child_env

# Threads that allocate at once, then the number of arenas glibc made (malloc_info's <heap nr=...>).
COUNT_ARENAS = r"""
import ctypes, sys, tempfile, threading
from oppsync_pipeline.lib.memory import limit_malloc_arenas
if sys.argv[1] == "limit":
    print("limited", limit_malloc_arenas())
barrier = threading.Barrier(12)
def work():
    barrier.wait()
    blocks = [bytearray(4096) for _ in range(2000)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    print("arenas", out.read().count("<heap nr="))
"""


def arenas(mode: str, env: dict[str, str]) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS, mode], capture_output=True, text=True, env=env, check=True
    ).stdout
    return int(out.split("arenas")[1]), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_threads_share_two_arenas_when_limited_first():
    env = {k: v for k, v in child_env().items() if k != "MALLOC_ARENA_MAX"}
    default, _ = arenas("default", env)
    limited, out = arenas("limit", env)
    assert "limited True" in out
    assert limited <= 2 < default  # 12 threads allocating at once: glibc's default gives them more


def test_an_operators_setting_is_kept(monkeypatch):
    assert child_env({})["MALLOC_ARENA_MAX"] == "2"
    assert child_env({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    out = subprocess.run(
        [sys.executable, "-c", "from oppsync_pipeline.lib.memory import limit_malloc_arenas as f; print(f())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_an_extract_runs_with_fewer_garbage_collector_passes_and_restores_the_setting(duckdb_url: str, tmp_path):
    """The young generation at EXTRACT_GC_THRESHOLD0 while the pages are read (seen from the progress callback,
    called with each page staged), the process's own setting afterwards."""
    import gc

    from oppsync_pipeline.lib.memory import EXTRACT_GC_THRESHOLD0
    from oppsync_pipeline.lib.sync import run_extract
    from oppsync_pipeline.lib.warehouse.engine import make_engine
    from oppsync_pipeline.sandbox.cluster import build_simulator
    from oppsync_pipeline.sandbox.server import SandboxServer
    from tests.conftest import sandbox_config

    before = gc.get_threshold()
    seen: list[int] = []
    with SandboxServer(build_simulator("salesforce", opportunities=300, seed=7)) as server:
        cfg = sandbox_config({"salesforce": server}, duckdb_url, tmp_path)
        out = run_extract(
            cfg,
            cfg.connections[0],
            make_engine(duckdb_url),
            run_id="r1",
            progress=lambda _: seen.append(gc.get_threshold()[0]),
        )
    assert out.status == "complete" and seen
    assert set(seen) == {EXTRACT_GC_THRESHOLD0}
    assert gc.get_threshold() == before


def test_extracts_at_once_share_the_raised_threshold_and_the_last_restores_it():
    import gc
    import threading

    from oppsync_pipeline.lib.memory import EXTRACT_GC_THRESHOLD0, fewer_gc_passes

    before = gc.get_threshold()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with fewer_gc_passes():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with fewer_gc_passes():
        assert gc.get_threshold()[0] == EXTRACT_GC_THRESHOLD0
    assert gc.get_threshold()[0] == EXTRACT_GC_THRESHOLD0  # the other extract is still reading
    release.set()
    t.join(10)
    assert gc.get_threshold() == before
    gc.set_threshold(0, *before[1:])  # disabled by the process: left so
    try:
        with fewer_gc_passes():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
