"""The reliability report: every case of every reliability test records one row (case x CRM: passed, lost
events, duplicated events, leaked secrets, unclear errors, seconds), and `make reliability` prints them as one
table at the end of the session (conftest.py), whichever xdist worker ran them.

Rows go to a JSON-lines file named by OPPSYNC_RELIABILITY_RESULTS, which the session's controller sets to a fresh
file before any worker starts (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / ".oppsync" / "reliability" / "results.jsonl"


def results_path() -> Path:
    return Path(os.environ.get("OPPSYNC_RELIABILITY_RESULTS", DEFAULT_RESULTS))


COUNTS = ("lost_events", "duplicated_events", "leaked_secrets", "unclear_errors")

# What an error a user reads must never look like: a traceback, an exception type without its message, a
# driver's complaint about an aborted transaction, a key error naming only a key.
UNCLEAR = re.compile(r"Traceback|^\w+Error: ?$|transaction is aborted|IntegrityError|^KeyError|Invalid isoformat", re.M)


@dataclass
class Row:
    case: str
    crm: str = "-"
    passed: bool = False
    lost_events: int = 0
    duplicated_events: int = 0
    leaked_secrets: int = 0
    unclear_errors: int = 0
    seconds: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def unclear(message: str | None, must_name: str | None = None) -> int:
    """1 when an error message a user would read is unclear: it matches UNCLEAR, or it does not match
    `must_name` (a regex of what the case's error must say: the CRM, the page, the record id ...)."""
    if not message:
        return 0
    if UNCLEAR.search(message):
        return 1
    return int(bool(must_name) and not re.search(must_name, message))


def record(row: Row) -> None:
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(row)) + "\n")


@contextmanager
def reported(case: str, crm: str = "-") -> Iterator[Row]:
    """Time a case and record its row; an exception marks it failed (and is re-raised)."""
    row, t0 = Row(case, crm), time.monotonic()
    try:
        yield row
        row.passed = row.passed or not any(getattr(row, c) for c in COUNTS)
    except BaseException as err:
        row.passed = False
        row.note = row.note or str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise
    finally:
        row.seconds = round(time.monotonic() - t0, 1)
        record(row)


def table(rows: list[dict]) -> str:
    """Cases x CRMs, then the totals of each count: the one screen `make reliability` ends with."""
    if not rows:
        return "reliability: no case recorded"
    cases = list(dict.fromkeys(r["case"] for r in rows))
    crms = list(dict.fromkeys(r["crm"] for r in rows))
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["case"], r["crm"]), []).append(r)
    width = max(len(c) for c in cases) + 2
    lines = [
        "",
        "reliability (case x CRM: passed / FAILED; n = trials)",
        " " * width + "".join(f"{c:<13}" for c in crms),
    ]
    for case in cases:
        out = []
        for crm in crms:
            got = cells.get((case, crm), [])
            if not got:
                out.append(f"{'-':<13}")
                continue
            ok = all(r["passed"] for r in got)
            text = ("passed" if ok else "FAILED") + (f" x{len(got)}" if len(got) > 1 else "")
            out.append(f"{text:<13}")
        lines.append(f"{case:<{width}}" + "".join(out))
    totals = {c: sum(r[c] for r in rows) for c in COUNTS}
    failed = [r for r in rows if not r["passed"]]
    lines.append("")
    lines.append(
        "  ".join(f"{c.replace('_', ' ')}: {n}" for c, n in totals.items())
        + f"  | {len(rows) - len(failed)} passed, {len(failed)} failed, "
        f"{sum(r['seconds'] for r in rows):.0f} s of case time"
    )
    for r in failed[:20]:
        lines.append(f"  FAILED {r['case']} / {r['crm']}: {r['note']}")
    return "\n".join(lines)


def read_rows() -> list[dict]:
    path = results_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
