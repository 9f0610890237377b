"""Records that cannot be trusted are quarantined, not fatal.

One opportunity with a negative amount, a date the CRM wrote in a form nobody documents, a lone UTF-16
surrogate or a created date ahead of the CRM's own clock used to refuse the whole connection's sync, with a
message that did not name it. Such a record is now set aside in `oppsync.quarantine` with its CRM id, the
field and the reason; it is neither synced (the warehouse keeps what it had) nor treated as deleted, and the
rest of the sync proceeds. More than `quarantine_max_share` of a run quarantined still blocks the run: that is
a broken connection, not a bad record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from oppsync_pipeline.lib.record import FIELDS, BadValue, Opportunity

# A record created after the CRM's clock by more than this (the run's first response's Date header) is from the
# future: a clock or data error. The same tolerance as the extract's quality suite.
FUTURE_TOLERANCE = timedelta(hours=1)
TEXT_FIELDS = ("source_id", *(f.name for f in FIELDS if f.crm_text))


@dataclass(frozen=True)
class Quarantined:
    crm: str
    source_id: str | None
    field: str
    reason: str
    value: str | None = None

    def describe(self) -> str:
        return f"{self.crm} record {self.source_id or '<no id>'}, field {self.field}: {self.reason}"


def mapping_failure(crm: str, source_id: str | None, raw: Any, err: Exception) -> Quarantined:
    """A record the connector could not map: the field is the key that was missing, or the raw field holding
    the value that could not be read."""
    if isinstance(err, KeyError):
        key = str(err.args[0]) if err.args else "?"
        return Quarantined(crm, source_id, key, f"required field {key!r} is missing or null")
    if isinstance(err, BadValue):
        path = err.field or locate(raw, err.value) or "?"  # the connector knows best where it read it
        return Quarantined(crm, source_id, path, str(err), _short(err.value))
    return Quarantined(crm, source_id, "?", f"cannot be mapped: {type(err).__name__}: {_short(str(err), 200)}")


def record_problems(opp: Opportunity, crm_clock: datetime | None) -> list[Quarantined]:
    """What makes a mapped record unfit for the warehouse (each a quarantine entry)."""
    out = []
    if opp.amount is not None and opp.amount < 0:
        out.append(Quarantined(opp.crm, opp.source_id, "amount", "negative amount", repr(opp.amount)))
    if crm_clock is not None and opp.created_at is not None and opp.created_at > crm_clock + FUTURE_TOLERANCE:
        out.append(
            Quarantined(
                opp.crm,
                opp.source_id,
                "created_at",
                f"created {opp.created_at:%Y-%m-%d %H:%M:%S} UTC, after the CRM's own clock "
                f"({crm_clock:%Y-%m-%d %H:%M:%S} UTC)",
                opp.created_at.isoformat(),
            )
        )
    for name in TEXT_FIELDS:
        value = getattr(opp, name)
        if value is not None and not value.isascii() and _has_lone_surrogate(value):
            out.append(
                Quarantined(
                    opp.crm,
                    opp.source_id,
                    name,
                    "text holds a lone UTF-16 surrogate (not valid Unicode text)",
                    _short(value),
                )
            )
    return out


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def locate(raw: Any, value: Any, path: str = "", depth: int = 0) -> str | None:
    """The key path in a raw record that holds `value` (dotted, lists as [i]); None when not found."""
    if depth > 6:
        return None
    if isinstance(raw, dict):
        for k, v in raw.items():
            here = f"{path}.{k}" if path else str(k)
            if v is value or (type(v) is type(value) and v == value):
                return here
            found = locate(v, value, here, depth + 1) if isinstance(v, (dict, list)) else None
            if found:
                return found
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            found = locate(v, value, f"{path}[{i}]", depth + 1) if isinstance(v, (dict, list)) else None
            if found:
                return found
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # storable even with surrogates
    return text if len(text) <= limit else text[:limit] + "..."
