"""Microsoft Dynamics 365 Sales / Dataverse Web API v9.2 (docs/crm-api-notes.md §3; docs/crms/dynamics.md).

Auth: Entra ID client credentials (`POST {authority}/{tenant}/oauth2/v2.0/token`, scope `<org url>/.default`),
sent through `Auth.token_request` so it is counted; no refresh token exists in this flow, so a 401 mid-paging
fetches a new token and repeats the request.
Discovery (once per run, `discover_tenant`): the opportunity's attribute metadata (custom columns, the stage id
column, configured overrides checked before the first query), the currency dictionary, and whether the API user
may expand the account lookup. Each optional read that is refused (403 0x80040220 "missing prvRead...") is a
warning with a fallback, never a failed run; the opportunity reads are required.
Stage model: `stage` = the business process stage as the record shows it (`stepname`, the Pipeline Phase; or the
column `fields.stage` names, by its formatted value), `stage_id` = `stageid` (the process stage's id),
`crm_status` = the Status Reason's label (the statuscode formatted value, else the status metadata), `status` =
`resolve_status` over the Status (`statecode` 0 Open, 1 Won, 2 Lost). `fetch_stages()` = the tenant's process
stages (`processstages`), `fetch_statuses()` = the status reasons with their state.
Open set: `statecode eq 0` (not-open: `statecode ne 0`); with `open_statuses` (status reason labels or values, or
stage names): the matching status reasons and stage names, and its negation.
Incremental: `modifiedon ge <since>` ordered by `modifiedon,opportunityid`, paged with `Prefer:
odata.maxpagesize` and `@odata.nextLink` used verbatim.
Pages and counts (issue 22): every answer is checked against its model (below) before use and every paging
sequence goes through a PageTrail (pages.py). Every opportunity query asks `$count=true`: `@odata.count`, capped
at 5,000, bounds the paging; a full read of a larger set asks `count()` (`$apply` aggregate, exact up to 50,000,
in createdon ranges beyond), which the sync compares with the ids it received before inferring deletes.
Deletes (`options.change_tracking: true`): Dataverse hard-deletes, and only change tracking reports deletions.
The delta link is the connector's `resume_token`, which the sync layer stores in `oppsync.sync_state` between
runs; without one (first run, or `options.delta_link` unset) `deleted()` runs an initial
`Prefer: odata.track-changes` read that only establishes a baseline (no deletions on that call). An expired
delta token (7 days by default) starts a new baseline; full syncs detect deletions by id diff anyway.
Close time (`crm_closed_at`): `actualclosedate`, which WinOpportunity / LoseOpportunity set from the close
activity's date. It is Date Only (`YYYY-MM-DD`, no time zone), read as 00:00 of that date (naive UTC), and only for
records whose statecode says closed: reopening does not clear it, so an open record may carry an old close date.
Under column security the API user may read it empty (attribute metadata `IsSecured`): those closes are then dated
by modifiedon in the reconcile. The `opportunityclose` activity's `actualend` is not read (see docs/crms/dynamics.md).
By id (`fetch_by_ids`): `Microsoft.Dynamics.CRM.In(PropertyName='opportunityid',PropertyValues=[...])`, 100 ids per
request (about 4.6 KB of a GET URL Dataverse caps at 32,768 characters), same $select / $expand / owner names as the
opportunity reads, without the connection's filters; deleted records are hard-deleted, so simply absent.
Options: authority_url (default https://login.microsoftonline.com), scope (default `<base_url>/.default`),
change_tracking, delta_link, request_limit (service-protection window size used for quota stats, 6000).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, NotRequired, TypeVar

import requests
from pydantic import Field, Strict, StringConstraints, model_validator
from typing_extensions import TypedDict

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import ConnectorOptions, CrmConnector, Page
from oppsync_pipeline.lib.crm.fields import FieldMap, configured_fields, fields_to_read
from oppsync_pipeline.lib.crm.http import Auth, AuthError, CrmError, QuotaExhausted, RequestStats, json_object
from oppsync_pipeline.lib.crm.pages import PageError, PageModel, PageTrail, check_page
from oppsync_pipeline.lib.crm.paging import JSONLinkPaginator, PageRequest
from oppsync_pipeline.lib.crm.parallel import in_background, slice_count, split_after, streams
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
from oppsync_pipeline.lib.scrub import scrubbed_logger

API = "/api/data/v9.2"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
LOOKUP_TABLE = "@Microsoft.Dynamics.CRM.lookuplogicalname"  # the table a polymorphic lookup points at
ANNOTATIONS = (
    'odata.include-annotations="OData.Community.Display.V1.FormattedValue,Microsoft.Dynamics.CRM.lookuplogicalname"'
)
SELECT = (
    "opportunityid",
    "name",
    "estimatedvalue",
    "estimatedclosedate",
    "closeprobability",
    "statecode",
    "statuscode",
    "stepname",
    "salesstage",
    "_parentaccountid_value",
    "_customerid_value",
    "_ownerid_value",
    "createdon",
    "_createdby_value",
    "modifiedon",
    "_transactioncurrencyid_value",
    # the estimated value in the organization's base currency, converted by Dataverse at the record's exchangerate
    "estimatedvalue_base",
)
# The CRM's own record of when a closed opportunity closed, in the order read (first non-empty wins).
CLOSE_TIME = ("actualclosedate",)
# Ids per by-id request: 100 GUIDs are ~4.6 KB of percent-encoded In(...) literals, far below the 32,768-character
# GET URL limit (execute-batch-operations-using-web-api.md) even with a long $select / $expand.
BY_ID_BATCH = 100
STAGE_ID = "stageid"  # the business process stage's id: a Uniqueidentifier column (a lookup, _stageid_value, in some)
ACCOUNT_SELECT = (
    "name",
    "address1_line1",
    "address1_line2",
    "address1_line3",
    "address1_city",
    "address1_stateorprovince",
    "address1_postalcode",
    "address1_country",
)
ACCOUNT_EXPAND = f"parentaccountid($select={','.join(ACCOUNT_SELECT)})"
ATTRIBUTES = f"{API}/EntityDefinitions(LogicalName='opportunity')/Attributes"
STATUS_METADATA = (
    f"{API}/EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='statuscode')/"
    "Microsoft.Dynamics.CRM.StatusAttributeMetadata"
)
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
STATES: dict[int, Status] = {0: "open", 1: "won", 2: "lost"}
# The opportunity's out-of-the-box status reasons (docs/crm-api-notes.md §3.5): the fallback when the status metadata is
# refused (custom status reasons are then known by their formatted labels only).
DEFAULT_STATUS_REASONS = (
    StageInfo("1", "In Progress", False, False, 0),
    StageInfo("2", "On Hold", False, False, 1),
    StageInfo("3", "Won", True, True, 2),
    StageInfo("4", "Canceled", True, False, 3),
    StageInfo("5", "Out-Sold", True, False, 4),
)
PRIVILEGE = re.compile(r"missing (prv\w+) privilege.*?for entity '(\w+)'", re.S)
UNKNOWN_PROPERTY = re.compile(r"Could not find a property named '([^']+)'")
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})$")
# Publisher-prefixed custom columns (new_x, cr123_x, msdyn_x) and their lookup form (_new_x_value).
log = scrubbed_logger(__name__)
CUSTOM = re.compile(r"^(_[a-z][a-z0-9]{1,7}_[a-z0-9_]+_value|[a-z][a-z0-9]{1,7}_[a-z0-9_]+)$")
NUMERIC = frozenset(
    {
        "estimatedvalue",
        "closeprobability",
        "statecode",
        "statuscode",
        "salesstage",
        "exchangerate",
        "actualvalue",
        "budgetamount",
        "versionnumber",
    }
)
DATETIMES = frozenset({"createdon", "modifiedon", "overriddencreatedon"})
DATES = frozenset({"estimatedclosedate", "actualclosedate"})
OPS = {"equal": "eq", "not_equal": "ne", "more_than": "gt", "less_than": "lt", "at_least": "ge", "at_most": "le"}
# Full reads and incremental reads both page in this order (a stable order for the paging cookie).
ORDER = "modifiedon asc,opportunityid asc"
# A full read's order: createdon never changes, so a record edited while a split read runs cannot move from a
# range not read yet into one already read (modifiedon would move it, and its absence would read as a delete).
FULL_ORDER = "createdon asc,opportunityid asc"
# `$count=true` counts at most this many records (count-rows.md): @odata.count 5000 means "5000 or more".
COUNT_CAP = 5000
# `$apply=.../aggregate($count as count)` aggregates at most 50,000 records (aggregate-data.md); beyond that
# Dataverse refuses the query with this error code ("AggregateQueryRecordLimit exceeded").
AGGREGATE_LIMIT_CODE = "0x8004E023"
# Halvings of the createdon range when counting a set too large for one aggregate: 2^20 ranges is far more than
# any tenant needs (50,000 records each); deeper means many records share one createdon second.
MAX_COUNT_SPLITS = 20


# -- page models: what each answer must hold before one value of it is used (pages.py) --------------------------

Guid = Annotated[str, StringConstraints(pattern=GUID.pattern)]
Count = Annotated[int, Strict(), Field(ge=0)]
R = TypeVar("R")


class Collection(PageModel, Generic[R]):
    """A Dataverse collection page: `value` (the rows) and, when more follow, `@odata.nextLink`."""

    value: list[R]
    next_link: str | None = Field(None, alias="@odata.nextLink")


class OpportunityRow(TypedDict):
    opportunityid: Guid


class OpportunityPage(Collection[OpportunityRow]):
    """An opportunity query's page; `@odata.count` when `$count=true` was asked (capped at COUNT_CAP)."""

    count: Count | None = Field(None, alias="@odata.count")


DeletedRow = TypedDict(
    "DeletedRow", {"@odata.context": Annotated[str, StringConstraints(pattern=r"/\$deletedEntity$")], "id": Guid}
)


class ChangesPage(Collection[DeletedRow | OpportunityRow]):
    """A change-tracking page: changed rows and `$deletedEntity` rows; every page but the last links the next,
    and the last carries the delta link for the next run (a page with neither is not an end, it is broken)."""

    delta_link: str | None = Field(None, alias="@odata.deltaLink")

    @model_validator(mode="after")
    def _links_on(self) -> ChangesPage:
        if not self.next_link and not self.delta_link:
            raise ValueError(
                "neither @odata.nextLink nor @odata.deltaLink: a change-tracking read ends with a delta link"
            )
        return self


class CountRow(TypedDict):
    count: Count


class CountAnswer(PageModel):
    """`$apply=...aggregate($count as count)`: one row holding the count."""

    value: Annotated[list[CountRow], Field(min_length=1, max_length=1)]


class CreatedRow(TypedDict):
    createdon: datetime


class AttributeRow(TypedDict):
    LogicalName: str
    AttributeType: NotRequired[str | None]
    IsSecured: NotRequired[bool | None]


class CurrencyRow(TypedDict):
    transactioncurrencyid: Guid


class OrganizationRow(TypedDict):
    organizationid: Guid
    _basecurrencyid_value: NotRequired[Guid | None]


class StageRow(TypedDict):
    processstageid: Guid


class UserRow(TypedDict):
    systemuserid: Guid


class TeamRow(TypedDict):
    teamid: Guid


class StatusOption(TypedDict):
    Value: Annotated[int, Strict()]
    State: NotRequired[int | None]


class OptionSet(TypedDict):
    Options: list[StatusOption]


class StatusMetadata(PageModel):
    OptionSet: OptionSet


class EntraAuth(Auth):
    """Client credentials against Entra ID; the token is fetched lazily and again on 401 or near expiry."""

    refreshable = True

    def __init__(
        self,
        authority: str,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        scope: str,
        timeout: tuple[float, float] = (10.0, 60.0),
    ):
        self.token_url = f"{authority.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"
        self._form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
            "scope": scope,
        }
        self.timeout = timeout
        self.token: str | None = None
        self.expires_at = 0.0

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if self.token is None or time.monotonic() > self.expires_at - 60:
            self.refresh(session)
        headers["Authorization"] = f"Bearer {self.token}"

    def refresh(self, session: requests.Session) -> None:
        try:
            resp = self.token_request(
                session,
                "POST",
                self.token_url,
                data=self._form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.RequestException as err:
            raise CrmError(f"Entra ID token endpoint unreachable: {type(err).__name__}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or "access_token" not in body:
            codes = body.get("error_codes") or []
            # error_description names the app id, never the secret; keep only the first line (no trace ids).
            desc = str(body.get("error_description", "")).split("\r\n")[0][:200]
            raise AuthError(
                f"Entra ID refused the client credentials (HTTP {resp.status_code} "
                f"{body.get('error', 'error')}{' AADSTS' + str(codes[0]) if codes else ''}): {desc}",
                status=resp.status_code,
                code=str(body.get("error")),
            )
        self.token = body["access_token"]
        self.expires_at = time.monotonic() + float(body.get("expires_in", 3599))


# -- observe / classify -----------------------------------------------------------------------------------------


def observe(response: requests.Response, stats: RequestStats, limit: int = 6000) -> None:
    """Service protection: requests left in the 5-minute window -> quota used / limit."""
    remaining = response.headers.get("x-ms-ratelimit-burst-remaining-xrm-requests")
    if remaining is not None:
        try:
            left = int(remaining.replace(",", ""))
        except ValueError:
            return
        stats.quota_limit = limit
        stats.quota_used = max(0, limit - left)


def classify(response: requests.Response, max_wait: float = 300.0) -> Exception | None:
    """A 429 is retried after Retry-After, unless it asks to wait longer than a run can (then the run ends as
    skipped). An aggregate over too many records is its own error (AGGREGATE_LIMIT_CODE). 400 / 403 / 404 are
    permanent: see `explain` for the message."""
    if response.status_code == 429:
        try:
            wait = float(response.headers.get("Retry-After", "0"))
        except ValueError:
            wait = 0.0
        if wait >= max_wait:
            return QuotaExhausted(
                f"Dataverse service protection limit reached; retry after {wait:.0f}s",
                status=429,
                code=_error_code(response),
            )
    elif response.status_code >= 400 and (_error_code(response) or "").lower() == AGGREGATE_LIMIT_CODE.lower():
        # Not retried whatever the status: `count()` counts such a set in parts.
        return CrmError(
            f"Dataverse refused an aggregate over more than 50,000 records (HTTP {response.status_code} "
            f"{AGGREGATE_LIMIT_CODE})",
            status=response.status_code,
            code=AGGREGATE_LIMIT_CODE,
        )
    return None


def explain(
    response: requests.Response, fields: dict[str, str] | None = None, filters: list[RecordFilter] | None = None
) -> CrmError | None:
    """A permanent Dataverse error with what to check: the privilege and table to add to the application
    user's security role (403 0x80040220), the app registration that is not an application user of the
    environment (other 403s), the `fields.*` / `filters[i].field` naming a column the table lacks (400),
    base_url (404)."""
    status = response.status_code
    if status not in (400, 403, 404):
        return None
    code = _error_code(response)
    message = _error_message(response)
    method = (response.request.method if response.request is not None else None) or "GET"
    where = f"{method} {response.request.path_url.split('?', 1)[0] if response.request is not None else ''}"
    # the revenue write-back writes through the same client: its refusals name the write, not a read
    action, access = ("read", "read access") if method == "GET" else ("write", "access")
    if status == 403:
        m = PRIVILEGE.search(message)
        if m:
            text = (
                f"{where}: Dataverse refused the {action} (403 {code}): the application user's security role lacks "
                f"{m.group(1)} ({access} to the '{m.group(2)}' table). Add it to the role assigned to the "
                "app's application user (Power Platform admin center > environment > Settings > Application "
                "users), see docs/crms/dynamics.md"
            )
        else:
            text = (
                f"{where}: Dataverse refused access (403 {code}): the app registration (credentials.client_id) "
                "is not an enabled application user of this environment, or has no security role. Add it "
                "under Power Platform admin center > environment > Settings > Application users, with a role "
                f"that reads opportunities. ({message[:160]})"
            )
        return CrmError(text, status=403, code=code)
    if status == 400:
        m = UNKNOWN_PROPERTY.search(message)
        if m:
            column = m.group(1)
            keys = [f"fields.{k}" for k, v in (fields or {}).items() if v == column]
            keys += [f"filters[{i}].field" for i, f in enumerate(filters or []) if f.field == column]
            check = " and ".join(keys) if keys else "the connection's fields: and filters:"
            text = (
                f"{where}: this Dataverse environment has no column or navigation property '{column}' "
                f"(400 {code}): check {check} against the table's columns (`oppsync config check --online` "
                "lists them; custom columns carry the publisher prefix, e.g. new_region)"
            )
        elif method != "GET":
            text = f"{where}: Dataverse refused the write (400 {code}): {message[:200]}"
        else:
            text = (
                f"{where}: Dataverse refused the query (400 {code}): {message[:200]}. Check the connection's "
                "filters:, fields: and options against this environment"
            )
        return CrmError(text, status=400, code=code)
    if method != "GET":
        return CrmError(f"{where}: not found (404 {code}): {message[:200]}", status=404, code=code)
    return CrmError(
        f"{where}: not found (404 {code}): check base_url, the environment URL "
        f"(https://<org>.crm.dynamics.com, without /api/data). {message[:160]}",
        status=404,
        code=code,
    )


def _error_code(response: requests.Response) -> str | None:
    error = json_object(response).get("error")
    return str(error["code"]) if isinstance(error, dict) and "code" in error else None


def _error_message(response: requests.Response) -> str:
    error = json_object(response).get("error")
    return str(error["message"]) if isinstance(error, dict) and "message" in error else response.text[:300]


class _RequiredReadFailed(Exception):
    """The account expand probe met a refused opportunity read: the required read's error, not an optional one."""

    def __init__(self, error: CrmError):
        super().__init__(str(error))
        self.error = error


class DynamicsOptions(ConnectorOptions):
    """`options:` of a Dynamics 365 (Dataverse) connection."""

    authority_url: str = "https://login.microsoftonline.com"
    scope: str | None = None  # default <base_url>/.default
    change_tracking: bool = False  # the delete feed (Dataverse change tracking)
    delta_link: str | None = None  # a change-tracking delta link to start from
    request_limit: Annotated[int, Field(gt=0)] = 6000  # the service protection limit per 5 minutes
    incremental_account_names: bool = True


class DynamicsConnector(CrmConnector):
    Options = DynamicsOptions
    # service protection: "52 or more concurrent requests" per user are refused; full reads split the date space
    # into at most 51 ranges (fewer: parallel.slice_count keeps their pages under its read-ahead)
    read_concurrency = 51
    sets_side_by_side = True  # $expand brings the account: mapping caches only the dictionaries, read once
    id_field = "opportunityid"
    # text fields are read as users see them (formatted values); the account's and the owner's names are derived
    field_map = FieldMap(
        project_name="name",
        client_name=None,
        sales_executive=None,
        stage="stepname",
        amount="estimatedvalue",
        close_date="estimatedclosedate",
        probability="closeprobability",
        created_at="createdon",
        created_by_crm_id="_createdby_value",
    )
    filters_ignore_case = True  # SQL Server's default collation
    crm = "dynamics"
    max_page_size = 5000
    # A Dataverse row with its formatted-value annotations is ~2.5 kB of JSON (Salesforce's ~1 kB), and a full
    # read holds a few pages at once (the one being staged, the next ones read ahead): at 5,000 a page (12 MB of
    # JSON, ~35 MB decoded) a 100,000-opportunity full sync peaked at 594-644 MB, at 2,000 at 474-481 MB (the
    # memory benchmark), for 2.5x the page requests (50 instead of 20 per 100,000: well inside the service
    # protection limits). `connections[].page_size` still asks for up to 5,000.
    default_page_size = 2000
    native_deletes = True
    known_fields = frozenset(SELECT) | frozenset(
        {
            "description",
            "actualvalue",
            "actualclosedate",
            "budgetamount",
            "exchangerate",
            "_owninguser_value",
            "_owningteam_value",
            "_modifiedby_value",
            "overriddencreatedon",
            "versionnumber",
            "stageid",
            "_campaignid_value",
            "_originatingleadid_value",
        }
    )

    delta_link: str | None = None
    delete_feed_needs_baseline = True
    # What discovery learned (per run): column -> AttributeType (None: metadata refused), the stage id column,
    # currency id -> ISO code, whether the account lookup may be expanded.
    _attributes: dict[str, str] | None = None
    _secured: frozenset[str] = frozenset()  # columns under column security (metadata IsSecured)
    _close_columns: tuple[str, ...] = CLOSE_TIME  # the close-time columns this environment has
    _stage_id_column: str | None = STAGE_ID
    _currencies: dict[str, str] | None = None
    _base_currency: str | None = None  # organization.basecurrencyid as an ISO code
    _expand_account = False
    _users: list[CrmUser] | None = None

    @property
    def resume_token(self) -> str | None:
        return self.delta_link if self.options.change_tracking else None

    @resume_token.setter
    def resume_token(self, value: str | None) -> None:
        if value:
            self.delta_link = value

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return bool(CUSTOM.match(name))

    def make_auth(self) -> Auth:
        opts = self.conn.options
        return EntraAuth(
            opts.get("authority_url", "https://login.microsoftonline.com"),
            self.credentials["tenant_id"],
            self.credentials["client_id"],
            self.credentials["client_secret"],
            opts.get("scope", f"{self.conn.base_url}/.default"),
        )

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats, self.options.request_limit)

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response) or explain(response, self.conn.fields, self.conn.filters)

    # -- requests -------------------------------------------------------------------------------------------------

    def in_flight_key(self, method: str, path: str) -> Hashable | None:
        """Service protection counts concurrent requests per user (the application user: every request but the
        token's, which the client sends apart): never more than `degree` (51) in flight, reads ahead included."""
        return "user"

    def _headers(self, *prefer: str) -> dict[str, str]:
        return {
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            "Prefer": ",".join((f"odata.maxpagesize={self.page_size}", *prefer)),
        }

    def _unpaged_headers(self) -> dict[str, str]:
        """Without odata.maxpagesize: Dataverse ignores $top next to it."""
        return {k: v for k, v in self._headers().items() if k != "Prefer"}

    def _get(self, model: Any, url: str, *, page: int | None = None, **kwargs: Any) -> Any:
        """One answer, checked against `model` before any value of it is used."""
        body = self.client.get_json(url, **kwargs)
        check_page(model, body, crm=self.crm, url=self.client.url(url), page=page)
        return body

    def _pages(
        self,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        model: Any,
        trail: PageTrail | None = None,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """Follow @odata.nextLink verbatim (same Prefer header) until the last page. Each page is checked against
        `model` (a Collection) before it is yielded; `trail` fails the run on a next link followed before (the
        query itself included) and on more pages than the count it was given allows (`options`: paginate's)."""
        request = PageRequest("GET", url, params=params, headers=headers)
        for fetched in self.pages(
            request, JSONLinkPaginator(_next_link, root=API), model=model, records="value", trail=trail, **options
        ):
            yield fetched.body

    def _rows(self, path: str, params: dict[str, str], row: Any) -> list[dict[str, Any]]:
        return [
            r for body in self._pages(f"{API}/{path}", params, self._headers(), Collection[row]) for r in body["value"]
        ]

    # -- discovery ------------------------------------------------------------------------------------------------

    def discover_tenant(self) -> None:
        attributes = self.optional(
            "opportunity attribute metadata",
            self._read_attributes,
            None,
            fallback_text="(needs prvReadEntity) standard opportunity columns assumed (stage id from stageid); "
            "configured custom columns are selected unchecked",
        )
        self._attributes = attributes
        if attributes is not None:
            custom = sorted(c for c in attributes if self.is_custom_field(c))
            self.note("custom columns", True, ", ".join(custom) or "none in this environment")
            self._stage_id_column = next((c for c in (STAGE_ID, f"_{STAGE_ID}_value") if c in attributes), None)
            self.note(
                "stage id",
                self._stage_id_column is not None,
                self._stage_id_column or "no stageid column: stage_id left empty",
            )
            self._close_columns = tuple(c for c in CLOSE_TIME if c in attributes)
            missing = [f"{key}: '{native}'" for key, native in configured_fields(self.conn) if native not in attributes]
            if missing:
                raise CrmError(
                    "this Dataverse environment's opportunity table has no column "
                    + "; ".join(missing)
                    + ": correct these keys (custom columns carry the publisher "
                    "prefix, lookups the _<name>_value form; `oppsync config check --online` lists "
                    "the columns)",
                    status=400,
                    code="UNKNOWN_COLUMN",
                )
        # once the configured columns are known to be there: three reads that depend on nothing before them, sent
        # side by side; each answer (or error) is taken at its turn below, as if it had been asked then
        currencies = in_background(self._read_currencies)
        organization = in_background(self._read_organization)
        probe = in_background(self._probe_account_expand)
        self._note_close_time()
        self._currencies = self.optional(
            "transaction currencies",
            currencies,
            {},
            fallback_text="(needs prvReadTransactionCurrency) currency left empty",
        )
        self._base_currency = self.optional(
            "base currency (organization.basecurrencyid)",
            lambda: self._base_currency_of(organization()),
            None,
            fallback_text="base_currency left empty (amount_base still read from estimatedvalue_base)",
        )
        try:
            self._expand_account = self.optional(
                "account $expand (client address)",
                probe,
                False,
                fallback_text="(needs prvReadAccount) client_name from the account lookup's formatted value; "
                "service_location left empty",
                refusals=(400, 403, 404),
            )
        except _RequiredReadFailed as failed:
            raise failed.error from None

    def _read_attributes(self) -> dict[str, str]:
        """Column (as the Web API names it: lookups as _<name>_value) -> AttributeType; the secured columns are
        kept aside (`IsSecured`: column-level security, readable to everyone per column-level-security.md)."""
        body = self._get(
            Collection[AttributeRow],
            ATTRIBUTES,
            params={"$select": "LogicalName,AttributeType,IsCustomAttribute,IsSecured"},
            headers=self._headers(),
        )
        out, secured = {}, set()
        for a in body["value"]:
            name, kind = a["LogicalName"], str(a.get("AttributeType") or "")
            column = f"_{name}_value" if kind in LOOKUP_TYPES else name
            out[column] = kind
            if a.get("IsSecured"):
                secured.add(column)
        self._secured = frozenset(secured)
        return out

    def _note_close_time(self) -> None:
        """What `crm_closed_at` will come from in this environment. A secured actualclosedate is still selected:
        a field security profile may grant the API user read, and without one Dataverse answers it empty (not an
        error), which leaves the close dated by modifiedon."""
        name = "close time (actualclosedate)"
        if not self._close_columns:
            self.note(name, False, "no actualclosedate column: closes dated by modifiedon")
        elif self._attributes is None:
            self.note(name, True, "assumed present (attribute metadata not readable); Date Only, read as 00:00 UTC")
        elif set(self._close_columns) & self._secured:
            text = (
                "actualclosedate is column-secured in this environment: unless the application user's field "
                "security profile grants read, Dataverse returns it empty and closes are dated by modifiedon "
                "(closed_at_source 'modified_at')"
            )
            self.stats.warn(f"{name}: {text}")
            self.note(name, False, text)
        else:
            self.note(name, True, "Date Only, read as 00:00 UTC of that date")

    def _read_currencies(self) -> dict[str, str]:
        rows = self._rows("transactioncurrencies", {"$select": "transactioncurrencyid,isocurrencycode"}, CurrencyRow)
        return {str(r["transactioncurrencyid"]).lower(): r.get("isocurrencycode") for r in rows}

    def _read_organization(self) -> list[dict[str, Any]]:
        return self._rows("organizations", {"$select": "_basecurrencyid_value"}, OrganizationRow)

    def _base_currency_of(self, rows: list[dict[str, Any]]) -> str | None:
        """The ISO code of the environment's base currency: the one every `*_base` Money column is in."""
        base_id = rows[0].get("_basecurrencyid_value") if rows else None
        return (self._currencies or {}).get(str(base_id).lower()) if base_id else None

    def _probe_account_expand(self) -> bool:
        """One row with the account expanded: Dataverse answers 403 when the API user may not read accounts and
        400 when the environment does not expose the navigation property. (No odata.maxpagesize here: Dataverse
        ignores $top next to it.) A refused opportunity read is the required read failing, not this one."""
        try:
            self._get(
                Collection[OpportunityRow],
                f"{API}/opportunities",
                params={"$select": "opportunityid", "$top": "1", "$expand": ACCOUNT_EXPAND},
                headers=self._unpaged_headers(),
            )
        except CrmError as err:
            if "prvReadOpportunity" in str(err):
                raise _RequiredReadFailed(err) from None
            raise
        return True

    # -- stages, statuses and users -------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        """The business process stages of the opportunity's processes (key = processstageid, label = the name).
        They carry no open / won meaning: statecode decides."""

        def read() -> list[StageInfo]:
            rows = self._rows(
                "processstages",
                {
                    "$select": "processstageid,stagename,stagecategory,_processid_value",
                    "$filter": "primaryentitytypecode eq 'opportunity'",
                },
                StageRow,
            )
            rows.sort(key=lambda r: (str(r.get("_processid_value") or ""), r.get("stagecategory") or 0))
            return [
                StageInfo(
                    key=str(r["processstageid"]).lower(),
                    label=str(r.get("stagename") or ""),
                    is_closed=False,
                    is_won=False,
                    sort_order=i,
                )
                for i, r in enumerate(rows)
            ]

        return self.optional(
            "business process stages (processstages)",
            read,
            [],
            fallback_text="(needs prvReadWorkflow) crm_stages left empty; each record's stage "
            "(stepname) and stage id are still read",
        )

    def fetch_statuses(self) -> list[StageInfo]:
        def read() -> list[StageInfo]:
            body = self._get(
                StatusMetadata,
                STATUS_METADATA,
                params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"},
                headers=self._headers(),
            )
            out = []
            for i, opt in enumerate(body["OptionSet"]["Options"]):
                label = ((opt.get("Label") or {}).get("UserLocalizedLabel") or {}).get("Label") or str(opt["Value"])
                state = int(opt.get("State") or 0)
                out.append(
                    StageInfo(key=str(opt["Value"]), label=label, is_closed=state != 0, is_won=state == 1, sort_order=i)
                )
            return out

        return self.optional(
            "status reason metadata (statuscode)",
            read,
            list(DEFAULT_STATUS_REASONS),
            fallback_text="(needs prvReadEntity) crm_status from the records' formatted values, "
            "status from statecode; "
            "open_statuses matched against the default status reasons only",
        )

    def users(self) -> Iterable[CrmUser]:
        with self._once:  # read once, whichever read's page needs the owners' names first
            return self._read_users()

    def _read_users(self) -> list[CrmUser]:
        if self._users is None:
            self.prepare()
            people = self.optional(
                "systemusers",
                lambda: [
                    CrmUser(
                        u["systemuserid"],
                        clean_text(u.get("fullname")),
                        u.get("internalemailaddress"),
                        kind="user",
                        active=not u.get("isdisabled", False),
                    )
                    for u in self._rows("systemusers", {"$select": "fullname,internalemailaddress,isdisabled"}, UserRow)
                ],
                [],
                fallback_text="(needs prvReadUser) owners and creators kept as ids; owner names from the "
                "records' formatted values",
            )
            teams = self.optional(
                "teams",
                lambda: [
                    CrmUser(t["teamid"], clean_text(t.get("name")), None, kind="team")
                    for t in self._rows("teams", {"$select": "name"}, TeamRow)
                ],
                [],
                fallback_text="(needs prvReadTeam) team owners kept as ids; their names from the records' "
                "formatted values",
            )
            self._users = people + teams
        return self._users

    # -- opportunities --------------------------------------------------------------------------------------------

    def _select(self) -> str:
        """The columns every opportunity read asks for: the mapping's, the close time, the `fields:` overrides,
        and the filtered columns (so a record read by id can be checked against the filters in Python)."""
        stage_id = [self._stage_id_column] if self._stage_id_column else []
        # a path through a navigation property ("a/b") is no column to $select
        return ",".join(
            c for c in fields_to_read([*SELECT, *stage_id, *self._close_columns], self.conn) if "/" not in c
        )

    def open_filter(self, open_set: bool) -> str | None:
        """The open (or not-open) set as a $filter clause; "" for every record, None when the set is empty."""
        if self.conn.open_statuses is None:
            return "statecode eq 0" if open_set else "statecode ne 0"
        names = set(self.conn.open_statuses)
        statuses = self.statuses()
        codes = [k for k, s in statuses.items() if k in names and k.isdigit() or s.label in names]
        known = set(codes) | {statuses[k].label for k in codes}
        stage_names = sorted(n for n in names if n not in known and not n.isdigit())
        clauses = []
        if codes:
            clauses.append(
                "Microsoft.Dynamics.CRM.In(PropertyName='statuscode',PropertyValues=["
                + ",".join(f"'{k}'" for k in codes)
                + "])"
            )
        if stage_names:
            clauses.append(
                "Microsoft.Dynamics.CRM.In(PropertyName='stepname',PropertyValues=["
                + ",".join(literal("stepname", n) for n in stage_names)
                + "])"
            )
        if not clauses:
            return None if open_set else ""
        either = " or ".join(clauses)
        return either if open_set else f"not ({either})"

    def query_filter(self, open_set: bool, since: datetime | None) -> str | None:
        clause = self.open_filter(open_set)
        if clause is None:
            return None
        parts = [clause] if clause else []
        if since is not None:
            stamp = to_utc(since).strftime("%Y-%m-%dT%H:%M:%SZ")
            if self._expand_account:
                # A renamed or moved account leaves the opportunity's modifiedon as it was: ask for those too.
                parts.append(f"modifiedon ge {stamp} or parentaccountid/modifiedon ge {stamp}")
            elif self._account_changes_visible():
                parts.append(f"modifiedon ge {stamp}")
        parts += [render_filter(f) for f in self.conn.filters]
        return " and ".join(f"({p})" if " or " in p else p for p in parts)

    def _account_changes_visible(self) -> bool:
        """Without read access to accounts an incremental read cannot ask which accounts were renamed (their
        names reach the records only as lookup display names, and renames leave the opportunity's modifiedon
        as it was): such runs re-read every opportunity, unless `options.incremental_account_names: false`."""
        if not self.options.incremental_account_names:
            return True
        self.stats.warn(
            "incremental read: accounts are not readable, so account renames cannot be asked for; "
            "every opportunity is re-read (grant read access to accounts, or set "
            "options.incremental_account_names: false to accept renames arriving with full syncs)"
        )
        return False

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        """Pages of one set. Every query asks `$count=true` (no extra request): under COUNT_CAP the first page's
        @odata.count bounds the paging and, in a full read, is the CRM's count the sync checks what it received
        against; over it a full read asks `count()` once (an incremental read stays unbounded by a count)."""
        self.prepare()
        flt = self.query_filter(open_set, since)
        if flt is None:
            return
        trail = PageTrail(self.crm, self.client.url(f"{API}/opportunities"))
        pages = self._opportunity_pages(
            flt,
            trail,
            orderby=ORDER if since is not None else FULL_ORDER,
            total=lambda page: self._set_size(open_set, since, page.count),
            page_size=self.page_size,
        )
        for body in self._split(flt, trail, pages) if since is None and self.degree > 1 else pages:
            rows = body["value"]
            self.tally(open_set, since, (r["opportunityid"] for r in rows), trail.total)
            page = self.map_page(rows)
            if page:
                yield page

    def _split(self, flt: str, trail: PageTrail, pages: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A full read split in the date space: the first page is read alone (its count bounds the set); what
        comes after it is read as createdon ranges of whole seconds, each its own query and `@odata.nextLink`
        cursor, side by side (parallel.streams: each range in the query's order (createdon, opportunityid), the
        ranges' pages interleaved as they arrive; a failing range fails the read). Widths follow the first page's
        density; the last range is open-ended; the first starts at the second the first page ended in, without
        the records of that second the first page already held (by id)."""
        first = next(pages, None)
        pages.close()  # the next page is asked only by the ranges below
        if first is None:
            return
        yield first
        rows = first["value"]
        rest = (trail.total or 0) - len(rows)
        if not rows or (rest <= 0 and "@odata.nextLink" not in first):
            return
        stamps = [to_utc(parse_datetime(r["createdon"])).replace(tzinfo=UTC).timestamp() for r in rows]
        start = math.floor(stamps[-1])
        read = {r["opportunityid"] for r, at in zip(rows, stamps, strict=True) if at >= start}
        parts = slice_count(self.degree, self.page_size)
        bounds = [start] + [math.ceil(b) for b in split_after(stamps[0], start, len(rows), max(rest, 1), parts)[1:]]

        def time_range(i: int) -> Callable[[], Iterator[dict[str, Any]]]:
            at = [datetime.fromtimestamp(b, UTC) for b in bounds]
            cond = created_between(at[i], at[i + 1] if i + 1 < len(at) else None)

            def run() -> Iterator[dict[str, Any]]:
                slice_trail = PageTrail(self.crm, self.client.url(f"{API}/opportunities"))
                slice_trail.expect(trail.total, self.page_size)  # the set's count bounds every range
                for body in self._opportunity_pages(_and(flt, cond), slice_trail, orderby=FULL_ORDER):
                    if i == 0:
                        body = {**body, "value": [r for r in body["value"] if r["opportunityid"] not in read]}
                    yield body

            return run

        yield from streams([time_range(i) for i in range(len(bounds))], self.degree)

    def _set_size(self, open_set: bool, since: datetime | None, counted: int | None) -> int | None:
        if counted is not None and counted < COUNT_CAP:
            return counted
        return self.count(open_set) if since is None else None

    def count(self, open_set: bool) -> int | None:
        """The set's size as Dataverse counts it now, with the same $filter as `opportunities(open_set, None)`:
        `$apply=filter(...)/aggregate($count as count)`, which is exact up to 50,000 records (`$count=true` stops
        at 5,000); a larger set is counted in createdon ranges, halved until each fits."""
        self.prepare()
        flt = self.query_filter(open_set, None)
        if flt is None:
            return 0
        n = self._aggregate_count(flt)
        if n is not None:
            return n
        span = self._created_span(flt)
        return 0 if span is None else self._count_in_ranges(flt, None, None, span, 0)

    def _aggregate_count(self, flt: str) -> int | None:
        """One aggregate count; None when the set is larger than Dataverse aggregates."""
        apply = f"filter({flt})/aggregate($count as count)" if flt else "aggregate($count as count)"
        try:
            body = self._get(
                CountAnswer, f"{API}/opportunities", params={"$apply": apply}, headers=self._unpaged_headers()
            )
        except CrmError as err:
            if err.code == AGGREGATE_LIMIT_CODE:
                return None
            raise
        return body["value"][0]["count"]

    def _created_span(self, flt: str) -> tuple[datetime, datetime] | None:
        """The first and the last createdon of the set (None when it is empty)."""
        ends = []
        for direction in ("asc", "desc"):
            params = {"$select": "createdon", "$orderby": f"createdon {direction}", "$top": "1"}
            if flt:
                params["$filter"] = flt
            url = f"{API}/opportunities"
            body = self.client.get_json(url, params=params, headers=self._unpaged_headers())
            rows = check_page(Collection[CreatedRow], body, crm=self.crm, url=self.client.url(url)).value
            if not rows:
                return None
            ends.append(to_utc(rows[0]["createdon"]))
        return ends[0], ends[1]

    def _count_in_ranges(
        self, flt: str, lo: datetime | None, hi: datetime | None, span: tuple[datetime, datetime], depth: int
    ) -> int | None:
        """The set's records created in [lo, hi) (open ends: None), in halves while a half is too large to
        aggregate. None, with a warning, when records created within one second are too many to count."""
        if lo is not None or hi is not None:
            n = self._aggregate_count(_and(flt, created_between(lo, hi)))
            if n is not None:
                return n
        a, b = lo or span[0], hi or span[1]
        mid = a + timedelta(seconds=int((b - a).total_seconds() // 2))
        if mid <= a or depth >= MAX_COUNT_SPLITS:
            self.stats.warn(
                f"the CRM's count of a set is not available: more records created around "
                f"{a:%Y-%m-%d %H:%M:%S} than Dataverse aggregates at once; deletes are inferred "
                "without it"
            )
            return None
        left = self._count_in_ranges(flt, lo, mid, span, depth + 1)
        right = self._count_in_ranges(flt, mid, hi, span, depth + 1) if left is not None else None
        return None if right is None else left + right

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """The records of `ids` Dataverse still has, without the connection's filters or an open / closed
        restriction, BY_ID_BATCH ids per request. Ids that are not GUIDs cannot name a Dataverse record (and
        would make the query a 400): they are absent like deleted ones. An answer holding a record that was not
        asked for means the id filter was not applied: absent ids would look deleted, so it fails the run."""
        self.prepare()
        wanted = list(dict.fromkeys(str(i).lower() for i in ids if GUID.match(str(i))))
        for start in range(0, len(wanted), BY_ID_BATCH):
            batch = wanted[start : start + BY_ID_BATCH]
            trail = PageTrail(self.crm, self.client.url(f"{API}/opportunities"))
            trail.expect(len(batch), self.page_size)
            for body in self._opportunity_pages(by_id_filter(batch), trail):
                rows = body["value"]
                _only_asked(rows, set(batch), trail)
                page = self.map_page(rows)
                if page:
                    yield page

    @classmethod
    def filter_value(cls, raw: dict[str, Any], field: str) -> Any:
        """The value Dataverse compares: the raw column (never its formatted label); lookups and GUIDs in lower
        case, as `literal` renders them."""
        value = cls.read_value(raw, field)
        if isinstance(value, str) and GUID.match(value):
            return value.lower()
        return value

    def _opportunity_pages(
        self, flt: str, trail: PageTrail, orderby: str | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:
        """One opportunity query's pages (checked, bounded by `trail`; `options`: paginate's)."""
        params = {"$select": self._select(), "$count": "true"}
        if orderby:
            params["$orderby"] = orderby
        if flt:
            params["$filter"] = flt
        if self._expand_account:
            params["$expand"] = ACCOUNT_EXPAND
        return self._pages(
            f"{API}/opportunities", params, self._headers(ANNOTATIONS), OpportunityPage, trail, **options
        )

    def enrich(self, rows: list[dict[str, Any]]) -> dict[str, str | None] | None:
        """What mapping the page reads besides its rows: the status reasons and the process stages (once per
        run, when a row needs them), and the owners' names from the users when a row's owner has no formatted
        value (read once, when a page needs them): owner id -> name, or None when no row needs it."""
        if any(r.get("statuscode") is not None for r in rows):
            self.statuses()
        if (
            "stage" not in self.conn.fields
            and self._stage_id_column
            and any(r.get(self._stage_id_column) for r in rows)
        ):
            self.stages()
        needs_users = any(r.get(f"_ownerid_value{FORMATTED}") is None and r.get("_ownerid_value") for r in rows)
        return {u.crm_user_id: u.name for u in self.users()} if needs_users else None

    def read_text(self, record: dict[str, Any], native: str) -> str | None:
        return _text(record, native)

    def _map(self, row: dict[str, Any], enriched: dict[str, str | None] | None = None) -> Opportunity:
        """One row; `enriched`: owner id -> name from the users (when the page's formatted values lack one)."""
        account = row.get("parentaccountid") or None
        owner = row.get("_ownerid_value")
        overrides = self.conn.fields
        code = row.get("statuscode")
        info = (self._statuses or {}).get(str(code)) if code is not None else None
        crm_status = (
            clean_text(row.get(f"statuscode{FORMATTED}"))
            or (info.label if info else None)
            or (None if code is None else str(code))
        )
        state = row.get("statecode")
        flags: Status = STATES.get(state, "open") if state is not None else (info.category if info else "open")
        stage_id = row.get(self._stage_id_column) if self._stage_id_column else None
        stage_id = str(stage_id).lower() if stage_id else None
        if "stage" in overrides:
            stage = _text(row, overrides["stage"])
        else:
            known = (self._stages or {}).get(stage_id) if stage_id else None
            stage = clean_text(row.get("stepname")) or (known.label if known else None)
        currency_id = row.get("_transactioncurrencyid_value")
        status = self._status(stage, crm_status, code, flags)
        closed_at, closed_field = self._closed_at(row, status, state)
        values = self.mapped_fields(
            row,
            client_name=lambda: clean_text(
                (account or {}).get("name") or row.get(f"_parentaccountid_value{FORMATTED}")
            ),
            sales_executive=lambda: clean_text(row.get(f"_ownerid_value{FORMATTED}") or (enriched or {}).get(owner)),
        )
        return self.opportunity(
            row["opportunityid"],
            row,
            **values,
            service_location=clean_text(_address(account)),
            owner_crm_id=owner,
            stage=stage,
            stage_id=stage_id,
            crm_status=crm_status,
            status=status,
            currency=(self._currencies or {}).get(str(currency_id).lower()) if currency_id else None,
            # Dataverse converts estimatedvalue (a connection reading its amount elsewhere gets no base amount)
            amount_base=None if "amount" in overrides else parse_float(row.get("estimatedvalue_base")),
            base_currency=self._base_currency,
            account_id=_account_id(row),
            modified_at=parse_datetime(row.get("modifiedon")),
            crm_closed_at=closed_at,
            crm_closed_at_field=closed_field,
        )

    def _closed_at(self, row: dict[str, Any], status: Status, state: Any) -> tuple[datetime | None, str | None]:
        """When a closed record closed, and the column that said so. Only where both the resolved status and the
        CRM's statecode say closed: actualclosedate survives a reopen, so on a record Dataverse has open (even
        one the connection counts as closed through `open_statuses`) it is a stale date. Date Only values are
        00:00 of that date."""
        if status == "open" or state not in (1, 2):
            return None, None
        for column in self._close_columns:
            value = parse_datetime(row.get(column))
            if value is not None:
                return value, column
        return None, None

    def _status(self, stage: str | None, crm_status: str | None, code: Any, flags: Status) -> Status:
        """`resolve_status`, with `open_statuses` also accepting status reason values (statuscode numbers)."""
        opened = self.conn.open_statuses
        if (
            opened is not None
            and code is not None
            and str(code) in opened
            and not any(n in self.conn.stage_categories for n in (stage, crm_status) if n is not None)
        ):
            return "open"
        return self.resolve_status(stage, crm_status, flags)

    # -- deletions (change tracking) -----------------------------------------------------------------------------

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        if not self.options.change_tracking:
            return
        link = self.delta_link or self.options.delta_link
        if link is None:
            self._track_changes_baseline()
            return
        trail = PageTrail(self.crm, link)
        try:
            for body in self._pages(link, None, self._headers("odata.track-changes"), ChangesPage, trail):
                gone = [
                    (row["id"], None)
                    for row in body["value"]
                    if str(row.get("@odata.context", "")).endswith("/$deletedEntity")
                ]
                if gone:
                    yield gone
                self.delta_link = body.get("@odata.deltaLink") or self.delta_link
        except CrmError as err:
            if trail.pages or err.status != 400:
                raise
            # The stored delta token is no longer accepted (expired after 7 days, or change tracking was reset):
            # start a new baseline. Deletes in the gap are found by the next full sync.
            log.warning("Dataverse refused the stored delta link (%s); starting a new baseline", err.code)
            self.delta_link = None
            self._track_changes_baseline()

    def _track_changes_baseline(self) -> None:
        """Page through the tracked set (ids only) to get a delta link; no deletions are reported by it."""
        for body in self._pages(
            f"{API}/opportunities", {"$select": "opportunityid"}, self._headers("odata.track-changes"), ChangesPage
        ):
            self.delta_link = body.get("@odata.deltaLink") or self.delta_link


def _next_link(page: Collection[Any]) -> str | None:
    """A collection's next page: `@odata.nextLink`, used verbatim (it carries the query and the paging cookie)."""
    return page.next_link or None


def by_id_filter(ids: Sequence[str]) -> str:
    """`opportunityid` in `ids` (lower-case GUIDs, already validated) with the Dataverse query function."""
    values = ",".join(f"'{i}'" for i in ids)
    return f"Microsoft.Dynamics.CRM.In(PropertyName='opportunityid',PropertyValues=[{values}])"


def _only_asked(rows: list[dict[str, Any]], asked: set[str], trail: PageTrail) -> None:
    unasked = [r["opportunityid"] for r in rows if r["opportunityid"].lower() not in asked]
    if unasked:
        raise PageError(
            f"records that were not asked for ({', '.join(unasked[:3])}"
            f"{' ...' if len(unasked) > 3 else ''}) in an answer to a read by id: the id filter was "
            "not applied",
            crm=trail.crm,
            url=trail.url,
            page=trail.pages,
        )


def created_between(lo: datetime | None, hi: datetime | None) -> str:
    """createdon in [lo, hi), either end open when None."""
    parts = ([f"createdon ge {literal('createdon', lo)}"] if lo else []) + (
        [f"createdon lt {literal('createdon', hi)}"] if hi else []
    )
    return " and ".join(parts)


def _and(*clauses: str) -> str:
    return " and ".join(f"({c})" for c in clauses if c)


def _account_id(row: dict[str, Any]) -> str | None:
    """The opportunity's account: parentaccountid, else the potential customer where that is an account (the
    Customer lookup is polymorphic: an account or a contact)."""
    parent = row.get("_parentaccountid_value")
    if parent:
        return str(parent).lower()
    customer = row.get("_customerid_value")
    if customer and row.get(f"_customerid_value{LOOKUP_TABLE}") == "account":
        return str(customer).lower()
    return None


def _address(account: dict[str, Any] | None) -> str | None:
    """The account's address in the canonical form: every address1 line, then city, state, postal code, country."""
    if not account:
        return None
    return format_address(*(account.get(k) for k in ACCOUNT_SELECT[1:]))


def _text(row: dict[str, Any], column: str) -> str | None:
    """A column as users see it: the formatted value of an option set or lookup (its label / name), else the value."""
    value = row.get(f"{column}{FORMATTED}")
    if value is None:
        value = row.get(column)
    return None if value is None else clean_text(str(value))


# -- filter rendering ----------------------------------------------------------------------------------------------


def literal(field: str, value: Any) -> str:
    """An OData literal for `value`, injection-safe: only numbers, GUIDs and ISO dates go unquoted (after a strict
    match); everything else is a single-quoted string with quotes doubled."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, datetime):
        return to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = str(value)
    if field in NUMERIC and NUMBER.match(text):
        return text
    if (field.endswith(("_value", "id"))) and GUID.match(text):
        return text.lower()
    if field in DATES and ISO_DATE.match(text):
        return text
    if field in DATETIMES and (ISO_DATETIME.match(text) or ISO_DATE.match(text)):
        return text if ISO_DATETIME.match(text) else text + "T00:00:00Z"
    return "'" + text.replace("'", "''") + "'"


def render_filter(f: RecordFilter) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", f.field):
        raise CrmError(f"filter field {f.field!r} is not a Dataverse column name")
    if f.op == "in":
        if not f.value:
            return "opportunityid eq null"  # an empty list matches nothing
        return "(" + " or ".join(f"{f.field} eq {literal(f.field, v)}" for v in f.value) + ")"
    return f"{f.field} {OPS[f.op]} {literal(f.field, f.value)}"
