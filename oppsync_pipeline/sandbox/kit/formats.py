"""The datetime spellings of the five APIs, from the world's naive-UTC datetimes, and the one parser for the
ISO 8601 forms clients send back (filters, query parameters).

  Salesforce  2024-06-11T09:12:44.000+0000   fmt_datetime(dt, ms=True, zone="+0000")
  HubSpot     2024-06-11T09:12:44.123Z       fmt_datetime(dt, ms=True)
  Dataverse, ConnectWise  2024-06-11T09:12:44Z   fmt_datetime(dt)
  Autotask    2024-06-11T09:12:44.12Z        fmt_datetime(dt, ms="trim") (milliseconds, trailing zeros dropped)
A date is formatted as its midnight (ConnectWise, Autotask date fields).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime


def fmt_datetime(dt: datetime | date | None, *, ms: bool | str = False, zone: str = "Z") -> str | None:
    if dt is None:
        return None
    if not isinstance(dt, datetime):
        dt = datetime(dt.year, dt.month, dt.day)
    digits = f"{dt.microsecond // 1000:03d}"
    if ms == "trim":
        digits = digits.rstrip("0")
    fraction = f".{digits}" if ms and digits else ""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone


def parse_iso(text: str) -> datetime:
    """An ISO 8601 date-time to naive UTC: `Z`, `+hh:mm` or `+hhmm` (or none: UTC), fraction optional.
    Raises ValueError on anything else."""
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    m = re.match(r"^(.*[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)([+-]\d{2}):?(\d{2})$", t)
    if m:
        t = f"{m.group(1)}{m.group(2)}:{m.group(3)}"
    value = datetime.fromisoformat(t)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value
