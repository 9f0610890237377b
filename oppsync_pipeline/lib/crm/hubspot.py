"""HubSpot connector (CRM v3): deals through search, read by keyset on `hs_object_id` so that no query ever
pages past the 10,000-results cap of one search.

- Auth: a private-app token (`access_token`), or OAuth (`client_id`, `client_secret`, `refresh_token`, optionally a
  current `access_token`): the token is refreshed at `POST /oauth/v1/token` on a 401 and the request repeated;
  token requests are counted with the run's requests (`Auth.token_request`).
- Discovery (once per run): the properties API (`GET /crm/v3/properties/deals`, scope crm.schemas.deals.read)
  says which deal properties exist: a `fields:` override or filter naming a property the portal does not have
  fails at once, naming it; only existing properties are requested; enumeration values are shown by their
  option label and owner properties by the owner's name. Refused: a warning, the documented defaults are used.
- Stage model: `stage` = the pipeline stage's label (pipelines API), `stage_id` = `crm_status` = the deal's
  `dealstage` id (`contractsent`, `145236002`). Open / won / lost from the stage's `metadata.isClosed` and
  probability (won = closed at 1.0), through `resolve_status` (stage_categories, open_statuses). Pipelines
  refused: the stage's label from the dealstage property's options (else the id itself) and the deal's own
  `hs_is_closed` / `hs_is_closed_won`.
- Open set: `dealstage IN <ids whose resolved status is open>` (not-open: the others); without the pipelines,
  `hs_is_closed EQ false|true`; when a `fields.stage` override and a status rule meet (or rules without
  pipelines), every deal is read and each set keeps the deals whose resolved status fits it.
- Optional reads (a 403/404 is a warning in the run and `sync_runs.warnings`, never a failed run): pipelines,
  owners (scope crm.objects.owners.read; fallback: owner ids without names), companies and deal-company
  associations (scope crm.objects.companies.read; fallback: no client name / address), properties.
- Reads: `POST /crm/v3/objects/deals/search` sorted by `hs_object_id` ASC with `hs_object_id GT <last id read>`
  (plus `hs_lastmodifieddate GTE <since>` in incremental runs): any number of deals changed in any window,
  even at one millisecond, is read completely, and deals changing during the read shift nothing. Search is
  throttled to `options.search_requests_per_second` (default 4.5: 90% of the 5 per second per portal HubSpot
  documents, evenly spaced); every other call is paced to 90% of the portal's rolling 10-second limit as its
  headers report it (`options.requests_per_10_seconds` overrides; `pace`).
- Companies: one v4 batch association read per 1,000 deals (`POST /crm/v4/associations/deals/companies/batch/read`,
  its documented cap; duplicates across association types collapse to one company per `toObjectId`, the Primary
  one wins), then `POST /crm/v3/objects/companies/batch/read` (100 ids) for the companies not known: companies
  are kept between runs (lookups.py, `oppsync.crm_lookups`). Incremental runs first search the companies whose
  own `hs_lastmodifieddate` moved since the bookmark (their kept copies are replaced) and re-read their deals; a
  full sync re-reads every company (the periodic refresh).
- Owners: `hubspot_owner_id` is an owner id; `hs_created_by_user_id` is a USER id (owners.userId). `users()` yields
  one CrmUser per owner keyed by the user id with the owner id as alt id, archived owners included.
- Close time (`crm_closed_at`): won deals by `hs_closed_won_date`, lost ones by `hs_closed_lost_date` (calculated
  when the deal enters such a stage), else `closedate`; portals whose property list lacks the calculated ones
  read `closedate` alone (a capability note, no warning).
- Read by id (`fetch_by_ids`): `POST /crm/v3/objects/deals/batch/read?archived=false`, 100 ids per request; ids
  HubSpot no longer has are OBJECT_NOT_FOUND entries of a 207 answer's `errors` and are simply absent.
- Deletes: archived deals (`GET /crm/v3/objects/deals?archived=true`, `archivedAt`); archiving does not bump
  `hs_lastmodifieddate`, so incremental search never sees them.
- Quota: `X-HubSpot-RateLimit-Daily` / `-Daily-Remaining` (non-search responses only); a 429 with
  `policyName: DAILY` is QuotaExhausted; ten-secondly and secondly 429s are retried.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

import requests
from pydantic import BaseModel, Field, StrictInt, StringConstraints, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.base import ConnectorOptions, CrmConnector, Page, matches
from oppsync_pipeline.lib.crm.fields import FieldMap, configured_fields, fields_to_read
from oppsync_pipeline.lib.crm.http import (
    Auth,
    AuthError,
    CrmError,
    QuotaExhausted,
    RequestStats,
    RollingWindowPacer,
    json_object,
)
from oppsync_pipeline.lib.crm.lookups import Lookup
from oppsync_pipeline.lib.crm.pages import PageModel, check_page
from oppsync_pipeline.lib.crm.paging import Fetched, JSONCursorPaginator, KeysetPaginator, PageRequest
from oppsync_pipeline.lib.crm.parallel import slice_count, split_after, streams
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

LIST_MAX = 100
BATCH_MAX = 100
# Ids one v4 association batch read takes (developers.hubspot.com changelog "Batch Read Limit for HubSpot
# Associations API": at most 1,000 inputs since 2025-02-10).
ASSOCIATIONS_MAX = 1000
MAX_FILTERS_PER_GROUP = 10
EPOCH = datetime(1970, 1, 1)
PRIMARY_TYPE_ID = 5
DATE_FIELDS = frozenset(
    {
        "createdate",
        "closedate",
        "hs_lastmodifieddate",
        "notes_last_updated",
        "hs_date_entered_closedwon",
        "hs_date_entered_closedlost",
        "hs_lastactivitydate",
        "hs_closed_won_date",
        "hs_closed_lost_date",
    }
)
OAUTH_KEYS = ("client_id", "client_secret", "refresh_token")
ACCOUNT_DETAILS_PATH = "/account-info/v3/details"
COMPANY_PROPERTIES = ["name", "address", "address2", "city", "state", "zip", "country"]
DEAL_PROPERTIES = [
    "dealname",
    "amount",
    "dealstage",
    "pipeline",
    "closedate",
    "createdate",
    "hs_lastmodifieddate",
    "hs_object_id",
    "hubspot_owner_id",
    "hs_created_by_user_id",
    "deal_currency_code",
    # calculated: the amount at the portal's exchange rate, in the company currency (account-info's
    # companyCurrency); equal to `amount` in a single-currency portal
    "amount_in_home_currency",
    "hs_deal_stage_probability",
    "hs_is_closed",
    "hs_is_closed_won",
    "hs_closed_won_date",
    "hs_closed_lost_date",
]
# Where a closed deal's close time is read, first non-empty wins: the calculated property HubSpot stamps when the
# deal enters a closed-won / closed-lost stage, else `closedate` (user-editable; HubSpot fills it on the close
# when it is empty). Older portals lack the calculated ones in their property list: then `closedate` alone.
CLOSE_TIME_FIELDS: dict[str, tuple[str, ...]] = {
    "won": ("hs_closed_won_date", "closedate"),
    "lost": ("hs_closed_lost_date", "closedate"),
}
CALCULATED_CLOSE_TIME = ("hs_closed_won_date", "hs_closed_lost_date")
# Optional reads: the capability name (with the scope it needs) and what the run does without it.
PROPERTIES_READ = "deal properties (scope crm.schemas.deals.read)"
CLOSE_TIME_READ = "close time (hs_closed_won_date / hs_closed_lost_date)"
CLOSE_TIME_FALLBACK = (
    "not in this portal's deal properties: closed deals are dated by closedate (user-editable), "
    "and without it by the last modification"
)
PIPELINES_READ = "deal pipelines (stage labels and closed/won flags)"
OWNERS_READ = "owners (scope crm.objects.owners.read)"
COMPANIES_READ = "companies and deal-company associations (scope crm.objects.companies.read)"
PROPERTIES_FALLBACK = (
    "the standard deal properties are requested and configured custom properties are not checked before the first query"
)
PIPELINES_FALLBACK = (
    "stage = the dealstage property's option label, else the stage id; open/won from each deal's "
    "hs_is_closed / hs_is_closed_won"
)
OWNERS_FALLBACK = "owner and creator ids are kept without names (sales_executive empty, no users listed)"
COMPANIES_FALLBACK = "client_name and service_location stay empty"
DEALS_PATH = "/crm/v3/objects/deals"
DEAL_SEARCH_PATH = "/crm/v3/objects/deals/search"
DEAL_BATCH_READ_PATH = "/crm/v3/objects/deals/batch/read"
COMPANY_SEARCH_PATH = "/crm/v3/objects/companies/search"
OWNERS_PATH = "/crm/v3/owners"
_OPS = {
    "equal": "EQ",
    "not_equal": "NEQ",
    "more_than": "GT",
    "less_than": "LT",
    "at_least": "GTE",
    "at_most": "LTE",
    "in": "IN",
}
_CUSTOM = re.compile(r"^[a-z][a-z0-9_]{0,99}$")


# -- auth -------------------------------------------------------------------------------------------------------------


class HubSpotAuth(Auth):
    """Bearer token: a private-app token as is, or an OAuth access token refreshed with the refresh token."""

    def __init__(self, credentials: dict[str, str], token_url: str):
        self.oauth = all(credentials.get(k) for k in OAUTH_KEYS)
        self.refreshable = self.oauth
        self._credentials = credentials
        self._token_url = token_url
        self._token: str | None = credentials.get("access_token") or None
        self.expires_at: float | None = None

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if self._token is None or (self.expires_at is not None and time.monotonic() >= self.expires_at):
            self.refresh(session)
        headers["Authorization"] = f"Bearer {self._token}"

    def refresh(self, session: requests.Session) -> None:
        if not self.oauth:
            raise AuthError(
                "HubSpot refused the private app token (401); rotate it in the HubSpot app settings", status=401
            )
        data = {"grant_type": "refresh_token", **{k: self._credentials[k] for k in OAUTH_KEYS}}
        response = self.token_request(session, "POST", self._token_url, data=data, timeout=(10, 60))
        if response.status_code != 200:
            status = str(json_object(response).get("status", ""))
            hint = {
                "BAD_REFRESH_TOKEN": "credentials.refresh_token is no longer valid (withdrawn, or issued to another app): "
                "re-authorise the app and store its new refresh token",
                "BAD_CLIENT_ID": "check credentials.client_id and credentials.client_secret against the app's "
                "Auth settings",
            }.get(status, "check credentials.client_id, client_secret and refresh_token, and options.token_url")
            raise AuthError(
                f"HubSpot OAuth token refresh failed with HTTP {response.status_code} {status}".rstrip() + f"; {hint}",
                status=response.status_code,
                code=status or None,
            )
        body = response.json()
        self._token = body["access_token"]
        expires_in = body.get("expires_in")
        # refresh a minute early; a 401 before that still triggers one refresh in ApiClient
        self.expires_at = time.monotonic() + max(0, int(expires_in) - 60) if expires_in else None


# -- observe / classify -----------------------------------------------------------------------------------------


def observe(response: requests.Response, stats: RequestStats) -> None:
    daily = response.headers.get("X-HubSpot-RateLimit-Daily")
    remaining = response.headers.get("X-HubSpot-RateLimit-Daily-Remaining")
    if daily and daily.isdigit():
        stats.quota_limit = int(daily)
        if remaining and remaining.isdigit():
            stats.quota_used = int(daily) - int(remaining)


# The rolling 10-second limit of a portal's non-search calls: 100 on Free/Starter (the lowest, assumed until the
# portal's headers say), 190 on Professional/Enterprise, 250 with the capacity pack; shared by all its apps.
TEN_SECONDLY_FLOOR = 100
TEN_SECONDLY_SECONDS = 10.0
# Paced to 90% of the limit: the portal counts a request when it arrives, and arrivals jitter by the network's
# latency; the margin also leaves room for the portal's other apps' occasional calls.
PACE_SHARE = 0.9


def paced_limit(limit: int) -> int:
    """The requests per window to pace to for a portal limit (0: no pacing)."""
    return max(1, int(limit * PACE_SHARE)) if limit > 0 else 0


def learn_ten_secondly(response: requests.Response, pacer: RollingWindowPacer) -> None:
    """Pace to the limit the portal reports on its answers (`X-HubSpot-RateLimit-Max` per
    `-Interval-Milliseconds`): a Professional portal is not held to the Free tier's 100, and a portal on a lower
    tier than assumed is not sent more than it takes. Search answers carry no such headers."""
    limit = response.headers.get("X-HubSpot-RateLimit-Max")
    interval = response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
    if not (limit and limit.isdigit() and int(limit) > 0):
        return  # not reported (search, OAuth), or no limit: keep pacing as before
    if interval and interval.isdigit() and int(interval) > 0:
        pacer.seconds = int(interval) / 1000
    if pacer.limit != paced_limit(int(limit)):
        pacer.limit = paced_limit(int(limit))


def classify(response: requests.Response) -> Exception | None:
    """HubSpot's answers that need more than the status code: a spent daily limit, and the permanent errors
    (400 / 403 / 404) with a message that names what to check."""
    status = response.status_code
    if status not in (400, 403, 404, 429):
        return None
    body = json_object(response)
    if not body:
        return None
    if status == 429:
        if str(body.get("policyName", "")).upper() == "DAILY":
            return QuotaExhausted(
                "HubSpot reports the portal's daily API limit is spent (429, policy DAILY)", status=429, code="DAILY"
            )
        return None
    category = str(body.get("category") or body.get("status") or "")
    message = str(body.get("message") or "")[:300]
    what = f"HubSpot refused {response.request.method} {response.url.split('?', 1)[0]} ({status} {category})"
    if status == 403 and category == "MISSING_SCOPES":
        scopes = sorted(
            {
                sc
                for e in body.get("errors") or []
                if isinstance(e, dict)
                for key in ("requiredGranularScopes", "requiredScopes")
                for sc in ((e.get("context") or {}).get(key) or [])
            }
        )
        return CrmError(
            f"{what}: the app lacks the scope(s) {', '.join(scopes) or '(not named)'}; add them to the "
            "private app's scopes (Settings > Integrations > Private apps) or the OAuth app's and "
            "re-install (README: HubSpot prerequisites)",
            status=403,
            code="MISSING_SCOPES",
        )
    if status == 403:
        return CrmError(
            f"{what}: {message}; the app's user lacks a HubSpot permission for this read: check the "
            "private app's scopes and the portal's user permissions",
            status=403,
            code=category or None,
        )
    if status == 400:
        return CrmError(
            f"{what}: {message}; check the connection's `fields:` and `filters:` (every property named "
            "there must exist on deals in this portal, by its internal name; `oppsync config check "
            "--online` lists them) and options.page_size (at most 200)",
            status=400,
            code=category or None,
        )
    return CrmError(
        f"{what}: {message}; check the connection's base_url (https://api.hubapi.com) and that the "
        "object exists in this portal",
        status=404,
        code=category or None,
    )


# -- pages: the documented shape of every answer read (pages.py) -----------------------------------------------------
# Records name only the keys the connector relies on (extra keys are ignored); the connector keeps reading the
# dicts it received. HubSpot object ids are numeric strings: deal ids are also the keyset position of a read.

ObjectId = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]


class IdRecord(TypedDict):
    id: ObjectId


class NextPage(BaseModel):
    after: str


class Paging(BaseModel):
    """`paging` of a list or search answer; absent (or without `next`) on the last page."""

    next: NextPage | None = None


class ListPage(PageModel):
    """`GET` lists paged by an opaque `after` cursor: archived deals, owners."""

    results: list[IdRecord]
    paging: Paging | None = None

    @property
    def after(self) -> str | None:
        return self.paging.next.after if self.paging and self.paging.next else None


class SearchPage(ListPage):
    """`POST .../search`: `total` is the number of objects the whole query matches (not only this page)."""

    total: Annotated[StrictInt, Field(ge=0)]


class SearchCount(PageModel):
    total: Annotated[StrictInt, Field(ge=0)]


class Property(TypedDict):
    name: Annotated[str, StringConstraints(min_length=1)]


class PropertiesPage(PageModel):
    results: list[Property]


class Stage(TypedDict):
    id: Annotated[str, StringConstraints(min_length=1)]


class Pipeline(TypedDict):
    id: Annotated[str, StringConstraints(min_length=1)]
    stages: list[Stage]


class PipelinesPage(PageModel):
    results: list[Pipeline]


class AssociatedObject(TypedDict):
    toObjectId: StrictInt | ObjectId  # an integer in live answers, a string in HubSpot's spec


Association = TypedDict("Association", {"from": IdRecord, "to": list[AssociatedObject]})


class AssociationsPage(PageModel):
    """v4 batch association reads (a 207 may carry `errors` for ids without associations)."""

    results: list[Association]


class BatchError(TypedDict):
    category: str


class BatchPage(PageModel):
    """Batch reads of deals and companies: the found objects in `results`, the others as `errors` (207)."""

    results: list[IdRecord]
    errors: list[BatchError] = []

    @model_validator(mode="before")
    @classmethod
    def _results_listed(cls, body: Any) -> Any:
        # every asked id missing from a by-id answer would be taken as deleted: say so when the list is absent
        if isinstance(body, dict) and not isinstance(body.get("results"), list):
            raise PydanticCustomError(
                "no_results",
                "the batch read answered without a `results` list of objects with ids (every asked id would look gone)",
            )
        return body


# -- connector ----------------------------------------------------------------------------------------------------


class HubSpotOptions(ConnectorOptions):
    """`options:` of a HubSpot connection."""

    # 90% of the documented 5 per second, as other calls keep to 90% of theirs: evenly spaced (222 ms apart), a
    # search that arrives up to 111 ms late still finds at most 5 in any second. 0: no client-side pacing
    search_requests_per_second: Annotated[float, Field(ge=0)] = 4.5
    # Every other request, paced to this many per rolling 10 seconds. None: the portal's own limit, from the
    # X-HubSpot-RateLimit-Max / -Interval-Milliseconds headers of its answers (100, the Free/Starter limit, until
    # the first answer says); 0: no client-side pacing.
    requests_per_10_seconds: Annotated[int, Field(ge=0)] | None = None
    token_url: str | None = None  # OAuth refresh-token endpoint override


class HubSpotConnector(CrmConnector):
    Options = HubSpotOptions
    # search: 5 requests per second per portal (`pace` keeps to options.search_requests_per_second):
    # full reads split the id space into up to 5 keyset ranges, so pages come at the pace, not one latency apart
    read_concurrency = 5
    # the company and the owner's name are derived (enrich: the deal's primary company; the owners list)
    field_map = FieldMap(
        project_name="dealname",
        client_name=None,
        sales_executive=None,
        stage="dealstage",
        amount="amount",
        close_date="closedate",
        probability="hs_deal_stage_probability",
        created_at="createdate",
        created_by_crm_id="hs_created_by_user_id",
    )
    crm = "hubspot"
    max_page_size = 200  # search; list pages are capped at 100
    native_deletes = True
    known_fields = frozenset(
        {
            "dealname",
            "amount",
            "amount_in_home_currency",
            "dealstage",
            "pipeline",
            "closedate",
            "createdate",
            "hs_lastmodifieddate",
            "hs_object_id",
            "hubspot_owner_id",
            "hs_created_by_user_id",
            "deal_currency_code",
            "hs_deal_stage_probability",
            "hs_forecast_probability",
            "hs_is_closed",
            "hs_is_closed_won",
            "dealtype",
            "description",
            "hs_priority",
            "hs_analytics_source",
            "hubspot_team_id",
            "hs_closed_amount",
            "hs_date_entered_closedwon",
            "hs_date_entered_closedlost",
            "notes_last_updated",
            "hs_lastactivitydate",
            "hs_closed_won_date",
            "hs_closed_lost_date",
        }
    )

    def __init__(self, conn: ConnectionConfig, credentials: dict[str, str], **kwargs: Any):
        super().__init__(conn, credentials, **kwargs)
        # searches evenly spaced (one per 1/rate s: the limit is per second), from every read thread together
        rate = self.options.search_requests_per_second
        self._searches = RollingWindowPacer(1 if rate > 0 else 0, 1.0 / rate if rate > 0 else 1.0)
        configured = self.options.requests_per_10_seconds
        self._requests = RollingWindowPacer(
            paced_limit(TEN_SECONDLY_FLOOR) if configured is None else configured, TEN_SECONDLY_SECONDS
        )
        self._owners: dict[str, CrmUser] | None = None
        self._companies_refused = False
        self._deal_properties: dict[str, dict[str, Any]] | None = None  # None: not discovered (refused)
        self._by_pipeline: dict[tuple[str, str], StageInfo] = {}
        self._changed_company_deals: set[str] | None = None
        self._company_currency: str | None = None  # account-info's companyCurrency

    @property
    def _companies(self) -> Lookup[str]:
        """Company id -> its COMPANY_PROPERTIES, kept between runs (lookups.py): a full sync re-reads every
        company its deals name; an incremental one reads the companies it does not know and, first, those
        modified since the bookmark (`_deals_of_changed_companies`)."""
        return self.lookups.lookup("companies", str)

    def make_auth(self) -> Auth:
        # called by the base class before `self.options` exists
        token_url = HubSpotOptions.model_validate(self.conn.options).token_url or f"{self.conn.base_url}/oauth/v1/token"
        return HubSpotAuth(self.credentials, token_url)

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats)
        if self.options.requests_per_10_seconds is None:
            learn_ten_secondly(response, self._requests)

    def pace(self, method: str, path: str) -> float:
        """Searches at `options.search_requests_per_second`; every other call within the portal's rolling
        10-second limit (`options.requests_per_10_seconds`, else what the portal's headers report)."""
        if urlsplit(path).path.endswith("/search"):
            return self._searches.take()
        return self._requests.take()

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response)

    @classmethod
    def validate_connection(cls, conn: ConnectionConfig) -> list[str]:
        problems = [p for p in super().validate_connection(conn) if not p.startswith("credentials:")]
        keys = set(conn.credentials)
        private = keys == {"access_token"}
        oauth = set(OAUTH_KEYS) <= keys <= set(OAUTH_KEYS) | {"access_token"}
        if not (private or oauth):
            problems.append(
                f"credentials: hubspot takes either ['access_token'] (private app) or "
                f"{list(OAUTH_KEYS)} (OAuth, optionally with access_token); got {sorted(keys)}"
            )
        return problems

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        # HubSpot custom property names are lowercase internal names; the hs_ prefix is reserved for HubSpot's own.
        return bool(_CUSTOM.match(name)) and not name.startswith("hs_")

    # -- discovery ----------------------------------------------------------------------------------------------

    def discover_tenant(self) -> None:
        """Which deal properties this portal has (properties API), checked against the connection's `fields:` and
        `filters:` before the first query: a missing one is a permanent error naming it and the fix."""
        props = self.optional(PROPERTIES_READ, self._read_properties, None, fallback_text=PROPERTIES_FALLBACK)
        self._deal_properties = props
        self._note_close_time(props)
        if props is not None:
            self._check_properties(props)
        self._company_currency = self.optional(
            "company currency (account-info)",
            self._read_company_currency,
            None,
            fallback_text="base_currency left empty (amount_base still read from amount_in_home_currency)",
        )

    def _check_properties(self, props: dict[str, dict[str, Any]]) -> None:
        """The connection's `fields:` and `filters:` against the portal's deal properties (a missing one is a
        permanent error naming it and the fix), and what was found, as capabilities."""
        problems = [
            f"{key}: deal property '{native}' does not exist in this HubSpot portal"
            for key, native in configured_fields(self.conn)
            if native not in props
        ]
        if problems:
            raise CrmError(
                "; ".join(problems) + ". Create the property in HubSpot (Settings > Properties > Deal "
                "properties) or correct the connection's configuration to the property's internal name "
                "(`oppsync config check --online` lists this portal's deal properties)",
                status=400,
                code="PROPERTY_DOESNT_EXIST",
                permanent=True,
            )
        custom = sorted(n for n, p in props.items() if not p.get("hubspotDefined", True))
        absent = [n for n in DEAL_PROPERTIES if n not in props]
        self.note(
            PROPERTIES_READ,
            True,
            f"{len(props)} deal properties, custom: {custom or 'none'}"
            + (f"; not in this portal (not requested): {absent}" if absent else ""),
        )
        for canonical, native in self.conn.fields.items():
            meta = props[native]
            kind = "owner" if meta.get("referencedObjectType") == "OWNER" else meta.get("type")
            shown = " (shown by option label)" if meta.get("options") and kind != "owner" else ""
            self.note(f"fields.{canonical}", True, f"read from '{native}' ({kind}){shown}")

    def _note_close_time(self, props: dict[str, dict[str, Any]] | None) -> None:
        """Whether closed deals can be dated by HubSpot's calculated close properties. Portals whose property
        list lacks them (older portals) date them by `closedate`; never a failed run, and no warning: the
        fallback is HubSpot's own close date."""
        if props is None:
            self.note(
                CLOSE_TIME_READ,
                True,
                "requested unchecked (properties API refused); a deal without them is dated by closedate",
            )
            return
        missing = [n for n in CALCULATED_CLOSE_TIME if n not in props]
        if missing:
            self.note(CLOSE_TIME_READ, False, f"{', '.join(missing)} {CLOSE_TIME_FALLBACK}")
        else:
            self.note(
                CLOSE_TIME_READ, True, "won deals by hs_closed_won_date, lost by hs_closed_lost_date, else closedate"
            )

    def _read_company_currency(self) -> str | None:
        """The portal's company currency: the one `amount_in_home_currency` is in (Account Information API)."""
        body = self.client.get_json(ACCOUNT_DETAILS_PATH)
        code = body.get("companyCurrency") if isinstance(body, dict) else None
        return str(code) if code else None

    def _read_properties(self) -> dict[str, dict[str, Any]]:
        path = "/crm/v3/properties/deals"
        body = self.client.get_json(path, params={"archived": "false"})
        self._checked(PropertiesPage, body, path)
        return {p["name"]: p for p in body["results"]}

    # -- stages and users ---------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        body = self.optional(PIPELINES_READ, self._read_pipelines, None, fallback_text=PIPELINES_FALLBACK)
        if body is None:
            return []
        out = []
        for p_index, pipeline in enumerate(sorted(body["results"], key=lambda p: p.get("displayOrder", 0))):
            for stage in pipeline["stages"]:
                meta = stage.get("metadata") or {}
                closed = str(meta.get("isClosed", "false")).lower() == "true"
                prob = parse_float(meta.get("probability"))
                info = StageInfo(
                    key=str(stage["id"]),
                    label=stage.get("label") or str(stage["id"]),
                    is_closed=closed,
                    is_won=closed and prob is not None and prob >= 1.0,
                    sort_order=p_index * 1000 + int(stage.get("displayOrder") or 0),
                    pipeline=str(pipeline.get("id")),
                    probability=None if prob is None else round(prob * 100, 4),
                )
                self._by_pipeline[(str(pipeline.get("id")), info.key)] = info
                out.append(info)
        return out

    def _read_pipelines(self) -> dict[str, Any]:
        path = "/crm/v3/pipelines/deals"
        body = self.client.get_json(path)
        self._checked(PipelinesPage, body, path)
        return body

    def _stage_info(self, pipeline: str | None, stage_id: str | None) -> StageInfo | None:
        """Stage ids are scoped to their pipeline: resolve the pair, then the id alone (from the pipelines as
        `enrich` read them: no request here)."""
        if not stage_id:
            return None
        stages = self._stages or {}
        return self._by_pipeline.get((str(pipeline), stage_id)) or stages.get(stage_id)

    def users(self) -> Iterable[CrmUser]:
        return list(self._owner_map().values())

    def _owner_map(self) -> dict[str, CrmUser]:
        """Owner id -> CrmUser (keyed by user id, owner id as alt id), active and archived owners."""
        if self._owners is None:
            self._owners = self.optional(OWNERS_READ, self._read_owners, {}, fallback_text=OWNERS_FALLBACK)
        return self._owners

    def _read_owners(self) -> dict[str, CrmUser]:
        owners: dict[str, CrmUser] = {}
        for archived in ("false", "true"):
            for records in self._list_pages(OWNERS_PATH, {"limit": 100, "archived": archived}):
                for o in records:
                    oid = o["id"]
                    name = " ".join(p for p in (o.get("firstName"), o.get("lastName")) if p) or None
                    uid = o.get("userId") or o.get("userIdIncludingInactive")  # archived owners: userId null
                    owners[oid] = CrmUser(
                        crm_user_id=str(uid) if uid is not None else oid,
                        name=clean_text(name or o.get("email")),
                        email=o.get("email"),
                        kind="user",
                        active=not o.get("archived", archived == "true"),
                        alt_ids=(oid,) if uid is not None else (),
                    )
        return owners

    # -- opportunities -----------------------------------------------------------------------------------------

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        self.prepare()
        query = self._set_query(open_set)
        if query is None:
            return
        filters, leftover, post_filter = query
        base = list(filters)
        if since is not None:
            base.append({"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(_ms(since))})
        properties = self._properties()
        self._owner_map()
        seen: set[str] = set()
        if since is not None:
            # the companies changed since the bookmark replace their kept copies before any deal is mapped
            self._deals_of_changed_companies(since)
        pages: Iterable[tuple[list[dict[str, Any]], int | None]] = (
            self._keyset(DEAL_SEARCH_PATH, base, properties, self.page_size)
            if since is not None or self.degree <= 1
            else self._split_keyset(base, properties)
        )
        if since is not None:
            catch_up = self._company_catch_up(since, filters, properties, seen)
            pages = itertools.chain(pages, ((records, None) for records in catch_up))
        # Search pages (200 deals) are enriched ASSOCIATIONS_MAX deals at a time: one association read and the
        # fewest company batch reads per 1,000 deals instead of per 200 (issue 21); still yielded by page.
        batch: list[dict[str, Any]] = []
        for records, set_count in pages:
            self.tally(open_set, since, [r["id"] for r in records], set_count)
            records = [r for r in records if r["id"] not in seen]
            seen.update(r["id"] for r in records)
            batch += records
            if len(batch) >= ASSOCIATIONS_MAX:
                yield from self._mapped(batch, leftover, post_filter, open_set)
                batch = []
        if batch:
            yield from self._mapped(batch, leftover, post_filter, open_set)

    def _mapped(
        self, records: list[dict[str, Any]], leftover: list[RecordFilter], post_filter: bool, open_set: bool
    ) -> Iterator[Page]:
        page = self.map_page(records)
        if leftover:
            page = [o for o in page if all(self._matches(f, o.raw) for f in leftover)]
        if post_filter:
            page = [o for o in page if (o.status == "open") == open_set]
        for start in range(0, len(page), self.page_size):  # yielded in pages of the connection's size
            yield page[start : start + self.page_size]

    def count(self, open_set: bool) -> int | None:
        """The deals search counts for the set's full read (`total` of its first query, asked for one deal):
        the same filters as `opportunities(open_set, None)`, so the same deals before any filtering in Python."""
        self.prepare()
        query = self._set_query(open_set)
        if query is None:
            return 0
        body = self._search(DEAL_SEARCH_PATH, [*query[0], _past(0)], ["hs_object_id"], 1)
        return self._checked(SearchCount, body, DEAL_SEARCH_PATH).total

    def _set_query(self, open_set: bool) -> tuple[list[dict[str, Any]], list[RecordFilter], bool] | None:
        """(search filters of the set's full read, the connection's filters left to Python, whether each page
        must still be filtered by the resolved status); None when the set is empty."""
        selects, post_filter = self._status_filter(open_set)
        if selects is None:
            return None
        pushed, leftover = self._render_filters()
        return [*selects, *pushed], leftover, post_filter

    def _company_catch_up(
        self, since: datetime, base: list[dict[str, Any]], properties: list[str], seen: set[str]
    ) -> Iterator[list[dict[str, Any]]]:
        """Incremental runs: editing a company (a rename, a new address) does not bump its deals'
        hs_lastmodifieddate, so the deals of companies modified since the cursor are read again by id."""
        deal_ids = self._deals_of_changed_companies(since)
        todo = sorted((d for d in deal_ids if d not in seen), key=int)
        for n, start in enumerate(range(0, len(todo), BATCH_MAX), 1):
            chunk = todo[start : start + BATCH_MAX]
            filters = base + [{"propertyName": "hs_object_id", "operator": "IN", "values": chunk}]
            body = self._search(DEAL_SEARCH_PATH, filters, properties, BATCH_MAX)
            self._checked(SearchPage, body, DEAL_SEARCH_PATH, n)
            if body["results"]:
                yield body["results"]

    def _deals_of_changed_companies(self, since: datetime) -> set[str]:
        """Deal ids associated with companies modified at or after `since` (once per run; empty when the
        companies cannot be read: then there is no company data to refresh)."""
        if self._changed_company_deals is None:
            self._changed_company_deals = set()
            if self._companies_refused:
                return self._changed_company_deals
            got = self.optional(
                COMPANIES_READ, lambda: self._read_changed_company_deals(since), None, fallback_text=COMPANIES_FALLBACK
            )
            if got is None:
                self._companies_refused = True
            else:
                self._changed_company_deals = got
        return self._changed_company_deals

    def _read_changed_company_deals(self, since: datetime) -> set[str]:
        """The companies modified since `since` (search on their own `hs_lastmodifieddate`, with the properties
        the mapping reads: their kept copies are replaced), and the deals associated with them."""
        modified = [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(_ms(since))}]
        companies = []
        for records, _ in self._keyset(COMPANY_SEARCH_PATH, modified, COMPANY_PROPERTIES, 200):
            for c in records:
                companies.append(c["id"])
                self._companies[c["id"]] = _company(c)
        deals: set[str] = set()
        path = "/crm/v4/associations/companies/deals/batch/read"
        for n, start in enumerate(range(0, len(companies), ASSOCIATIONS_MAX), 1):
            body = self.client.post_json(
                path, {"inputs": [{"id": c} for c in companies[start : start + ASSOCIATIONS_MAX]]}
            )
            self._checked(AssociationsPage, body, path, n)
            for result in body["results"]:
                deals.update(str(t["toObjectId"]) for t in result["to"])
        return deals

    def _status_filter(self, open_set: bool) -> tuple[list[dict[str, Any]] | None, bool]:
        """(search filters that select the set, or None when the set is empty; whether each page must still be
        filtered by the resolved status).

        With the pipelines the status of a deal follows from its stage alone, so the set is a `dealstage IN`
        list, unless a `fields.stage` override feeds a status rule (stage_categories / open_statuses) with
        another property's values. Without the pipelines: the deal's own `hs_is_closed`, or, when rules apply,
        every deal read and filtered here."""
        stages = self.stages()
        rules = bool(self.conn.stage_categories) or self.conn.open_statuses is not None
        if stages and not (rules and "stage" in self.conn.fields):
            ids = [k for k, s in stages.items() if (self.resolve_status(s.label, k, s.category) == "open") == open_set]
            if not ids:
                return None, False
            return [{"propertyName": "dealstage", "operator": "IN", "values": ids}], False
        if not rules:
            closed = "false" if open_set else "true"
            return [{"propertyName": "hs_is_closed", "operator": "EQ", "value": closed}], False
        return [], True

    def _split_keyset(
        self, base: list[dict[str, Any]], properties: list[str]
    ) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
        """A full read split in the `hs_object_id` space: the first page is read alone (its `total` is the set's
        count); the deals after its last id are read as `degree` id ranges (`hs_object_id GT lo` and `LTE hi`,
        the last open-ended; widths from the first page's density), each its own keyset read in id order, side
        by side (parallel.streams: the ranges' pages interleaved as they arrive; a failing range fails the
        read). Every search still waits its turn at `pace` (5 per second per portal at most, whatever the
        threads), and no range meets the 10,000-result cap: each is paged by its id bound, not `after`."""
        pages = self._keyset(DEAL_SEARCH_PATH, base, properties, self.page_size)
        first = next(pages, None)
        pages.close()  # the next page is asked only by the ranges below
        if first is None:
            return
        yield first
        records, total = first
        rest = (total or 0) - len(records)
        if rest <= 0 or not records:
            return
        ids = [int(r["id"]) for r in records]
        parts = slice_count(self.degree, self.page_size)
        bounds = [math.ceil(b) for b in split_after(ids[0], ids[-1], len(ids), rest, parts)]

        def id_range(i: int) -> Callable[[], Iterator[tuple[list[dict[str, Any]], int | None]]]:
            where = list(base)
            if i + 1 < len(bounds):
                where.append({"propertyName": "hs_object_id", "operator": "LTE", "value": str(bounds[i + 1])})
            return lambda: (
                (found, None)
                for found, _ in self._keyset(DEAL_SEARCH_PATH, where, properties, self.page_size, bounds[i])
            )

        yield from streams([id_range(i) for i in range(len(bounds))], self.degree)

    def _keyset(
        self, path: str, base: list[dict[str, Any]], properties: list[str], limit: int, start: int = 0
    ) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
        """Pages of raw objects (deals, companies) in `hs_object_id` order, each query restarting past the last
        id read; with each page, on the first one the number of objects the whole read matches (search's
        `total`), else None. An empty first page is yielded too (a set of none is counted).

        Never search's `after`: it is an offset, capped at 10,000 results (400 beyond), and an offset shifts
        when a deal leaves the result set while we page (a deal won during a full read of the open set moved
        every later deal up by one, and one of them was never read). An id bound does neither: a deal that
        changes during the read is caught by the run's catch-up read or the next incremental run, and every
        other deal is read exactly once however many match. The id bound is also the paging cursor: it must
        move forward, and the first page's `total` bounds the number of pages."""
        paginator = KeysetPaginator(
            apply=lambda request, last: self._search_request(request, base + [_past(last)], properties, limit),
            after=_last_id,
            more=_more_deals,
            start=start,
            ordered=True,
            key="hs_object_id",
        )
        for fetched in self.pages(
            PageRequest("POST", path),
            paginator,
            model=SearchPage,
            records="results",
            total=lambda page: page.total,
            page_size=min(limit, self.max_page_size),
        ):
            yield fetched.records, (fetched.page.total if fetched.number == 1 else None)

    def _search(self, path: str, filters: list[dict[str, Any]], properties: list[str], limit: int) -> Any:
        """One search sorted by `hs_object_id`, paced (`pace`)."""
        request = self._search_request(PageRequest("POST", path), filters, properties, limit)
        return self.client.post_json(request.url, request.json)

    def _search_request(
        self, request: PageRequest, filters: list[dict[str, Any]], properties: list[str], limit: int
    ) -> PageRequest:
        request.json = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
            "properties": properties,
            "limit": min(limit, self.max_page_size),
        }
        return request

    def _list_pages(self, path: str, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """Pages of a `GET` list paged by `paging.next.after` (archived deals, owners). Each cursor is followed
        once, and a page starting with the record an earlier page started with means the list ignores its
        cursor: such lists carry no count to bound them, so either is a loop."""
        paginator = JSONCursorPaginator(lambda page: page.after)
        for fetched in self.pages(
            PageRequest("GET", path, params=dict(params)), paginator, model=ListPage, records="results", first_id="id"
        ):
            yield fetched.records

    def _checked(self, model: type[PageModel], body: Any, path: str, page: int | None = None) -> Any:
        return check_page(model, body, crm=self.crm, url=self.client.url(path), page=page)

    def _properties(self) -> list[str]:
        """The standard properties the portal has (all of them when discovery was refused: HubSpot leaves out
        requested properties that do not exist), then the configured ones."""
        known = self._deal_properties
        return fields_to_read([n for n in DEAL_PROPERTIES if known is None or n in known], self.conn)

    # -- companies ---------------------------------------------------------------------------------------------

    def enrich(self, records: list[dict[str, Any]]) -> dict[str, tuple[str | None, dict[str, Any]]]:
        """Each deal's primary company: deal id -> (company id, its properties), one v4 association read per
        page and one batch read of the companies not seen yet in this run (optional: refused once, scope
        crm.objects.companies.read, not asked again). The pipelines and owners `_map` names stages and owners
        with are read here too (once per run)."""
        if any((r.get("properties") or {}).get("dealstage") for r in records):
            self.stages()
        self._owner_map()
        primary: dict[str, str | None] = {}
        companies: dict[str, dict[str, Any]] = {}
        if not self._companies_refused:
            got = self.optional(
                COMPANIES_READ, lambda: self._primary_companies(records), None, fallback_text=COMPANIES_FALLBACK
            )
            if got is None:
                self._companies_refused = True
            else:
                primary, companies = got
        return {
            r["id"]: (cid, companies.get(cid, {})) if (cid := primary.get(r["id"])) else (None, {}) for r in records
        }

    def _primary_companies(
        self, records: list[dict[str, Any]]
    ) -> tuple[dict[str, str | None], dict[str, dict[str, Any]]]:
        """Each deal's primary company id, and the page's companies: those kept (lookups.py: one query), then
        one batch read of the rest."""
        ids = [r["id"] for r in records]
        primary: dict[str, str | None] = {}
        path = "/crm/v4/associations/deals/companies/batch/read"
        for n, start in enumerate(range(0, len(ids), ASSOCIATIONS_MAX), 1):
            body = self.client.post_json(path, {"inputs": [{"id": i} for i in ids[start : start + ASSOCIATIONS_MAX]]})
            self._checked(AssociationsPage, body, path, n)
            for result in body["results"]:
                primary[result["from"]["id"]] = _primary_company(result["to"])
        companies = self._companies.load({c for c in primary.values() if c})
        missing = sorted({c for c in primary.values() if c and c not in companies})
        path = "/crm/v3/objects/companies/batch/read"
        for n, start in enumerate(range(0, len(missing), BATCH_MAX), 1):
            chunk = missing[start : start + BATCH_MAX]
            body = self.client.post_json(path, {"properties": COMPANY_PROPERTIES, "inputs": [{"id": c} for c in chunk]})
            self._checked(BatchPage, body, path, n)
            for company in body["results"]:
                self._companies[company["id"]] = companies[company["id"]] = _company(company)
        return primary, companies

    # -- mapping -----------------------------------------------------------------------------------------------

    def _display(self, prop: str, value: Any) -> str | None:
        """A property's value as users see it: an enumeration's option label, an owner property's owner name."""
        if value is None or value == "":
            return None
        text = str(value)
        meta = (self._deal_properties or {}).get(prop)
        if not meta:
            return clean_text(text)
        if meta.get("referencedObjectType") == "OWNER":
            owner = (self._owners or {}).get(text)
            return owner.name if owner and owner.name else text
        for option in meta.get("options") or []:
            if str(option.get("value")) == text:
                return clean_text(option.get("label")) or text
        return clean_text(text)

    @classmethod
    def read_value(cls, record: dict[str, Any], native: str) -> Any:
        """The deal property as HubSpot returned it (`raw["properties"]`)."""
        return _get(record, native)

    def read_text(self, record: dict[str, Any], native: str) -> str | None:
        return self._display(native, _get(record, native))

    def _map(
        self, rec: dict[str, Any], enriched: dict[str, tuple[str | None, dict[str, Any]]] | None = None
    ) -> Opportunity:
        props = rec.get("properties") or {}
        company_id, company = (enriched or {}).get(rec["id"], (None, {}))
        raw = {**rec, "associations": {"companies": [company_id] if company_id else []}}
        fields = self.conn.fields
        stage_id = props.get("dealstage") or None
        info = self._stage_info(props.get("pipeline"), stage_id)
        if info is not None:
            flags: Status = info.category
            stage_name = info.label
        else:
            closed, won = props.get("hs_is_closed") == "true", props.get("hs_is_closed_won") == "true"
            flags = "open" if not closed else ("won" if won else "lost")
            stage_name = self._display("dealstage", stage_id)
        if "stage" in fields:  # another property holds the stage users work with: its value is the stage id
            stage_id = props.get(fields["stage"]) or None
            stage_name = self._display(fields["stage"], stage_id)
        owner_id = props.get("hubspot_owner_id") or None
        owner = (self._owners or {}).get(owner_id) if owner_id else None
        values = self.mapped_fields(
            rec,
            client_name=lambda: clean_text(company.get("name")),
            sales_executive=lambda: owner.name if owner else None,
        )
        # the deal's stage probability is a 0..1 fraction; without one, the stage's own (pipelines)
        prob = values["probability"]
        if prob is not None and self.field("probability") in ("hs_deal_stage_probability", "hs_forecast_probability"):
            prob = prob * 100
        if prob is None and info is not None and "probability" not in fields:
            prob = info.probability
        values["probability"] = None if prob is None else round(prob, 4)
        status = self.resolve_status(stage_name, props.get("dealstage") or None, flags)
        closed_at, closed_field = close_time(props, status)
        return self.opportunity(
            rec["id"],
            raw,
            **values,
            service_location=format_address(
                *(company.get(k) for k in ("address", "address2", "city", "state", "zip", "country"))
            ),
            owner_crm_id=owner_id,
            stage=stage_name,
            stage_id=stage_id,
            crm_status=props.get("dealstage") or None,
            status=status,
            currency=props.get("deal_currency_code") or None,
            # HubSpot converts `amount` only: a connection reading its amount elsewhere gets no base amount
            amount_base=None if "amount" in self.conn.fields else parse_float(props.get("amount_in_home_currency")),
            base_currency=self._company_currency,
            account_id=str(company_id) if company_id else None,  # the deal's primary company
            modified_at=parse_datetime(props.get("hs_lastmodifieddate")),
            crm_closed_at=closed_at,
            crm_closed_at_field=closed_field,
        )

    # -- deletes -----------------------------------------------------------------------------------------------

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        params = {"archived": "true", "limit": min(self.page_size, LIST_MAX), "properties": "hs_object_id"}
        for records in self._list_pages(DEALS_PATH, params):
            page = []
            for r in records:
                at = parse_datetime(r.get("archivedAt"))
                if since is None or at is None or at >= since:
                    page.append((r["id"], at))
            if page:
                yield page

    # -- read by id -------------------------------------------------------------------------------------------

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """The live deals among `ids`, read with `POST /crm/v3/objects/deals/batch/read` (100 inputs per
        request, `archived=false`): no search, so neither the connection's filters nor a stage set apply, and
        the search's per-second limit is not spent. Same properties, owners and companies as `opportunities`."""
        self.prepare()
        properties = self._properties()
        self._owner_map()
        wanted = list(dict.fromkeys(str(i) for i in ids))  # once each, in the caller's order
        for n, start in enumerate(range(0, len(wanted), BATCH_MAX), 1):
            records = self._batch_read(wanted[start : start + BATCH_MAX], properties, n)
            if records:
                yield self.map_page(records)

    def _batch_read(self, ids: list[str], properties: list[str], n: int) -> list[dict[str, Any]]:
        """One batch read (the n-th of this `fetch_by_ids`). Ids HubSpot no longer has (deleted, archived,
        never existed) come back as an OBJECT_NOT_FOUND entry of `errors` in a 207 Multi-Status answer next to
        the found `results` (developers.hubspot.com, "Multi-status errors"): absent, not an error. Any other
        entry fails the run, and so does an answer of the wrong shape (an id missing from it would be taken
        as deleted)."""
        # `archived` is a query parameter of batch/read (HubSpot's OpenAPI spec), not a body field
        body = self.client.post_json(
            DEAL_BATCH_READ_PATH,
            {"properties": properties, "inputs": [{"id": i} for i in ids]},
            params={"archived": "false"},
        )
        self._checked(BatchPage, body, DEAL_BATCH_READ_PATH, n)
        other = [e for e in body.get("errors", []) if e["category"] != "OBJECT_NOT_FOUND"]
        if other:
            first = other[0]
            raise CrmError(
                f"HubSpot refused part of a deal batch read ({len(other)} error(s)): "
                f"{first['category']}: {str(first.get('message') or '')[:300]}",
                status=400,
                code=first["category"] or "BATCH_ERROR",
                permanent=True,
            )
        asked = set(ids)
        return [r for r in body["results"] if r["id"] in asked]

    def matches_filters(self, opp: Opportunity) -> bool:
        return all(self._matches(f, opp.raw) for f in self.conn.filters)

    def _matches(self, f: RecordFilter, raw: dict[str, Any]) -> bool:
        """A filter evaluated in Python as deal search evaluates it: date properties compare as instants
        (a filter value may be epoch milliseconds, an ISO date or a date-time), booleans as "true" / "false",
        text case-insensitively; numbers as numbers (the shared `matches`)."""
        date_like = self._is_date_property(f.field)
        return matches(_search_form(f, date_like), _fold(self.filter_value(raw, f.field), date_like))

    def _is_date_property(self, name: str) -> bool:
        meta = (self._deal_properties or {}).get(name) or {}
        return name in DATE_FIELDS or meta.get("type") in ("datetime", "date")

    # -- filters -----------------------------------------------------------------------------------------------

    def _render_filters(self) -> tuple[list[dict[str, Any]], list[RecordFilter]]:
        """Search filters for the connection's filters (values travel as JSON strings: nothing to inject);
        those past the per-group limit are applied after fetching."""
        room = MAX_FILTERS_PER_GROUP - 3  # dealstage, the modified-since bound, the keyset bound
        pushed = [render_filter(f) for f in self.conn.filters[:room]]
        return pushed, list(self.conn.filters[room:])


def render_filter(f: RecordFilter) -> dict[str, Any]:
    op = _OPS[f.op]
    if f.op == "in":
        return {"propertyName": f.field, "operator": "IN", "values": [_value(f.field, v) for v in f.value]}
    if f.value is None:
        return {"propertyName": f.field, "operator": "NOT_HAS_PROPERTY" if op == "EQ" else "HAS_PROPERTY"}
    return {"propertyName": f.field, "operator": op, "value": _value(f.field, f.value)}


def _value(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if field in DATE_FIELDS:
        if isinstance(value, datetime):
            return str(_ms(value))
        text = str(value)
        if not text.isdigit():
            dt = parse_datetime(text) if len(text) > 10 else datetime.combine(parse_date(text), datetime.min.time())
            return str(_ms(dt))
        return text
    return str(value)


def _last_id(fetched: Fetched) -> int | None:
    """The next search starts after the page's last object in the server's order (not the page's largest id: a
    stray object repeated from another page must not move the bound past ones not yet read)."""
    return int(fetched.records[-1]["id"]) if fetched.records else None


def _more_deals(fetched: Fetched) -> bool:
    """An empty page ends the read. The last page has no `paging.next`; one without it whose `total` says more
    remain past this position is read past (the id bound needs no cursor from the server)."""
    page = fetched.page
    return bool(page.results) and not (page.after is None and page.total <= len(page.results))


def _past(last_id: int) -> dict[str, Any]:
    """The keyset bound: objects after the last one read."""
    return {"propertyName": "hs_object_id", "operator": "GT", "value": str(last_id)}


def _ms(dt: datetime | None) -> int:
    return (to_utc(dt) - EPOCH) // timedelta(milliseconds=1)  # type: ignore[arg-type]


def _company(company: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a company: the properties the mapping reads that have a value (HubSpot adds
    hs_object_id, createdate and hs_lastmodifieddate to every answer)."""
    props = company.get("properties") or {}
    return {k: props[k] for k in COMPANY_PROPERTIES if props.get(k) not in (None, "")}


def _primary_company(to: list[dict[str, Any]]) -> str | None:
    """One company per deal: v4 lists a company once per association type set, v3 once per type; the Primary
    (typeId 5) wins, else the first."""
    first: str | None = None
    for t in to:
        cid = str(t.get("toObjectId", t.get("id")))
        types = t.get("associationTypes") or []
        if any(a.get("typeId") == PRIMARY_TYPE_ID for a in types) or t.get("type") == "deal_to_company":
            return cid
        first = first or cid
    return first


def _fold(value: Any, date_like: bool) -> Any:
    """One side of a comparison in the form deal search compares it."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if date_like:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, datetime.min.time())
        try:
            return parse_datetime(value) if isinstance(value, (str, int, float, datetime)) else value
        except ValueError:  # not a date: HubSpot would refuse such a filter; compare it as text
            return str(value).lower()
    if isinstance(value, str) and parse_float(value) is None:
        return value.lower()
    return value


def _search_form(f: RecordFilter, date_like: bool) -> RecordFilter:
    """The filter with its value(s) in the form `_fold` gives the record's value."""
    if f.op == "in":
        return f.model_copy(update={"value": [_fold(v, date_like) for v in f.value]})
    return f.model_copy(update={"value": _fold(f.value, date_like)})


def close_time(props: dict[str, Any], status: Status) -> tuple[datetime | None, str | None]:
    """(when the deal closed, the property that said it) for a won / lost deal; (None, None) while open or when
    no property has a value. HubSpot's date-times are UTC ISO strings (`2024-06-11T09:12:44.123Z`); a date-only
    value (`2024-06-11`, a property written as a date) is taken as 00:00 UTC of that day."""
    for name in CLOSE_TIME_FIELDS.get(status, ()):
        value = props.get(name)
        if value not in (None, ""):
            return parse_datetime(value), name
    return None, None


def _get(raw: dict[str, Any], field: str) -> Any:
    return (raw.get("properties") or {}).get(field)
