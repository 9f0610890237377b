"""Old dbt run folders pruned: dagster-dbt gives every dbt invocation its own target folder
(`dbt/target/<op name>-<run id[:7]>-<7 hex>`, or `<7 hex>` outside a run) so concurrent builds do not overwrite
each other's artefacts, and never removes them: ~6 MB per mart build (compiled and run SQL, manifest,
run_results), forever. `prune_run_folders` keeps the newest N; everything else in dbt/target (the parse's
manifest.json the definitions read, partial_parse.msgpack, dbt's own folders) is not a run folder and stays.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

# dagster-dbt 0.29 DbtCliResource._get_unique_target_path: f"{op name}-{run_id[:7]}-{uuid4()[:7]}", or the uuid part
RUN_FOLDER = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*-[0-9a-f]{7}-)?[0-9a-f]{7}$")
KEEP_ENV = "OPPSYNC_DBT_TARGET_KEEP"
DEFAULT_KEEP = 10  # the last ten builds' artefacts, for debugging a model (~60 MB)
# a folder written to in the last ten minutes may belong to a build still running (another run's): never pruned
MIN_IDLE_SECONDS = 600.0


def keep_setting(environ: Mapping[str, str] | None = None) -> int:
    """How many run folders to keep: OPPSYNC_DBT_TARGET_KEEP (a whole number, 1 or more), default 10."""
    raw = (os.environ if environ is None else environ).get(KEEP_ENV, "").strip()
    if not raw:
        return DEFAULT_KEEP
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{KEEP_ENV}={raw!r}: write a whole number of dbt run folders to keep, 1 or more (default 10)")
    return int(raw)


def run_folders(target_dir: Path) -> list[Path]:
    """dagster-dbt's per-invocation folders in `target_dir`, newest first (by their latest write)."""
    if not target_dir.is_dir():
        return []
    found = [p for p in target_dir.iterdir() if p.is_dir() and not p.is_symlink() and RUN_FOLDER.match(p.name)]
    return sorted(found, key=last_write, reverse=True)


def last_write(folder: Path) -> float:
    """The newest modification time in the folder, at any depth: dbt writes run/ and compiled/ files deep inside
    while the folder's own time only moves when a top-level entry appears."""
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we looked (dbt's temporary files)
                continue
    return newest


def prune_run_folders(
    target_dir: Path, keep: int | None = None, min_idle_seconds: float = MIN_IDLE_SECONDS, now: float | None = None
) -> list[Path]:
    """Remove all but the newest `keep` run folders (default: keep_setting()); returns those removed. A folder
    written to within `min_idle_seconds` is kept whatever its rank: a concurrent build may still be using it."""
    keep = keep_setting() if keep is None else keep
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the folder of the build that just ran")
    now = time.time() if now is None else now
    removed = []
    for folder in run_folders(target_dir)[keep:]:
        if now - last_write(folder) < min_idle_seconds:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


PARTIAL_PARSE = "partial_parse.msgpack"


def keep_partial_parse(run_target: Path, target_dir: Path) -> bool:
    """Make the run's own partial-parse file the one the next invocation starts from.

    dagster-dbt copies `dbt/target/partial_parse.msgpack` into each invocation's fresh folder, but that file comes
    from the definitions' `dbt parse` (no `--vars`, possibly another target), so dbt threw it away ("profile has
    changed", "config vars ... have changed") and parsed the whole project again on every mart build: seconds of
    every webhook-triggered build (make bench, freshness). The run's file matches the deployment's profile and
    vars. Replaced atomically: another build may be copying it at the same moment. True when replaced."""
    source = run_target / PARTIAL_PARSE
    if not source.is_file():
        return False
    staged = target_dir / f".{PARTIAL_PARSE}.{os.getpid()}"
    try:
        shutil.copyfile(source, staged)
        os.replace(staged, target_dir / PARTIAL_PARSE)
    except OSError:  # a read-only project folder (an image): the next build parses, as before
        staged.unlink(missing_ok=True)
        return False
    return True
