"""Field maps as data: where each canonical field of an `Opportunity` comes from in a CRM's record.

Each connector declares one `FieldMap` (canonical field -> the native field it reads by default, in the manner
of dlt verified-sources' `sources/salesforce/settings.py`); `None` marks a field the connector derives from
what its per-page `enrich` step read (HubSpot's company, Autotask's contact, ConnectWise's forecast ...). A
connection's `fields:` overrides point any of them at another native field (seed 002: created date / created
by). `read_fields` applies the map and the overrides the same way for all five CRMs; only how a native value
is read (a dotted path, a property, a formatted label) stays with the connector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConnectionConfig
from oppsync_pipeline.lib.record import clean_text, parse_date, parse_datetime, parse_float

Kind = Literal["text", "number", "date", "datetime", "id"]

# What each overridable canonical field holds, hence how its native value is read. The stage is not here: what
# a stage value means (a label, an id, a picklist value) differs by CRM, so each connector reads it itself
# through `FieldMap.native("stage", ...)`.
KINDS: dict[str, Kind] = {
    "project_name": "text",
    "client_name": "text",
    "sales_executive": "text",
    "amount": "number",
    "close_date": "date",
    "probability": "number",
    "created_at": "datetime",
    "created_by_crm_id": "id",
}

Getter = Callable[[dict[str, Any], str], Any]


class FieldMap(Mapping[str, "str | None"]):
    """A connector's default canonical field -> native field (`None`: derived from enrichment). Every
    overridable field is named, so a reader sees at once where each one comes from in that CRM."""

    def __init__(self, **defaults: str | None):
        missing = set(OVERRIDABLE_FIELDS) - set(defaults)
        unknown = set(defaults) - set(OVERRIDABLE_FIELDS)
        if missing or unknown:
            raise ValueError(
                f"a field map names every overridable field once: missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        self._defaults = dict(defaults)

    def __getitem__(self, canonical: str) -> str | None:
        return self._defaults[canonical]

    def __iter__(self) -> Iterator[str]:
        return iter(self._defaults)

    def __len__(self) -> int:
        return len(self._defaults)

    def native(self, canonical: str, overrides: Mapping[str, str]) -> str | None:
        """The native field `canonical` is read from: the connection's override, else the CRM's default."""
        return overrides.get(canonical) or self[canonical]

    def resolved(self, overrides: Mapping[str, str]) -> dict[str, str]:
        """canonical -> native for every field read straight from the record (derived ones left out)."""
        return {c: n for c in self if (n := self.native(c, overrides)) is not None}


def as_id(value: Any) -> str | None:
    """A CRM id as text; an empty value is no id."""
    return None if value is None or value == "" else str(value)


_PARSE: dict[str, Callable[[Any], Any]] = {"number": parse_float, "date": parse_date, "datetime": parse_datetime}
# (field map, overrides, their items) -> (canonical, native, kind) of every field, resolved once per connection
# rather than once per record (read_fields runs per record; the overrides are checked unchanged each time)
_PLANS: dict[tuple[int, int], tuple[FieldMap, Mapping[str, str], tuple, tuple[tuple[str, str | None, Kind], ...]]] = {}


def _plan(field_map: FieldMap, overrides: Mapping[str, str]) -> tuple[tuple[str, str | None, Kind], ...]:
    key, items = (id(field_map), id(overrides)), tuple(overrides.items())
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is field_map and hit[1] is overrides and hit[2] == items:
        return hit[3]
    plan = tuple((canonical, field_map.native(canonical, overrides), kind) for canonical, kind in KINDS.items())
    if len(_PLANS) > 1024:  # many short-lived connections (tests, 500-tenant scale runs): start again
        _PLANS.clear()
    _PLANS[key] = (field_map, overrides, items, plan)
    return plan


def read_fields(
    record: dict[str, Any],
    field_map: FieldMap,
    overrides: Mapping[str, str],
    *,
    value: Getter,
    text: Getter | None = None,
    ident: Callable[[Any], str | None] = as_id,
    derived: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """The canonical values of one native record for every field of KINDS: read from the native field the map
    (or the connection's override) names, else, for a field the map derives (None), `derived[field]()` (only
    called when not overridden: an override replaces the derivation entirely); a derived field without a
    derivation is left out.

    `value(record, native)` reads a native value as the CRM sent it; `text(record, native)` as users see it
    (a picklist's label, a lookup's name; default: the value as text). A value that cannot be read raises
    (BadValue): `map_records` quarantines the record, naming the raw field that holds it."""
    if text is None:

        def text(r: dict[str, Any], native: str) -> Any:
            return clean_text(value(r, native))

    derived = derived or {}
    out: dict[str, Any] = {}
    for canonical, native, kind in _plan(field_map, overrides):
        if native is None:
            if canonical in derived:
                out[canonical] = derived[canonical]()
            continue
        if kind == "text":
            out[canonical] = text(record, native)
            continue
        raw = value(record, native)
        out[canonical] = ident(raw) if kind == "id" else _PARSE[kind](raw)
    stray = [c for c in derived if field_map[c] is not None]
    if stray:
        raise TypeError(f"derivations given for fields the map reads from the record: {stray}")
    return out


def configured_fields(conn: ConnectionConfig) -> Iterator[tuple[str, str]]:
    """(config key, native field) for every native field a connection names: its `fields:` overrides, its
    `extra_fields:` (read into marts.opportunity_fields), then its filters' fields. Discovery checks each against the tenant and names the key of one that is missing."""
    for canonical, native in conn.fields.items():
        yield f"fields.{canonical}", native
    for name, extra in conn.extra_fields.items():
        yield f"extra_fields.{name}.field", extra.field
    for i, f in enumerate(conn.filters):
        yield f"filters[{i}].field", f.field


def fields_to_read(
    standard: Iterable[str], conn: ConnectionConfig, *, key: Callable[[str], str] = lambda name: name
) -> list[str]:
    """The native fields a query selects: the connector's standard ones, then the connection's overrides, extra
    fields and filter fields (a record read by id is filtered in Python, so it must carry them), each once by `key`."""
    seen: set[str] = set()
    out: list[str] = []
    for name in (*standard, *(native for _, native in configured_fields(conn))):
        if key(name) not in seen:
            seen.add(key(name))
            out.append(name)
    return out
