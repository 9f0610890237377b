"""The warm parent of run workers (locations/run_launcher.py): one process per code location that imports Dagster
and the location's definitions once, then forks a run worker for each run it is asked to start.

Why: a run worker started the usual way (Dagster's code server spawns a fresh interpreter) imports Dagster and
loads the location before its first step: ~2 CPU-s for the syncs, ~4 CPU-s for the mart (dagster-dbt, the dbt
manifest). A webhook-driven change starts one sync and one mart build within seconds; on 2 cores that start-up
was most of the work and of the wait (make bench, freshness). A forked child shares the parent's loaded modules
and definitions and starts in milliseconds.

Protocol (one JSON object per line): the launcher writes `{"args": <serialized ExecuteRunArgs>}` on stdin; the
zygote answers `{"pid": N}` once the child is forked, `{"stale": true}` when the code or configuration changed
since it loaded them (the launcher then starts a new zygote), or `{"error": "..."}`. EOF on stdin ends it; its
children run on.

The child runs exactly what `dagster api execute_run` runs (the cold path of Dagster's launchers), so the run's
events, failure handling and cancellation are Dagster's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

STALE = {"stale": True}


def watched_files(working_directory: str | None, module: str) -> list[Path]:
    """What the loaded definitions were built from: the module's package (its Python files), the configuration
    and the dbt project. A change to any of them makes the zygote stale."""
    from oppsync_pipeline.lib.config import config_path
    from oppsync_pipeline.lib.dbt_env import dbt_project_files

    base = Path(working_directory or os.getcwd())
    package = importlib.util.find_spec(module.split(".")[0])
    roots = [Path(p) for p in (package.submodule_search_locations or [])] if package else []
    files = [p for root in roots for p in root.rglob("*.py")]
    files += dbt_project_files()
    config = config_path()
    files.append(config if config.is_absolute() else base / config)
    return files


def fingerprint(files: Iterable[Path]) -> tuple[int, int]:
    """(how many of the files exist, newest mtime in ns): a file added, removed or edited changes it."""
    stamps = []
    for p in files:
        try:
            stamps.append(p.stat().st_mtime_ns)
        except OSError:
            continue
    return len(stamps), max(stamps, default=0)


def warm(module: str, attribute: str, working_directory: str | None) -> None:
    """Import the location and resolve its definitions once, as the run worker would; the children inherit them.

    `@dg.definitions` functions are lazy: resolved here and put back in their place, a child's
    `recon_job_from_origin` finds loaded definitions (and their cached repository) instead of loading them again."""
    import dagster as dg
    from dagster._utils.test.definitions import LazyDefinitions

    if working_directory and working_directory not in sys.path:
        sys.path.insert(0, working_directory)
    loaded = importlib.import_module(module)
    target = getattr(loaded, attribute)
    if isinstance(target, LazyDefinitions):
        target = target()
        setattr(loaded, attribute, target)
    if isinstance(target, dg.Definitions):
        target.get_repository_def()


def _run_child(serialized_args: str) -> int:
    """In the forked child: what `dagster api execute_run` does, then exit without the parent's atexit handlers."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # dbt's subprocess must be reapable by its own parent
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Dagster's termination interrupts the run
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the protocol's pipe is the zygote's; the run's prints go where the zygote's errors go
    code = 0
    try:
        from dagster._cli.api import execute_run_command

        execute_run_command.callback(input_json=serialized_args, compressed_input_json=None)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever escaped Dagster's own handling: report it, exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve(module: str, attribute: str, working_directory: str | None) -> None:
    started = time.monotonic()
    files = watched_files(working_directory, module)
    loaded_from = fingerprint(files)
    try:
        warm(module, attribute, working_directory)
    except Exception:  # noqa: BLE001 - the children then load it themselves and report the error in the run
        print(f"oppsync run zygote: could not preload {module}; runs load it themselves", file=sys.stderr)
        traceback.print_exc()
    # fork() copies only the calling thread: a lock held by another thread would stay held forever in the child
    if threading.active_count() > 1:
        print(f"oppsync run zygote: {threading.active_count()} threads after loading {module}", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies
    # Ctrl-C of `dagster dev` reaches the whole process group: the zygote ends with its launcher (EOF), quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(
        f"oppsync run zygote: {module} loaded in {time.monotonic() - started:.1f}s (pid {os.getpid()}); "
        "run workers fork from here",
        file=sys.stderr,
    )
    _reply({"ready": True})
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            _reply({"error": "not a JSON line"})
            continue
        if fingerprint(files) != loaded_from:
            print(f"oppsync run zygote: {module} changed since it was loaded; a new one takes over", file=sys.stderr)
            _reply(STALE)
            return
        pid = os.fork()
        if pid == 0:
            os._exit(_run_child(request["args"]))
        _reply({"pid": pid})


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """`python -m oppsync_pipeline.locations.run_zygote MODULE ATTRIBUTE [WORKING_DIRECTORY]`"""
    module, attribute, *rest = sys.argv[1:] if argv is None else argv
    serve(module, attribute, rest[0] if rest and rest[0] else None)


if __name__ == "__main__":
    main()
