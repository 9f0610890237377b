"""ConnectWise Manage (PSA) REST API 3.0 simulator.

What it reproduces (docs/crm-api-notes.md §4):
- `GET /login/companyinfo/{company}` (no auth) for codebase discovery; the API itself under
  `/{codebase}apis/3.0/` for the discovered codebase and for `v4_6_release/`, which most tenants accept.
- HTTP Basic `company+publicKey:privateKey` plus the required `clientId` header on every API call
  (missing clientId: 400 naming it; bad keys: 401). API keys never expire, so there is no token to expire.
- `/sales/opportunities` with `conditions` (`= != < <= > >= contains like in (...) not in`, `and`/`or`/`not`,
  parentheses, "strings" with backslash escapes, [datetimes], numbers, true/false/null; field paths such as
  `status/id`, `company/name`, `_info/lastUpdated` or `lastUpdated`), `customFieldConditions`, `orderBy`,
  `fields`, `page`/`pageSize` (default 25, more than 1000 is a 400) and the `Link` header (`page=` last,
  `rel="next"` omitted on the last page). Bare JSON arrays. Forward-only paging (`pagination-type:
  forward-only` + `pageId`) is served too.
- Navigable paging is offset paging re-evaluated against the current data, like the real server: a query is
  snapshotted per (query, world version), so a change between two page requests shifts the offsets.
- No scalar amount: the revenue lives in `/sales/opportunities/{id}/forecast` (forecastItems + totals).
- `/sales/opportunities/statuses` (tenant-specific, with closedFlag / wonFlag / lostFlag / inactiveFlag /
  defaultFlag; "No Decision" is closed but neither won nor lost), `/sales/probabilities`, `/sales/stages`
  (the sales stages: the opportunity's `stage` reference, independent of its `status`; no open / won flags),
  `/company/companies[/{id}[/sites[/{siteId}]]]` (sites with addressLine1/2, city, stateReference, zip,
  country; a company's `_info.lastUpdated` is its own change time, filterable as
  `conditions=_info/lastUpdated>=[...]`: renaming a company moves it, NOT its opportunities' lastUpdated),
  `/system/members`, and `/count` on the lists. Custom fields without a value carry no `value` key.
- Security roles: every API area can be refused (`sim.refused`, 403 `{"code": "Unauthorized", "message":
  "You do not have permission ..."}`); tenant VARIANTS select the refusals, renamed statuses and stages, and
  extra custom fields; `truth(sim)` is the tenant as a CW user sees it (for the variant matrix test).
- Writes: POST, PUT, PATCH (JSON-Patch array), DELETE (hard delete, no delete feed).
- Forecast lines (docs/crm-write-webhook-notes.md §4.1, pyconnectwise's ForecastItem): `POST .../forecast` with
  a ForecastItem body (201 + the line), `GET|PUT|PATCH|DELETE .../forecast/{forecastId}`; PATCH takes a JSON
  Patch array (add / replace / remove, paths with or without a leading slash, `billCycle/id`), all or nothing.
  `forecastType` is required (Other1|Other2|Agreement|Product|Service), `forecastDescription` <= 50 characters,
  `billCycle` must name one of `/finance/billingCycles` (tenant names, CW's `billingOptions` enum); a bad body
  is 400 `{code: InvalidObject, message: "forecastItem object is invalid", errors: [{code:
  MissingRequiredField|InvalidField, message, resource, field}]}`, an unknown line 404 NotFound. Lines are
  derived from the world's amount until one is written, then stored; the world's amount is kept equal to their
  sum (what the sync reads). A forecast write moves the opportunity's `_info.lastUpdated` (unverified; the
  forecast_keeps_last_updated variant does not). Writes need the Add / Edit / Delete level on Sales >
  Opportunities (read_only_opportunities: 403 Unauthorized).
- Errors `{"code", "message", "errors": [...]}`; 429 with `Retry-After` (seconds), also from an optional
  per-minute request allowance the simulator counts (`requests_per_minute`). CW sends no usage headers.
- Close time: `closedDate` (`YYYY-MM-DDTHH:MM:SSZ`) and `closedBy` (a member reference) are set while the
  opportunity stands in a status with closedFlag (from the world's `closed_at`: stamped when it entered that
  status) and null while it is open; a reopen clears both (docs/crm-api-notes.md §4.5: "set when the opportunity
  closes"; the clearing on reopen is not documented and follows the world). `closedDate` is filterable
  (`closedDate>=[...]`). The `migrated_history` variant has closed records without a closedDate.
- Read by id: `conditions=id in (...)` on the list; an id the tenant no longer has (hard delete) is simply not
  in the array. CW runs on IIS, whose request filtering refuses a query string over 2048 bytes
  (maxQueryString default) with a 404.15 HTML page before the application sees it: so does the simulator.
- Callbacks (docs/crm-write-webhook-notes.md §4.2; lib/webhooks/connectwise.py cites the sources):
  `GET|POST /system/callbacks`, `GET|PATCH|DELETE /system/callbacks/{id}` (CallbackEntry; an owner-level callback
  is stored with objectId 1; a level the type does not know is 400 "Unrecognized level for type"), and the
  unauthenticated key endpoint `GET /{codebase}/system/callbackkey/index.rails?companyName=..&id=..` ->
  `{"signing_key"}`. Every change of an opportunity (API write or simulated activity) is posted, one record per
  request, to every active opportunity callback whose level matches (owner: all; status / company / opportunity:
  objectId), with CW's payload (MessageId, FromUrl, CompanyId, MemberId, Action, Type, ID, Entity as a JSON string,
  null on deletes, Metadata.key_url ...) signed in `x-content-signature` = base64(HMAC-SHA256(SHA-256(signing
  key), body)). The record id is appended to a callback URL ending in `=` (`...?id=`). A callback with
  isSelfSuppressedFlag gets nothing for the API member's own changes. `/__sandbox/webhooks {"url"}` adds a
  callback configured outside the API (owner level); the sender's faults drop / delay / duplicate deliveries.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import requests

from oppsync_pipeline.lib.record import format_address
from oppsync_pipeline.sandbox.kit.formats import fmt_datetime
from oppsync_pipeline.sandbox.kit.lexer import TokenCursor, lex
from oppsync_pipeline.sandbox.kit.limits import Window
from oppsync_pipeline.sandbox.kit.snapshots import QueryCache
from oppsync_pipeline.sandbox.kit.webhooks import Change, Outgoing, WebhookSender
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, HttpError, Request, Response, Simulator
from oppsync_pipeline.sandbox.world import Clock, SimOpportunity, SimStage, TenantProfile, World

CRM = "connectwise"
COMPANY_ID = "oppsync"
CODEBASE = "v2025_1/"
SANDBOX_CREDENTIALS = {
    "company_id": COMPANY_ID,
    "public_key": "sandboxPublicKey1",
    "private_key": "sandboxPrivateKey1",
    "client_id": "2f8c3b1e-6a4d-4c1b-9e7f-0a1b2c3d4e5f",
}
# The tenant's callback signing key, served at Metadata.key_url (`/system/callbackkey/index.rails?id=<key_id>`).
SANDBOX_WEBHOOK_SECRETS = {
    "signing_key": "sandboxCallbackSigningKey1",
    "key_id": "e17e6674-42f6-4105-9cff-4cd6cb4e62e8",
}
# The receiver checks callbacks carry this tenant's company (it does not read the secrets file for it).
SANDBOX_WEBHOOK_OPTIONS = {"company_id": COMPANY_ID}
# The API member the sandbox's keys belong to: it creates callbacks and makes every change written through the API.
API_MEMBER_ID = 149
API_MEMBER_IDENTIFIER = "oppsyncapi"
PRODUCT_INSTANCE_ID = "639c96cab2eb560001dd1324"
PARTNER_ID = "61ddc2817bcddc0001c74208"
# Callback levels per type (CW's "PSA Callbacks" page); types not listed accept any level and never fire here.
CALLBACK_LEVELS = {"opportunity": ("owner", "status", "company", "opportunity")}
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 25
# IIS request filtering's default maxQueryString (bytes): a longer query string never reaches CW's API.
MAX_QUERY_STRING = 2048
# migrated_history: the tenant went live on ConnectWise this long before the data's anchor; closes before that
# were imported with their closed status but without a closedDate.
GO_LIVE_BEFORE_ANCHOR = timedelta(days=365)

# Tenant statuses: id, name, closed, won, lost, inactive, default, probability the world gives the stage.
STATUSES = [
    (1, "Open", False, False, False, False, True, 20.0),
    (2, "Won", True, True, False, False, False, 100.0),
    (3, "Lost", True, False, True, False, False, 0.0),
    (4, "No Decision", True, False, False, False, False, 0.0),
    (5, "Quoted", False, False, False, False, False, 50.0),
    (6, "Negotiation", False, False, False, False, False, 80.0),
    (7, "On Hold", False, False, False, True, False, 10.0),
]
# Sales stages (`/sales/stages`): the pipeline step users see, independent of the status. id, name, and
# whether won opportunities stand there (the world's assignment only: CW stages carry no open / won flags).
SALES_STAGES = [
    (1, "1.Prospect", False),
    (2, "2.Qualification", False),
    (3, "3.Quote", False),
    (4, "4.Negotiation", False),
    (5, "5.Closing", True),
]
# A tenant that renamed and re-numbered both lists (admins do: Setup Tables > Opportunity Status / Stage).
CUSTOM_STATUSES = [
    (11, "Active", False, False, False, False, True, 20.0),
    (12, "Pending Contract", False, False, False, False, False, 70.0),
    (13, "Closed - Won", True, True, False, False, False, 100.0),
    (14, "Closed - Lost", True, False, True, False, False, 0.0),
    (15, "Closed - No Decision", True, False, False, False, False, 0.0),
    (16, "Stalled", False, False, False, True, False, 10.0),
]
CUSTOM_SALES_STAGES = [
    (31, "Discovery", False),
    (32, "Demo", False),
    (33, "Proposal", False),
    (34, "Contracting", False),
    (35, "Signed", True),
]
# Endpoints and the security-role area that grants them (System > Security Roles, Inquire Level). A test can
# refuse any of them (`sim.refused = {...}`); the no_optional_rights variant refuses the OPTIONAL ones.
AREAS = {
    "statuses": (r"/sales/opportunities/statuses(/\d+)?$", "Sales > Opportunity Status (Table Setup)"),
    "opportunities": (r"/sales/opportunities(/count|/\d+)?$", "Sales > Opportunities"),
    "stages": (r"/sales/stages(/\d+)?$", "Sales > Opportunity Stage (Table Setup)"),
    "probabilities": (r"/sales/probabilities(/\d+)?$", "Sales > Opportunity Probability (Table Setup)"),
    "members": (r"/system/members(/count|/\d+)?$", "System > Member Maintenance"),
    "companies": (r"/company/companies(/.*)?$", "Companies > Company Maintenance"),
    "forecast": (
        r"/sales/opportunities/\d+/forecast(/\d+)?$",
        "Sales > Opportunity forecast (Sales > Opportunities: Forecast)",
    ),
    "billing_cycles": (r"/finance/billingCycles(/\d+)?$", "Finance > Billing Cycles (Table Setup)"),
}
# What a write needs beyond Inquire: the security role's Add / Edit / Delete level on Sales > Opportunities, which
# also governs the opportunity's forecast lines (the read_only_opportunities variant has them at None).
WRITE_LEVELS = {"POST": "Add Level", "PUT": "Edit Level", "PATCH": "Edit Level", "DELETE": "Delete Level"}
OPTIONAL_AREAS = frozenset({"stages", "probabilities", "members", "companies", "forecast"})
# Tenant variants the tests can select (`build(variant=...)`, `Sandbox(variants={...})`).
VARIANTS = {
    "default": "the sandbox tenant: statuses Open/Won/Lost/No Decision/Quoted/Negotiation/On Hold, sales stages "
    "1.Prospect..5.Closing, custom fields Region and Original Created; the API member may read everything",
    "no_optional_rights": "the API member's security role lacks every optional area: /sales/stages, "
    "/sales/probabilities, /system/members, /company/companies (sites) and the per-opportunity "
    "forecast answer 403 {code: Unauthorized}",
    "custom_statuses": "statuses and sales stages renamed and re-numbered (Active, Pending Contract, Closed - Won ...; "
    "Discovery, Demo, Proposal, Contracting, Signed)",
    "custom_fields": "more opportunity custom fields, some named like standard fields (Stage, Amount, Site) with "
    "values that differ from them, a Number and a Checkbox field and empty values",
    "read_only_opportunities": "the API member's security role has Sales > Opportunities at Inquire only (Add, Edit "
    "and Delete Level None): reads work, every POST / PUT / PATCH / DELETE under /sales/opportunities (the "
    "opportunity and its forecast lines) answers 403 {code: Unauthorized}",
    "forecast_keeps_last_updated": "a forecast line written through the API changes the forecast (and the amount "
    "a sync reads) but not the opportunity's _info.lastUpdated: whether CW moves it is unverified, and this is the "
    "case where an incremental sync misses the change",
    "migrated_history": "a tenant that moved to ConnectWise a year before the data's anchor: opportunities closed "
    "before go-live were imported in their closed status with closedDate and closedBy empty "
    "(CW stamps them only when a record enters a closed status); later closes carry them",
}
CURRENCIES = {
    "USD": {
        "id": 7,
        "symbol": "$",
        "currencyCode": "USD",
        "decimalSeparator": ".",
        "numberOfDecimals": 2,
        "thousandsSeparator": ",",
        "negativeParenthesesFlag": False,
        "displaySymbolFlag": True,
        "currencyIdentifier": "USD",
        "displayIdFlag": False,
        "rightAlign": False,
        "name": "US Dollars",
    },
    "EUR": {
        "id": 8,
        "symbol": "€",
        "currencyCode": "EUR",
        "decimalSeparator": ",",
        "numberOfDecimals": 2,
        "thousandsSeparator": ".",
        "negativeParenthesesFlag": False,
        "displaySymbolFlag": True,
        "currencyIdentifier": "EUR",
        "displayIdFlag": False,
        "rightAlign": True,
        "name": "Euro",
    },
    "GBP": {
        "id": 9,
        "symbol": "£",
        "currencyCode": "GBP",
        "decimalSeparator": ".",
        "numberOfDecimals": 2,
        "thousandsSeparator": ",",
        "negativeParenthesesFlag": False,
        "displaySymbolFlag": True,
        "currencyIdentifier": "GBP",
        "displayIdFlag": False,
        "rightAlign": False,
        "name": "Pound Sterling",
    },
}
_CODES = {
    "NOT_FOUND": "NotFound",
    "METHOD_NOT_ALLOWED": "MethodNotAllowed",
    "INTERNAL_ERROR": "UnexpectedError",
    "SERVER_UNAVAILABLE": "ServiceUnavailable",
}
REGIONS = ["West", "East", "North", "South", None]
FORECAST_TYPES = ["Service", "Product", "Agreement"]
# ForecastItem.forecastType, required (pyconnectwise's generated model, docs/crm-write-webhook-notes.md §4.1)
FORECAST_TYPE_VALUES = ("Other1", "Other2", "Agreement", "Product", "Service")
FORECAST_ID_BASE = 500_000  # ids of lines created through the API (generated lines are seq * 10 + i)
# ForecastItem's writable fields and their JSON types (pyconnectwise ForecastItem); margin is computed.
FORECAST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "forecastType": str,
    "forecastDescription": str,
    "revenue": (int, float),
    "cost": (int, float),
    "quantity": (int, float),
    "percentage": (int, float),
    "includeFlag": bool,
    "linkFlag": bool,
    "taxableFlag": bool,
    "recurringFlag": bool,
    "recurringRevenue": (int, float),
    "recurringCost": (int, float),
    "recurringDateStart": str,
    "recurringDateEnd": str,
    "cycles": int,
    "cycleBasis": str,
    "billCycle": dict,
    "sequenceNumber": (int, float),
    "productDescription": str,
    "productClass": str,
    "catalogItem": dict,
    "status": dict,
    "subNumber": int,
}
# The tenant's billing cycles (Finance > Billing Cycles): names are the tenant's own; `billingOptions` is CW's
# enum (pyconnectwise BillingCycle: Weekly, BiWeekly, Monthly, BiMonthly, Quarterly, SemiAnnual, Yearly,
# NotRecurring). id, identifier (<= 5), name, billingOptions, defaultFlag.
BILLING_CYCLES = [
    (1, "M", "Monthly", "Monthly", True),
    (2, "Q", "Quarterly", "Quarterly", False),
    (3, "A", "Annual", "Yearly", False),
    (4, "SA", "Semi-Annual", "SemiAnnual", False),
    (5, "W", "Weekly", "Weekly", False),
]
MEMBER_ID_BASE = 150
COMPANY_ID_BASE = 250


def _iso(value: datetime | date | None) -> str | None:
    return fmt_datetime(value)


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9]", "", ascii_text)


# -- the conditions language -----------------------------------------------------------------------------------


class ConditionError(ValueError):
    pass


_TOKEN = re.compile(
    r"""
    \s*(?:
      (?P<lp>\() | (?P<rp>\)) | (?P<comma>,)
    | (?P<op><=|>=|!=|<>|=|<|>)
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<dt>\[[^\]]*\])
    | (?P<num>-?\d+(?:\.\d+)?(?![A-Za-z_/]))
    | (?P<word>[A-Za-z_][A-Za-z0-9_/.]*)
    )""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    text = text.rstrip()
    return [
        (kind, value)
        for kind, value, _ in lex(
            _TOKEN,
            text,
            lambda pos: ConditionError(f"unexpected character at position {pos}: {text[pos : pos + 10]!r}"),
        )
    ]


def _unquote(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _parse_dt(text: str) -> datetime:
    inner = text[1:-1].strip()
    try:
        if inner.endswith("Z"):
            inner = inner[:-1]
        value = datetime.fromisoformat(inner)
    except ValueError:
        raise ConditionError(f"{text} is not a valid date-time") from None
    return value.replace(tzinfo=None)


Getter = Callable[[Any, str], Any]
Predicate = Callable[[Any], bool]


class _Parser(TokenCursor):
    """Recursive descent: expr := term (or term)*; term := factor (and factor)*;
    factor := not factor | ( expr ) | path op value."""

    def __init__(self, text: str, getter: Getter, known: Callable[[str], bool]):
        super().__init__(_tokens(text))
        self.getter = getter
        self.known = known

    def parse(self) -> Predicate:
        pred = self.expr()
        if self.i != len(self.toks):
            raise ConditionError(f"unexpected {self.toks[self.i][1]!r}")
        return pred

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ConditionError("unexpected end of conditions")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def word(self, *words: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "word" and tok[1].lower() in words:
            self.i += 1
            return True
        return False

    def expr(self) -> Predicate:
        parts = [self.term()]
        while self.word("or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else (lambda r, ps=parts: any(p(r) for p in ps))

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self.word("and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else (lambda r, ps=parts: all(p(r) for p in ps))

    def factor(self) -> Predicate:
        if self.word("not"):
            inner = self.factor()
            return lambda r: not inner(r)
        tok = self.peek()
        if tok and tok[0] == "lp":
            self.take()
            inner = self.expr()
            if self.take()[0] != "rp":
                raise ConditionError("missing ')'")
            return inner
        kind, path = self.take()
        if kind != "word":
            raise ConditionError(f"expected a field name, got {path!r}")
        if not self.known(path):
            raise ConditionError(f"Unknown field '{path}'")
        negate = self.word("not")
        tok = self.take()
        if tok[0] == "op":
            if negate:
                raise ConditionError("'not' before a comparison operator")
            op = "!=" if tok[1] == "<>" else tok[1]
            value = self.value()
            return _compare(self.getter, path, op, value)
        word = tok[1].lower() if tok[0] == "word" else ""
        if word == "in":
            if self.take()[0] != "lp":
                raise ConditionError("'in' needs a parenthesised list")
            values = [self.value()]
            while True:
                t = self.take()
                if t[0] == "rp":
                    break
                if t[0] != "comma":
                    raise ConditionError("expected ',' or ')' in list")
                values.append(self.value())
            keys = {_norm(v) for v in values}
            get = self.getter
            pred: Predicate = lambda r: _norm(get(r, path)) in keys  # noqa: E731 - a closure the parser returns
        elif word in ("contains", "like"):
            value = self.value()
            if not isinstance(value, str):
                raise ConditionError(f"'{word}' needs a string value")
            needle = value.lower()
            if word == "contains":
                rx = re.compile(re.escape(needle))
            else:
                rx = re.compile("^" + ".*".join(re.escape(p) for p in re.split(r"[*%]", needle)) + "$")
            get = self.getter
            pred = lambda r: (v := get(r, path)) is not None and rx.search(str(v).lower()) is not None  # noqa: E731
        else:
            raise ConditionError(f"unknown operator {tok[1]!r}")
        return (lambda r: not pred(r)) if negate else pred

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "str":
            return _unquote(text)
        if kind == "dt":
            return _parse_dt(text)
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "word" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "word" and text.lower() == "null":
            return None
        raise ConditionError(f"expected a value, got {text!r}")


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        return v.lower()
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, date) and not isinstance(v, datetime):
        return datetime(v.year, v.month, v.day)
    return v


def _compare(get: Getter, path: str, op: str, value: Any) -> Predicate:
    want = _norm(value)

    def pred(r: Any) -> bool:
        have = _norm(get(r, path))
        if op == "=":
            return have == want
        if op == "!=":
            return have != want
        if have is None or want is None:
            return False
        if isinstance(have, datetime) and not isinstance(want, datetime):
            # CW wants date-times in [brackets]; a quoted date is an error, not a silent mismatch
            raise HttpError(400, "InvalidObject", f"conditions: {path} is a date-time; write it as [{want}]")
        if isinstance(have, (int, float)) and isinstance(want, str):
            return False
        try:
            return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want}[op]
        except TypeError:
            return False

    return pred


def compile_conditions(text: str | None, getter: Getter, known: Callable[[str], bool]) -> Predicate:
    if not text or not text.strip():
        return lambda r: True
    try:
        return _Parser(text, getter, known).parse()
    except ConditionError as err:
        raise HttpError(400, "InvalidObject", f"conditions: {err}") from None


def dict_getter(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        key = next((k for k in value if k.lower() == part.lower()), None)
        if key is None:
            return None
        value = value[key]
    if isinstance(value, str) and len(value) == 20 and value[4] == "-" and value.endswith("Z"):
        try:
            return datetime.fromisoformat(value[:-1])
        except ValueError:
            return value
    return value


def order_key(spec: str | None, getter: Getter) -> list[tuple[str, bool]]:
    """`orderBy=_info/lastUpdated asc, id desc` -> [(path, descending)]."""
    keys = []
    for part in (spec or "").split(","):
        words = part.split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise HttpError(400, "InvalidObject", f"orderBy: cannot parse '{part.strip()}'")
        keys.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    return keys


def sort_records(records: list[Any], keys: list[tuple[str, bool]], getter: Getter) -> list[Any]:
    for path, desc in reversed(keys):
        # nulls first ascending, like SQL Server
        records.sort(
            key=lambda r: (lambda v: (v is not None, v if v is not None else 0))(_norm(getter(r, path))), reverse=desc
        )
    return records


def select_fields(record: dict[str, Any], fields: str | None) -> dict[str, Any]:
    if not fields:
        return record
    out: dict[str, Any] = {}
    for f in fields.split(","):
        parts = f.strip().split("/")
        src: Any = record
        dst = out
        for i, part in enumerate(parts):
            if not isinstance(src, dict):
                break
            key = next((k for k in src if k.lower() == part.lower()), None)
            if key is None:
                break
            if i == len(parts) - 1:
                dst[key] = src[key]
            else:
                src = src[key]
                dst = dst.setdefault(key, {})
    return out


# -- the simulator ---------------------------------------------------------------------------------------------

OPP_FIELDS = {
    "id",
    "name",
    "company/id",
    "company/identifier",
    "company/name",
    "site/id",
    "site/name",
    "primarysalesrep/id",
    "primarysalesrep/identifier",
    "primarysalesrep/name",
    "status/id",
    "status/name",
    "stage/id",
    "stage/name",
    "probability/id",
    "expectedclosedate",
    "closeddate",
    "closedby",
    "datebecamelead",
    "currency/id",
    "currency/currencycode",
    "_info/lastupdated",
    "lastupdated",
    "_info/dateentered",
    "dateentered",
    "_info/enteredby",
    "enteredby",
    "_info/updatedby",
    "updatedby",
    "closedflag",
    "source",
    "locationid",
    "businessunitid",
    "type/id",
    "type/name",
}


@dataclass(frozen=True)
class CallbackRequest(Outgoing):
    """One callback: CW posts to each callback's own URL (`url`, absolute), not to one subscription URL."""

    url: str = ""


@dataclass
class CallbackSender(WebhookSender):
    """The sender, with what ConnectWise adds: each change remembers who made it (`actor()` at change time:
    isSelfSuppressedFlag), and each request goes to its callback's URL."""

    actor: Callable[[], str | None] = lambda: None
    actors: dict[int, str | None] = field(default_factory=dict)

    def _on_change(self, kind: str, opp: SimOpportunity) -> None:
        if self.url is None:
            return
        self._seq += 1
        self.actors[self._seq] = self.actor()
        self._queue.put(Change(kind, opp, self._seq))

    def _post(self, request: Outgoing) -> None:
        if not isinstance(request, CallbackRequest) or not request.url:
            super()._post(request)
            return
        try:
            r = requests.request(request.method, request.url, data=request.body, headers=request.headers, timeout=10)
            self.sent.append({"status": r.status_code, "url": request.url})
        except requests.RequestException as err:  # CW's retries are undocumented; the hourly sync catches up
            self.sent.append({"status": "error", "error": type(err).__name__})


class ConnectWiseSimulator(Simulator):
    crm = CRM

    def __init__(
        self,
        world: World,
        faults: FaultPlan | None = None,
        requests_per_minute: int | None = None,
        variant: str = "default",
    ):
        super().__init__(world, faults)
        if variant not in VARIANTS:
            raise ValueError(f"unknown connectwise sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
        self.variant = variant
        self.refused: frozenset[str] = OPTIONAL_AREAS if variant == "no_optional_rights" else frozenset()
        self.read_only_opportunities = variant == "read_only_opportunities"
        self.status_rows = CUSTOM_STATUSES if variant == "custom_statuses" else STATUSES
        self.stage_rows = CUSTOM_SALES_STAGES if variant == "custom_statuses" else SALES_STAGES
        self.cache = QueryCache()
        self.requests_per_minute = requests_per_minute
        self.requests = Window(lambda: self.requests_per_minute or 0, timedelta(minutes=1), world.clock.now)
        self.members = {u.native_id: u for u in world.users}
        self.member_by_id = {MEMBER_ID_BASE + u.idx: u for u in world.users}
        self.statuses = {int(s.key): s for s in world.stages.values()}
        # Forecast lines written through the API (or of an opportunity whose lines were): opportunity id -> its
        # lines' stored fields, and the world's amount they sum to (see forecast_items).
        self.forecasts: dict[str, list[dict[str, Any]]] = {}
        self.forecast_basis: dict[str, float | None] = {}
        self.next_forecast_id = FORECAST_ID_BASE
        # Callbacks (/system/callbacks) by id; the member making the current request's changes (the API member
        # inside an API request); the host clients call (FromUrl, key_url).
        self.callbacks: dict[int, dict[str, Any]] = {}
        self.next_callback_id = 26_500
        self._local = threading.local()
        self.site_host = "127.0.0.1"
        self.webhooks = CallbackSender(
            world, self._callback_requests, actor=lambda: getattr(self._local, "member", None)
        ).start()
        self.route("GET", r"/login/companyinfo/(?P<company>[^/]+)", self._companyinfo)
        self.route("GET", r"/(?P<codebase>v[0-9a-z_]+)/+system/callbackkey/index\.rails", self._callback_key)
        api = r"/(?P<codebase>v[0-9a-z_]+)/apis/3\.0"
        route = functools.partial(self.route, guard=self._guard)  # Basic auth + clientId, allowance, role
        route("GET", api + r"/sales/opportunities", self._list_opps)
        route("POST", api + r"/sales/opportunities", self._create_opp)
        route("GET", api + r"/sales/opportunities/count", self._count_opps)
        route("GET", api + r"/sales/opportunities/statuses", self._list_statuses)
        route("GET", api + r"/sales/opportunities/statuses/(?P<id>\d+)", self._get_status)
        route("GET", api + r"/sales/opportunities/(?P<id>\d+)", self._get_opp)
        route("PATCH", api + r"/sales/opportunities/(?P<id>\d+)", self._patch_opp)
        route("PUT", api + r"/sales/opportunities/(?P<id>\d+)", self._put_opp)
        route("DELETE", api + r"/sales/opportunities/(?P<id>\d+)", self._delete_opp)
        route("GET", api + r"/sales/opportunities/(?P<id>\d+)/forecast", self._get_forecast)
        route("POST", api + r"/sales/opportunities/(?P<id>\d+)/forecast", self._add_forecast)
        item = api + r"/sales/opportunities/(?P<id>\d+)/forecast/(?P<fid>\d+)"
        route("GET", item, self._get_forecast_item)
        route("PUT", item, self._put_forecast_item)
        route("PATCH", item, self._patch_forecast_item)
        route("DELETE", item, self._delete_forecast_item)
        route("GET", api + r"/finance/billingCycles", self._list_billing_cycles)
        route("GET", api + r"/sales/probabilities", self._list_probabilities)
        route("GET", api + r"/sales/stages", self._list_stages)
        route("GET", api + r"/sales/stages/(?P<id>\d+)", self._get_stage)
        route("GET", api + r"/system/members", self._list_members)
        route("GET", api + r"/system/members/count", self._count_members)
        route("GET", api + r"/system/members/(?P<id>\d+)", self._get_member)
        route("GET", api + r"/company/companies", self._list_companies)
        route("GET", api + r"/company/companies/(?P<id>\d+)", self._get_company)
        route("GET", api + r"/company/companies/(?P<id>\d+)/sites", self._list_sites)
        route("GET", api + r"/company/companies/(?P<id>\d+)/sites/(?P<site>\d+)", self._get_site)
        route("GET", api + r"/system/callbacks", self._list_callbacks)
        route("POST", api + r"/system/callbacks", self._create_callback)
        route("GET", api + r"/system/callbacks/(?P<id>\d+)", self._get_callback)
        route("PATCH", api + r"/system/callbacks/(?P<id>\d+)", self._patch_callback)
        route("DELETE", api + r"/system/callbacks/(?P<id>\d+)", self._delete_callback)

    # -- framework hooks ---------------------------------------------------------------------------------------

    def error_response(self, err: HttpError) -> Response:
        code = _CODES.get(err.code, err.code)  # the framework's own errors, in CW's PascalCase codes
        body: dict[str, Any] = {"code": code, "message": err.message}
        if err.status == 400 and err.code == "InvalidObject":
            body["errors"] = getattr(err, "errors", None) or []
        return Response.json(body, err.status, err.headers)

    def rate_limit_response(self, rule: FaultRule) -> Response:
        return Response.json(
            {"code": "TooManyRequests", "message": "Too many requests. Please retry later."},
            429,
            {"Retry-After": str(max(1, int(rule.seconds)))},
        )

    def handle(self, req: Request) -> Response:
        query = req.raw_path.partition("?")[2]
        if len(query.encode("utf-8")) > MAX_QUERY_STRING:
            return iis_query_too_long()
        if "/apis/3.0/" in req.path:
            codebase = req.path.lstrip("/").split("/", 1)[0] + "/"
            if codebase not in (CODEBASE, "v4_6_release/"):
                # an unknown codebase is not this tenant's API at all (cloud answers 404 before any auth)
                return self.error_response(
                    HttpError(404, "NotFound", f"The requested codebase {codebase} was not found")
                )
        if not self.unfaulted.match(req.path):
            self.site_host = req.host
        # changes made while serving an API request are the API member's (MemberId, isSelfSuppressedFlag)
        self._local.member = API_MEMBER_IDENTIFIER if "/apis/3.0/" in req.path else None
        try:
            return super().handle(req)
        finally:
            self._local.member = None

    def _guard(self, req: Request) -> None:
        self._authenticate(req)
        self._allowance()
        self._authorize(req)

    def _authorize(self, req: Request) -> None:
        """The API member's security role: an area it may not inquire on answers 403 (no_optional_rights); a
        write under /sales/opportunities without the Add / Edit / Delete level answers 403 (read_only_opportunities).
        """
        path = req.path.split("/apis/3.0", 1)[1]
        level = WRITE_LEVELS.get(req.method.upper())
        if level and self.read_only_opportunities and path.startswith("/sales/opportunities"):
            raise HttpError(
                403,
                "Unauthorized",
                f"You do not have permission to access this resource. "
                f"Required security role permission: Sales > Opportunities ({level})",
            )
        if not self.refused:
            return
        for area in self.refused:
            pattern, role = AREAS[area]
            if re.search(pattern, path):
                raise HttpError(
                    403,
                    "Unauthorized",
                    f"You do not have permission to access this resource. "
                    f"Required security role permission: {role} (Inquire Level)",
                )

    def _authenticate(self, req: Request) -> None:
        if not req.header("clientid"):
            raise HttpError(
                400,
                "InvalidObject",
                "A clientId header is required. Register one at https://developer.connectwise.com/ClientID",
            )
        auth = req.header("authorization") or ""
        expected = "{company_id}+{public_key}:{private_key}".format(**SANDBOX_CREDENTIALS)
        ok = False
        if auth.startswith("Basic "):
            try:
                ok = base64.b64decode(auth[6:]).decode("utf-8") == expected
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            raise HttpError(401, "Unauthorized", "Incorrect public/private key")

    def _allowance(self) -> None:
        if self.requests_per_minute and self.requests.take() is None:
            wait = max(1, int(self.requests.retry_after().total_seconds()))
            raise HttpError(
                429, "TooManyRequests", "Too many requests. Please retry later.", {"Retry-After": str(wait)}
            )

    # -- rendering ---------------------------------------------------------------------------------------------

    def _href(self, req: Request | None, path: str) -> str:
        host = req.host if req else "127.0.0.1"
        codebase = (req.params.get("codebase") + "/") if req and req.params.get("codebase") else CODEBASE
        return f"http://{host}/{codebase}apis/3.0{path}"

    def member_ref(self, idx: int, req: Request | None) -> dict[str, Any]:
        u = self.world.users[idx]
        mid = MEMBER_ID_BASE + u.idx
        return {
            "id": mid,
            "identifier": u.native_id,
            "name": u.name,
            "_info": {"member_href": self._href(req, f"/system/members/{mid}")},
        }

    def render(self, o: SimOpportunity, req: Request | None = None) -> dict[str, Any]:
        st = self.world.stages[o.stage]
        sid = int(st.key)
        acc = self.world.accounts[o.account] if o.account is not None else None
        prob = None if o.probability is None else int(round(o.probability / 10.0)) * 10
        closed_at = self.closed_date(o)
        sales_stage = self.world.sales_stage_of(o)
        region = (o.extra or {}).get("Region", REGIONS[o.seq % len(REGIONS)])
        currency = CURRENCIES.get(o.currency, CURRENCIES["USD"])
        custom = [
            {
                "id": 1,
                "caption": "Region",
                "type": "Text",
                "entryMethod": "EntryField",
                "numberOfDecimals": 0,
                "value": region,
            },
            {
                "id": 2,
                "caption": "Original Created",
                "type": "Date",
                "entryMethod": "EntryField",
                "numberOfDecimals": 0,
                "value": (o.extra or {}).get("Original Created"),
            },
        ]
        if self.variant == "custom_fields":
            custom += self.extra_custom_fields(o)
        for cf in custom:  # CW leaves `value` out of a custom field that has none
            if cf.get("value") is None:
                cf.pop("value", None)
        return {
            "id": int(o.native_id),
            "name": o.name,
            "type": {
                "id": 1,
                "name": "Managed Services",
                "_info": {"type_href": self._href(req, "/sales/opportunities/types/1")},
            },
            "stage": {
                "id": int(sales_stage.key),
                "name": sales_stage.label,
                "_info": {"stage_href": self._href(req, f"/sales/stages/{sales_stage.key}")},
            },
            "status": {
                "id": sid,
                "name": st.label,
                "_info": {"status_href": self._href(req, f"/sales/opportunities/statuses/{sid}")},
            },
            "priority": {"id": 7, "name": "Clear Flag", "_info": None},
            "probability": None
            if prob is None
            else {
                "id": prob // 10 + 1,
                "name": f"{prob}%",
                "_info": {"probability_href": self._href(req, f"/sales/probabilities/{prob // 10 + 1}")},
            },
            "rating": {"id": 4, "name": "Hot", "_info": None},
            "expectedCloseDate": _iso(o.close_date),
            "closedDate": _iso(closed_at),
            "closedBy": self.member_ref(o.owner, req) if closed_at is not None else None,
            "company": None
            if acc is None
            else {
                "id": int(acc.native_id),
                "identifier": _slug(acc.name)[:25],
                "name": acc.name,
                "_info": {"company_href": self._href(req, f"/company/companies/{acc.native_id}")},
            },
            "site": None
            if acc is None
            else {
                "id": int(acc.site_id or 0),
                "name": acc.site_name,
                "_info": {"site_href": self._href(req, f"/company/companies/{acc.native_id}/sites/{acc.site_id}")},
            },
            "primarySalesRep": self.member_ref(o.owner, req),
            "secondarySalesRep": None,
            "locationId": 2,
            "businessUnitId": 10,
            "source": "Referral",
            "dateBecameLead": _iso(o.created_at),
            "currency": {
                **currency,
                "_info": {"currency_href": self._href(req, f"/finance/currencies/{currency['id']}")},
            },
            "totalSalesTax": 0.0,
            "customFields": custom,
            "_info": {
                "lastUpdated": _iso(o.modified_at),
                "updatedBy": self.world.users[o.owner].native_id,
                "dateEntered": _iso(o.created_at),
                "enteredBy": self.world.users[o.creator].native_id,
                "notes_href": self._href(req, f"/sales/opportunities/{o.native_id}/notes"),
                "forecast_href": self._href(req, f"/sales/opportunities/{o.native_id}/forecast"),
            },
        }

    def closed_date(self, o: SimOpportunity) -> datetime | None:
        """The record's closedDate: when it entered its closed status, null while open; in migrated_history
        null too for closes before go-live (imported closed, never stamped)."""
        if not self.world.stages[o.stage].is_closed or o.closed_at is None:
            return None
        if self.variant == "migrated_history" and o.closed_at < self.go_live():
            return None
        return o.closed_at

    def go_live(self) -> datetime:
        return self.world.clock.start - GO_LIVE_BEFORE_ANCHOR

    def extra_custom_fields(self, o: SimOpportunity) -> list[dict[str, Any]]:
        """custom_fields: captions that look like standard fields (a connector must never read them as such),
        a Number, a Checkbox, and fields that are empty on many records."""
        decoy = self.world.sales_stages[sorted(self.world.sales_stages)[o.seq % len(self.world.sales_stages)]]
        return [
            {
                "id": 3,
                "caption": "Stage",
                "type": "Text",
                "entryMethod": "List",
                "numberOfDecimals": 0,
                "value": f"Legacy {decoy.label}" if o.seq % 4 else None,
            },
            {
                "id": 4,
                "caption": "Amount",
                "type": "Number",
                "entryMethod": "EntryField",
                "numberOfDecimals": 2,
                "value": round((o.seq * 137.5) % 9000, 2),
            },
            {
                "id": 5,
                "caption": "Site",
                "type": "Text",
                "entryMethod": "EntryField",
                "numberOfDecimals": 0,
                "value": "Remote\nsecond line" if o.seq % 3 == 0 else None,
            },
            {
                "id": 6,
                "caption": "Renewal",
                "type": "Checkbox",
                "entryMethod": "EntryField",
                "numberOfDecimals": 0,
                "value": o.seq % 2 == 0,
            },
        ]

    def forecast_items(self, o: SimOpportunity) -> list[dict[str, Any]]:
        """The opportunity's forecast lines as CW renders them. Until one of its lines is written through the
        API they are derived from the world's amount (1-3 lines that sum to it exactly, to the cent); from the
        first write on they are stored (`self.forecasts`) and the world's amount is kept equal to their sum."""
        lines = self._stored_lines(o)
        if lines is None:
            lines = self._generated_lines(o)
        return [self._render_line(o, line) for line in lines]

    def _generated_lines(self, o: SimOpportunity) -> list[dict[str, Any]]:
        if o.amount is None:
            return []
        n = 1 + o.seq % 3
        cents = int(round(o.amount * 100))
        shares = [cents // n] * n
        shares[0] += cents - sum(shares)
        lines = []
        for i, share in enumerate(shares):
            revenue = share / 100
            lines.append(
                {
                    "id": o.seq * 10 + i,
                    "forecastType": FORECAST_TYPES[i],
                    "forecastDescription": f"{FORECAST_TYPES[i]} revenue",
                    "revenue": revenue,
                    "cost": round(revenue * 0.6, 2),
                    "recurringFlag": FORECAST_TYPES[i] == "Agreement",
                    "sequenceNumber": i + 1,
                    "_updated": o.modified_at,
                }
            )
        return lines

    def _stored_lines(self, o: SimOpportunity) -> list[dict[str, Any]] | None:
        """The stored lines (None: never written through the API). A change of the world's amount since our
        last write (the world's own activity: a user editing the forecast in CW) lands on the first line not
        created through the API (a new Service line where there is none), so the lines keep summing to it."""
        with self.world.lock:
            lines = self.forecasts.get(o.native_id)
            if lines is None:
                return None
            basis = self.forecast_basis.get(o.native_id)
            if not _same_amount(basis, o.amount):
                delta = round((o.amount or 0.0) - (basis or 0.0), 2)
                theirs = next((line for line in lines if line["id"] < FORECAST_ID_BASE), None)
                if theirs is None:
                    theirs = {"id": o.seq * 10 + 8, "forecastType": "Service", "forecastDescription": "Service revenue"}
                    theirs["revenue"] = 0.0
                    lines.insert(0, theirs)
                theirs["revenue"] = round((theirs.get("revenue") or 0.0) + delta, 2)
                theirs["_updated"] = o.modified_at
                self.forecast_basis[o.native_id] = o.amount
            return lines

    def _materialised(self, o: SimOpportunity) -> list[dict[str, Any]]:
        """The stored lines, storing the generated ones on the opportunity's first forecast write."""
        with self.world.lock:
            lines = self._stored_lines(o)
            if lines is None:
                lines = self.forecasts[o.native_id] = self._generated_lines(o)
                self.forecast_basis[o.native_id] = o.amount
            return lines

    def _forecast_written(self, o: SimOpportunity, line: dict[str, Any] | None) -> None:
        """After a write to the opportunity's lines: the world's amount is their sum (no lines: none), which the
        next sync reads; the opportunity's `_info.lastUpdated` moves too, except in the forecast_keeps_last_updated
        variant (whether CW moves it for a forecast-only change is unverified: crm-write-webhook-notes.md §4.1)."""
        with self.world.lock:
            lines = self.forecasts[o.native_id]
            total = round(sum(line.get("revenue") or 0.0 for line in lines), 2) if lines else None
            now = self.world.clock.now()
            if line is not None:
                line["_updated"] = now
            self.world.update(o.native_id, amount=total, bump=self.variant != "forecast_keeps_last_updated")
            self.forecast_basis[o.native_id] = total

    def _render_line(self, o: SimOpportunity, line: dict[str, Any]) -> dict[str, Any]:
        st = self.world.stages[o.stage]
        revenue = float(line.get("revenue") or 0.0)
        cost = float(line.get("cost") or 0.0)
        out: dict[str, Any] = {
            "id": line["id"],
            "forecastDescription": line.get("forecastDescription"),
            "opportunity": {"id": int(o.native_id), "name": o.name},
            "quantity": line.get("quantity", 1.0),
            "status": line.get("status") or {"id": int(st.key), "name": st.label},
            "catalogItem": line.get("catalogItem"),
            "productDescription": line.get("productDescription"),
            "productClass": line.get("productClass"),
            "revenue": revenue,
            "cost": cost,
            "margin": round(revenue - cost, 2),
            "percentage": round((revenue - cost) / revenue * 100, 2) if revenue else 0.0,
            "includeFlag": line.get("includeFlag", True),
            "linkFlag": line.get("linkFlag", False),
            "recurringFlag": line.get("recurringFlag", False),
            "taxableFlag": line.get("taxableFlag", False),
            "forecastType": line["forecastType"],
            "sequenceNumber": line.get("sequenceNumber"),
            "_info": {"lastUpdated": _iso(line.get("_updated")), "updatedBy": self.world.users[o.owner].native_id},
        }
        # recurring details only where set (CW leaves null properties out of its answers)
        for key in ("recurringRevenue", "recurringCost", "recurringDateStart", "recurringDateEnd", "cycles"):
            if line.get(key) is not None:
                out[key] = line[key]
        if line.get("cycleBasis") is not None:
            out["cycleBasis"] = line["cycleBasis"]
        if line.get("billCycle") is not None:
            out["billCycle"] = line["billCycle"]
        return out

    # -- paging ------------------------------------------------------------------------------------------------

    def _paged(self, req: Request, records: list[Any], render: Callable[[Any], dict[str, Any]]) -> Response:
        fields = req.arg("fields")
        size = _int_arg(req, "pageSize", DEFAULT_PAGE_SIZE)
        if size < 1 or size > MAX_PAGE_SIZE:
            raise HttpError(400, "InvalidObject", f"pageSize must be between 1 and {MAX_PAGE_SIZE}")
        if (req.header("pagination-type") or "").lower() == "forward-only":
            after = _int_arg(req, "pageId", 0)
            ids = [r for r in records if _record_id(r) > after]
            ids.sort(key=_record_id)
            chunk = ids[:size]
            headers = {}
            if len(ids) > size:
                headers["Link"] = f'<{self._link(req, pageId=_record_id(chunk[-1]))}>; rel="next"'
            return Response.json([select_fields(render(r), fields) for r in chunk], headers=headers)
        page = _int_arg(req, "page", 1)
        if page < 1:
            raise HttpError(400, "InvalidObject", "page must be 1 or more")
        total = len(records)
        last = max(1, -(-total // size))
        chunk = records[(page - 1) * size : page * size]
        links = []
        if page > 1:
            links.append(f'<{self._link(req, page=1)}>; rel="first"')
            links.append(f'<{self._link(req, page=min(page - 1, last))}>; rel="prev"')
        if page < last:
            links.append(f'<{self._link(req, page=page + 1)}>; rel="next"')
            links.append(f'<{self._link(req, page=last)}>; rel="last"')
        headers = {"Link": ", ".join(links)} if links else {}
        return Response.json([select_fields(render(r), fields) for r in chunk], headers=headers)

    def _link(self, req: Request, **paging: int) -> str:
        """Same query, paging parameter last (pyconnectwise reads `page=(\\d+)>; rel=...`)."""
        params = [(k, v) for k, vs in req.query.items() if k not in ("page", "pageId") for v in vs]
        params += [(k, str(v)) for k, v in paging.items()]
        host = req.host
        return f"http://{host}{req.path}?" + urlencode(params, quote_via=quote)

    # -- opportunities -----------------------------------------------------------------------------------------

    def _opp_getter(self, o: SimOpportunity, path: str) -> Any:
        p = path.lower()
        if p.startswith("_info/"):
            p = p[6:]
        st = self.world.stages[o.stage]
        acc = self.world.accounts[o.account] if o.account is not None else None
        if p == "id":
            return int(o.native_id)
        if p == "name":
            return o.name
        if p.startswith("company/"):
            if acc is None:
                return None
            return {
                "company/id": int(acc.native_id),
                "company/name": acc.name,
                "company/identifier": _slug(acc.name)[:25],
            }[p]
        if p.startswith("site/"):
            if acc is None:
                return None
            return int(acc.site_id or 0) if p == "site/id" else acc.site_name
        if p.startswith("primarysalesrep/"):
            u = self.world.users[o.owner]
            return {
                "primarysalesrep/id": MEMBER_ID_BASE + u.idx,
                "primarysalesrep/identifier": u.native_id,
                "primarysalesrep/name": u.name,
            }[p]
        if p == "status/id":
            return int(st.key)
        if p == "status/name":
            return st.label
        if p in ("stage/id", "stage/name"):
            ss = self.world.sales_stage_of(o)
            return int(ss.key) if p == "stage/id" else ss.label
        if p == "closedflag":
            return st.is_closed
        if p in ("lastupdated",):
            return o.modified_at
        if p == "dateentered" or p == "datebecamelead":
            return o.created_at
        if p == "enteredby":
            return self.world.users[o.creator].native_id
        if p == "updatedby":
            return self.world.users[o.owner].native_id
        if p in ("expectedclosedate",):
            return o.close_date
        if p == "closeddate":
            return self.closed_date(o)
        # the rest: from the rendered record (slower, rarely queried)
        return dict_getter(self.render(o), path)

    def _opp_known(self, path: str) -> bool:
        return path.lower() in OPP_FIELDS

    def _query(self, req: Request) -> list[SimOpportunity]:
        conditions = req.arg("conditions")
        custom = req.arg("customFieldConditions")
        order = req.arg("orderBy")
        key = ("opps", conditions, custom, order, self.world.version)

        def compute() -> list[SimOpportunity]:
            pred = compile_conditions(conditions, self._opp_getter, self._opp_known)
            cpred = compile_conditions(custom, dict_getter, lambda p: p.lower() in ("id", "caption", "value"))
            with self.world.lock:
                rows = [o for o in self.world.live() if pred(o)]
            if custom:
                rows = [o for o in rows if any(cpred(cf) for cf in self.render(o)["customFields"])]
            keys = order_key(order, self._opp_getter) or [("id", False)]
            for path, _ in keys:
                if not self._opp_known(path):
                    raise HttpError(400, "InvalidObject", f"orderBy: Unknown field '{path}'")
            return sort_records(rows, keys, self._opp_getter)

        return self.cache.get_or_compute(key, compute)

    def _list_opps(self, req: Request) -> Response:
        return self._paged(req, self._query(req), lambda o: self.render(o, req))

    def _count_opps(self, req: Request) -> Response:
        return Response.json({"count": len(self._query(req))})

    def _opp(self, req: Request) -> SimOpportunity:
        o = self.world.get(req.params["id"])
        if o is None:
            raise HttpError(404, "NotFound", f"Opportunity with id {req.params['id']} not found")
        return o

    def _get_opp(self, req: Request) -> Response:
        return Response.json(select_fields(self.render(self._opp(req), req), req.arg("fields")))

    def _get_forecast(self, req: Request) -> Response:
        o = self._opp(req)
        items = self.forecast_items(o)

        def total(kind: str | None) -> dict[str, float]:
            rows = [i for i in items if kind is None or i["forecastType"] == kind]
            rev = round(sum(i["revenue"] for i in rows), 2)
            cost = round(sum(i["cost"] for i in rows), 2)
            return {
                "id": 0,
                "revenue": rev,
                "cost": cost,
                "margin": round(rev - cost, 2),
                "percentage": round((rev - cost) / rev * 100, 2) if rev else 0.0,
            }

        st = self.world.stages[o.stage]
        all_total = total(None)
        zero = {"id": 0, "revenue": 0.0, "cost": 0.0, "margin": 0.0, "percentage": 0.0}
        return Response.json(
            {
                "id": int(o.native_id),
                "forecastItems": items,
                "productRevenue": total("Product"),
                "serviceRevenue": total("Service"),
                "agreementRevenue": total("Agreement"),
                "timeRevenue": zero,
                "expenseRevenue": zero,
                "forecastRevenueTotals": all_total,
                "inclusiveRevenueTotals": all_total,
                "recurringTotal": total("Agreement")["revenue"],
                "wonRevenue": all_total if st.is_closed and st.is_won else zero,
                "lostRevenue": all_total if st.is_closed and not st.is_won else zero,
                "openRevenue": all_total if not st.is_closed else zero,
                "otherRevenue1": zero,
                "otherRevenue2": zero,
                "salesTaxRevenue": 0.0,
                "forecastTotalWithTaxes": all_total["revenue"],
                "expectedProbability": int(o.probability or 0),
                "taxCode": None,
                "billingTerms": None,
                "currency": {
                    k: v
                    for k, v in CURRENCIES.get(o.currency, CURRENCIES["USD"]).items()
                    if k in ("id", "symbol", "currencyCode", "name")
                },
                "_info": {"lastUpdated": _iso(o.modified_at)},
            }
        )

    def _add_forecast(self, req: Request) -> Response:
        """`POST .../forecast` with a ForecastItem body: one new line (201 + the line)."""
        o = self._opp(req)
        values = self._line_values(_json_body(req, dict), full=True)
        with self.world.lock:
            lines = self._materialised(o)
            line = {"id": self.next_forecast_id, "sequenceNumber": len(lines) + 1, **values}
            self.next_forecast_id += 1
            lines.append(line)
            self._forecast_written(o, line)
        return Response.json(self._render_line(o, line), 201)

    def _line(self, req: Request) -> tuple[SimOpportunity, dict[str, Any]]:
        o = self._opp(req)
        fid = int(req.params["fid"])
        lines = self._stored_lines(o)
        line = next((x for x in (self._generated_lines(o) if lines is None else lines) if x["id"] == fid), None)
        if line is None:
            raise HttpError(404, "NotFound", f"ForecastItem with id {fid} not found")
        return o, line

    def _get_forecast_item(self, req: Request) -> Response:
        o, line = self._line(req)
        return Response.json(self._render_line(o, line))

    def _put_forecast_item(self, req: Request) -> Response:
        """PUT replaces the line: what the body leaves out is reset (forecastType required)."""
        o, _ = self._line(req)
        values = self._line_values(_json_body(req, dict), full=True)
        with self.world.lock:
            line = next(x for x in self._materialised(o) if x["id"] == int(req.params["fid"]))
            keep = {"id": line["id"], "sequenceNumber": line.get("sequenceNumber")}
            line.clear()
            line.update({**keep, **values})
            self._forecast_written(o, line)
        return Response.json(self._render_line(o, line))

    def _patch_forecast_item(self, req: Request) -> Response:
        """PATCH takes a JSON Patch array: ops add / replace / remove, paths with or without a leading slash,
        `billCycle/id` for a reference's id. All operations apply or none (a 400 changes nothing)."""
        o, _ = self._line(req)
        ops = _json_body(req, list)
        body: dict[str, Any] = {}
        removed: set[str] = set()
        for i, op in enumerate(ops):
            kind = op.get("op") if isinstance(op, dict) else None
            if not isinstance(kind, str) or kind.lower() not in ("add", "replace", "remove"):
                raise _invalid("forecastItem", "op", f"Operation {i}: op must be add, replace or remove, not {kind!r}")
            path = op.get("path")
            if not isinstance(path, str) or not path.strip("/"):
                raise _invalid("forecastItem", "path", f"Operation {i}: a path is required")
            parts = path.strip("/").split("/")
            key = _forecast_key(parts[0])
            if key is None or len(parts) > 2:
                raise _invalid("forecastItem", parts[0], f"Operation {i}: '{path}' is not a field of forecastItem")
            if kind.lower() == "remove":
                body.pop(key, None)
                removed.add(key)
                continue
            if "value" not in op:
                raise _invalid("forecastItem", key, f"Operation {i}: {kind} needs a value")
            body[key] = {parts[1]: op["value"]} if len(parts) == 2 else op["value"]
            removed.discard(key)
        values = self._line_values(body, full=False)
        with self.world.lock:
            line = next(x for x in self._materialised(o) if x["id"] == int(req.params["fid"]))
            if "forecastType" in removed:
                raise _missing("forecastItem", "forecastType")
            for key in removed:
                line.pop(key, None)
            line.update(values)
            self._forecast_written(o, line)
        return Response.json(self._render_line(o, line))

    def _delete_forecast_item(self, req: Request) -> Response:
        o, _ = self._line(req)
        with self.world.lock:
            lines = self._materialised(o)
            lines[:] = [x for x in lines if x["id"] != int(req.params["fid"])]
            self._forecast_written(o, None)
        return Response.empty(204)

    def _line_values(self, body: dict[str, Any], *, full: bool) -> dict[str, Any]:
        """A ForecastItem body's writable fields, checked (400 InvalidObject naming each bad field); read-only
        ones (id, opportunity, margin, _info) and unknown ones are ignored."""
        values: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for raw_key, val in body.items():
            key = _forecast_key(raw_key)
            if key is None:
                continue
            kind = FORECAST_FIELDS[key]
            if val is None:
                if key == "forecastType":
                    errors.append(_error("MissingRequiredField", "The forecastType field is required.", key))
                else:
                    values[key] = None
                continue
            numeric = kind in ((int, float), int)
            if not isinstance(val, kind) or (numeric and isinstance(val, bool)):
                errors.append(_error("InvalidField", f"The {key} field has an invalid value.", key))
                continue
            if key == "forecastType":
                match = next((t for t in FORECAST_TYPE_VALUES if t.lower() == val.lower()), None)
                if match is None:
                    errors.append(
                        _error("InvalidField", f"forecastType must be one of {', '.join(FORECAST_TYPE_VALUES)}", key)
                    )
                    continue
                val = match
            elif key == "forecastDescription" and len(val) > 50:
                errors.append(_error("InvalidField", "forecastDescription has a maximum length of 50.", key))
                continue
            elif key == "billCycle":
                cycle = next((c for c in BILLING_CYCLES if c[0] == _ref_id(val)), None)
                if cycle is None:
                    errors.append(_error("InvalidField", "Billing Cycle not found.", key))
                    continue
                val = {"id": cycle[0], "name": cycle[2], "_info": None}
            elif key == "status":
                if _ref_id(val) not in self.statuses:
                    errors.append(_error("InvalidField", "Status not found.", key))
                    continue
                st = self.statuses[_ref_id(val)]
                val = {"id": int(st.key), "name": st.label}
            elif numeric:
                val = round(float(val), 2) if kind is not int else val
            values[key] = val
        if full and "forecastType" not in values and not any(e["field"] == "forecastType" for e in errors):
            errors.append(_error("MissingRequiredField", "The forecastType field is required.", "forecastType"))
        if errors:
            err = HttpError(400, "InvalidObject", "forecastItem object is invalid")
            err.errors = errors  # type: ignore[attr-defined]
            raise err
        return values

    def _list_billing_cycles(self, req: Request) -> Response:
        rows = [
            {
                "id": cid,
                "identifier": ident,
                "name": name,
                "billingOptions": option,
                "defaultFlag": default,
                "_info": {"lastUpdated": "2019-03-01T12:00:00Z", "updatedBy": "admin1"},
            }
            for cid, ident, name, option, default in BILLING_CYCLES
        ]
        return self._list_dicts(req, rows)

    # -- writes ------------------------------------------------------------------------------------------------

    def _values_from(self, body: dict[str, Any], partial: bool) -> dict[str, Any]:
        values: dict[str, Any] = {}
        stage_key: str | None = None
        for key, val in body.items():
            k = key.lower()
            if k == "name":
                if not isinstance(val, str) or not val.strip() or len(val) > 100:
                    raise _invalid(
                        "opportunity", "name", "The field name must be a string with a maximum length of 100."
                    )
                values["name"] = val
            elif k == "company":
                cid = _ref_id(val)
                acc = self.world.account_by_native(str(cid)) if cid is not None else None
                if acc is None:
                    raise _invalid("opportunity", "company", "Company not found")
                values["account"] = acc.idx
            elif k in ("primarysalesrep",):
                u = self._member_from_ref(val)
                if u is None:
                    raise _invalid("opportunity", "primarySalesRep", "Member not found")
                values["owner"] = u.idx
            elif k == "status":
                sid = _ref_id(val)
                if sid not in self.statuses:
                    raise _invalid("opportunity", "status", f"Status {sid} not found")
                values["stage"] = str(sid)
            elif k == "stage":
                gid = _ref_id(val)
                if str(gid) not in self.world.sales_stages:
                    raise _invalid("opportunity", "stage", f"Stage {gid} not found")
                stage_key = str(gid)
            elif k == "expectedclosedate":
                values["close_date"] = datetime.fromisoformat(str(val).rstrip("Z")).date() if val else None
            elif k == "currency":
                code = val.get("currencyCode") if isinstance(val, dict) else None
                cid = _ref_id(val)
                match = next((c for c, d in CURRENCIES.items() if d["id"] == cid or c == code), None)
                if match:
                    values["currency"] = match
            elif k == "customfields" and isinstance(val, list):
                for cf in val:
                    if isinstance(cf, dict) and cf.get("caption"):
                        values[cf["caption"]] = cf.get("value")
            # other writable fields (type, source, notes ...) are accepted and not modelled
        if stage_key is not None:
            values["sales_stage"] = stage_key  # after "stage" (the status), which re-assigns the sales stage
        if not partial:
            missing = [
                f
                for f, k in (("name", "name"), ("company", "account"), ("primarySalesRep", "owner"))
                if k not in values
            ]
            if missing:
                err = HttpError(400, "InvalidObject", "opportunity object is invalid")
                err.errors = [
                    {
                        "code": "NullValue",
                        "message": f"The {m} field is required.",
                        "resource": "opportunity",
                        "field": m,
                    }
                    for m in missing
                ]  # type: ignore[attr-defined]
                raise err
        return values

    def _member_from_ref(self, ref: Any) -> Any:
        if not isinstance(ref, dict):
            return None
        if ref.get("id") is not None:
            return self.member_by_id.get(int(ref["id"]))
        if ref.get("identifier"):
            return self.members.get(ref["identifier"])
        return None

    def _create_opp(self, req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HttpError(400, "InvalidObject", "opportunity object is invalid")
        values = self._values_from(body, partial=False)
        values.setdefault("stage", str(next(s[0] for s in self.status_rows if s[6])))
        values["creator"] = values["owner"]
        values.setdefault("amount", None)
        o = self.world.create(**values)
        return Response.json(self.render(o, req), 201)

    def _patch_opp(self, req: Request) -> Response:
        o = self._opp(req)
        ops = req.json()
        if not isinstance(ops, list):
            raise HttpError(400, "InvalidObject", "PATCH body must be a JSON Patch array")
        body: dict[str, Any] = {}
        for op in ops:
            if not isinstance(op, dict) or op.get("op") not in ("replace", "add", "remove") or "path" not in op:
                raise HttpError(400, "InvalidObject", "Each patch operation needs op (add/replace/remove) and path")
            parts = str(op["path"]).strip("/").split("/")
            value = None if op["op"] == "remove" else op.get("value")
            if len(parts) == 2:
                value = {parts[1]: value}
            body[parts[0]] = value
        self.world.update(o.native_id, **self._values_from(body, partial=True))
        return Response.json(self.render(o, req))

    def _put_opp(self, req: Request) -> Response:
        o = self._opp(req)
        body = req.json()
        if not isinstance(body, dict):
            raise HttpError(400, "InvalidObject", "opportunity object is invalid")
        self.world.update(o.native_id, **self._values_from(body, partial=False))
        return Response.json(self.render(o, req))

    def _delete_opp(self, req: Request) -> Response:
        o = self._opp(req)
        self.world.delete(o.native_id)
        return Response.empty(204)

    # -- reference data ----------------------------------------------------------------------------------------

    def _list_dicts(self, req: Request, rows: Iterable[dict[str, Any]]) -> Response:
        conditions, order = req.arg("conditions"), req.arg("orderBy")
        rows = list(rows)
        known = _known_from(rows)
        pred = compile_conditions(conditions, dict_getter, known)
        out = [r for r in rows if pred(r)]
        out = sort_records(out, order_key(order, dict_getter) or [("id", False)], dict_getter)
        return self._paged(req, out, lambda r: r)

    def status_dicts(self, req: Request) -> list[dict[str, Any]]:
        out = []
        for sid, name, closed, won, lost, inactive, default, _ in self.status_rows:
            out.append(
                {
                    "id": sid,
                    "name": name,
                    "wonFlag": won,
                    "lostFlag": lost,
                    "closedFlag": closed,
                    "inactiveFlag": inactive,
                    "defaultFlag": default,
                    "enteredBy": "admin1",
                    "dateEntered": "2019-03-01T12:00:00Z",
                    "_info": {"lastUpdated": "2019-03-01T12:00:00Z", "updatedBy": "admin1"},
                }
            )
        return out

    def _list_statuses(self, req: Request) -> Response:
        return self._list_dicts(req, self.status_dicts(req))

    def _get_status(self, req: Request) -> Response:
        row = next((s for s in self.status_dicts(req) if s["id"] == int(req.params["id"])), None)
        if row is None:
            raise HttpError(404, "NotFound", f"OpportunityStatus with id {req.params['id']} not found")
        return Response.json(row)

    def _list_probabilities(self, req: Request) -> Response:
        rows = [
            {"id": p // 10 + 1, "probability": p, "_info": {"lastUpdated": "2019-03-01T12:00:00Z"}}
            for p in range(0, 101, 10)
        ]
        return self._list_dicts(req, rows)

    def _get_stage(self, req: Request) -> Response:
        row = next((r for r in self._stage_dicts() if r["id"] == int(req.params["id"])), None)
        if row is None:
            raise HttpError(404, "NotFound", f"OpportunityStage with id {req.params['id']} not found")
        return Response.json(row)

    def _list_stages(self, req: Request) -> Response:
        return self._list_dicts(req, self._stage_dicts())

    def _stage_dicts(self) -> list[dict[str, Any]]:
        rows = [
            {
                "id": i,
                "name": n,
                "seqNumber": seq + 1,
                "defaultFlag": seq == 0,
                "probability": None,
                "_info": {"lastUpdated": "2019-03-01T12:00:00Z", "updatedBy": "admin1"},
            }
            for seq, (i, n, _) in enumerate(self.stage_rows)
        ]
        return rows

    def member_dict(self, u: Any, req: Request) -> dict[str, Any]:
        first, _, last = u.name.partition(" ")
        mid = MEMBER_ID_BASE + u.idx
        return {
            "id": mid,
            "identifier": u.native_id,
            "firstName": first,
            "lastName": last,
            "officeEmail": u.email,
            "primaryEmail": u.email,
            "inactiveFlag": not u.active,
            "title": "Account Manager",
            "licenseClass": "F",
            "_info": {"lastUpdated": "2020-01-01T00:00:00Z", "member_href": self._href(req, f"/system/members/{mid}")},
        }

    def _list_members(self, req: Request) -> Response:
        return self._list_dicts(req, (self.member_dict(u, req) for u in self.world.users))

    def _count_members(self, req: Request) -> Response:
        rows = [self.member_dict(u, req) for u in self.world.users]
        pred = compile_conditions(req.arg("conditions"), dict_getter, _known_from(rows))
        return Response.json({"count": sum(1 for r in rows if pred(r))})

    def _get_member(self, req: Request) -> Response:
        u = self.member_by_id.get(int(req.params["id"]))
        if u is None:
            raise HttpError(404, "NotFound", f"Member with id {req.params['id']} not found")
        return Response.json(self.member_dict(u, req))

    def company_dict(self, a: Any, req: Request) -> dict[str, Any]:
        return {
            "id": int(a.native_id),
            "identifier": _slug(a.name)[:25],
            "name": a.name,
            "status": {"id": 1, "name": "Active"},
            "addressLine1": a.street,
            "addressLine2": None,
            "city": a.city,
            "state": a.state,
            "zip": a.postal_code,
            "country": None if a.country is None else {"id": 1, "name": a.country},
            "site": {"id": int(a.site_id or 0), "name": a.site_name},
            "deletedFlag": False,
            # the company's own change time (a rename moves it; its opportunities' lastUpdated stays)
            "_info": {
                "lastUpdated": _iso(self.world.account_modified(a)),
                "updatedBy": "admin1",
                "sites_href": self._href(req, f"/company/companies/{a.native_id}/sites"),
            },
        }

    def site_dict(self, a: Any, req: Request) -> dict[str, Any]:
        line1, line2, city, state, postal, country = site_address(a)
        return {
            "id": int(a.site_id or 0),
            "name": a.site_name,
            "addressLine1": line1,
            "addressLine2": line2,
            "addressLine3": None,
            "city": city,
            "stateReference": None
            if state is None
            else {"id": 1 + sum(map(ord, state)) % 50, "identifier": state, "name": state},
            "zip": postal,
            "country": None if country is None else {"id": 1, "name": country},
            "primaryAddressFlag": True,
            "company": {"id": int(a.native_id), "name": a.name},
            "_info": {"lastUpdated": "2021-01-01T00:00:00Z"},
        }

    def _company(self, req: Request) -> Any:
        a = self.world.account_by_native(req.params["id"])
        if a is None:
            raise HttpError(404, "NotFound", f"Company with id {req.params['id']} not found")
        return a

    def _list_companies(self, req: Request) -> Response:
        return self._list_dicts(req, (self.company_dict(a, req) for a in self.world.accounts))

    def _get_company(self, req: Request) -> Response:
        return Response.json(self.company_dict(self._company(req), req))

    def _list_sites(self, req: Request) -> Response:
        return self._list_dicts(req, [self.site_dict(self._company(req), req)])

    def _get_site(self, req: Request) -> Response:
        a = self._company(req)
        if str(a.site_id) != req.params["site"]:
            raise HttpError(404, "NotFound", f"Site with id {req.params['site']} not found")
        return Response.json(self.site_dict(a, req))

    # -- callbacks (/system/callbacks) and what they send -------------------------------------------------------

    def callback_dict(self, cb: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cb.items() if not k.startswith("_") or k == "_info"}

    def _callback(self, req: Request) -> dict[str, Any]:
        cb = self.callbacks.get(int(req.params["id"]))
        if cb is None:
            raise HttpError(404, "NotFound", f"Callback with id {req.params['id']} not found")
        return cb

    def _list_callbacks(self, req: Request) -> Response:
        return self._list_dicts(req, [self.callback_dict(cb) for cb in self.callbacks.values()])

    def _get_callback(self, req: Request) -> Response:
        return Response.json(self.callback_dict(self._callback(req)))

    def _create_callback(self, req: Request) -> Response:
        body = req.json() if req.body else None
        if not isinstance(body, dict):
            raise _invalid("callbackEntry", "body", "The request body must be a callbackEntry object")
        errors = []
        url = body.get("url")
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            errors.append(_error("InvalidField", "Invalid URL", "url", "callbackEntry"))
        kind, level = str(body.get("type") or ""), str(body.get("level") or "")
        if not kind:
            errors.append(_error("MissingRequiredField", "The type field is required.", "type", "callbackEntry"))
        elif not level or (kind.lower() in CALLBACK_LEVELS and level.lower() not in CALLBACK_LEVELS[kind.lower()]):
            errors.append(
                _error(
                    "InvalidObject",
                    "Unrecognized level for type, see documentation for supported levels for each type",
                    "level",
                    "callbackEntry",
                )
            )
        if errors:
            err = HttpError(400, "InvalidObject", "callbackEntry object is invalid")
            err.errors = errors  # type: ignore[attr-defined]
            raise err
        self.next_callback_id += 1
        cid = self.next_callback_id
        object_id = body.get("objectId")
        self.callbacks[cid] = {
            "id": cid,
            "url": url,
            "objectId": 1 if level.lower() == "owner" else object_id,
            "type": kind.lower(),
            "level": level.lower(),
            "description": body.get("description"),
            "memberId": API_MEMBER_ID,
            "payloadVersion": body.get("payloadVersion") or "3.0.0",
            "inactiveFlag": bool(body.get("inactiveFlag", False)),
            "isSoapCallbackFlag": bool(body.get("isSoapCallbackFlag", False)),
            "isSelfSuppressedFlag": bool(body.get("isSelfSuppressedFlag", False)),
            "connectWiseID": str(uuid.UUID(int=self.world.rng.getrandbits(128))),
            "_info": {"lastUpdated": _iso(self.world.clock.now()), "updatedBy": API_MEMBER_IDENTIFIER},
        }
        self._point_sender()
        return Response.json(self.callback_dict(self.callbacks[cid]), 201)

    def _patch_callback(self, req: Request) -> Response:
        cb = self._callback(req)
        ops = req.json() if req.body else None
        if not isinstance(ops, list):
            raise HttpError(400, "InvalidObject", "PATCH body must be a JSON Patch array")
        writable = {"url", "objectId", "level", "description", "inactiveFlag", "isSelfSuppressedFlag"}
        for op in ops:
            name = str(op.get("path", "")).strip("/") if isinstance(op, dict) else ""
            key = next((k for k in writable if k.lower() == name.lower()), None)
            if key is None or op.get("op") not in ("replace", "add"):
                raise HttpError(400, "InvalidObject", f"Cannot patch '{name}' of a callbackEntry")
            cb[key] = op.get("value")
        cb["_info"]["lastUpdated"] = _iso(self.world.clock.now())
        self._point_sender()
        return Response.json(self.callback_dict(cb))

    def _delete_callback(self, req: Request) -> Response:
        self.callbacks.pop(int(self._callback(req)["id"]))
        self._point_sender()
        return Response.empty(204)

    def _point_sender(self) -> None:
        """The sender's URL: the newest active opportunity callback's (None: no callback, nothing is sent)."""
        active = [cb for cb in self.callbacks.values() if cb["type"] == "opportunity" and not cb["inactiveFlag"]]
        self.webhooks.url = active[-1]["url"] if active else None

    def _callback_key(self, req: Request) -> Response:
        """The key endpoint Metadata.key_url names: no API credentials (every reference client fetches it bare)."""
        if req.arg("id") != SANDBOX_WEBHOOK_SECRETS["key_id"]:
            raise HttpError(404, "NotFound", "Callback key not found")
        return Response.json({"signing_key": SANDBOX_WEBHOOK_SECRETS["signing_key"]})

    def _targets(self, o: SimOpportunity) -> list[dict[str, Any]]:
        """The callbacks a change of `o` goes to: active opportunity callbacks whose level matches, and the URL
        set through `/__sandbox/webhooks` (a callback configured outside the API, owner level)."""
        out = []
        for cb in list(self.callbacks.values()):
            if cb["type"] != "opportunity" or cb["inactiveFlag"]:
                continue
            want, level = str(cb.get("objectId")), cb["level"]
            acc = self.world.accounts[o.account] if o.account is not None else None
            if (
                level == "owner"
                or (level == "status" and want == o.stage)
                or (level == "company" and acc is not None and want == acc.native_id)
                or (level == "opportunity" and want == o.native_id)
            ):
                out.append(cb)
        url = self.webhooks.url
        if url and all(cb["url"] != url for cb in out):
            out.append({"id": 0, "url": url, "isSelfSuppressedFlag": False})
        return out

    def _callback_requests(self, changes: list[Change]) -> list[CallbackRequest]:
        """One signed request per change and callback (CW sends a record per request)."""
        out = []
        # the host clients last called, else where the server listens (a change notified before any API call)
        host = self.site_host if self.site_host != "127.0.0.1" else getattr(self, "served_at", self.site_host)
        key_url = (
            f"http://{host}/{CODEBASE}/system/callbackkey/index.rails?companyName={COMPANY_ID}"
            f"&id={SANDBOX_WEBHOOK_SECRETS['key_id']}"
        )
        for change in changes:
            with self.world.lock:  # the record as it stands when CW builds the callback
                out += self._callback_requests_for(change, host, key_url)
        return out

    def _callback_requests_for(self, change: Change, host: str, key_url: str) -> list[CallbackRequest]:
        out = []
        o = change.opp
        actor = self.webhooks.actors.pop(change.seq, None)
        member = actor or self.world.users[o.owner].native_id
        for cb in self._targets(o):
            if cb["isSelfSuppressedFlag"] and actor == API_MEMBER_IDENTIFIER:
                continue
            body = {
                "Action": {"created": "added", "deleted": "deleted"}.get(change.kind, "updated"),
                "CallbackObjectRecId": cb["id"],
                "CompanyId": COMPANY_ID,
                "Entity": None if change.kind == "deleted" else json.dumps(self.render(o), separators=(",", ":")),
                "FromUrl": host,
                "ID": int(o.native_id),
                "MemberId": member,
                "MessageId": str(uuid.uuid4()),
                "Metadata": {"key_url": key_url},
                "PartnerId": PARTNER_ID,
                "ProductInstanceId": PRODUCT_INSTANCE_ID,
                "Type": "opportunity",
            }
            raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
            url = cb["url"] + (o.native_id if cb["url"].endswith("=") else "")
            headers = {"Content-Type": "application/json", "x-content-signature": _cw_signature(raw)}
            out.append(CallbackRequest(raw, headers, url=url))
        return out

    def _companyinfo(self, req: Request) -> Response:
        if req.params["company"].lower() != COMPANY_ID.lower():
            raise HttpError(404, "NotFound", "Company not found")
        host = req.host
        return Response.json(
            {
                "CompanyName": "OppSync Sandbox MSP",
                "Codebase": CODEBASE,
                "VersionCode": "v2025.1",
                "VersionNumber": "v4.6.120000",
                "CompanyID": COMPANY_ID,
                "IsCloud": True,
                "SiteUrl": host,
                "AllowAnonymousAccess": False,
            }
        )


def _cw_signature(body: bytes) -> str:
    """How CW signs a callback: base64(HMAC-SHA256(key = SHA-256 of the signing key, message = the body))."""
    key = hashlib.sha256(SANDBOX_WEBHOOK_SECRETS["signing_key"].encode("utf-8")).digest()
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


def iis_query_too_long() -> Response:
    """What IIS request filtering answers for a query string over maxQueryString: 404 substatus 15, an HTML
    page (not CW's JSON error shape: the API never saw the request)."""
    body = (
        b"<!DOCTYPE html><html><head><title>IIS 10.0 Detailed Error - 404.15 - Not Found</title></head><body>"
        b"<h3>HTTP Error 404.15 - Not Found</h3><h4>The request filtering module is configured to deny a "
        b"request where the query string is too long.</h4></body></html>"
    )
    return Response(404, body, {"Content-Type": "text/html"})


def site_address(a: Any) -> tuple[str | None, ...]:
    """A company site's address parts: addressLine1, addressLine2, city, state, zip, country. Some sites have
    a second line (a suite), some a line break typed into the first line, as real tenants do (derived from the
    account, no rng draws)."""
    line1, line2 = a.street, None
    if line1 is not None and a.idx % 3 == 0:
        line2 = f"Suite {100 + a.idx}"
    if line1 is not None and a.idx % 7 == 0:
        line1 = f"{line1}\nBuilding B"
    return line1, line2, a.city, a.state, a.postal_code, a.country


def _record_id(r: Any) -> int:
    return int(r.native_id) if isinstance(r, SimOpportunity) else int(r["id"])


def _int_arg(req: Request, name: str, default: int) -> int:
    value = req.arg(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise HttpError(400, "InvalidObject", f"{name} must be an integer") from None


def _ref_id(val: Any) -> int | None:
    if isinstance(val, dict) and val.get("id") is not None:
        try:
            return int(val["id"])
        except (TypeError, ValueError):
            return None
    return None


def _invalid(resource: str, field: str, message: str) -> HttpError:
    err = HttpError(400, "InvalidObject", f"{resource} object is invalid")
    err.errors = [  # type: ignore[attr-defined]
        {"code": "InvalidField", "message": message, "resource": resource, "field": field}
    ]
    return err


def _missing(resource: str, field: str) -> HttpError:
    err = HttpError(400, "InvalidObject", f"{resource} object is invalid")
    err.errors = [_error("MissingRequiredField", f"The {field} field is required.", field, resource)]  # type: ignore[attr-defined]
    return err


def _error(code: str, message: str, field: str, resource: str = "forecastItem") -> dict[str, Any]:
    return {"code": code, "message": message, "resource": resource, "field": field}


def _forecast_key(name: str) -> str | None:
    """A ForecastItem field by name, case-insensitively (CW's JSON binding ignores case)."""
    return next((k for k in FORECAST_FIELDS if k.lower() == name.lower()), None)


def _json_body(req: Request, kind: type) -> Any:
    try:
        body = req.json()
    except ValueError:
        body = None
    if not isinstance(body, kind):
        what = "a JSON Patch array" if kind is list else "a forecastItem object"
        raise _invalid("forecastItem", "body", f"The request body must be {what}")
    return body


def _same_amount(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) < 0.005


def _known_from(rows: list[dict[str, Any]]) -> Callable[[str], bool]:
    def paths(d: dict[str, Any], prefix: str = "") -> Iterable[str]:
        for k, v in d.items():
            yield (prefix + k).lower()
            if isinstance(v, dict):
                yield from paths(v, prefix + k + "/")

    known: set[str] = set()
    for r in rows[:5]:
        known.update(paths(r))
    return lambda p: p.lower() in known or not rows


# -- the tenant --------------------------------------------------------------------------------------------------


def profile(variant: str = "default") -> TenantProfile:
    """The world's `stages` are CW statuses; its `sales_stages` the CW sales stages (`/sales/stages`)."""
    statuses = CUSTOM_STATUSES if variant == "custom_statuses" else STATUSES
    sales = CUSTOM_SALES_STAGES if variant == "custom_statuses" else SALES_STAGES
    stages = [
        SimStage(str(sid), name, closed, won, prob, order)
        for order, (sid, name, closed, won, lost, inactive, default, prob) in enumerate(statuses)
    ]
    sales_stages = [
        SimStage(str(gid), name, won, won, 100.0 if won else 0.0, order) for order, (gid, name, won) in enumerate(sales)
    ]
    return TenantProfile(
        crm=CRM,
        stages=stages,
        sales_stages=sales_stages,
        opportunity_id=lambda seq: str(seq),
        user_id=lambda i: f"member{i}",
        account_id=lambda i: str(COMPANY_ID_BASE + i),
        currencies=("USD", "USD", "EUR", "GBP"),
        precision=timedelta(seconds=1),
    )


def build(
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    clock: Clock | None = None,
    requests_per_minute: int | None = None,
    variant: str = "default",
) -> ConnectWiseSimulator:
    if variant not in VARIANTS:
        raise ValueError(f"unknown connectwise sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
    world = World(profile(variant), seed, opportunities, clock=clock)
    # members are known by an identifier derived from their name (first initial + last name), like CW
    seen: set[str] = set()
    for u in world.users:
        first, _, last = u.name.partition(" ")
        ident = (_slug(first)[:1] + _slug(last)).lower()[:15] or f"member{u.idx}"
        if ident in seen:
            ident = f"{ident[:13]}{u.idx}"
        seen.add(ident)
        u.native_id = ident
        u.alt_id = str(MEMBER_ID_BASE + u.idx)
    return ConnectWiseSimulator(world, faults, requests_per_minute=requests_per_minute, variant=variant)


def truth(sim: ConnectWiseSimulator) -> dict[str, dict[str, Any]]:
    """The tenant's live opportunities as a ConnectWise user sees them, from the simulator's own data.

    stage = the sales stage's name (`stage.name`), stage_id its id, crm_status the status name, status from
    the status's closed / won flags; owner and creator = numeric member ids; service_location = the company
    site's address in the canonical form (the site's name when the site has no address); amount = the sum of
    the forecast lines. Where the variant's API member may not read an optional area, the value is the
    documented fallback an API user gets (docs/crms/connectwise.md): the site's name, no amount, the creator's
    member identifier. crm_closed_at = the record's closedDate when its status resolves won / lost (None when
    open, and for migrated_history's closes before go-live, which carry no closedDate).
    """
    w = sim.world
    out: dict[str, dict[str, Any]] = {}
    for o in w.live():
        acc = w.accounts[o.account] if o.account is not None else None
        if acc is None:
            location = None
        elif "companies" in sim.refused:
            location = acc.site_name
        else:
            location = format_address(*site_address(acc)) or acc.site_name
        creator = w.users[o.creator]
        stage = w.sales_stage_of(o)
        out[o.native_id] = {
            "project_name": o.name,
            "client_name": acc.name if acc else None,
            "account_id": str(int(acc.native_id)) if acc else None,
            "service_location": location,
            "owner_crm_id": str(MEMBER_ID_BASE + w.users[o.owner].idx),
            "created_by_crm_id": creator.native_id if "members" in sim.refused else str(MEMBER_ID_BASE + creator.idx),
            "stage": stage.label,
            "stage_id": stage.key,
            "crm_status": w.stages[o.stage].label,
            "status": w.status(o),
            "amount": None if o.amount is None or "forecast" in sim.refused else round(o.amount, 2),
            # the same lines split by recurringFlag, and their cost (None: no lines, or the forecast refused)
            **_revenue_truth([] if "forecast" in sim.refused else sim.forecast_items(o)),
            "currency": o.currency,
            "close_date": o.close_date,
            "created_at": o.created_at,
            # closedDate where the record carries one and its status resolves won / lost (open: None)
            "crm_closed_at": sim.closed_date(o) if w.status(o) != "open" else None,
        }
    return out


def _revenue_truth(lines: list[dict[str, Any]]) -> dict[str, float | None]:
    if not lines:
        return {"revenue_one_time": None, "revenue_recurring": None, "cost": None}
    return {
        "revenue_one_time": round(sum(i["revenue"] for i in lines if not i["recurringFlag"]), 2),
        "revenue_recurring": round(sum(i["revenue"] for i in lines if i["recurringFlag"]), 2),
        "cost": round(sum(i["cost"] for i in lines), 2),
    }
