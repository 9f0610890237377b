"""The canonical records every connector produces, whatever the CRM."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Literal, get_type_hints

import orjson
from sqlalchemy import Date, DateTime, Double, String, Text
from sqlalchemy.types import TypeEngine

Status = Literal["open", "won", "lost"]


class EventKind(StrEnum):
    """`oppsync.opportunity_events.event_type`: one event per kind of change (lib/reconcile's event model)."""

    CREATED = "created"
    UPDATED = "updated"
    STAGE_CHANGED = "stage_changed"
    CLOSED_WON = "closed_won"
    CLOSED_LOST = "closed_lost"
    REOPENED = "reopened"
    DELETED = "deleted"
    RESTORED = "restored"
    LEFT_SCOPE = "left_scope"
    ENTERED_SCOPE = "entered_scope"


# Bumped whenever what a connector writes into a canonical field changes meaning (2: `stage` became the stage
# name users see, `stage_id` / `crm_status` were added, addresses took one form, ConnectWise owners their
# numeric ids). A warehouse synced under an older version gets one full "re-baseline" sync that rewrites the
# values without recording `updated` / `stage_changed` events for the remapping (sync.py, lib/reconcile).
# 3: `crm_closed_at`, the CRM's own record of when an opportunity closed, dates closes (not the last edit).
# 4: `amount_base` / `base_currency`, the amount in the org's base currency as the CRM converts it, and
# `account_id`, the CRM's id of the account / company.
# 5: `revenue_one_time` / `revenue_recurring` / `cost` (ConnectWise forecast lines, Autotask revenue fields) and
# `extra_fields`, the connection's configured extra CRM fields.
MAPPING_VERSION = 5


# -- The canonical fields, once --------------------------------------------------------------------------------
# One entry per canonical field, in the warehouse's column order: it drives the staging and fact table columns
# (schema.py), the row hash in Python and in DuckDB (lib/staging.py), the reconcile's column lists and
# the record below (checked against it at import).


@dataclass(frozen=True, slots=True)
class CanonicalField:
    name: str
    sql_type: type[TypeEngine]
    # hashed into row_hash and compared by the reconcile: a change makes a new version and an event.
    # `modified_at` and the raw payload are deliberately left out: a touched-but-unchanged record is not a
    # new version.
    tracked: bool = False
    nullable: bool = True

    @property
    def crm_text(self) -> bool:
        """Text a connector fills from the CRM (`crm` and `status` are our own vocabularies)."""
        return self.sql_type in (String, Text) and self.name not in ("crm", "status")

    @property
    def cleaned(self) -> bool:
        """Tracked CRM text: NUL bytes removed before it is stored and hashed (clean_text)."""
        return self.tracked and self.crm_text


FIELDS: tuple[CanonicalField, ...] = (
    CanonicalField("crm", String, nullable=False),
    CanonicalField("project_name", Text, tracked=True),
    CanonicalField("client_name", Text, tracked=True),
    # The CRM's id of the account / company the opportunity is for (seed 001: Account -> Company): the key of
    # marts.accounts.
    CanonicalField("account_id", String, tracked=True),
    CanonicalField("service_location", Text, tracked=True),
    CanonicalField("sales_executive", Text, tracked=True),
    CanonicalField("owner_crm_id", String, tracked=True),
    CanonicalField("stage", Text, tracked=True),
    CanonicalField("stage_id", Text, tracked=True),
    CanonicalField("crm_status", Text, tracked=True),
    CanonicalField("status", String, tracked=True, nullable=False),
    CanonicalField("amount", Double, tracked=True),
    CanonicalField("currency", String, tracked=True),
    # The amount in the org's base (home / corporate / internal) currency, converted by the CRM itself, and that
    # currency: sums across records never mix currencies. Tracked: a rate change the CRM applies is a change.
    CanonicalField("amount_base", Double, tracked=True),
    CanonicalField("base_currency", String, tracked=True),
    # The amount broken down where the CRM keeps the breakdown (ConnectWise forecast lines by recurringFlag,
    # Autotask one-time vs monthly / quarterly / semiannual / yearly revenue over totalAmountMonths), and the
    # cost the CRM records for it (margin = amount - cost, in the mart). In `currency`. None elsewhere.
    CanonicalField("revenue_one_time", Double, tracked=True),
    CanonicalField("revenue_recurring", Double, tracked=True),
    CanonicalField("cost", Double, tracked=True),
    CanonicalField("close_date", Date, tracked=True),
    CanonicalField("probability", Double, tracked=True),
    CanonicalField("created_at", DateTime, tracked=True),
    CanonicalField("created_by_crm_id", String, tracked=True),
    CanonicalField("crm_closed_at", DateTime, tracked=True),
    # The connection's `extra_fields:` as raw CRM values, a JSON object (name -> value, keys sorted, nulls left
    # out; None when all are null), typed in dbt (marts.opportunity_fields). Tracked: a user who asked for a
    # field in the mart expects its change to be an update like any other; nulls left out so that adding a
    # field to the configuration does not change the hash of the records that have no value in it.
    CanonicalField("extra_fields", Text, tracked=True),
    CanonicalField("modified_at", DateTime),
    CanonicalField("crm_closed_at_field", String),
)
CANONICAL: tuple[str, ...] = tuple(f.name for f in FIELDS)
# The fields whose change makes a new version (history row) and an `updated` event.
TRACKED_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.tracked)


@dataclass(slots=True)
class Opportunity:
    connection: str
    crm: str
    source_id: str
    project_name: str | None
    client_name: str | None
    service_location: str | None
    sales_executive: str | None
    owner_crm_id: str | None
    stage: str | None  # the sales stage's name as users see it in the CRM
    status: Status  # open / won / lost, from the CRM's own flags (or the connection's mapping)
    amount: float | None
    currency: str | None
    close_date: date | None
    probability: float | None
    created_at: datetime | None
    created_by_crm_id: str | None
    modified_at: datetime | None
    raw: dict[str, Any] = field(default_factory=dict)
    stage_id: str | None = None  # the CRM's id / API value of that stage
    crm_status: str | None = None  # the CRM's own status label (HubSpot: the stage id; Dataverse: statuscode)
    # When the CRM says the opportunity closed (won / lost), and the CRM field that said it (`actualclosedate`,
    # `closedDate`, `hs_closed_won_date`, `LastStageChangeDate`, `CloseDate` ...). None while open, or where
    # the CRM keeps no such value: the reconcile then dates the close by `modified_at` (closed_at_source).
    crm_closed_at: datetime | None = None
    crm_closed_at_field: str | None = None
    # `amount` in the org's base currency as the CRM converts it (None: the CRM gives no conversion), and the
    # base currency's ISO code (None: not readable by this API user).
    amount_base: float | None = None
    base_currency: str | None = None
    account_id: str | None = None  # the CRM's account / company id (None: no account, or not readable)
    # The amount's breakdown and cost where the CRM has them (ConnectWise, Autotask; None elsewhere).
    revenue_one_time: float | None = None
    revenue_recurring: float | None = None
    cost: float | None = None
    extra_fields: str | None = None  # JSON text of the connection's extra fields (extra_fields_json)

    def row_hash(self) -> str:
        return row_hash(*(getattr(self, f) for f in TRACKED_FIELDS))


_SQL_PYTHON_TYPES = {String: str, Text: str, Double: float, Date: date, DateTime: datetime}


def _check_record_matches_fields() -> None:
    """The record declares its fields in its own (positional) order; each canonical one must hold what its
    column holds. Fails at import, naming the field, when the two drift apart."""
    hints = get_type_hints(Opportunity)
    for f in FIELDS:
        want = _SQL_PYTHON_TYPES[f.sql_type]
        args = getattr(hints.get(f.name), "__args__", (hints.get(f.name),))
        held = {a for a in args if a is not type(None)}
        if f.name == "status":
            held = {str} if hints[f.name] is Status else held
        if held != {want} or (f.nullable != (type(None) in args)):
            raise TypeError(
                f"Opportunity.{f.name} is {hints.get(f.name)}; the field spec says {want.__name__}"
                f"{'' if not f.nullable else ' | None'}"
            )


_check_record_matches_fields()


def row_hash(*values: Any) -> str:
    """A stable digest of the tracked values (same value, same text, whatever the Python type).

    Runs once per staged record: the common types are tested first (a third of staging time went here)."""
    parts = []
    for v in values:
        if v is None:
            parts.append("\x00")
        elif type(v) is str:
            parts.append(v)
        elif isinstance(v, float):
            parts.append(repr(round(v, 6)))
        elif isinstance(v, datetime):
            v = to_utc(v)
            # the same text as strftime("%Y-%m-%dT%H:%M:%S.%f"), which does not pad years before 1000
            parts.append(v.isoformat(timespec="microseconds") if v.year >= 1000 else v.strftime("%Y-%m-%dT%H:%M:%S.%f"))
        else:
            parts.append(str(v))
    return hashlib.md5("\x1f".join(parts).encode("utf-8"), usedforsecurity=False).hexdigest()


def extra_fields_json(values: dict[str, Any]) -> str | None:
    """The extra fields' raw values as the warehouse keeps them: compact JSON, keys sorted (a stable hash),
    nulls left out, None when nothing is left."""
    kept = {k: v for k, v in sorted(values.items()) if v is not None and v != ""}
    return raw_json(kept) if kept else None


def raw_json(raw: dict[str, Any]) -> str:
    """The CRM's record as compact JSON text (orjson: 5x the standard library's speed, same output for JSON
    that came from JSON). NUL cannot live in a Postgres text column; CRM data can carry it (hostile input):
    kept visible, escaped."""
    try:
        # without OPT_NON_STR_KEYS first: that option costs 70% more, and JSON's keys are always text
        data = orjson.dumps(raw, default=str)
    except TypeError:  # orjson.JSONEncodeError: a key that is no text, integers past 64 bits, lone surrogates
        try:
            data = orjson.dumps(raw, default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            text = json.dumps(raw, default=str, ensure_ascii=False, separators=(",", ":"))
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: kept, as the JSON escape the CRM sent
                data = json.dumps(raw, default=str, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if b"\\u0000" in data:  # searched in the bytes: cheaper than in the (often not ASCII) text
        data = data.replace(b"\\u0000", b"\\\\u0000")
    return data.decode("utf-8")


@dataclass(frozen=True, slots=True)
class CrmUser:
    """An owner or creator as the CRM knows them (User, owner, systemuser/team, member, Resource)."""

    crm_user_id: str
    name: str | None
    email: str | None = None
    kind: str = "user"  # user | team | owner
    active: bool = True
    # HubSpot: owners have an owner id and a user id; creators are referenced by user id.
    alt_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StageInfo:
    """One stage or status of the tenant, with the CRM's own open / won semantics."""

    key: str  # the value that appears on the opportunity (stage name, id, status id ...)
    label: str
    is_closed: bool
    is_won: bool
    sort_order: int = 0
    pipeline: str | None = None
    probability: float | None = None

    @property
    def category(self) -> Status:
        return "open" if not self.is_closed else ("won" if self.is_won else "lost")


def to_utc(value: datetime) -> datetime:
    """Naive UTC datetimes are what the warehouse stores (portable across DuckDB and Postgres)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


class BadValue(ValueError):
    """A CRM value that cannot be read as what the field holds (the record is quarantined, naming the field
    that holds `value`)."""

    def __init__(self, value: Any, expected: str, field: str | None = None):
        self.value, self.field = value, field
        shown = repr(value)
        super().__init__(f"cannot read {shown[:60] + '...' if len(shown) > 60 else shown} as {expected}")


def parse_datetime(value: Any) -> datetime | None:
    """Parse the date-time forms the five CRMs emit into naive UTC.

    Salesforce `2024-06-11T09:12:44.000+0000`, HubSpot `2024-06-11T09:12:44.123Z` or epoch millis,
    Dataverse `2024-06-11T09:12:44Z`, ConnectWise `2024-06-11T09:12:44Z`, Autotask `2024-06-11T09:12:44.12Z`
    (fraction of variable length).
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return to_utc(value)
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
        try:
            return datetime.fromtimestamp(int(value) / 1000, tz=UTC).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            raise BadValue(value, "a date-time (epoch milliseconds out of range)") from None
    if isinstance(value, str) and value[10:11] == "T":
        # The usual form, a UTC date-time (Z, +0000, +00:00): its naive part read by fromisoformat as it comes
        # (1 to 7 fractional digits, truncated to 6 as below), ~1 us a field against ~8 us for the
        # normalisation and time zone arithmetic below. Anything else is read below.
        naive = (
            value[:-1]
            if value[-1:] == "Z"
            else value[:-5]
            if value[-5:] == "+0000"
            else value[:-6]
            if value[-6:] == "+00:00"
            else None
        )
        if naive is not None:
            try:
                parsed = datetime.fromisoformat(naive)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is None:
                return parsed
    text = str(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # +0000 -> +00:00
    if len(text) > 5 and text[-5] in "+-" and text[-4:].isdigit():
        text = text[:-2] + ":" + text[-2:]
    # fromisoformat in 3.11 accepts 1-6 fractional digits but not 7 (.NET emits 7)
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        tail = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadValue(value, "an ISO 8601 date-time") from None
    return to_utc(parsed)


def parse_date(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value)
    if len(text) == 10:
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise BadValue(value, "a date (YYYY-MM-DD)") from None
    try:
        parsed = parse_datetime(text)
    except BadValue:
        raise BadValue(value, "a date") from None
    return parsed.date() if parsed else None


def parse_float(value: Any) -> float | None:
    if type(value) is float:  # what JSON numbers with a fraction decode to: most amounts, taken as they are
        return value
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_address(*parts: Any) -> str | None:
    """One canonical address form for all five CRMs: the non-empty parts joined with ", ", in the order
    street line 1, street line 2 (, line 3), city, state / province, postal code, country. Line breaks inside
    a part (multi-line street fields) become ", " too; surrounding blanks are dropped."""
    out: list[str] = []
    for part in parts:
        if part is None:
            continue
        if type(part) is str and "\n" not in part and "\r" not in part and "\x00" not in part:
            line = part.strip().strip(",").strip()  # one line, the usual case: as below, without the splits
            if line:
                out.append(line)
            continue
        for line in str(part).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            line = line.replace("\x00", "").strip().strip(",").strip()
            if line:
                out.append(line)
    return ", ".join(out) or None


def clean_text(value: Any) -> str | None:
    """CRM text as the warehouse can hold it: NUL bytes removed (Postgres rejects them), rest unchanged."""
    if value is None:
        return None
    text = str(value)
    return text.replace("\x00", "") if "\x00" in text else text
