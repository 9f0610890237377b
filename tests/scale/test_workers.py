"""`oppsync workers`: the worker command line and its refusals (the workers themselves run in test_celery.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oppsync_pipeline.lib.workers import DEFAULT_WORKER_CONFIG, Workers, worker_command


def test_one_step_at_a_time_on_the_named_queue() -> None:
    cmd = worker_command(1, "oppsync-x", DEFAULT_WORKER_CONFIG)
    assert cmd[1:3] == ["worker", "start"]
    assert cmd[cmd.index("-q") + 1] == "oppsync-x"
    assert cmd[cmd.index("-y") + 1] == str(DEFAULT_WORKER_CONFIG)
    assert (
        cmd[cmd.index("-n") + 1] == "oppsync-x-1"
    )  # unique per worker: Celery warns on two of one name and cannot address them apart
    assert "--concurrency=1" in cmd[cmd.index("--") :]


def test_refuses_no_workers_and_a_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--count"):
        Workers(count=0).start()
    with pytest.raises(FileNotFoundError, match="worker.yaml"):
        Workers(count=1, config_yaml=tmp_path / "nope.yaml").start()
