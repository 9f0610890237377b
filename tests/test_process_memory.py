"""lib/memory.py: a sync process keeps few glibc malloc arenas (its read threads each kept one, fragmented:
a 1,000,000-opportunity Salesforce sync peaked at 668 MB with glibc's default and 577 MB with two)."""

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
