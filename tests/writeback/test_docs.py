"""The README's write-back tables are the code's: the input contract, each writer's mapping and write rights."""

from pathlib import Path

from oppsync_pipeline.lib.writeback.docs import contract_table, mapping_table, permissions_table

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_the_readme_shows_the_tables_the_code_builds():
    for table in (contract_table(), mapping_table(), permissions_table()):
        assert table in README, "README is stale: paste `python -m oppsync_pipeline.lib.writeback.docs`"
