"""Autotask PSA REST API v1.0 simulator (docs/crm-api-notes.md §5).

What it reproduces:
- Zone discovery: `GET /atservicesrest/v1.0/zoneInformation?user=<username>` (no auth, never faulted or
  throttled) returns `{"zoneName", "url", "webUrl", "ci"}`; `url` is this server's root + `/ATServicesRest/`
  (REST base = url + `V1.0/`). A blank or unknown user gets 500. Paths are case-insensitive like IIS.
- Auth: the three headers `ApiIntegrationCode`, `UserName`, `Secret` on every other call; missing or wrong
  gives 401 with an empty body. Credentials never expire; instead `expire_tokens()` (the `token_expiry` fault)
  moves the tenant to another zone (`/z<N>/ATServicesRest/...`): calls to the old zone get 401 until the client
  looks the zone up again, which is what django-autotask does after a 401.
- `POST /V1.0/{Entity}/query` with `{"MaxRecords": 1..500, "IncludeFields": [...], "filter": [...]}` (ops eq,
  noteq, gt, gte, lt, lte, beginsWith, endsWith, contains, exist, notExist, in, notIn; groups and / or with
  `items`; `"udf": true` for user-defined fields), or `GET ...query?search=<json>`. Results are ordered by id.
  `pageDetails.nextPageUrl` is an absolute `.../query/next?paging=<json>` URL. When the query was a POST the
  next URL carries no `search` and must be POSTed (replaying the body); a GET on it is 405
  `{"Message": "The requested resource does not support http method 'GET'."}` (the silent stop at 500 rows).
  GET-initiated queries get `&search=` in the next URL, and GET works on it. When `IncludeFields` omits `id`
  and there are more than MaxRecords results, no nextPageUrl is given (Autotask requires `id` to page).
- API thread limiting: at most three concurrent requests per object endpoint (the entity) and tracking identifier
  (`ApiIntegrationCode`); a fourth in flight is refused with 429 in the error shape below (the help page
  documents the limit, not the body [U]). `in_flight.peak` records the most ever in flight (tests).
- `POST|GET /V1.0/{Entity}/query/count` -> `{"queryCount": n}`.
- `GET /V1.0/Opportunities/entityInformation/fields` with picklists whose `value` is a STRING;
  `.../entityInformation/userDefinedFields`.
- Entities: Opportunities, Companies, Contacts, Resources, Countries (query, count, `GET /{Entity}/{id}` ->
  `{"item": ...}`). Writes: `POST /V1.0/Opportunities` (create, `{"itemId": id}`), `PATCH` / `PUT
  /V1.0/Opportunities` with `id` in the body -> 200 `{"itemId": id}` (docs/crm-write-webhook-notes.md §5.1).
  Field names are matched without regard to case (Autotask's own PUT sample sends `"Name"`; [S]); a name the
  entity does not have, a value of the wrong type, null for amount / cost, a missing id or an unknown id are
  500 `{"errors": [...]}`; read-only fields (createDate, lastActivity, creatorResourceID) are ignored (SOAP's
  documented behaviour; REST's is [U]). PUT replaces the record: the required fields must all be sent, and the
  stored fields left out (contact, revenue fields) are nulled. The revenue fields (`cost`, `onetimeRevenue` / `onetimeCost`,
  monthly / quarterly / semiannual / yearly Revenue and Cost, `totalAmountMonths`, `useQuoteTotals`) are stored
  columns listed in entityInformation/fields: a write changes only the fields sent (the amount through
  `world.update`, so lastActivity moves and the next sync reads it; the others in the record's `extra`).
  Opportunities cannot be deleted through the API (DELETE is 405), so deletions happen only from the control
  side (`world.delete`, `/__sandbox/advance`).
- `lastActivity` is the only change timestamp. A PATCH that only changes user-defined fields does not move it
  (and `advance()` makes silent changes), so incremental syncs miss those until a full sync.
- The hourly request threshold per database (10,000 by default, `threshold=` for tests), counted on the
  virtual clock over a rolling 60 minutes: `GET /V1.0/ThresholdInformation` (not counted) reports it; latency
  is added at 50 % (0.5 s) and 75 % (1 s) of it (scaled by `latency_scale`), and past it every call is 429
  `{"errors": [...]}` with Retry-After.
- Errors: `{"errors": ["..."]}`; query / validation errors are 500 like the real API; framework errors
  (404 / 405) are `{"Message": "..."}`. An API user whose security level lacks access gets 403 with
  `{"errors": ["The logged in Resource does not have the adequate permissions ..."]}`.
- Sales stage vs status: `status` is the world's stage (the status picklist, system values 0-4 plus the tenant's
  own); `stage` is the world's separate `sales_stage` (the tenant's stage picklist). Companies have
  `address1` / `address2` (some a second line, some a street typed over two lines), city, state, postalCode,
  countryID.
- Tenant variants (`VARIANTS`, `build(variant=...)`): default, no_optional_rights (403 on every optional
  read), custom_statuses (relabelled and tenant-defined statuses, stage values that are not 1..n, deals in the
  won stage while the status stays open), udf_fields (other user-defined fields), no_lost_date (an Opportunities
  entity without lostDate), no_edit_rights (a security level without Opportunities: Add / Edit: every write is
  500 `{"errors": ["The logged in Resource does not have the adequate permissions ..."]}`, reads work).
  `truth(sim)` is the tenant as its users see it, for the variant matrix test.
- Close time: `closedDate` (won: status Closed / Implemented) and `lostDate` (lost) are UTC datetimes in the
  same format as `lastActivity`, from the world's `closed_at`; null while open, cleared on a reopen, moved on a
  won <-> lost switch. Never the projected close date.
- By id: `POST /V1.0/Opportunities/query` with `{"op": "in", "field": "id", "value": [...]}`; an `in` / `notIn`
  listing more than 500 values is a 500 query error. Opportunities cannot be deleted through the API, and a
  deleted one (control side) is simply absent from every query: Autotask keeps no recycle bin or tombstone.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote

from oppsync_pipeline.lib.record import format_address, parse_datetime
from oppsync_pipeline.sandbox.kit.formats import fmt_datetime
from oppsync_pipeline.sandbox.kit.limits import InFlight, Window
from oppsync_pipeline.sandbox.kit.snapshots import QueryCache, Snapshots
from oppsync_pipeline.sandbox.server import (
    FaultPlan,
    FaultRule,
    HttpError,
    Request,
    Response,
    Simulator,
)
from oppsync_pipeline.sandbox.world import (
    BASE_CURRENCY,
    EXCHANGE_RATES,
    FIRST,
    LAST,
    Clock,
    SimOpportunity,
    SimStage,
    TenantProfile,
    World,
    truncate,
)

CRM = "autotask"
SANDBOX_CREDENTIALS = {
    "username": "oppsync-api@sandbox.example.com",
    "secret": "Zr4*Lm9~Qx2@Wv7*Tn5k",
    "integration_code": "SANDBOXTRACKINGID0001",
}

OPP_BASE, USER_BASE, COMPANY_BASE, CONTACT_BASE = 29684000, 29682885, 174, 30682000

# Opportunity status picklist (the world's stage key is the status value as a string). Values 0-4 are Autotask's
# system statuses (0 Not Ready To Buy, 1 Active, 2 Lost, 3 Closed = won, 4 Implemented); a tenant may add its own.
STATUSES = [
    SimStage("0", "Not Ready To Buy", False, False, 10.0, 0),
    SimStage("1", "Active", False, False, 50.0, 1),
    SimStage("2", "Lost", True, False, 0.0, 2),
    SimStage("3", "Closed", True, True, 100.0, 3),
    SimStage("4", "Implemented", True, True, 100.0, 4),
    SimStage("5", "On Hold", False, False, 20.0, 5),  # a tenant's own (non-system) status
]
SYSTEM_STATUSES = {"0", "1", "2", "3", "4"}
# Opportunity stage picklist: the tenant's sales stages (Admin > Opportunity Stages), kept apart from the status.
# The flags only tell the world where won / lost deals stand; the API carries none (status decides open / won).
STAGES = [
    SimStage("1", "Prospect", False, False, 10.0, 1),
    SimStage("2", "Qualified", False, False, 30.0, 2),
    SimStage("3", "Proposal", False, False, 50.0, 3),
    SimStage("4", "Negotiation", False, False, 70.0, 4),
    SimStage("5", "Verbal", False, False, 90.0, 5),
    SimStage("6", "Closed Won", True, True, 100.0, 6),
    SimStage("7", "Closed Lost", True, False, 0.0, 7),
]
INACTIVE_STAGES = {"5"}  # retired picklist value: still on old records, still labelled
COUNTRIES = {
    "USA": (237, "US", "United States"),
    "Germany": (82, "DE", "Germany"),
    "UK": (236, "GB", "United Kingdom"),
    "France": (75, "FR", "France"),
    "Japan": (111, "JP", "Japan"),
}
REGIONS = ["West", "East", "EMEA", "APAC", 'O\'Hare "Central"']
UDF_NAMES = ("Region", "Original Create Date", "Original Creator")

# custom_statuses: system statuses relabelled, tenant-defined statuses (open and closed) with values far from the
# defaults, and a stage picklist whose values are not 1..n and whose labels are the tenant's own.
CUSTOM_STATUSES = [
    SimStage("0", "Nurture", False, False, 10.0, 0),
    SimStage("1", "Open", False, False, 50.0, 1),
    SimStage("2", "Lost Deal", True, False, 0.0, 2),
    SimStage("3", "Won", True, True, 100.0, 3),
    SimStage("4", "Implemented", True, True, 100.0, 4),
    SimStage("11", "Awaiting Budget", False, False, 25.0, 5),
    SimStage("12", "Cancelled", True, False, 0.0, 6),
]
CUSTOM_STAGES = [
    SimStage("101", "Discovery", False, False, 10.0, 1),
    SimStage("102", "Demo Given", False, False, 40.0, 2),
    SimStage("103", "Quote Sent", False, False, 60.0, 3),
    SimStage("104", "Closed Won", True, True, 100.0, 4),
    SimStage("105", "Closed Lost", True, False, 0.0, 5),
]
# udf_fields: a tenant with more user-defined fields (and without "Region").
EXTRA_UDF_NAMES = ("Original Create Date", "Original Creator", "Territory", "Deal Source", "Renewal Of")

VARIANTS = {
    "default": "statuses 0-4 plus a tenant status (5 On Hold), stage picklist 1-7 (Prospect .. Closed Lost), "
    "UDFs Region / Original Create Date / Original Creator; the API user has full access",
    "no_optional_rights": 'the API user\'s security level refuses every optional read with 403 {"errors": [...]}: '
    "ThresholdInformation, Companies, Contacts, Resources, Countries, Currencies, "
    "Opportunities/entityInformation/fields and userDefinedFields",
    "custom_statuses": "relabelled system statuses plus tenant statuses 11 Awaiting Budget (open) and 12 Cancelled "
    "(lost); stage picklist 101-105 (Discovery .. Closed Won / Closed Lost); some deals sit in "
    "the won stage while their status stays Open (seed 003)",
    "udf_fields": "user-defined fields Original Create Date, Original Creator, Territory, Deal Source, Renewal Of "
    "(no Region)",
    # The SOAP-era Opportunity entity had ClosedDate and no LostDate (opendns/autotask-php Opportunity.php);
    # whether a REST tenant can still lack lostDate is unconfirmed [U]: this is the tenant the fallback is for.
    "no_lost_date": "the Opportunities entity has closedDate but no lostDate (not in entityInformation/fields, "
    "not on records, a filter on it is a 500): lost opportunities carry no close time",
    # A copy of "API User (system)" with CRM > Object Permissions > Opportunities: Edit = None. Autotask answers a
    # refused write like every failed PATCH: HTTP 500 {"errors": [...]} (REST_Updating_Data_PATCH.htm) with the
    # documented permission message (docs/crm-write-webhook-notes.md §5.1).
    "no_edit_rights": "the API user's security level may view but not add or edit opportunities: POST / PATCH / "
    'PUT Opportunities answer 500 {"errors": ["The logged in Resource does not have the adequate permissions '
    '..."]}; every read works',
}
# What a security level without rights refuses (the optional reads). The body is Autotask's error shape.
OPTIONAL_ENDPOINTS = (
    "thresholdinformation",
    "companies",
    "contacts",
    "resources",
    "countries",
    "currencies",
    "entityinformation/fields",
    "entityinformation/userdefinedfields",
)
NO_RIGHTS = "The logged in Resource does not have the adequate permissions to access this entity or endpoint."
# The Opportunity's revenue fields (REST camelCase, docs/crm-write-webhook-notes.md §5.1: `onetimeRevenue` with a
# lower-case "time"; semiannual exists too): stored columns, each written on its own. Whether Autotask derives
# `amount` from them, or `useQuoteTotals` overrides a written amount / cost, is not documented [U]: not modelled.
REVENUE_FIELDS: dict[str, str] = {
    "cost": "double",
    "onetimeRevenue": "double",
    "onetimeCost": "double",
    "monthlyRevenue": "double",
    "monthlyCost": "double",
    "quarterlyRevenue": "double",
    "quarterlyCost": "double",
    "semiannualRevenue": "double",
    "semiannualCost": "double",
    "yearlyRevenue": "double",
    "yearlyCost": "double",
    "totalAmountMonths": "integer",
    "useQuoteTotals": "boolean",
}
# Non-nullable in the generated clients (Anteris OpportunityEntity.php): a PATCH may not clear them.
NOT_NULL = frozenset({"amount", "cost", "useQuoteTotals"})
# What a create (and a PUT, which replaces the record) must send.
REQUIRED = ("title", "companyID", "ownerResourceID", "status", "amount", "probability", "projectedCloseDate")
# The documented prefix; the rest of a write refusal's wording is not published [U].
NO_EDIT_RIGHTS = "The logged in Resource does not have the adequate permissions to update this entity."


@dataclass(frozen=True)
class Tenant:
    statuses: list[SimStage]
    stages: list[SimStage]
    udf_names: tuple[str, ...] = UDF_NAMES
    refused: frozenset[str] = frozenset()
    won_stage_while_open: bool = False
    # Opportunities fields this tenant's entity does not have: not in entityInformation/fields, not on records,
    # and a filter on them is Autotask's 500 "Unable to find ... in the Opportunity entity".
    absent_fields: frozenset[str] = frozenset()
    # The security level may add and edit opportunities (Opportunities: Add / Edit); reads are unaffected.
    can_edit: bool = True


def tenant(variant: str) -> Tenant:
    if variant not in VARIANTS:
        raise ValueError(f"unknown autotask sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
    if variant == "custom_statuses":
        return Tenant(CUSTOM_STATUSES, CUSTOM_STAGES, won_stage_while_open=True)
    if variant == "udf_fields":
        return Tenant(STATUSES, STAGES, EXTRA_UDF_NAMES)
    if variant == "no_optional_rights":
        return Tenant(STATUSES, STAGES, refused=frozenset(OPTIONAL_ENDPOINTS))
    if variant == "no_lost_date":
        return Tenant(STATUSES, STAGES, absent_fields=frozenset({"lostDate"}))
    if variant == "no_edit_rights":
        return Tenant(STATUSES, STAGES, can_edit=False)
    return Tenant(STATUSES, STAGES)


_ROOT = r"(?:/z(?P<zone>\d+))?/atservicesrest/v1\.0"
# the object endpoint a request calls (thread limiting counts per endpoint): the entity after /V1.0/
_ENDPOINT = re.compile(r"^(?:/z\d+)?/atservicesrest/v1\.0/(\w+)", re.IGNORECASE)
# Autotask help "API thread limiting": integrations created after 2023.1 get three threads per object endpoint
THREAD_LIMIT = 3
_NOT_GET = "The requested resource does not support http method '{}'."


def profile(t: Tenant | None = None) -> TenantProfile:
    t = t or tenant("default")
    return TenantProfile(
        crm=CRM,
        stages=list(t.statuses),
        sales_stages=list(t.stages),
        opportunity_id=lambda seq: str(OPP_BASE + seq),
        user_id=lambda i: str(USER_BASE + i),
        account_id=lambda i: str(COMPANY_BASE + i),
        currencies=("USD",),
        precision=timedelta(milliseconds=10),
        users=25,
    )


def at_datetime(dt: datetime | None) -> str | None:
    """Autotask's UTC datetimes: milliseconds with trailing zeros trimmed (`...44.12Z`, `...44Z`)."""
    return fmt_datetime(dt, ms="trim")


def at_date(d: date | None) -> str | None:
    return fmt_datetime(d)


def _h(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


class Entity:
    """One queryable entity: its rows (as sorted int ids), one field's value, and the rendered record."""

    def __init__(
        self,
        name: str,
        ids: Callable[[], list[int]],
        get: Callable[[int], Any],
        value: Callable[[Any, str, bool], Any],
        render: Callable[[Any], dict[str, Any]],
        fields: dict[str, str],
        udfs: tuple[str, ...] = (),
    ):
        self.name, self.ids, self.get, self.value, self.render, self.fields = name, ids, get, value, render, fields
        self.udfs = udfs


class AutotaskSimulator(Simulator):
    crm = CRM
    unfaulted = re.compile(r"^(/__sandbox/|/atservicesrest/v1\.0/zoneinformation)", re.IGNORECASE)
    route_flags = re.IGNORECASE  # IIS paths

    def __init__(
        self,
        world: World,
        faults: FaultPlan | None = None,
        *,
        threshold: int = 10_000,
        latency_scale: float = 1.0,
        variant: str = "default",
    ):
        super().__init__(world, faults)
        self.variant = variant
        self.tenant = tenant(variant)
        self.threshold = threshold
        self.latency_scale = latency_scale
        self.zone = 1
        self.api_resource = 0  # the API user is resource #0 (creator of API-made records)
        # The rolling hour on the virtual clock; `_window` is its deque (tests fill it to reach the threshold).
        self.requests = Window(lambda: self.threshold, timedelta(minutes=60), world.clock.now)
        self._window = self.requests.times
        # API thread limiting: at most `thread_limit` concurrent requests per object endpoint and tracking
        # identifier (integrations created after 2023.1: three). ZoneInformation is exempt (unfaulted).
        self.thread_limit = THREAD_LIMIT
        self.in_flight = InFlight(lambda: self.thread_limit)
        self.cache = QueryCache()
        self._snapshots = Snapshots(256)
        self.contacts = self._make_contacts()
        # Companies' lastTrackedModifiedDateTime: a rename (world.advance) is noticed on the next read.
        self._company_names = {a.idx: a.name for a in world.accounts}
        self._company_modified = {
            a.idx: truncate(
                world.clock.start - timedelta(days=400 + a.idx % 300, seconds=a.idx), timedelta(milliseconds=10)
            )
            for a in world.accounts
        }
        self.entities = {
            e.name.lower(): e
            for e in (
                self._opportunities_entity(),
                self._companies_entity(),
                self._contacts_entity(),
                self._resources_entity(),
                self._countries_entity(),
                self._currencies_entity(),
            )
        }
        root = _ROOT
        self.route("GET", r"/atservicesrest/v1\.0/zoneinformation", self.zone_information)
        api = functools.partial(self.route, guard=self._guard)
        api(
            "GET",
            root + r"/thresholdinformation",
            self.threshold_information,
            guard=functools.partial(self._guard, counted=False),
        )
        api("GET", root + r"/opportunities/entityinformation/fields", self.entity_fields)
        api("GET", root + r"/opportunities/entityinformation/userdefinedfields", self.udf_fields)
        api("GET", root + r"/opportunities/entityinformation", self.entity_info)
        for method in ("POST", "GET"):
            api(method, root + r"/(?P<entity>\w+)/query/count", self.count)
            api(method, root + r"/(?P<entity>\w+)/query/(?P<direction>next|prev)", self.query_next)
            api(method, root + r"/(?P<entity>\w+)/query", self.query)
        api("GET", root + r"/(?P<entity>\w+)/(?P<id>-?\d+)", self.get_one)
        api("POST", root + r"/opportunities", self.create)
        api("PATCH", root + r"/opportunities", self.update)
        api("PUT", root + r"/opportunities", self.replace)
        api("DELETE", root + r"/opportunities/(?P<id>\d+)", self.delete_refused)

    # -- framework -------------------------------------------------------------------------------------------------

    def error_response(self, err: HttpError) -> Response:
        if err.status in (404, 405):
            return Response.json({"Message": err.message}, err.status, err.headers)
        if err.status == 401:
            return Response(401, b"", dict(err.headers))
        return Response.json({"errors": [err.message]}, err.status, err.headers)

    def in_flight_key(self, req: Request) -> Any:
        """Thread limits count per tracking identifier (ApiIntegrationCode) and object endpoint (the entity)."""
        m = _ENDPOINT.match(req.path)
        return (req.header("apiintegrationcode") or "", m.group(1).lower()) if m else None

    def too_many_in_flight(self, req: Request) -> Response:
        # The help page documents the limit, not the answer's body: a 429 in Autotask's error shape is assumed [U].
        return self.error_response(
            HttpError(
                429,
                "THREAD_LIMIT",
                f"The request was rejected: more than {self.thread_limit} concurrent threads for this object "
                "endpoint and API tracking identifier.",
                {"Retry-After": "1"},
            )
        )

    def rate_limit_response(self, rule: FaultRule) -> Response:
        return Response.json(
            {"errors": ["The request was rejected: the API request threshold has been exceeded."]},
            429,
            {"Retry-After": str(int(rule.seconds))},
        )

    def expire_tokens(self) -> None:
        """Autotask has no tokens; the nearest real event is the database moving to another zone."""
        self.zone += 1

    def zone_base(self, req: Request) -> str:
        host = req.host
        prefix = "" if self.zone == 1 else f"/z{self.zone}"
        return f"http://{host}{prefix}/ATServicesRest/"

    def _guard(self, req: Request, counted: bool = True) -> None:
        self._authenticate(req)
        if counted:
            self._throttle()
        self._refuse_without_rights(req)

    def _authenticate(self, req: Request) -> None:
        ok = (
            req.header("apiintegrationcode") == SANDBOX_CREDENTIALS["integration_code"]
            and (req.header("username") or "").lower() == SANDBOX_CREDENTIALS["username"]
            and req.header("secret") == SANDBOX_CREDENTIALS["secret"]
        )
        if not ok or int(req.params.get("zone") or 1) != self.zone:
            raise HttpError(401, "UNAUTHORIZED", "Unauthorized")

    def _refuse_without_rights(self, req: Request) -> None:
        """A security level without access to an optional entity or endpoint: 403 in Autotask's error shape."""
        if not self.tenant.refused:
            return
        path, entity = req.path.lower().rstrip("/"), (req.params.get("entity") or "").lower()
        if any(entity == key or path.endswith("/" + key) for key in self.tenant.refused):
            raise HttpError(403, "FORBIDDEN", NO_RIGHTS)

    def refused(self, key: str) -> bool:
        """Whether this tenant's API user is refused an optional read (`OPTIONAL_ENDPOINTS` key)."""
        return key in self.tenant.refused

    def _throttle(self) -> None:
        used = self.requests.take()
        if used is None:
            used = self.requests.used()
            raise HttpError(
                429,
                "THRESHOLD",
                f"The request was rejected: {used} requests in the last 60 "
                f"minutes reached the threshold of {self.threshold} for this database.",
                {"Retry-After": "60"},
            )
        share = (used + 1) / self.threshold
        delay = 1.0 if share >= 0.75 else (0.5 if share >= 0.5 else 0.0)
        if delay and self.latency_scale:
            time.sleep(delay * self.latency_scale)

    # -- zone, threshold, entity information -----------------------------------------------------------------------

    def zone_information(self, req: Request) -> Response:
        user = (req.arg("user") or "").strip().lower()
        if user != SANDBOX_CREDENTIALS["username"]:
            raise HttpError(500, "ZONE", "Zone information could not be determined")
        host = req.host
        return Response.json(
            {
                "zoneName": f"America West {self.zone}",
                "url": self.zone_base(req),
                "webUrl": f"http://{host}/",
                "ci": 271828,
            }
        )

    def threshold_information(self, req: Request) -> Response:
        used = self.requests.used()
        return Response.json(
            {
                "externalRequestThreshold": self.threshold,
                "requestThresholdTimeframe": 60,
                "currentTimeframeRequestCount": used,
            }
        )

    def entity_info(self, req: Request) -> Response:
        return Response.json(
            {
                "info": {
                    "name": "Opportunity",
                    "canCreate": True,
                    "canDelete": False,
                    "canQuery": True,
                    "canUpdate": True,
                    "hasUserDefinedFields": True,
                    "supportsWebhookCallouts": False,
                    "userAccessForCreate": "All" if self.tenant.can_edit else "None",
                    "userAccessForDelete": "None",
                    "userAccessForQuery": "All",
                    "userAccessForUpdate": "All" if self.tenant.can_edit else "None",
                }
            }
        )

    def entity_fields(self, req: Request) -> Response:
        def field(
            name: str,
            dtype: str,
            *,
            required: bool = False,
            readonly: bool = False,
            picklist: list[dict[str, Any]] | None = None,
            ref: str = "",
        ) -> dict[str, Any]:
            return {
                "name": name,
                "dataType": dtype,
                "length": 0 if dtype != "string" else 128,
                "isRequired": required,
                "isReadOnly": readonly,
                "isQueryable": True,
                "isReference": bool(ref),
                "referenceEntityType": ref,
                "isPickList": picklist is not None,
                "picklistValues": picklist,
                "picklistParentValueField": "",
                "isSupportedWebhookField": False,
            }

        status_values = [
            {
                "value": s.key,
                "label": s.label,
                "isDefaultValue": s.key == "1",
                "sortOrder": s.order,
                "parentValue": "",
                "isActive": True,
                "isSystem": s.key in SYSTEM_STATUSES,
            }
            for s in self.tenant.statuses
        ]
        first = min(self.tenant.stages, key=lambda s: s.order).key
        stage_values = [
            {
                "value": s.key,
                "label": s.label,
                "isDefaultValue": s.key == first,
                "sortOrder": s.order,
                "parentValue": "",
                "isActive": s.key not in INACTIVE_STAGES,
                "isSystem": False,
            }
            for s in self.tenant.stages
        ]
        types = self.entities["opportunities"].fields
        out = []
        for name, dtype in types.items():
            if name == "status":
                out.append(field(name, dtype, required=True, picklist=status_values))
            elif name == "stage":
                out.append(field(name, dtype, picklist=stage_values))
            else:
                out.append(
                    field(
                        name,
                        dtype,
                        required=name
                        in ("title", "amount", "companyID", "ownerResourceID", "probability", "projectedCloseDate"),
                        readonly=name in ("id", "createDate", "lastActivity", "creatorResourceID"),
                        ref={
                            "companyID": "Company",
                            "contactID": "Contact",
                            "ownerResourceID": "Resource",
                            "creatorResourceID": "Resource",
                        }.get(name, ""),
                    )
                )
        return Response.json({"fields": out})

    def udf_fields(self, req: Request) -> Response:
        return Response.json(
            {
                "fields": [
                    {
                        "name": n,
                        "label": n,
                        "type": "string",
                        "dataType": "string",
                        "length": 100,
                        "isRequired": False,
                        "isReadOnly": False,
                        "isQueryable": True,
                        "isPickList": False,
                        "picklistValues": None,
                        "isActive": True,
                        "isVisibleToClientPortal": False,
                        "displayFormat": 1,
                        "sortOrder": i,
                    }
                    for i, n in enumerate(self.tenant.udf_names)
                ]
            }
        )

    # -- query -----------------------------------------------------------------------------------------------------

    def _entity(self, req: Request) -> Entity:
        name = (req.params.get("entity") or "").lower()
        if name not in self.entities:
            raise HttpError(404, "NOT_FOUND", f"No HTTP resource was found that matches the request URI '{req.path}'.")
        return self.entities[name]

    def _search(self, req: Request) -> tuple[dict[str, Any], bool]:
        """The query body and whether it came as `?search=` (GET)."""
        if req.method == "GET":
            raw = req.arg("search")
            if raw is None:
                raise HttpError(500, "QUERY", "A search parameter is required for a GET query.")
            try:
                return json.loads(raw), True
            except ValueError:
                raise HttpError(500, "QUERY", "The search parameter is not valid JSON.") from None
        try:
            body = req.json()
        except ValueError:
            raise HttpError(500, "QUERY", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise HttpError(500, "QUERY", "The request body must be a query object.")
        return body, False

    def _matching(self, ent: Entity, body: dict[str, Any]) -> list[int]:
        filters = body.get("filter") or body.get("Filter") or []
        if not isinstance(filters, list) or not filters:
            raise HttpError(
                500, "QUERY", 'A query requires at least one filter, e.g. {"op":"gt","field":"id","value":0}.'
            )
        pred = _compile({"op": "and", "items": filters}, ent)
        key = (ent.name, json.dumps(filters, sort_keys=True), self.world.version)

        def compute() -> list[int]:
            with self.world.lock:
                return [i for i in _candidates(ent, filters) if pred(ent.get(i))]

        return self.cache.get_or_compute(key, compute)

    def count(self, req: Request) -> Response:
        ent = self._entity(req)
        body, _ = self._search(req)
        return Response.json({"queryCount": len(self._matching(ent, body))})

    def query(self, req: Request) -> Response:
        ent = self._entity(req)
        body, from_get = self._search(req)
        ids = self._matching(ent, body)
        return self._page(req, ent, body, ids, None, 0, from_get)

    def query_next(self, req: Request) -> Response:
        ent = self._entity(req)
        try:
            paging = json.loads(req.arg("paging") or "")
        except ValueError:
            raise HttpError(500, "QUERY", "The paging parameter is missing or not valid JSON.") from None
        if req.method == "GET" and req.arg("search") is None:
            # The query began as a POST: its next URL carries no search and only accepts POST.
            raise HttpError(405, "METHOD", _NOT_GET.format("GET"))
        body, from_get = self._search(req)
        ids = self._snapshots.get(str(paging.get("snapshot")))
        if ids is None:  # snapshot evicted: re-run the query; id paging stays correct
            ids = self._matching(ent, body)
        token = str(paging.get("snapshot"))
        if (req.params.get("direction") or "next").lower() == "prev":
            size = int(paging.get("pageSize", 500))
            end = bisect.bisect_left(ids, int(paging.get("firstId", 0)))
            start = max(0, end - size)
            return self._page(req, ent, body, ids, token, ids[start - 1] if start else -(2**62), from_get)
        return self._page(req, ent, body, ids, token, int(paging.get("lastId", 0)), from_get)

    def _page(
        self,
        req: Request,
        ent: Entity,
        body: dict[str, Any],
        ids: list[int],
        token: str | None,
        after: int,
        from_get: bool,
    ) -> Response:
        """One page of `ids` after the id `after`. A first page (`token` None) keeps its result set as a snapshot
        only when a next page links to it: a query answered whole in one page (a connector's lookup of 500
        companies by id) would otherwise push out the snapshots of the reads still paging (three id ranges read
        side by side, one of them waiting while another's pages and their lookups are mapped)."""
        size = body.get("MaxRecords", body.get("maxRecords", 500))
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 500:
            raise HttpError(500, "QUERY", f"MaxRecords must be between 1 and 500; got {size!r}.")
        include = body.get("IncludeFields") or body.get("includeFields") or None
        start = bisect.bisect_right(ids, after)
        chunk = ids[start : start + size]
        with self.world.lock:
            items = [ent.render(ent.get(i)) for i in chunk]
        items = [x for x in items if x is not None]
        if include:
            wanted = {f.lower() for f in include}
            items = [{k: v for k, v in it.items() if k.lower() in wanted} for it in items]
        more = start + size < len(ids)
        if token is None and (more or start > 0):
            token = self._snapshots.put(ids)
        next_url = None
        if more and (not include or "id" in {f.lower() for f in include}):
            paging = json.dumps({"pageSize": size, "snapshot": token, "lastId": chunk[-1]}, separators=(",", ":"))
            next_url = f"{self.zone_base(req)}V1.0/{ent.name}/query/next?paging={quote(paging)}"
            if from_get:
                next_url += "&search=" + quote(json.dumps(body, separators=(",", ":")))
        prev_url = None
        if start > 0:
            prev_url = f"{self.zone_base(req)}V1.0/{ent.name}/query/prev?paging=" + quote(
                json.dumps(
                    {"pageSize": size, "snapshot": token, "firstId": chunk[0] if chunk else after},
                    separators=(",", ":"),
                )
            )
            if from_get:
                prev_url += "&search=" + quote(json.dumps(body, separators=(",", ":")))
        return Response.json(
            {
                "items": items,
                "pageDetails": {
                    "count": len(items),
                    "requestCount": size,
                    "prevPageUrl": prev_url,
                    "nextPageUrl": next_url,
                },
            }
        )

    def get_one(self, req: Request) -> Response:
        ent = self._entity(req)
        with self.world.lock:
            obj = ent.get(int(req.params["id"]))
            return Response.json({"item": ent.render(obj) if obj is not None else None})

    # -- writes ----------------------------------------------------------------------------------------------------

    def create(self, req: Request) -> Response:
        self._refuse_edit()
        body = _canonical(req.json() or {})
        missing = [f for f in REQUIRED if body.get(f) is None]
        if missing:
            raise HttpError(500, "VALIDATION", f"Missing required field(s): {', '.join(missing)}.")
        values = self._values(body)
        values["creator"] = self.api_resource
        opp = self.world.create(**values)
        return Response.json({"itemId": int(opp.native_id)})

    def update(self, req: Request) -> Response:
        """PATCH `/V1.0/Opportunities`: the id travels in the body, not the path; only the fields sent change.
        Field names are matched without regard to case (Autotask's own samples send `"Name"`, `"id": "4"`); a
        name the entity does not have is a 500, read-only fields are ignored."""
        self._refuse_edit()
        return self._update(_canonical(req.json() or {}))

    def replace(self, req: Request) -> Response:
        """PUT `/V1.0/Opportunities`: like PATCH, but every writable field left out is nulled (Autotask's PUT
        page), so the required ones must all be sent. Of the fields the sandbox stores: the contact and the
        revenue fields; user-defined fields are left as they are (PUT's effect on them is [U])."""
        self._refuse_edit()
        body = _canonical(req.json() or {})
        missing = [f for f in (*REQUIRED, *sorted(NOT_NULL - {"amount"})) if body.get(f) is None]
        if missing:
            raise HttpError(500, "VALIDATION", f"Missing required field(s): {', '.join(missing)}.")
        return self._update({"contactID": None, **dict.fromkeys(REVENUE_FIELDS), **body})

    def _update(self, body: dict[str, Any]) -> Response:
        try:
            oid = str(int(body.get("id")))
        except (TypeError, ValueError):
            raise HttpError(500, "VALIDATION", "The id field is required to update an Opportunity.") from None
        with self.world.lock:
            opp = self.world.get(oid)
            if opp is None:
                raise HttpError(500, "VALIDATION", f"Opportunity with id {oid} was not found.")
            values = self._values({k: v for k, v in body.items() if k != "id"})
            # Each revenue field is a stored column: writing one (or the amount) leaves the others as they were.
            pinned = {k: v for k, v in self._revenue(opp).items() if k not in (opp.extra or {})}
            # Only user-defined fields changed: Autotask does not record that as activity.
            bump = any(not k.startswith("udf:") for k in values)
            self.world.update(oid, bump=bump, **{**pinned, **values})
        return Response.json({"itemId": int(oid)})

    def _refuse_edit(self) -> None:
        """A security level without Opportunities: Add / Edit: Autotask's failed-write shape, HTTP 500."""
        if not self.tenant.can_edit:
            raise HttpError(500, "PERMISSION", NO_EDIT_RIGHTS)

    def delete_refused(self, req: Request) -> Response:
        raise HttpError(405, "METHOD", _NOT_GET.format("DELETE"))

    def _values(self, body: dict[str, Any]) -> dict[str, Any]:
        w = self.world
        out: dict[str, Any] = {}
        for k, v in body.items():
            if k == "title":
                out["name"] = v
            elif k == "companyID":
                idx = int(v) - COMPANY_BASE
                if not 0 <= idx < len(w.accounts):
                    raise HttpError(500, "VALIDATION", f"Company with id {v} was not found.")
                out["account"] = idx
            elif k == "ownerResourceID":
                idx = int(v) - USER_BASE
                if not 0 <= idx < len(w.users):
                    raise HttpError(500, "VALIDATION", f"Resource with id {v} was not found.")
                out["owner"] = idx
            elif k == "status":
                if str(v) not in w.stages:
                    raise HttpError(500, "VALIDATION", f"Value {v!r} is not a valid picklist value for status.")
                out["stage"] = str(v)
            elif k == "stage":
                if str(v) not in w.sales_stages:
                    raise HttpError(500, "VALIDATION", f"Value {v!r} is not a valid picklist value for stage.")
                out["sales_stage"] = str(v)
            elif k == "amount":
                out["amount"] = _typed(k, "double", v, nullable=False)
            elif k in REVENUE_FIELDS:
                out[k] = _typed(k, REVENUE_FIELDS[k], v, nullable=k not in NOT_NULL)
            elif k == "probability":
                out["prob"] = int(v)
            elif k == "projectedCloseDate":
                out["close_date"] = parse_datetime(v).date()  # type: ignore[union-attr]
            elif k == "contactID":
                out[k] = v
            elif k == "userDefinedFields":
                for udf in v or []:
                    out["udf:" + udf["name"]] = udf.get("value")
            elif k in ("createDate", "lastActivity", "creatorResourceID"):
                continue  # read-only, ignored like the real API
            else:
                raise HttpError(500, "VALIDATION", f"Unable to find {k} in the Opportunity entity.")
        if "prob" in out:  # after the status (which sets the status's default probability)
            out["probability"] = float(out.pop("prob"))
        if "sales_stage" in out:  # after the status (a status change moves the deal to a fitting stage)
            out["sales_stage"] = out.pop("sales_stage")
        return out

    # -- entities --------------------------------------------------------------------------------------------------

    def _make_contacts(self) -> list[dict[str, Any]]:
        out = []
        for a in self.world.accounts:
            for k in range(2):
                i = 2 * a.idx + k
                out.append(
                    {
                        "id": CONTACT_BASE + i,
                        "companyID": int(a.native_id),
                        "firstName": FIRST[_h("cf", i) % len(FIRST)],
                        "lastName": LAST[_h("cl", i) % len(LAST)],
                        "emailAddress": f"contact{i}@example.com",
                        "isActive": 1,
                        "title": None,
                    }
                )
        return out

    def contact_for(self, o: SimOpportunity) -> int | None:
        extra = o.extra or {}
        if "contactID" in extra:
            return extra["contactID"]
        if o.account is None or o.seq % 7 == 0:
            return None
        return CONTACT_BASE + 2 * o.account + o.seq % 2

    def _opportunities_entity(self) -> Entity:
        w = self.world
        fields = {
            "id": "long",
            "title": "string",
            "companyID": "integer",
            "contactID": "integer",
            "ownerResourceID": "integer",
            "creatorResourceID": "integer",
            "amount": "double",
            "cost": "double",
            "probability": "integer",
            "stage": "integer",
            "status": "integer",
            "projectedCloseDate": "datetime",
            "closedDate": "datetime",
            "lostDate": "datetime",
            "startDate": "datetime",
            "createDate": "datetime",
            "lastActivity": "datetime",
            **{k: t for k, t in REVENUE_FIELDS.items() if k != "cost"},
            "opportunityCategoryID": "integer",
            "leadSource": "integer",
            "rating": "integer",
        }
        # closedDate / lostDate: datetimes (the swagger-generated clients type both time.Time: go-autotask
        # entities/opportunities.go), set when the status becomes Closed / Implemented (won) or Lost, from the
        # world's close time; None while open and after a reopen (docs/crm-api-notes.md §5.5).
        absent = self.tenant.absent_fields
        fields = {k: v for k, v in fields.items() if k not in absent}

        def ids() -> list[int]:
            return sorted(int(o.native_id) for o in w.live())

        def get(i: int) -> SimOpportunity | None:
            return w.get(str(i))

        def render(o: SimOpportunity | None) -> dict[str, Any] | None:
            if o is None:
                return None
            status = w.stages[o.stage]
            amount = o.amount if o.amount is not None else 0.0
            rec = {
                "id": int(o.native_id),
                "title": o.name,
                "companyID": int(w.accounts[o.account].native_id) if o.account is not None else 0,
                "contactID": self.contact_for(o),
                "ownerResourceID": int(w.users[o.owner].native_id),
                "creatorResourceID": int(w.users[o.creator].native_id),
                "amount": amount,
                **self._revenue(o),
                "probability": int(round(o.probability)) if o.probability is not None else 0,
                "stage": int(o.sales_stage) if o.sales_stage is not None else None,
                "status": int(o.stage),
                "rating": o.seq % 3 + 1,
                "leadSource": o.seq % 5 + 1,
                "opportunityCategoryID": 1,
                "projectedCloseDate": at_date(o.close_date),
                "closedDate": at_datetime(o.closed_at) if status.is_closed and status.is_won else None,
                "lostDate": at_datetime(o.closed_at) if status.is_closed and not status.is_won else None,
                "startDate": at_date(o.created_at.date()),
                "createDate": at_datetime(o.created_at),
                "lastActivity": at_datetime(o.modified_at),
                "userDefinedFields": [{"name": n, "value": self._udf(o, n)} for n in self.tenant.udf_names],
            }
            for name in absent:  # a field this tenant's Opportunities entity does not have is not sent at all
                rec.pop(name, None)
            return rec

        fast: dict[str, Callable[[SimOpportunity], Any]] = {
            "id": lambda o: int(o.native_id),
            "status": lambda o: int(o.stage),
            "title": lambda o: o.name,
            "stage": lambda o: int(o.sales_stage) if o.sales_stage is not None else None,
            "lastactivity": lambda o: o.modified_at,
            "createdate": lambda o: o.created_at,
            "ownerresourceid": lambda o: int(w.users[o.owner].native_id),
            "creatorresourceid": lambda o: int(w.users[o.creator].native_id),
            "amount": lambda o: o.amount if o.amount is not None else 0.0,
        }

        def value(o: SimOpportunity, name: str, udf: bool) -> Any:
            if udf:
                return self._udf(o, name)
            getter = fast.get(name.lower())
            return getter(o) if getter else _get_ci(render(o), name)

        return Entity("Opportunities", ids, get, value, render, fields, self.tenant.udf_names)

    def _revenue(self, o: SimOpportunity) -> dict[str, Any]:
        """The revenue fields as stored: what was written (`extra`), else the generated breakdown of the amount
        (one-time plus a recurring revenue of one frequency, by the record's seq)."""
        extra = o.extra or {}
        amount = o.amount if o.amount is not None else 0.0
        onetime = round(amount * 0.2, 2)
        frequency, periods = (("monthly", 12), ("quarterly", 4), ("yearly", 1))[o.seq % 3]
        recurring = dict.fromkeys(("monthly", "quarterly", "semiannual", "yearly"), 0.0)
        recurring[frequency] = round(amount * 0.8 / periods, 2)
        generated: dict[str, Any] = {
            "cost": round(amount * (0.55 + (o.seq % 30) / 100), 2),
            "onetimeRevenue": onetime,
            "onetimeCost": round(onetime * 0.6, 2),
            **{f"{f}Revenue": v for f, v in recurring.items()},
            **{f"{f}Cost": round(v * 0.6, 2) for f, v in recurring.items()},
            "totalAmountMonths": 12,
            "useQuoteTotals": False,
        }
        return {k: extra.get(k, generated[k]) for k in REVENUE_FIELDS}

    def _udf(self, o: SimOpportunity, name: str) -> Any:
        extra = o.extra or {}
        if "udf:" + name in extra:
            return extra["udf:" + name]
        if name == "Region":
            return REGIONS[_h("r", o.seq) % len(REGIONS)]
        if name == "Original Create Date":  # migrated records carry the legacy CRM's creation date (seed 002)
            return at_datetime(o.created_at - timedelta(days=30)) if o.seq % 4 == 0 else None
        if name == "Original Creator":
            return str(USER_BASE + (o.seq % 25)) if o.seq % 4 == 0 else None
        if name == "Territory":
            return ["North", "South", "Central", None][_h("t", o.seq) % 4]
        if name == "Deal Source":
            return ["Referral", "Web", "Partner: Müller & Söhne"][_h("d", o.seq) % 3]
        if name == "Renewal Of":
            return str(OPP_BASE + o.seq // 2) if o.seq % 6 == 0 else None
        return None

    def _companies_entity(self) -> Entity:
        w = self.world
        fields = {
            "id": "integer",
            "companyName": "string",
            "address1": "string",
            "address2": "string",
            "city": "string",
            "state": "string",
            "postalCode": "string",
            "countryID": "integer",
            "phone": "string",
            "isActive": "boolean",
            "ownerResourceID": "integer",
            "companyType": "integer",
            "lastTrackedModifiedDateTime": "datetime",
        }

        def render(i: int | None) -> dict[str, Any] | None:
            if i is None:
                return None
            a = w.accounts[i]
            line1, line2 = street_lines(a)
            return {
                "id": int(a.native_id),
                "companyName": a.name,
                "address1": line1,
                "address2": line2,
                "city": a.city,
                "state": a.state,
                "postalCode": a.postal_code,
                "countryID": COUNTRIES[a.country][0] if a.country in COUNTRIES else None,
                "phone": f"+1 555 {1000 + a.idx % 9000}",
                "isActive": True,
                "ownerResourceID": USER_BASE + a.idx % 25,
                "companyType": 1,
                "lastTrackedModifiedDateTime": at_datetime(self.company_modified(i)),
                "userDefinedFields": [],
            }

        return Entity(
            "Companies",
            lambda: [int(a.native_id) for a in w.accounts],
            lambda i: (i - COMPANY_BASE) if 0 <= i - COMPANY_BASE < len(w.accounts) else None,
            lambda i, name, udf: None if udf else _get_ci(render(i), name),
            render,
            fields,
        )

    def company_modified(self, i: int) -> datetime:
        """When the company was last changed (its name is what the world changes), on the virtual clock."""
        a = self.world.accounts[i]
        if self._company_names.get(i) != a.name:
            self._company_names[i] = a.name
            self._company_modified[i] = self.world.clock.now()
        return self._company_modified[i]

    def _contacts_entity(self) -> Entity:
        by_id = {c["id"]: c for c in self.contacts}
        fields = {
            "id": "integer",
            "companyID": "integer",
            "firstName": "string",
            "lastName": "string",
            "emailAddress": "string",
            "isActive": "integer",
        }
        return Entity(
            "Contacts",
            lambda: [c["id"] for c in self.contacts],
            by_id.get,
            lambda c, name, udf: None if udf else _get_ci(c, name),
            lambda c: dict(c) if c else None,
            fields,
        )

    def _resources_entity(self) -> Entity:
        w = self.world
        fields = {
            "id": "integer",
            "firstName": "string",
            "lastName": "string",
            "email": "string",
            "userName": "string",
            "isActive": "boolean",
            "resourceType": "string",
            "title": "string",
        }

        def render(i: int | None) -> dict[str, Any] | None:
            if i is None:
                return None
            u = w.users[i]
            first, _, last = u.name.partition(" ")
            return {
                "id": int(u.native_id),
                "firstName": first,
                "lastName": last,
                "email": u.email,
                "userName": u.email.split("@")[0],
                "isActive": u.active,
                "resourceType": "Employee",
                "licenseType": 1,
                "userType": 1,
                "title": "Account Manager",
            }

        return Entity(
            "Resources",
            lambda: [int(u.native_id) for u in w.users],
            lambda i: (i - USER_BASE) if 0 <= i - USER_BASE < len(w.users) else None,
            lambda i, name, udf: None if udf else _get_ci(render(i), name),
            render,
            fields,
        )

    def _countries_entity(self) -> Entity:
        rows = {
            cid: {
                "id": cid,
                "countryCode": code,
                "name": name,
                "displayName": name,
                "isActive": True,
                "isDefaultCountry": code == "US",
                "addressFormatID": 1,
            }
            for cid, code, name in COUNTRIES.values()
        }
        fields = {
            "id": "integer",
            "countryCode": "string",
            "name": "string",
            "displayName": "string",
            "isActive": "boolean",
        }
        return Entity(
            "Countries",
            lambda: sorted(rows),
            rows.get,
            lambda c, name, udf: None if udf else _get_ci(c, name),
            lambda c: dict(c) if c else None,
            fields,
        )

    def _currencies_entity(self) -> Entity:
        """Currencies: the internal currency (`isInternalCurrency`) is the one every opportunity amount is in
        (opportunities carry no currency; multi-currency only changes what is invoiced to customers)."""
        rows = {
            i + 1: {
                "id": i + 1,
                "name": code,
                "description": code,
                "displaySymbol": {"USD": "$", "EUR": "€", "GBP": "£"}.get(code, code),
                "exchangeRate": rate,
                "isActive": True,
                "isInternalCurrency": code == BASE_CURRENCY,
            }
            for i, (code, rate) in enumerate(sorted(EXCHANGE_RATES.items()))
        }
        fields = {
            "id": "integer",
            "name": "string",
            "description": "string",
            "exchangeRate": "double",
            "isActive": "boolean",
            "isInternalCurrency": "boolean",
        }
        return Entity(
            "Currencies",
            lambda: sorted(rows),
            rows.get,
            lambda c, name, udf: None if udf else _get_ci(c, name),
            lambda c: dict(c) if c else None,
            fields,
        )


# Every field name a write may carry (besides user-defined fields): matched without regard to case.
_WRITABLE = (
    "id",
    "title",
    "companyID",
    "contactID",
    "ownerResourceID",
    "status",
    "stage",
    "amount",
    "probability",
    "projectedCloseDate",
    "userDefinedFields",
    "createDate",
    "lastActivity",
    "creatorResourceID",
    *REVENUE_FIELDS,
)
_BY_LOWER = {k.lower(): k for k in _WRITABLE}


def _canonical(body: Any) -> dict[str, Any]:
    """A write's body with known field names in the entity's casing (unknown names are kept, and refused)."""
    if not isinstance(body, dict):
        raise HttpError(500, "VALIDATION", "The request body must be an Opportunity object.")
    return {_BY_LOWER.get(k.lower(), k): v for k, v in body.items()}


def _typed(name: str, dtype: str, v: Any, *, nullable: bool = True) -> Any:
    """A written value as the field's type stores it; what does not convert is Autotask's 500."""
    if v is None:
        if nullable:
            return None
        raise HttpError(500, "VALIDATION", f"The {name} field is required and cannot be set to null.")
    try:
        if isinstance(v, bool) != (dtype == "boolean"):
            raise ValueError
        if dtype == "boolean":
            return v
        number = float(v)
        if dtype == "integer":
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise HttpError(500, "VALIDATION", f"Value {json.dumps(v)[:100]} is not valid for field {name}.") from None


def _get_ci(rec: dict[str, Any] | None, name: str) -> Any:
    if rec is None:
        return None
    if name in rec:
        return rec[name]
    low = name.lower()
    return next((v for k, v in rec.items() if k.lower() == low), None)


# -- the filter grammar --------------------------------------------------------------------------------------------

# Values one `in` / `notIn` condition may list: 500 (the SOAP thresholds page's 500 conditions per query, and
# the limit the REST by-id reads are batched to; docs/crm-api-notes.md §5.2). More is a query error, not a truncation.
IN_LIMIT = 500
_OPS = {
    "eq",
    "noteq",
    "gt",
    "gte",
    "lt",
    "lte",
    "beginswith",
    "endswith",
    "contains",
    "exist",
    "notexist",
    "in",
    "notin",
    "and",
    "or",
}


def _compile(node: Any, ent: Entity) -> Callable[[Any], bool]:
    """One filter node -> a predicate over the entity's objects (values compared by the field's type)."""
    if not isinstance(node, dict) or "op" not in node:
        raise HttpError(500, "QUERY", f"Invalid filter expression: {json.dumps(node)[:200]}")
    op = str(node["op"]).lower()
    if op not in _OPS:
        raise HttpError(500, "QUERY", f"Unsupported operator '{node['op']}'.")
    if op in ("and", "or"):
        items = node.get("items")
        if not isinstance(items, list) or not items:
            raise HttpError(500, "QUERY", f"The '{op}' group requires a non-empty items list.")
        preds = [_compile(i, ent) for i in items]
        return (lambda o: all(p(o) for p in preds)) if op == "and" else (lambda o: any(p(o) for p in preds))
    name = node.get("field")
    udf = bool(node.get("udf"))
    if not isinstance(name, str):
        raise HttpError(500, "QUERY", "A filter condition requires a field.")
    if not udf and name.lower() not in {f.lower() for f in ent.fields}:
        raise HttpError(500, "QUERY", f"Unable to find {name} in the {ent.name[:-1]} entity.")
    if udf and name not in ent.udfs:
        raise HttpError(500, "QUERY", f"Unable to find user-defined field {name} in the {ent.name[:-1]} entity.")
    dtype = "string" if udf else next(t for f, t in ent.fields.items() if f.lower() == name.lower())
    conv = _converter(dtype)

    def get(o: Any) -> Any:
        return conv(ent.value(o, name, udf))

    if op == "exist":
        return lambda o: ent.value(o, name, udf) not in (None, "")
    if op == "notexist":
        return lambda o: ent.value(o, name, udf) in (None, "")
    if "value" not in node:
        raise HttpError(500, "QUERY", f"The '{node['op']}' condition on {name} requires a value.")
    raw = node["value"]
    if op in ("in", "notin"):
        if not isinstance(raw, list):
            raise HttpError(500, "QUERY", f"The '{node['op']}' condition on {name} requires a list value.")
        if len(raw) > IN_LIMIT:
            raise HttpError(
                500, "QUERY", f"The '{node['op']}' condition on {name} takes at most {IN_LIMIT} values; got {len(raw)}."
            )
        wanted = {_convert_value(conv, v, name) for v in raw}
        if op == "in":
            return lambda o: get(o) in wanted
        return lambda o: (v := get(o)) is not None and v not in wanted
    if isinstance(raw, (list, dict)):
        raise HttpError(500, "QUERY", f"The '{node['op']}' condition on {name} takes a single value.")
    val = _convert_value(conv, raw, name)
    if op in ("beginswith", "endswith", "contains"):
        s = str(raw).casefold()
        fn = {"beginswith": str.startswith, "endswith": str.endswith, "contains": str.__contains__}[op]
        return lambda o: (v := ent.value(o, name, udf)) is not None and fn(str(v).casefold(), s)

    def cmp(o: Any) -> bool:
        v = get(o)
        if v is None or val is None:
            return op == "noteq" and (v is None) != (val is None)
        return {"eq": v == val, "noteq": v != val, "gt": v > val, "gte": v >= val, "lt": v < val, "lte": v <= val}[op]

    return cmp


def _candidates(ent: Entity, filters: list[Any]) -> list[int]:
    """The ids a query can match, in order: those its top-level `id` `eq` / `in` condition names, where it has
    one (the real API answers such lookups from its key, not a scan: a connector reading a 300,000-company
    tenant's companies 500 ids at a time must not cost a scan each), else every id. The query's whole
    predicate still decides which of them match."""
    for f in filters:
        if not (isinstance(f, dict) and str(f.get("field", "")).lower() == "id" and not f.get("udf")):
            continue
        op = str(f.get("op", "")).lower()
        if op not in ("eq", "in"):
            continue
        named = f.get("value") if op == "in" else [f.get("value")]
        found = set()
        for v in named if isinstance(named, list) else []:
            try:
                n = float(v)
            except (TypeError, ValueError):
                continue
            if n.is_integer() and ent.get(int(n)) is not None:
                found.add(int(n))
        return sorted(found)
    return ent.ids()


def _converter(dtype: str) -> Callable[[Any], Any]:
    if dtype == "datetime":
        return lambda v: parse_datetime(v) if v not in (None, "") else None
    if dtype in ("integer", "long", "short", "double", "decimal"):
        return lambda v: float(v) if v not in (None, "") else None
    if dtype == "boolean":
        return lambda v: None if v is None else (v if isinstance(v, bool) else str(v).lower() == "true")
    return lambda v: None if v is None else str(v).casefold()  # SQL Server's case-insensitive collation


def _convert_value(conv: Callable[[Any], Any], raw: Any, name: str) -> Any:
    try:
        return conv(raw)
    except (TypeError, ValueError):
        raise HttpError(500, "QUERY", f"Value {json.dumps(raw)[:100]} is not valid for field {name}.") from None


def street_lines(a: Any) -> tuple[str | None, str | None]:
    """A company's address1 / address2: some have a second line, some a street typed over two lines."""
    if not a.street:
        return None, None
    line1 = a.street + "\nGebäude B" if a.idx % 7 == 3 else a.street
    return line1, (f"Suite {100 + a.idx}" if a.idx % 4 == 1 else None)


def build(
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    clock: Clock | None = None,
    *,
    variant: str = "default",
    **options: Any,
) -> AutotaskSimulator:
    t = tenant(variant)
    world = World(profile(t), seed, opportunities, clock=clock)
    won_stage = next(s.key for s in sorted(t.stages, key=lambda s: s.order) if s.is_won)
    for o in world.opps.values():  # Autotask keeps milliseconds: give generated history fractions of a second
        o.created_at += timedelta(milliseconds=10 * (_h("c", o.seq) % 100))
        o.modified_at = max(o.created_at, o.modified_at - timedelta(milliseconds=10 * (_h("m", o.seq) % 100)))
        if o.closed_at is not None:  # the close stays between the (shifted) creation and the last edit
            o.closed_at = min(max(o.closed_at, o.created_at), o.modified_at)
        if t.won_stage_while_open and o.stage == "1" and o.seq % 4 == 0:
            o.sales_stage = won_stage  # the deal is won in the stage, the status was never moved (seed 003)
    return AutotaskSimulator(world, faults, variant=variant, **options)


# -- the tenant as its users see it ----------------------------------------------------------------------------

DEFAULT_STATUS_CATEGORY = {"2": "lost", "3": "won", "4": "won"}  # the documented system values; others open


def closed_at(sim: AutotaskSimulator, o: SimOpportunity) -> datetime | None:
    """The close time the API shows for `o`: closedDate when its status is won, lostDate when lost (None when
    the tenant has no lostDate), None while open."""
    status = sim.world.status(o)
    if status == "open" or (status == "lost" and "lostDate" in sim.tenant.absent_fields):
        return None
    return o.closed_at


def truth(sim: AutotaskSimulator) -> dict[str, dict[str, Any]]:
    """The live opportunities as a user of this tenant sees them through the API user's rights, from the
    simulator's own data: stage / status labels from the tenant's picklists (their values when the API user may
    not read entityInformation), the company's name and address (None when Companies are refused; the country's
    name unless Countries are refused), open / won / lost from the status."""
    w = sim.world
    labels = not sim.refused("entityinformation/fields")
    out: dict[str, dict[str, Any]] = {}
    with w.lock:
        for o in w.live():
            status = w.stages[o.stage]
            stage = w.sales_stages.get(o.sales_stage) if o.sales_stage is not None else None
            acc = w.accounts[o.account] if o.account is not None and not sim.refused("companies") else None
            location = None
            if acc is not None:
                country = COUNTRIES.get(acc.country or "", (None, None, None))[2]
                location = format_address(
                    *street_lines(acc),
                    acc.city,
                    acc.state,
                    acc.postal_code,
                    None if sim.refused("countries") else country,
                )
            out[o.native_id] = {
                "project_name": o.name,
                "client_name": acc.name if acc is not None else None,
                # companyID is on the opportunity: known even where Companies are refused
                "account_id": w.accounts[o.account].native_id if o.account is not None else None,
                "service_location": location,
                "owner_crm_id": w.users[o.owner].native_id,
                "created_by_crm_id": w.users[o.creator].native_id,
                "stage": (stage.label if labels else stage.key) if stage else None,
                "stage_id": stage.key if stage else None,
                "crm_status": status.label if labels else status.key,
                "status": w.status(o) if labels else DEFAULT_STATUS_CATEGORY.get(status.key, "open"),
                "amount": o.amount if o.amount is not None else 0.0,
                # amounts are in the internal currency (Currencies.isInternalCurrency), when the user may read it
                "currency": None if sim.refused("currencies") else BASE_CURRENCY,
                "amount_base": o.amount if o.amount is not None else 0.0,
                "base_currency": None if sim.refused("currencies") else BASE_CURRENCY,
                "close_date": o.close_date,
                "created_at": o.created_at,
                "crm_closed_at": closed_at(sim, o),
                **_revenue_truth(sim._revenue(o)),
            }
    return out


def _revenue_truth(rev: dict[str, Any]) -> dict[str, float | None]:
    """One-time revenue, the recurring revenues over totalAmountMonths (Autotask's total: one-time + monthly x
    months + quarterly x months / 3 + semiannual x months / 6 + yearly x months / 12), the total cost."""
    months = rev["totalAmountMonths"]
    recurring = (
        rev["monthlyRevenue"] * months
        + rev["quarterlyRevenue"] * months / 3
        + rev["semiannualRevenue"] * months / 6
        + rev["yearlyRevenue"] * months / 12
    )
    return {"revenue_one_time": rev["onetimeRevenue"], "revenue_recurring": round(recurring, 2), "cost": rev["cost"]}
