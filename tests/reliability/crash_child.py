"""The sync process that test_crash_recovery kills: one sync_connection of one connection, optionally
killing itself with SIGKILL at a chosen point (the n-th call of a function of the extract or the
reconcile), exactly as the kernel would kill a run that ran out of memory or lost its node.

  python -m tests.reliability.crash_child CONFIG_JSON WAREHOUSE_URL RUN_ID [KILL_POINT N WHEN]

Prints one JSON line with the outcome when it survives.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import Any

from oppsync_pipeline.lib import sync
from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.crm.http import ApiClient
from oppsync_pipeline.lib.reconcile import apply as reconcile
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import make_engine

# Where a run can be killed: (module or class, attribute). Extract-side first, then inside the reconcile
# transaction, then after its commit but before the lock is released.
KILL_POINTS: dict[str, tuple[Any, str]] = {
    "extract.begin": (store, "begin_extract"),
    "extract.request": (ApiClient, "request"),
    "extract.stage_page": (store.StagingWriter, "add"),
    "extract.stage_flush": (store.StagingWriter, "flush"),
    "extract.save_users": (store, "save_users"),
    "extract.completeness": (store, "save_completeness"),
    "extract.finish": (store, "finish_extract"),
    "reconcile.events": (reconcile, "_write_events"),
    "reconcile.history": (reconcile, "_write_history"),
    "reconcile.current": (reconcile, "_write_current"),
    "reconcile.state": (reconcile, "_advance_state"),
    "reconcile.record_run": (reconcile, "record_run"),
    "reconcile.release_lock": (store, "release_lock"),
}


def arm(point: str, nth: int, when: str) -> None:
    owner, name = KILL_POINTS[point]
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        hit = calls["n"] == nth
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    config_file, warehouse_url, run_id = argv[:3]
    if len(argv) >= 6:
        arm(argv[3], int(argv[4]), argv[5])
    with open(config_file, encoding="utf-8") as f:
        cfg = parse_config(json.load(f))
    conn = cfg.connections[0]
    engine = make_engine(warehouse_url)
    summary = sync.sync_connection(cfg, conn, engine, run_id=run_id, mode="auto")
    print(
        json.dumps(
            {
                "status": summary.extract.status,
                "mode": summary.extract.mode,
                "result": summary.result.as_dict() if summary.result else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
