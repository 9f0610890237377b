"""ConnectWise Manage (PSA) REST API 3.0 connector.

- Auth: HTTP Basic `{company}+{publicKey}:{privateKey}` plus the `clientId` header on every call. API keys do
  not expire, so there is nothing to refresh: a 401 is final (AuthError).
- Base URL: `conn.base_url` is the site (e.g. https://api-na.myconnectwise.net); the codebase is discovered with
  `GET /login/companyinfo/{company}` (needs no auth; same host) and the API lives at `{site}/{Codebase}apis/3.0`.
  `options.codebase` (e.g. "v4_6_release/") skips discovery; a 404 on discovery falls back to v4_6_release/.
- Open set: `status/id in (<statuses that resolve_status calls open>)`: closedFlag=false, or the connection's
  `open_statuses` / `stage_categories` by status name;
  not-open: `status/id not in (...)` (the exact complement, also for statuses added mid-run).
  Incremental: `_info/lastUpdated>=[since]`, `orderBy=_info/lastUpdated asc, id asc`; full: `orderBy=id asc`.
  A company rename moves only the company's `_info/lastUpdated`: incremental reads also list the companies
  changed since the cursor (`/company/companies`, optional) and re-read their opportunities by
  `company/id in (...)`, COMPANY_CHUNK ids a query, skipping ids already read.
- Paging: `page`/`pageSize` (max 1000), following the `Link` header's rel="next" until it is absent.
  That is offset paging the server re-evaluates per page, so a record leaving the set between two page
  requests makes one later record slip onto an already-read page (missed until the next full sync).
  `options.paging: keyset` avoids it: always page 1 with `id>last` (or `(lastUpdated, id) > last`) added.
  Every answer is checked against its documented shape first (the page models below); a next link or keyset
  position already followed, more pages than CW's count allows, or (uncounted reads) a page repeating the
  previous one fails the run.
- Counts: a full read of a set first asks `GET /sales/opportunities/count` with the same conditions
  (`{"count": n}`, one request per set): the sync infers no delete from a set that delivered fewer ids.
- Amount: CW has no scalar amount. It is the sum of `revenue` over `GET /sales/opportunities/{id}/forecast`
  `forecastItems` (no forecast lines: amount None). There is no bulk forecast endpoint and no `fields` /
  `childConditions` form that returns forecast lines with the opportunity, so this costs ONE extra request
  per opportunity returned (a full sync of N opportunities costs about N + N/1000 + 2 requests; incremental runs
  only pay for the changed ones). `options.forecast: false` skips it (amount None, 1 request per page). The
  forecasts of a page are read `options.parallel_reads` at a time (default 10: CW documents no limit).
- Stage model: `stage` = the sales stage's name (`stage.name`, named through `/sales/stages`), `stage_id` =
  `stage.id`, `crm_status` = the status's name; open / won / lost come from the status's closedFlag / wonFlag
  (`/sales/opportunities/statuses`, required) through `resolve_status` (stage_categories, open_statuses).
- service_location: the company site's address (`GET /company/companies/{c}/sites/{s}`, read for a whole page
  before it is mapped), in the canonical `format_address` form. Sites are kept between runs (lookups.py,
  `oppsync.crm_lookups`): an incremental run reads only the sites it does not know and those of companies
  changed since the bookmark; a full sync reads them all again (the periodic refresh).
- Users: `/system/members`; owner = `primarySalesRep.id`, creator = `_info/enteredBy` (a member identifier)
  mapped to the member's numeric id; users() keys members by numeric id and keeps the identifier in alt_ids.
- Optional reads (403 -> a warning in the run's metadata and the fallback): `/sales/stages` (the record's
  `stage.name`), `/system/members` (creators stay identifiers, no member names), company sites (the site's
  name), changed companies (renames wait for the next full sync), the forecast (amount None), `/sales/probabilities` (the reference's name or the forecast's
  expectedProbability). See docs/crms/connectwise.md.
- No usage headers and no published quota: observe() records nothing; plain 429 + Retry-After is retried by
  ApiClient; a 429 asking to wait longer than `options.max_retry_after` seconds (default 900) is treated as
  the allowance being spent (QuotaExhausted) rather than stalling the run.
- No delete feed (hard deletes): deleted() yields nothing; full syncs diff ids.
- Custom fields: a filter or field override names one as `custom:<caption>` (e.g. `custom:Region`) or
  `custom:#<id>`. Filters on one are pushed down as `customFieldConditions=caption="Region" and value="West"`
  (only the first such filter; all custom-field filters are also re-checked after fetching, because CW
  evaluates customFieldConditions per custom-field row).
- Standard fields are named by their CW condition path: `company/name`, `status/name`, `_info/dateEntered`...
- Close time: `crm_closed_at` = `closedDate` (a date-time CW stamps when the record enters a closed status,
  null while open), for records whose resolved status is won / lost; empty on a closed record (imported
  closed, say): None, and the reconcile dates the close by `_info/lastUpdated`. The list is read without
  `fields=`, so closedDate comes with every record (no extra request, no tenant lacks it).
- Read by id (`fetch_by_ids`): `GET /sales/opportunities?conditions=id in (...)`, no status or filter
  conditions, BY_ID_CHUNK ids a request and the query string under MAX_QUERY_CHARS (CW runs on IIS, which
  refuses query strings over 2048 bytes); hard-deleted ids are simply not returned. Mapped as the lists are
  (forecast, cached sites). `filter_value` / `matches_filters` evaluate filters as CW's conditions do
  (text case-insensitively, as SQL Server's default collation compares).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
from pydantic import Field, Strict, StrictBool, StringConstraints
from typing_extensions import TypedDict

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import Capability, ConnectorOptions, CrmConnector, Page, matches
from oppsync_pipeline.lib.crm.fields import FieldMap, configured_fields
from oppsync_pipeline.lib.crm.http import (
    Auth,
    AuthError,
    CrmError,
    QuotaExhausted,
    RequestStats,
    json_object,
    retry_after_seconds,
)
from oppsync_pipeline.lib.crm.lookups import Lookup
from oppsync_pipeline.lib.crm.pages import RECORD, PageError, PageModel, check_page
from oppsync_pipeline.lib.crm.paging import Fetched, HeaderLinkPaginator, KeysetPaginator, PageRequest
from oppsync_pipeline.lib.crm.parallel import ordered_map
from oppsync_pipeline.lib.record import (
    CrmUser,
    Opportunity,
    StageInfo,
    clean_text,
    format_address,
    parse_date,
    parse_datetime,
    parse_float,
    to_utc,
)

API_VERSION = "application/vnd.connectwise.com+json; version=2025.1"
DEFAULT_CODEBASE = "v4_6_release/"
# Company ids per `company/id in (...)` re-read of a renamed company's opportunities (keeps the URL short).
COMPANY_CHUNK = 100
# Opportunity ids per `id in (...)` read by id: one page each (CW serves up to 1000 a page).
BY_ID_CHUNK = 200
# The longest query string a by-id request sends: IIS (which CW runs on) refuses over 2048 bytes
# (request filtering maxQueryString, 404.15); spinen/connectwise-php-client caps whole URIs at 2000.
MAX_QUERY_CHARS = 2000
# The CW field that dates a close (crm_closed_at_field).
CLOSED_DATE = "closedDate"

# Condition paths a filter / field override may name, and which of them are numbers or date-times.
NUMERIC_FIELDS = frozenset(
    {
        "id",
        "company/id",
        "site/id",
        "status/id",
        "stage/id",
        "primarySalesRep/id",
        "probability/id",
        "currency/id",
        "type/id",
        "locationId",
        "businessUnitId",
    }
)
DATETIME_FIELDS = frozenset(
    {
        "expectedCloseDate",
        "closedDate",
        "dateBecameLead",
        "_info/lastUpdated",
        "_info/dateEntered",
    }
)
BOOLEAN_FIELDS = frozenset({"closedFlag"})
TEXT_FIELDS = frozenset(
    {
        "name",
        "company/identifier",
        "company/name",
        "site/name",
        "primarySalesRep/identifier",
        "primarySalesRep/name",
        "status/name",
        "stage/name",
        "currency/currencyCode",
        "type/name",
        "source",
        "_info/enteredBy",
        "_info/updatedBy",
    }
)
OPERATORS = {"equal": "=", "not_equal": "!=", "more_than": ">", "less_than": "<", "at_least": ">=", "at_most": "<="}
_CUSTOM = re.compile(r"^custom:(?:#(?P<id>\d+)|(?P<caption>.+))$")


# -- page models: each answer is checked against the documented shape before one record of it is used --------

CwId = Annotated[int, Strict()]  # CW ids are integers: a null, "12" or 1.5 is not an id


class Row(TypedDict):
    """A row of a CW list (opportunities, members, companies, stages, probabilities): the id is what the
    connector relies on; the other keys are read from the dict as received."""

    __pydantic_config__ = RECORD  # type: ignore[misc]

    id: CwId


class StatusRow(TypedDict):
    """An opportunity status: its flags split the open and the not-open sets, so a status without them cannot
    be placed (read as open, it would turn every won record of it into an open one)."""

    __pydantic_config__ = RECORD  # type: ignore[misc]

    id: CwId
    name: str
    closedFlag: StrictBool
    wonFlag: StrictBool


Rows = list[Row]
StatusRows = list[StatusRow]


class CountAnswer(PageModel):
    """`GET .../count`: `{"count": n}`."""

    count: Annotated[int, Strict(), Field(ge=0)]


class ForecastAnswer(PageModel):
    """`GET /sales/opportunities/{id}/forecast`: the opportunity's revenue lines (an empty list: no amount)."""

    id: CwId
    forecastItems: list[dict[str, Any]]


class SiteAnswer(PageModel):
    """`GET /company/companies/{c}/sites/{s}`."""

    id: CwId


class CompanyInfo(PageModel):
    """`GET /login/companyinfo/{company}` (no auth): the codebase, when the site knows the company."""

    Codebase: str | None = None


# -- auth ----------------------------------------------------------------------------------------------------------


class ConnectWiseAuth(Auth):
    """Basic `company+public:private` and the integration's clientId; keys do not expire."""

    refreshable = False

    def __init__(self, company_id: str, public_key: str, private_key: str, client_id: str):
        token = base64.b64encode(f"{company_id}+{public_key}:{private_key}".encode()).decode("ascii")
        self._header = f"Basic {token}"
        self._client_id = client_id

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        headers["Authorization"] = self._header
        headers["clientId"] = self._client_id
        headers.setdefault("Accept", API_VERSION)

    def __repr__(self) -> str:  # never show the key
        return "ConnectWiseAuth(<redacted>)"


# -- observe / classify -----------------------------------------------------------------------------------------


def observe(response: requests.Response, stats: RequestStats) -> None:
    """ConnectWise sends no usage headers and publishes no quota: nothing to record."""


def classify(response: requests.Response, max_retry_after: float = 900.0) -> Exception | None:
    """ConnectWise's answers with what to check: a throttle longer than the run waits (429 + Retry-After), the
    refused keys (401: they do not expire, nothing to refresh), 400 / 403 / 404 naming the key or the
    security-role area to fix."""
    status = response.status_code
    if status == 429:
        wait = retry_after_seconds(response)
        if wait is not None and wait > max_retry_after:
            return QuotaExhausted(
                f"ConnectWise throttled the API member for {wait:.0f}s "
                f"(more than the {max_retry_after:.0f}s this run waits)",
                status=429,
            )
        return None
    if status == 401:
        return AuthError(
            "ConnectWise refused the API keys (401): check credentials.company_id, public_key and "
            "private_key (System > Members > API Members > API Keys); keys do not expire, so "
            "nothing is retried",
            status=401,
        )
    if status not in (400, 403, 404):
        return None
    path = urlsplit(response.request.url or "").path if response.request is not None else ""
    message = _cw_message(response)
    where = f"GET {path}" if path else "ConnectWise"
    if status == 403:
        return CrmError(
            f"{where}: HTTP 403 {message}. The API member's security role lacks "
            f"{_security_area(path)} (Inquire Level: All); grant it in System > Security Roles, "
            "or run `oppsync config check --online` to see what is readable",
            status=403,
        )
    if (
        status == 404
        and len(urlsplit(response.request.url or "").query if response.request is not None else "") > MAX_QUERY_CHARS
    ):
        return CrmError(
            f"{where}: HTTP 404 the query string is longer than ConnectWise (IIS request "
            "filtering) accepts; shorten the connection's filters (fewer `in` values)",
            status=404,
        )
    if status == 404:
        return CrmError(
            f"{where}: HTTP 404 {message}. Check the connection's base_url (the site, e.g. "
            "https://api-na.myconnectwise.net) and options.codebase (e.g. v4_6_release/); on "
            "ConnectWise cloud a 404 can also mean the company_id is wrong",
            status=404,
        )
    hint = (
        "check credentials.client_id (register one at developer.connectwise.com)"
        if "clientid" in message.lower()
        else "check the connection's filters and fields: names are ConnectWise condition paths "
        "(company/name, status/name, _info/lastUpdated) or custom:<caption>"
    )
    return CrmError(f"{where}: HTTP 400 {message}; {hint}", status=400)


# -- connector -----------------------------------------------------------------------------------------------------


@dataclass
class PageEntries:
    """What `enrich` read for a page and `_map` reads: company sites as addresses by "company:site", forecasts
    by opportunity id."""

    sites: dict[str, str | None] = field(default_factory=dict)
    forecasts: dict[Any, dict[str, Any] | None] = field(default_factory=dict)


class ConnectWiseOptions(ConnectorOptions):
    """`options:` of a ConnectWise Manage connection."""

    codebase: str | None = None  # e.g. "v4_6_release/" (skips /login/companyinfo discovery)
    forecast: bool = True  # read each opportunity's forecast for its amount
    paging: Literal["navigable", "keyset"] = "navigable"
    max_retry_after: Annotated[float, Field(ge=0)] = 900
    # The company's local currency (Setup Tables > Currency). ConnectWise converts no opportunity amount: the
    # forecast is in the opportunity's own currency, so `amount_base` is the amount where that currency is this
    # one (or the opportunity names none), and empty otherwise (never summed as if it were).
    base_currency: Annotated[str, StringConstraints(min_length=3, max_length=3)] | None = None


class ConnectWiseConnector(CrmConnector):
    Options = ConnectWiseOptions
    # No numeric limit is documented (docs/crm-api-notes.md §4.8: community write-ups say ~60/min [U], cloud
    # tenants sit behind Cloudflare, 429 + Retry-After is the contract). Assumed: 10 requests in flight (the
    # forecasts, the only per-record reads); 429s are retried as they come.
    read_concurrency = 10
    # native fields are condition paths; the stage comes from the stage reference (named through /sales/stages),
    # the amount from the forecast, the probability from /sales/probabilities or the forecast (enrich)
    field_map = FieldMap(
        project_name="name",
        client_name="company/name",
        sales_executive="primarySalesRep/name",
        stage=None,
        amount=None,
        close_date="expectedCloseDate",
        probability=None,
        created_at="_info/dateEntered",
        created_by_crm_id="_info/enteredBy",
    )
    filters_ignore_case = True  # SQL Server's default collation
    crm = "connectwise"
    max_page_size = 1000
    native_deletes = False
    known_fields: ClassVar[frozenset[str]] = NUMERIC_FIELDS | DATETIME_FIELDS | BOOLEAN_FIELDS | TEXT_FIELDS

    @property
    def _sites(self) -> Lookup[str]:
        """`{company id}:{site id}` -> the site's canonical address (None: gone), kept between runs (lookups.py).
        CW lists sites per company only (`/company/companies/{id}/sites`, no cross-company list or change
        feed), so an incremental run reads the sites it does not know, one GET each, and drops those of the
        companies changed since the bookmark (read again with the opportunities re-read for them); the
        nightly full sync starts from an empty cache and reads every site again: the periodic refresh."""
        return self.lookups.lookup("sites", str)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._api_base: str | None = None
        self._statuses_refreshed = False
        self._probabilities: dict[int, float] | None = None  # None: not read (yet)
        self._members: list[dict[str, Any]] | None = None
        self._member_ids: dict[str, str] = {}  # identifier (lower case) -> numeric member id
        self._sites_readable = True
        self._forecast_readable = True
        self._forecast_answered = False  # a forecast was read this run (then they are read concurrently)
        self._company_changes: tuple[datetime, list[int]] | None = None  # (since, changed company ids)
        self._companies_listable = True
        self.custom_fields_seen: tuple[str, ...] = ()

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
        observe(response, stats)

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response, self.options.max_retry_after)

    # -- base URL and tenant discovery -------------------------------------------------------------------------

    def api(self, path: str) -> str:
        if self._api_base is None:
            self._api_base = self._discover()
        return self._api_base + path

    def _discover(self) -> str:
        site = self.conn.base_url.rstrip("/")
        codebase = self.options.codebase
        if codebase:
            self.note("codebase", True, f"{codebase} (options.codebase)")
        else:
            url = f"{site}/login/companyinfo/{self.credentials['company_id']}"
            try:
                codebase = check_page(CompanyInfo, self.client.get_json(url), crm=self.crm, url=url).Codebase
            except CrmError as err:
                if err.status != 404:
                    raise
            self.note(
                "codebase",
                True,
                f"{codebase} (/login/companyinfo)" if codebase else f"/login/companyinfo unknown: {DEFAULT_CODEBASE}",
            )
            codebase = codebase or DEFAULT_CODEBASE
        return f"{site}/{str(codebase).strip('/')}/apis/3.0"

    def discover_tenant(self) -> None:
        """What this tenant answers, read once per run: the codebase, the statuses (required: they split the
        open and not-open sets), the sales stages, the members (numeric ids of creators) and the probabilities
        (optional: refused -> warning and fallback), and the opportunity custom fields seen on one record."""
        self.api("")
        self.statuses()
        self.stages()
        self._member_rows()
        if not self.conn.fields.get("probability"):
            self._probability_table()
        sample = self.api("/sales/opportunities")
        rows = self.client.get_json(sample, params={"pageSize": 1, "fields": "id,customFields", "orderBy": "id desc"})
        check_page(Rows, rows, crm=self.crm, url=sample, page=1)
        captions = tuple(
            str(cf.get("caption"))
            for r in rows
            for cf in (r.get("customFields") or [])
            if isinstance(cf, dict) and cf.get("caption")
        )
        self.custom_fields_seen = captions
        self.note("custom fields", True, ", ".join(captions) if captions else "none on this tenant's opportunities")
        for where, path in configured_fields(self.conn):
            m = _CUSTOM.match(path)
            if m and rows and m.group("caption") and m.group("caption") not in captions:
                self.stats.warn(
                    f"{where}: custom field '{m.group('caption')}' is not on this tenant's "
                    f"opportunities (seen: {', '.join(captions) or 'none'}); its value reads as empty"
                )
                self.note(f"{where} ({path})", False, "custom field not on this tenant's opportunities")
        reads_forecast = self.options.forecast and not self.conn.fields.get("amount")
        self.note(
            "forecast (amount)",
            reads_forecast,
            "one GET /sales/opportunities/{id}/forecast per opportunity read"
            if reads_forecast
            else "not read (options.forecast: false or fields.amount)",
        )
        self.note(
            "company sites (service_location)",
            True,
            "GET /company/companies/{id}/sites/{siteId} once per site, kept between runs (a full sync re-reads them)",
        )

    def discover(self) -> list[Capability]:
        """`config check --online`: the shared discovery, reading small pages (each opportunity read costs a
        forecast and maybe a site request; a check needs a few, not a thousand)."""
        page_size = self.page_size
        self.page_size = min(page_size, 5)
        try:
            return super().discover()
        finally:
            self.page_size = page_size

    def _pages(
        self,
        path: str,
        params: dict[str, Any],
        model: Any = Rows,
        page_size: int | None = None,
        expect: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """GET a list endpoint page by page, following Link rel="next" to the end. Each page is checked against
        `model` before it is used. A next link already followed fails the read; so do more pages than `expect`
        (the CRM's count of the list) allows, or a page starting with the record an earlier page started with
        (a server ignoring `page`)."""
        size = page_size or self.page_size
        url = self.api(path)
        request = PageRequest("GET", url, params={**params, "page": 1, "pageSize": size})
        # the next link carries the whole query; it is sent to the API's own host only
        paginator = HeaderLinkPaginator(resolve=lambda link: _same_origin(link, url))
        for fetched in self.pages(request, paginator, model=model, first_id="id", expect=expect, page_size=size):
            yield fetched.records

    def _all(self, path: str, params: dict[str, Any], model: Any = Rows) -> list[dict[str, Any]]:
        """A whole dictionary (statuses, stages, members ...), in pages of the most CW serves."""
        return [row for page in self._pages(path, params, model, self.max_page_size) for row in page]

    # -- dictionaries ------------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        """The sales stages (`/sales/stages`; optional: refused -> the stage name each record carries).
        CW stages carry no open / won flags: the status decides that."""
        rows = self.optional(
            "sales stages (/sales/stages)",
            lambda: self._all("/sales/stages", {"orderBy": "id asc"}),
            [],
            fallback_text="stage names are read from each opportunity's stage.name",
        )
        return [
            StageInfo(
                key=str(r["id"]),
                label=r.get("name") or str(r["id"]),
                is_closed=False,
                is_won=False,
                sort_order=int(r.get("seqNumber") or r["id"]),
                probability=parse_float(r.get("probability")),
            )
            for r in rows
        ]

    def fetch_statuses(self) -> list[StageInfo]:
        """The opportunity statuses with closedFlag / wonFlag: required (they split the open and not-open sets)."""
        return [
            StageInfo(
                key=str(s["id"]),
                label=s.get("name") or str(s["id"]),
                is_closed=bool(s.get("closedFlag")),
                is_won=bool(s.get("wonFlag")),
                sort_order=int(s["id"]),
            )
            for s in self._all("/sales/opportunities/statuses", {"orderBy": "id asc"}, StatusRows)
        ]

    def _member_rows(self) -> list[dict[str, Any]]:
        if self._members is None:
            fields = "id,identifier,firstName,lastName,officeEmail,primaryEmail,inactiveFlag"
            self._members = self.optional(
                "members (/system/members)",
                lambda: self._all("/system/members", {"orderBy": "id asc", "fields": fields}),
                [],
                fallback_text="creators stay member identifiers (_info/enteredBy); no member names or emails",
            )
            self._member_ids = {
                str(m["identifier"]).lower(): str(m["id"])
                for m in self._members
                if m.get("identifier") and m.get("id") is not None
            }
        return self._members

    def users(self) -> Iterable[CrmUser]:
        """Members by numeric id (what owner_crm_id / created_by_crm_id hold); the identifier is kept in
        alt_ids, so configured crm_ids written as identifiers keep matching."""
        for m in self._member_rows():
            name = " ".join(p for p in (m.get("firstName"), m.get("lastName")) if p) or None
            yield CrmUser(
                crm_user_id=str(m["id"]),
                name=clean_text(name),
                email=m.get("officeEmail") or m.get("primaryEmail"),
                kind="user",
                active=not m.get("inactiveFlag", False),
                alt_ids=(str(m["identifier"]),) if m.get("identifier") else (),
            )

    def _probability_table(self) -> dict[int, float]:
        if self._probabilities is None:
            rows = self.optional(
                "probabilities (/sales/probabilities)",
                lambda: self._all("/sales/probabilities", {"orderBy": "id asc"}),
                [],
                fallback_text="probability from the record's reference name or its forecast",
            )
            self._probabilities = {
                int(p["id"]): v for p in rows if (v := parse_float(p.get("probability"))) is not None
            }
        return self._probabilities

    # -- opportunities -----------------------------------------------------------------------------------------

    def open_status_ids(self, open_set: bool) -> list[str]:
        """The statuses whose opportunities make up the open (or not-open) set: the status's own flags, or the
        connection's open_statuses / stage_categories by status name."""
        return [
            k
            for k, s in self.statuses().items()
            if (self.resolve_status(None, s.label, s.category) == "open") == open_set
        ]

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        """Pages of the set. A full read first asks CW to count the set (one request): the count bounds the
        paging and is what the sync compares the ids received with before it infers deletes."""
        self.prepare()
        query = self._set_query(open_set)
        crm_count = self.count(open_set) if since is None else None
        self.tally(open_set, since, [], crm_count)
        if query is None:
            return
        base, extra = query
        custom = [f for f in self.conn.filters if self.is_custom_field(f.field)]
        parts = base + ([f"_info/lastUpdated>={_dt(since)}"] if since is not None else [])
        order = "_info/lastUpdated asc, id asc" if since is not None else "id asc"
        seen: set[int] = set()
        if since is not None:
            self._changed_companies(since)  # drops the kept sites of changed companies before any mapping
        for rows in self._opportunity_rows(
            parts, {"orderBy": order, **extra}, by_updated=since is not None, expect=crm_count
        ):
            seen.update(r["id"] for r in rows)
            self.tally(open_set, since, [r["id"] for r in rows])
            if custom:
                rows = [r for r in rows if self._matches_raw(r, custom)]
            if rows:
                yield self.map_page(rows)
        if since is None:
            return
        # A renamed company leaves its opportunities' lastUpdated as it was: read the opportunities of the
        # companies changed since the cursor again (same set, same filters), each opportunity once.
        companies = self._changed_companies(since)
        for start in range(0, len(companies), COMPANY_CHUNK):
            chunk = companies[start : start + COMPANY_CHUNK]
            by_company = base + [f"company/id in ({','.join(_int_text(c) for c in chunk)})"]
            for rows in self._opportunity_rows(by_company, {"orderBy": "id asc", **extra}, by_updated=False):
                rows = [r for r in rows if r["id"] not in seen]
                seen.update(r["id"] for r in rows)
                if custom:
                    rows = [r for r in rows if self._matches_raw(r, custom)]
                if rows:
                    yield self.map_page(rows)

    def count(self, open_set: bool) -> int | None:
        """CW's own count of the set as `opportunities(open_set, None)` reads it, filters included:
        `GET /sales/opportunities/count` with the same conditions and customFieldConditions -> {"count": n}."""
        self.prepare()
        query = self._set_query(open_set)
        if query is None:
            return 0
        base, extra = query
        url = self.api("/sales/opportunities/count")
        params = {**extra, **({"conditions": _and(base)} if base else {})}
        return check_page(CountAnswer, self.client.get_json(url, params=params), crm=self.crm, url=url).count

    def _set_query(self, open_set: bool) -> tuple[list[str], dict[str, Any]] | None:
        """The conditions (and customFieldConditions) of the open or the not-open set with the connection's
        filters; None when the set is empty by definition (no status is open)."""
        open_ids = self.open_status_ids(True)
        base = []
        if open_set:
            if not open_ids:
                return None
            base.append(f"status/id in ({','.join(_int_text(k) for k in open_ids)})")
        elif open_ids:
            base.append(f"status/id not in ({','.join(_int_text(k) for k in open_ids)})")
        standard = [f for f in self.conn.filters if not self.is_custom_field(f.field)]
        custom = [f for f in self.conn.filters if self.is_custom_field(f.field)]
        base += [render_condition(f) for f in standard]
        # only the first custom field is pushed down; every one is re-checked after fetching (see the docstring)
        extra = {"customFieldConditions": render_custom_condition(custom[0])} if custom else {}
        return base, extra

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """The current records of these ids, whatever their status and the connection's filters:
        `conditions=id in (...)` in chunks (BY_ID_CHUNK ids, query string at most MAX_QUERY_CHARS), each one
        page of up to 1000; CW has no soft delete, so a deleted id is simply absent. Mapped as opportunities()
        maps (forecast per record, each site not known read once), in pages of the connection's page size."""
        self.prepare()
        wanted = sorted({int(i) for i in ids if str(i).strip().isdigit()})  # CW ids are integers; others: absent
        for chunk in _id_chunks(wanted):
            params = {"conditions": f"id in ({','.join(map(str, chunk))})", "orderBy": "id asc"}
            # at most the ids asked for: the chunk's size bounds the paging
            for rows in self._pages("/sales/opportunities", params, Rows, self.max_page_size, expect=len(chunk)):
                for start in range(0, len(rows), self.page_size):
                    yield self.map_page(rows[start : start + self.page_size])

    def matches_filters(self, opp: Opportunity) -> bool:
        return self._matches_raw(opp.raw, self.conn.filters)

    def _matches_raw(self, raw: dict[str, Any], filters: Iterable[RecordFilter]) -> bool:
        """Filters evaluated as CW's conditions evaluate them: text case-insensitively (SQL Server's default
        collation), date-times as date-times, `closedFlag` from the record's status (the record does not
        carry it)."""
        for f in filters:
            value = self.filter_value(raw, f.field)
            if f.field == "closedFlag" and value is None:
                info = self.statuses().get(str((raw.get("status") or {}).get("id")))
                value = info.is_closed if info else None
            if not matches(f, value, ignore_case=self.filters_ignore_case):
                return False
        return True

    def _opportunity_rows(
        self, parts: list[str], params: dict[str, Any], by_updated: bool, expect: int | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """The opportunity list for these conditions, page by page (navigable or `options.paging: keyset`);
        `expect`: CW's count of it, when asked."""
        if self.options.paging == "keyset":
            return self._keyset_pages(parts, params, by_updated=by_updated, expect=expect)
        return self._pages(
            "/sales/opportunities", {**params, "conditions": _and(parts)} if parts else params, Rows, expect=expect
        )

    def _changed_companies(self, since: datetime) -> list[int]:
        """Ids of the companies whose own `_info/lastUpdated` is at or after `since` (a rename moves it, not
        their opportunities'): `GET /company/companies?conditions=_info/lastUpdated>=[since]&fields=id`, pages
        of 1000, read once per cursor (the open and the not-open set share it). Optional: refused (403, the
        security role lacks Company Maintenance), renames reach the warehouse with the next full sync."""
        if self._company_changes is not None and self._company_changes[0] == since:
            return self._company_changes[1]
        if not self._companies_listable:
            return []
        params = {"conditions": f"_info/lastUpdated>={_dt(since)}", "orderBy": "id asc", "fields": "id"}
        rows = self.optional(
            "companies changed since the cursor (account renames)",
            lambda: self._all("/company/companies", params),
            _REFUSED,
            fallback_text="renamed companies reach the warehouse with the next full sync",
            refusals=(403,),
        )
        if rows is _REFUSED:
            self._companies_listable = False
            return []
        ids = sorted({r["id"] for r in rows})
        self._company_changes = (since, ids)
        self._sites.discard_prefixes(f"{i}:" for i in ids)  # their sites are read again
        return ids

    def _keyset_pages(
        self, parts: list[str], params: dict[str, Any], by_updated: bool, expect: int | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """`options.paging: keyset`: always page 1, resuming after the last (lastUpdated, id) seen.

        Navigable paging is offset paging that the server re-evaluates per page: an opportunity leaving the
        set (closed, deleted, re-stamped) between two page requests shifts every later one back and one is
        never read in this pass. Keyset paging cannot skip; it costs the same number of requests. A position
        resumed from twice (a server ignoring the condition) fails the read, as do more pages than `expect`.
        """
        url = self.api("/sales/opportunities")

        def resume(request: PageRequest, after: str | None) -> None:
            clause = list(parts) + ([after] if after else [])
            request.params = {**params, "page": 1, "pageSize": self.page_size}
            if clause:
                request.params["conditions"] = _and(clause)

        def after(fetched: Fetched) -> str | None:
            if len(fetched.records) < self.page_size:
                return None
            return self._resume_after(fetched.records[-1], by_updated, fetched.url, fetched.number)

        for fetched in self.pages(
            PageRequest("GET", url),
            KeysetPaginator(apply=resume, after=after),
            model=Rows,
            first_id="id",
            expect=expect,
            page_size=self.page_size,
        ):
            if fetched.records:
                yield fetched.records

    def _resume_after(self, last: dict[str, Any], by_updated: bool, url: str, page: int) -> str:
        """The condition that resumes a keyset read after its last record."""
        if not by_updated:
            return f"id>{last['id']}"
        try:
            stamp = _dt((last.get("_info") or {}).get("lastUpdated"))
        except CrmError:
            raise PageError(
                f"record {last['id']} has no readable _info.lastUpdated to resume after",
                crm=self.crm,
                url=url,
                page=page,
            ) from None
        return f"(_info/lastUpdated>{stamp} or (_info/lastUpdated={stamp} and id>{last['id']}))"

    # -- enrichment: everything a page needs is read before it is mapped (no I/O inside _map) -----------------

    def enrich(self, rows: list[dict[str, Any]]) -> PageEntries:
        """What mapping the page reads: the statuses again when a row names one created mid-run, the stages,
        and (returned) the page's company sites and forecasts."""
        unknown = {str(_ref(r, "status").get("id")) for r in rows} - set(self.statuses()) - {"None"}
        if unknown and not self._statuses_refreshed:
            self._statuses, self._statuses_refreshed = None, True  # a status created mid-run: read them again
            self.statuses()
        self.stages()
        sites = self._resolve_sites(rows)
        return PageEntries(sites, self._forecasts(rows))

    def _resolve_sites(self, rows: list[dict[str, Any]]) -> dict[str, str | None]:
        """The company sites this page names by "company:site": those kept (lookups.py: one query), the rest
        read once each (GET /company/companies/{c}/sites/{s})."""
        sites = self._sites.load(_site_text(key) for r in rows if (key := _site_key(r)) is not None)
        for r in rows:
            key = _site_key(r)
            if key is None or _site_text(key) in sites or not self._sites_readable:
                continue
            url = self.api(f"/company/companies/{key[0]}/sites/{key[1]}")
            try:
                site = self.optional(
                    "company sites (service_location)",
                    lambda: self._get_checked(SiteAnswer, url),
                    _REFUSED,
                    fallback_text="service_location is the site's name",
                    refusals=(403,),
                )
            except CrmError as err:
                if err.status != 404:
                    raise
                # one site gone (deleted since the opportunity named it): its name, the other sites still read
                self.stats.warn(
                    f"company site {key[1]} of company {key[0]} not found (404): "
                    "service_location is the site's name for its opportunities"
                )
                site = None
            if site is _REFUSED:
                self._sites_readable = False
                continue
            self._sites[_site_text(key)] = sites[_site_text(key)] = (
                site_address(site) if isinstance(site, dict) else None
            )
        return sites

    def _forecasts(self, rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any] | None]:
        """Each opportunity's forecast (its revenue lines): no bulk endpoint, one GET per opportunity, up to
        `degree` in flight (parallel.ordered_map: answers taken in the rows' order, so a refusal stops the reads
        where the sequential loop stopped)."""
        if self.conn.fields.get("amount") or not self.options.forecast or not self._forecast_readable:
            return {}

        def read(opp_id: Any) -> Any:
            url = self.api(f"/sales/opportunities/{opp_id}/forecast")
            try:
                return self.optional(
                    "forecast (amount)",
                    lambda: self._get_checked(ForecastAnswer, url),
                    _REFUSED,
                    fallback_text="amount is empty (None)",
                    refusals=(403,),
                )
            except CrmError as err:
                if err.status != 404:
                    raise
                return _GONE

        out: dict[Any, dict[str, Any] | None] = {}
        ids = [r["id"] for r in rows]
        # Until a forecast has been answered they are asked one at a time: a refused area costs one request per
        # run, not a window of them. Then the rest of the page, `degree` in flight.
        while ids and not self._forecast_answered:
            opp_id, ids = ids[0], ids[1:]
            data = read(opp_id)
            self._forecast_answered = data is not _GONE and data is not _REFUSED
            if not self._take_forecast(out, opp_id, data):
                return out
        for opp_id, data in zip(ids, ordered_map(read, ids, self.degree), strict=True):
            if not self._take_forecast(out, opp_id, data):
                break
        return out

    def _take_forecast(self, out: dict[Any, dict[str, Any] | None], opp_id: Any, data: Any) -> bool:
        """Keep one forecast answer; False when forecasts are refused (none more is asked this run)."""
        if data is _GONE:
            # deleted between the list page and its forecast: the next full sync drops it
            self.stats.warn(f"opportunity {opp_id} was deleted while it was read (forecast 404)")
            out[opp_id] = None
            return True
        if data is _REFUSED:
            self._forecast_readable = False
            return False
        out[opp_id] = data
        return True

    def _get_checked(self, model: Any, url: str) -> Any:
        """One answer, checked against its documented shape (pages.py) and returned as received."""
        body = self.client.get_json(url)
        check_page(model, body, crm=self.crm, url=url)
        return body

    def _probability(self, r: dict[str, Any], forecast: dict[str, Any] | None) -> float | None:
        ref = r.get("probability")
        if isinstance(ref, dict) and ref.get("id") is not None and self._probabilities:
            value = self._probabilities.get(int(ref["id"]))
            if value is not None:
                return value
        name = ref.get("name") if isinstance(ref, dict) else None
        if isinstance(name, str) and name.strip().rstrip("%").strip().replace(".", "", 1).isdigit():
            return float(name.strip().rstrip("%"))
        return parse_float((forecast or {}).get("expectedProbability"))

    def _member_id(self, value: Any) -> str | None:
        """A member as its numeric id: a reference's id, or an identifier mapped through the members list
        (kept as the identifier when the members are not readable)."""
        if isinstance(value, dict):
            if value.get("id") is not None:
                return _text(value.get("id"))
            value = value.get("identifier")
        text = _text(value)
        if text is None or text.isdigit():
            return text
        return self._member_ids.get(text.lower(), text)

    @classmethod
    def read_value(cls, record: dict[str, Any], native: str) -> Any:
        """A condition path (`company/name`, `_info/lastUpdated`) or custom field (`custom:Region`) of the record
        as the list returns it."""
        return _value(record, native)

    def read_id(self, value: Any) -> str | None:
        return self._member_id(value)

    def _map(self, r: dict[str, Any], enriched: PageEntries | None = None) -> Opportunity:
        """One record; `enriched`: the page's sites and forecasts, read before (no I/O in here).
        A value that cannot be read raises (BadValue, KeyError): map_records quarantines the record."""
        entries = enriched or PageEntries()
        forecast = entries.forecasts.get(r["id"])
        stage_ref, status_ref = _ref(r, "stage"), _ref(r, "status")
        stage_path = self.conn.fields.get("stage")
        if stage_path:
            stage_value = _value(r, stage_path)
            stage = _text(stage_value.get("name") if isinstance(stage_value, dict) else stage_value)
            stage_id = _text(_ref_of(r, stage_path).get("id"))
        else:
            stage_id = _text(stage_ref.get("id"))
            info = (self._stages or {}).get(stage_id) if stage_id is not None else None
            stage = info.label if info else _text(stage_ref.get("name")) or stage_id
        status_id = _text(status_ref.get("id"))
        status_info = (self._statuses or {}).get(status_id) if status_id is not None else None
        crm_status = status_info.label if status_info else _text(status_ref.get("name"))
        flags = (
            status_info.category
            if status_info
            else ("won" if r.get("closedFlag") and r.get("wonFlag") else "lost" if r.get("closedFlag") else "open")
        )
        status = self.resolve_status(stage, crm_status, flags)
        site = r.get("site") if isinstance(r.get("site"), dict) else None
        key = _site_key(r)
        location = (entries.sites.get(_site_text(key)) if key is not None else None) or (
            _text(site.get("name")) if site else None
        )
        currency = r.get("currency") or {}
        code = currency.get("currencyCode") if isinstance(currency, dict) else None
        values = self.mapped_fields(
            r,
            amount=lambda: _forecast_amount(forecast) if forecast is not None else None,
            probability=lambda: self._probability(r, forecast),
        )
        # no conversion in ConnectWise: the amount where its currency is options.base_currency
        base = self.options.base_currency
        values["amount_base"] = values["amount"] if base is not None and (code is None or code == base) else None
        # the breakdown of the same forecast lines the amount sums (none read: no breakdown)
        values.update(_forecast_breakdown(forecast if "amount" not in self.conn.fields else None))
        return self.opportunity(
            r["id"],
            r,
            **values,
            service_location=location,
            owner_crm_id=self._member_id(r.get("primarySalesRep")),
            stage=stage,
            stage_id=stage_id,
            crm_status=crm_status,
            status=status,
            currency=code,
            base_currency=base,
            account_id=_text(_ref_of(r, "company").get("id")),
            modified_at=parse_datetime(_value(r, "_info/lastUpdated")),
            **_closed_at(r, status),
        )

    def forecast_amount(self, opp_id: Any) -> float | None:
        """One opportunity's amount (the sum of its forecast lines)."""
        return _forecast_amount(
            self._get_checked(ForecastAnswer, self.api(f"/sales/opportunities/{int(opp_id)}/forecast"))
        )


def _closed_at(r: dict[str, Any], status: str) -> dict[str, Any]:
    """crm_closed_at / crm_closed_at_field from `closedDate`, for won / lost records only (an open record's is
    None, even where CW still shows one, e.g. a status the connection's open_statuses call open). A date-only
    value reads as 00:00 UTC of that date."""
    closed = parse_datetime(r.get(CLOSED_DATE)) if status != "open" else None
    return {"crm_closed_at": closed, "crm_closed_at_field": CLOSED_DATE if closed is not None else None}


def _id_chunks(ids: list[int]) -> Iterator[list[int]]:
    """Ids in chunks of at most BY_ID_CHUNK whose `id in (...)` query string stays within MAX_QUERY_CHARS
    (measured as requests encodes it, with the paging parameters _pages adds)."""
    chunk: list[int] = []
    for i in ids:
        if chunk and (len(chunk) >= BY_ID_CHUNK or _by_id_query_length(chunk + [i]) > MAX_QUERY_CHARS):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def _by_id_query_length(chunk: list[int]) -> int:
    return len(
        urlencode(
            {
                "conditions": f"id in ({','.join(map(str, chunk))})",
                "orderBy": "id asc",
                "page": 1,
                "pageSize": ConnectWiseConnector.max_page_size,
            }
        )
    )


def site_address(site: dict[str, Any]) -> str | None:
    """A company site in the canonical address form; the site's name when it has no address."""
    state = site.get("stateReference")
    state = (state.get("identifier") or state.get("name")) if isinstance(state, dict) else None
    country = site.get("country")
    country = country.get("name") if isinstance(country, dict) else country
    return format_address(
        site.get("addressLine1"),
        site.get("addressLine2"),
        site.get("addressLine3"),
        site.get("city"),
        state or site.get("stateIdentifier") or site.get("state"),
        site.get("zip"),
        country,
    ) or _text(site.get("name"))


def _ref(record: dict[str, Any], key: str) -> dict[str, Any]:
    """A reference (`status`, `stage` ...) of a record; {} when absent or not an object."""
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _site_text(key: tuple[int, int]) -> str:
    return f"{key[0]}:{key[1]}"


def _site_key(r: dict[str, Any]) -> tuple[int, int] | None:
    site, company = r.get("site"), r.get("company")
    if not isinstance(site, dict) or not isinstance(company, dict):
        return None
    try:
        return int(company["id"]), int(site["id"])
    except (KeyError, TypeError, ValueError):
        return None


def _forecast_amount(forecast: dict[str, Any]) -> float | None:
    revenues = [parse_float(i.get("revenue")) for i in forecast["forecastItems"]]
    revenues = [r for r in revenues if r is not None]
    return round(sum(revenues), 2) if revenues else None


def _forecast_breakdown(forecast: dict[str, Any] | None) -> dict[str, float | None]:
    """The forecast lines' revenue split by their `recurringFlag` (a recurring line's `revenue` is its total over
    its cycles, as the amount counts it) and their summed `cost`: one-time + recurring = the amount. The forecast
    types (Product / Service / Agreement / Other1 / Other2) say what is sold, not whether it recurs: the flag
    does. No lines (or no forecast read): all None, never zeros that would read as free."""
    items = (forecast or {}).get("forecastItems") or []
    if not items:
        return {"revenue_one_time": None, "revenue_recurring": None, "cost": None}
    one_time = recurring = cost = 0.0
    for item in items:
        revenue = parse_float(item.get("revenue")) or 0.0
        if item.get("recurringFlag") is True:
            recurring += revenue
        else:
            one_time += revenue
        cost += parse_float(item.get("cost")) or 0.0
    return {"revenue_one_time": round(one_time, 2), "revenue_recurring": round(recurring, 2), "cost": round(cost, 2)}


def _cw_message(response: requests.Response) -> str:
    """CW's error body `{"code", "message", "errors": [{"message"}]}` as one line (never the request)."""
    body = json_object(response)
    if not body:
        return ""
    parts = [f"{body.get('code') or ''}: {body.get('message') or ''}".strip(": ")]
    parts += [str(e.get("message")) for e in body.get("errors") or [] if isinstance(e, dict) and e.get("message")]
    return "; ".join(p for p in parts if p)[:500]


_REFUSED: Any = object()  # an optional read's fallback marker: the API member may not read it
_GONE: Any = object()  # a forecast answered 404: its opportunity was deleted since the list page

# The security-role area a ConnectWise API path needs (System > Security Roles, Inquire Level).
_AREAS = (
    ("/sales/opportunities/statuses", "Sales > Opportunity Status (Table Setup)"),
    ("/forecast", "Sales > Opportunities (forecast)"),
    ("/sales/opportunities", "Sales > Opportunities"),
    ("/sales/stages", "Sales > Opportunity Stage (Table Setup)"),
    ("/sales/probabilities", "Sales > Opportunity Probability (Table Setup)"),
    ("/system/members", "System > Member Maintenance"),
    ("/company/", "Companies > Company Maintenance"),
)


def _security_area(path: str) -> str:
    return next((area for marker, area in _AREAS if marker in path), "the permission this read needs")


# -- field access and filter rendering -----------------------------------------------------------------------------


def _same_origin(link: str | None, api_url: str) -> str | None:
    """The next link, on the API's own scheme and host: credentials are never sent to a host the link names."""
    if not link:
        return None
    target, ours = urlsplit(link), urlsplit(api_url)
    return urlunsplit((ours.scheme, ours.netloc, target.path, target.query, ""))


def _and(parts: list[str]) -> str:
    return " and ".join(f"({p})" if " or " in p.lower() else p for p in parts)


def _ref_of(record: dict[str, Any], path: str) -> dict[str, Any]:
    """The reference a condition path reads from (`stage/name` -> the stage reference), else {}."""
    if _CUSTOM.match(path):
        return {}
    value = _value(record, path)
    if isinstance(value, dict):
        return value
    parent = _value(record, path.rsplit("/", 1)[0]) if "/" in path else None
    return parent if isinstance(parent, dict) else {}


def _value(record: dict[str, Any], path: str) -> Any:
    """A condition path (`company/name`, `_info/dateEntered`) or a custom field (`custom:Region`) of a record."""
    m = _CUSTOM.match(path)
    if m:
        for cf in record.get("customFields") or []:
            if (m.group("id") and str(cf.get("id")) == m.group("id")) or (
                m.group("caption") and cf.get("caption") == m.group("caption")
            ):
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
    value = (
        "null"
        if f.value is None
        else (
            repr(f.value)
            if isinstance(f.value, (int, float)) and not isinstance(f.value, bool)
            else quote_string(f.value)
        )
    )
    return f"{head} and value {OPERATORS[f.op]} {value}"
