"""HubSpot CRM v3 simulator: deals, search, pipelines, owners, companies and deal-company associations.

What it reproduces (docs/crm-api-notes.md §2, "Simulator fidelity checklist"):
- Auth: a private-app token (`Authorization: Bearer pat-na1-...`, never expires) and OAuth
  (`POST /oauth/v1/token`, form-encoded `grant_type=refresh_token`, `expires_in` 1800 on the virtual clock).
  A bad token is a 401 with `category: INVALID_AUTHENTICATION`; an expired OAuth token a 401 with
  `category: EXPIRED_AUTHENTICATION`.
- Every `properties` value is a string or null; ids are strings; booleans are "true" / "false";
  `createdAt` / `updatedAt` (and `archivedAt` in archived listings) are ISO with milliseconds.
- List `GET /crm/v3/objects/deals`: default limit 10, max 100, opaque `after`, `paging` omitted on the last page,
  `archived=true` lists only archived deals. `associations=companies` on list / read.
- Search `POST /crm/v3/objects/deals/search`: filterGroups (OR of ANDed filters; EQ NEQ LT LTE GT GTE IN NOT_IN
  HAS_PROPERTY NOT_HAS_PROPERTY BETWEEN CONTAINS_TOKEN), one sort, limit max 200, `after` a string offset,
  `total`, a 400 when `after + limit` passes 10,000, the default property set when `properties` is not given,
  archived deals never returned. Ties on the sort property are ordered by hs_object_id (documented choice).
- Deleting a deal archives it and does NOT bump `hs_lastmodifieddate`.
- Close time: the calculated `hs_closed_won_date` / `hs_closed_lost_date` (read-only datetimes, ISO with ms and Z)
  carry the world's `closed_at` while the deal stands in a closed-won / closed-lost stage, empty elsewhere;
  `closedate` is the user's expected close date-time, which HubSpot fills with the close moment when a deal is
  closed through the API with it empty.
- Batch read `POST /crm/v3/objects/deals/batch/read`: at most 100 inputs, `archived` as a query parameter; ids not
  found (archived, unknown) are one OBJECT_NOT_FOUND entry of `errors` (`context.ids`) in a 207 Multi-Status.
- Pipelines with stage `metadata.isClosed` / `metadata.probability` as STRINGS; the `default` sales pipeline plus a
  custom pipeline with numeric stage ids.
- Owners carry `id` (owner id) and `userId` (user id); `hs_created_by_user_id` on deals is a USER id. Owners of
  deactivated users are archived (listed only with `archived=true`) but still referenced by deals.
- Deals carry their company twice: `deal_to_company` and `deal_to_company_unlabeled` (v3 shapes); v4 returns one
  `toObjectId` with two association types. Some deals have a second, non-primary company.
- Properties API `GET /crm/v3/properties/deals` (and `/{name}`): every deal property with its type, `options`
  (enumerations: internal value + label; `dealstage` lists every pipeline's stages) and `referencedObjectType`
  (`OWNER` for owner properties). Search filters or sorts on a property the portal does not have are a 400;
  writing one is a 400 `PROPERTY_DOESNT_EXIST`; asking for one in `properties` is silently ignored (as HubSpot).
- Deal writes (`POST` / `PATCH /crm/v3/objects/deals[/{id}]`, docs notes crm-write-webhook-notes.md §2.1): values
  are strings, an empty string clears one; every invalid property of a request is named in one 400
  VALIDATION_ERROR, in `message` ("Property values were not valid: [{isValid, message, error, name, ...}]") and in
  `errors[] {message, code, context.propertyName}`, and nothing is written: PROPERTY_DOESNT_EXIST, READ_ONLY_VALUE
  (calculated properties), LEADING_TRAILING_WHITESPACE on a non-string property (HubSpot's changelog, since 7 Apr
  2025; invisible characters count), INVALID_INTEGER "<v> was not a valid number." for a number property that is
  not plain decimal text (as captured for "1.4210854715202004e-14" on amount). A write goes to the world record
  (what the next sync reads) and bumps `hs_lastmodifieddate`; `amount_in_home_currency` follows `amount`.
- Companies carry `address`, `address2`, `city`, `state`, `zip`, `country`; some street fields hold a line break
  (multi-line values pasted or imported), some companies have a second street line.
- Tenant variants (`VARIANTS`): an app without the optional scopes answers 403 `MISSING_SCOPES` in HubSpot's
  shape (`errors[].context.requiredGranularScopes`, `links.scopes`) on pipelines, owners, companies,
  associations and the properties API; a portal with custom deal properties; a portal whose stages were
  relabelled (no stage id equals its label); an older portal without the calculated close-time properties; an
  app without `crm.objects.deals.write` (`read_only_app`, and `no_optional_rights`, which has deals.read only):
  reads work, deal creates, updates and archives answer 403 `MISSING_SCOPES` naming that scope.
- Rate limits: a ten-second rolling window on non-search calls (429 `TEN_SECONDLY_ROLLING`), search limited
  separately per second (429 `SECONDLY`, no rate-limit headers on search responses), and a daily allocation
  (429 `DAILY`). `X-HubSpot-RateLimit-*` headers on non-search calls incl. Daily and Daily-Remaining.
- Webhooks (crm-write-webhook-notes.md §2.2, lib/webhooks/hubspot.py for sources): the app webhooks v3 API under
  `/webhooks/v3/{appId}` authenticated by the developer API key (`?hapikey=`): `GET|PUT|DELETE /settings`
  (one `targetUrl` per app: PUT points the sender there), `GET|POST /subscriptions`, `GET|PATCH|DELETE
  /subscriptions/{id}` (`active` defaults to false; `propertyName` required for `deal.propertyChange`; HubSpot's
  answer to a duplicate subscription is unknown, so duplicates are kept and visible). Deliveries: `POST` of a JSON
  array of at most 100 events for the ACTIVE subscriptions only: `deal.creation`, `deal.deletion`, one
  `deal.propertyChange` per subscribed property whose value changed (`propertyName`, `propertyValue`), each with
  `eventId`, `subscriptionId`, `portalId`, `appId`, `occurredAt` (ms, the portal's clock), `subscriptionType`,
  `attemptNumber` 0, `objectId`, `changeSource`; signed with the app's client secret as `X-HubSpot-Signature-v3`
  over method + URL + body + `X-HubSpot-Request-Timestamp` (wall-clock ms: the receiver checks its own clock),
  plus the legacy v1 `X-HubSpot-Signature`. Pointed at a URL by the control endpoint with no subscriptions made,
  the app is taken as configured in HubSpot's UI with `WEBHOOK_DEFAULT_SUBSCRIPTIONS`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from oppsync_pipeline.sandbox.kit.formats import fmt_datetime, parse_iso
from oppsync_pipeline.sandbox.kit.limits import Window, spent_of
from oppsync_pipeline.sandbox.kit.snapshots import QueryCache
from oppsync_pipeline.sandbox.kit.tokens import TokenStore
from oppsync_pipeline.sandbox.kit.webhooks import Change, Outgoing, WebhookSender
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, HttpError, Request, Response, Simulator
from oppsync_pipeline.sandbox.world import (
    BASE_CURRENCY,
    EXCHANGE_RATES,
    Clock,
    SimOpportunity,
    SimStage,
    TenantProfile,
    World,
    to_base,
)

CRM = "hubspot"
PRIVATE_APP_TOKEN = "pat-na1-5a1d6c2e-7f3b-4c2e-9d1a-8e4b2f6c0a17"
OAUTH_CLIENT_ID = "sandbox-client-2f9c"
OAUTH_CLIENT_SECRET = "7b41c9e2-3d5a-4f8e-b0d1-2a6c9e4f8b3d"
OAUTH_REFRESH_TOKEN = "na1-4e7a-9c1f-2b8d-6f3e0a5c7d92"
SANDBOX_CREDENTIALS = {"access_token": PRIVATE_APP_TOKEN}
# The OAuth credential set (public apps): the connector refreshes the access token on 401.
SANDBOX_OAUTH_CREDENTIALS = {
    "client_id": OAUTH_CLIENT_ID,
    "client_secret": OAUTH_CLIENT_SECRET,
    "refresh_token": OAUTH_REFRESH_TOKEN,
}
# The app's webhooks: HubSpot signs deliveries with the app's client secret (the OAuth one); the webhooks API is
# the developer account's, authenticated by its developer API key (`webhooks.secrets` of a connection).
APP_ID = 1_234_567
PORTAL_ID = 62_515
DEVELOPER_API_KEY = "dev-key-3c9e1a7f-5b2d-4e8a-9f6c-0d4b7a2e1c58"
SANDBOX_WEBHOOK_SECRETS = {"client_secret": OAUTH_CLIENT_SECRET, "developer_api_key": DEVELOPER_API_KEY}
SANDBOX_WEBHOOK_OPTIONS = {"app_id": APP_ID}
WEBHOOK_BATCH = 100  # events per delivery
WEBHOOK_EVENT_TYPES = frozenset(
    {
        "deal.creation",
        "deal.deletion",
        "deal.propertyChange",
        "deal.associationChange",
        "deal.merge",
        "deal.restore",
        "contact.creation",
        "contact.deletion",
        "contact.propertyChange",
        "company.creation",
        "company.deletion",
        "company.propertyChange",
    }
)
# what the app sends when pointed at a URL without subscriptions made through the API (set up in the UI)
WEBHOOK_DEFAULT_SUBSCRIPTIONS = [
    ("deal.creation", None),
    ("deal.deletion", None),
    *(("deal.propertyChange", p) for p in ("dealname", "amount", "dealstage", "closedate", "hubspot_owner_id")),
]

SEARCH_CAP = 10_000
LIST_MAX = 100
SEARCH_MAX = 200
TOKEN_SECONDS = 1800
DEFAULT_PROPERTIES = (
    "dealname",
    "amount",
    "closedate",
    "pipeline",
    "dealstage",
    "createdate",
    "hs_lastmodifieddate",
    "hs_object_id",
)
COMPANY_DEFAULT_PROPERTIES = ("name", "domain", "createdate", "hs_lastmodifieddate", "hs_object_id")
DATE_PROPERTIES = frozenset(
    {"createdate", "hs_lastmodifieddate", "closedate", "hs_closed_won_date", "hs_closed_lost_date"}
)
NUMBER_PROPERTIES = frozenset({"amount", "hs_object_id", "hs_deal_stage_probability", "amount_in_home_currency"})
READ_ONLY = frozenset(
    {
        "hs_object_id",
        "hs_lastmodifieddate",
        "createdate",
        "hs_created_by_user_id",
        "hs_deal_stage_probability",
        "hs_is_closed",
        "hs_is_closed_won",
        "hs_closed_won_date",
        "hs_closed_lost_date",
    }
)
# The calculated close-time properties, stamped by HubSpot when a deal enters a closed-won / closed-lost stage;
# older portals do not list them (variant no_closed_won_date).
CLOSE_TIME_PROPERTIES = {"hs_closed_won_date": "won", "hs_closed_lost_date": "lost"}
BATCH_READ_MAX = 100
# Where the simulator keeps the moment HubSpot filled an empty closedate on a close (not a deal property).
CLOSEDATE_STAMP = "_closedate_filled_at"
EPOCH = datetime(1970, 1, 1)
ONE_MS = timedelta(milliseconds=1)
PRIMARY_TYPE_ID, UNLABELED_TYPE_ID = 5, 341

DEFAULT_PIPELINE = "default"
CUSTOM_PIPELINE = "87654321"
STAGES = [
    SimStage("appointmentscheduled", "Appointment Scheduled", False, False, 20, 0, DEFAULT_PIPELINE),
    SimStage("qualifiedtobuy", "Qualified To Buy", False, False, 40, 1, DEFAULT_PIPELINE),
    SimStage("presentationscheduled", "Presentation Scheduled", False, False, 60, 2, DEFAULT_PIPELINE),
    SimStage("decisionmakerboughtin", "Decision Maker Bought-In", False, False, 80, 3, DEFAULT_PIPELINE),
    SimStage("contractsent", "Contract Sent", False, False, 90, 4, DEFAULT_PIPELINE),
    SimStage("closedwon", "Closed Won", True, True, 100, 5, DEFAULT_PIPELINE),
    SimStage("closedlost", "Closed Lost", True, False, 0, 6, DEFAULT_PIPELINE),
    SimStage("145236001", "Discovery", False, False, 10, 10, CUSTOM_PIPELINE),
    SimStage("145236002", "Proposal", False, False, 50, 11, CUSTOM_PIPELINE),
    SimStage("145236003", "Verbal Yes", False, False, 80, 12, CUSTOM_PIPELINE),
    SimStage("145236004", "Signed", True, True, 100, 13, CUSTOM_PIPELINE),
    SimStage("145236005", "Lost to competitor", True, False, 0, 14, CUSTOM_PIPELINE),
]
PIPELINES = {DEFAULT_PIPELINE: "Sales Pipeline", CUSTOM_PIPELINE: "Managed Services"}
PIPELINE_CREATED = "2020-05-12T08:00:00.000Z"

VARIANTS: dict[str, str] = {
    "default": "Professional portal: the default sales pipeline and a custom one with numeric stage ids; a private "
    "app granted every scope oppsync reads with",
    "no_optional_rights": "a private app granted only crm.objects.deals.read: pipelines, owners, companies, deal-"
    "company associations, the properties API and deal writes answer 403 MISSING_SCOPES",
    "custom_fields": "a portal with custom deal properties (text, datetime, number, date, an enumeration stage, an "
    "owner property) that a connection's `fields:` can point at",
    "no_closed_won_date": "an older portal whose deal properties lack the calculated hs_closed_won_date and "
    "hs_closed_lost_date: asked for, they are left out; searched on, a 400",
    "renamed_stages": "the admin relabelled the default pipeline's stages and added a renewals pipeline: no stage id "
    "is its label (internal names and numeric ids)",
    "read_only_app": "a private app granted every read scope oppsync uses but not crm.objects.deals.write: reads "
    "work, deal writes (create, update, archive) answer 403 MISSING_SCOPES",
}
# Variants whose app lacks crm.objects.deals.write (no_optional_rights has crm.objects.deals.read only).
NO_WRITE_SCOPE = frozenset({"no_optional_rights", "read_only_app"})
WRITE_SCOPES = ["crm.objects.deals.write"]
# A deal write: create, update, archive (search and batch read are POSTs that read).
DEAL_WRITE = re.compile(r"^/crm/v3/objects/(?:deals|0-3)(?:/(?!search$)(?!batch/read$)[^/]+(?:/[^/]+)?)?/?$")
# What a number property accepts (plain decimal text; HubSpot refused "1.4210854715202004e-14" on amount).
NUMBER_TEXT = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
# Characters HubSpot counts as surrounding whitespace in non-string values besides str.isspace ones (invisible).
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
# renamed_stages: what the portal's admin renamed the default stages to, and the extra pipeline
RENAMED = {
    "appointmentscheduled": "Intro call booked",
    "qualifiedtobuy": "Needs confirmed",
    "presentationscheduled": "Demo given",
    "decisionmakerboughtin": "Champion on board",
    "contractsent": "Proposal out",
    "closedwon": "Won",
    "closedlost": "Lost",
}
RENEWALS_PIPELINE = "99120007"
RENEWAL_STAGES = [
    SimStage("99120101", "Renewal due", False, False, 30, 20, RENEWALS_PIPELINE),
    SimStage("99120102", "Quote sent", False, False, 70, 21, RENEWALS_PIPELINE),
    SimStage("99120103", "Renewed", True, True, 100, 22, RENEWALS_PIPELINE),
    SimStage("99120104", "Churned", True, False, 0, 23, RENEWALS_PIPELINE),
]
# What an app with only crm.objects.deals.read is refused (path prefix -> the scopes HubSpot names).
OPTIONAL_SCOPES = [
    ("/crm/v3/pipelines/", ["crm.objects.deals.read", "automation", "tickets"]),
    ("/crm/v3/owners", ["crm.objects.owners.read"]),
    ("/crm/v3/objects/companies", ["crm.objects.companies.read"]),
    ("/crm/v4/associations/deals/companies", ["crm.objects.companies.read"]),
    ("/crm/v4/associations/companies/deals", ["crm.objects.companies.read"]),
    ("/crm/v3/associations/deals/companies", ["crm.objects.companies.read"]),
    ("/crm/v4/objects/deals/", ["crm.objects.companies.read"]),
    ("/crm/v3/properties/", ["crm.schemas.deals.read"]),
]

# The deal properties every portal has: name -> (type, fieldType, label). The calculated ones are read-only.
STANDARD_PROPERTIES: dict[str, tuple[str, str, str]] = {
    "dealname": ("string", "text", "Deal Name"),
    "amount": ("number", "number", "Amount"),
    "amount_in_home_currency": ("number", "number", "Amount in company currency"),
    "dealstage": ("enumeration", "radio", "Deal Stage"),
    "pipeline": ("enumeration", "select", "Pipeline"),
    "closedate": ("datetime", "date", "Close Date"),
    "createdate": ("datetime", "date", "Create Date"),
    "hs_lastmodifieddate": ("datetime", "date", "Last Modified Date"),
    "hs_object_id": ("number", "number", "Record ID"),
    "hubspot_owner_id": ("enumeration", "select", "Deal owner"),
    "hs_created_by_user_id": ("number", "number", "Created by user ID"),
    "deal_currency_code": ("enumeration", "select", "Currency"),
    "hs_deal_stage_probability": ("number", "number", "Deal Stage Probability"),
    "hs_forecast_probability": ("number", "number", "Forecast Probability"),
    "hs_is_closed": ("bool", "booleancheckbox", "Is Deal Closed?"),
    "hs_is_closed_won": ("bool", "booleancheckbox", "Is Closed Won"),
    "hs_closed_amount": ("number", "calculation_equation", "Closed Deal Amount"),
    "dealtype": ("enumeration", "radio", "Deal Type"),
    "description": ("string", "textarea", "Deal Description"),
    "hs_priority": ("enumeration", "select", "Priority"),
    "hs_analytics_source": ("enumeration", "select", "Original Traffic Source"),
    "hubspot_team_id": ("enumeration", "select", "HubSpot Team"),
    "hs_closed_won_date": ("datetime", "date", "Closed Won Date (Internal)"),
    "hs_closed_lost_date": ("datetime", "date", "Closed Lost Date"),
    "hs_date_entered_closedwon": ("datetime", "date", "Date entered 'Closed Won'"),
    "hs_date_entered_closedlost": ("datetime", "date", "Date entered 'Closed Lost'"),
    "notes_last_updated": ("datetime", "date", "Last Activity Date"),
    "hs_lastactivitydate": ("datetime", "date", "Last Activity Date"),
}
# custom_fields: the portal's own deal properties -> (type, fieldType, label, options or None)
CUSTOM_STAGE_OPTIONS = [("scoping", "Scoping"), ("build", "Build & test"), ("handover", "Handover")]
CUSTOM_PROPERTIES: dict[str, tuple[str, str, str, list[tuple[str, str]] | None]] = {
    "project_code": ("string", "text", "Project code", None),
    "client_label": ("string", "text", "Client (as invoiced)", None),
    "original_create_date": ("datetime", "date", "Original create date", None),
    "created_by_custom": ("string", "text", "Created by (legacy CRM user id)", None),
    "sales_stage_custom": ("enumeration", "select", "Delivery stage", CUSTOM_STAGE_OPTIONS),
    "account_manager": ("enumeration", "select", "Account manager", None),  # an OWNER property
    "contract_value": ("number", "number", "Contract value", None),
    "go_live_date": ("date", "date", "Go-live date", None),
    "win_chance": ("number", "number", "Win chance (%)", None),
}


def deal_id(seq: int) -> str:
    return str(18_300_000_000 + seq)


def owner_id(i: int) -> str:
    return str(61_234_500 + i * 7)


def user_id(i: int) -> str:
    return str(9_012_300 + i * 13)


def company_id(i: int) -> str:
    return str(9_876_500_000 + i * 3)


def profile(variant: str = "default") -> TenantProfile:
    stages = [SimStage(s.key, s.label, s.is_closed, s.is_won, s.probability, s.order, s.pipeline) for s in STAGES]
    if variant == "renamed_stages":
        for s in stages:
            s.label = RENAMED.get(s.key, s.label)
        stages += [
            SimStage(s.key, s.label, s.is_closed, s.is_won, s.probability, s.order, s.pipeline) for s in RENEWAL_STAGES
        ]
    return TenantProfile(
        crm=CRM,
        stages=stages,
        opportunity_id=deal_id,
        user_id=owner_id,
        account_id=company_id,
        precision=timedelta(milliseconds=1),
    )


def pipelines_of(variant: str) -> dict[str, str]:
    if variant == "renamed_stages":
        return {**PIPELINES, RENEWALS_PIPELINE: "Renewals"}
    return dict(PIPELINES)


def company_street(acc: Any) -> tuple[str | None, str | None]:
    """The company's `address` and `address2`, derived from the account (no rng draws): some companies have a
    second street line, some a street field holding a line break (a multi-line value pasted or imported)."""
    if acc.street is None:
        return None, None
    if acc.idx % 4 == 1:
        return acc.street, f"Suite {100 + acc.idx}"
    if acc.idx % 9 == 2:
        return f"{acc.street}\nBuilding B", None
    return acc.street, None


def custom_values(opp: SimOpportunity, world: World) -> dict[str, Any]:
    """custom_fields: the values of the portal's custom deal properties for one deal (from the record, no rng)."""
    users = world.users
    out: dict[str, Any] = {
        "project_code": f"PRJ-{opp.seq:05d}",
        "client_label": (f"{world.accounts[opp.account].name} (key account)" if opp.account is not None else None),
        "original_create_date": opp.created_at - timedelta(days=30 + opp.seq % 400),
        "created_by_custom": f"legacy-{opp.creator:03d}",
        "sales_stage_custom": None if opp.seq % 7 == 0 else CUSTOM_STAGE_OPTIONS[opp.seq % 3][0],
        "account_manager": users[(opp.owner + 1) % len(users)].native_id,
        "contract_value": None if opp.amount is None else round(opp.amount * 1.2, 2),
        "go_live_date": (opp.close_date + timedelta(days=45)).isoformat() if opp.close_date else None,
        "win_chance": str(opp.seq % 101),
    }
    return out


@dataclass
class Limits:
    """Per-portal limits (Professional private app by default). 0 disables a limit."""

    ten_secondly: int = 190
    search_per_second: int = 5
    daily: int = 650_000
    # the rolling window of `ten_secondly` (10 s in every tier; tests shorten it, and the answers' headers say it)
    interval_seconds: float = 10.0


class RateLimited(HttpError):
    def __init__(self, policy: str, message: str, retry_after: float | None = None):
        headers = {"Retry-After": _num(retry_after)} if retry_after is not None else {}
        super().__init__(429, "RATE_LIMIT", message, headers)
        self.policy = policy


class MissingScopes(HttpError):
    def __init__(self, scopes: list[str]):
        super().__init__(
            403,
            "MISSING_SCOPES",
            "This app hasn't been granted all required scopes to make this call. "
            "Read more about required scopes here: https://developers.hubspot.com/scopes.",
        )
        self.scopes = scopes


@dataclass(frozen=True)
class PropertyIssue:
    """One invalid property value of a create / update (HubSpot's `error` code and message)."""

    name: str
    code: str
    message: str
    value: str | None = None


class InvalidProperties(HttpError):
    """400 VALIDATION_ERROR naming every invalid property of the request, in HubSpot's shape: `message` is
    "Property values were not valid: " plus a JSON list of {isValid, message, error, name, localizedErrorMessage,
    propertyValue}, and `errors[]` repeats each as {message, code, context: {propertyName: [name]}} (a captured
    400 on deal amount, Atlas-Authority/marketing-automation#206; HubSpot's changelogs show the message form)."""

    def __init__(self, issues: list[PropertyIssue]):
        listed = []
        for i in issues:
            item: dict[str, Any] = {"isValid": False, "message": i.message, "error": i.code, "name": i.name}
            item["localizedErrorMessage"] = i.message
            if i.value is not None:
                item["propertyValue"] = i.value
            listed.append(item)
        text = "Property values were not valid: " + json.dumps(listed, ensure_ascii=False, separators=(",", ":"))
        super().__init__(400, "VALIDATION_ERROR", text)
        self.issues = issues


# -- rendering helpers ----------------------------------------------------------------------------------------------


def iso_ms(dt: datetime | None) -> str | None:
    return fmt_datetime(dt, ms=True)


def epoch_ms(dt: datetime) -> int:
    return (dt - EPOCH) // ONE_MS


def _num(value: float | None) -> str | None:
    if value is None:
        return None
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _to_ms(value: Any) -> int | None:
    """A filter value for a date property: epoch millis (string or number) or an ISO date / date-time."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if len(text) == 10:
        return epoch_ms(datetime.combine(date.fromisoformat(text), datetime.min.time()))
    return epoch_ms(parse_iso(text))


def _error_body(message: str, category: str, **extra: Any) -> dict[str, Any]:
    return {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category, **extra}


class HubSpotSimulator(Simulator):
    crm = CRM
    daily_used = spent_of("daily")

    def __init__(
        self, world: World, faults: FaultPlan | None = None, limits: Limits | None = None, variant: str = "default"
    ):
        super().__init__(world, faults)
        if variant not in VARIANTS:
            raise ValueError(f"unknown hubspot variant {variant!r}; one of {sorted(VARIANTS)}")
        self.variant = variant
        self.pipelines_map = pipelines_of(variant)
        self.limits = limits or Limits()
        self.cache = QueryCache()
        self._snap: tuple[int, list[SimOpportunity], dict[str, list[Any]]] | None = None
        self.tokens = TokenStore(world.clock.now, TOKEN_SECONDS)  # OAuth access tokens (virtual clock)
        # The limits are read on every request (tests change them on a running portal).
        self.daily = Window(lambda: self.limits.daily)
        self.ten_secondly = Window(lambda: self.limits.ten_secondly, self.limits.interval_seconds)  # non-search calls
        self.secondly = Window(lambda: self.limits.search_per_second, 1.0)  # search calls
        self._token_seq = itertools.count(1)
        for u in world.users:  # every owner is backed by a HubSpot user
            u.alt_id = user_id(u.idx)
        if world.users and all(u.active for u in world.users):
            world.users[-1].active = False  # a deactivated user: its owner is archived, deals still point at it
        self._user_by_owner = {u.native_id: u for u in world.users}
        self._account_by_id = {a.native_id: a for a in world.accounts}
        self.custom_properties = dict(CUSTOM_PROPERTIES) if variant == "custom_fields" else {}
        standard = frozenset(STANDARD_PROPERTIES)
        if variant == "no_closed_won_date":
            standard -= frozenset(CLOSE_TIME_PROPERTIES)
        self._property_names = standard | frozenset(self.custom_properties)
        if self.custom_properties:
            for opp in world.opps.values():
                opp.extra = {**custom_values(opp, world), **(opp.extra or {})}
        self.route("POST", r"/oauth/v1/token", self.oauth_token)
        r = functools.partial(self.route, guard=self._guard)  # the API: authenticated, metered, scoped
        r("GET", r"/crm/v3/properties/(?:deals|0-3)/?", self.properties_list)
        r("GET", r"/crm/v3/properties/(?:deals|0-3)/(?P<name>[^/]+)", self.property_read)
        r("GET", r"/crm/v3/pipelines/deals", self.pipelines)
        r("GET", r"/crm/v3/pipelines/deals/(?P<pipeline>[^/]+)/stages", self.pipeline_stages)
        r("GET", r"/crm/v3/owners/?", self.owners)
        r("GET", r"/crm/v3/owners/(?P<id>[^/]+)", self.owner)
        r("POST", r"/crm/v3/objects/(?:deals|0-3)/search", self.search)
        r("POST", r"/crm/v3/objects/(?:deals|0-3)/batch/read", self.batch_read_deals)
        r("GET", r"/crm/v3/objects/(?:deals|0-3)", self.list_deals)
        r("POST", r"/crm/v3/objects/(?:deals|0-3)", self.create_deal)
        r("GET", r"/crm/v3/objects/(?:deals|0-3)/(?P<id>[^/]+)", self.read_deal)
        r("PATCH", r"/crm/v3/objects/(?:deals|0-3)/(?P<id>[^/]+)", self.update_deal)
        r("DELETE", r"/crm/v3/objects/(?:deals|0-3)/(?P<id>[^/]+)", self.delete_deal)
        r("GET", r"/crm/v3/objects/companies/(?P<id>[^/]+)", self.read_company)
        r("POST", r"/crm/v3/objects/companies/batch/read", self.batch_read_companies)
        r("GET", r"/crm/v4/objects/deals/(?P<id>[^/]+)/associations/companies", self.v4_deal_companies)
        r("POST", r"/crm/v4/associations/deals/companies/batch/read", self.v4_batch_associations)
        r("POST", r"/crm/v3/associations/deals/companies/batch/read", self.v3_batch_associations)
        r("POST", r"/crm/v3/objects/companies/search", self.search_companies)
        r("POST", r"/crm/v4/associations/companies/deals/batch/read", self.v4_batch_company_deals)
        r("GET", r"/account-info/v3/details", self.account_details)
        self._company_seen: dict[str, str] = {a.native_id: a.name for a in world.accounts}
        self._company_modified: dict[str, datetime] = {}
        self._company_version = -1
        self._deals_by_company: tuple[int, dict[str, list[str]]] | None = None
        # -- webhooks: the app's settings and subscriptions, and what each deal's subscribed properties were last
        self.webhook_settings: dict[str, Any] | None = None
        self.webhook_subscriptions: dict[int, dict[str, Any]] = {}
        self._subscription_ids = itertools.count(3_100_001)
        self._event_ids = itertools.count(4_200_000_001)
        self._notified: dict[str, dict[str, str | None]] = {}
        with world.lock:
            for opp in world.opps.values():
                self._notified[opp.native_id] = self._watched_values(opp)
        wh = functools.partial(self.route, guard=self._developer_guard)
        wh("GET", r"/webhooks/v3/(?P<app>[^/]+)/settings", self.webhook_settings_read)
        wh("PUT", r"/webhooks/v3/(?P<app>[^/]+)/settings", self.webhook_settings_write)
        wh("DELETE", r"/webhooks/v3/(?P<app>[^/]+)/settings", self.webhook_settings_delete)
        wh("GET", r"/webhooks/v3/(?P<app>[^/]+)/subscriptions", self.subscriptions_list)
        wh("POST", r"/webhooks/v3/(?P<app>[^/]+)/subscriptions", self.subscription_create)
        wh("GET", r"/webhooks/v3/(?P<app>[^/]+)/subscriptions/(?P<id>\d+)", self.subscription_read)
        wh("PATCH", r"/webhooks/v3/(?P<app>[^/]+)/subscriptions/(?P<id>\d+)", self.subscription_update)
        wh("DELETE", r"/webhooks/v3/(?P<app>[^/]+)/subscriptions/(?P<id>\d+)", self.subscription_delete)
        self.webhooks = WebhookSender(world, self._webhook_requests).start()
        world.listeners.append(self._unsent_change)

    # -- framework hooks --------------------------------------------------------------------------------------------

    def error_response(self, err: HttpError) -> Response:
        if isinstance(err, InvalidProperties):
            body = {
                "status": "error",
                "message": err.message,
                "correlationId": str(uuid.uuid4()),
                "errors": [
                    {"message": i.message, "code": i.code, "context": {"propertyName": [i.name]}} for i in err.issues
                ],
                "category": "VALIDATION_ERROR",
            }
            return Response.json(body, 400, err.headers)
        if isinstance(err, MissingScopes):
            body = _error_body(
                err.message,
                "MISSING_SCOPES",
                errors=[
                    {
                        "message": "One or more of the following scopes are required.",
                        "context": {"requiredGranularScopes": err.scopes},
                    }
                ],
                links={"scopes": "https://developers.hubspot.com/scopes"},
            )
            return Response.json(body, 403, err.headers)
        if isinstance(err, RateLimited):
            body = {
                "status": "error",
                "message": err.message,
                "errorType": "RATE_LIMIT",
                "correlationId": str(uuid.uuid4()),
                "policyName": err.policy,
                "requestId": str(uuid.uuid4()),
            }
            return Response.json(body, 429, err.headers)
        category = {400: "VALIDATION_ERROR", 404: "OBJECT_NOT_FOUND", 405: "VALIDATION_ERROR"}.get(err.status, err.code)
        if err.status in (401, 403):
            category = err.code
        return Response.json(_error_body(err.message, category), err.status, err.headers)

    def rate_limit_response(self, rule: FaultRule) -> Response:
        return self.error_response(
            RateLimited(
                "TEN_SECONDLY_ROLLING", "You have reached your ten_secondly_rolling limit.", retry_after=rule.seconds
            )
        )

    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def common_headers(self, req: Request) -> dict[str, str]:
        if not self._metered(req) or self._is_search(req):
            return {}
        remaining = self.ten_secondly.remaining() if self.limits.ten_secondly else 0
        return {
            "X-HubSpot-RateLimit-Daily": str(self.limits.daily),
            "X-HubSpot-RateLimit-Daily-Remaining": str(self.daily.remaining()),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(self.limits.interval_seconds * 1000)),
            "X-HubSpot-RateLimit-Max": str(self.limits.ten_secondly),
            "X-HubSpot-RateLimit-Remaining": str(remaining),
            "X-HubSpot-RateLimit-Secondly": str(max(1, self.limits.ten_secondly // 10)),
            "X-HubSpot-RateLimit-Secondly-Remaining": str(max(0, remaining // 10)),
        }

    def _guard(self, req: Request) -> None:
        self._authenticate(req)
        self._meter(req)
        self._check_scopes(req)

    def _check_scopes(self, req: Request) -> None:
        """no_optional_rights: the app was granted crm.objects.deals.read only; read_only_app: every read scope
        but not crm.objects.deals.write. A deal write without that scope is refused before anything is checked."""
        writes = req.method in ("POST", "PATCH", "PUT", "DELETE")
        if self.variant in NO_WRITE_SCOPE and writes and DEAL_WRITE.match(req.path):
            raise MissingScopes(WRITE_SCOPES)
        if self.variant != "no_optional_rights":
            return
        for prefix, scopes in OPTIONAL_SCOPES:
            if req.path.startswith(prefix) and not (
                prefix == "/crm/v4/objects/deals/" and not req.path.endswith("/companies")
            ):
                raise MissingScopes(scopes)

    @staticmethod
    def _metered(req: Request) -> bool:
        return req.path.startswith("/crm/")

    @staticmethod
    def _is_search(req: Request) -> bool:
        return req.path.endswith("/search")

    def _authenticate(self, req: Request) -> None:
        token = req.bearer()
        if token and token == PRIVATE_APP_TOKEN:
            return
        if self.tokens.known(token):
            ago = self.tokens.expired_for(token)
            if ago is None:
                return
            ago = max(1, int(ago.total_seconds()))
            raise HttpError(
                401, "EXPIRED_AUTHENTICATION", f"The OAuth token used to make this call expired {ago} second(s) ago."
            )
        raise HttpError(
            401,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can "
            "find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
        )

    def _meter(self, req: Request) -> None:
        if self.daily.full():
            raise RateLimited("DAILY", "You have reached your daily limit.")
        if self._is_search(req):
            window, policy, message = self.secondly, "SECONDLY", "You have reached your secondly limit."
        else:
            window, policy = self.ten_secondly, "TEN_SECONDLY_ROLLING"
            message = "You have reached your ten_secondly_rolling limit."
        if window.take() is None:
            raise RateLimited(policy, message)
        self.daily.take()

    # -- OAuth ------------------------------------------------------------------------------------------------------

    def oauth_token(self, req: Request) -> Response:
        form = req.form()
        if form.get("grant_type") != "refresh_token":
            return Response.json(
                {
                    "status": "BAD_GRANT_TYPE",
                    "message": "grant_type must be refresh_token here",
                    "correlationId": str(uuid.uuid4()),
                },
                400,
            )
        if form.get("client_id") != OAUTH_CLIENT_ID or form.get("client_secret") != OAUTH_CLIENT_SECRET:
            return Response.json(
                {
                    "status": "BAD_CLIENT_ID",
                    "message": "missing or invalid client_id / client_secret",
                    "correlationId": str(uuid.uuid4()),
                },
                400,
            )
        if form.get("refresh_token") != OAUTH_REFRESH_TOKEN:
            return Response.json(
                {
                    "status": "BAD_REFRESH_TOKEN",
                    "message": "missing or unknown refresh token",
                    "correlationId": str(uuid.uuid4()),
                },
                400,
            )
        token = self.tokens.issue(f"CJ{next(self._token_seq):04d}{uuid.uuid4().hex}")
        return Response.json(
            {
                "token_type": "bearer",
                "refresh_token": OAUTH_REFRESH_TOKEN,
                "access_token": token,
                "expires_in": TOKEN_SECONDS,
            }
        )

    # -- properties -------------------------------------------------------------------------------------------------

    def property_names(self) -> frozenset[str]:
        return self._property_names

    def _property_json(self, name: str) -> dict[str, Any]:
        options: list[dict[str, Any]] = []
        referenced = None
        if name in STANDARD_PROPERTIES:
            typ, field_type, label = STANDARD_PROPERTIES[name]
            custom = False
            if name == "dealstage":
                options = [
                    {"label": s.label, "value": s.key, "displayOrder": s.order, "hidden": False}
                    for s in sorted(self.world.stages.values(), key=lambda s: s.order)
                ]
            elif name == "pipeline":
                options = [
                    {"label": lbl, "value": pid, "displayOrder": i, "hidden": False}
                    for i, (pid, lbl) in enumerate(self.pipelines_map.items())
                ]
            elif name == "hubspot_owner_id":
                referenced = "OWNER"
        else:
            typ, field_type, label, opts = self.custom_properties[name]
            custom = True
            options = [
                {"label": lbl, "value": v, "displayOrder": i, "hidden": False} for i, (v, lbl) in enumerate(opts or [])
            ]
            if name == "account_manager":
                referenced = "OWNER"
        out: dict[str, Any] = {
            "name": name,
            "label": label,
            "type": typ,
            "fieldType": field_type,
            "description": "",
            "groupName": "dealinformation",
            "options": options,
            "displayOrder": -1,
            "calculated": name in READ_ONLY and name.startswith("hs_"),
            "externalOptions": referenced is not None,
            "hasUniqueValue": name == "hs_object_id",
            "hidden": False,
            "hubspotDefined": not custom,
            "modificationMetadata": {
                "archivable": custom,
                "readOnlyDefinition": not custom,
                "readOnlyValue": name in READ_ONLY,
            },
            "formField": custom,
            "createdAt": PIPELINE_CREATED,
            "updatedAt": PIPELINE_CREATED,
            "archived": False,
        }
        if referenced:
            out["referencedObjectType"] = referenced
        return out

    def properties_list(self, req: Request) -> Response:
        return Response.json({"results": [self._property_json(n) for n in sorted(self.property_names())]})

    def property_read(self, req: Request) -> Response:
        name = req.params["name"]
        if name not in self.property_names():
            raise HttpError(404, "OBJECT_NOT_FOUND", f"Unable to find property {name} for object type 0-3")
        return Response.json(self._property_json(name))

    # -- pipelines and owners ---------------------------------------------------------------------------------------

    def _stage_json(self, s: SimStage) -> dict[str, Any]:
        return {
            "id": s.key,
            "label": s.label,
            "displayOrder": s.order % 10,
            "metadata": {
                "isClosed": "true" if s.is_closed else "false",
                "probability": str(round(s.probability / 100, 2)),
            },
            "archived": False,
            "createdAt": PIPELINE_CREATED,
            "updatedAt": PIPELINE_CREATED,
            "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT",
        }

    def _pipeline_json(self, pid: str) -> dict[str, Any]:
        stages = sorted((s for s in self.world.stages.values() if s.pipeline == pid), key=lambda s: s.order)
        return {
            "id": pid,
            "label": self.pipelines_map[pid],
            "displayOrder": list(self.pipelines_map).index(pid),
            "archived": False,
            "createdAt": PIPELINE_CREATED,
            "updatedAt": PIPELINE_CREATED,
            "stages": [self._stage_json(s) for s in stages],
        }

    def pipelines(self, req: Request) -> Response:
        return Response.json({"results": [self._pipeline_json(p) for p in self.pipelines_map]})

    def pipeline_stages(self, req: Request) -> Response:
        pid = req.params["pipeline"]
        if pid not in self.pipelines_map:
            raise HttpError(404, "OBJECT_NOT_FOUND", f"Unable to find pipeline with id {pid}")
        return Response.json({"results": self._pipeline_json(pid)["stages"]})

    def _owner_json(self, u: Any) -> dict[str, Any]:
        first, _, last = u.name.partition(" ")
        return {
            "id": u.native_id,
            "email": u.email,
            "type": "PERSON",
            "firstName": first,
            "lastName": last,
            # a deactivated user's owner is archived and loses userId; userIdIncludingInactive keeps it
            "userId": int(u.alt_id) if u.active else None,
            "userIdIncludingInactive": int(u.alt_id),
            "createdAt": "2021-01-04T10:00:00.000Z",
            "updatedAt": "2024-01-04T10:00:00.000Z",
            "archived": not u.active,
            "teams": [{"id": str(100 + u.idx % 3), "name": ["West", "East", "EMEA"][u.idx % 3], "primary": True}],
        }

    def account_details(self, req: Request) -> Response:
        """`GET /account-info/v3/details`: the portal's id, time zone and company currency (the currency
        `amount_in_home_currency` is in), plus the additional currencies enabled in the portal."""
        return Response.json(
            {
                "portalId": PORTAL_ID,
                "accountType": "STANDARD",
                "timeZone": "US/Eastern",
                "companyCurrency": BASE_CURRENCY,
                "additionalCurrencies": [c for c in EXCHANGE_RATES if c != BASE_CURRENCY],
                "utcOffset": "-05:00",
                "utcOffsetMilliseconds": -18000000,
                "uiDomain": "app.hubspot.com",
                "dataHostingLocation": "na1",
            }
        )

    def owners(self, req: Request) -> Response:
        archived = (req.arg("archived", "false") or "false").lower() == "true"
        email = req.arg("email")
        limit = max(1, min(int(req.arg("limit", "100") or 100), 500))
        users = [u for u in self.world.users if (not u.active) == archived and (email is None or u.email == email)]
        start = _decode_offset(req.arg("after"))
        page = users[start : start + limit]
        body: dict[str, Any] = {"results": [self._owner_json(u) for u in page]}
        if start + limit < len(users):
            after = _encode(str(start + limit))
            body["paging"] = {"next": {"after": after, "link": f"?after={after}"}}
        return Response.json(body)

    def owner(self, req: Request) -> Response:
        u = self._user_by_owner.get(req.params["id"])
        if u is None:
            raise HttpError(404, "OBJECT_NOT_FOUND", f"Unable to find owner with id {req.params['id']}")
        return Response.json(self._owner_json(u))

    # -- deals: rendering -------------------------------------------------------------------------------------------

    def _companies_of(self, opp: SimOpportunity) -> list[str]:
        """The primary company first, then (for some deals) a second, non-primary one."""
        if opp.account is None:
            return []
        out = [self.world.accounts[opp.account].native_id]
        if opp.seq % 10 == 3 and len(self.world.accounts) > 1:
            out.append(self.world.accounts[(opp.account + 1) % len(self.world.accounts)].native_id)
        return out

    def _property(self, opp: SimOpportunity, name: str) -> str | None:
        w = self.world
        if name == "dealname":
            return opp.name
        if name == "amount":
            return _num(opp.amount)
        if name == "amount_in_home_currency":  # calculated: the amount at the portal's exchange rate
            return _num(to_base(opp.amount, opp.currency))
        if name == "dealstage":
            return opp.stage
        if name == "pipeline":
            return w.stages[opp.stage].pipeline
        if name == "closedate":
            if opp.close_date is None:
                return None
            stamped = (opp.extra or {}).get(CLOSEDATE_STAMP)
            if stamped is not None:  # filled by HubSpot on the close: the close moment itself
                return iso_ms(stamped)
            hour = opp.seq % 24  # a UTC date-time: late-evening ones fall on the next day in the Americas
            return f"{opp.close_date.isoformat()}T{hour:02d}:00:00Z"
        if name == "createdate":
            return iso_ms(opp.created_at)
        if name == "hs_lastmodifieddate":
            return iso_ms(opp.modified_at)
        if name == "hs_object_id":
            return opp.native_id
        if name == "hubspot_owner_id":
            return w.users[opp.owner].native_id
        if name == "hs_created_by_user_id":
            return w.users[opp.creator].alt_id
        if name == "deal_currency_code":
            return opp.currency
        if name == "hs_deal_stage_probability":
            return None if opp.probability is None else str(round(opp.probability / 100, 4))
        if name == "hs_is_closed":
            return "true" if w.stages[opp.stage].is_closed else "false"
        if name == "hs_is_closed_won":
            return "true" if w.stages[opp.stage].is_won else "false"
        if name in CLOSE_TIME_PROPERTIES:
            # set on entering a closed-won (closed-lost) stage, empty while the deal is anywhere else
            return iso_ms(opp.closed_at) if w.status(opp) == CLOSE_TIME_PROPERTIES[name] else None
        if opp.extra and name in opp.extra:
            v = opp.extra[name]
            if v is None or isinstance(v, str):
                return v
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, datetime):
                return iso_ms(v)
            return str(v)
        return None

    def _deal_json(
        self, opp: SimOpportunity, properties: list[str] | None, associations: list[str] = (), archived: bool = False
    ) -> dict[str, Any]:
        names = properties if properties else DEFAULT_PROPERTIES
        known = self._property_names  # HubSpot leaves out requested properties the portal does not have
        props = {n: self._property(opp, n) for n in names if n and n in known}
        out: dict[str, Any] = {
            "id": opp.native_id,
            "properties": props,
            "createdAt": iso_ms(opp.created_at),
            "updatedAt": iso_ms(opp.modified_at),
            "archived": archived,
        }
        if archived:
            out["archivedAt"] = iso_ms(opp.deleted_at)
        if "companies" in associations:
            results = []
            for i, cid in enumerate(self._companies_of(opp)):
                if i == 0:
                    results.append({"id": cid, "type": "deal_to_company"})
                results.append({"id": cid, "type": "deal_to_company_unlabeled"})
            if results:
                out["associations"] = {"companies": {"results": results}}
        return out

    @staticmethod
    def _csv(req: Request, name: str) -> list[str]:
        out: list[str] = []
        for v in req.query.get(name, []):
            out.extend(p.strip() for p in v.split(",") if p.strip())
        return out

    def _get_deal(self, native_id: str, archived: bool = False) -> SimOpportunity:
        opp = self.world.opps.get(native_id)
        if opp is None or (opp.deleted_at is not None) != archived:
            raise HttpError(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.")
        return opp

    # -- deals: list, read, batch read ------------------------------------------------------------------------------

    def _sorted_ids(self, archived: bool) -> list[int]:
        w = self.world
        return self.cache.get_or_compute(
            ("list", archived, w.version),
            lambda: sorted(int(o.native_id) for o in list(w.opps.values()) if (o.deleted_at is not None) == archived),
        )

    def list_deals(self, req: Request) -> Response:
        limit = int(req.arg("limit", "10") or 10)
        if limit < 1 or limit > LIST_MAX:
            raise HttpError(400, "VALIDATION_ERROR", f"limit must be between 1 and {LIST_MAX}; got {limit}")
        archived = (req.arg("archived", "false") or "false").lower() == "true"
        ids = self._sorted_ids(archived)
        after = req.arg("after")
        start = bisect_right(ids, _decode_offset(after)) if after else 0
        page = ids[start : start + limit]
        props, assoc = self._csv(req, "properties"), self._csv(req, "associations")
        body: dict[str, Any] = {
            "results": [self._deal_json(self.world.opps[str(i)], props, assoc, archived) for i in page]
        }
        if start + limit < len(ids):
            cursor = _encode(str(page[-1]))
            body["paging"] = {"next": {"after": cursor, "link": f"?after={cursor}"}}
        return Response.json(body)

    def read_deal(self, req: Request) -> Response:
        archived = (req.arg("archived", "false") or "false").lower() == "true"
        opp = self._get_deal(req.params["id"], archived)
        return Response.json(
            self._deal_json(opp, self._csv(req, "properties"), self._csv(req, "associations"), archived)
        )

    def batch_read_deals(self, req: Request) -> Response:
        """`POST /crm/v3/objects/deals/batch/read?archived=false|true`: at most 100 inputs; `archived` is a query
        parameter (default false: live deals only; true: archived ones only). Ids not found among those (never
        existed, or on the other side of `archived`) are one OBJECT_NOT_FOUND entry of `errors`, listing them
        in `context.ids`, and the answer is 207 Multi-Status; all found: 200."""
        body = req.json() or {}
        inputs = body.get("inputs") or []
        if len(inputs) > BATCH_READ_MAX:
            raise HttpError(400, "VALIDATION_ERROR", f"Batch read is limited to {BATCH_READ_MAX} inputs")
        if body.get("idProperty"):
            raise HttpError(400, "VALIDATION_ERROR", "idProperty is not modelled by this simulator")
        archived = (req.arg("archived", "false") or "false").lower() == "true"
        started = iso_ms(self.world.clock.now())
        found, missing = [], []
        for ident in dict.fromkeys(str(i.get("id")) for i in inputs):
            opp = self.world.opps.get(ident)
            if opp is None or (opp.deleted_at is not None) != archived:
                missing.append(ident)
            else:
                found.append(self._deal_json(opp, body.get("properties"), archived=archived))
        out: dict[str, Any] = {
            "status": "COMPLETE",
            "results": found,
            "startedAt": started,
            "completedAt": iso_ms(self.world.clock.now()),
        }
        if not missing:
            return Response.json(out)
        out["numErrors"] = 1
        out["errors"] = [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some DEAL objects, they may be deleted or not exist. "
                "Check that ids are valid.",
                "context": {"ids": missing},
            }
        ]
        return Response.json(out, 207)

    # -- deals: search ----------------------------------------------------------------------------------------------

    def _getter(self, name: str):
        w = self.world
        if name == "hs_lastmodifieddate":
            return lambda o: epoch_ms(o.modified_at)
        if name == "createdate":
            return lambda o: epoch_ms(o.created_at)
        if name == "closedate":
            return lambda o: None if o.close_date is None else _to_ms(self._property(o, "closedate"))
        if name == "hs_object_id":
            return lambda o: int(o.native_id) if o.native_id.isdigit() else None
        if name == "amount":
            return lambda o: o.amount
        if name == "amount_in_home_currency":
            return lambda o: to_base(o.amount, o.currency)
        if name == "dealstage":
            return lambda o: o.stage
        if name == "pipeline":
            return lambda o: w.stages[o.stage].pipeline
        if name == "hs_deal_stage_probability":
            return lambda o: None if o.probability is None else o.probability / 100
        return lambda o: self._property(o, name)

    def _snapshot(self) -> tuple[int, list[SimOpportunity], dict[str, list[Any]]]:
        """Live deals in id order plus lazily built property columns, per world version."""
        snap = self._snap
        if snap is None or snap[0] != self.world.version:
            with self.world.lock:
                version = self.world.version
                live = sorted((o for o in self.world.opps.values() if o.deleted_at is None), key=_seq)
            snap = self._snap = (version, live, {})
        return snap

    def _column(self, snap: tuple[int, list[SimOpportunity], dict[str, list[Any]]], name: str) -> list[Any]:
        cols = snap[2]
        if name not in cols:
            get = self._getter(name)
            if name in DATE_PROPERTIES or name in NUMBER_PROPERTIES:
                cols[name] = [get(o) for o in snap[1]]
            else:  # text compares case-insensitively
                cols[name] = [None if (v := get(o)) is None else str(v).lower() for o in snap[1]]
        return cols[name]

    def _compile(self, f: dict[str, Any]) -> tuple[str, Any]:
        """(property, predicate on the property's normalised value)."""
        name, op = f.get("propertyName"), str(f.get("operator", "")).upper()
        if not name or not op:
            raise HttpError(400, "VALIDATION_ERROR", "Each filter needs propertyName and operator")
        if name not in self.property_names():
            raise HttpError(
                400,
                "VALIDATION_ERROR",
                f"There was a problem with the request: the property {name} does not exist on object type 0-3 (deals)",
            )
        if name in DATE_PROPERTIES:
            conv = _to_ms
        elif name in NUMBER_PROPERTIES:

            def conv(v: Any) -> float:
                return float(v)
        else:

            def conv(v: Any) -> str:
                return str(v).lower()

        try:
            if op in ("IN", "NOT_IN"):
                values = {conv(v) for v in (f.get("values") or [])}
                return name, ((lambda a: a in values) if op == "IN" else (lambda a: a not in values))
            if op == "HAS_PROPERTY":
                return name, lambda a: a not in (None, "")
            if op == "NOT_HAS_PROPERTY":
                return name, lambda a: a in (None, "")
            if op == "BETWEEN":
                lo, hi = conv(f.get("value")), conv(f.get("highValue"))
                return name, lambda a: a is not None and lo <= a <= hi
            if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
                token = str(f.get("value", "")).lower().strip("*")
                if op == "CONTAINS_TOKEN":
                    return name, lambda a: token in str(a or "").lower()
                return name, lambda a: token not in str(a or "").lower()
            value = conv(f.get("value"))
        except (TypeError, ValueError):
            raise HttpError(
                400, "VALIDATION_ERROR", f"Invalid value {f.get('value')!r} for property {name} and operator {op}"
            ) from None
        cmp = {
            "EQ": lambda a: a == value,
            "NEQ": lambda a: a != value,
            "LT": lambda a: a is not None and a < value,
            "LTE": lambda a: a is not None and a <= value,
            "GT": lambda a: a is not None and a > value,
            "GTE": lambda a: a is not None and a >= value,
        }.get(op)
        if cmp is None:
            raise HttpError(400, "VALIDATION_ERROR", f"Unsupported operator {op}")
        return name, cmp

    def search(self, req: Request) -> Response:
        body = req.json() or {}
        groups = body.get("filterGroups") or []
        if (
            len(groups) > 5
            or any(len(g.get("filters") or []) > 10 for g in groups)
            or sum(len(g.get("filters") or []) for g in groups) > 25
        ):
            raise HttpError(
                400,
                "VALIDATION_ERROR",
                "Too many filters: at most 5 filterGroups, 10 filters per group and 25 filters in total",
            )
        sorts = body.get("sorts") or []
        if len(sorts) > 1:
            raise HttpError(400, "VALIDATION_ERROR", "Only one sort is allowed")
        for sort in sorts:
            name = sort.lstrip("-") if isinstance(sort, str) else (sort or {}).get("propertyName")
            if name and name not in self.property_names():
                raise HttpError(
                    400,
                    "VALIDATION_ERROR",
                    f"There was a problem with the request: the property "
                    f"{name} does not exist on object type 0-3 (deals)",
                )
        limit = int(body.get("limit") or 10)
        if limit < 1 or limit > SEARCH_MAX:
            raise HttpError(400, "VALIDATION_ERROR", f"limit must be between 1 and {SEARCH_MAX}; got {limit}")
        try:
            after = int(body.get("after") or 0)
        except (TypeError, ValueError):
            raise HttpError(400, "VALIDATION_ERROR", "after must be a numeric offset") from None
        if after + limit > SEARCH_CAP:
            raise HttpError(
                400,
                "VALIDATION_ERROR",
                f"There was a problem with the request. Search results are limited to {SEARCH_CAP} "
                f"(after {after} + limit {limit} exceeds it); narrow the query.",
            )
        key = (
            "search",
            json.dumps([groups, sorts, body.get("query")], sort_keys=True, default=str),
            self.world.version,
        )
        ids = self.cache.get_or_compute(key, lambda: self._run_search(groups, sorts, body.get("query")))
        page = ids[after : after + limit]
        props = body.get("properties") or None
        out: dict[str, Any] = {"total": len(ids), "results": [self._deal_json(self.world.opps[i], props) for i in page]}
        if after + limit < len(ids):
            out["paging"] = {"next": {"after": str(after + limit)}}
        return Response.json(out)

    def _run_search(self, groups: list[dict[str, Any]], sorts: list[Any], query: str | None) -> list[str]:
        compiled = [[self._compile(f) for f in (g.get("filters") or [])] for g in groups]
        snap = self._snapshot()
        live = snap[1]
        if compiled:
            keep: set[int] = set()
            for group in compiled:
                idx: Any = range(len(live))
                for name, pred in group:
                    col = self._column(snap, name)
                    idx = [i for i in idx if pred(col[i])]
                keep.update(idx)
            idx = sorted(keep)
        else:
            idx = list(range(len(live)))
        if query:
            q = str(query).lower()
            idx = [i for i in idx if q in live[i].name.lower()]
        if sorts:
            sort = sorts[0]
            if isinstance(sort, str):  # the official client sends plain names ("-name" for descending)
                sort = {
                    "propertyName": sort.lstrip("-"),
                    "direction": "DESCENDING" if sort.startswith("-") else "ASCENDING",
                }
            col = self._column(snap, sort.get("propertyName") or "hs_object_id")
            desc = str(sort.get("direction", "ASCENDING")).upper().startswith("DESC")
            # nulls last; ties by hs_object_id ascending (the snapshot is in id order and the sort is stable)
            present = [i for i in idx if col[i] is not None]
            present.sort(key=col.__getitem__, reverse=desc)
            idx = present + [i for i in idx if col[i] is None]
        return [live[i].native_id for i in idx]

    # -- deals: write -----------------------------------------------------------------------------------------------

    def _property_type(self, name: str) -> str:
        if name in STANDARD_PROPERTIES:
            return STANDARD_PROPERTIES[name][0]
        return self.custom_properties[name][0]

    def _check_values(self, props: dict[str, Any]) -> dict[str, Any]:
        """The request's property values as HubSpot validates them before anything is written (notes §2.1):
        a property the portal lacks is PROPERTY_DOESNT_EXIST, a calculated one READ_ONLY_VALUE; a non-string
        property's value with leading or trailing whitespace (invisible characters included) is
        LEADING_TRAILING_WHITESPACE (since 7 Apr 2025, HubSpot's changelog); a number property takes plain
        decimal text (INVALID_INTEGER "<v> was not a valid number.", as captured on deal amount). An empty
        string (or null) clears the value. Every invalid property of the request is named in one 400. Values
        sent as JSON numbers or booleans are read as their text. Returns the values as text (None: clear)."""
        issues: list[PropertyIssue] = []
        texts: dict[str, Any] = {}
        for name, value in props.items():
            if name not in self.property_names():
                issues.append(PropertyIssue(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist'))
                continue
            if name in READ_ONLY:
                message = f'"{name}" is a calculated property; its value cannot be set.'
                issues.append(PropertyIssue(name, "READ_ONLY_VALUE", message))
                continue
            if value is None or value == "":
                texts[name] = None
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            kind = self._property_type(name)
            if kind != "string" and text != text.strip().strip(INVISIBLE):
                message = f'"{text}" includes leading or trailing whitespace.'
                issues.append(PropertyIssue(name, "LEADING_TRAILING_WHITESPACE", message, text))
                continue
            if kind == "number" and not NUMBER_TEXT.match(text):
                issues.append(PropertyIssue(name, "INVALID_INTEGER", f"{text} was not a valid number.", text))
                continue
            texts[name] = text
        if issues:
            raise InvalidProperties(issues)
        return texts

    def _values(self, props: dict[str, Any], current: SimOpportunity | None) -> dict[str, Any]:
        w, values = self.world, {}
        props = self._check_values(props)
        pipeline = props.get("pipeline") or (w.stages[current.stage].pipeline if current else DEFAULT_PIPELINE)
        if pipeline not in self.pipelines_map:
            raise HttpError(
                400, "VALIDATION_ERROR", f"Property values were not valid: pipeline {pipeline!r} does not exist"
            )
        for k, v in props.items():
            if k == "dealname":
                values["name"] = v
            elif k == "amount":
                values["amount"] = None if v is None else float(v)
            elif k == "dealstage":
                st = w.stages.get(str(v))
                if st is None or st.pipeline != pipeline:
                    raise HttpError(
                        400,
                        "VALIDATION_ERROR",
                        f"Property values were not valid: {v!r} is not a valid dealstage of pipeline {pipeline}",
                    )
                values["stage"] = st.key
            elif k == "closedate":
                values["close_date"] = None if v in (None, "") else (EPOCH + timedelta(milliseconds=_to_ms(v))).date()
                values[CLOSEDATE_STAMP] = None
            elif k == "hubspot_owner_id":
                u = self._user_by_owner.get(str(v))
                if u is None:
                    raise HttpError(400, "VALIDATION_ERROR", f"Property values were not valid: owner {v!r} not found")
                values["owner"] = u.idx
            elif k == "deal_currency_code":
                values["currency"] = v
            elif k != "pipeline":
                values[k] = v
        if current is None and "stage" not in values:
            values["stage"] = w.stage_for(pipeline, "open").key
        elif "pipeline" in props and "stage" not in values and w.stages[current.stage].pipeline != pipeline:
            raise HttpError(
                400, "VALIDATION_ERROR", "Property values were not valid: changing pipeline needs a dealstage"
            )
        return values

    def create_deal(self, req: Request) -> Response:
        body = req.json() or {}
        values = self._values(body.get("properties") or {}, None)
        values.setdefault("close_date", None)  # a deal created without closedate has none (the world would draw one)
        account = None
        for a in body.get("associations") or []:
            acc = self._account_by_id.get(str((a.get("to") or {}).get("id")))
            if acc is not None:
                account = acc.idx
        opp = self._fill_closedate(self.world.create(account=account, **values))
        return Response.json(self._deal_json(opp, list(DEFAULT_PROPERTIES) + list(body.get("properties") or {})), 201)

    def update_deal(self, req: Request) -> Response:
        opp = self._get_deal(req.params["id"])
        props = (req.json() or {}).get("properties") or {}
        values = self._values(props, opp)
        opp = self._fill_closedate(self.world.update(opp.native_id, **values))
        return Response.json(self._deal_json(opp, list(DEFAULT_PROPERTIES) + list(props)))

    def _fill_closedate(self, opp: SimOpportunity) -> SimOpportunity:
        """HubSpot sets an empty closedate to the moment a deal is closed (won or lost); a closedate already
        set (the expected close date users keep) stays as it is."""
        if opp.close_date is None and opp.closed_at is not None:
            opp = self.world.update(
                opp.native_id, bump=False, close_date=opp.closed_at.date(), **{CLOSEDATE_STAMP: opp.closed_at}
            )
        return opp

    def delete_deal(self, req: Request) -> Response:
        opp = self._get_deal(req.params["id"])
        self.world.delete(opp.native_id, bump=False)  # archiving does not move hs_lastmodifieddate
        return Response.empty(204)

    # -- webhooks ---------------------------------------------------------------------------------------------------

    def _developer_guard(self, req: Request) -> None:
        if req.arg("hapikey") != DEVELOPER_API_KEY:
            raise HttpError(
                401,
                "INVALID_AUTHENTICATION",
                "The API key provided is invalid. View or manage your API key here: https://app.hubspot.com/l/api-key/",
            )
        if req.params.get("app") != str(APP_ID):
            raise HttpError(
                404, "OBJECT_NOT_FOUND", f"App {req.params.get('app')} not found for this developer account"
            )

    def webhook_settings_read(self, req: Request) -> Response:
        if self.webhook_settings is None:
            raise HttpError(404, "OBJECT_NOT_FOUND", f"No webhook settings found for app {APP_ID}")
        return Response.json(self.webhook_settings)

    def webhook_settings_write(self, req: Request) -> Response:
        body = req.json() or {}
        url = body.get("targetUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise HttpError(400, "VALIDATION_ERROR", "targetUrl must be a URL")
        now = fmt_datetime(self.world.clock.now())
        throttling = {"maxConcurrentRequests": 10, "period": "SECONDLY", **(body.get("throttling") or {})}
        created = (self.webhook_settings or {}).get("createdAt", now)
        self.webhook_settings = {"createdAt": created, "targetUrl": url, "throttling": throttling, "updatedAt": now}
        self.webhooks.url = url
        return Response.json(self.webhook_settings)

    def webhook_settings_delete(self, req: Request) -> Response:
        self.webhook_settings = None
        self.webhooks.url = None  # subscriptions stay, paused until a target URL is set again
        return Response.empty(204)

    def _subscription(self, req: Request) -> dict[str, Any]:
        sub = self.webhook_subscriptions.get(int(req.params["id"]))
        if sub is None:
            raise HttpError(
                404, "SUBSCRIPTION_ID_NOT_FOUND", f"Failed to find subscription by id `{req.params['id']}`."
            )
        return sub

    def subscriptions_list(self, req: Request) -> Response:
        return Response.json({"results": list(self.webhook_subscriptions.values())})

    def subscription_create(self, req: Request) -> Response:
        body = req.json() or {}
        event_type, prop = body.get("eventType"), body.get("propertyName")
        if event_type not in WEBHOOK_EVENT_TYPES:
            raise HttpError(400, "VALIDATION_ERROR", f"Unknown eventType {event_type!r}")
        if event_type.endswith(".propertyChange") and not prop:
            raise HttpError(400, "VALIDATION_ERROR", "propertyName is required for propertyChange subscriptions")
        now = fmt_datetime(self.world.clock.now(), ms=True)
        sid = next(self._subscription_ids)
        sub: dict[str, Any] = {"active": bool(body.get("active", False)), "createdAt": now, "eventType": event_type}
        sub["id"] = str(sid)
        if prop:
            sub["propertyName"] = prop
        sub["updatedAt"] = now
        self.webhook_subscriptions[sid] = sub
        if prop and event_type == "deal.propertyChange" and prop in self._property_names:
            with self.world.lock:  # the value a later change is compared with
                for opp in self.world.opps.values():
                    self._notified.setdefault(opp.native_id, {}).setdefault(prop, self._property(opp, prop))
        return Response.json(sub, 201)

    def subscription_read(self, req: Request) -> Response:
        return Response.json(self._subscription(req))

    def subscription_update(self, req: Request) -> Response:
        sub = self._subscription(req)
        if "active" in (body := req.json() or {}):
            sub["active"] = bool(body["active"])
            sub["updatedAt"] = fmt_datetime(self.world.clock.now(), ms=True)
        return Response.json(sub)

    def subscription_delete(self, req: Request) -> Response:
        self.webhook_subscriptions.pop(int(self._subscription(req)["id"]))
        return Response.empty(204)

    def _active_subscriptions(self) -> list[tuple[int, str, str | None]]:
        if not self.webhook_subscriptions:  # configured in the app's settings page, not through the API
            return [(2_900_001 + i, t, p) for i, (t, p) in enumerate(WEBHOOK_DEFAULT_SUBSCRIPTIONS)]
        return [
            (int(s["id"]), s["eventType"], s.get("propertyName"))
            for s in self.webhook_subscriptions.values()
            if s.get("active")
        ]

    def _watched_values(self, opp: SimOpportunity) -> dict[str, str | None]:
        names = {p for _, t, p in self._active_subscriptions() if t == "deal.propertyChange" and p}
        names |= {p for t, p in WEBHOOK_DEFAULT_SUBSCRIPTIONS if p}
        return {n: self._property(opp, n) for n in names if n in self._property_names}

    def _unsent_change(self, kind: str, opp: SimOpportunity) -> None:
        """A change while no target URL is set is not delivered later: the next event compares with it."""
        if self.webhooks.url is None:
            self._notified[opp.native_id] = self._watched_values(opp)

    def _deal_events(self, change: Change, subs: list[tuple[int, str, str | None]]) -> list[dict[str, Any]]:
        opp = change.opp
        at = {"created": opp.created_at, "deleted": opp.deleted_at}.get(change.kind) or opp.modified_at
        base = {"portalId": PORTAL_ID, "appId": APP_ID, "occurredAt": epoch_ms(at), "attemptNumber": 0}
        base |= {"objectId": int(opp.native_id), "changeSource": "CRM_UI"}
        with self.world.lock:
            now = self._watched_values(opp) if change.kind != "deleted" else {}
        before = self._notified.get(opp.native_id, {})
        self._notified[opp.native_id] = now
        wanted = {"created": "deal.creation", "deleted": "deal.deletion"}.get(change.kind)
        out = []
        for sid, event_type, prop in subs:
            if event_type == wanted or (
                change.kind == "updated"
                and event_type == "deal.propertyChange"
                and prop in now
                and now[prop] != before.get(prop)
            ):
                event = {
                    "eventId": next(self._event_ids),
                    "subscriptionId": sid,
                    **base,
                    "subscriptionType": event_type,
                }
                if event_type == "deal.propertyChange":
                    event |= {"propertyName": prop, "propertyValue": now[prop] if now[prop] is not None else ""}
                out.append(event)
        return out

    def _webhook_requests(self, batch: list[Change]) -> list[Outgoing]:
        """HubSpot's deliveries for a batch of changes: the events of the active subscriptions, 100 a request,
        each request signed (v3, and the legacy v1) with the app's client secret over the URL it is sent to."""
        subs = self._active_subscriptions()
        events = [e for change in batch for e in self._deal_events(change, subs)]
        url = (self.webhooks.url or "").rstrip("/")
        secret = SANDBOX_WEBHOOK_SECRETS["client_secret"]
        out = []
        for start in range(0, len(events), WEBHOOK_BATCH):
            body = json.dumps(events[start : start + WEBHOOK_BATCH], separators=(",", ":")).encode()
            stamp = str(int(time.time() * 1000))
            signed = b"POST" + url.encode() + body + stamp.encode()
            v3 = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
            headers = {
                "Content-Type": "application/json",
                "X-HubSpot-Signature-v3": v3,
                "X-HubSpot-Request-Timestamp": stamp,
                "X-HubSpot-Signature": hashlib.sha256(secret.encode() + body).hexdigest(),
                "X-HubSpot-Signature-Version": "v1",
            }
            out.append(Outgoing(body=body, headers=headers))
        return out

    # -- companies and associations -----------------------------------------------------------------------------------

    def _company_stamps(self) -> dict[str, datetime]:
        """Company hs_lastmodifieddate: a renamed company (the world renames accounts without a timestamp) is
        stamped when the simulator first sees the new name, which is never before the rename happened. A
        company edit does not touch its deals' hs_lastmodifieddate (as in HubSpot)."""
        with self.world.lock:
            if self._company_version != self.world.version:
                now = self.world.clock.now()
                for acc in self.world.accounts:
                    if self._company_seen.get(acc.native_id) != acc.name:
                        self._company_seen[acc.native_id] = acc.name
                        self._company_modified[acc.native_id] = now
                self._company_version = self.world.version
            return self._company_modified

    def _company_json(self, acc: Any, properties: list[str] | None) -> dict[str, Any]:
        street, street2 = company_street(acc)
        modified = iso_ms(self._company_stamps().get(acc.native_id)) or "2024-03-01T10:00:00.000Z"
        values = {
            "name": acc.name,
            "address": street,
            "address2": street2,
            "city": acc.city,
            "state": acc.state,
            "zip": acc.postal_code,
            "country": acc.country,
            "domain": f"{acc.name.split(' ')[0].lower()}.example.com",
            "createdate": "2022-03-01T10:00:00.000Z",
            "hs_lastmodifieddate": modified,
            "hs_object_id": acc.native_id,
        }
        names = properties or COMPANY_DEFAULT_PROPERTIES
        return {
            "id": acc.native_id,
            "properties": {n: values.get(n) for n in names},
            "createdAt": "2022-03-01T10:00:00.000Z",
            "updatedAt": modified,
            "archived": False,
        }

    def search_companies(self, req: Request) -> Response:
        """Company search, on what a sync asks: hs_lastmodifieddate and hs_object_id bounds, sorted by
        hs_object_id; other properties are a 400 here (not modelled)."""
        body = req.json() or {}
        stamps = self._company_stamps()
        default = datetime(2024, 3, 1, 10)
        rows = sorted(self.world.accounts, key=lambda a: int(a.native_id))
        for group in body.get("filterGroups") or []:
            for f in group.get("filters") or []:
                name, op = f.get("propertyName"), str(f.get("operator", "")).upper()
                if name == "hs_lastmodifieddate":
                    value = _to_ms(f.get("value"))

                    def get(a: Any) -> Any:
                        return epoch_ms(stamps.get(a.native_id, default))
                elif name == "hs_object_id":
                    value = int(f.get("value"))

                    def get(a: Any) -> Any:
                        return int(a.native_id)
                else:
                    raise HttpError(400, "VALIDATION_ERROR", f"company search on {name} is not modelled")
                cmp = {
                    "GT": lambda x: x > value,
                    "GTE": lambda x: x >= value,
                    "LT": lambda x: x < value,
                    "LTE": lambda x: x <= value,
                    "EQ": lambda x: x == value,
                }.get(op)
                if cmp is None:
                    raise HttpError(400, "VALIDATION_ERROR", f"Unsupported operator {op}")
                rows = [a for a in rows if cmp(get(a))]
        limit = int(body.get("limit") or 10)
        if limit < 1 or limit > SEARCH_MAX:
            raise HttpError(400, "VALIDATION_ERROR", f"limit must be between 1 and {SEARCH_MAX}; got {limit}")
        after = int(body.get("after") or 0)
        page = rows[after : after + limit]
        out: dict[str, Any] = {
            "total": len(rows),
            "results": [self._company_json(a, body.get("properties")) for a in page],
        }
        if after + limit < len(rows):
            out["paging"] = {"next": {"after": str(after + limit)}}
        return Response.json(out)

    def v4_batch_company_deals(self, req: Request) -> Response:
        snap = self._deals_by_company
        if snap is None or snap[0] != self.world.version:
            index: dict[str, list[str]] = {}
            for opp in self.world.live():
                for cid in self._companies_of(opp):
                    index.setdefault(cid, []).append(opp.native_id)
            snap = self._deals_by_company = (self.world.version, index)
        results = []
        for cid in self._batch_inputs(req):
            deals = snap[1].get(cid)
            if deals:
                results.append(
                    {
                        "from": {"id": cid},
                        "to": [
                            {
                                "toObjectId": int(d),
                                "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 342, "label": None}],
                            }
                            for d in deals
                        ],
                    }
                )
        return Response.json(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": iso_ms(self.world.clock.now()),
                "completedAt": iso_ms(self.world.clock.now()),
            }
        )

    def read_company(self, req: Request) -> Response:
        acc = self._account_by_id.get(req.params["id"])
        if acc is None:
            raise HttpError(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.")
        return Response.json(self._company_json(acc, self._csv(req, "properties")))

    def batch_read_companies(self, req: Request) -> Response:
        body = req.json() or {}
        inputs = body.get("inputs") or []
        if len(inputs) > 100:
            raise HttpError(400, "VALIDATION_ERROR", "Batch read is limited to 100 inputs")
        started = iso_ms(self.world.clock.now())
        found = [self._account_by_id.get(str(i.get("id"))) for i in inputs]
        missing = [str(i.get("id")) for i, a in zip(inputs, found) if a is None]
        out: dict[str, Any] = {
            "status": "COMPLETE",
            "results": [self._company_json(a, body.get("properties")) for a in found if a is not None],
            "startedAt": started,
            "completedAt": iso_ms(self.world.clock.now()),
        }
        if missing:
            out["numErrors"] = 1
            out["errors"] = [
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": "Could not get some COMPANY objects, they may be deleted or not exist.",
                    "context": {"ids": missing},
                }
            ]
            return Response.json(out, 207)
        return Response.json(out)

    def _v4_to(self, opp: SimOpportunity) -> list[dict[str, Any]]:
        out = []
        for i, cid in enumerate(self._companies_of(opp)):
            types = [{"category": "HUBSPOT_DEFINED", "typeId": UNLABELED_TYPE_ID, "label": None}]
            if i == 0:
                types.insert(0, {"category": "HUBSPOT_DEFINED", "typeId": PRIMARY_TYPE_ID, "label": "Primary"})
            out.append({"toObjectId": int(cid), "associationTypes": types})
        return out

    def v4_deal_companies(self, req: Request) -> Response:
        return Response.json({"results": self._v4_to(self._get_deal(req.params["id"]))})

    def _batch_inputs(self, req: Request) -> list[str]:
        inputs = (req.json() or {}).get("inputs") or []
        if len(inputs) > 1000:
            raise HttpError(400, "VALIDATION_ERROR", "Batch association read is limited to 1000 inputs")
        return [str(i.get("id")) for i in inputs]

    def v4_batch_associations(self, req: Request) -> Response:
        results = []
        for did in self._batch_inputs(req):
            opp = self.world.get(did)
            if opp is not None and opp.account is not None:
                results.append({"from": {"id": did}, "to": self._v4_to(opp)})
        return Response.json(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": iso_ms(self.world.clock.now()),
                "completedAt": iso_ms(self.world.clock.now()),
            }
        )

    def v3_batch_associations(self, req: Request) -> Response:
        results = []
        for did in self._batch_inputs(req):
            opp = self.world.get(did)
            if opp is None or opp.account is None:
                continue
            to = []
            for i, cid in enumerate(self._companies_of(opp)):
                if i == 0:
                    to.append({"id": cid, "type": "deal_to_company"})
                to.append({"id": cid, "type": "deal_to_company_unlabeled"})
            results.append({"from": {"id": did}, "to": to})
        return Response.json(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": iso_ms(self.world.clock.now()),
                "completedAt": iso_ms(self.world.clock.now()),
            }
        )


def _seq(o: SimOpportunity) -> int:
    return o.seq


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode((text + "\n").encode()).decode()


def _decode(cursor: str | None) -> str:
    try:
        return base64.urlsafe_b64decode(str(cursor).encode()).decode().strip()
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "VALIDATION_ERROR", f"Invalid paging cursor {cursor!r}") from None


def _decode_offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    text = _decode(cursor)
    if not text.isdigit():
        raise HttpError(400, "VALIDATION_ERROR", f"Invalid paging cursor {cursor!r}")
    return int(text)


def build(
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    clock: Clock | None = None,
    limits: Limits | None = None,
    variant: str = "default",
) -> HubSpotSimulator:
    world = World(profile(variant), seed=seed, opportunities=opportunities, clock=clock)
    return HubSpotSimulator(world, faults, limits, variant=variant)


def close_time_truth(simulator: HubSpotSimulator, opp: SimOpportunity) -> datetime | None:
    """When HubSpot says the deal closed: the world's close time, except in portals without the calculated
    properties (no_closed_won_date), where only `closedate` says it (the close moment only when HubSpot filled
    an empty one on the close; else the date-time users keep)."""
    if simulator.world.status(opp) == "open":
        return None
    if simulator.variant != "no_closed_won_date":
        return opp.closed_at
    text = simulator._property(opp, "closedate")
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


def truth(simulator: HubSpotSimulator) -> dict[str, dict[str, Any]]:
    """The portal's live deals as this API user reads them in HubSpot, computed from the simulator's own data.

    The variant decides what the user can read: an app without the optional scopes (no_optional_rights) sees
    no companies (client name and address None) and no pipeline labels (the stage is shown as its id); owner
    and creator ids are deal properties and stay. Otherwise the stage is the pipeline stage's label, the
    address is the primary company's street lines, city, state, zip and country joined with ", " (line breaks
    inside a line become ", " as well)."""
    world = simulator.world
    refused = simulator.variant == "no_optional_rights"
    out: dict[str, dict[str, Any]] = {}
    for opp in world.live():
        stage = world.stages[opp.stage]
        client = location = None
        if opp.account is not None and not refused:
            acc = world.accounts[opp.account]
            street, street2 = company_street(acc)
            parts = [street, street2, acc.city, acc.state, acc.postal_code, acc.country]
            lines = [ln.strip() for p in parts if p for ln in str(p).split("\n") if ln.strip()]
            client, location = acc.name, (", ".join(lines) or None)
        out[opp.native_id] = {
            "project_name": opp.name,
            "client_name": client,
            # the deal's primary company (the first association; none without the companies scope)
            "account_id": world.accounts[opp.account].native_id if opp.account is not None and not refused else None,
            "service_location": location,
            "owner_crm_id": world.users[opp.owner].native_id,
            "created_by_crm_id": world.users[opp.creator].alt_id,
            "stage": opp.stage if refused else stage.label,
            "stage_id": opp.stage,
            "crm_status": opp.stage,
            "status": world.status(opp),
            "amount": opp.amount,
            "currency": opp.currency,
            "amount_base": to_base(opp.amount, opp.currency),
            "base_currency": BASE_CURRENCY,
            "close_date": opp.close_date,
            "created_at": opp.created_at,
            "crm_closed_at": close_time_truth(simulator, opp),
        }
    return out
