"""The one results table (stdout) and benchmarks/RESULTS.md (rewritten by every run)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import Figure

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COLUMNS = ("benchmark", "backend/CRM", "measured", "target", "verdict")


def machine() -> str:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return (
        f"{os.cpu_count()} cores, {mem_kb / 1024 / 1024:.1f} GiB memory (MemTotal), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def table(figures: list[Figure]) -> str:
    rows = [COLUMNS] + [(f.benchmark, f.subject, f.measured, f.target, f.verdict) for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(figures: list[Figure], command: str, seconds: float, sizes: list[str], path: Path = RESULTS) -> Path:
    misses = [f for f in figures if f.verdict == "MISS"]
    md = [
        "# Benchmark results",
        "",
        "Rewritten by every `python -m benchmarks` run (`make bench`). Do not edit by hand.",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- total wall time: {seconds / 60:.1f} min",
        "- sizes: " + "; ".join(sizes),
        "",
        "| benchmark | backend/CRM | measured | target | verdict |",
        "|---|---|---|---|---|",
        *[f"| {f.benchmark} | {f.subject} | {f.measured} | {f.target} | {f.verdict} |" for f in figures],
        "",
        "## Misses",
        "",
        *([f"- **{f.benchmark} / {f.subject}**: {f.measured}, target {f.target}." for f in misses] or ["None."]),
        "",
        "## Details",
        "",
        *[f"- **{f.benchmark} / {f.subject}**: {f.notes}" for f in figures if f.notes],
        "",
    ]
    path.write_text("\n".join(md), encoding="utf-8")
    return path
