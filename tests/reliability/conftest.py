"""The reliability suite (issues 8 and 22). OPPSYNC_RELIABILITY=full (`make reliability`) runs the whole fault
matrix, every kill point on both warehouses and the Dagster secrets scan; unset, a representative subset that
keeps each file under a minute in `make test`. Shared helpers live in harness.py; every case records a row
through report.py, printed as one table at the end of the session (tests/conftest.py)."""

from __future__ import annotations

from tests.reliability.harness import FULL


def pytest_report_header() -> str:
    return f"oppsync reliability suite: {'full' if FULL else 'fast subset (OPPSYNC_RELIABILITY=full for all)'}"
