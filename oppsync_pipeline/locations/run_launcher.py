"""The run launcher of oppsync's single-host instances (dagster.yaml, deploy/postgres/dagster.yaml): run workers are
forked from a warm process per code location (locations/run_zygote.py) instead of started as fresh interpreters.

Dagster's DefaultRunLauncher asks the location's code server to spawn a new Python process per run, which then
imports Dagster and loads the location's definitions again: 2-4 CPU-s before the first step, for runs whose steps
take about a second (a webhook's targeted sync, the mart's `dbt run` after it). On a small host that start-up is
most of what a change waits for on its way to the mart (README "How fresh"). Here the child runs exactly what
`dagster api execute_run` runs, so events, failures, retries and cancellation are Dagster's.

- A zygote is started on a location's first run (lazily: every process that opens the instance builds a
  launcher, run workers included) and ends with the process that started it (EOF on its stdin). A zygote whose
  code, configuration or dbt project changed since it loaded them refuses to fork and is replaced.
- Where no zygote can serve (a code pointer other than a module, no `os.fork`, a zygote that failed to start),
  the run starts cold with `dagster api execute_run`, as Dagster's Docker and Kubernetes launchers do.
- Run monitoring and termination find the worker by its `oppsync/run_worker` tag (host, pid, process start
  time), so they work from any process on the same host: the daemon (monitoring) and the webserver (Terminate).
  Multi-host deployments use Dagster's Celery or Kubernetes launchers (README "Scaling out").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
from dagster._core.code_pointer import ModuleCodePointer, PackageCodePointer
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from oppsync_pipeline.lib.memory import child_env

WORKER_TAG = "oppsync/run_worker"  # "host:pid:start ticks" of the process running the run
ZYGOTE_MODULE = "oppsync_pipeline.locations.run_zygote"


class ZygoteError(RuntimeError):
    pass


class Worker(NamedTuple):
    host: str
    pid: int
    start: str  # the process's start time in clock ticks since boot (/proc/PID/stat), "" where unknown

    @classmethod
    def of(cls, run: dg.DagsterRun) -> Worker | None:
        value = run.tags.get(WORKER_TAG)
        if not value:
            return None
        host, pid, start = value.rsplit(":", 2)
        return cls(host, int(pid), start)

    @classmethod
    def here(cls, pid: int) -> Worker:
        return cls(socket.gethostname(), pid, process_start(pid) or "")

    def tag(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """The same process still runs (a reused pid has another start time)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, another user's
        start = process_start(self.pid)
        return not (self.start and start and start != self.start)


def process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after the last ')' are fixed
    return stat.rsplit(")", 1)[1].split()[19]


class Zygote:
    """One warm process for one code location (module pointer, interpreter, working directory)."""

    def __init__(self, executable: str, module: str, attribute: str, working_directory: str | None, timeout: float):
        self.timeout = timeout
        self.process = subprocess.Popen(
            [executable, "-m", ZYGOTE_MODULE, module, attribute, working_directory or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=working_directory or None,
            env=child_env(),  # its forks run syncs: few malloc arenas (lib/memory.py)
            text=True,
            bufsize=1,
        )
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise ZygoteError(f"the warm process for {module} did not start: {ready}")

    def fork(self, serialized_args: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"args": serialized_args}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        out = self.process.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], self.timeout)
        line = out.readline() if readable else ""
        if not line:
            self.close()
            why = "exited" if self.process.poll() is not None else f"did not answer within {self.timeout:g} s"
            raise ZygoteError(f"the warm run process {why}")
        return json.loads(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # EOF: it exits; the runs it forked go on
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Forks each run's worker from a warm process of its code location; see the module docstring."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, start_timeout_seconds: float = 120.0):
        self._inst_data = inst_data
        self.start_timeout_seconds = start_timeout_seconds
        self._zygotes: dict[tuple[str, ...], Zygote] = {}
        self._cold: list[subprocess.Popen] = []  # reaped as they end (no zombies in a long-lived daemon)
        self._lock = threading.Lock()
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {
            "start_timeout_seconds": dg.Field(
                float,
                is_required=False,
                default_value=120.0,
                description="How long a location's warm process may take to load the location before a run "
                "starts cold instead.",
            )
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None:
            raise dg.DagsterInvariantViolationError(f"run {run.run_id} has no code origin to launch it from")
        execute = ExecuteRunArgs(job_origin=origin, run_id=run.run_id, instance_ref=self._instance.get_ref())
        pid, how = None, "cold: a new `dagster api execute_run` process"
        key = zygote_key(origin)
        if key is not None and hasattr(os, "fork"):
            try:
                pid = self._fork(key, serialize_value(execute))
                how = f"forked from the warm process of {key[1]}"
            except ZygoteError as err:
                how += f" ({err})"
        if pid is None:
            pid = self._start_cold(execute)
        worker = Worker.here(pid)
        self._instance.add_run_tags(run.run_id, {WORKER_TAG: worker.tag()})
        self._instance.report_engine_event(f"Run worker started (pid {pid}), {how}.", run, cls=self.__class__)

    def _fork(self, key: tuple[str, ...], args: str) -> int:
        with self._lock:
            for _ in range(2):  # a stale zygote is replaced once
                zygote = self._zygotes.get(key)
                if zygote is None or not zygote.alive():
                    zygote = self._zygotes[key] = Zygote(*key, timeout=self.start_timeout_seconds)
                reply = zygote.fork(args)
                if "pid" in reply:
                    return int(reply["pid"])
                zygote.close()
                del self._zygotes[key]
                if not reply.get("stale"):
                    raise ZygoteError(str(reply.get("error", reply)))
            raise ZygoteError("the warm process was stale twice in a row")

    def _start_cold(self, args: ExecuteRunArgs) -> int:
        with self._lock:
            self._cold = [p for p in self._cold if p.poll() is None]
            process = subprocess.Popen(args.get_command_args(), stdin=subprocess.DEVNULL, env=child_env())
            self._cold.append(process)
            return process.pid

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        worker = Worker.of(run)
        self._instance.report_run_canceling(run)
        if worker is None or not worker.local() or not worker.alive():
            where = "no worker recorded" if worker is None else f"worker pid {worker.pid} on {worker.host}"
            self._instance.report_engine_event(
                f"Could not signal the run worker ({where}): it is gone or on another host.", run, cls=self.__class__
            )
            return False
        # SIGINT is what Dagster's own termination sends its run workers: the run ends as canceled
        os.kill(worker.pid, signal.SIGINT)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        worker = Worker.of(run)
        if worker is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no run worker recorded (launched elsewhere)")
        if not worker.local():
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"the run worker is on {worker.host}")
        if worker.alive():
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(worker.pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"run worker process {worker.pid} ended without reporting the run's end"
        )

    def dispose(self) -> None:
        with self._lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            zygote.close()


def zygote_key(origin: Any) -> tuple[str, ...] | None:
    """(interpreter, module, attribute, working directory) of a module-based location; None for any other."""
    repository = origin.repository_origin
    pointer = repository.code_pointer
    if isinstance(pointer, ModuleCodePointer):
        module, attribute = pointer.module, pointer.fn_name
    elif isinstance(pointer, PackageCodePointer):
        module, attribute = pointer.module, pointer.attribute
    else:
        return None
    return (repository.executable_path or sys.executable, module, attribute, pointer.working_directory or "")
