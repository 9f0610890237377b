"""Salesforce: REST API + SOQL over the Opportunity sObject.

Discovery (once per run): `GET sobjects/Opportunity/describe` says which fields this org has and this API user
can see: `CurrencyIsoCode` only in multi-currency orgs (a single-currency org takes its currency from
`Organization.DefaultCurrencyIsoCode`), the custom fields a connection names in `fields:` / `filters:` (they
must exist; a `created_by_crm_id` field must be a lookup to User) and the types filter literals are rendered
with. Optional reads, each refused with a warning and a fallback: `/limits` (quota from `Sforce-Limit-Info`),
the Organization query (no currency), the OpportunityStage dictionary (StageName as name and id, status from
each record's IsClosed / IsWon), the User query (no names).
Stage model: `stage` = the stage's MasterLabel (what users see) for the StageName value the record carries,
`stage_id` = that value (the stage's ApiName), `crm_status` = ForecastCategoryName.

Auth: OAuth 2.0 client-credentials flow against `{base_url}/services/oauth2/token` (the org's My Domain host);
a 401 INVALID_SESSION_ID mid-paging gets a new token and the same request is repeated (ApiClient).
Paging: `GET /services/data/vNN.0/query?q=` then the relative `nextRecordsUrl` until `done`; page size through
`Sforce-Query-Options: batchSize=N` (200..2000).
Open set: `IsClosed = false` (the tenant's OpportunityStage semantics), or `StageName IN (open_statuses)`.
Incremental: `(SystemModstamp >= since OR Account.SystemModstamp >= since) ORDER BY SystemModstamp, Id`
(SystemModstamp also moves on system changes; an account rename moves only the account's own stamp, so the
opportunities of accounts changed since the cursor are asked for in the same query: no extra request).
Deletes: getDeleted (`/sobjects/Opportunity/deleted/`) when `since` is inside its 15-day window, else
`queryAll ... WHERE IsDeleted = true`.
Close time (won / lost records): `LastStageChangeDate` (API 52.0+, when describe lists it), else `CloseDate`'s day at
00:00 UTC. Read by id: the same select list `WHERE Id IN (...)` through /query (the Recycle Bin is left out), at most
300 ids and a URI well under the 16,384-byte limit per query; filters are then evaluated in Python as SOQL would.
Quota: `Sforce-Limit-Info: api-usage=N/LIMIT` on every response; 403 REQUEST_LIMIT_EXCEEDED is final.
Validation (pages.py): every answer is checked before use against the shape Salesforce documents (QueryPage:
`totalSize`, `done`, `records`, and `nextRecordsUrl` while not done, a relative path on this org; record ids 15 or
18 alphanumerics; describe's `fields`, getDeleted's `deletedRecords` and dates, `/limits`' DailyApiRequests): a
page that does not fit fails the run naming the URL and page number. Paging is bounded by the first page's
`totalSize`, and a `nextRecordsUrl` followed before fails the run. Count: a full read of a set tallies the ids it
received against that `totalSize` (free: no extra request); `count()` asks `SELECT COUNT() ... WHERE <the same
where>` (the sync asks it again when a read came up short).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Generic, NamedTuple, NotRequired, TypeVar
from urllib.parse import urlencode

import requests
from pydantic import AfterValidator, Field, StrictBool, StrictInt, StringConstraints, model_validator
from typing_extensions import TypedDict

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import ConnectorOptions, CrmConnector, Page, T
from oppsync_pipeline.lib.crm.fields import FieldMap, configured_fields, fields_to_read
from oppsync_pipeline.lib.crm.http import (
    Auth,
    AuthError,
    CrmError,
    QuotaExhausted,
    RequestStats,
    RetryableHttpError,
    json_body,
)
from oppsync_pipeline.lib.crm.pages import RECORD, PageModel, check_page
from oppsync_pipeline.lib.crm.paging import JSONLinkPaginator, PageRequest
from oppsync_pipeline.lib.crm.parallel import in_background, slice_count, split_after, streams
from oppsync_pipeline.lib.record import (
    CrmUser,
    Opportunity,
    StageInfo,
    Status,
    clean_text,
    format_address,
    parse_date,
    parse_datetime,
    parse_float,
    to_utc,
)

DEFAULT_API_VERSION = "62.0"
GET_DELETED_WINDOW = timedelta(days=15)
_SAFETY = timedelta(hours=1)  # stay clear of the 15-day edge of the delete log
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")
_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
_USAGE = re.compile(r"(?:^|[;,\s])api-usage=(\d+)/(\d+)")

# Standard fields (and the parent fields a filter may name) with their SOQL literal types.
FIELD_TYPES: dict[str, str] = {
    "Id": "string",
    "Name": "string",
    "AccountId": "string",
    "OwnerId": "string",
    "Amount": "number",
    "CurrencyIsoCode": "string",
    "StageName": "string",
    "ForecastCategoryName": "string",
    "Probability": "number",
    "ExpectedRevenue": "number",
    "CloseDate": "date",
    "IsClosed": "boolean",
    "IsWon": "boolean",
    "Type": "string",
    "LeadSource": "string",
    "Description": "string",
    "NextStep": "string",
    "CreatedDate": "datetime",
    "CreatedById": "string",
    "LastModifiedDate": "datetime",
    "LastModifiedById": "string",
    "SystemModstamp": "datetime",
    "IsDeleted": "boolean",
    "LastStageChangeDate": "datetime",
    "Account.Name": "string",
    "Account.BillingStreet": "string",
    "Account.BillingCity": "string",
    "Account.BillingState": "string",
    "Account.BillingPostalCode": "string",
    "Account.BillingCountry": "string",
    "Account.SystemModstamp": "datetime",
    "Account.LastModifiedDate": "datetime",
    "Owner.Name": "string",
    "Owner.Email": "string",
    "CreatedBy.Name": "string",
    "CreatedBy.Email": "string",
}
# Where each canonical field comes from (fields.py); the stage's value is a StageName (ApiName), named by its label.
FIELD_MAP = FieldMap(
    project_name="Name",
    client_name="Account.Name",
    sales_executive="Owner.Name",
    stage="StageName",
    amount="Amount",
    close_date="CloseDate",
    probability="Probability",
    created_at="CreatedDate",
    created_by_crm_id="CreatedById",
)
# The alias the converted amount is selected under: `convertCurrency(Amount) ConvertedAmount` (an alias keeps the
# unconverted Amount in the same row). Salesforce converts into the API user's currency at the org's rates; with
# advanced currency management (dated exchange rates) it applies the rate dated for the opportunity's CloseDate,
# so oppsync stores what Salesforce itself reports and keeps no rates of its own.
CONVERTED_AMOUNT = "ConvertedAmount"
# What every opportunity query selects (then the org's optional fields and the configured ones).
SELECT_FIELDS = (
    "Id",
    "Name",
    "AccountId",
    "Account.Name",
    "Account.BillingStreet",
    "Account.BillingCity",
    "Account.BillingState",
    "Account.BillingPostalCode",
    "Account.BillingCountry",
    "OwnerId",
    "Owner.Name",
    "Owner.Email",
    "StageName",
    "ForecastCategoryName",
    "IsClosed",
    "IsWon",
    "Amount",
    "CloseDate",
    "Probability",
    "CreatedDate",
    "CreatedById",
    "SystemModstamp",
)
# Types of describe mapped to the SOQL literal kinds (anything else is a quoted string).
_DESCRIBE_TYPES = {
    "double": "number",
    "currency": "number",
    "percent": "number",
    "int": "number",
    "long": "number",
    "date": "date",
    "datetime": "datetime",
    "boolean": "boolean",
}
_NO_COLUMN = re.compile(r"No such column '([A-Za-z0-9_]+)'|Didn't understand relationship '([A-Za-z0-9_]+)'")
_OPS = {"equal": "=", "not_equal": "!=", "more_than": ">", "less_than": "<", "at_least": ">=", "at_most": "<="}
# Record ids are 15 (case-sensitive) or 18 characters; anything else cannot be an id of the org, and SOQL refuses it
# as a literal (400 INVALID_QUERY_FILTER_OPERATOR "invalid ID field") instead of matching nothing.
_SF_ID = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")
# Reads by id: at most this many ids per SOQL, and the encoded `/query?q=` URI kept under this many bytes. URI plus
# headers must stay under 16,384 bytes (help article 000386264: 414 / 431 beyond); 4 KB is left for the headers
# (the bearer token, Sforce-Query-Options, Host). 300 quoted 18-character ids encode to ~8,400 bytes.
ID_BATCH = 300
MAX_QUERY_URI = 16_384 - 4_096
# The close time: `LastStageChangeDate` (API 52.0+, may be hidden by field-level security) when the org has it,
# else the day in `CloseDate` (what Salesforce reports take as a closed opportunity's close date) at 00:00 UTC.
LAST_STAGE_CHANGE = "LastStageChangeDate"
CLOSE_DATE = "CloseDate"


# -- pages: the answers Salesforce documents, checked before use (pages.py) -------------------------------------------


def _readable_datetime(value: str) -> str:
    parse_datetime(value)  # BadValue (a ValueError) when it is not a date-time Salesforce writes
    return value


SalesforceId = Annotated[str, StringConstraints(strict=True, pattern=_SF_ID.pattern)]
SalesforceDatetime = Annotated[str, StringConstraints(strict=True), AfterValidator(_readable_datetime)]
# `nextRecordsUrl` is relative to the org's host ("/services/data/v62.0/query/01gRO0000016PIAYA2-2000"): anything
# else (another host, another resource) would get the bearer token sent where Salesforce never pointed.
NextRecordsUrl = Annotated[
    str, StringConstraints(strict=True, pattern=r"^/services/data/v\d+\.\d/(?:query|queryAll)/[^/?#\s]+/?$")
]
# Records are checked for the keys the connector cannot do without; their other keys are neither checked nor
# copied (without `ignore`, a TypedDict inside a PageModel inherits its `allow` and copies every field: 10x slower).


class IdRecord(TypedDict):
    """A record of a query that selects Id (opportunities, users, queryAll's deleted rows)."""

    __pydantic_config__ = RECORD  # type: ignore[misc]
    Id: SalesforceId


class DeletedRow(TypedDict):
    """A Recycle Bin row of queryAll (`SELECT Id, SystemModstamp ... WHERE IsDeleted = true`)."""

    __pydantic_config__ = RECORD  # type: ignore[misc]
    Id: SalesforceId
    SystemModstamp: SalesforceDatetime


class StageRecord(TypedDict):
    """An OpportunityStage row: MasterLabel is what users see (ApiName is null in orgs older than the field)."""

    __pydantic_config__ = RECORD  # type: ignore[misc]
    MasterLabel: Annotated[str, StringConstraints(strict=True, min_length=1)]
    ApiName: NotRequired[Annotated[str, StringConstraints(strict=True)] | None]


class CurrencyTypeRecord(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    IsoCode: Annotated[str, StringConstraints(strict=True)]


class OrgRecord(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    DefaultCurrencyIsoCode: Annotated[str, StringConstraints(strict=True)] | None


R = TypeVar("R")


class QueryPage(PageModel, Generic[R]):
    """A page of `/query`, `/queryAll` or a `nextRecordsUrl`. `totalSize` counts every row the query matches (on
    every page), `done` says whether this is the last page."""

    totalSize: StrictInt = Field(ge=0)
    done: StrictBool
    records: list[R]
    nextRecordsUrl: NextRecordsUrl | None = None

    @model_validator(mode="after")
    def _next_page_named_unless_done(self) -> QueryPage[R]:
        if not self.done and self.nextRecordsUrl is None:
            raise ValueError("done is false but there is no nextRecordsUrl")
        return self


class CountAnswer(PageModel):
    """`SELECT COUNT() ...`: the count is `totalSize` (the records list is empty, or null in older versions)."""

    totalSize: StrictInt = Field(ge=0)
    done: StrictBool


class DescribeField(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    name: Annotated[str, StringConstraints(strict=True, min_length=1)]


class Describe(PageModel):
    fields: list[DescribeField]


class DeletedRecord(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    id: SalesforceId
    deletedDate: SalesforceDatetime


class DeletedPage(PageModel):
    """getDeleted: the ids deleted in the window, and how far back the delete log still reaches."""

    deletedRecords: list[DeletedRecord]
    earliestDateAvailable: SalesforceDatetime
    latestDateCovered: SalesforceDatetime


class DailyRequests(PageModel):
    Max: StrictInt = Field(ge=0)
    Remaining: StrictInt


class Limits(PageModel):
    DailyApiRequests: DailyRequests


class Rows(NamedTuple):
    """One page of a query: its records as Salesforce sent them, and the query's totalSize."""

    records: list[dict[str, Any]]
    total: int | None  # None: a range of a split read (the first page carries the set's count)


def _next_records_url(page: QueryPage[Any]) -> str | None:
    """A query's next page: `nextRecordsUrl` (org-relative) until `done`."""
    return None if page.done else str(page.nextRecordsUrl)


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
            # Counted in the run's api_requests and token_requests (token_request): every request sent counts,
            # although the org's daily allocation (Sforce-Limit-Info) counts REST calls only.
            resp = self.token_request(
                session,
                "POST",
                self.token_url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": self._client_id,
                    "client_secret": self._client_secret,
                },
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
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
            raise AuthError(
                f"Salesforce refused the client credentials: {code} ({desc}); check client_id / "
                "client_secret and that the connected app allows the client credentials flow",
                status=resp.status_code,
                code=code,
            )
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
    body = json_body(response)
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
        return QuotaExhausted(
            f"Salesforce daily API request allocation is spent (403 REQUEST_LIMIT_EXCEEDED: {message})",
            status=response.status_code,
            code=code,
        )
    if code:
        return CrmError(
            f"Salesforce {response.status_code} {code}: {message[:500]}", status=response.status_code, code=code
        )
    return None


def fix_for(code: str | None, message: str, conn: Any = None) -> str | None:
    """What to check for a refused request, naming the config key or permission (None: nothing sharper)."""
    if code == "INVALID_FIELD":
        m = _NO_COLUMN.search(message)
        name = (m.group(1) or m.group(2)) if m else None
        if name and name.lower() == "currencyisocode":
            return (
                "this org has no multi-currency (Opportunity.CurrencyIsoCode does not exist): remove "
                "options.multi_currency or set it to false; the currency then comes from the org's default "
                "or options.currency"
            )
        for key, native in _configured_fields(conn):
            if name and name.lower() in [p.lower() for p in native.split(".")]:
                return (
                    f"check {key} ('{native}'): the field does not exist in this org or the API user has no "
                    "field-level read access to it (Setup > Object Manager > Opportunity > Fields)"
                )
        return (
            "a field the query names is not visible to the API user: check the connection's fields: and "
            "filters:, field-level security for the API user, and options.api_version"
        )
    if code == "MALFORMED_QUERY":
        return "check the connection's filters: (field names, operators and values) and fields:"
    if code == "INVALID_TYPE":
        return (
            "the API user cannot see this object: grant it Read on the object in its profile or a permission "
            "set (Opportunity, Account and User are required)"
        )
    if code in ("INSUFFICIENT_ACCESS", "INSUFFICIENT_ACCESS_OR_READONLY"):
        return "the API user lacks a permission for this request: check its profile / permission sets"
    if code in ("API_DISABLED_FOR_ORG", "API_CURRENTLY_DISABLED"):
        return (
            "the API user needs the 'API Enabled' permission, in an edition with API access (Enterprise, "
            "Unlimited, Performance, Developer; Professional only with the API add-on)"
        )
    if code == "NOT_FOUND":
        return "check base_url (the org's My Domain URL) and options.api_version"
    return None


def _configured_fields(conn: Any) -> list[tuple[str, str]]:
    return [] if conn is None else list(configured_fields(conn))


class _Spent(Exception):
    """Carries a QuotaExhausted through `optional` (which would take its 403 for a refused read)."""


# -- the connector ---------------------------------------------------------------------------------------------


class SalesforceOptions(ConnectorOptions):
    """`options:` of a Salesforce connection."""

    api_version: str | float = DEFAULT_API_VERSION  # "61.0" (a YAML 61.0 is read as the number)
    multi_currency: bool | None = None  # overrides describe's answer (CurrencyIsoCode present)
    currency: str | None = None  # single-currency orgs whose Organization is not readable
    field_types: dict[str, str] = {}  # SOQL literal types for filter fields describe cannot see


class SalesforceConnector(CrmConnector):
    Options = SalesforceOptions
    # "25 concurrent long-running requests" is the only concurrency limit Salesforce documents (short queries
    # have none): full reads split the date space into at most that many ranges (fewer: parallel.slice_count)
    read_concurrency = 25
    sets_side_by_side = True  # SOQL brings the account with each record: mapping caches only the stages
    id_field = "Id"
    field_map = FIELD_MAP
    crm = "salesforce"
    max_page_size = 2000
    min_page_size = 200
    native_deletes = True
    known_fields = frozenset(FIELD_TYPES)
    _server_now: datetime | None = None  # the CRM's clock (latest `Date` header seen)
    # learnt by discover_tenant (once per run)
    _fields: dict[str, dict[str, Any]] | None = None  # Opportunity describe, by lower-cased field name
    _parents: dict[str, dict[str, dict[str, Any]]] | None = None
    _multi_currency: bool = False
    _org_currency: str | None = None
    _stage_by_value: dict[str, StageInfo] | None = None
    _last_stage_change: bool = False  # describe lists LastStageChangeDate

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        """Custom fields end in `__c` (also on a parent: `Account.Region__c`)."""
        return bool(_FIELD_NAME.match(name)) and name.split(".")[-1].endswith("__c")

    def make_auth(self) -> Auth:
        return SalesforceAuth(
            self.conn.base_url, self.credentials.get("client_id", ""), self.credentials.get("client_secret", "")
        )

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats)
        # The server's clock, for the getDeleted window (a repeated header arrives joined: take the latest).
        dates = _HTTP_DATE.findall(response.headers.get("Date") or "")
        parsed = [to_utc(parsedate_to_datetime(d)) for d in dates]
        if parsed:
            self._server_now = max(parsed)

    def classify(self, response: requests.Response) -> Exception | None:
        problem = classify(response)
        if isinstance(problem, CrmError) and not isinstance(problem, QuotaExhausted):
            hint = fix_for(problem.code, str(problem), self.conn)
            if hint:
                problem.args = (f"{problem}. Fix: {hint}",)
        return problem

    # -- endpoints --------------------------------------------------------------------------------------------

    @property
    def api_version(self) -> str:
        return str(self.options.api_version).lstrip("v")

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    @property
    def multi_currency(self) -> bool:
        """Whether opportunities carry their own currency: describe decides, options.multi_currency overrides."""
        self.prepare()
        return self._multi_currency

    @property
    def _query_headers(self) -> dict[str, str]:
        batch = max(self.min_page_size, min(self.page_size, self.max_page_size))
        return {"Sforce-Query-Options": f"batchSize={batch}", "Accept": "application/json"}

    def query(self, soql: str, record: Any = IdRecord, *, include_deleted: bool = False) -> Iterator[Rows]:
        """Every page of one SOQL query (`record`: what each of its records must carry), following
        `nextRecordsUrl` until `done`. Each page is checked before use; the paging is bounded by the first page's
        totalSize and fails on a next link it followed before."""
        url = f"{self.data_path}/{'queryAll' if include_deleted else 'query'}"
        request = PageRequest("GET", url, params={"q": soql}, headers=self._query_headers)
        # Salesforce may send batches smaller than asked ("no guarantee", QueryOptions): the bound assumes its
        # smallest documented batch.
        for fetched in self.pages(
            request,
            JSONLinkPaginator(_next_records_url),
            model=QueryPage[record],
            records="records",
            total=lambda page: page.totalSize,
            page_size=self.min_page_size,
            full_url=False,
        ):
            yield Rows(fetched.records, fetched.page.totalSize)

    def describe(self, sobject: str) -> dict[str, dict[str, Any]]:
        """`sobjects/{sobject}/describe`: the fields this API user can see, by lower-cased name."""
        url = f"{self.data_path}/sobjects/{sobject}/describe"
        body = self.client.get_json(url)
        check_page(Describe, body, crm=self.crm, url=url)
        return {str(f["name"]).lower(): f for f in body["fields"]}

    # -- discovery ----------------------------------------------------------------------------------------------

    def discover_tenant(self) -> None:
        """Opportunity describe (required: an API user that may query opportunities may describe them), the
        configured fields checked against it, the currency model, and the org's API allocation (optional)."""
        self._parents = {}
        self._fields = self.describe("Opportunity")
        custom = sorted(str(f["name"]) for f in self._fields.values() if str(f["name"]).endswith("__c"))
        self.note(
            "Opportunity describe",
            True,
            f"{len(self._fields)} fields visible to the API user; custom "
            f"fields: {', '.join(custom) if custom else 'none'}",
        )
        self._check_configured_fields()
        self._check_currency_option()
        # once the configuration is known to be good: /limits does not depend on describe, and is read while the
        # currency model is (its answer, or its error, taken at its turn below, as if it had been asked then)
        limits = in_background(lambda: self.client.get_json(f"{self.data_path}/limits/"))
        self._discover_currency()
        self._discover_close_time()
        self._optional(
            "API limits (/limits)",
            lambda: self._read_limits(limits()),
            None,
            fallback_text="quota read from the Sforce-Limit-Info header of every response",
        )

    def _check_configured_fields(self) -> None:
        for key, native in _configured_fields(self.conn):
            info = self._field_info(native, key)
            if key.startswith("fields.") and info is not None:
                self.note(key, True, f"{native} ({info.get('type')})")
        creator = self.conn.fields.get("created_by_crm_id")
        if creator:
            info = self._field_info(creator, "fields.created_by_crm_id")
            refs = (info or {}).get("referenceTo") or []
            if info is not None and (info.get("type") != "reference" or "User" not in refs):
                what = f"a lookup to {'/'.join(refs)}" if refs else f"a {info.get('type')} field"
                raise CrmError(
                    f"fields.created_by_crm_id: '{creator}' is {what}, not a lookup to User; the creator "
                    "must be a User id (CreatedById, or a custom User lookup such as "
                    "Original_Creator__c): point fields.created_by_crm_id at one",
                    code="INVALID_FIELD",
                    permanent=True,
                )

    def _field_info(self, native: str, key: str) -> dict[str, Any] | None:
        """describe of one configured field (dotted: the parent's describe for custom parent fields; standard
        parent fields are taken as they are). A field this org does not have is a permanent error naming `key`."""
        assert self._fields is not None and self._parents is not None
        _checked_field(native)
        parts = native.split(".")
        if len(parts) == 1:
            info = self._fields.get(native.lower())
            if info is None:
                raise CrmError(
                    f"{key}: '{native}' is not a field of Opportunity in this org, or the API user has "
                    "no field-level read access to it; check the API name in Setup > Object Manager > "
                    f"Opportunity > Fields (custom fields end in __c) and fix {key}",
                    code="INVALID_FIELD",
                    permanent=True,
                )
            return info
        rel = next(
            (f for f in self._fields.values() if str(f.get("relationshipName") or "").lower() == parts[0].lower()), None
        )
        if rel is None:
            raise CrmError(
                f"{key}: '{native}': Opportunity has no relationship '{parts[0]}' in this org (custom "
                f"relationships end in __r); fix {key}",
                code="INVALID_FIELD",
                permanent=True,
            )
        if len(parts) != 2 or not parts[1].endswith("__c") or not rel.get("referenceTo"):
            return None
        parent = str(rel["referenceTo"][0])
        if parent not in self._parents:
            self._parents[parent] = self.describe(parent)
        info = self._parents[parent].get(parts[1].lower())
        if info is None:
            raise CrmError(
                f"{key}: '{native}': {parent} has no field '{parts[1]}' visible to the API user; fix {key}",
                code="INVALID_FIELD",
                permanent=True,
            )
        return info

    def _check_currency_option(self) -> None:
        assert self._fields is not None
        if self.options.multi_currency and "currencyisocode" not in self._fields:
            raise CrmError(
                "options.multi_currency is true, but Opportunity has no CurrencyIsoCode in this org "
                "(multi-currency is not enabled): remove options.multi_currency (describe decides)",
                code="INVALID_FIELD",
                permanent=True,
            )

    def _discover_currency(self) -> None:
        assert self._fields is not None
        present = "currencyisocode" in self._fields
        override = self.options.multi_currency
        self._multi_currency = present if override is None else bool(override)
        self.note(
            "CurrencyIsoCode",
            self._multi_currency,
            (
                "read: multi-currency org"
                if self._multi_currency
                else "not read: options.multi_currency is false"
                if present
                else "not read: single-currency org (Opportunity describe has no CurrencyIsoCode)"
            ),
        )
        if self._multi_currency:
            self.note("currency", True, "multi-currency org: each opportunity's CurrencyIsoCode")
            self._org_currency = self._optional(
                "corporate currency (CurrencyType.IsCorporate)",
                self._read_corporate_currency,
                None,
                fallback_text="base_currency left empty (amount_base still converted by convertCurrency)",
            )
            return
        configured = self.options.currency
        if configured:
            self._org_currency = str(configured)
            self.note("currency", True, f"options.currency: {configured}")
            return
        self._org_currency = self._optional(
            "org currency (Organization.DefaultCurrencyIsoCode)",
            self._read_org_currency,
            None,
            fallback_text="single-currency org: currency left empty (set options.currency to fill it)",
        )

    def _discover_close_time(self) -> None:
        """LastStageChangeDate exists from API 52.0 and only where field-level security lets the API user read it:
        describe (of the API version the connector speaks) decides; without it the close time is CloseDate's day."""
        assert self._fields is not None
        self._last_stage_change = LAST_STAGE_CHANGE.lower() in self._fields
        self.note(
            "close time",
            True,
            f"{LAST_STAGE_CHANGE} (when the stage last changed), else {CLOSE_DATE} at 00:00 UTC"
            if self._last_stage_change
            else f"{CLOSE_DATE} at 00:00 UTC only: Opportunity describe has no {LAST_STAGE_CHANGE} (API version "
            f"before 52.0, options.api_version = {self.api_version}, or hidden from the API user by field-level "
            "security); closes are dated by day",
        )
        self.note(
            LAST_STAGE_CHANGE,
            self._last_stage_change,
            "read" if self._last_stage_change else "not in describe: closes dated by CloseDate",
        )

    def _read_corporate_currency(self) -> str | None:
        """The corporate currency: the one convertCurrency() converts into for an API user whose personal
        currency is the corporate one (a new user's default)."""
        for rows in self.query("SELECT IsoCode FROM CurrencyType WHERE IsCorporate = true", CurrencyTypeRecord):
            for r in rows.records:
                return r["IsoCode"]
        return None

    def _converts_amount(self) -> bool:
        """Whether the amount's field can be converted: a currency field of a multi-currency org."""
        if not self._multi_currency or "currencyisocode" not in (self._fields or {}):
            return False
        native = self.field("amount")
        info = (self._fields or {}).get(native.lower()) if "." not in native else None
        return info is not None and str(info.get("type")) == "currency"

    def _read_org_currency(self) -> str | None:
        for rows in self.query("SELECT DefaultCurrencyIsoCode FROM Organization", OrgRecord):
            for r in rows.records:
                return r["DefaultCurrencyIsoCode"]
        return None

    def _read_limits(self, body: Any) -> None:
        url = f"{self.data_path}/limits/"
        daily = check_page(Limits, body, crm=self.crm, url=url).DailyApiRequests
        self.stats.quota_limit = daily.Max
        self.stats.quota_used = daily.Max - daily.Remaining

    def _optional(self, name: str, call: Any, fallback: T, *, fallback_text: str) -> T:
        """`optional`, plus Salesforce's answer for an object the API user may not read: SOQL and describe say
        the object does not exist (400 INVALID_TYPE) rather than 403. A spent allocation (403
        REQUEST_LIMIT_EXCEEDED) is not a refusal: it stops the run as it would on any other read."""

        def guarded() -> T:
            try:
                return call()
            except QuotaExhausted as err:
                raise _Spent(err) from None

        try:
            return self.optional(name, guarded, fallback, fallback_text=fallback_text)
        except _Spent as spent:
            raise spent.args[0] from None
        except CrmError as err:
            if err.status != 400 or err.code != "INVALID_TYPE":
                raise
            self.stats.warn(
                f"{name}: HTTP 400 INVALID_TYPE, the object is not visible to this API user; {fallback_text}"
            )
            self.note(name, False, f"HTTP 400 INVALID_TYPE (no access to the object); {fallback_text}")
            return fallback

    # -- CrmConnector -------------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        return self._optional(
            "stage dictionary (OpportunityStage)",
            self._read_stages,
            [],
            fallback_text="StageName is both the stage name and stage_id; open/won/lost from "
            "each record's IsClosed / IsWon",
        )

    def _read_stages(self) -> list[StageInfo]:
        soql = (
            "SELECT Id, MasterLabel, ApiName, IsActive, IsClosed, IsWon, DefaultProbability, SortOrder "
            "FROM OpportunityStage ORDER BY SortOrder"
        )
        stages = []
        for rows in self.query(soql, StageRecord):
            for r in rows.records:
                stages.append(
                    StageInfo(
                        key=r.get("ApiName") or r["MasterLabel"],
                        label=r["MasterLabel"],
                        is_closed=bool(r.get("IsClosed")),
                        is_won=bool(r.get("IsWon")),
                        sort_order=int(r.get("SortOrder") or 0),
                        probability=parse_float(r.get("DefaultProbability")),
                    )
                )
        return stages

    def users(self) -> Iterable[CrmUser]:
        return self._optional(
            "users (User query)",
            lambda: list(self._read_users()),
            [],
            fallback_text="owner and creator ids are kept, without names or emails",
        )

    def _read_users(self) -> Iterator[CrmUser]:
        for rows in self.query("SELECT Id, Name, Email, IsActive FROM User ORDER BY Id"):
            for r in rows.records:
                yield CrmUser(
                    crm_user_id=r["Id"],
                    name=clean_text(r.get("Name")),
                    email=r.get("Email"),
                    kind="user",
                    active=bool(r.get("IsActive", True)),
                )

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        full = since is None and self.degree > 1
        for rows in self._full(open_set) if full else self.query(self.opportunity_soql(open_set, since)):
            # every id received counts, quarantined or not; the first page's totalSize is the CRM's own count
            self.tally(open_set, since, (r["Id"] for r in rows.records), crm_count=rows.total)
            if rows.records:
                yield self.map_page(rows.records)

    def _full(self, open_set: bool) -> Iterator[Rows]:
        """A full read of a set split in the date space: the first page is read alone (its totalSize is the
        set's count); what comes after it is read as CreatedDate ranges of whole seconds, each its own query
        (ordered by CreatedDate, Id) and `nextRecordsUrl` cursor, side by side (parallel.streams: the ranges'
        pages interleaved as they arrive; a failing range fails the read). The widths follow the first page's
        density; the last range is open-ended. The first range starts at the second the first page ended in:
        the records of that second the first page already held are left out of it (by id)."""
        where = self.opportunity_where(open_set, None)
        head = f"SELECT {', '.join(self.select_fields())} FROM Opportunity WHERE "
        order = f" ORDER BY {FULL_ORDER}"
        pages = self.query(head + where + order)
        first = next(pages, None)
        pages.close()  # the next page is asked only by the ranges below
        if first is None:
            return
        yield first
        rest = first.total - len(first.records)
        if rest <= 0 or not first.records:
            return
        stamps = [_epoch(parse_datetime(r["CreatedDate"])) for r in first.records]
        start = math.floor(stamps[-1])
        read = {r["Id"] for r, at in zip(first.records, stamps, strict=True) if at >= start}
        parts = slice_count(self.degree, self.page_size)
        low = stamps[0]
        bounds = [start] + [math.ceil(b) for b in split_after(low, start, len(first.records), rest, parts)[1:]]

        def time_range(i: int) -> Callable[[], Iterator[Rows]]:
            cond = f"CreatedDate >= {soql_datetime(_at(bounds[i]))}"
            if i + 1 < len(bounds):
                cond += f" AND CreatedDate < {soql_datetime(_at(bounds[i + 1]))}"
            soql = f"{head}({where}) AND {cond}{order}"

            def run() -> Iterator[Rows]:
                for rows in self.query(soql):
                    yield Rows([r for r in rows.records if r["Id"] not in read] if i == 0 else rows.records, None)

            return run

        yield from streams([time_range(i) for i in range(len(bounds))], self.degree)

    def count(self, open_set: bool) -> int | None:
        """`SELECT COUNT() FROM Opportunity WHERE <the full read's where>`: the count is the answer's totalSize
        (COUNT() takes no ORDER BY)."""
        url = f"{self.data_path}/query"
        soql = f"SELECT COUNT() FROM Opportunity WHERE {self.opportunity_where(open_set, None)}"
        body = self.client.get_json(url, params={"q": soql}, headers=self._query_headers)
        return check_page(CountAnswer, body, crm=self.crm, url=url, page=1).totalSize

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """`SELECT <the select list> FROM Opportunity WHERE Id IN (...)` through /query, which leaves out the
        Recycle Bin: deleted and unknown ids are simply absent. No filters, no open/closed clause. Batched to
        ID_BATCH ids and a URI under MAX_QUERY_URI; each batch pages through nextRecordsUrl."""
        wanted = [i for i in dict.fromkeys(str(i) for i in ids) if _SF_ID.match(i)]
        if not wanted:
            return
        head = f"SELECT {', '.join(self.select_fields())} FROM Opportunity WHERE Id IN ("
        tail = ") ORDER BY Id"
        for batch in id_batches(wanted, len(_encoded(head + tail))):
            for rows in self.query(head + ", ".join(soql_string(i) for i in batch) + tail):
                if rows.records:
                    yield self.map_page(rows.records)

    def matches_filters(self, opp: Opportunity) -> bool:
        """The connection's filters evaluated as SOQL evaluates them: values of the field's describe type, the
        literal as it would be rendered (datetimes floored to the second), text compared case-insensitively,
        null equal only to null and never ordered."""
        for f in self.conn.filters:
            ftype = self._field_type(f.field)
            render_filter(f, ftype)  # a value that cannot be rendered fails here as it fails the query
            if not soql_matches(
                f.op,
                soql_value(self.filter_value(opp.raw, f.field), ftype),
                [filter_operand(v, ftype) for v in f.value] if f.op == "in" else filter_operand(f.value, ftype),
            ):
                return False
        return True

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        self.prepare()  # discovery's responses carry the server's clock (Date header)
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
        for rows in self.query(soql, DeletedRow, include_deleted=True):
            if rows.records:
                yield [(r["Id"], parse_datetime(r["SystemModstamp"])) for r in rows.records]

    # -- SOQL -----------------------------------------------------------------------------------------------------

    def select_fields(self) -> list[str]:
        """SELECT_FIELDS, the fields describe says this org has, then the configured ones (field names are
        case-insensitive in SOQL: each once)."""
        fields = list(SELECT_FIELDS)
        if self.multi_currency:  # only where describe lists it (single-currency orgs: 400 INVALID_FIELD)
            fields.append("CurrencyIsoCode")
        if self._last_stage_change:  # only where describe lists it (API < 52.0, hidden by FLS: INVALID_FIELD)
            fields.append(LAST_STAGE_CHANGE)
        for _, native in configured_fields(self.conn):
            _checked_field(native)
        selected = fields_to_read(fields, self.conn, key=str.lower)
        if self._converts_amount():
            selected.append(f"convertCurrency({self.field('amount')}) {CONVERTED_AMOUNT}")
        return selected

    def opportunity_soql(self, open_set: bool, since: datetime | None) -> str:
        return (
            f"SELECT {', '.join(self.select_fields())} FROM Opportunity WHERE "
            f"{self.opportunity_where(open_set, since)} ORDER BY {FULL_ORDER if since is None else 'SystemModstamp, Id'}"
        )

    def opportunity_where(self, open_set: bool, since: datetime | None) -> str:
        """The WHERE of a set's read (also what count() counts): the set, the connection's filters, and since."""
        where = [self._open_clause(open_set)]
        where += [render_filter(f, self._field_type(f.field)) for f in self.conn.filters]
        if since is not None:
            # Renaming an account (or editing its billing address) does not move its opportunities'
            # SystemModstamp: the same query also asks for the opportunities whose account changed since
            # `since` (a parent-field comparison inside an OR group), so each comes back once, in its set.
            stamp = soql_datetime(since)
            where.append(f"SystemModstamp >= {stamp} OR Account.SystemModstamp >= {stamp}")
        return " AND ".join(f"({w})" if " OR " in w else w for w in where)

    def _open_clause(self, open_set: bool) -> str:
        if self.conn.open_statuses is None:
            return f"IsClosed = {'false' if open_set else 'true'}"
        # resolve_status: a record is open when its stage name or its forecast category is listed. Stage names
        # are labels; the records carry the stage's value (ApiName): ask for the values whose label is listed.
        names = list(dict.fromkeys(self.conn.open_statuses))
        if not names:
            return "Id = null" if open_set else "Id != null"
        stage_field = self.field("stage", "StageName")
        values = names
        if stage_field == "StageName":
            by_label: dict[str, list[str]] = {}
            for info in self.stages().values():
                by_label.setdefault(info.label, []).append(info.key)
            known = set(self.stages())
            values = list(dict.fromkeys(v for n in names for v in by_label.get(n, [] if n in known else [n])))
        stage_list = ", ".join(soql_string(n) for n in values)
        forecast_list = ", ".join(soql_string(n) for n in names)
        if open_set:
            return (
                f"{stage_field} IN ({stage_list}) OR ForecastCategoryName IN ({forecast_list})"
                if values
                else f"ForecastCategoryName IN ({forecast_list})"
            )
        return (
            f"{stage_field} NOT IN ({stage_list}) AND ForecastCategoryName NOT IN ({forecast_list})"
            if values
            else f"ForecastCategoryName NOT IN ({forecast_list})"
        )

    def _field_type(self, name: str) -> str:
        declared = self.options.field_types
        if declared.get(name):
            return declared[name]
        self.prepare()
        info = (self._fields or {}).get(name.lower()) if "." not in name else None
        if info is not None:
            return _DESCRIBE_TYPES.get(str(info.get("type")), "string")
        return FIELD_TYPES.get(name, "string")

    # -- mapping ----------------------------------------------------------------------------------------------------

    def enrich(self, records: list[dict[str, Any]]) -> None:
        """Nothing per page but the stage dictionary (one optional query per run), read before the first
        record that needs it is mapped."""
        if any(self._needs_stages(r) for r in records):
            self.stages()

    def _needs_stages(self, r: dict[str, Any]) -> bool:
        """Whether mapping `r` reads the stage dictionary: a StageName to name, or no IsClosed to decide by."""
        named = _get(r, self.field("stage")) not in (None, "")
        return named and (not self.conn.fields.get("stage") or r.get("IsClosed") is None)

    def _stage_of(self, r: dict[str, Any]) -> tuple[str | None, str | None]:
        """(stage name users see, stage id): the OpportunityStage MasterLabel of the StageName value the record
        carries, and that value (the ApiName); StageName for both when the dictionary is not readable. A
        `fields.stage` override names a field whose value is the stage as users see it."""
        override = self.conn.fields.get("stage")
        value = _get(r, self.field("stage"))
        if value is None or value == "":
            return None, None
        value = clean_text(str(value))
        if override:
            return value, value
        if self._stage_by_value is None:
            lookup = {s.label: s for s in self._stages_read().values()}
            lookup.update(self._stages_read())  # the value is the ApiName; older orgs without ApiName carry the label
            self._stage_by_value = lookup
        info = self._stage_by_value.get(value or "")
        return (info.label, info.key) if info else (value, value)

    def _stages_read(self) -> dict[str, StageInfo]:
        """The stage dictionary as `enrich` read it (mapping reads, never requests)."""
        return self._stages or {}

    def _flags(self, r: dict[str, Any], stage_id: str | None) -> Status:
        """open / won / lost from the record's own IsClosed / IsWon (the stage's semantics, derived by Salesforce)."""
        if r.get("IsClosed") is not None:
            return "open" if not r.get("IsClosed") else ("won" if r.get("IsWon") else "lost")
        info = self._stages_read().get(stage_id) if stage_id else None
        return info.category if info else "open"

    @classmethod
    def read_value(cls, record: dict[str, Any], native: str) -> Any:
        """The record's field by API name, dotted through parents (`Account.BillingCountry`), null when a parent
        is null; the select list carries every mapped and filter field."""
        return _get(record, native)

    def _map(self, r: dict[str, Any], enriched: None = None) -> Opportunity:
        stage, stage_id = self._stage_of(r)
        crm_status = clean_text(r.get("ForecastCategoryName"))
        account = r.get("Account") or {}
        status = self.resolve_status(stage, crm_status, self._flags(r, stage_id))
        closed_at, closed_at_field = self._closed_at(r, status)
        values = self.mapped_fields(r)
        values["amount_base"] = (
            parse_float(r.get(CONVERTED_AMOUNT))
            if self._converts_amount()
            else None
            if self._multi_currency
            else values["amount"]  # a single-currency org: every amount is in the org's currency
        )
        return self.opportunity(
            r["Id"],
            r,
            **values,
            base_currency=self._org_currency,
            account_id=r.get("AccountId") or None,
            service_location=clean_text(billing_address(account)),
            owner_crm_id=r.get("OwnerId"),
            stage=stage,
            stage_id=stage_id,
            crm_status=crm_status,
            status=status,
            crm_closed_at=closed_at,
            crm_closed_at_field=closed_at_field,
            currency=r.get("CurrencyIsoCode") if self._multi_currency else self._org_currency,
            modified_at=parse_datetime(r.get("SystemModstamp")),
        )

    def _closed_at(self, r: dict[str, Any], status: Status) -> tuple[datetime | None, str | None]:
        """When a won / lost record closed, and the field that said it: LastStageChangeDate (entering the closed
        stage is its last stage change), else CloseDate's day at 00:00 (a date-only field); None while open."""
        if status == "open":
            return None, None
        if self._last_stage_change:
            at = parse_datetime(r.get(LAST_STAGE_CHANGE))
            if at is not None:
                return at, LAST_STAGE_CHANGE
        day = parse_date(r.get(CLOSE_DATE))
        if day is not None:
            return datetime(day.year, day.month, day.day), CLOSE_DATE
        return None, None

    # -- deletes ----------------------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        local = datetime.now(UTC).replace(tzinfo=None)
        return max(self._server_now, local) if self._server_now else local

    def _get_deleted(self, since: datetime, now: datetime) -> list[list[tuple[str, datetime | None]]] | None:
        """The delete log for [since, now]; None when the log no longer reaches back to `since`."""
        end = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
        # Salesforce wants start more than one minute before end (400 INVALID_REPLICATION_DATE otherwise, e.g.
        # when the bookmark is seconds old); a wider window only re-reads deletes already applied.
        start = min(since.replace(second=0, microsecond=0), end - timedelta(minutes=2))
        url = f"{self.data_path}/sobjects/Opportunity/deleted/"
        body = self.client.get_json(url, params={"start": _iso(start), "end": _iso(end)})
        feed = check_page(DeletedPage, body, crm=self.crm, url=url)
        earliest = parse_datetime(feed.earliestDateAvailable)
        if earliest is not None and earliest > start:
            return None
        rows = [(d["id"], parse_datetime(d["deletedDate"])) for d in feed.deletedRecords]
        size = self.page_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]


# -- SOQL rendering ------------------------------------------------------------------------------------------------


def soql_string(value: Any) -> str:
    """A quoted SOQL string literal: backslash, quotes and control characters escaped (injection-safe)."""
    text = str(value)
    for ch, esc in (
        ("\\", "\\\\"),
        ("'", "\\'"),
        ('"', '\\"'),
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\t", "\\t"),
        ("\b", "\\b"),
        ("\f", "\\f"),
    ):
        text = text.replace(ch, esc)
    return f"'{text}'"


# A full read's order: CreatedDate never changes, so a record edited while a split read runs cannot move from a
# range not read yet into one already read (SystemModstamp would move it, and its absence would read as a delete).
FULL_ORDER = "CreatedDate, Id"


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _epoch(value: datetime) -> float:
    """Seconds since the epoch of a UTC datetime (naive ones are UTC, as parse_datetime gives them)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


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
        parsed = (
            value
            if isinstance(value, datetime)
            else parse_datetime(str(value))
            if len(str(value)) > 10
            else datetime.combine(date.fromisoformat(str(value)), datetime.min.time())
        )
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
        raise CrmError(
            f"filter on {field}: value does not fit the field's type {ftype} ({err}); fix the "
            "value in filters: (or options.field_types)",
            code="INVALID_FILTER",
            permanent=True,
        ) from None


def _encoded(soql: str) -> str:
    """`q=<soql>` as requests encodes it into the URI (form encoding: a quote is 3 bytes, a space 1)."""
    return urlencode({"q": soql})


def id_batches(
    ids: list[str], fixed: int, *, per_query: int = ID_BATCH, limit: int = MAX_QUERY_URI
) -> Iterator[list[str]]:
    """Consecutive runs of `ids` of at most `per_query` ids whose quoted, comma-separated list encodes to at most
    `limit - fixed` bytes (`fixed`: the encoded rest of the query)."""
    batch: list[str] = []
    size = fixed
    for i in ids:
        cost = len(_encoded(soql_string(i) + ", ")) - 2  # less the "q="
        if batch and (len(batch) >= per_query or size + cost > limit):
            yield batch
            batch, size = [], fixed
        batch.append(i)
        size += cost
    if batch:
        yield batch


def soql_value(value: Any, ftype: str) -> Any:
    """A record's value as SOQL compares it for a field of `ftype`: numbers, dates, datetimes (naive UTC) and
    booleans as such, text case-insensitively; an empty value is null."""
    if value is None or value == "":
        return None
    if ftype == "number":
        return parse_float(value)
    if ftype == "boolean":
        return value if isinstance(value, bool) else str(value).strip().lower() == "true"
    if ftype == "date":
        return parse_date(value)
    if ftype == "datetime":
        return parse_datetime(value)
    return str(value).casefold()


def filter_operand(value: Any, ftype: str) -> Any:
    """A filter's value as the query would carry it (soql_literal: a datetime floored to the second, a date-only
    value at midnight), to compare in Python."""
    if ftype == "string":  # quoted text as it is, compared case-insensitively
        if value is None:
            return None
        return ("true" if value else "false") if isinstance(value, bool) else str(value).casefold()
    literal = soql_literal(value, ftype)
    return None if literal == "null" else soql_value(literal, ftype)


def soql_matches(op: str, actual: Any, wanted: Any) -> bool:
    """One SOQL comparison: `=` / `!=` treat null as a value (`!= x` matches null), `IN` matches listed values,
    ordering comparisons never match null."""
    if op == "equal":
        return actual == wanted
    if op == "not_equal":
        return actual != wanted
    if op == "in":
        return actual is not None and actual in wanted
    if actual is None or wanted is None:
        return False
    try:
        return {
            "more_than": actual > wanted,
            "less_than": actual < wanted,
            "at_least": actual >= wanted,
            "at_most": actual <= wanted,
        }[op]
    except TypeError:
        return False


def _checked_field(name: str) -> str:
    if not _FIELD_NAME.match(name):
        raise CrmError(
            f"'{name}' is not a Salesforce field name; fix it in fields: / filters:",
            code="INVALID_FIELD",
            permanent=True,
        )
    return name


# -- record helpers ------------------------------------------------------------------------------------------------


def _get(record: dict[str, Any] | None, path: str) -> Any:
    """A field of a record by API name, dotted for parents (`Account.Name`); None when a parent is null."""
    if type(record) is dict and "." not in path and path in record:  # a field of the record itself, as named
        return record[path]
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
    """The account's billing address in the canonical form: every line of the multi-line BillingStreet, then
    city, state, postal code, country (record.format_address)."""
    return format_address(
        account.get("BillingStreet"),
        account.get("BillingCity"),
        account.get("BillingState"),
        account.get("BillingPostalCode"),
        account.get("BillingCountry"),
    )
