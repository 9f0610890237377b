"""dbt/target stops growing: all but the newest N dagster-dbt run folders are removed, nothing else in the target
folder is touched, and a folder a running build may still write to is kept."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from oppsync_pipeline.lib.dbt_target import RUN_FOLDER, keep_setting, prune_run_folders, run_folders

NOW = 1_800_000_000.0
HOUR = 3600.0


def build_folder(target: Path, name: str, written_at: float) -> Path:
    """A run folder as dbt leaves it (a deep file under run/), last written at `written_at`."""
    deep = target / name / "run" / "oppsync" / "models" / "marts"
    deep.mkdir(parents=True)
    for path in (deep / "outcomes.sql", target / name / "run_results.json"):
        path.write_text("-- built\n")
    for root, dirs, files in os.walk(target / name):
        for entry in (root, *(os.path.join(root, n) for n in (*dirs, *files))):
            os.utime(entry, (written_at, written_at))
    return target / name


def test_dagster_dbt_names_its_run_folders_as_we_match_them():
    """The private naming this module depends on, read from the installed dagster-dbt's source (importing it costs
    seconds in the unit layer): a change there breaks this test rather than silently stopping the pruning."""
    source = (Path(importlib.util.find_spec("dagster_dbt").origin).parent / "core" / "resource.py").read_text()
    naming = source[source.index("def _get_unique_target_path") :][:1200]
    assert "unique_id = str(uuid.uuid4())[:7]" in naming
    assert 'path = f"{context.op_execution_context.op.name}-{context.run.run_id[:7]}-{unique_id}"' in naming
    for name in ("outcomes_mart-7705722-a5e07ab", "a5e07ab", "outcomes_mart-" + "f" * 7 + "-0123456"):
        assert RUN_FOLDER.match(name), name
    for not_a_run in ("manifest.json", "compiled", "run", "partial_parse.msgpack", "outcomes_mart-latest", "sources"):
        assert not RUN_FOLDER.match(not_a_run)


def test_keeps_the_newest_n_and_everything_that_is_not_a_run_folder(tmp_path: Path):
    target = tmp_path / "target"
    runs = [build_folder(target, f"outcomes_mart-{i:07x}-abcdef{i % 10}", NOW - (20 - i) * HOUR) for i in range(12)]
    (target / "manifest.json").write_text("{}")
    (target / "compiled").mkdir()
    (target / "compiled" / "x.sql").write_text("select 1")
    os.utime(target / "compiled", (NOW - 99 * HOUR, NOW - 99 * HOUR))

    removed = prune_run_folders(target, keep=3, now=NOW)

    assert sorted(removed) == sorted(runs[:9])
    assert run_folders(target) == [runs[11], runs[10], runs[9]]  # newest first
    assert (target / "manifest.json").exists() and (target / "compiled" / "x.sql").exists()
    assert prune_run_folders(target, keep=3, now=NOW) == []  # nothing left to prune


def test_a_folder_still_being_written_is_kept_whatever_its_rank(tmp_path: Path):
    """Its own mtime is old (the build created it an hour ago), but a file deep inside was written a minute ago:
    a long build in another run, which must not lose its artefacts under it."""
    target = tmp_path / "target"
    busy = build_folder(target, "outcomes_mart-0000001-0000001", NOW - HOUR)
    os.utime(busy / "run" / "oppsync" / "models" / "marts" / "outcomes.sql", (NOW - 60, NOW - 60))
    build_folder(target, "outcomes_mart-0000002-0000002", NOW - 30)
    old = build_folder(target, "fffffff", NOW - 5 * HOUR)  # dagster-dbt's form outside a run

    assert prune_run_folders(target, keep=1, now=NOW) == [old]
    assert busy.exists()


def test_how_many_to_keep_is_configurable_with_a_clear_error():
    assert keep_setting({}) == 10
    assert keep_setting({"OPPSYNC_DBT_TARGET_KEEP": "3"}) == 3
    for bad in ("0", "-1", "ten", "2.5"):
        with pytest.raises(ValueError, match="OPPSYNC_DBT_TARGET_KEEP=.*whole number"):
            keep_setting({"OPPSYNC_DBT_TARGET_KEEP": bad})
    assert prune_run_folders(Path("/nonexistent/target"), keep=2) == []


def test_the_runs_partial_parse_becomes_the_next_invocations(tmp_path: Path):
    """The mart asset hands each build's partial-parse file on (the definitions' own parse has other vars, so dbt
    discarded it and parsed everything on every build); nothing to hand on changes nothing."""
    from oppsync_pipeline.lib.dbt_target import PARTIAL_PARSE, keep_partial_parse

    target, run = tmp_path / "target", tmp_path / "target" / "outcomes_mart-abcdef0-1234567"
    run.mkdir(parents=True)
    (target / PARTIAL_PARSE).write_bytes(b"from dbt parse")
    assert not keep_partial_parse(run, target)
    assert (target / PARTIAL_PARSE).read_bytes() == b"from dbt parse"
    (run / PARTIAL_PARSE).write_bytes(b"from the build")
    assert keep_partial_parse(run, target)
    assert (target / PARTIAL_PARSE).read_bytes() == b"from the build"
    assert {p.name for p in target.iterdir()} == {PARTIAL_PARSE, run.name}  # no staging file left
