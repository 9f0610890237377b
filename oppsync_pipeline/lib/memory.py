"""Process memory: keep what a sync's read threads leave behind from staying resident.

glibc gives every thread that allocates its own malloc arena (up to 8 per core). A full read's threads (up to 25
for Salesforce, 51 for Dataverse) each parse pages in their arena; what they free stays resident there,
fragmented, and the reconcile's DuckDB buffer pool comes on top of it: a 1,000,000-opportunity Salesforce sync
peaked at 668 MB with the default arenas and 577 MB with two (benchmarks, memory). `MALLOC_ARENA_MAX=2` is the
usual remedy (Heroku's default for the same reason). glibc fixes its arena limit when a second arena is first
needed, so the setting must come before a process starts any thread: the environment for the processes oppsync
starts (the run zygote, cold run workers) and the container (Dockerfile), `mallopt` as the first thing `oppsync`
does. An operator's own MALLOC_ARENA_MAX is left as it is."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>
SYNC_ARENA_MAX = 2


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a process oppsync starts: MALLOC_ARENA_MAX as above unless already set."""
    env = dict(os.environ if env is None else env)
    env.setdefault("MALLOC_ARENA_MAX", str(SYNC_ARENA_MAX))
    return env


@functools.cache
def limit_malloc_arenas(arenas: int = SYNC_ARENA_MAX) -> bool:
    """At most `arenas` glibc malloc arenas (once per process; effective only before the process's second
    thread allocates; False where the C library is not glibc or the environment already says)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt / different allocator
        return False
    done = bool(mallopt(M_ARENA_MAX, arenas))
    if not done:
        log.debug("mallopt(M_ARENA_MAX, %d) was refused", arenas)
    return done


def release_arrow_memory() -> None:
    """Hand back the memory Arrow's pool keeps after staging (mimalloc / jemalloc keep freed pages for reuse)."""
    pa.default_memory_pool().release_unused()


# CPython's cyclic garbage collector runs a young-generation pass every 700 container allocations (its default since
# the 1990s), and an older one every 10 of those. An extract decodes its pages into millions of dicts and lists,
# none of them in a cycle (reference counting frees them), so those passes find nothing and traverse what the
# pages hold in the meantime: with the young generation at 50,000 a 100,000-opportunity Salesforce full sync took
# 7.2-7.5 s of CPU instead of 8.0-8.3 s (2026-12-07; gc.freeze() alone saved nothing). Cycles made meanwhile are still
# collected, only less often; the process's own setting comes back when the last extract ends.
EXTRACT_GC_THRESHOLD0 = 50_000
_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, ...] = ()


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """The garbage collector's young generation at EXTRACT_GC_THRESHOLD0 while the block runs (never lowered, never
    enabled where the threshold is 0); extracts running at once in threads share it, the last one out restores it."""
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            if 0 < _gc_saved[0] < EXTRACT_GC_THRESHOLD0:
                gc.set_threshold(EXTRACT_GC_THRESHOLD0, *_gc_saved[1:])
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.set_threshold(*_gc_saved)
