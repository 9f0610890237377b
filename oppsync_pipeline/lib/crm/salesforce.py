"""Salesforce: REST API + SOQL over the Opportunity sObject.

Auth: OAuth 2.0 client-credentials flow against `{base_url}/services/oauth2/token` (the org's My Domain host);
a 401 INVALID_SESSION_ID mid-paging gets a new token and the same request is repeated (ApiClient).
Paging: `GET /services/data/vNN.0/query?q=` then the relative `nextRecordsUrl` until `done`; page size through
`Sforce-Query-Options: batchSize=N` (200..2000).
Open set: `IsClosed = false` (the tenant's OpportunityStage semantics), or `StageName IN (open_statuses)`.
Incremental: `SystemModstamp >= since ORDER BY SystemModstamp, Id` (SystemModstamp also moves on system changes).
Deletes: getDeleted (`/sobjects/Opportunity/deleted/`) when `since` is inside its 15-day window, else
`queryAll ... WHERE IsDeleted = true`.
Quota: `Sforce-Limit-Info: api-usage=N/LIMIT` on every response; 403 REQUEST_LIMIT_EXCEEDED is final.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from datetime import date, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import CrmConnector, Page
from oppsync_pipeline.lib.crm.http import (
    Auth,
    AuthError,
    CrmError,
    QuotaExhausted,
    RequestStats,
    RetryableHttpError,
)
from oppsync_pipeline.lib.record import (
    CrmUser,
    Opportunity,
    StageInfo,
    clean_text,
    parse_date,
    parse_datetime,
    parse_float,
    to_utc,
)

DEFAULT_API_VERSION = "62.0"
GET_DELETED_WINDOW = timedelta(days=15)
_SAFETY = timedelta(hours=1)   # stay clear of the 15-day edge of the delete log
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")
_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
_USAGE = re.compile(r"(?:^|[;,\s])api-usage=(\d+)/(\d+)")

# Standard fields (and the parent fields a filter may name) with their SOQL literal types.
FIELD_TYPES: dict[str, str] = {
    "Id": "string", "Name": "string", "AccountId": "string", "OwnerId": "string", "Amount": "number",
    "CurrencyIsoCode": "string", "StageName": "string", "ForecastCategoryName": "string", "Probability": "number",
    "ExpectedRevenue": "number", "CloseDate": "date", "IsClosed": "boolean", "IsWon": "boolean", "Type": "string",
    "LeadSource": "string", "Description": "string", "NextStep": "string", "CreatedDate": "datetime",
    "CreatedById": "string", "LastModifiedDate": "datetime", "LastModifiedById": "string",
    "SystemModstamp": "datetime", "IsDeleted": "boolean",
    "Account.Name": "string", "Account.BillingStreet": "string", "Account.BillingCity": "string",
    "Account.BillingState": "string", "Account.BillingPostalCode": "string", "Account.BillingCountry": "string",
    "Owner.Name": "string", "Owner.Email": "string", "CreatedBy.Name": "string", "CreatedBy.Email": "string",
}
_OPS = {"equal": "=", "not_equal": "!=", "more_than": ">", "less_than": "<", "at_least": ">=", "at_most": "<="}


# -- auth -----------------------------------------------------------------------------------------------------

class SalesforceAuth(Auth):
    """OAuth 2.0 client credentials (connected app with the flow enabled, run-as user set)."""

    refreshable = True

    def __init__(self, base_url: str, client_id: str, client_secret: str, timeout: float = 30.0):
        self.token_url = base_url.rstrip("/") + "/services/oauth2/token"
        self._client_id = client_id
        self._client_secret = client_secret
        self._token: str | None = None
        self.instance_url: str | None = None
        self.timeout = timeout

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if self._token is None:
            self.refresh(session)
        headers["Authorization"] = f"Bearer {self._token}"

    def refresh(self, session: requests.Session) -> None:
        self._token = None
        try:
            resp = session.post(self.token_url, data={"grant_type": "client_credentials",
                                                      "client_id": self._client_id,
                                                      "client_secret": self._client_secret},
                                headers={"Accept": "application/json"}, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            # A connection error is worth retrying: the request that needed the token is repeated.
            raise RetryableHttpError(f"token endpoint unreachable: {type(err).__name__}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise RetryableHttpError(f"token endpoint answered HTTP {resp.status_code}", status=resp.status_code)
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
            code = body.get("error", "unknown_error") if isinstance(body, dict) else "unknown_error"
            # error_description is the server's own text (no secret in it); the credentials are never echoed.
            desc = body.get("error_description", "") if isinstance(body, dict) else ""
            raise AuthError(f"Salesforce refused the client credentials: {code} ({desc}); check client_id / "
                            "client_secret and that the connected app allows the client credentials flow",
                            status=resp.status_code, code=code)
        self._token = body["access_token"]
        self.instance_url = body.get("instance_url")


# -- observe / classify ----------------------------------------------------------------------------------------

def observe(response: requests.Response, stats: RequestStats) -> None:
    """`Sforce-Limit-Info: api-usage=18/15000` -> the org's rolling 24 h usage and allocation."""
    info = response.headers.get("Sforce-Limit-Info")
    if info:
        m = _USAGE.search(info)
        if m:
            stats.quota_used, stats.quota_limit = int(m.group(1)), int(m.group(2))


def _errors(response: requests.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return []
    if isinstance(body, list):
        return [e for e in body if isinstance(e, dict)]
    return [body] if isinstance(body, dict) else []


def classify(response: requests.Response) -> Exception | None:
    if response.status_code < 400 or response.status_code == 401 or response.status_code >= 500:
        return None
    errors = _errors(response)
    first = errors[0] if errors else {}
    code = str(first.get("errorCode", "")) or None
    message = str(first.get("message", "")).strip().replace("\n", " ")
    if code == "REQUEST_LIMIT_EXCEEDED":
        if "concurrent" in message.lower():
            # The long-running-request cap is transient: wait and retry.
            return RetryableHttpError("REQUEST_LIMIT_EXCEEDED (ConcurrentRequests)", status=response.status_code)
        return QuotaExhausted("Salesforce daily API request allocation is spent (403 REQUEST_LIMIT_EXCEEDED: "
                              f"{message})", status=response.status_code, code=code)
    if code:
        return CrmError(f"Salesforce {response.status_code} {code}: {message[:500]}", status=response.status_code,
                        code=code)
    return None


# -- the connector ---------------------------------------------------------------------------------------------

class SalesforceConnector(CrmConnector):
    crm = "salesforce"
    max_page_size = 2000
    min_page_size = 200
    native_deletes = True
    credential_keys = ("client_id", "client_secret")
    known_fields = frozenset(FIELD_TYPES)
    _server_now: datetime | None = None   # the CRM's clock (latest `Date` header seen)

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        """Custom fields end in `__c` (also on a parent: `Account.Region__c`)."""
        return bool(_FIELD_NAME.match(name)) and name.split(".")[-1].endswith("__c")

    def make_auth(self) -> Auth:
        return SalesforceAuth(self.conn.base_url, self.credentials.get("client_id", ""),
                              self.credentials.get("client_secret", ""))

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats)
        # The server's clock, for the getDeleted window (a repeated header arrives joined: take the latest).
        dates = _HTTP_DATE.findall(response.headers.get("Date") or "")
        parsed = [to_utc(parsedate_to_datetime(d)) for d in dates]
        if parsed:
            self._server_now = max(parsed)

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response)

    # -- endpoints --------------------------------------------------------------------------------------------

    @property
    def api_version(self) -> str:
        return str(self.conn.options.get("api_version", DEFAULT_API_VERSION)).lstrip("v")

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    @property
    def multi_currency(self) -> bool:
        return bool(self.conn.options.get("multi_currency", True))

    def query(self, soql: str, *, include_deleted: bool = False) -> Iterator[list[dict[str, Any]]]:
        """Pages of records for one SOQL query, following `nextRecordsUrl` to the end."""
        batch = max(self.min_page_size, min(self.page_size, self.max_page_size))
        headers = {"Sforce-Query-Options": f"batchSize={batch}", "Accept": "application/json"}
        endpoint = "queryAll" if include_deleted else "query"
        body = self.client.get_json(f"{self.data_path}/{endpoint}", params={"q": soql}, headers=headers)
        while True:
            records = body.get("records") or []
            if records:
                yield records
            next_url = body.get("nextRecordsUrl")
            if body.get("done", True) or not next_url:
                return
            body = self.client.get_json(next_url, headers=headers)

    # -- CrmConnector -------------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        soql = ("SELECT Id, MasterLabel, ApiName, IsActive, IsClosed, IsWon, DefaultProbability, SortOrder "
                "FROM OpportunityStage ORDER BY SortOrder")
        stages = []
        for page in self.query(soql):
            for r in page:
                stages.append(StageInfo(key=r.get("ApiName") or r["MasterLabel"], label=r["MasterLabel"],
                                        is_closed=bool(r.get("IsClosed")), is_won=bool(r.get("IsWon")),
                                        sort_order=int(r.get("SortOrder") or 0),
                                        probability=parse_float(r.get("DefaultProbability"))))
        return stages

    def users(self) -> Iterable[CrmUser]:
        for page in self.query("SELECT Id, Name, Email, IsActive FROM User ORDER BY Id"):
            for r in page:
                yield CrmUser(crm_user_id=r["Id"], name=clean_text(r.get("Name")), email=r.get("Email"),
                              kind="user", active=bool(r.get("IsActive", True)))

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        for records in self.query(self.opportunity_soql(open_set, since)):
            yield [self._map(r) for r in records]

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        if since is not None and self._server_now is None:
            self.client.get_json(f"{self.data_path}/limits/")   # the server's clock (Date header), one call
        now = self._now()
        if since is not None and to_utc(since) > now - GET_DELETED_WINDOW + _SAFETY:
            result = self._get_deleted(to_utc(since), now)
            if result is not None:
                yield from result
                return
        # Older than the delete log (or the log was purged): ask queryAll for the Recycle Bin rows.
        soql = "SELECT Id, SystemModstamp FROM Opportunity WHERE IsDeleted = true"
        if since is not None:
            soql += f" AND SystemModstamp >= {soql_datetime(since)}"
        soql += " ORDER BY SystemModstamp, Id"
        for records in self.query(soql, include_deleted=True):
            yield [(r["Id"], parse_datetime(r.get("SystemModstamp"))) for r in records]

    # -- SOQL -----------------------------------------------------------------------------------------------------

    def select_fields(self) -> list[str]:
        fields = ["Id", "Name", "AccountId", "Account.Name", "Account.BillingStreet", "Account.BillingCity",
                  "Account.BillingState", "Account.BillingPostalCode", "Account.BillingCountry", "OwnerId",
                  "Owner.Name", "Owner.Email", "StageName", "IsClosed", "IsWon", "Amount", "CloseDate",
                  "Probability", "CreatedDate", "CreatedById", "SystemModstamp"]
        if self.multi_currency:
            fields.append("CurrencyIsoCode")
        for native in self.conn.fields.values():
            fields.append(_checked_field(native))
        seen, out = set(), []
        for f in fields:
            if f.lower() not in seen:
                seen.add(f.lower())
                out.append(f)
        return out

    def opportunity_soql(self, open_set: bool, since: datetime | None) -> str:
        where = [self._open_clause(open_set)]
        where += [render_filter(f, self._field_type(f.field)) for f in self.conn.filters]
        if since is not None:
            where.append(f"SystemModstamp >= {soql_datetime(since)}")
        return (f"SELECT {', '.join(self.select_fields())} FROM Opportunity WHERE "
                + " AND ".join(f"({w})" if " OR " in w else w for w in where)
                + " ORDER BY SystemModstamp, Id")

    def _open_clause(self, open_set: bool) -> str:
        if self.conn.open_statuses is None:
            return f"IsClosed = {'false' if open_set else 'true'}"
        # The configured names, plus the stage keys whose label is configured (status_for matches both).
        names = list(dict.fromkeys([*self.conn.open_statuses, *self.open_stage_keys(True)]))
        if not names:
            return "Id = null" if open_set else "Id != null"
        return f"StageName {'IN' if open_set else 'NOT IN'} ({', '.join(soql_string(n) for n in names)})"

    def _field_type(self, name: str) -> str:
        declared = self.conn.options.get("field_types", {}) or {}
        return declared.get(name) or FIELD_TYPES.get(name, "string")

    # -- mapping ----------------------------------------------------------------------------------------------------

    def _map(self, r: dict[str, Any]) -> Opportunity:
        stage = _get(r, self.field("stage", "StageName"))
        account = r.get("Account") or {}
        return self.opportunity(
            r["Id"], r,
            project_name=clean_text(_get(r, self.field("project_name", "Name"))),
            client_name=clean_text(_get(r, self.field("client_name", "Account.Name"))),
            service_location=clean_text(billing_address(account)),
            sales_executive=clean_text(_get(r, self.field("sales_executive", "Owner.Name"))),
            owner_crm_id=r.get("OwnerId"),
            stage=stage,
            status=self.status_for(stage, is_closed=r.get("IsClosed"), is_won=r.get("IsWon")),
            amount=parse_float(_get(r, self.field("amount", "Amount"))),
            currency=r.get("CurrencyIsoCode") if self.multi_currency else self.conn.options.get("currency"),
            close_date=parse_date(_get(r, self.field("close_date", "CloseDate"))),
            probability=parse_float(_get(r, self.field("probability", "Probability"))),
            created_at=parse_datetime(_get(r, self.field("created_at", "CreatedDate"))),
            created_by_crm_id=_get(r, self.field("created_by_crm_id", "CreatedById")),
            modified_at=parse_datetime(r.get("SystemModstamp")),
        )

    # -- deletes ----------------------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        local = datetime.now(timezone.utc).replace(tzinfo=None)
        return max(self._server_now, local) if self._server_now else local

    def _get_deleted(self, since: datetime, now: datetime) -> list[list[tuple[str, datetime | None]]] | None:
        """The delete log for [since, now]; None when the log no longer reaches back to `since`."""
        end = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
        # Salesforce wants start more than one minute before end (400 INVALID_REPLICATION_DATE otherwise, e.g.
        # when the bookmark is seconds old); a wider window only re-reads deletes already applied.
        start = min(since.replace(second=0, microsecond=0), end - timedelta(minutes=2))
        body = self.client.get_json(f"{self.data_path}/sobjects/Opportunity/deleted/",
                                    params={"start": _iso(start), "end": _iso(end)})
        earliest = parse_datetime(body.get("earliestDateAvailable"))
        if earliest is not None and earliest > start:
            return None
        rows = [(d["id"], parse_datetime(d.get("deletedDate"))) for d in body.get("deletedRecords") or []]
        size = self.page_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]


# -- SOQL rendering ------------------------------------------------------------------------------------------------

def soql_string(value: Any) -> str:
    """A quoted SOQL string literal: backslash, quotes and control characters escaped (injection-safe)."""
    text = str(value)
    for ch, esc in (("\\", "\\\\"), ("'", "\\'"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
                    ("\b", "\\b"), ("\f", "\\f")):
        text = text.replace(ch, esc)
    return f"'{text}'"


def soql_datetime(value: datetime) -> str:
    """Unquoted UTC datetime literal, floored to the second (>= stays inclusive)."""
    return to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(value: datetime) -> str:
    return to_utc(value).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def soql_literal(value: Any, ftype: str) -> str:
    """A filter value as a SOQL literal of the field's type; anything that does not fit is refused, not inlined."""
    if value is None:
        return "null"
    if ftype == "boolean":
        if isinstance(value, bool):
            return "true" if value else "false"
        if str(value).strip().lower() in ("true", "false"):
            return str(value).strip().lower()
        raise ValueError(f"{value!r} is not a boolean")
    if ftype == "number":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        number = float(value)  # raises ValueError on text such as "1 OR Id != null"
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        return repr(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)
    if ftype == "datetime":
        parsed = value if isinstance(value, datetime) else parse_datetime(str(value)) if len(str(value)) > 10 \
            else datetime.combine(date.fromisoformat(str(value)), datetime.min.time())
        return soql_datetime(parsed)  # type: ignore[arg-type]
    if ftype == "date":
        parsed_date = value if isinstance(value, date) and not isinstance(value, datetime) else parse_date(value)
        return parsed_date.isoformat()  # type: ignore[union-attr]
    if isinstance(value, bool):
        return "true" if value else "false"
    return soql_string(value)


def render_filter(f: RecordFilter, ftype: str) -> str:
    field = _checked_field(f.field)
    try:
        if f.op == "in":
            return f"{field} IN ({', '.join(soql_literal(v, ftype) for v in f.value)})"
        return f"{field} {_OPS[f.op]} {soql_literal(f.value, ftype)}"
    except (TypeError, ValueError) as err:
        raise CrmError(f"filter on {field}: value does not fit the field's type {ftype} ({err})",
                       code="INVALID_FILTER") from None


def _checked_field(name: str) -> str:
    if not _FIELD_NAME.match(name):
        raise CrmError(f"'{name}' is not a Salesforce field name", code="INVALID_FIELD")
    return name


# -- record helpers ------------------------------------------------------------------------------------------------

def _get(record: dict[str, Any] | None, path: str) -> Any:
    """A field of a record by API name, dotted for parents (`Account.Name`); None when a parent is null."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        if part in value:
            value = value[part]
        else:  # SOQL names are case-insensitive; the JSON uses the field's canonical case
            lowered = part.lower()
            value = next((v for k, v in value.items() if k.lower() == lowered), None)
    return value


def billing_address(account: dict[str, Any]) -> str | None:
    """`street, city, state postal, country`, skipping missing parts."""
    region = " ".join(p for p in (account.get("BillingState"), account.get("BillingPostalCode")) if p)
    parts = [account.get("BillingStreet"), account.get("BillingCity"), region, account.get("BillingCountry")]
    text = ", ".join(str(p).strip() for p in parts if p and str(p).strip())
    return text or None
