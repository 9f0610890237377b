"""`oppsync workers --count N` / `make workers`: N `dagster-celery` worker processes on one queue.

Each worker executes the steps that `celery_executor` (code location `oppsync_pipeline.locations.syncs_celery`)
puts on the broker. One task at a time per worker (`--concurrency 1`, prefetch 1): a sync step holds its
connection's lease for its whole run, and a worker that prefetched a second step would hold it back while the
other workers idle. N workers, N steps at once: scale by adding workers (here, or on other machines with the
same command).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_QUEUE = "oppsync"
DEFAULT_WORKER_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "celery" / "worker.yaml"


def worker_command(index: int, queue: str, config_yaml: Path, loglevel: str = "INFO") -> list[str]:
    """The command line of worker `index`: `dagster-celery worker start` (it renders the YAML into the Celery
    app's settings module, then execs `celery worker`)."""
    exe = shutil.which("dagster-celery", path=str(Path(sys.executable).parent)) or shutil.which("dagster-celery")
    if exe is None:
        raise FileNotFoundError("dagster-celery is not installed; pip install dagster-celery==0.29.27")
    return [
        exe,
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(config_yaml),
        "-q",
        queue,
        "-n",
        f"{queue}-{index}",  # dagster-celery appends @hostname
        "--loglevel",
        loglevel,
        "--",
        "--concurrency=1",
        # without it a worker waits for the broker's heartbeat to notice a lost peer: not needed on one machine
        "--without-gossip",
        "--without-mingle",
    ]


@dataclass
class Workers:
    """N worker processes, each in its own process group (stopping one stops the `celery` child it execs)."""

    count: int = 2
    queue: str = DEFAULT_QUEUE
    config_yaml: Path = DEFAULT_WORKER_CONFIG
    log_dir: Path | None = None  # a log file per worker; None: the terminal
    env: dict[str, str] | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> Workers:
        if self.count < 1:
            raise ValueError(f"--count must be at least 1, got {self.count}")
        if not Path(self.config_yaml).exists():
            raise FileNotFoundError(f"worker config {self.config_yaml} not found; see deploy/celery/worker.yaml")
        env = dict(self.env if self.env is not None else os.environ)
        # `dagster-celery worker start` execs `celery` by name: the interpreter's scripts first on PATH, so a venv
        # that is not activated still finds its own
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for i in range(self.count):
            out = None
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"worker-{i}.log", "wb")  # noqa: SIM115 - the child owns it until it ends
            self.processes.append(
                subprocess.Popen(
                    worker_command(i, self.queue, Path(self.config_yaml)),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                    start_new_session=True,
                )
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker logged Celery's "ready." (it consumes from the queue), or raise with the logs."""
        if not self.log_dir:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if all("ready." in text for text in logs):
                return
            if self.alive() < self.count:
                break
            time.sleep(0.5)
        raise RuntimeError("Celery workers not ready:\n" + "\n---\n".join(t[-2000:] for t in self.logs()))

    def logs(self) -> list[str]:
        if not self.log_dir:
            return []
        return [
            (self.log_dir / f"worker-{i}.log").read_text(errors="replace")
            if (self.log_dir / f"worker-{i}.log").exists()
            else ""
            for i in range(self.count)
        ]

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (Celery's warm shutdown: finish the current task), SIGKILL after `grace` seconds."""
        for p in self.processes:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            _signal_group(p, signal.SIGKILL)
            p.wait()
        self.processes.clear()

    def __enter__(self) -> Workers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


def delete_queue(broker: str, queue: str) -> None:
    """Remove a queue from the broker (a test's or a benchmark's own): RabbitMQ keeps a durable queue, empty or
    not, until someone deletes it."""
    from kombu import Connection

    with Connection(broker, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)
