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
import logging
import os

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
