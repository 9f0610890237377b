"""benchmarks/scale.py at a size that takes seconds: the figures it reports are computed, not printed constants."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import scale


def test_scale_benchmark_reports_definitions_ticks_and_the_warehouse(tmp_path: Path) -> None:
    args = argparse.Namespace(scale_connections=60, scale_sync_tenants=0)
    figures = {f.benchmark: f for f in scale.run(args, tmp_path)}
    assert figures["scale definitions load"].verdict in ("PASS", "MISS")
    assert "1 sync job(s)" in figures["scale definitions load"].notes  # 60 > 50: the shared job
    assert figures["scale schedule tick"].measured.endswith("wall)")
    assert "for 60 schedules" in figures["scale schedule tick"].measured
    assert figures["scale tick spread"].verdict == "PASS"
    assert figures["scale warehouse"].measured == "refused"
    assert "warehouse.duckdb.max_connections" in figures["scale warehouse"].notes
