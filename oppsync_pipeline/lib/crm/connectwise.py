"""ConnectWise Manage (PSA) REST API 3.0 connector.

- Auth: HTTP Basic `{company}+{publicKey}:{privateKey}` plus the `clientId` header on every call. API keys do
  not expire, so there is nothing to refresh: a 401 is final (AuthError).
- Base URL: `conn.base_url` is the site (e.g. https://api-na.myconnectwise.net); the codebase is discovered with
  `GET /login/companyinfo/{company}` (needs no auth; same host) and the API lives at `{site}/{Codebase}apis/3.0`.
  `options.codebase` (e.g. "v4_6_release/") skips discovery; a 404 on discovery falls back to v4_6_release/.
- Open set: `status/id in (<statuses with closedFlag=false>)`, or the connection's `open_statuses` names;
  not-open: `status/id not in (...)` (the exact complement, also for statuses added mid-run).
  Incremental: `_info/lastUpdated>=[since]`, `orderBy=_info/lastUpdated asc, id asc`; full: `orderBy=id asc`.
- Paging: `page`/`pageSize` (max 1000), following the `Link` header's rel="next" until it is absent.
  That is offset paging the server re-evaluates per page, so a record leaving the set between two page
  requests makes one later record slip onto an already-read page (missed until the next full sync).
  `options.paging: keyset` avoids it: always page 1 with `id>last` (or `(lastUpdated, id) > last`) added.
- Amount: CW has no scalar amount. It is the sum of `revenue` over `GET /sales/opportunities/{id}/forecast`
  `forecastItems` (no forecast lines: amount None). There is no bulk forecast endpoint and no `fields` /
  `childConditions` form that returns forecast lines with the opportunity, so this costs ONE extra request
  per opportunity returned (a full sync of N opportunities costs about N + N/1000 requests; incremental runs
  only pay for the changed ones). `options.forecast: false` skips it (amount None, 1 request per page).
- Users: `/system/members`; owner and creator ids are member *identifiers* (what `_info.enteredBy` holds);
  the numeric member id is kept in `alt_ids`.
- No usage headers and no published quota: observe() records nothing; plain 429 + Retry-After is retried by
  ApiClient; a 429 asking to wait longer than `options.max_retry_after` seconds (default 900) is treated as
  the allowance being spent (QuotaExhausted) rather than stalling the run.
- No delete feed (hard deletes): deleted() yields nothing; full syncs diff ids.
- Custom fields: a filter or field override names one as `custom:<caption>` (e.g. `custom:Region`) or
  `custom:#<id>`. Filters on one are pushed down as `customFieldConditions=caption="Region" and value="West"`
  (only the first such filter; all custom-field filters are also re-checked after fetching, because CW
  evaluates customFieldConditions per custom-field row).
- Standard fields are named by their CW condition path: `company/name`, `status/name`, `_info/dateEntered`...
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import CrmConnector, Page
from oppsync_pipeline.lib.crm.http import Auth, CrmError, QuotaExhausted, RequestStats, retry_after_seconds
from oppsync_pipeline.lib.record import (
    CrmUser, Opportunity, StageInfo, clean_text, parse_date, parse_datetime, parse_float, to_utc,
)

API_VERSION = "application/vnd.connectwise.com+json; version=2025.1"
DEFAULT_CODEBASE = "v4_6_release/"

# Condition paths a filter / field override may name, and which of them are numbers or date-times.
NUMERIC_FIELDS = frozenset({
    "id", "company/id", "site/id", "status/id", "stage/id", "primarySalesRep/id", "probability/id",
    "currency/id", "type/id", "locationId", "businessUnitId",
})
DATETIME_FIELDS = frozenset({
    "expectedCloseDate", "closedDate", "dateBecameLead", "_info/lastUpdated", "_info/dateEntered",
})
BOOLEAN_FIELDS = frozenset({"closedFlag"})
TEXT_FIELDS = frozenset({
    "name", "company/identifier", "company/name", "site/name", "primarySalesRep/identifier",
    "primarySalesRep/name", "status/name", "stage/name", "currency/currencyCode", "type/name", "source",
    "_info/enteredBy", "_info/updatedBy",
})
OPERATORS = {"equal": "=", "not_equal": "!=", "more_than": ">", "less_than": "<", "at_least": ">=", "at_most": "<="}
_CUSTOM = re.compile(r"^custom:(?:#(?P<id>\d+)|(?P<caption>.+))$")


# -- auth ----------------------------------------------------------------------------------------------------------

class ConnectWiseAuth(Auth):
    """Basic `company+public:private` and the integration's clientId; keys do not expire."""

    refreshable = False

    def __init__(self, company_id: str, public_key: str, private_key: str, client_id: str):
        token = base64.b64encode(f"{company_id}+{public_key}:{private_key}".encode("utf-8")).decode("ascii")
        self._header = f"Basic {token}"
        self._client_id = client_id

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        headers["Authorization"] = self._header
        headers["clientId"] = self._client_id
        headers.setdefault("Accept", API_VERSION)

    def __repr__(self) -> str:  # never show the key
        return "ConnectWiseAuth(<redacted>)"


# -- connector -----------------------------------------------------------------------------------------------------

class ConnectWiseConnector(CrmConnector):
    crm = "connectwise"
    max_page_size = 1000
    native_deletes = False
    credential_keys: ClassVar[tuple[str, ...]] = ("company_id", "public_key", "private_key", "client_id")
    known_fields: ClassVar[frozenset[str]] = NUMERIC_FIELDS | DATETIME_FIELDS | BOOLEAN_FIELDS | TEXT_FIELDS

    _api_base: str | None = None
    _probabilities: dict[int, float] | None = None
    _stages_refreshed = False

    def make_auth(self) -> Auth:
        c = self.credentials
        missing = [k for k in self.credential_keys if not c.get(k)]
        if missing:
            raise CrmError(f"connectwise connection '{self.conn.name}' is missing credentials {missing}")
        return ConnectWiseAuth(c["company_id"], c["public_key"], c["private_key"], c["client_id"])

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return bool(_CUSTOM.match(name))

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        """ConnectWise sends no usage headers and publishes no quota: nothing to record."""

    def classify(self, response: requests.Response) -> Exception | None:
        if response.status_code == 429:
            wait = retry_after_seconds(response)
            limit = float(self.conn.options.get("max_retry_after", 900))
            if wait is not None and wait > limit:
                return QuotaExhausted(f"ConnectWise throttled the API member for {wait:.0f}s "
                                      f"(more than the {limit:.0f}s this run waits)", status=429)
        return None

    # -- base URL ----------------------------------------------------------------------------------------------

    def api(self, path: str) -> str:
        if self._api_base is None:
            self._api_base = self._discover()
        return self._api_base + path

    def _discover(self) -> str:
        site = self.conn.base_url.rstrip("/")
        codebase = self.conn.options.get("codebase")
        if not codebase:
            try:
                info = self.client.get_json(f"{site}/login/companyinfo/{self.credentials['company_id']}")
                codebase = (info or {}).get("Codebase") if isinstance(info, dict) else None
            except CrmError as err:
                if err.status != 404:
                    raise
            codebase = codebase or DEFAULT_CODEBASE
        return f"{site}/{str(codebase).strip('/')}/apis/3.0"

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """GET a list endpoint page by page, following Link rel="next" to the end."""
        url: str | None = self.api(path)
        query: dict[str, Any] | None = {**params, "page": 1, "pageSize": self.page_size}
        while url:
            response = self.client.request("GET", url, params=query)
            rows = self.client.parse_json(response)
            if not isinstance(rows, list):
                raise CrmError(f"GET {path}: expected a JSON array, got {type(rows).__name__}")
            yield rows
            url = _same_origin(response.links.get("next", {}).get("url"), self.api(path))
            query = None  # the next link carries the whole query
            if url and not rows:
                raise CrmError(f"GET {path}: empty page with a next link")

    # -- stages and users --------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        out = []
        for page in self._pages("/sales/opportunities/statuses", {"orderBy": "id asc"}):
            for s in page:
                out.append(StageInfo(
                    key=str(s["id"]), label=s.get("name") or str(s["id"]),
                    is_closed=bool(s.get("closedFlag")), is_won=bool(s.get("wonFlag")),
                    sort_order=int(s["id"]),
                ))
        return out

    def users(self) -> Iterable[CrmUser]:
        fields = "id,identifier,firstName,lastName,officeEmail,primaryEmail,inactiveFlag"
        for page in self._pages("/system/members", {"orderBy": "id asc", "fields": fields}):
            for m in page:
                name = " ".join(p for p in (m.get("firstName"), m.get("lastName")) if p) or None
                yield CrmUser(
                    crm_user_id=str(m.get("identifier") or m["id"]), name=clean_text(name),
                    email=m.get("officeEmail") or m.get("primaryEmail"), kind="user",
                    active=not m.get("inactiveFlag", False), alt_ids=(str(m["id"]),),
                )

    # -- opportunities -----------------------------------------------------------------------------------------

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        open_ids = self.open_stage_keys(True)
        parts = []
        if open_set:
            if not open_ids:
                return
            parts.append(f"status/id in ({','.join(_int_text(k) for k in open_ids)})")
        elif open_ids:
            parts.append(f"status/id not in ({','.join(_int_text(k) for k in open_ids)})")
        if since is not None:
            parts.append(f"_info/lastUpdated>={_dt(since)}")
        standard = [f for f in self.conn.filters if not self.is_custom_field(f.field)]
        custom = [f for f in self.conn.filters if self.is_custom_field(f.field)]
        parts += [render_condition(f) for f in standard]
        params: dict[str, Any] = {"orderBy": "_info/lastUpdated asc, id asc" if since is not None else "id asc"}
        if custom:
            params["customFieldConditions"] = render_custom_condition(custom[0])
        if self.conn.options.get("paging", "navigable") == "keyset":
            pages = self._keyset_pages(parts, params, by_updated=since is not None)
        else:
            if parts:
                params["conditions"] = _and(parts)
            pages = self._pages("/sales/opportunities", params)
        for rows in pages:
            if custom:
                rows = [r for r in rows if self.post_filter(r, _value)]
            if rows:
                yield [self._map(r) for r in rows]

    def _keyset_pages(self, parts: list[str], params: dict[str, Any],
                      by_updated: bool) -> Iterator[list[dict[str, Any]]]:
        """`options.paging: keyset`: always page 1, resuming after the last (lastUpdated, id) seen.

        Navigable paging is offset paging that the server re-evaluates per page: an opportunity leaving the
        set (closed, deleted, re-stamped) between two page requests shifts every later one back and one is
        never read in this pass. Keyset paging cannot skip; it costs the same number of requests.
        """
        cursor: dict[str, Any] | None = None
        url = self.api("/sales/opportunities")
        while True:
            clause = list(parts)
            if cursor is not None:
                last_id = _int_text(cursor["id"])
                if by_updated:
                    stamp = _dt((cursor.get("_info") or {}).get("lastUpdated"))
                    clause.append(f"(_info/lastUpdated>{stamp} or (_info/lastUpdated={stamp} and id>{last_id}))")
                else:
                    clause.append(f"id>{last_id}")
            query = {**params, "page": 1, "pageSize": self.page_size}
            if clause:
                query["conditions"] = _and(clause)
            rows = self.client.get_json(url, params=query)
            if not isinstance(rows, list):
                raise CrmError(f"GET /sales/opportunities: expected a JSON array, got {type(rows).__name__}")
            if rows:
                yield rows
            if len(rows) < self.page_size:
                return
            cursor = rows[-1]

    def forecast_amount(self, opp_id: Any) -> float | None:
        data = self.client.get_json(self.api(f"/sales/opportunities/{int(opp_id)}/forecast"))
        if isinstance(data, list):  # some generated clients model it as a list of forecasts
            items = [i for f in data for i in (f.get("forecastItems") or [f])]
        else:
            items = (data or {}).get("forecastItems") or []
        revenues = [parse_float(i.get("revenue")) for i in items]
        revenues = [r for r in revenues if r is not None]
        return round(sum(revenues), 2) if revenues else None

    def _probability(self, ref: Any) -> float | None:
        if not isinstance(ref, dict):
            return None
        name = ref.get("name")
        if isinstance(name, str) and name.strip().rstrip("%").strip().replace(".", "", 1).isdigit():
            return float(name.strip().rstrip("%"))
        if ref.get("id") is None:
            return None
        if self._probabilities is None:
            self._probabilities = {}
            for page in self._pages("/sales/probabilities", {"orderBy": "id asc"}):
                for p in page:
                    value = parse_float(p.get("probability"))
                    if value is not None:
                        self._probabilities[int(p["id"])] = value
        return self._probabilities.get(int(ref["id"]))

    def _map(self, r: dict[str, Any]) -> Opportunity:
        status_ref = r.get("status") or {}
        stage = str(status_ref["id"]) if status_ref.get("id") is not None else None
        stage_override = self.conn.fields.get("stage")
        if stage_override:
            stage = _text(_value(r, stage_override))
        if stage is not None and stage not in self.stages() and not self._stages_refreshed:
            self._stages, self._stages_refreshed = None, True  # a status created mid-run: read them again
        amount_path = self.conn.fields.get("amount")
        if amount_path:
            amount = parse_float(_value(r, amount_path))
        elif self.conn.options.get("forecast", True):
            amount = self.forecast_amount(r["id"])
        else:
            amount = None
        prob_path = self.conn.fields.get("probability")
        probability = parse_float(_value(r, prob_path)) if prob_path else self._probability(r.get("probability"))
        created = _value(r, self.field("created_at", "_info/dateEntered"))
        created_by = _value(r, self.field("created_by_crm_id", "_info/enteredBy"))
        if isinstance(created_by, dict):
            created_by = created_by.get("identifier") or created_by.get("id")
        currency = r.get("currency") or {}
        return self.opportunity(
            r["id"], r,
            project_name=clean_text(_value(r, self.field("project_name", "name"))),
            client_name=clean_text(_value(r, self.field("client_name", "company/name"))),
            service_location=clean_text(_value(r, "site/name")),
            sales_executive=clean_text(_value(r, self.field("sales_executive", "primarySalesRep/name"))),
            owner_crm_id=_text((r.get("primarySalesRep") or {}).get("identifier")
                               or (r.get("primarySalesRep") or {}).get("id")),
            stage=stage,
            status=self.status_for(stage),
            amount=amount,
            currency=currency.get("currencyCode") if isinstance(currency, dict) else None,
            close_date=_date(_value(r, self.field("close_date", "expectedCloseDate"))),
            probability=probability,
            created_at=_datetime(created),
            created_by_crm_id=_text(created_by),
            modified_at=_datetime((r.get("_info") or {}).get("lastUpdated")),
        )


# -- field access and filter rendering -----------------------------------------------------------------------------

def _same_origin(link: str | None, api_url: str) -> str | None:
    """The next link, on the API's own scheme and host: credentials are never sent to a host the link names."""
    if not link:
        return None
    target, ours = urlsplit(link), urlsplit(api_url)
    return urlunsplit((ours.scheme, ours.netloc, target.path, target.query, ""))


def _and(parts: list[str]) -> str:
    return " and ".join(f"({p})" if " or " in p.lower() else p for p in parts)


def _value(record: dict[str, Any], path: str) -> Any:
    """A condition path (`company/name`, `_info/dateEntered`) or a custom field (`custom:Region`) of a record."""
    m = _CUSTOM.match(path)
    if m:
        for cf in record.get("customFields") or []:
            if (m.group("id") and str(cf.get("id")) == m.group("id")) or \
                    (m.group("caption") and cf.get("caption") == m.group("caption")):
                return cf.get("value")
        return None
    value: Any = record
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else clean_text(value)


def _datetime(value: Any) -> datetime | None:
    try:
        return parse_datetime(value)
    except (TypeError, ValueError):
        return None


def _date(value: Any) -> date | None:
    try:
        return parse_date(value)
    except (TypeError, ValueError):
        return None


def _int_text(value: Any) -> str:
    """An integer literal; anything else is refused (never spliced into a condition)."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
        raise CrmError(f"'{value}' is not a whole number")
    return str(int(text))


def _dt(value: Any) -> str:
    if isinstance(value, datetime):
        parsed: datetime | None = to_utc(value)
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        parsed = _datetime(value) if isinstance(value, str) and len(value) > 10 else None
        if parsed is None and isinstance(value, str) and len(value) == 10:
            d = _date(value)
            parsed = datetime(d.year, d.month, d.day) if d else None
    if parsed is None:
        raise CrmError(f"'{value}' is not a date-time")
    return "[" + parsed.strftime("%Y-%m-%dT%H:%M:%SZ") + "]"


def quote_string(value: Any) -> str:
    """A conditions string literal: double quotes, with backslashes and quotes escaped."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_value(field: str, value: Any) -> str:
    if value is None:
        return "null"
    if field in NUMERIC_FIELDS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return _int_text(value)
    if field in DATETIME_FIELDS:
        return _dt(value)
    if field in BOOLEAN_FIELDS or isinstance(value, bool):
        if isinstance(value, bool):
            return "true" if value else "false"
        if str(value).lower() in ("true", "false"):
            return str(value).lower()
        raise CrmError(f"'{value}' is not true or false")
    if isinstance(value, (int, float)) and field not in TEXT_FIELDS:
        return repr(value)
    return quote_string(value)


def render_condition(f: RecordFilter) -> str:
    """One filter as a `conditions` clause, values escaped (never spliced raw)."""
    if f.op == "in":
        return f"{f.field} in ({','.join(render_value(f.field, v) for v in f.value)})"
    if f.value is None and f.op in ("equal", "not_equal"):
        return f"{f.field} {OPERATORS[f.op]} null"
    return f"{f.field} {OPERATORS[f.op]} {render_value(f.field, f.value)}"


def render_custom_condition(f: RecordFilter) -> str:
    m = _CUSTOM.match(f.field)
    assert m is not None
    head = f"id={int(m.group('id'))}" if m.group("id") else f"caption={quote_string(m.group('caption'))}"
    if f.op == "in":
        values = " or ".join(f"value={quote_string(v)}" for v in f.value)
        return f"{head} and ({values})"
    value = "null" if f.value is None else (
        repr(f.value) if isinstance(f.value, (int, float)) and not isinstance(f.value, bool) else quote_string(f.value))
    return f"{head} and value {OPERATORS[f.op]} {value}"
