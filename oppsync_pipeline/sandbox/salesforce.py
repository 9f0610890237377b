"""Salesforce simulator: OAuth client-credentials token endpoint, REST `query` / `queryAll` with a SOQL subset,
cursor paging through `nextRecordsUrl`, sObject CRUD, getDeleted / getUpdated, and the org's daily API
allocation reported in `Sforce-Limit-Info`.

What it reproduces (docs/crm-api-notes.md §1.11): `attributes` on every record and nested parent, `null`
for unset parents, relative `nextRecordsUrl` under `/services/data/vNN.0/query/`, `totalSize` = full count,
`Sforce-Query-Options: batchSize` clamped to 200..2000, errors as JSON arrays, 401 INVALID_SESSION_ID,
403 REQUEST_LIMIT_EXCEEDED when the allocation is spent, IsDeleted rows only through `queryAll`, datetimes as
`2024-06-11T09:12:44.000+0000`, unquoted datetime / date literals in SOQL (a quoted one is INVALID_FIELD),
case-insensitive string equality, and "AND and OR need parentheses" (MALFORMED_QUERY), a malformed id literal
refused (400 INVALID_QUERY_FILTER_OPERATOR "invalid ID field"), fields an API version does not have absent from its
describe and SOQL (LastStageChangeDate before 52.0), and the 16,384-byte limit on URI plus headers (414 / 431).

Close time: `LastStageChangeDate` (datetime, nillable, read-only, API 52.0+) is when StageName last changed (see
`StageChanges`); a closed record's `CloseDate` is the day it closed (users set it on close).

Deleted rows stay in the Recycle Bin (queryAll, getDeleted) for 15 days, then are purged: older deletes can only
be found by reconciling id lists.

`SELECT COUNT() FROM ... WHERE ...` answers `{"totalSize": n, "done": true, "records": []}`; COUNT() with ORDER BY is
refused (MALFORMED_QUERY), as the SOQL reference says.

Record reads and writes (docs/crm-write-webhook-notes.md §1.1): `GET .../sobjects/Opportunity/{Id}` answers every
field describe lists, or with `?fields=A,B` only those (plus `attributes`); a field that does not exist or that
field-level security hides is 400 INVALID_FIELD ("If you specify fields that don't exist or are inaccessible to
you by field-level security, a 400 error response is returned", REST API guide, Get Field Values). PATCH answers
204 with no body; a field that is not updatable for the user is 400 INVALID_FIELD_FOR_INSERT_UPDATE naming it in
`fields`. `HasOpportunityLineItem` (boolean, read-only) is true when the opportunity has products; then "the amount
is the sum of the related products. Any attempt to update this field ... will be ignored. The update call will not
be rejected, and other fields will be updated as specified" (Opportunity object reference, Amount): still 204, and,
as on every accepted save, LastModifiedDate / SystemModstamp move [U: assumed for a save that changes nothing].
The product rows themselves (OpportunityLineItem) are not served.

Not reproduced: date functions and relative date literals (LAST_N_DAYS:n ...), GROUP BY / aggregates other
than COUNT(), sub-queries, INCLUDES/EXCLUDES, field-level security beyond the variants below, record-level sharing,
concurrent-request limits.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

from oppsync_pipeline.sandbox.kit.formats import fmt_datetime, parse_iso
from oppsync_pipeline.sandbox.kit.lexer import lex
from oppsync_pipeline.sandbox.kit.limits import Window, spent_of
from oppsync_pipeline.sandbox.kit.snapshots import QueryCache, Snapshots
from oppsync_pipeline.sandbox.kit.tokens import TokenStore
from oppsync_pipeline.sandbox.kit.webhooks import Change, Outgoing, WebhookSender
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, HttpError, Request, Response, Simulator
from oppsync_pipeline.sandbox.world import EXCHANGE_RATES, Clock, SimStage, TenantProfile, World, to_base, truncate

CRM = "salesforce"
SANDBOX_CREDENTIALS = {
    "client_id": "3MVG9sandbox.oppsync.client",
    "client_secret": "9F4C2A7E1B8D3F60C5A9E2B7D4F1083A6C9E5B2D7F4A1C8E3B6D9F2A5C8E1B47",
}
API_VERSIONS = tuple(f"{v}.0" for v in range(31, 63))
DEFAULT_DAILY_LIMIT = 100_000
GET_DELETED_DAYS = 15
RECYCLE_BIN_DAYS = 15  # deleted rows stay visible to queryAll this long, then are purged (hard-deleted)

# -- ids ---------------------------------------------------------------------------------------------------------

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def to18(id15: str) -> str:
    """The case-safe 18-character form of a 15-character Salesforce id (checksum of upper-case positions)."""
    suffix = ""
    for i in range(3):
        chunk = id15[i * 5 : (i + 1) * 5]
        bits = sum(1 << j for j, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += _SUFFIX[bits]
    return id15 + suffix


def _b62(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = _B62[r] + out
    return out.rjust(width, "0")


def sf_id(prefix: str, n: int, pod: str = "Hs") -> str:
    """`006Hs0000` + base62 sequence: 15 characters, then the 3-character checksum."""
    return to18(f"{prefix}{pod}0000{_b62(n, 6)}")


ORG_ID = sf_id("00D", 1, pod="5g")
# Outbound messages carry no secret (lib/webhooks/salesforce.py): the receiver checks the org's id, which is the one
# the token's identity URL and `SELECT Id FROM Organization` give. No Flow callouts are sent (users design those).
SANDBOX_WEBHOOK_SECRETS: dict[str, str] = {}
SANDBOX_WEBHOOK_OPTIONS = {"organization_id": ORG_ID}
OUTBOUND_ACTION_ID = sf_id("04k", 1, pod="5g")  # the Outbound Message action (what ActionId names)
OUTBOUND_BATCH = 100  # notifications per SOAP message [K]

# -- the tenant --------------------------------------------------------------------------------------------------

# Standard OpportunityStage picklist plus one tenant-custom open stage (with an apostrophe: escaping matters).
# The key is the value's ApiName, which is what Opportunity.StageName holds; the label is OpportunityStage's
# MasterLabel, what users see. In the default org they are equal (values created with their label as API name).
STAGES = [
    SimStage("Prospecting", "Prospecting", False, False, 10, 1),
    SimStage("Qualification", "Qualification", False, False, 10, 2),
    SimStage("Needs Analysis", "Needs Analysis", False, False, 20, 3),
    SimStage("Value Proposition", "Value Proposition", False, False, 50, 4),
    SimStage("Id. Decision Makers", "Id. Decision Makers", False, False, 60, 5),
    SimStage("Perception Analysis", "Perception Analysis", False, False, 70, 6),
    SimStage("Proposal/Price Quote", "Proposal/Price Quote", False, False, 75, 7),
    SimStage("Negotiation/Review", "Negotiation/Review", False, False, 90, 8),
    SimStage("Customer's Legal Review", "Customer's Legal Review", False, False, 95, 9),
    SimStage("Closed Won", "Closed Won", True, True, 100, 10),
    SimStage("Closed Lost", "Closed Lost", True, False, 0, 11),
]
# Variant `stage_api_names`: an admin relabelled stages after creation; the ApiName (and so the value records
# carry in StageName) kept the old text, users see the new MasterLabel.
RELABELLED = {
    "Prospecting": "Discovery",
    "Id. Decision Makers": "Identify Decision Makers",
    "Negotiation/Review": "Negotiation",
    "Closed Won": "Won - Signed",
    "Closed Lost": "Lost",
}
FORECAST = {
    "Prospecting": "Pipeline",
    "Qualification": "Pipeline",
    "Needs Analysis": "Pipeline",
    "Value Proposition": "Pipeline",
    "Id. Decision Makers": "Pipeline",
    "Perception Analysis": "Pipeline",
    "Proposal/Price Quote": "Best Case",
    "Negotiation/Review": "Best Case",
    "Customer's Legal Review": "Commit",
    "Closed Won": "Closed",
    "Closed Lost": "Omitted",
}
# Variant `custom_fields` (seed 002): migrated records carry their original creation date and creator.
CUSTOM_FIELDS = {
    "Original_Created_Date__c": "datetime",
    "Original_Creator__c": "id",
    "Region__c": "string",
    "Legacy_Id__c": "string",
    "Partner_Account__c": "id",
}
CUSTOM_REFERENCES = {
    "Original_Creator__c": ("User", "Original_Creator__r"),
    "Partner_Account__c": ("Account", "Partner_Account__r"),
}
ORG_CURRENCY = "USD"  # the corporate currency (Organization.DefaultCurrencyIsoCode)

VARIANTS: dict[str, str] = {
    "default": "single-currency org (the Salesforce default: Opportunity has no CurrencyIsoCode, the currency is "
    "Organization.DefaultCurrencyIsoCode), no custom fields, stage API names equal to their labels, "
    "an API user with every optional right",
    "multi_currency": "multi-currency org: Opportunity.CurrencyIsoCode exists and each record has its own",
    "custom_fields": "custom fields on Opportunity: Original_Created_Date__c (datetime), Original_Creator__c "
    "(User lookup), Partner_Account__c (Account lookup), Region__c, Legacy_Id__c",
    "stage_api_names": "stages relabelled after creation: StageName carries the ApiName, users see the "
    "OpportunityStage MasterLabel, which differs",
    "no_optional_rights": "API user without 'View Setup and Configuration' (/limits: 403 INSUFFICIENT_ACCESS) and "
    "without access to OpportunityStage, Organization and User (SOQL and describe: "
    "400 INVALID_TYPE, the object is not visible to the user)",
    "no_last_stage_change_date": "Opportunity.LastStageChangeDate hidden from the API user by field-level security "
    "(what an API version before 52.0 also sees): describe does not list it, SOQL "
    "naming it is 400 INVALID_FIELD",
    "products": "about a third of the opportunities have products (HasOpportunityLineItem true): their Amount is the "
    "sum of the products, and a PATCH of Amount is accepted (204) and ignored, other fields updated "
    "(Opportunity object reference, Amount)",
    "amount_read_only": "field-level security makes Opportunity.Amount read-only for the API user: readable, describe "
    "says updateable false, a PATCH naming it is 400 INVALID_FIELD_FOR_INSERT_UPDATE with "
    "fields ['Amount'] and changes nothing",
    "no_edit_rights": "API user with Read but not Edit (nor Create, Delete) on Opportunity: every write of an "
    "opportunity is 400 INSUFFICIENT_ACCESS_OR_READONLY 'insufficient access rights on object id' "
    "(the status code is [U]: the error code is a save-result StatusCode, which REST answers with 400)",
}
# Variant `products`: the share of opportunities (with an amount) that have products.
PRODUCTS_SHARE = 1 / 3
# What the API user of `no_optional_rights` cannot see.
REFUSED_OBJECTS = ("opportunitystage", "organization", "user")


def profile(variant: str = "default") -> TenantProfile:
    relabel = RELABELLED if variant == "stage_api_names" else {}
    return TenantProfile(
        crm=CRM,
        stages=[
            SimStage(s.key, relabel.get(s.key, s.label), s.is_closed, s.is_won, s.probability, s.order) for s in STAGES
        ],
        opportunity_id=lambda i: sf_id("006", i),
        user_id=lambda i: sf_id("005", i + 1),
        account_id=lambda i: sf_id("001", i + 1),
        currencies=("USD", "EUR", "GBP"),
        users=25,
    )


def build(
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    clock: Clock | None = None,
    *,
    daily_limit: int = DEFAULT_DAILY_LIMIT,
    multi_currency: bool | None = None,
    variant: str = "default",
) -> SalesforceSimulator:
    if variant not in VARIANTS:
        raise ValueError(f"unknown salesforce sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
    world = World(profile(variant), seed, opportunities, clock=clock)
    # Custom field values are drawn in every variant (the same rng stream, so every variant is the same tenant);
    # only `custom_fields` has the fields in its schema.
    rng = world.rng
    for opp in world.opps.values():
        if rng.random() < 0.3:
            opp.extra = {
                "Original_Created_Date__c": opp.created_at - timedelta(days=rng.randint(1, 400)),
                "Original_Creator__c": world.users[rng.randrange(len(world.users))].native_id,
                "Legacy_Id__c": f"LEG-{opp.seq:06d}",
            }
    # Account.BillingStreet is a multi-line textarea: some streets carry a second (and third) line.
    for acc in world.accounts:
        if acc.street and acc.idx % 3 == 0:
            sep = "\r\n" if acc.idx % 2 else "\n"
            acc.street = f"{acc.street}{sep}Suite {100 + acc.idx}" + ("\nBuilding B" if acc.idx % 9 == 0 else "")
    # CloseDate is a plain date field users keep; on a close they are prompted to set it to the day, and reports
    # take it as the close date: generated history closed on its `closed_at` day (World.advance sets it when a
    # deal is won or lost; a close written through the API keeps whatever CloseDate the writer left).
    for opp in world.opps.values():
        if opp.closed_at is not None:
            opp.close_date = opp.closed_at.date()
    if multi_currency is None:
        multi_currency = variant == "multi_currency"
    # Variant `products`: drawn from a stream of its own, so the tenant is otherwise the same in every variant.
    with_products: set[str] = set()
    if variant == "products":
        pick = random.Random(f"{seed}:products")
        with_products = {
            o.native_id for o in world.opps.values() if o.amount is not None and pick.random() < PRODUCTS_SHARE
        }
    return SalesforceSimulator(
        world,
        faults,
        daily_limit=daily_limit,
        multi_currency=multi_currency,
        custom_fields=variant == "custom_fields",
        optional_rights=variant != "no_optional_rights",
        last_stage_change_date=variant != "no_last_stage_change_date",
        with_products=with_products,
        amount_editable=variant != "amount_read_only",
        edit_rights=variant != "no_edit_rights",
        variant=variant,
    )


def truth(sim: SalesforceSimulator) -> dict[str, dict[str, Any]]:
    """The live opportunities as a Salesforce user (the API user of the variant) sees them, from the simulator's
    own data. Where the API user cannot read something (no_optional_rights: the stage dictionary, the org's
    currency), the value is what that user can read: StageName itself, no currency."""
    w = sim.world
    out: dict[str, dict[str, Any]] = {}
    with w.lock:
        for o in w.live():
            acc = w.accounts[o.account] if o.account is not None else None
            st = w.stages[o.stage]
            if sim.multi_currency:
                currency: str | None = o.currency
            else:
                currency = ORG_CURRENCY if sim.optional_rights else None
            out[o.native_id] = {
                "project_name": o.name,
                "client_name": acc.name if acc else None,
                "account_id": acc.native_id if acc else None,
                "service_location": _address_as_seen(acc),
                "owner_crm_id": w.users[o.owner].native_id,
                "created_by_crm_id": w.users[o.creator].native_id,
                "stage": st.label if sim.optional_rights else st.key,
                "stage_id": st.key,
                "crm_status": FORECAST.get(st.key, "Pipeline"),
                "status": w.status(o),
                "amount": o.amount,
                "currency": currency,
                # multi-currency: convertCurrency(Amount) into the corporate currency (CurrencyType.IsCorporate);
                # single-currency: the amount is in the org's currency already
                "amount_base": to_base(o.amount, o.currency) if sim.multi_currency else o.amount,
                "base_currency": ORG_CURRENCY if sim.multi_currency or sim.optional_rights else None,
                "close_date": o.close_date,
                "created_at": o.created_at,
                "crm_closed_at": _close_time_as_seen(sim, o),
            }
    return out


def _close_time_as_seen(sim: SalesforceSimulator, o: Any) -> datetime | None:
    """A closed opportunity's close time as the API user can read it: LastStageChangeDate (the world's closed_at)
    where the field is visible, else the CloseDate day at midnight; None while open."""
    if sim.world.status(o) == "open":
        return None
    if sim.last_stage_change_date and o.closed_at is not None:
        return o.closed_at
    return datetime(o.close_date.year, o.close_date.month, o.close_date.day) if o.close_date else None


def _address_as_seen(acc: Any) -> str | None:
    """Billing address as one line: every street line, city, state, postal code, country, ", "-joined."""
    if acc is None:
        return None
    parts: list[str] = []
    for part in (acc.street, acc.city, acc.state, acc.postal_code, acc.country):
        for line in str(part or "").splitlines():
            if line.strip():
                parts.append(line.strip())
    return ", ".join(parts) or None


# -- formats -----------------------------------------------------------------------------------------------------


def sf_datetime(value: datetime | None) -> str | None:
    return fmt_datetime(value, ms=True, zone="+0000")


def _parse_iso(text: str) -> datetime:
    """A datetime literal / query parameter (a `+` offset may arrive URL-decoded as a space) to naive UTC."""
    return parse_iso(text.replace(" ", "+"))


def _json_value(ftype: str, value: Any) -> Any:
    if value is None:
        return None
    if ftype == "datetime":
        return sf_datetime(value)
    if ftype == "date":
        return value.isoformat()
    if ftype in ("number", "currency", "percent"):
        return float(value)
    return value


# -- schema ------------------------------------------------------------------------------------------------------


@dataclass
class FieldDef:
    name: str  # canonical API name, e.g. "Account.BillingCity"
    type: str  # id | string | picklist | number | currency | percent | date | datetime | boolean
    get: Callable[[Any], Any]
    updatable: bool = False
    reference_to: tuple[str, ...] = ()  # lookups: the sObject(s) the id refers to (describe `referenceTo`)
    relationship: str | None = None  # lookups: the relationship name (`Owner`, `Original_Creator__r`)
    textarea: bool = False  # long text (describe type `textarea`)
    since: str | None = None  # the API version that added the field (absent from older versions)


@dataclass
class Relationship:
    name: str  # "Account"
    sobject: str  # "Account"
    parent_id: Callable[[Any], str | None]


@dataclass
class SObject:
    name: str
    fields: dict[str, FieldDef]  # lower-cased name (dotted for parent fields) -> definition
    relationships: dict[str, Relationship]
    rows: Callable[[bool], list[Any]]  # include_deleted -> rows in default order
    key: Callable[[Any], Any]
    row: Callable[[Any], Any]  # key -> row
    url_id: Callable[[Any], str]

    def add(self, name: str, ftype: str, get: Callable[[Any], Any], updatable: bool = False, **kw: Any) -> None:
        self.fields[name.lower()] = FieldDef(name, ftype, get, updatable, **kw)

    def for_version(self, version: str) -> SObject:
        """The object as an API version sees it: fields added in a later version do not exist in its describe,
        and SOQL naming them is INVALID_FIELD ("No such column"), as with LastStageChangeDate before 52.0."""
        if all(fd.since is None or float(fd.since) <= float(version) for fd in self.fields.values()):
            return self
        fields = {k: fd for k, fd in self.fields.items() if fd.since is None or float(fd.since) <= float(version)}
        return SObject(self.name, fields, self.relationships, self.rows, self.key, self.row, self.url_id)

    def describe(self) -> dict[str, Any]:
        """`GET /sobjects/{name}/describe`: the object's own fields (what this API user can see), with their
        types, lookups' referenceTo / relationshipName, and custom flags."""
        fields = []
        for fd in self.fields.values():
            if "." in fd.name:
                continue
            ftype = {"number": "double"}.get(fd.type, fd.type)
            if fd.reference_to:
                ftype = "reference"
            elif fd.textarea:
                ftype = "textarea"
            fields.append(
                {
                    "name": fd.name,
                    "label": fd.name.removesuffix("__c").replace("_", " "),
                    "type": ftype,
                    "custom": fd.name.endswith("__c"),
                    "nillable": fd.name != "Id",
                    "referenceTo": list(fd.reference_to),
                    "relationshipName": fd.relationship,
                    "updateable": fd.updatable,
                    "filterable": True,
                    "sortable": True,
                }
            )
        return {"name": self.name, "label": self.name, "custom": False, "queryable": True, "fields": fields}


# -- SOQL ----------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})(?![\d:T])
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
""",
    re.X,
)
_ESCAPES = {
    "'": "'",
    '"': '"',
    "\\": "\\",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    "_": "\\_",
    "%": "\\%",
}
_ID = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")
_KEYWORDS = {
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "in",
    "like",
    "order",
    "by",
    "asc",
    "desc",
    "nulls",
    "first",
    "last",
    "limit",
    "offset",
    "true",
    "false",
    "null",
}


class SfError(HttpError):
    """An error that names the fields it is about (REQUIRED_FIELD_MISSING, INVALID_FIELD_FOR_INSERT_UPDATE)."""

    def __init__(self, status: int, code: str, message: str, fields: list[str]):
        super().__init__(status, code, message)
        self.fields = fields


def _malformed(message: str) -> HttpError:
    return HttpError(400, "MALFORMED_QUERY", message)


@dataclass
class Tok:
    kind: str
    value: Any
    text: str
    pos: int


def tokenize(soql: str) -> list[Tok]:
    def error(pos: int) -> HttpError:
        if soql[pos] == "'":
            return _malformed(f"line 1:{pos} mismatched character '<EOF>' expecting '''")
        return _malformed(f"line 1:{pos} no viable alternative at character '{soql[pos]}'")

    toks = []
    for kind, text, pos in lex(_TOKEN, soql, error):
        value: Any = text
        if kind == "str":
            value = _unescape(text[1:-1], pos)
        elif kind == "dt":
            value = _parse_iso(text)
        elif kind == "date":
            value = date.fromisoformat(text)
        elif kind == "num":
            value = float(text)
        elif kind == "ident" and text.lower() in _KEYWORDS:
            kind, value = "kw", text.lower()
        toks.append(Tok(kind, value, text, pos))
    toks.append(Tok("eof", None, "<EOF>", len(soql)))
    return toks


def _unescape(body: str, pos: int) -> str:
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt not in _ESCAPES:
                raise _malformed(f"line 1:{pos + i} Invalid string literal '{body}'. Illegal escape sequence '\\{nxt}'")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@dataclass
class Query:
    sobject: SObject
    fields: list[FieldDef]
    count_only: bool
    where: Callable[[Any], bool] | None
    order: list[tuple[FieldDef, bool, bool]]  # field, descending, nulls_first
    limit: int | None
    offset: int


@dataclass(frozen=True)
class ConvertCurrency:
    """`convertCurrency(field) [alias]` as it appears in a select list."""

    field: Tok
    alias: str | None


class SoqlParser:
    def __init__(self, soql: str, schemas: dict[str, SObject]):
        self.soql = soql
        self.toks = tokenize(soql)
        self.i = 0
        self.schemas = schemas

    # token helpers
    def peek(self, k: int = 0) -> Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Tok:
        tok = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def is_kw(self, *words: str) -> bool:
        t = self.peek()
        return t.kind == "kw" and t.value in words

    def expect_kw(self, word: str) -> None:
        t = self.next()
        if not (t.kind == "kw" and t.value == word):
            raise _malformed(
                f"line 1:{t.pos} unexpected token: '{t.text}'"
                if t.kind != "eof"
                else f"line 1:{t.pos} mismatched input '<EOF>' expecting {word.upper()}"
            )

    def expect_punct(self, ch: str) -> None:
        t = self.next()
        if not (t.kind == "punct" and t.value == ch):
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")

    def parse(self) -> Query:
        self.expect_kw("select")
        raw_fields: list[Tok] = []
        count_only = False
        if self.peek().kind == "ident" and self.peek().value.lower() == "count" and self.peek(1).text == "(":
            self.next()
            self.expect_punct("(")
            self.expect_punct(")")
            count_only = True
        else:
            while True:
                t = self.next()
                if t.kind != "ident":
                    raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
                if t.value.lower() == "convertcurrency" and self.peek().kind == "punct" and self.peek().value == "(":
                    t = self._convert_currency()
                raw_fields.append(t)
                if self.peek().kind == "punct" and self.peek().value == ",":
                    self.next()
                    continue
                break
        self.expect_kw("from")
        t = self.next()
        if t.kind != "ident":
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        sobject = self.schemas.get(t.value.lower())
        if sobject is None:
            raise HttpError(
                400,
                "INVALID_TYPE",
                f"\n{self.soql}\n^\nERROR at Row:1:Column:{t.pos + 1}\n"
                f"sObject type '{t.value}' is not supported. If you are attempting to use a custom "
                "object, be sure to append the '__c' after the entity name.",
            )
        self.sobject = sobject
        fields, seen = [], set()
        for ft in raw_fields:
            fd = self._converted(ft) if isinstance(ft, ConvertCurrency) else self.field(ft)
            if fd.name.lower() in seen:
                raise _malformed(f"duplicate field selected: {fd.name}")
            seen.add(fd.name.lower())
            fields.append(fd)
        where = None
        if self.is_kw("where"):
            self.next()
            where = self.condition()
        order: list[tuple[FieldDef, bool, bool]] = []
        if self.is_kw("order"):
            self.next()
            self.expect_kw("by")
            while True:
                fd = self.field(self.next())
                desc = False
                if self.is_kw("asc", "desc"):
                    desc = self.next().value == "desc"
                nulls_first = not desc
                if self.is_kw("nulls"):
                    self.next()
                    t = self.next()
                    if not (t.kind == "kw" and t.value in ("first", "last")):
                        raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
                    nulls_first = t.value == "first"
                order.append((fd, desc, nulls_first))
                if self.peek().kind == "punct" and self.peek().value == ",":
                    self.next()
                    continue
                break
        if count_only and order:
            # "You can't use COUNT() with an ORDER BY clause" (SOQL reference, COUNT()); the wording is ours
            raise _malformed("COUNT() cannot be used with ORDER BY")
        limit = offset = None
        if self.is_kw("limit"):
            self.next()
            limit = self.integer()
        if self.is_kw("offset"):
            self.next()
            offset = self.integer()
            if offset > 2000:
                raise HttpError(400, "NUMBER_OUTSIDE_VALID_RANGE", "Maximum SOQL offset allowed is 2000")
        t = self.peek()
        if t.kind != "eof":
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        return Query(sobject, fields, count_only, where, order, limit, offset or 0)

    def integer(self) -> int:
        t = self.next()
        if t.kind != "num" or t.value != int(t.value) or t.value < 0:
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        return int(t.value)

    def _convert_currency(self) -> ConvertCurrency:
        """`convertCurrency(Field) [alias]` in the select list: the currency field converted into the user's
        currency (here the corporate one) at the org's rates. Without an alias the result keeps the field's
        name (and replaces the unconverted value)."""
        self.expect_punct("(")
        inner = self.next()
        if inner.kind != "ident":
            raise _malformed(f"line 1:{inner.pos} unexpected token: '{inner.text}'")
        self.expect_punct(")")
        alias = None
        if self.peek().kind == "ident" and not (self.peek(1).kind == "punct" and self.peek(1).value == "("):
            alias = self.next().value
        return ConvertCurrency(inner, alias)

    def _converted(self, cc: ConvertCurrency) -> FieldDef:
        fd = self.field(cc.field)
        if fd.type != "currency" or "currencyisocode" not in self.sobject.fields:
            raise HttpError(
                400,
                "INVALID_FIELD",
                f"\n{self.soql}\n^\nERROR at Row:1:Column:{cc.field.pos + 1}\n"
                "convertCurrency can only be used on currency fields in multi-currency organizations",
            )
        code = self.sobject.fields["currencyisocode"]
        return FieldDef(
            cc.alias or fd.name,
            "currency",
            lambda row: None if fd.get(row) is None else to_base(fd.get(row), code.get(row)),
        )

    def field(self, t: Tok) -> FieldDef:
        if t.kind != "ident":
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        fd = self.sobject.fields.get(t.value.lower())
        if fd is None:
            if "." in t.value and t.value.split(".")[0].lower() not in self.sobject.relationships:
                msg = (
                    f"Didn't understand relationship '{t.value.split('.')[0]}' in field path. If you are "
                    "attempting to use a custom relationship, be sure to append the '__r' after the custom "
                    "relationship name."
                )
            else:
                msg = (
                    f"No such column '{t.value.split('.')[-1]}' on entity '{self.sobject.name}'. If you are "
                    "attempting to use a custom field, be sure to append the '__c' after the custom field name."
                )
            raise HttpError(400, "INVALID_FIELD", f"\n{self.soql}\n^\nERROR at Row:1:Column:{t.pos + 1}\n{msg}")
        return fd

    # conditions: SOQL refuses AND and OR at one level without parentheses
    def condition(self) -> Callable[[Any], bool]:
        first = self.unary()
        if not self.is_kw("and", "or"):
            return first
        op = self.peek().value
        parts = [first]
        while self.is_kw("and", "or"):
            t = self.next()
            if t.value != op:
                raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
            parts.append(self.unary())
        if op == "and":
            return lambda row: all(p(row) for p in parts)
        return lambda row: any(p(row) for p in parts)

    def unary(self) -> Callable[[Any], bool]:
        if self.is_kw("not"):
            self.next()
            inner = self.unary()
            return lambda row: not inner(row)
        if self.peek().kind == "punct" and self.peek().value == "(":
            self.next()
            inner = self.condition()
            self.expect_punct(")")
            return inner
        return self.comparison()

    def comparison(self) -> Callable[[Any], bool]:
        fd = self.field(self.next())
        t = self.next()
        negate = False
        if t.kind == "kw" and t.value == "not":
            negate = True
            t = self.next()
            if not (t.kind == "kw" and t.value == "in"):
                raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        if t.kind == "kw" and t.value == "in":
            self.expect_punct("(")
            values = []
            while True:
                values.append(self.literal(fd))
                if self.peek().kind == "punct" and self.peek().value == ",":
                    self.next()
                    continue
                break
            self.expect_punct(")")
            wanted = {_norm(fd, v) for v in values}
            get = fd.get
            if negate:
                return lambda row: _norm(fd, get(row)) not in wanted
            return lambda row: _norm(fd, get(row)) in wanted
        if t.kind == "kw" and t.value == "like":
            lit = self.next()
            if lit.kind != "str":
                raise _malformed(f"line 1:{lit.pos} unexpected token: '{lit.text}'")
            pattern = _like_regex(lit.value)
            get = fd.get
            return lambda row: (v := get(row)) is not None and pattern.match(str(v)) is not None
        if t.kind != "op":
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        op = "!=" if t.value == "<>" else t.value
        value = _norm(fd, self.literal(fd, allow_null=op in ("=", "!=")))
        get = fd.get
        if value is None:
            return (lambda row: get(row) is None) if op == "=" else (lambda row: get(row) is not None)
        if op == "=":
            return lambda row: _norm(fd, get(row)) == value
        if op == "!=":
            return lambda row: _norm(fd, get(row)) != value
        cmp = {
            "<": lambda a: a < value,
            "<=": lambda a: a <= value,
            ">": lambda a: a > value,
            ">=": lambda a: a >= value,
        }[op]
        return lambda row: (a := _norm(fd, get(row))) is not None and cmp(a)

    def literal(self, fd: FieldDef, allow_null: bool = True) -> Any:
        t = self.next()
        if t.kind == "kw" and t.value == "null":
            return None
        expected = {
            "datetime": ("dt", "dateTime", False),
            "date": ("date", "date", False),
            "number": ("num", "double", False),
            "currency": ("num", "currency", False),
            "percent": ("num", "percent", False),
            "boolean": ("bool", "boolean", False),
        }.get(fd.type, ("str", "string", True))
        kind, type_name, quoted = expected
        if kind == "bool":
            if t.kind == "kw" and t.value in ("true", "false"):
                return t.value == "true"
        elif t.kind == kind:
            if fd.type == "id" and not _ID.match(t.value):
                # an id that cannot be one is refused, not compared ("invalid ID field"); a well-formed id the
                # org does not have matches nothing
                raise HttpError(
                    400,
                    "INVALID_QUERY_FILTER_OPERATOR",
                    f"\n{self.soql}\n^\nERROR at Row:1:Column:{t.pos + 1}\ninvalid ID field: {t.value}",
                )
            return t.value
        if t.kind in ("punct", "op", "eof") or (t.kind == "kw" and t.value not in ("true", "false")):
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        if t.kind == "ident":  # date literals such as TODAY are not modelled: treat as unknown
            raise _malformed(f"line 1:{t.pos} unexpected token: '{t.text}'")
        quote = "should be enclosed in quotes" if quoted else "should not be enclosed in quotes"
        raise HttpError(
            400,
            "INVALID_FIELD",
            f"\n{self.soql}\n^\nERROR at Row:1:Column:{t.pos + 1}\n"
            f"value of filter criterion for field '{fd.name.split('.')[-1]}' must be of type "
            f"{type_name} and {quote}",
        )


def _norm(fd: FieldDef, value: Any) -> Any:
    if value is None:
        return None
    if fd.type in ("string", "picklist", "id") and isinstance(value, str):
        return value.lower()  # SOQL string comparison is case-insensitive
    if fd.type in ("number", "currency", "percent"):
        return float(value)
    return value


def _like_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "_%":
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("^" + "".join(out) + "$", re.I | re.S)


def _sort_key(fd: FieldDef, desc: bool, nulls_first: bool) -> Callable[[Any], Any]:
    # Under reverse=True the largest key comes first, so the null flag is flipped for DESC.
    null_flag = (0 if nulls_first else 2) if not desc else (2 if nulls_first else 0)
    get = fd.get

    def key(row: Any) -> Any:
        v = get(row)
        if v is None:
            return (null_flag, 0)
        if isinstance(v, str):
            v = v.lower()
        return (1, v)

    return key


# -- LastStageChangeDate ------------------------------------------------------------------------------------------


class StageChanges:
    """`Opportunity.LastStageChangeDate`: when StageName last changed. Nillable: an open record whose stage never
    changed since it was created reads null (integrations read it as `LastStageChangeDate || CreatedDate`).
    Salesforce never clears it: a reopen is a stage change like any other.

    A closed record's value is the world's `closed_at`: entering its closed stage was its last stage change (a
    record created closed, at its creation; a world that knows no close time, null). The world keeps no time for
    moves between open stages, so the simulator remembers the stage it last saw per record: a different stage now
    means a move, dated by the record's `modified_at` (the move bumped it; an edit after the move and before the
    next read dates it later than the move, never earlier). Records are remembered from the start, so a generated
    open record reads null until its stage moves."""

    def __init__(self, world: World):
        self.world = world
        self._seen: dict[str, tuple[str, datetime | None]] = {
            o.native_id: (o.stage, o.closed_at) for o in world.opps.values()
        }

    def last_change(self, opp: Any) -> datetime | None:
        if self.world.stages[opp.stage].is_closed:
            self._seen[opp.native_id] = (opp.stage, opp.closed_at)
            return opp.closed_at
        seen = self._seen.get(opp.native_id)
        if seen is None:  # created since: in this stage from its creation
            self._seen[opp.native_id] = (opp.stage, None)
            return None
        stage, at = seen
        if stage != opp.stage:
            at = opp.modified_at
            self._seen[opp.native_id] = (opp.stage, at)
        return at


# -- request size -------------------------------------------------------------------------------------------------

# "The URI plus headers of a REST request must stay under 16,384 bytes" (help article 000386264): a longer URI is
# 414, longer headers 431, answered by the edge before authentication (the body is not the API's JSON array).
MAX_REQUEST_BYTES = 16_384


def _over_request_limit(req: Request) -> Response | None:
    uri = len((req.raw_path or req.path).encode("utf-8"))
    headers = sum(len(k) + len(v) + 4 for k, v in req.headers.items())
    if uri > MAX_REQUEST_BYTES:
        return Response(414, b"<html><body>414 URI Too Long</body></html>", {"Content-Type": "text/html"})
    if uri + headers > MAX_REQUEST_BYTES:
        return Response(
            431, b"<html><body>431 Request Header Fields Too Large</body></html>", {"Content-Type": "text/html"}
        )
    return None


# -- the simulator --------------------------------------------------------------------------------------------------


@dataclass
class _Cursor:
    query: Query
    keys: list[Any]
    include_deleted: bool
    batch: int


class SalesforceSimulator(Simulator):
    crm = CRM
    unfaulted = re.compile(r"^/__sandbox/|^/services/oauth2/")
    api_usage = spent_of("allocation")

    def __init__(
        self,
        world: World,
        faults: FaultPlan | None = None,
        *,
        daily_limit: int = DEFAULT_DAILY_LIMIT,
        multi_currency: bool = False,
        custom_fields: bool = False,
        optional_rights: bool = True,
        last_stage_change_date: bool = True,
        with_products: set[str] | None = None,
        amount_editable: bool = True,
        edit_rights: bool = True,
        variant: str = "default",
    ):
        super().__init__(world, faults)
        self.daily_limit = daily_limit
        self.allocation = Window(lambda: self.daily_limit)  # the org's daily allocation; the sandbox never resets it
        self.multi_currency = multi_currency
        self.custom_fields = custom_fields
        self.optional_rights = optional_rights  # False: View Setup, OpportunityStage, Organization, User refused
        self.last_stage_change_date = last_stage_change_date  # False: the field is hidden (field-level security)
        self.stage_changes = StageChanges(world)
        self.with_products = set(with_products or ())  # ids of the opportunities that have products
        self.amount_editable = amount_editable  # False: field-level security makes Amount read-only
        self.edit_rights = edit_rights  # False: Read but not Create / Edit / Delete on Opportunity
        self.variant = variant
        self.tokens = TokenStore(world.clock.now)  # session ids: valid until the token_expiry fault
        self.cursors = Snapshots(512, new_id=lambda n: to18(f"01gRO0000{_b62(n, 6)}"))  # query locators
        self.cache = QueryCache()
        self._signing_key = hashlib.sha256(f"sf-sandbox:{world.seed}".encode()).digest()
        self.schemas = self._schemas()
        self.route("POST", r"/services/oauth2/token", self._token)
        self.route("GET", r"/services/data/?", self._versions)
        v = r"/services/data/v(?P<version>\d+\.\d)"
        api = functools.partial(self.route, guard=self._guard)
        api("GET", v + r"/?", self._resources)
        api("GET", v + r"/limits/?", self._limits)
        api("GET", v + r"/(?P<endpoint>query|queryAll)/?", self._query)
        api("GET", v + r"/(?P<endpoint>query|queryAll)/(?P<locator>[A-Za-z0-9]+-\d+)/?", self._query_more)
        api("GET", v + r"/sobjects/(?P<sobject>\w+)/describe/?", self._describe)
        api("GET", v + r"/sobjects/(?P<sobject>\w+)/deleted/?", self._get_deleted)
        api("GET", v + r"/sobjects/(?P<sobject>\w+)/updated/?", self._get_updated)
        api("POST", v + r"/sobjects/(?P<sobject>\w+)/?", self._create)
        api("GET", v + r"/sobjects/(?P<sobject>\w+)/(?P<id>\w{15}|\w{18})/?", self._get_record)
        api("PATCH", v + r"/sobjects/(?P<sobject>\w+)/(?P<id>\w{15}|\w{18})/?", self._update)
        api("DELETE", v + r"/sobjects/(?P<sobject>\w+)/(?P<id>\w{15}|\w{18})/?", self._delete)
        # Outbound messages of a record-triggered Flow on Opportunity (created or updated), posted to the URL set by
        # `POST /__sandbox/webhooks` (Salesforce has no API that creates them). Notification ids must never repeat
        # across simulator restarts (the receiver's inbox dedupes on them): a random 5-character base per instance.
        self._notification_base = random.Random().randrange(62**5)
        self.webhooks = WebhookSender(world, self._outbound_messages).start()

    # -- outbound messages ------------------------------------------------------------------------------------

    def _outbound_messages(self, batch: list[Change]) -> list[Outgoing]:
        """SOAP 1.1 `notifications` messages of up to 100 Notification each (sforce_api_om_outboundmessaging_wsdl,
        docs/crm-write-webhook-notes.md §1.2), built when sent: each sObject carries the record's data as it is now,
        not as it was when the change happened [K]. Deletes send nothing (a record-triggered Flow runs an outbound
        message on create / update [U: what a delete-triggered message would carry])."""
        changes = [c for c in batch if c.kind != "deleted"]
        out = []
        for start in range(0, len(changes), OUTBOUND_BATCH):
            with self.world.lock:
                items = "".join(self._notification_xml(c) for c in changes[start : start + OUTBOUND_BATCH])
            api = f"https://oppsync-sandbox.my.salesforce.com/services/Soap/{{}}/62.0/{ORG_ID[:15]}"
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
                'xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
                '<soapenv:Body><notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
                f"<OrganizationId>{ORG_ID}</OrganizationId><ActionId>{OUTBOUND_ACTION_ID}</ActionId>"
                '<SessionId xsi:nil="true"/>'
                f"<EnterpriseUrl>{api.format('c')}</EnterpriseUrl><PartnerUrl>{api.format('u')}</PartnerUrl>"
                f"{items}</notifications></soapenv:Body></soapenv:Envelope>"
            )
            # SOAPAction "" as SOAP 1.1 clients send it [U: Salesforce's exact header set is not documented]
            headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
            out.append(Outgoing(body.encode(), headers))
        return out

    def _notification_xml(self, change: Change) -> str:
        o = change.opp
        notification_id = to18(f"04l{_b62(self._notification_base, 5)}{_b62(change.seq, 7)}")
        fields = [
            ("Id", o.native_id),
            ("Amount", None if o.amount is None else repr(float(o.amount))),
            ("CloseDate", o.close_date.isoformat() if o.close_date else None),
            ("Name", o.name),
            ("StageName", o.stage),
            ("SystemModstamp", fmt_datetime(o.modified_at, ms=True)),
        ]
        values = "".join(f"<sf:{k}>{escape(v)}</sf:{k}>" for k, v in fields if v is not None)  # nulls left out [U]
        return (
            f"<Notification><Id>{notification_id}</Id>"
            '<sObject xsi:type="sf:Opportunity" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
            f"{values}</sObject></Notification>"
        )

    # -- Simulator hooks ----------------------------------------------------------------------------------------

    def error_response(self, err: HttpError) -> Response:
        body: dict[str, Any] = {"message": err.message, "errorCode": err.code}
        if isinstance(err, SfError):
            body["fields"] = err.fields
        return Response.json([body], err.status, err.headers)

    def rate_limit_response(self, rule: FaultRule) -> Response:
        # Salesforce has no 429 on the REST API: a spent allocation is 403 REQUEST_LIMIT_EXCEEDED, final.
        return Response.json(
            [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            403,
            {"Sforce-Limit-Info": self._usage_header()},
        )

    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def common_headers(self, req: Request) -> dict[str, str]:
        if req.path.startswith("/services/data"):
            return {"Sforce-Limit-Info": self._usage_header()}
        return {}

    def _usage_header(self) -> str:
        return f"api-usage={self.api_usage}/{self.daily_limit}"

    # -- auth and allocation ------------------------------------------------------------------------------------

    def _guard(self, req: Request) -> Response | None:
        too_long = _over_request_limit(req)
        if too_long is not None:
            return too_long
        if not self.tokens.valid(req.bearer()):
            raise HttpError(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if req.params.get("version") not in API_VERSIONS:
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")
        if self.allocation.take() is None:
            raise HttpError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        return None

    def _token(self, req: Request) -> Response:
        form = req.form()
        grant = form.get("grant_type")
        if grant != "client_credentials":
            return Response.json(
                {"error": "unsupported_grant_type", "error_description": "grant type not supported"}, 400
            )
        ok = hmac.compare_digest(form.get("client_id", ""), SANDBOX_CREDENTIALS["client_id"]) and hmac.compare_digest(
            form.get("client_secret", ""), SANDBOX_CREDENTIALS["client_secret"]
        )
        if not ok:
            return Response.json({"error": "invalid_grant", "error_description": "authentication failure"}, 400)
        token = f"{ORG_ID[:15]}!{secrets.token_urlsafe(48)}"
        self.tokens.issue(token)
        user_id = self.world.users[0].native_id
        identity = f"https://login.salesforce.com/id/{ORG_ID}/{user_id}"
        issued_at = str(int(time.time() * 1000))
        signature = base64.b64encode(
            hmac.new(self._signing_key, (identity + issued_at).encode(), hashlib.sha256).digest()
        ).decode()
        host = req.host
        return Response.json(
            {
                "access_token": token,
                "signature": signature,
                "scope": "api",
                "instance_url": f"http://{host}",
                "id": identity,
                "token_type": "Bearer",
                "issued_at": issued_at,
            }
        )

    def _versions(self, req: Request) -> Response:
        return Response.json(
            [{"label": f"Release {v}", "url": f"/services/data/v{v}", "version": v} for v in API_VERSIONS]
        )

    def _resources(self, req: Request) -> Response:
        base = f"/services/data/v{req.params['version']}"
        return Response.json({k: f"{base}/{k}" for k in ("limits", "query", "queryAll", "sobjects")})

    def _limits(self, req: Request) -> Response:
        if not self.optional_rights:
            raise HttpError(
                403,
                "INSUFFICIENT_ACCESS",
                "You don't have permission to view this org's limits: the "
                "View Setup and Configuration permission is required",
            )
        return Response.json(
            {"DailyApiRequests": {"Max": self.daily_limit, "Remaining": max(0, self.daily_limit - self.api_usage)}}
        )

    # -- query ----------------------------------------------------------------------------------------------------

    def _query(self, req: Request) -> Response:
        soql = req.arg("q")
        if not soql:
            raise HttpError(400, "MALFORMED_QUERY", "A query string has to be specified")
        include_deleted = req.params["endpoint"] == "queryAll"
        query = SoqlParser(soql, self.visible_schemas(req.params["version"])).parse()
        with self.world.lock:
            # queryAll's answer also moves with time (the Recycle Bin is purged after 15 days)
            minute = truncate(self.world.clock.now(), timedelta(minutes=1)) if include_deleted else None
            cache_key = (soql, include_deleted, self.world.version, minute)
            keys = self.cache.get_or_compute(cache_key, lambda: self._matching(query, include_deleted))
            if query.count_only:
                return Response.json({"totalSize": len(keys), "done": True, "records": []})
            cursor = _Cursor(query, keys, include_deleted, self._batch_size(req))
            return self._page(req.params["version"], cursor, 0)

    def _query_more(self, req: Request) -> Response:
        locator, _, offset = req.params["locator"].rpartition("-")
        cursor = self.cursors.get(locator)
        if cursor is None or int(offset) > len(cursor.keys):
            raise HttpError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        if req.header("sforce-query-options"):
            cursor.batch = self._batch_size(req)
        with self.world.lock:
            return self._page(req.params["version"], cursor, int(offset), locator)

    @staticmethod
    def _batch_size(req: Request) -> int:
        opts = req.header("sforce-query-options") or ""
        m = re.search(r"batchSize\s*=\s*(\d+)", opts, re.I)
        if not m:
            return 2000
        return max(200, min(2000, int(m.group(1))))

    def _matching(self, query: Query, include_deleted: bool) -> list[Any]:
        rows = query.sobject.rows(include_deleted)
        if query.where is not None:
            rows = [r for r in rows if query.where(r)]
        for fd, desc, nulls_first in reversed(query.order):
            rows.sort(key=_sort_key(fd, desc, nulls_first), reverse=desc)
        end = None if query.limit is None else query.offset + query.limit
        rows = rows[query.offset : end]
        return [query.sobject.key(r) for r in rows]

    def _page(self, version: str, cursor: _Cursor, offset: int, locator: str | None = None) -> Response:
        end = min(offset + cursor.batch, len(cursor.keys))
        sobject = cursor.query.sobject
        records = [self._render(sobject, sobject.row(k), cursor.query.fields, version) for k in cursor.keys[offset:end]]
        body: dict[str, Any] = {"totalSize": len(cursor.keys), "done": end >= len(cursor.keys)}
        if end < len(cursor.keys):
            if locator is None:
                locator = self.cursors.put(cursor)
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}-{end}"
        body["records"] = records
        return Response.json(body)

    def _render(self, sobject: SObject, row: Any, fields: list[FieldDef], version: str) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "attributes": {
                "type": sobject.name,
                "url": f"/services/data/v{version}/sobjects/{sobject.name}/{sobject.url_id(row)}",
            }
        }
        for fd in fields:
            if "." in fd.name:
                rel_name, leaf = fd.name.split(".", 1)
                rel = sobject.relationships[rel_name.lower()]
                parent_id = rel.parent_id(row)
                if parent_id is None:
                    rec[rel.name] = None
                    continue
                parent = rec.get(rel.name)
                if parent is None:
                    parent = rec[rel.name] = {
                        "attributes": {
                            "type": rel.sobject,
                            "url": f"/services/data/v{version}/sobjects/{rel.sobject}/{parent_id}",
                        }
                    }
                parent[leaf] = _json_value(fd.type, fd.get(row))
            else:
                rec[fd.name] = _json_value(fd.type, fd.get(row))
        return rec

    def visible_schemas(self, version: str) -> dict[str, SObject]:
        """The sObjects this API user can see, as API `version` describes them: an object without read access
        is, to SOQL and describe, an object that does not exist (400 INVALID_TYPE)."""
        return {
            k: v.for_version(version)
            for k, v in self.schemas.items()
            if self.optional_rights or k not in REFUSED_OBJECTS
        }

    def _describe(self, req: Request) -> Response:
        name = req.params["sobject"]
        sobject = self.visible_schemas(req.params["version"]).get(name.lower())
        if sobject is None and name.lower() in self.schemas:
            raise HttpError(400, "INVALID_TYPE", f"sObject type '{name}' is not supported.")
        if sobject is None:
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")
        return Response.json(sobject.describe())

    # -- schemas --------------------------------------------------------------------------------------------------

    def _schemas(self) -> dict[str, SObject]:
        w = self.world
        users, accounts, stages = w.users, w.accounts, w.stages

        def modstamp(o: Any) -> datetime:
            # Deleting a record moves its SystemModstamp (what queryAll ... IsDeleted = true relies on).
            return o.modified_at if o.deleted_at is None else max(o.modified_at, o.deleted_at)

        def opp_rows(deleted: bool) -> list[Any]:
            if not deleted:
                return [o for o in w.opps.values() if o.deleted_at is None]
            purge_before = w.clock.now() - timedelta(days=RECYCLE_BIN_DAYS)
            return [o for o in w.opps.values() if o.deleted_at is None or o.deleted_at >= purge_before]

        opp = SObject(
            "Opportunity",
            {},
            {},
            opp_rows,
            key=lambda o: o.native_id,
            row=lambda k: w.opps[k],
            url_id=lambda o: o.native_id,
        )
        opp.add("Id", "id", lambda o: o.native_id)
        opp.add("Name", "string", lambda o: o.name, True)
        opp.add(
            "AccountId",
            "id",
            lambda o: accounts[o.account].native_id if o.account is not None else None,
            True,
            reference_to=("Account",),
            relationship="Account",
        )
        opp.add("OwnerId", "id", lambda o: users[o.owner].native_id, True, reference_to=("User",), relationship="Owner")
        opp.add("Amount", "currency", lambda o: o.amount, self.amount_editable)
        # Read-only: true when the opportunity has products (then Amount is their sum and ignores writes)
        opp.add("HasOpportunityLineItem", "boolean", lambda o: o.native_id in self.with_products)
        opp.add("StageName", "picklist", lambda o: o.stage, True)
        opp.add("ForecastCategoryName", "picklist", lambda o: FORECAST.get(o.stage, "Pipeline"))
        opp.add("Probability", "percent", lambda o: o.probability, True)
        opp.add(
            "ExpectedRevenue",
            "currency",
            lambda o: None if o.amount is None else round(o.amount * (o.probability or 0) / 100, 2),
        )
        opp.add("CloseDate", "date", lambda o: o.close_date, True)
        opp.add("IsClosed", "boolean", lambda o: stages[o.stage].is_closed)
        opp.add("IsWon", "boolean", lambda o: stages[o.stage].is_won)
        opp.add("Type", "picklist", lambda o: (o.extra or {}).get("Type"), True)
        opp.add("LeadSource", "picklist", lambda o: (o.extra or {}).get("LeadSource"), True)
        opp.add("Description", "string", lambda o: (o.extra or {}).get("Description"), True, textarea=True)
        opp.add("NextStep", "string", lambda o: (o.extra or {}).get("NextStep"), True)
        opp.add("CreatedDate", "datetime", lambda o: o.created_at)
        opp.add(
            "CreatedById", "id", lambda o: users[o.creator].native_id, reference_to=("User",), relationship="CreatedBy"
        )
        opp.add("LastModifiedDate", "datetime", modstamp)
        opp.add(
            "LastModifiedById",
            "id",
            lambda o: users[o.owner].native_id,
            reference_to=("User",),
            relationship="LastModifiedBy",
        )
        opp.add("SystemModstamp", "datetime", modstamp)
        opp.add("IsDeleted", "boolean", lambda o: o.deleted_at is not None)
        if self.last_stage_change_date:
            # Read-only, nillable, API 52.0+ (Summer '21): when StageName last changed.
            opp.add("LastStageChangeDate", "datetime", self.stage_changes.last_change, since="52.0")
        if self.multi_currency:
            opp.add("CurrencyIsoCode", "picklist", lambda o: o.currency, True)
        if self.custom_fields:
            for name, ftype in CUSTOM_FIELDS.items():
                ref, rel = CUSTOM_REFERENCES.get(name, (None, None))
                opp.add(
                    name,
                    ftype,
                    (lambda n: lambda o: (o.extra or {}).get(n))(name),
                    True,
                    reference_to=(ref,) if ref else (),
                    relationship=rel,
                )
        account_fields = {
            "Id": ("id", lambda a: a.native_id),
            "Name": ("string", lambda a: a.name),
            "BillingStreet": ("string", lambda a: a.street),
            "BillingCity": ("string", lambda a: a.city),
            "BillingState": ("string", lambda a: a.state),
            "BillingPostalCode": ("string", lambda a: a.postal_code),
            "BillingCountry": ("string", lambda a: a.country),
            # The account's own change stamps: a rename moves them, never the Opportunity's
            # SystemModstamp. As parent fields they can be filtered on from Opportunity
            # (`Account.SystemModstamp >= X`), also inside an OR group.
            "LastModifiedDate": ("datetime", w.account_modified),
            "SystemModstamp": ("datetime", w.account_modified),
        }
        user_fields = {
            "Id": ("id", lambda u: u.native_id),
            "Name": ("string", lambda u: u.name),
            "FirstName": ("string", lambda u: u.name.split(" ", 1)[0]),
            "LastName": ("string", lambda u: u.name.split(" ", 1)[-1]),
            "Email": ("string", lambda u: u.email),
            "Username": ("string", lambda u: u.email + ".oppsync"),
            "IsActive": ("boolean", lambda u: u.active),
            "UserType": ("picklist", lambda u: "Standard"),
        }
        for leaf, (ftype, get) in account_fields.items():
            opp.add(
                f"Account.{leaf}",
                ftype,
                (lambda g: lambda o: g(accounts[o.account]) if o.account is not None else None)(get),
            )
        for rel, attr in (("Owner", "owner"), ("CreatedBy", "creator"), ("LastModifiedBy", "owner")):
            for leaf, (ftype, get) in user_fields.items():
                opp.add(f"{rel}.{leaf}", ftype, (lambda g, a: lambda o: g(users[getattr(o, a)]))(get, attr))
        opp.relationships = {
            "account": Relationship(
                "Account", "Account", lambda o: accounts[o.account].native_id if o.account is not None else None
            ),
            "owner": Relationship("Owner", "User", lambda o: users[o.owner].native_id),
            "createdby": Relationship("CreatedBy", "User", lambda o: users[o.creator].native_id),
            "lastmodifiedby": Relationship("LastModifiedBy", "User", lambda o: users[o.owner].native_id),
        }

        user = SObject(
            "User",
            {},
            {},
            lambda deleted: list(users),
            key=lambda u: u.idx,
            row=lambda k: users[k],
            url_id=lambda u: u.native_id,
        )
        for leaf, (ftype, get) in user_fields.items():
            user.add(leaf, ftype, get)

        account = SObject(
            "Account",
            {},
            {},
            lambda deleted: list(accounts),
            key=lambda a: a.idx,
            row=lambda k: accounts[k],
            url_id=lambda a: a.native_id,
        )
        for leaf, (ftype, get) in account_fields.items():
            account.add(leaf, ftype, get, textarea=leaf == "BillingStreet")

        stage_rows = sorted(stages.values(), key=lambda s: s.order)
        stage_id = {s.key: sf_id("01J", s.order) for s in stage_rows}
        stage = SObject(
            "OpportunityStage",
            {},
            {},
            lambda deleted: list(stage_rows),
            key=lambda s: s.key,
            row=lambda k: stages[k],
            url_id=lambda s: stage_id[s.key],
        )
        stage.add("Id", "id", lambda s: stage_id[s.key])
        stage.add("MasterLabel", "string", lambda s: s.label)
        stage.add("ApiName", "string", lambda s: s.key)
        stage.add("IsActive", "boolean", lambda s: True)
        stage.add("IsClosed", "boolean", lambda s: s.is_closed)
        stage.add("IsWon", "boolean", lambda s: s.is_won)
        stage.add("DefaultProbability", "percent", lambda s: s.probability)
        stage.add("ForecastCategory", "picklist", lambda s: FORECAST.get(s.key, "Pipeline").replace(" ", ""))
        stage.add("ForecastCategoryName", "picklist", lambda s: FORECAST.get(s.key, "Pipeline"))
        stage.add("SortOrder", "number", lambda s: s.order)
        stage.add("Description", "string", lambda s: None)
        org = SObject(
            "Organization", {}, {}, lambda deleted: [ORG_ID], key=lambda k: k, row=lambda k: k, url_id=lambda k: k
        )
        org.add("Id", "id", lambda k: k)
        org.add("Name", "string", lambda k: "oppsync sandbox org")
        org.add("DefaultCurrencyIsoCode", "picklist", lambda k: ORG_CURRENCY)
        org.add("OrganizationType", "picklist", lambda k: "Enterprise Edition")
        schemas = {"opportunity": opp, "user": user, "account": account, "opportunitystage": stage, "organization": org}
        if self.multi_currency:  # CurrencyType exists only once multi-currency is enabled
            rates = sorted(EXCHANGE_RATES.items())
            currency = SObject(
                "CurrencyType",
                {},
                {},
                lambda deleted: rates,
                key=lambda r: r[0],
                row=lambda k: (k, EXCHANGE_RATES[k]),
                url_id=lambda r: f"01L{r[0]}00000000AAA",
            )
            currency.add("Id", "id", lambda r: f"01L{r[0]}00000000AAA")
            currency.add("IsoCode", "picklist", lambda r: r[0])
            currency.add("ConversionRate", "number", lambda r: r[1])
            currency.add("IsCorporate", "boolean", lambda r: r[0] == ORG_CURRENCY)
            currency.add("IsActive", "boolean", lambda r: True)
            currency.add("DecimalPlaces", "number", lambda r: 2)
            schemas["currencytype"] = currency
        return schemas

    # -- getDeleted / getUpdated ------------------------------------------------------------------------------------

    def _window(self, req: Request) -> tuple[datetime, datetime, datetime]:
        if req.params["sobject"].lower() != "opportunity":
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")
        try:
            start = _parse_iso(req.arg("start") or "")
            end = _parse_iso(req.arg("end") or "")
        except ValueError:
            raise HttpError(400, "MALFORMED_QUERY", "start and end must be ISO-8601 date-times") from None
        now = self.world.clock.now()
        start = truncate(start, timedelta(minutes=1))
        end = truncate(min(end, now), timedelta(minutes=1))
        if start >= end:
            raise HttpError(
                400,
                "INVALID_REPLICATION_DATE",
                "startDate must chronologically precede endDate by more than one minute",
            )
        if start < now - timedelta(days=30):
            raise HttpError(400, "INVALID_REPLICATION_DATE", "startDate cannot be more than 30 days ago")
        return start, end, now

    def _get_deleted(self, req: Request) -> Response:
        start, end, now = self._window(req)
        earliest = truncate(now - timedelta(days=GET_DELETED_DAYS), timedelta(minutes=1))
        with self.world.lock:
            rows = [
                o
                for o in self.world.opps.values()
                if o.deleted_at is not None and max(start, earliest) <= o.deleted_at < end
            ]
        rows.sort(key=lambda o: o.deleted_at)  # type: ignore[arg-type, return-value]
        return Response.json(
            {
                "deletedRecords": [{"id": o.native_id, "deletedDate": sf_datetime(o.deleted_at)} for o in rows],
                "earliestDateAvailable": sf_datetime(earliest),
                "latestDateCovered": sf_datetime(end),
            }
        )

    def _get_updated(self, req: Request) -> Response:
        start, end, _ = self._window(req)
        with self.world.lock:
            ids = [
                o.native_id for o in self.world.opps.values() if o.deleted_at is None and start <= o.modified_at < end
            ]
        return Response.json({"ids": ids, "latestDateCovered": sf_datetime(end)})

    # -- sObject rows ---------------------------------------------------------------------------------------------

    def _opportunity(self, req: Request) -> Any:
        if req.params["sobject"].lower() != "opportunity":
            if req.params["sobject"].lower() in self.schemas:
                raise HttpError(405, "METHOD_NOT_ALLOWED", "The sandbox only writes Opportunity rows")
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")
        return self.schemas["opportunity"]

    def _find(self, native_id: str, include_deleted: bool = False) -> Any:
        key = native_id if len(native_id) == 18 else to18(native_id)
        opp = self.world.opps.get(key)
        if opp is None:
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")
        if opp.deleted_at is not None and opp.deleted_at < self.world.clock.now() - timedelta(days=RECYCLE_BIN_DAYS):
            raise HttpError(404, "NOT_FOUND", "The requested resource does not exist")  # purged
        if opp.deleted_at is not None and not include_deleted:
            raise HttpError(404, "ENTITY_IS_DELETED", "entity is deleted")
        return opp

    def _get_record(self, req: Request) -> Response:
        sobject = self._opportunity(req)
        visible = sobject.for_version(req.params["version"])
        asked = req.arg("fields")
        if asked is None or not asked.strip():
            fields = [fd for fd in visible.fields.values() if "." not in fd.name]
        else:
            fields = []
            for name in (n.strip() for n in asked.split(",")):
                fd = visible.fields.get(name.lower())
                if fd is None or "." in fd.name:
                    raise HttpError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type Opportunity")
                if fd not in fields:
                    fields.append(fd)
        with self.world.lock:
            opp = self._find(req.params["id"])
            return Response.json(self._render(sobject, opp, fields, req.params["version"]))

    def _check_write_rights(self) -> None:
        """Variant `no_edit_rights`: the user may read opportunities but not create, edit or delete them."""
        if not self.edit_rights:
            raise SfError(400, "INSUFFICIENT_ACCESS_OR_READONLY", "insufficient access rights on object id", [])

    def _values(self, body: Any, sobject: SObject) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HttpError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        values: dict[str, Any] = {}
        readonly = []
        for name, value in body.items():
            if name == "attributes":
                continue
            fd = sobject.fields.get(name.lower())
            if fd is None or "." in fd.name:
                raise HttpError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type Opportunity")
            if not fd.updatable:
                readonly.append(fd.name)
                continue
            values[fd.name] = self._coerce(fd, value)
        if readonly:
            raise SfError(
                400,
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(readonly)}. Please check the security "
                "settings of this field and verify that it is read/write for your profile or "
                "permission set.",
                readonly,
            )
        return values

    def _coerce(self, fd: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        try:
            if fd.type == "datetime":
                return _parse_iso(str(value))
            if fd.type == "date":
                return date.fromisoformat(str(value)[:10])
            if fd.type in ("number", "currency", "percent"):
                return float(value)
        except (TypeError, ValueError):
            raise HttpError(
                400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of {fd.type} from value {value!r}"
            ) from None
        if fd.name == "StageName" and value not in self.world.stages:
            raise HttpError(
                400,
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"Stage: bad value for restricted picklist field: {value}",
            )
        if fd.name == "CurrencyIsoCode" and value not in self.world.profile.currencies:
            raise HttpError(
                400,
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"Opportunity Currency: bad value for restricted picklist field: {value}",
            )
        return value

    def _world_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """API field names -> World attributes (stage before probability: a stage sets its default)."""
        out: dict[str, Any] = {}
        if "StageName" in values:
            out["stage"] = values.pop("StageName")
        for name, value in values.items():
            if name == "Name":
                out["name"] = value
            elif name == "AccountId":
                acc = (
                    None if value is None else self.world.account_by_native(value if len(value) == 18 else to18(value))
                )
                if value is not None and acc is None:
                    raise HttpError(400, "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
                out["account"] = acc.idx if acc else None
            elif name == "OwnerId":
                user = self.world.user_by_native(value if value and len(value) == 18 else to18(value or ""))
                if user is None:
                    raise HttpError(400, "INVALID_CROSS_REFERENCE_KEY", "Owner ID: owner cannot be blank")
                out["owner"] = user.idx
            elif name == "Amount":
                out["amount"] = value
            elif name == "Probability":
                out["probability"] = value
            elif name == "CloseDate":
                out["close_date"] = value
            elif name == "CurrencyIsoCode":
                out["currency"] = value
            else:
                out[name] = value  # custom and unmodelled fields live in `extra`
        return out

    def _create(self, req: Request) -> Response:
        sobject = self._opportunity(req)
        self._check_write_rights()
        values = self._values(req.json(), sobject)
        missing = [f for f in ("Name", "StageName", "CloseDate") if values.get(f) in (None, "")]
        if missing:
            raise SfError(
                400, "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing
            )
        with self.world.lock:
            defaults = {
                "account": None,
                "amount": None,
                "owner": 0,
                "creator": 0,
                "currency": self.world.profile.currencies[0],
            }
            opp = self.world.create(**{**defaults, **self._world_values(values)})
        return Response.json({"id": opp.native_id, "success": True, "errors": []}, 201)

    def _update(self, req: Request) -> Response:
        sobject = self._opportunity(req)
        self._check_write_rights()
        values = self._values(req.json(), sobject)
        with self.world.lock:
            opp = self._find(req.params["id"])
            if "StageName" in values and values["StageName"] is None:
                raise SfError(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [StageName]", ["StageName"])
            if opp.native_id in self.with_products:
                # "Any attempt to update this field, if the record has products, will be ignored. The update call
                # will not be rejected, and other fields will be updated as specified."
                values.pop("Amount", None)
            self.world.update(opp.native_id, **self._world_values(values))
        return Response.empty(204)

    def _delete(self, req: Request) -> Response:
        self._opportunity(req)
        self._check_write_rights()
        with self.world.lock:
            opp = self._find(req.params["id"])
            self.world.delete(opp.native_id)
        return Response.empty(204)
