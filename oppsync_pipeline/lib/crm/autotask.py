"""Autotask PSA (Datto / Kaseya) REST API v1.0 connector (docs/crm-api-notes.md §5).

- Auth: three headers on every call (`ApiIntegrationCode`, `UserName`, `Secret`); no tokens. The REST base is
  found by zone discovery: `GET {base_url}/atservicesrest/v1.0/zoneInformation?user=<username>` (no auth) ->
  `url` + `V1.0/`. `base_url` is the discovery host (`https://webservices.autotask.net`); a `base_url` that
  already contains `/ATServicesRest` is used as the zone without discovery. A 401 triggers one zone re-lookup
  (a database can move zones; django-autotask does the same), then the same request is repeated.
- Paging: `POST Opportunities/query` with `MaxRecords` = page size (<= 500); `pageDetails.nextPageUrl` is
  POSTed with the same body (a GET on it is 405 for POST-initiated queries and would stop at 500 rows). Next
  URLs are followed relative to the current zone so a zone move mid-paging is survived. Results are by id.
  A full read takes three threads (the thread limit per object endpoint; `options.parallel_reads`): after its
  first page, the rest of the set is read as three id ranges, each its own query (`_full`, parallel.py).
- Every answer is validated before use (pages.py; QueryPage, CountAnswer, FieldsAnswer ... below): a page
  needs `items` (records with an integer `id`) and `pageDetails` with `nextPageUrl` (null on the last page).
  One that does not fit fails the run naming the URL and page number, instead of reading as an empty last page.
  Paging ends: a nextPageUrl already followed, a page starting with the id an earlier page started with (an API
  ignoring the paging hands out ever-new next links) or more pages than the set's count allows fail the run.
- Counts: a full read of a set first asks `POST Opportunities/query/count` with the same filter ->
  `{"queryCount": n}` (one request per set; incremental reads ask nothing). The sync infers no deletes when
  fewer records arrived than that; the count also bounds the paging, and the by-id reads are bounded by the
  number of ids asked.
- Discovery (once per run, `discover_tenant`): the zone, `Opportunities/entityInformation/fields` (the stage and
  status picklists, which fields exist) and `.../userDefinedFields`. A configured field or filter the tenant
  does not have is a ConfigError naming its key, before the first query.
- Stage model: `stage` = the `stage` picklist label users see, `stage_id` = its value, `crm_status` = the
  `status` picklist label. open / won / lost through `resolve_status`: `stage_categories` by stage (or status)
  label first (seed 003: a deal in the "Closed Won" stage while its status stays Active), then `open_statuses`,
  then the status's own meaning: system values 2 Lost, 3 Closed (won), 4 Implemented (won) are closed and
  0 Not Ready To Buy, 1 Active open whatever the tenant relabelled them; a tenant-defined status whose label
  says lost / closed / won / implemented / cancelled is closed, other tenant statuses are open.
  `fields: {stage: <field>}` takes any picklist field (its label) or `udf:<name>`.
- Open set: `status in <open values>` (by `stage_categories` / `open_statuses` on the status label, else the
  status's meaning); not-open: `status notIn <open values>`, the exact complement. Without the picklist the
  closed system values are listed instead.
- Optional reads (`self.optional`: a 403 / 404 is a warning in the run and a fallback): entityInformation
  (labels = values, status from the system values), userDefinedFields (udf: fields unchecked),
  ThresholdInformation (no quota figures), Companies (no client name / address), Contacts (sales executive
  from the owner), Resources (users by id only), Countries (address without country). Some Autotask
  permission failures are 500 "... does not have the adequate permissions ...": classified as 403.
- Incremental: `lastActivity gte since`. Opportunities have no last-modified field; `lastActivity` does not
  move on every edit (user-defined-field-only edits, some recalculated values), so the scheduled full sync
  is what catches those. A company rename does not move its opportunities' lastActivity either: incremental
  runs also read Companies changed since the cursor (`lastTrackedModifiedDateTime`) and re-read their
  opportunities. There is no delete feed (`deleted()` yields nothing; deletes come from full-sync
  reconciliation).
- Mapping (seed 000): title -> project_name; companyID -> Companies.companyName -> client_name and the
  company address (`format_address`: address1, address2, city, state, postalCode, country name from
  countryID) -> service_location; contactID ->
  Contacts "first last" -> sales_executive, falling back to the owner resource's name when there is no
  contact. Companies and Contacts not known are fetched in batches with an `in` filter (500 ids) and
  kept between runs (lookups.py, `oppsync.crm_lookups`; incremental runs map 500 records per lookup); the
  changed Companies replace their copies first; a full sync re-reads them all, Contacts and Countries included.
- Close time: crm_closed_at = `closedDate` for won records, `lostDate` for lost ones (CLOSE_TIME_FIELDS),
  read from the same query (Autotask returns every field). A field the tenant's entityInformation does not list
  is not read (noted): those records keep crm_closed_at None and the reconcile dates them by lastActivity.
- By id (`fetch_by_ids`): `Opportunities/query` with `id in [...]` (500 values per condition), without the
  connection's filters or a status set. Deleted opportunities are absent (Autotask has no soft delete).
  `filter_value` reads a field (or `udf:<name>`) and folds text, as Autotask compares text case-insensitively.
- Custom (user-defined) fields are named `udf:<name>` in filters and field overrides; they are sent with
  `"udf": true`. Filter values go into the JSON body as JSON values (no string building, so no injection).
- Quota: Autotask sends no usage headers. `GET ThresholdInformation` is polled at the start and every
  `THRESHOLD_POLL_EVERY` requests into stats.quota_used / quota_limit (so the run's budget applies). 429
  past the threshold is retried with backoff (Retry-After when given) by the shared client.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, NotRequired

import requests
from pydantic import Field, StrictInt, StrictStr
from typing_extensions import TypedDict

from oppsync_pipeline.lib.config import ConfigError, RecordFilter
from oppsync_pipeline.lib.crm.base import OPTIONAL_REFUSALS, ConnectorOptions, CrmConnector, Page, PositionedRecords
from oppsync_pipeline.lib.crm.fields import FieldMap, configured_fields
from oppsync_pipeline.lib.crm.http import Auth, CrmError, RequestStats, json_object
from oppsync_pipeline.lib.crm.lookups import Lookup
from oppsync_pipeline.lib.crm.pages import RECORD, PageError, PageModel, check_page
from oppsync_pipeline.lib.crm.paging import JSONLinkPaginator, PageRequest
from oppsync_pipeline.lib.crm.parallel import in_background, ordered_map, slice_count, split_after, streams
from oppsync_pipeline.lib.record import (
    CrmUser,
    Opportunity,
    StageInfo,
    Status,
    clean_text,
    format_address,
    parse_datetime,
    parse_float,
    to_utc,
)

THRESHOLD_POLL_EVERY = 100
BATCH = 200  # company ids per `in` condition when re-reading the opportunities of changed companies
IDS_PER_IN = 500  # values one `in` condition may list (docs/crm-api-notes.md §5.2): the by-id read's batch
# Where Autotask records when an opportunity closed, by outcome, in the order read: closedDate is set when the
# status becomes Closed (won) / Implemented, lostDate when it becomes Lost (docs/crm-api-notes.md §5.5; both datetimes in
# the swagger-generated clients, go-autotask entities/opportunities.go). Neither is the projected close date.
CLOSE_TIME_FIELDS: dict[str, tuple[str, ...]] = {"won": ("closedDate",), "lost": ("lostDate",)}
_NO_AUTH = "X-Oppsync-No-Auth"
_SYSTEM = {"0", "1", "2", "3", "4"}  # Autotask's system statuses: 0 Not Ready To Buy, 1 Active, 2 Lost ...
_CLOSED_WON = {"3", "4"}  # 3 Closed (won), 4 Implemented (won, post-sale)
_CLOSED_LOST = {"2"}
_NO_RIGHTS = re.compile(r"adequate permission|not have (the )?permission|access denied", re.IGNORECASE)
# What a security level must grant for each read (Admin > Security Levels > a copy of "API User (system)").
_RIGHTS = {
    "opportunities": "CRM > Opportunities (REQUIRED: the opportunity reads)",
    "companies": "CRM > Companies / Accounts (optional: client name and address)",
    "contacts": "CRM > Contacts (optional: the sales executive's name)",
    "resources": "Admin > Resources / Users (optional: user names and emails)",
    "countries": "Countries (optional: the country in addresses)",
    "thresholdinformation": "ThresholdInformation (optional: the hourly request quota)",
}
# a request's object endpoint, the unit of Autotask's thread limit (any zone: /ATServicesRest/V1.0/<Entity>/...)
_ENDPOINT = re.compile(r"/atservicesrest/v1\.0/(\w+)", re.IGNORECASE)
_CLOSED_LABEL = re.compile(r"\b(lost|closed|won|implemented|cancel+ed)\b", re.IGNORECASE)
_LOST_LABEL = re.compile(r"\b(lost|cancel+ed)\b", re.IGNORECASE)
_V10 = re.compile(r"/v1\.0/", re.IGNORECASE)


class AutotaskAuth(Auth):
    """The three API-user headers. `refresh()` looks the zone up again (there is no token to renew)."""

    refreshable = True

    def __init__(self, username: str, secret: str, integration_code: str, rediscover: Any):
        self._headers = {"ApiIntegrationCode": integration_code, "UserName": username, "Secret": secret}
        self._rediscover = rediscover

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if headers.pop(_NO_AUTH, None):  # zone discovery takes no credentials
            return
        headers.update(self._headers)
        headers.setdefault("Content-Type", "application/json")

    def refresh(self, session: requests.Session) -> None:
        self._rediscover()


# -- observe / classify -----------------------------------------------------------------------------------------


def observe(response: requests.Response, stats: RequestStats) -> None:
    """Autotask reports usage in no header; see AutotaskConnector._poll_threshold."""


def _errors(response: requests.Response) -> str:
    body = json_object(response)
    errors = body.get("errors") or ([body["Message"]] if body.get("Message") else [])
    return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)[:300]


def _what(url: str) -> str:
    """The entity / endpoint a request was about (`Opportunities`, `Companies`, `ThresholdInformation` ...)."""
    m = _V10.search(url)
    tail = url[m.end() :] if m else url
    return tail.split("?")[0].split("/")[0] or "the API"


def classify(response: requests.Response) -> Exception | None:
    """Autotask's errors, each with what to check. Permission failures come as 403, and some as 500 with "does
    not have the adequate permissions" (docs/crm-api-notes.md §5.1): both are a 403, so optional reads fall back."""
    status = response.status_code
    if status == 500 and "zoneinformation" in response.url.lower():
        return CrmError(
            "Autotask zone lookup failed (500): the API username is unknown or blank; check the "
            "connection's `username` credential (the API-only user's email) and base_url "
            "(https://webservices.autotask.net)",
            status=500,
            code="ZONE_LOOKUP",
            permanent=True,
        )
    text = _errors(response) if status in (400, 403, 404, 500) else ""
    what = _what(response.url)
    if status == 403 or (status == 500 and _NO_RIGHTS.search(text)):
        return CrmError(
            f"Autotask refused {what} (HTTP {status}: {text or 'forbidden'}); check the API user's "
            f"security level (Admin > Security Levels, a copy of 'API User (system)'): it needs view "
            f"access to {_RIGHTS.get(what.lower(), what)}",
            status=403,
            code="NO_RIGHTS",
            permanent=True,
        )
    if status == 404:
        return CrmError(
            f"Autotask has no {what} endpoint here (404: {text}); check base_url (the zone lookup "
            "host https://webservices.autotask.net, or the zone's .../ATServicesRest)",
            status=404,
            code="NOT_FOUND",
            permanent=True,
        )
    if status in (400, 500) and text:
        # Query and validation errors (500 {"errors": [...]}): the same query fails the same way on a retry.
        return CrmError(
            f"Autotask rejected the {what} request ({status}: {text}); check the connection's "
            "`filters` and `fields` (user-defined fields as `udf:<name>`) against "
            "`oppsync config check --online`",
            status=status,
            code="AUTOTASK_ERROR",
            permanent=True,
        )
    return None


# -- the answers the connector reads (docs/crm-api-notes.md §5.1-5.5), validated before use -----------------------------------


class EntityRecord(TypedDict):
    """A queried record (opportunity, company, contact, resource, country): only its id is checked; the
    connector reads the dict as received. Autotask ids are integers."""

    __pydantic_config__ = RECORD  # type: ignore[misc]

    id: StrictInt


class PageDetails(PageModel):
    # Present on every page, null on the last: a page without it is not "the end".
    nextPageUrl: StrictStr | None


class QueryPage(PageModel):
    """`POST {Entity}/query` and each nextPageUrl: `{"items": [...], "pageDetails": {...}}`."""

    items: list[EntityRecord]
    pageDetails: PageDetails


class CountAnswer(PageModel):
    """`POST {Entity}/query/count`."""

    queryCount: StrictInt = Field(ge=0)


class PicklistValue(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    value: StrictStr | StrictInt  # documented as a string although the field is an integer
    label: NotRequired[StrictStr | None]


class FieldInfo(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    name: StrictStr
    picklistValues: NotRequired[list[PicklistValue] | None]


class FieldsAnswer(PageModel):
    """`GET Opportunities/entityInformation/fields`: the field list, with the stage and status picklists."""

    fields: list[FieldInfo]


class NamedField(TypedDict):
    __pydantic_config__ = RECORD  # type: ignore[misc]
    name: StrictStr


class UserDefinedFieldsAnswer(PageModel):
    """`GET Opportunities/entityInformation/userDefinedFields`."""

    fields: list[NamedField]


class ZoneAnswer(PageModel):
    """`GET zoneInformation?user=`: the zone's REST root."""

    url: StrictStr = Field(min_length=1)


class ThresholdAnswer(PageModel):
    """`GET ThresholdInformation`: the hourly request threshold and this hour's count."""

    externalRequestThreshold: StrictInt
    currentTimeframeRequestCount: StrictInt


# What a record lacks when the API user may not read a dictionary (the run's warning says it).
LOOKUP_FALLBACKS = {
    "Companies": "client_name and service_location are left empty",
    "Contacts": "sales_executive falls back to the owner resource's name",
}


@dataclass
class PageEntries:
    """A page's companies and contacts by id, as `enrich` found them for `_map`."""

    companies: dict[int, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[int, dict[str, Any]] = field(default_factory=dict)


class AutotaskOptions(ConnectorOptions):
    """`options:` of an Autotask connection."""

    # the instance's currency (Autotask amounts carry none); unset: the internal currency read from Currencies
    currency: str | None = None


class AutotaskConnector(CrmConnector):
    Options = AutotaskOptions
    # Autotask help "API thread limiting": three concurrent threads per object endpoint and tracking identifier
    read_concurrency = 3
    # 10,000 requests an hour per database, shared by every integration: a large tenant's full read outgrows a
    # run's share of it and goes on in the next run, after the last id it staged (lib/resume.py)
    resumable_full_reads = True
    # text is read as users see it (a picklist value's label; `udf:<name>` for user-defined fields); the company's
    # name and the sales executive (the contact, else the owner resource) are derived from enrich's lookups
    field_map = FieldMap(
        project_name="title",
        client_name=None,
        sales_executive=None,
        stage="stage",
        amount="amount",
        close_date="projectedCloseDate",
        probability="probability",
        created_at="createDate",
        created_by_crm_id="creatorResourceID",
    )
    filters_ignore_case = True  # SQL Server's default collation
    crm = "autotask"
    max_page_size = 500
    native_deletes = False
    known_fields = frozenset(
        {
            "id",
            "title",
            "companyID",
            "contactID",
            "ownerResourceID",
            "creatorResourceID",
            "amount",
            "cost",
            "onetimeRevenue",
            "monthlyRevenue",
            "quarterlyRevenue",
            "semiannualRevenue",
            "yearlyRevenue",
            "totalAmountMonths",
            "useQuoteTotals",
            "probability",
            "stage",
            "status",
            "rating",
            "leadSource",
            "opportunityCategoryID",
            "projectedCloseDate",
            "closedDate",
            "lostDate",
            "startDate",
            "createDate",
            "lastActivity",
            "impersonatorCreatorResourceID",
            "barriers",
            "description",
            "helpNeeded",
            "market",
            "nextStep",
            "promotionName",
            "relationshipAssessmentScore",
            "technicalAssessmentScore",
            "lossReason",
            "winReason",
        }
    )
    _OPS: ClassVar[dict[str, str]] = {
        "equal": "eq",
        "not_equal": "noteq",
        "more_than": "gt",
        "less_than": "lt",
        "at_least": "gte",
        "at_most": "lte",
        "in": "in",
    }

    def __init__(self, conn: Any, credentials: dict[str, str], **kwargs: Any):
        self._zone: str | None = None
        super().__init__(conn, credentials, **kwargs)
        self._resources: dict[int, dict[str, Any]] | None = None
        self._internal_currency: str | None = None  # options.currency, else Currencies.isInternalCurrency
        self._last_poll: int | None = None
        self._poll_turn = threading.Lock()  # reads and lookups run in several threads: one poll when due
        self._fields: dict[str, dict[str, Any]] | None = None  # entityInformation/fields by name (None: refused)
        self._label_cache: dict[str, dict[str, str]] = {}  # picklist labels by value, per field (`_labels`)
        self._udfs: set[str] | None = None  # user-defined field names (None: refused)
        self._refused: set[str] = set()  # optional reads refused this run: not asked again
        self._company_changes: tuple[datetime, list[int]] | None = None
        self._no_close_fields: set[str] = set()  # close-time fields this tenant does not have
        # lookups of several pages in flight (map_pages): ids an earlier page's lookup will bring, by entity; the
        # entities that answered once; the turn an entity's first lookup takes alone
        self._reserved: dict[str, set[int]] = {}
        self._answered: set[str] = set()
        self._first_lookup: dict[str, threading.Lock] = {}

    # -- dictionaries kept between runs (lookups.py) -----------------------------------------------------------
    # Companies: the incremental run first reads those changed since the bookmark (lastTrackedModifiedDateTime,
    # `_changed_companies`), so a renamed company reaches its records on the next hourly sync. Contacts and
    # Countries are refreshed by the nightly full sync, which starts from an empty cache: Autotask documents
    # no change cursor on Contacts we could verify, a contact's rename only changes a sales_executive name,
    # and countries do not change.

    @property
    def _companies(self) -> Lookup[int]:
        return self.lookups.lookup("companies", int)

    @property
    def _contacts(self) -> Lookup[int]:
        return self.lookups.lookup("contacts", int)

    @property
    def _countries(self) -> Lookup[int]:
        """Country id -> name; empty until read (one query of all countries, once per cache)."""
        return self.lookups.lookup("countries", int, whole=True)

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return name.startswith("udf:") and len(name) > 4

    def make_auth(self) -> Auth:
        c = self.credentials
        return AutotaskAuth(c["username"], c["secret"], c["integration_code"], self._rediscover)

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats)

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response)

    def in_flight_key(self, method: str, path: str) -> Hashable | None:
        """The thread limit counts per object endpoint (the entity after /V1.0/): a set's first page read ahead
        waits while its three ranges are read, rather than being refused."""
        m = _ENDPOINT.search(self.client.url(path))
        return m.group(1).lower() if m else None

    # -- discovery, zone and threshold ------------------------------------------------------------------------------

    def discover_tenant(self) -> None:
        """The zone, then the Opportunities entity's fields (picklists: stage and status labels, which fields
        exist) and its user-defined fields. Both are optional reads; a configured field or filter that the
        tenant does not have is a configuration error named by its key, before the first query."""
        self.ensure_zone()
        # independent of each other: the user-defined fields and the internal currency are read beside the fields
        # (each answer or error taken at its turn below, as if asked then; a configuration the fields refuse has
        # then cost one request more, the currency's)
        user_defined = in_background(
            lambda: self._get_checked(UserDefinedFieldsAnswer, "Opportunities/entityInformation/userDefinedFields")
        )
        currency = None if self.options.currency else in_background(self._read_internal_currency)
        fields = self._optional(
            "Opportunities/entityInformation/fields",
            lambda: self._get_checked(FieldsAnswer, "Opportunities/entityInformation/fields"),
            None,
            "stage and status labels are their picklist values; open / won / lost from "
            "Autotask's system status values (2 Lost, 3 Closed, 4 Implemented closed; "
            "others open)",
        )
        if fields is not None:
            self._fields = {f["name"]: f for f in fields["fields"] if f["name"]}
            self._label_cache = {}
            self.note(
                "stage picklist",
                "stage" in self._fields,
                "stage = the stage picklist label" if "stage" in self._fields else "no stage field",
            )
        udfs = self._optional(
            "Opportunities/entityInformation/userDefinedFields",
            user_defined,
            None,
            "configured udf: fields are sent unchecked",
        )
        if udfs is not None:
            self._udfs = {f["name"] for f in udfs["fields"] if f["name"]}
        self._check_configured_fields()
        self._discover_close_fields()
        self._internal_currency = self.options.currency or self._optional(
            "Currencies",
            currency or self._read_internal_currency,
            None,
            "currency and base_currency left empty (set options.currency to fill them)",
        )

    def _read_internal_currency(self) -> str | None:
        """The internal currency's code: the currency every opportunity amount is in."""
        for page in self._query("Currencies", [{"op": "eq", "field": "isInternalCurrency", "value": True}]):
            for c in page:
                if c.get("name"):
                    return str(c["name"])
        return None

    def _discover_close_fields(self) -> None:
        """Which close-time fields this tenant's Opportunities have (entityInformation/fields). One it lacks is
        not read: those records get no crm_closed_at and the reconcile dates their close by lastActivity.
        Without entityInformation the records themselves tell (an absent field reads as empty)."""
        for status, names in CLOSE_TIME_FIELDS.items():
            for name in names:
                what = f"close time of {status} opportunities ({name})"
                if self._fields is None:
                    self.note(what, True, "entityInformation not readable: read from each record when present")
                elif name in self._fields:
                    self.note(what, True, f"crm_closed_at = {name}")
                else:
                    self._no_close_fields.add(name)
                    self.note(
                        what,
                        False,
                        f"this tenant's Opportunities have no {name}: {status} opportunities "
                        "are dated by lastActivity (closed_at_source = modified_at)",
                    )

    def _check_configured_fields(self) -> None:
        problems = []
        for key, name in configured_fields(self.conn):
            if name.startswith("udf:"):
                if self._udfs is not None and name[4:] not in self._udfs:
                    problems.append(
                        f"{key}: this Autotask tenant has no user-defined field '{name[4:]}' on "
                        f"Opportunities; it has {sorted(self._udfs)}"
                    )
            elif self._fields is not None and name not in self._fields:
                problems.append(f"{key}: this Autotask tenant's Opportunities have no field '{name}'")
        if problems:
            raise ConfigError(problems)

    def _optional(
        self, name: str, call: Any, fallback: Any, fallback_text: str, refusals: tuple[int, ...] = OPTIONAL_REFUSALS
    ) -> Any:
        if name in self._refused:
            return fallback
        marker = object()
        value = self.optional(name, call, marker, fallback_text=fallback_text, refusals=refusals)
        if value is marker:
            self._refused.add(name)
            return fallback
        return value

    def ensure_zone(self) -> None:
        """The tenant's zone known (the API's base URL) and the hourly request threshold polled when due: before
        any call, the sync's and the revenue writer's alike."""
        if self._zone is None:
            self._discover()
        if self._last_poll is None or self.stats.requests - self._last_poll >= THRESHOLD_POLL_EVERY:
            self._poll_threshold()

    def _discover(self) -> None:
        """Zone lookup: an ordinary (unauthenticated) request, counted in stats.requests like every other."""
        base = self.conn.base_url.rstrip("/")
        if "/atservicesrest" in base.lower():
            url = base
        else:
            lookup = f"{base}/atservicesrest/v1.0/zoneInformation"
            info = self.client.get_json(lookup, params={"user": self.credentials["username"]}, headers={_NO_AUTH: "1"})
            try:
                url = check_page(ZoneAnswer, info, crm=self.crm, url=lookup).url
            except PageError as err:
                # Whatever answers there is not Autotask's zone lookup: the same answer comes every time.
                err.permanent, err.code = True, "ZONE_LOOKUP"
                err.hint = (
                    "Check base_url: the zone lookup host https://webservices.autotask.net, or the "
                    "zone's .../ATServicesRest"
                )
                raise
        url = url.rstrip("/")
        if not url.lower().endswith("/v1.0"):
            url += "/V1.0"
        self._zone = url + "/"
        self.client.base_url = self._zone

    def _rediscover(self) -> None:
        # After a 401 the database may have moved zones: look it up again (only with a discovery host).
        self._zone = None
        self._discover()

    def _poll_threshold(self) -> None:
        self._last_poll = self.stats.requests
        data = self._optional(
            "ThresholdInformation",
            lambda: self._get_checked(ThresholdAnswer, "ThresholdInformation"),
            None,
            "no quota figures (Autotask sends no usage headers): the run's budget is not "
            "metered against the hourly threshold; 429s are still waited out",
        )
        if data is not None and data["externalRequestThreshold"] > 0:
            self.stats.quota_limit = data["externalRequestThreshold"]
            self.stats.quota_used = data["currentTimeframeRequestCount"]
            self.client.budget.check(self.stats)

    # -- stages, statuses and users ----------------------------------------------------------------------------------

    def _picklist(self, name: str) -> list[dict[str, Any]]:
        field = (self._fields or {}).get(name) or {}
        return field.get("picklistValues") or []

    def _labels(self, name: str) -> dict[str, str]:
        """A picklist's labels by value (as text), built once per field (again when the fields are read again):
        each record asks for its stage's and status's labels."""
        labels = self._label_cache.get(name)
        if labels is None:
            labels = {}
            for v in self._picklist(name):
                key = str(v["value"])
                labels.setdefault(key, str(v.get("label") or key))  # the first of a value listed twice, as before
            self._label_cache[name] = labels
        return labels

    def _label(self, field: str, value: Any) -> str | None:
        """A picklist value's label (the value itself when the field is no picklist or the label is unknown)."""
        if value is None or value == "":
            return None
        key = str(value)
        return self._labels(field).get(key, key)

    def fetch_stages(self) -> list[StageInfo]:
        """The stage picklist (Admin > Opportunity Stages): key = value, label = what users see. Autotask gives
        stages no open / won flags; those shown come from the label and are informational only (the status
        decides open / won / lost, `stage_categories` may override it by stage name)."""
        out = []
        for v in self._picklist("stage"):
            key, label = str(v["value"]), str(v.get("label") or v["value"])
            closed = bool(_CLOSED_LABEL.search(label))
            out.append(
                StageInfo(
                    key=key,
                    label=label,
                    is_closed=closed,
                    is_won=closed and not _LOST_LABEL.search(label),
                    sort_order=int(v.get("sortOrder") or 0),
                )
            )
        return out

    def fetch_statuses(self) -> list[StageInfo]:
        """The status picklist with open / won flags: the system values by their documented meaning (whatever
        the tenant renamed them to), tenant-defined values by their label. Without entityInformation: the
        system values, labelled by value."""
        values = (
            self._picklist("status")
            if self._fields is not None
            else [{"value": k, "label": k, "isSystem": True, "sortOrder": int(k)} for k in sorted(_SYSTEM)]
        )
        out = []
        for v in values:
            key, label = str(v["value"]), str(v.get("label") or v["value"])
            if key in _SYSTEM and v.get("isSystem", True):
                closed, won = key in _CLOSED_WON | _CLOSED_LOST, key in _CLOSED_WON
            else:
                closed = bool(_CLOSED_LABEL.search(label))
                won = closed and not _LOST_LABEL.search(label)
            out.append(
                StageInfo(key=key, label=label, is_closed=closed, is_won=won, sort_order=int(v.get("sortOrder") or 0))
            )
        return out

    def _status_flags(self, key: str | None) -> Status:
        info = (self._statuses or {}).get(key) if key is not None else None
        if info is not None:
            return info.category
        return "won" if key in _CLOSED_WON else ("lost" if key in _CLOSED_LOST else "open")

    def users(self) -> Iterable[CrmUser]:
        for r in self._all_resources().values():
            yield CrmUser(str(r["id"]), _person(r), r.get("email"), active=bool(r.get("isActive", True)))

    def _all_resources(self) -> dict[int, dict[str, Any]]:
        if self._resources is None:
            self.ensure_zone()

            def read() -> dict[int, dict[str, Any]]:
                res: dict[int, dict[str, Any]] = {}
                for page in self._query("Resources", [{"op": "gt", "field": "id", "value": 0}], self.max_page_size):
                    res.update((r["id"], r) for r in page)
                return res

            self._resources = self._optional(
                "Resources",
                read,
                {},
                "users are known by their resource ids only (no names / emails; "
                "sales_executive falls back to the contact's name or none)",
            )
        return self._resources

    # -- opportunities ---------------------------------------------------------------------------------------------

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        """The open (or not-open) set. A full read (no `since`) also asks Autotask how many records the set
        holds (`query/count`, one request, sent beside the first page): the sync compares what it received with
        that count before it infers deletes, and the paging may not run past it."""
        self.prepare()
        self.ensure_zone()
        filters = self._set_filters(open_set, since)
        if since is None:  # split into id ranges read side by side (options.parallel_reads, _full)
            yield from self._full_read(open_set, filters, filters)
            return
        # Incremental: the changed records and those of the companies changed since the bookmark are mapped
        # IDS_PER_IN at a time (one `in` lookup of their unknown companies / contacts, issue 21), in pages.
        batch: list[dict[str, Any]] = []
        for items in self._changed_records(open_set, filters, since):
            batch += items
            if len(batch) >= IDS_PER_IN:
                yield from self._mapped(batch)
                batch = []
        if batch:
            yield from self._mapped(batch)

    def resume_key(self, record: dict[str, Any]) -> str | None:
        return str(record["id"])  # a read of one cursor is in id order (Autotask's result order)

    def resume_read(self, open_set: bool, after: str) -> Iterator[Page]:
        """The set's full read on from `after`: an id (the read was one cursor: the same query with `id gt
        after`, split again) or the id ranges a split read had left (`_ranges_position`: each range on from the
        last id taken of it, side by side); its tally counting the whole set as `opportunities` does."""
        self.prepare()
        self.ensure_zone()
        filters = self._set_filters(open_set, None)
        ranges = _parse_position(after)
        if len(ranges) == 1 and ranges[0][1] is None:  # one open-ended range left: read and split as a new read
            yield from self._full_read(
                open_set, [*filters, {"op": "gt", "field": "id", "value": ranges[0][0]}], filters
            )
            return
        counted = self._count("Opportunities", filters)
        self.tally(open_set, None, (), crm_count=counted)
        yield from self.map_pages(self._tallied(open_set, self._read_ranges(filters, ranges, counted)))

    def _full_read(
        self, open_set: bool, filters: list[dict[str, Any]], counted: list[dict[str, Any]]
    ) -> Iterator[Page]:
        """A full read of the records `filters` match; the set's count (of what `counted` matches: the whole set,
        also when the read resumes after an id) is asked beside the first page, its tally's reference."""
        counting = in_background(lambda: self._count("Opportunities", counted))

        def total() -> int:
            n = counting()  # the count's error, if any, raises here: before any record is used
            self.tally(open_set, None, (), crm_count=n)
            return n

        yield from self.map_pages(self._tallied(open_set, self._full(filters, total)))

    def _tallied(self, open_set: bool, pages: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        for items in pages:
            self.tally(open_set, None, (r["id"] for r in items))
            yield items

    def _changed_records(
        self, open_set: bool, filters: list[dict[str, Any]], since: datetime
    ) -> Iterator[list[dict[str, Any]]]:
        """Raw pages of an incremental read: the records active since `since`, then (a renamed or moved company
        does not touch its opportunities' lastActivity) the set's records of the companies changed since then
        (Companies.lastTrackedModifiedDateTime), each record once."""
        seen: set[int] = set()
        # the companies changed since the bookmark replace their kept copies before any record is mapped: asked
        # beside the first page of the changed records, taken before that page is handed on
        changing = in_background(lambda: self._changed_companies(since))
        for items in self._query("Opportunities", filters):
            changing()
            self.tally(open_set, since, (r["id"] for r in items))
            seen.update(r["id"] for r in items)
            yield items
        changed = changing()
        base = self._set_filters(open_set, None)
        for i in range(0, len(changed), BATCH):
            by_company = [*base, {"op": "in", "field": "companyID", "value": changed[i : i + BATCH]}]
            for items in self._query("Opportunities", by_company):
                items = [r for r in items if r["id"] not in seen]
                seen.update(r["id"] for r in items)
                if items:
                    yield items

    def _mapped(self, records: list[dict[str, Any]]) -> Iterator[Page]:
        page = self.map_page(records)
        for start in range(0, len(page), self.page_size):
            yield page[start : start + self.page_size]

    def _full(self, filters: list[dict[str, Any]], count: Callable[[], int]) -> Iterator[list[dict[str, Any]]]:
        """A full read of a set. With `degree` > 1 the first page is read alone; what comes after its last id is
        split into `degree` id ranges (widths from the first page's id density and the set's count; the last range
        is open-ended, so no id is left out however wrong the estimate), read side by side (`_read_ranges`).
        `count()`: the set's count, asked beside the first page; it bounds the paging from that page on."""
        pages = self._query("Opportunities", filters, total=lambda page: count())
        if self.degree <= 1:
            yield from pages
            return
        first = next(pages, None)
        total = count()
        if total <= self.page_size:  # one query, as it began
            if first is not None:
                yield first
                yield from pages
            return
        pages.close()  # nothing more was asked: the next page is requested only when it is wanted
        if first is None:
            return
        yield first
        rest = total - len(first)
        if rest <= 0 and len(first) < self.page_size:
            return
        parts = slice_count(self.degree, self.page_size)
        bounds = [math.ceil(b) for b in split_after(first[0]["id"], first[-1]["id"], len(first), rest, parts)]
        yield from self._read_ranges(
            filters, [[b, bounds[i + 1] if i + 1 < len(bounds) else None] for i, b in enumerate(bounds)], total
        )

    def _read_ranges(
        self, filters: list[dict[str, Any]], ranges: list[list[int | None]], total: int
    ) -> Iterator[list[dict[str, Any]]]:
        """The records `filters` match in each id range [after, up to] (`id gt after`, `id lte up to`; None: no
        upper bound), each its own query and cursor in id order, read side by side (parallel.streams: the ranges'
        pages as they arrive; a failing range fails the read). Each page says where the read stands after it
        (PositionedRecords: every range's last id taken, the ranges read to their end left out), which is what
        a paused read goes on from (`resume_read`): the pages of several ranges interleave, so no one id is."""
        left = [list(r) for r in ranges]  # [last id taken (or the range's lower bound), upper bound]
        ended = [False] * len(left)

        def id_range(i: int) -> Callable[[], Iterator[tuple[int, list[dict[str, Any]] | None]]]:
            after, up_to = left[i]
            where = [{"op": "gt", "field": "id", "value": after}]
            if up_to is not None:
                where.append({"op": "lte", "field": "id", "value": up_to})

            def read() -> Iterator[tuple[int, list[dict[str, Any]] | None]]:
                # the set's count bounds every range (a range paging on past it is a loop, as in one query)
                for page in self._query("Opportunities", [*filters, *where], expect=total):
                    yield i, page
                yield i, None  # the range is read to its end

            return read

        for i, page in streams([id_range(i) for i in range(len(left))], self.degree):
            if page is None:
                ended[i] = True
                continue
            if page:
                left[i][0] = page[-1]["id"]
            yield PositionedRecords(
                page, _ranges_position([r for r, done in zip(left, ended, strict=True) if not done])
            )

    def count(self, open_set: bool) -> int:
        """Autotask's own count of the set, asked now: `POST Opportunities/query/count` with exactly the filter
        `opportunities(open_set, None)` queries with (status set and the connection's filters)."""
        self.prepare()
        self.ensure_zone()
        return self._count("Opportunities", self._set_filters(open_set, None))

    def _set_filters(self, open_set: bool, since: datetime | None) -> list[dict[str, Any]]:
        filters: list[dict[str, Any]] = [self._status_filter(open_set)]
        if since is not None:
            filters.append({"op": "gte", "field": "lastActivity", "value": _at_value(since)})
        return filters + [render_filter(f) for f in self.conn.filters]

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """The current records of these ids: `POST Opportunities/query` with `id in [...]`, at most IDS_PER_IN
        values per condition, and nothing else (no connection filters, no status set). Autotask has no soft
        delete or recycle bin: a deleted opportunity matches no query, so it is simply absent, as are ids that
        never existed (or are not Autotask ids at all). Mapped as `opportunities` maps them (companies,
        contacts, resources, close time)."""
        self.prepare()
        self.ensure_zone()
        wanted = sorted({int(i) for i in ids if str(i).strip().isascii() and str(i).strip().isdigit()})
        for i in range(0, len(wanted), IDS_PER_IN):
            chunk = wanted[i : i + IDS_PER_IN]
            for items in self._query("Opportunities", [{"op": "in", "field": "id", "value": chunk}], expect=len(chunk)):
                yield self.map_page(items)

    def _changed_companies(self, since: datetime) -> list[int]:
        """Ids of the companies changed at or after `since` (read once per cursor; their cached copies are
        replaced). Optional: refused, renames reach the warehouse with the next full sync."""
        if "Companies" in self._refused:
            return []
        if self._company_changes is None or self._company_changes[0] != since:

            def read() -> list[int]:
                ids = []
                for page in self._query(
                    "Companies",
                    [{"op": "gte", "field": "lastTrackedModifiedDateTime", "value": _at_value(since)}],
                    self.max_page_size,
                ):
                    self._companies.update((c["id"], _company(c)) for c in page)
                    ids += [c["id"] for c in page]
                return ids

            # 500 too: a tenant whose Companies cannot be queried by lastTrackedModifiedDateTime only loses this.
            self._company_changes = (
                since,
                self._optional(
                    "Companies changed since the cursor",
                    read,
                    [],
                    "renamed companies reach the warehouse with the next full sync",
                    refusals=(403, 404, 500),
                ),
            )
        return self._company_changes[1]

    def _status_filter(self, open_set: bool) -> dict[str, Any]:
        """The open set by status: the statuses `resolve_status` makes open when the stage does not override
        it (`open_statuses` by status label or value, else the status flags). The not-open set is its exact
        complement, so every record is read once; a stage named in `stage_categories` / `open_statuses` changes
        the record's status, not the set it is read in. Without the picklist, the closed system values are
        listed instead (unknown tenant statuses count as open)."""
        statuses = self.statuses()
        if self._fields is None:
            closed = sorted(int(k) for k in _CLOSED_WON | _CLOSED_LOST)
            return {"op": "notIn" if open_set else "in", "field": "status", "value": closed}
        open_values = [
            int(k)
            for k, s in statuses.items()
            if k.lstrip("-").isdigit() and self._open_by_status(k, s.label, s.category)
        ]
        if not open_values:  # nothing is open: "open" matches no record, "not open" matches every record
            return {"op": "lt", "field": "id", "value": 0} if open_set else {"op": "gt", "field": "id", "value": 0}
        return {"op": "in" if open_set else "notIn", "field": "status", "value": open_values}

    def _open_by_status(self, key: str, label: str, flags: Status) -> bool:
        categories = self.conn.stage_categories  # by name, as resolve_status reads them
        if label in categories:
            return categories[label] == "open"
        if self.conn.open_statuses is not None:
            return bool({key, label} & set(self.conn.open_statuses))
        return flags == "open"

    def _query(
        self,
        entity: str,
        filters: list[dict[str, Any]],
        max_records: int | None = None,
        *,
        expect: int | None = None,
        total: Callable[[Any], int | None] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """POST the query, then POST the same body to every nextPageUrl until one is null. Each page is checked
        (QueryPage) before a record of it is used. The paging must end: a next link already followed, a page
        that starts where an earlier one started (an API ignoring the paging) and, when `expect` (or `total` of
        the first page) says how many records can match, more pages than that allows each fail the run."""
        body = {"MaxRecords": max_records or self.page_size, "filter": filters}
        path = f"{entity}/query"
        # every next page is POSTed the same body, at its path from /V1.0/ on (the zone may move mid-run)
        paginator = JSONLinkPaginator(lambda page: page.pageDetails.nextPageUrl, resolve=_relative)
        for fetched in self.pages(
            PageRequest("POST", path, json=body),
            paginator,
            model=QueryPage,
            records="items",
            first_id="id",
            expect=expect,
            total=total,
            page_size=body["MaxRecords"],
            before_request=self._poll_when_due,
        ):
            if fetched.records:
                yield fetched.records

    def _poll_when_due(self) -> None:
        with self._poll_turn:
            due = self.stats.requests - (self._last_poll or 0) >= THRESHOLD_POLL_EVERY
            if due:
                self._last_poll = self.stats.requests
        if due:
            self._poll_threshold()

    def _count(self, entity: str, filters: list[dict[str, Any]]) -> int:
        path = f"{entity}/query/count"
        data = self.client.post_json(path, {"filter": filters})
        return check_page(CountAnswer, data, crm=self.crm, url=self.client.url(path)).queryCount

    def _get_checked(self, model: type[PageModel], path: str) -> Any:
        """A GET answer, validated as `model`; returned as received."""
        data = self.client.get_json(path)
        check_page(model, data, crm=self.crm, url=self.client.url(path))
        return data

    def enrich(self, items: list[dict[str, Any]]) -> PageEntries:
        """This page's companies and contacts (`_map` reads them): those kept (lookups.py: one query each), the
        rest read in batches (never one call per record); the countries once, and the resources once when a
        record's sales executive falls back to its owner. All optional: refused, the record keeps its ids and
        the names / address stay empty (with a warning)."""
        plan = self._plan_lookups(items)
        return self._apply_lookups(items, plan, self._fetch_lookups(plan))

    def map_pages(self, pages: Iterable[list[dict[str, Any]]]) -> Iterator[Page]:
        """`enrich` then map each page, the lookups of the next pages in flight meanwhile (up to `degree` pages'
        at once: the thread limit is per endpoint, and the InFlightLimit keeps it). Each page's ids are chosen in
        order, leaving out those an earlier page's lookup under way will bring (`_plan_lookups`), and applied in
        order before the page is mapped: the same ids in the same requests as one page after another, where a
        page's lookups no longer wait for the page before it (issue 21: ~20 lookups of a full sync of 10,000 on
        the critical path, each a round trip)."""
        planned = ((items, self._plan_lookups(items)) for items in pages)
        fetched = ordered_map(lambda job: (*job, self._fetch_lookups(job[1])), planned, max(2, self.degree))
        for items, plan, answers in fetched:
            yield self.map_records(items, self._map, self._apply_lookups(items, plan, answers))

    def _plan_lookups(self, items: list[dict[str, Any]]) -> list[tuple[str, list[int], Lookup[int], str]]:
        """The page's companies and contacts that neither the cache holds (in memory or kept: `load`) nor an
        earlier page's lookup under way will bring (those are reserved until applied): (entity, ids, cache,
        fallback text) per lookup to send."""
        self.statuses()
        lookups = []
        for entity, key, cache in (
            ("Companies", "companyID", self._companies),
            ("Contacts", "contactID", self._contacts),
        ):
            reserved = self._reserved.setdefault(entity, set())
            named = {r[key] for r in items if _is_id(r.get(key))}
            wanted = sorted(named - cache.load(named).keys() - reserved)
            if wanted and entity not in self._refused:
                reserved.update(wanted)
                lookups.append((entity, wanted, cache, LOOKUP_FALLBACKS[entity]))
        return lookups

    def _fetch_lookups(
        self, lookups: list[tuple[str, list[int], Lookup[int], str]]
    ) -> list[dict[int, dict[str, Any]] | None]:
        """The records of each lookup (None: refused). An entity's first lookup goes alone: a refusal stops the
        lookups after it (as one page after another would), instead of each being refused in turn."""

        def read(entity: str, wanted: list[int]) -> dict[int, dict[str, Any]]:
            found: dict[int, dict[str, Any]] = {}
            for i in range(0, len(wanted), IDS_PER_IN):  # as many ids as one `in` condition takes
                chunk = wanted[i : i + IDS_PER_IN]
                for page in self._query(
                    entity, [{"op": "in", "field": "id", "value": chunk}], self.max_page_size, expect=len(chunk)
                ):
                    found.update((x["id"], _kept(entity, x)) for x in page)
            return found

        def lookup(job: tuple[str, list[int], Lookup[int], str]) -> dict[int, dict[str, Any]] | None:
            entity, wanted, _, text = job
            if entity in self._answered:
                return self._optional(entity, lambda: read(entity, wanted), None, text)
            with self._first_lookup.setdefault(entity, threading.Lock()):
                found = self._optional(entity, lambda: read(entity, wanted), None, text)
                if found is not None:
                    self._answered.add(entity)
                return found

        # companies and contacts are two endpoints (the thread limit is per endpoint): read side by side
        return list(ordered_map(lookup, lookups, len(lookups)))

    def _apply_lookups(
        self,
        items: list[dict[str, Any]],
        lookups: list[tuple[str, list[int], Lookup[int], str]],
        answers: list[dict[int, dict[str, Any]] | None],
    ) -> PageEntries:
        """Store what the page's lookups found, then the page's own copy of its entries (what an earlier page's
        lookup brought included): what `_map` reads, whatever leaves the caches' memory meanwhile."""
        for (entity, wanted, cache, _), found in zip(lookups, answers, strict=True):
            if found is not None:
                found.update((missing, {}) for missing in set(wanted) - found.keys())
                cache.update(found)
            self._reserved[entity].difference_update(wanted)
        entries = PageEntries(
            self._companies.load({r["companyID"] for r in items if _is_id(r.get("companyID"))}),
            self._contacts.load({r["contactID"] for r in items if _is_id(r.get("contactID"))}),
        )
        named = entries.companies.values()
        if not self._countries and "Countries" not in self._refused and any(c and c.get("countryID") for c in named):

            def countries() -> dict[int, str]:
                out: dict[int, str] = {}
                for page in self._query("Countries", [{"op": "gt", "field": "id", "value": 0}], self.max_page_size):
                    out.update((c["id"], c.get("displayName") or c.get("name")) for c in page)
                return out

            got = self._optional("Countries", countries, None, "service_location is written without the country")
            if got is None:
                self._refused.add("Countries")
            else:
                self._countries.update(got)
        if any(self._executive_is_owner(r, entries) for r in items):
            self._all_resources()
        return entries

    @staticmethod
    def _contact(r: dict[str, Any], entries: PageEntries) -> dict[str, Any]:
        return entries.contacts.get(int(r.get("contactID") or 0)) or {}

    def _executive_is_owner(self, r: dict[str, Any], entries: PageEntries) -> bool:
        """Whether the record's sales executive is its owner resource (no contact with a name)."""
        try:
            return r.get("ownerResourceID") is not None and not _person(self._contact(r, entries))
        except (TypeError, ValueError):
            return False  # an unreadable contactID: _map quarantines the record

    def _executive(self, r: dict[str, Any], entries: PageEntries) -> str | None:
        """The contact's name, else the owner resource's (as `enrich` read them)."""
        executive = _person(self._contact(r, entries))
        owner = r.get("ownerResourceID")
        if not executive and owner is not None:
            executive = _person((self._resources or {}).get(int(owner)) or {})
        return clean_text(executive)

    @classmethod
    def read_value(cls, record: dict[str, Any], native: str) -> Any:
        """The record's field, a user-defined field for `udf:<name>` (filters on it compare text
        case-insensitively, `filters_ignore_case`)."""
        return cls._get(record, native)

    def read_text(self, record: dict[str, Any], native: str) -> str | None:
        return self._value(record, native)

    def _map(self, r: dict[str, Any], enriched: PageEntries | None = None) -> Opportunity:
        entries = enriched or PageEntries()
        company = entries.companies.get(int(r.get("companyID") or 0)) or {}
        stage_field = self.field("stage")
        stage_id = _str(self._get(r, stage_field))
        stage = self._value(r, stage_field)
        status_key = _str(r.get("status"))
        crm_status = self._label("status", status_key)
        status = self._resolve(stage, crm_status, status_key)
        closed_at, closed_at_field = self._closed_at(r, status)
        values = self.mapped_fields(
            r,
            client_name=lambda: clean_text(company.get("companyName")),
            sales_executive=lambda: self._executive(r, entries),
        )
        # opportunity amounts are in the internal currency (multi-currency only changes what is invoiced)
        values["amount_base"] = values["amount"]
        values.update(_revenue_breakdown(r))
        return self.opportunity(
            r["id"],
            r,
            **values,
            service_location=self._address(company),
            owner_crm_id=_str(r.get("ownerResourceID")),
            stage=stage,
            stage_id=stage_id,
            crm_status=crm_status,
            status=status,
            currency=self._internal_currency or self.options.currency,
            base_currency=self._internal_currency or self.options.currency,
            account_id=_str(r.get("companyID") or None),  # required by Autotask: 0 is no company
            modified_at=parse_datetime(r.get("lastActivity")),
            crm_closed_at=closed_at,
            crm_closed_at_field=closed_at_field,
        )

    def _closed_at(self, r: dict[str, Any], status: Status) -> tuple[datetime | None, str | None]:
        """When Autotask says the record closed, and the field that said it: the first non-empty of the fields
        for its outcome (CLOSE_TIME_FIELDS). None for open records and where the field is empty or absent.
        A date-only value (no time) reads as 00:00 UTC of that date."""
        for name in CLOSE_TIME_FIELDS.get(status, ()):
            if name in self._no_close_fields:
                continue
            value = parse_datetime(r.get(name))
            if value is not None:
                return value, name
        return None, None

    def _resolve(self, stage: str | None, crm_status: str | None, status_key: str | None) -> Status:
        """`resolve_status`, plus `open_statuses` naming a status by its value ("0"), as the set queries do."""
        status = self.resolve_status(stage, crm_status, self._status_flags(status_key))
        opens, categories = self.conn.open_statuses, self.conn.stage_categories
        if (
            status != "open"
            and opens is not None
            and status_key in opens
            and stage not in categories
            and crm_status not in categories
        ):
            return "open"
        return status

    def _value(self, r: dict[str, Any], name: str) -> str | None:
        """A field's value as text users see: a picklist value becomes its label."""
        value = self._get(r, name)
        if not name.startswith("udf:") and self._labels(name):
            return clean_text(self._label(name, value))
        return clean_text(value) if value not in (None, "") else None

    @staticmethod
    def _get(r: dict[str, Any], name: str) -> Any:
        if name.startswith("udf:"):
            udf = name[4:]
            return next((u.get("value") for u in r.get("userDefinedFields") or [] if u.get("name") == udf), None)
        return r.get(name)

    def _address(self, c: dict[str, Any]) -> str | None:
        if not c:
            return None
        country = self._countries.get(int(c["countryID"])) if c.get("countryID") else None
        return clean_text(
            format_address(
                c.get("address1"), c.get("address2"), c.get("city"), c.get("state"), c.get("postalCode"), country
            )
        )


# What is kept of a Company and a Contact (the fields the mapping reads), not the whole record.
COMPANY_KEPT = ("id", "companyName", "address1", "address2", "city", "state", "postalCode", "countryID")
CONTACT_KEPT = ("id", "firstName", "lastName")


def _company(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c[k] for k in COMPANY_KEPT if c.get(k) is not None}


def _kept(entity: str, x: dict[str, Any]) -> dict[str, Any]:
    if entity == "Companies":
        return _company(x)
    return {k: x[k] for k in CONTACT_KEPT if x.get(k) is not None}


def _person(r: dict[str, Any]) -> str | None:
    name = " ".join(str(x) for x in (r.get("firstName"), r.get("lastName")) if x)
    return name or None


# A split read's position: the id ranges it has left, each as [last id taken, upper bound or null] (JSON)
_RANGES = "ranges:"


def _ranges_position(ranges: list[list[int | None]]) -> str:
    return _RANGES + json.dumps(ranges, separators=(",", ":"))


def _parse_position(after: str) -> list[list[int | None]]:
    """The id ranges a read goes on with: those of a split read's position, or everything after an id."""
    if after.startswith(_RANGES):
        return [[int(lo), None if hi is None else int(hi)] for lo, hi in json.loads(after[len(_RANGES) :])]
    return [[int(after), None]]


def _str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _at_value(dt: datetime) -> str:
    """Autotask's query datetime: UTC, milliseconds (floored, so `gte` stays inclusive)."""
    dt = to_utc(dt)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _relative(next_url: str) -> str:
    """The part of a nextPageUrl after `/V1.0/`, so it resolves against the current zone."""
    m = _V10.search(next_url)
    return next_url[m.end() :] if m else next_url


# -- filter rendering ----------------------------------------------------------------------------------------------


def render_filter(f: RecordFilter) -> dict[str, Any]:
    """A connection filter as an Autotask filter condition. Values stay JSON values: nothing to escape."""
    op = AutotaskConnector._OPS[f.op]
    node: dict[str, Any] = {"op": op, "field": f.field, "value": f.value}
    if f.field.startswith("udf:"):
        node["field"], node["udf"] = f.field[4:], True
    return node


def _is_id(value: Any) -> bool:
    """An Autotask reference that can be looked up (an int other than 0; bool is no id)."""
    return isinstance(value, int) and not isinstance(value, bool) and value != 0


# A recurring revenue field's periods per month: Autotask's opportunity total is the one-time revenue plus each
# recurring revenue over `totalAmountMonths` ("Total Amount Months": monthly x months, quarterly x months / 3,
# semiannual x months / 6, yearly x months / 12), the breakdown the Opportunity form shows.
RECURRING_PER_MONTH = {
    "monthlyRevenue": 1.0,
    "quarterlyRevenue": 1 / 3,
    "semiannualRevenue": 1 / 6,
    "yearlyRevenue": 1 / 12,
}
_RECURRING = tuple(RECURRING_PER_MONTH.items())


def _revenue_breakdown(r: dict[str, Any]) -> dict[str, float | None]:
    """One-time vs recurring revenue (recurring over `totalAmountMonths`, RECURRING_PER_MONTH) and the
    opportunity's total `cost` (required by Autotask). A field the record lacks (a tenant or API user without
    it) leaves that part None, never a zero."""
    get = r.get
    months = parse_float(get("totalAmountMonths"))
    recurring = None
    if months is not None:
        total, seen = 0.0, False
        for name, per in _RECURRING:  # in order, each absent rate adding 0.0: the same sum as before, to the bit
            rate = parse_float(get(name))
            seen = seen or rate is not None
            total += (rate or 0.0) * per * months
        recurring = round(total, 2) if seen else None
    return {
        "revenue_one_time": parse_float(get("onetimeRevenue")),
        "revenue_recurring": recurring,
        "cost": parse_float(get("cost")),
    }
