"""The warm run launcher (locations/run_launcher.py, run_zygote.py): real runs on a real instance, their workers
forked from one warm process per location; termination, run monitoring, reloads and the cold fallback.

The jobs live in a package written to tmp_path, so a test can edit the location's code (a reload) without
touching the repository's."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.code_pointer import FileCodePointer, ModuleCodePointer
from dagster._core.launcher.base import LaunchRunContext, WorkerStatus
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin

from oppsync_pipeline.locations.run_launcher import WORKER_TAG, WarmRunLauncher, Worker, process_start, zygote_key

JOBS = """
import os, time
import dagster as dg

VERSION = {version!r}

@dg.op(config_schema={{"seconds": dg.Field(float, default_value=0.0), "out": dg.Field(str, default_value="")}})
def work(context):
    if context.op_config["out"]:
        with open(context.op_config["out"], "w") as f:
            f.write(f"{{VERSION}} {{os.getpid()}} {{os.getppid()}}")
    time.sleep(context.op_config["seconds"])

@dg.job(executor_def=dg.in_process_executor)
def working():
    work()

defs = dg.Definitions(jobs=[working])
"""


def write_location(root: Path, version: str = "v1", broken: bool = False) -> None:
    pkg = root / "launcherjobs"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "jobs.py").write_text(
        textwrap.dedent(JOBS.format(version=version)) + ("\nraise ImportError('boom')\n" if broken else "")
    )


def origin(root: Path, pointer=None) -> JobPythonOrigin:
    pointer = pointer or ModuleCodePointer("launcherjobs.jobs", "defs", working_directory=str(root))
    return JobPythonOrigin("working", RepositoryPythonOrigin(sys.executable, pointer))


@pytest.fixture
def instance(tmp_path):
    write_location(tmp_path)
    launcher = {"module": "oppsync_pipeline.locations.run_launcher", "class": "WarmRunLauncher"}
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(overrides={"run_launcher": launcher}, temp_dir=str(tmp_path / "home")) as inst:
        yield inst


def job_def(root: Path) -> dg.JobDefinition:
    sys.path.insert(0, str(root))
    try:
        import launcherjobs.jobs  # noqa: PLC0415 - the location under test, written by write_location

        return launcherjobs.jobs.working
    finally:
        sys.path.remove(str(root))


def launch(instance, root: Path, seconds: float = 0.0, out: Path | None = None, job_origin=None) -> str:
    config = {"ops": {"work": {"config": {"seconds": seconds, "out": str(out or "")}}}}
    run = instance.create_run_for_job(
        job_def=job_def(root), run_config=config, job_code_origin=job_origin or origin(root)
    )
    instance.run_launcher.launch_run(LaunchRunContext(run, None))
    return run.run_id


def wait_for(instance, run_id: str, statuses, timeout: float = 60.0) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.status in statuses:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still {instance.get_run_by_id(run_id).status} after {timeout}s")


def engine_messages(instance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id) if e.message and "WarmRunLauncher" in e.message]


FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def test_runs_are_forked_from_one_warm_process_per_location(instance, tmp_path):
    outs = [tmp_path / f"out{i}" for i in range(2)]
    ids = [launch(instance, tmp_path, out=out) for out in outs]
    for run_id in ids:
        assert wait_for(instance, run_id, FINISHED).status == dg.DagsterRunStatus.SUCCESS
        assert any("forked from the warm process of launcherjobs.jobs" in m for m in engine_messages(instance, run_id))
    zygotes = list(instance.run_launcher._zygotes.values())
    assert len(zygotes) == 1  # one warm process served both runs
    for run_id, out in zip(ids, outs, strict=True):
        version, pid, parent = out.read_text().split()
        assert int(parent) == zygotes[0].process.pid  # the run's worker is the zygote's child...
        assert Worker.of(instance.get_run_by_id(run_id)).pid == int(pid)  # ...and its tag names it


def test_terminate_cancels_a_running_run(instance, tmp_path):
    run_id = launch(instance, tmp_path, seconds=60)
    wait_for(instance, run_id, {dg.DagsterRunStatus.STARTED})
    assert instance.run_launcher.terminate(run_id) is True
    assert wait_for(instance, run_id, FINISHED, timeout=30).status == dg.DagsterRunStatus.CANCELED
    assert instance.run_launcher.terminate(run_id) is False  # finished: nothing to terminate


def test_run_monitoring_sees_a_killed_worker(instance, tmp_path):
    run_id = launch(instance, tmp_path, seconds=60)
    run = wait_for(instance, run_id, {dg.DagsterRunStatus.STARTED})
    launcher = instance.run_launcher
    assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    worker = Worker.of(run)
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while worker.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    health = launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.FAILED and str(worker.pid) in health.msg


def test_an_edited_location_is_loaded_again(instance, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    wait_for(instance, launch(instance, tmp_path, out=first), FINISHED)
    old = instance.run_launcher._zygotes.copy()
    time.sleep(0.05)  # a later mtime on file systems with coarse timestamps
    write_location(tmp_path, version="v2")
    run = wait_for(instance, launch(instance, tmp_path, out=second), FINISHED)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert first.read_text().split()[0] == "v1" and second.read_text().split()[0] == "v2"
    (old_zygote,) = old.values()
    assert not old_zygote.alive()  # the stale one was closed, not left running beside the new one


def test_a_location_that_does_not_load_fails_its_run_with_the_error(instance, tmp_path):
    write_location(tmp_path, broken=True)
    run = wait_for(instance, launch(instance, tmp_path), FINISHED)
    assert run.status == dg.DagsterRunStatus.FAILURE
    errors = [e for e in instance.all_logs(run.run_id) if e.is_dagster_event and e.dagster_event.is_run_failure]
    events = "\n".join(
        str(e.dagster_event.event_specific_data) for e in instance.all_logs(run.run_id) if e.is_dagster_event
    )
    assert errors and "boom" in events


def test_a_file_based_location_starts_cold(instance, tmp_path):
    pointer = FileCodePointer(str(tmp_path / "launcherjobs" / "jobs.py"), "defs", working_directory=str(tmp_path))
    assert zygote_key(origin(tmp_path, pointer)) is None
    run_id = launch(instance, tmp_path, job_origin=origin(tmp_path, pointer))
    assert wait_for(instance, run_id, FINISHED).status == dg.DagsterRunStatus.SUCCESS
    assert any("cold" in m for m in engine_messages(instance, run_id))
    assert not instance.run_launcher._zygotes


def test_worker_tags_name_host_pid_and_start_time():
    me = Worker.here(os.getpid())
    assert me.start == process_start(os.getpid()) and me.start.isdigit()
    run = dg.DagsterRun(job_name="j", tags={WORKER_TAG: me.tag()})
    assert Worker.of(run) == me and me.alive() and me.local()
    assert not me._replace(start=str(int(me.start) + 1)).alive()  # a reused pid is another process
    assert Worker.of(dg.DagsterRun(job_name="j")) is None


def test_the_instance_files_use_the_warm_launcher():
    import yaml

    root = Path(__file__).resolve().parents[2]
    for name in ("dagster.yaml", "deploy/postgres/dagster.yaml"):
        launcher = yaml.safe_load((root / name).read_text())["run_launcher"]
        assert (launcher["module"], launcher["class"]) == (
            "oppsync_pipeline.locations.run_launcher",
            WarmRunLauncher.__name__,
        )
