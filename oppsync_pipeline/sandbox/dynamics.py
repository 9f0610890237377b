"""Microsoft Dynamics 365 Sales / Dataverse Web API v9.2 simulator (docs/crm-api-notes.md §3).

What it serves, at the URL root like the real hosts (the Entra ID token endpoint shares the host):
  POST /{tenant}/oauth2/v2.0/token                   client credentials -> bearer token (AADSTS error bodies)
  GET  /{tenant}/v2.0/.well-known/openid-configuration   OpenID discovery (for msal)
  GET  /api/data/v9.2/                               service document (401 + WWW-Authenticate without a token)
  GET  /api/data/v9.2/EntityDefinitions...           entity-set lookup, attribute metadata, the statuscode option set
  GET  /api/data/v9.2/{opportunities|systemusers|teams|accounts|transactioncurrencies|processstages}
       $select $filter $orderby $top $count $expand, Prefer odata.maxpagesize / include-annotations /
       odata.track-changes (@odata.deltaLink, $deltatoken, $deletedEntity rows), @odata.nextLink + $skiptoken;
       $count=true counts up to 5,000 (the totalrecordcount annotations on request);
       $apply=filter(...)/aggregate($count as x) counts up to 50,000 (then 400 0x8004E023)
  POST /opportunities, PATCH|DELETE /opportunities(<guid>), POST /WinOpportunity, POST /LoseOpportunity

A first page snapshots the matching ids; the opaque $skiptoken (a Dataverse-style paging cookie) names the snapshot
and position, so every further page costs O(page) and reusing a nextLink returns the same page. Creating a record
through the API makes the application user (a systemuser named "# oppsync sandbox") its creator. msal insists on an
https authority: tests reach the http simulator through an http_client that rewrites the scheme (discovery
answers with https endpoints, as Entra does). Service protection: a sliding 300 s window of `request_limit` requests per app, 429 +
Retry-After + error 0x80072322, with the x-ms-ratelimit-burst-remaining-xrm-requests header on every answer; and
52 or more concurrent requests per user: 429 + error 0x80072326 (`in_flight.peak` records the most in flight).
Tenant variants (`VARIANTS`): the application user's security role may lack privileges (403 0x80040220 "Principal
user ... is missing prvRead... privilege", also for a $expand or a $filter path into a table it cannot read), a
navigation property may be hidden (400), a customised tenant has its own business process and more custom columns,
and a tenant may have column security on `actualclosedate` (the API user then reads it empty).
Close time: `actualclosedate` (Date Only, `YYYY-MM-DD`) is the date the opportunity entered its current closed state
(the world's `closed_at`, or the OpportunityClose's `actualend` given to WinOpportunity / LoseOpportunity). Reopening
does not clear it (no Microsoft document says the platform does; the column is an ordinary writable one), so an open
record that was closed before still carries its last close date; the next close overwrites it.
Reads by id: `$filter=Microsoft.Dynamics.CRM.In(PropertyName='opportunityid',PropertyValues=['<guid>',...])` (or an
`or` chain of `opportunityid eq <guid>`); deleted records are gone (hard delete). A GET whose URL is longer than
32,768 characters is refused with 414 before it reaches the service (Microsoft: "use $batch for longer URLs").
The opportunity's stage is a business process stage (`stageid`, `stepname`; the world's sales stages); `truth()`
is the tenant as that API user sees it.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlencode

from oppsync_pipeline.sandbox.kit.formats import fmt_datetime, parse_iso
from oppsync_pipeline.sandbox.kit.lexer import TokenCursor, lex
from oppsync_pipeline.sandbox.kit.limits import InFlight, Window
from oppsync_pipeline.sandbox.kit.snapshots import Snapshots
from oppsync_pipeline.sandbox.kit.tokens import TokenStore
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, HttpError, Request, Response, Simulator
from oppsync_pipeline.sandbox.world import BASE_CURRENCY as WORLD_BASE_CURRENCY
from oppsync_pipeline.sandbox.world import (
    EXCHANGE_RATES,
    Clock,
    SimAccount,
    SimOpportunity,
    SimStage,
    SimUser,
    TenantProfile,
    World,
    utcnow,
)

CRM = "dynamics"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "51f81489-12ee-4a9e-aaae-a2591f45987d"
SANDBOX_CREDENTIALS = {
    "tenant_id": TENANT_ID,
    "client_id": CLIENT_ID,
    "client_secret": "Xq48Q~aB3dE5fG7hJ9kL1mN3pR5tV7xZ9bD1fH3j",
}
# The key the sandbox's default webhook registration sends (`?code=`); a registered endpoint sends its own.
SANDBOX_WEBHOOK_SECRETS = {"webhook_key": "sbx-dataverse-webhook-key-6f1c2a9e4b7d"}
API = "/api/data/v9.2"
REQUEST_LIMIT = 6000
# api-limits.md: "52 or more concurrent requests" per user are refused: at most 51 in flight
CONCURRENT_LIMIT = 51
WINDOW_SECONDS = 300
DELTA_TOKEN_DAYS = 7
FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOGICALNAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAVPROP = "Microsoft.Dynamics.CRM.associatednavigationproperty"
GUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# The tenant's custom columns (publisher prefixes new_ and cr123_); anything else is an unknown property.
CUSTOM_COLUMNS = ("new_region", "cr123_legacyid")
# More custom columns in the custom_fields tenant (only there; selecting them elsewhere is a 400).
CUSTOM_TENANT_COLUMNS = ("new_servicesite", "cr123_dealphase", "_new_signedby_value", "new_winchance")
DEAL_PHASES = {100000000: "Early", 100000001: "Committed", 100000002: "Upside"}
APP_USER_NAME = "# oppsync sandbox"

# Status reasons (statuscode) with their state (statecode 0 Open, 1 Won, 2 Lost); the 1000000xx ones are the
# tenant's own custom status reasons.
STATUS_REASONS = [
    SimStage("1", "In Progress", False, False, 40.0, 1),
    SimStage("2", "On Hold", False, False, 10.0, 2),
    SimStage("100000000", "Awaiting PO", False, False, 80.0, 3),
    SimStage("3", "Won", True, True, 100.0, 4),
    SimStage("4", "Canceled", True, False, 0.0, 5),
    SimStage("5", "Out-Sold", True, False, 0.0, 6),
    SimStage("100000001", "No Decision", True, False, 0.0, 7),
]
STATE_LABELS = {0: "Open", 1: "Won", 2: "Lost"}
SALES_STAGES = ["Qualify", "Develop", "Propose", "Close"]  # the salesstage picklist (stage categories)
# The business process flow's stages (processstage rows; the opportunity's `stageid` and `stepname`): ids that
# are not the labels, named as the Pipeline Phase column shows them. Won deals stand in the last stage; lost ones
# where they were abandoned. The custom_fields tenant runs its own process with other stage names.
SALES_PROCESS_ID = "3e8ebee6-a2bc-4451-9c5f-b146b085413a"
PROCESS_STAGES = [
    SimStage("6b9ce83d-3571-4a1f-8a92-0e6b2c8c2b01", "1-Qualify", False, False, 10.0, 1),
    SimStage("650e06b4-789b-46c1-822b-0da76bedb1ed", "2-Develop", False, False, 40.0, 2),
    SimStage("d3ca8878-8d7b-47b9-852d-fcd838790cfd", "3-Propose", False, False, 70.0, 3),
    SimStage("bb7e830a-61bd-441b-b1fd-6bee15c98b0b", "4-Close", True, True, 100.0, 4),
]
CUSTOM_PROCESS_ID = "a1f00d5e-0b7a-4c1e-9f3a-5d2b7e9c0a10"
CUSTOM_PROCESS_STAGES = [
    SimStage("1c0a5f0e-2b6d-4f43-9a57-6c1d2e3f4a01", "Discovery", False, False, 10.0, 1),
    SimStage("1c0a5f0e-2b6d-4f43-9a57-6c1d2e3f4a02", "Solution Design", False, False, 35.0, 2),
    SimStage("1c0a5f0e-2b6d-4f43-9a57-6c1d2e3f4a03", "Commercials", False, False, 60.0, 3),
    SimStage("1c0a5f0e-2b6d-4f43-9a57-6c1d2e3f4a04", "Legal Review", False, False, 80.0, 4),
    SimStage("1c0a5f0e-2b6d-4f43-9a57-6c1d2e3f4a05", "Signed", True, True, 100.0, 5),
]
# Privileges the application user's security role may lack, and what Dataverse names in the 403 for each.
PRIVILEGES = {
    "prvReadOpportunity": (3, "opportunity"),
    "prvReadEntity": (9800, "entity"),
    "prvReadAccount": (1, "account"),
    "prvReadUser": (8, "systemuser"),
    "prvReadTeam": (9, "team"),
    "prvReadWorkflow": (4703, "workflow"),
    # quotes and their lines (quotedetail is parented by its quote: the sandbox checks the quote's privileges
    # for both, [U] which privilege Dataverse names for a quote line)
    "prvReadQuote": (1084, "quote"),
    "prvCreateQuote": (1084, "quote"),
    "prvWriteQuote": (1084, "quote"),
    "prvReadPriceLevel": (1022, "pricelevel"),
}
VARIANTS = {
    "default": "the API user has a System Customizer-like role: metadata, accounts, users, teams and processes",
    "no_optional_rights": "the API user may read opportunities (and currencies) only: attribute and status "
    "metadata, process stages, systemusers, teams and accounts (so $expand of the account "
    "lookup) answer 403 0x80040220 (missing prvRead... privilege)",
    "no_expand": "the API user cannot read accounts: $expand=parentaccountid answers 403 (missing prvReadAccount); "
    "the account's name is still visible as the lookup's formatted value",
    "custom_fields": "a customised tenant: its own business process flow (other stage names and ids) and more "
    "custom columns (new_servicesite text, cr123_dealphase picklist, new_signedby lookup)",
    "secured_close_date": "column security on actualclosedate (IsSecured in its attribute metadata) and no field "
    "security profile granting the API user read: Dataverse returns the column empty on "
    "every record, indistinguishable from null (column-level-security.md)",
    "no_psa": "neither Project Operations (PSA) nor Field Service is installed: quotedetail has no msdyn_ columns "
    "($select of one: 400 Could not find a property; writing one: 400 0x80048d19 Invalid property)",
    "no_quote_rights": "the API user's role may read quotes but lacks Create and Write on Quote: creating or "
    "editing a quote or quote line answers 403 0x80040220 (missing prvCreateQuote / prvWriteQuote privilege)",
}
# Columns with column-level security in each variant, for which the API user holds no field permission.
SECURED_COLUMNS = {"secured_close_date": frozenset({"actualclosedate"})}
# `$count=true` counts up to this many rows (count-rows.md); an aggregate ($apply) up to AGGREGATE_LIMIT, past
# which the query is refused with AGGREGATE_LIMIT_CODE (aggregate-data.md: "limited to 50,000 records").
COUNT_LIMIT = 5000
AGGREGATE_LIMIT = 50_000
AGGREGATE_LIMIT_CODE = "0x8004E023"
# The longest GET URL Dataverse accepts; longer queries go in a $batch body (up to 64 KB; execute-batch docs).
MAX_URL_LENGTH = 32_768
CURRENCIES = {
    "USD": ("228f42f8-e646-e111-8eb7-78e7d162ced1", "US Dollar", "$"),
    "EUR": ("4f2b3c1d-e646-e111-8eb7-78e7d162ced1", "Euro", "€"),
    "GBP": ("9a6e1b70-e646-e111-8eb7-78e7d162ced1", "Pound Sterling", "£"),
}
CURRENCY_BY_ID = {v[0]: k for k, v in CURRENCIES.items()}
BASE_CURRENCY = WORLD_BASE_CURRENCY  # organization.basecurrencyid: _rate() is per unit of it
ORGANIZATION_ID = "7a1c9e30-0b2d-ee11-9966-000d3a5a1b2c"
BUSINESS_UNIT = "0d2b8a2c-3b5e-ee11-be6f-000d3a5a1b2c"
# Price lists (pricelevel): one active list per currency, and a retired (inactive, statecode 1) one.
PRICE_LEVELS = (
    ("5c2d7e10-1a2b-ee11-9966-000d3a5a1b2c", "Standard USD", "USD", 0),
    ("5c2d7e11-1a2b-ee11-9966-000d3a5a1b2c", "Standard EUR", "EUR", 0),
    ("5c2d7e12-1a2b-ee11-9966-000d3a5a1b2c", "Standard GBP", "GBP", 0),
    ("5c2d7e13-1a2b-ee11-9966-000d3a5a1b2c", "Retired 2023 USD", "USD", 1),
)
PRICE_LEVEL_BY_ID = {p[0]: p for p in PRICE_LEVELS}
# quote.statecode -> label, statuscode -> (statecode, label) (quote.md); only Draft (0) quotes are editable.
QUOTE_STATES = {0: "Draft", 1: "Active", 2: "Won", 3: "Closed"}
QUOTE_STATUS = {
    1: (0, "In Progress"),
    2: (1, "In Progress"),
    3: (1, "Open"),
    4: (2, "Won"),
    5: (3, "Lost"),
    6: (3, "Canceled"),
    7: (3, "Revised"),
}
QUOTE_DEFAULT_STATUS = {0: 1, 1: 3, 2: 4, 3: 5}
BILLING_METHOD_LABELS = {192350000: "Time and Material", 192350001: "Fixed Price"}
# ObjectTypeCode of the tables a lookup may bind to, by entity set (for the "Does Not Exist" messages).
BIND_TABLES = {
    "accounts": "account",
    "contacts": "contact",
    "opportunities": "opportunity",
    "pricelevels": "pricelevel",
    "transactioncurrencies": "transactioncurrency",
    "quotes": "quote",
    "products": "product",
    "uoms": "uom",
}
OPPORTUNITY_METADATA_ID = "4fd7f6b0-0000-0000-0000-0000000000a3"


@dataclass(frozen=True)
class Col:
    """A writable column of the quote tables as its attribute metadata describes it (quote.md, quotedetail.md):
    type, precision, range, options, IsValidForCreate / IsValidForUpdate, default."""

    kind: str  # String, Money, Decimal, Boolean, Picklist, Integer
    create: bool = True
    update: bool = True
    max_length: int | None = None
    precision: int | None = None
    min_value: float | None = None
    options: tuple[int, ...] = ()
    default: Any = None


QUOTE_COLUMNS = {
    "name": Col("String", max_length=300),
    "description": Col("String", max_length=2000),
}
QUOTE_BINDS = {  # navigation property -> (column, entity sets it may point at)
    "customerid_account": ("_customerid_value", ("accounts",)),
    "customerid_contact": ("_customerid_value", ("contacts",)),
    "opportunityid": ("_opportunityid_value", ("opportunities",)),
    "pricelevelid": ("_pricelevelid_value", ("pricelevels",)),
    "transactioncurrencyid": ("_transactioncurrencyid_value", ("transactioncurrencies",)),
}
QUOTEDETAIL_COLUMNS = {
    "productdescription": Col("String", max_length=500),
    "description": Col("String", max_length=2000),
    "isproductoverridden": Col("Boolean", update=False, default=False),  # "not valid for update"
    "ispriceoverridden": Col("Boolean", default=False),
    "quantity": Col("Decimal", precision=5, min_value=0),
    "priceperunit": Col("Money", precision=2, min_value=-922337203685477),
    "producttypecode": Col("Picklist", update=False, options=(1, 2, 3, 4, 5), default=1),
    "lineitemnumber": Col("Integer"),
    # computed from price, quantity, discounts and tax: not valid for create or update
    "baseamount": Col("Money", create=False, update=False, precision=2),
    "extendedamount": Col("Money", create=False, update=False, precision=2),
}
QUOTEDETAIL_BINDS = {
    "quoteid": ("_quoteid_value", ("quotes",)),
    "productid": ("_productid_value", ("products",)),
    "uomid": ("_uomid_value", ("uoms",)),
}
# Columns the Project Operations (PSA) solution adds to quotedetail (quotedetail.md, notes §3.1) ...
PSA_QUOTEDETAIL_COLUMNS = {
    "msdyn_billingmethod": Col("Picklist", options=tuple(BILLING_METHOD_LABELS)),
    "msdyn_costamount": Col("Money", precision=4, min_value=0),
    "msdyn_costpriceperunit": Col("Money", precision=4, min_value=0),
    "msdyn_budgetamount": Col("Money", precision=2, min_value=0),
    "msdyn_includeexpense": Col("Boolean", default=True),
    "msdyn_includematerial": Col("Boolean", default=True),
    "msdyn_includetime": Col("Boolean", default=True),
    "msdyn_includefee": Col("Boolean", default=True),
    "msdyn_linetype": Col("Picklist", options=(690970000, 690970001)),
}
# ... and the Field Service solution.
FIELD_SERVICE_QUOTEDETAIL_COLUMNS = {
    "msdyn_estimatedcost": Col("Money", precision=2, min_value=0),
    "msdyn_estimatedrevenue": Col("Money", precision=2, min_value=0),
}


def _guid(i: int, tail: str) -> str:
    return f"{i:08x}-{tail}"


def opportunity_id(i: int) -> str:
    return _guid(i, "7d9a-ee11-bdf4-000d3a5a1b2c")


def owner_id(i: int) -> str:
    return _guid(i, "6b69-e111-8f65-78e7d1620f5e")


def account_id(i: int) -> str:
    return _guid(i, "0000-ee11-bdf4-000d3a5a1b2c")


def iso(dt: datetime | None) -> str | None:
    return fmt_datetime(dt)


def state_of(stage: SimStage) -> int:
    return 0 if not stage.is_closed else (1 if stage.is_won else 2)


def odata_error(status: int, code: str, message: str) -> HttpError:
    return HttpError(status, code, message)


def bad_query(message: str) -> HttpError:
    return HttpError(400, "0x80060888", message)


# -- OData $filter ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    \s*(?:
      (?P<str>'(?:[^']|'')*')
    | (?P<dstr>"(?:[^"\\]|\\.)*")
    | (?P<guid>"""
    + GUID_RE
    + r""")(?![\w-])
    | (?P<dt>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)(?![\w:])
    | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDfFlL]?)(?![\w.])
    | (?P<ident>[A-Za-z_$@][\w.]*)
    | (?P<punct>[()\[\],/=])
    )""",
    re.VERBOSE,
)

Getter = Callable[[Any, str], Any]


def tokenize(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    text = text.rstrip()
    for kind, val, _ in lex(_TOKEN, text, lambda pos: bad_query(f"Syntax error at position {pos} in '{text}'.")):
        if kind == "str":
            out.append(("lit", val[1:-1].replace("''", "'")))
        elif kind == "dstr":
            out.append(("lit", json.loads(val)))
        elif kind == "guid":
            out.append(("lit", val.lower()))
        elif kind == "dt":
            out.append(("lit", date.fromisoformat(val) if len(val) == 10 else parse_iso(val)))
        elif kind == "num":
            v = val.rstrip("mMdDfFlL")
            out.append(("lit", float(v) if any(c in v for c in ".eE") else int(v)))
        elif kind == "ident":
            low = val.lower()
            if low in ("true", "false"):
                out.append(("lit", low == "true"))
            elif low == "null":
                out.append(("lit", None))
            else:
                out.append(("ident", val))
        else:
            out.append(("p", val))
    return out


def _norm(a: Any, b: Any) -> tuple[Any, Any]:
    """Comparable forms: dates vs datetimes, numbers vs numeric strings, case-insensitive text."""
    if isinstance(a, datetime) and isinstance(b, date) and not isinstance(b, datetime):
        b = datetime.combine(b, datetime.min.time())
    elif isinstance(b, datetime) and isinstance(a, date) and not isinstance(a, datetime):
        a = datetime.combine(a, datetime.min.time())
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, str):
        try:
            b = float(b)
        except ValueError:
            raise bad_query(f"A binary operator with incompatible types was detected: '{b}'.") from None
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold(), b.casefold()
    return a, b


def _compare(op: str, a: Any, b: Any) -> bool:
    if op in ("eq", "ne"):
        if a is None or b is None:
            return (a is b) == (op == "eq")
        a, b = _norm(a, b)
        return (a == b) == (op == "eq")
    if a is None or b is None:
        return False
    a, b = _norm(a, b)
    try:
        return {"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op]
    except TypeError:
        raise bad_query(f"A binary operator with incompatible types was detected for '{op}'.") from None


class FilterParser(TokenCursor):
    """Recursive descent over OData $filter: or / and / not, parentheses, comparisons, functions."""

    OPS = ("eq", "ne", "gt", "ge", "lt", "le")

    def __init__(self, text: str, columns: Callable[[str], bool], entity: str):
        super().__init__(tokenize(text))
        self.columns = columns
        self.entity = entity

    def parse(self) -> Callable[[Any, Getter], bool]:
        node = self._or()
        if self.i != len(self.toks):
            raise bad_query(f"Syntax error: unexpected '{self.toks[self.i][1]}'.")
        return node

    def _take(self, kind: str | None = None, value: Any = None) -> tuple[str, Any]:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (value is not None and str(tok[1]).lower() != value):
            raise bad_query(f"Syntax error: expected {value or kind}, found {tok[1] if tok else 'end of input'}.")
        self.i += 1
        return tok

    def _is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "ident" and tok[1].lower() == word

    def _or(self):
        left = self._and()
        while self._is_word("or"):
            self.i += 1
            right = self._and()
            left = (lambda a, b: lambda o, g: a(o, g) or b(o, g))(left, right)
        return left

    def _and(self):
        left = self._unary()
        while self._is_word("and"):
            self.i += 1
            right = self._unary()
            left = (lambda a, b: lambda o, g: a(o, g) and b(o, g))(left, right)
        return left

    def _unary(self):
        if self._is_word("not"):
            self.i += 1
            inner = self._unary()
            return lambda o, g: not inner(o, g)
        tok = self.peek()
        if tok == ("p", "("):
            self.i += 1
            node = self._or()
            self._take("p", ")")
            return node
        if tok and tok[0] == "ident":
            name = tok[1]
            nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
            if nxt == ("p", "("):
                return self._function(name)
        return self._comparison()

    def _operand(self):
        tok = self._take()
        if tok[0] == "lit":
            v = tok[1]
            return lambda o, g: v
        if tok[0] != "ident":
            raise bad_query(f"Syntax error: unexpected '{tok[1]}'.")
        path = tok[1]
        while self.peek() == ("p", "/"):
            self.i += 1
            path += "/" + self._take("ident")[1]
        if not self.columns(path):
            raise bad_query(f"Could not find a property named '{path}' on type 'Microsoft.Dynamics.CRM.{self.entity}'.")
        return lambda o, g: g(o, path)

    def _comparison(self):
        left = self._operand()
        op_tok = self._take("ident")
        op = op_tok[1].lower()
        if op not in self.OPS:
            raise bad_query(f"Syntax error: unknown operator '{op_tok[1]}'.")
        right = self._operand()
        return lambda o, g: _compare(op, left(o, g), right(o, g))

    def _function(self, name: str):
        self.i += 2  # name (
        low = name.lower()
        if low in ("contains", "startswith", "endswith"):
            prop = self._operand()
            self._take("p", ",")
            needle = self._operand()
            self._take("p", ")")
            test = {"contains": lambda a, b: b in a, "startswith": str.startswith, "endswith": str.endswith}[low]

            def fn(o, g):
                a, b = prop(o, g), needle(o, g)
                return a is not None and b is not None and test(str(a).casefold(), str(b).casefold())

            return fn
        if low == "microsoft.dynamics.crm.in":
            args: dict[str, Any] = {}
            while True:
                key = self._take("ident")[1]
                self._take("p", "=")
                if self.peek() == ("p", "["):
                    self.i += 1
                    values = []
                    while self.peek() != ("p", "]"):
                        values.append(self._take("lit")[1])
                        if self.peek() == ("p", ","):
                            self.i += 1
                    self.i += 1
                    args[key] = values
                else:
                    args[key] = self._take("lit")[1]
                if self.peek() == ("p", ","):
                    self.i += 1
                    continue
                self._take("p", ")")
                break
            prop, values = args.get("PropertyName"), args.get("PropertyValues")
            if not isinstance(prop, str) or not isinstance(values, list):
                raise bad_query("Microsoft.Dynamics.CRM.In requires PropertyName and PropertyValues.")
            if not self.columns(prop):
                raise bad_query(
                    f"Could not find a property named '{prop}' on type 'Microsoft.Dynamics.CRM.{self.entity}'."
                )
            return lambda o, g: any(_compare("eq", g(o, prop), v) for v in values)
        raise bad_query(f"The function '{name}' is not supported by this sandbox.")


# -- entity sets -----------------------------------------------------------------------------------------------


class EntitySet:
    """One entity set: its rows, typed column getters and lookups (for $expand and annotations)."""

    def __init__(
        self,
        name: str,
        logical: str,
        key: str,
        rows: Callable[[], Iterable[Any]],
        columns: dict[str, Callable[[Any], Any]],
        lookups: dict[str, tuple[str, str]] | None = None,
        formatted: dict[str, Callable[[Any], Any]] | None = None,
    ):
        self.name, self.logical, self.key = name, logical, key
        self.rows = rows
        self.columns = columns
        # _x_value -> (navigation property, entity set of the target) ; target set may be resolved per row
        self.lookups = lookups or {}
        self.formatted = formatted or {}

    def has(self, name: str) -> bool:
        return name in self.columns


class DynamicsSimulator(Simulator):
    crm = CRM

    def __init__(self, world: World, faults: FaultPlan | None = None, variant: str = "default"):
        super().__init__(world, faults)
        if variant not in VARIANTS:
            raise ValueError(f"unknown dynamics sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
        self.variant = variant
        # Privileges the application user's role lacks (403 0x80040220 naming the privilege), and navigation
        # properties this tenant does not expose (400 "Could not find a property named ...").
        self.denied: set[str] = {
            "no_optional_rights": {"prvReadEntity", "prvReadAccount", "prvReadUser", "prvReadTeam", "prvReadWorkflow"},
            "no_expand": {"prvReadAccount"},
        }.get(variant, set())
        self.hidden_navigation: set[str] = set()
        # Columns under column security the API user may not read: Dataverse returns them empty.
        self.secured: frozenset[str] = SECURED_COLUMNS.get(variant, frozenset())
        self.custom_tenant = variant == "custom_fields"
        self.process_id = CUSTOM_PROCESS_ID if self.custom_tenant else SALES_PROCESS_ID
        # Entra tokens expire on real time (kit/tokens.py says why), the service protection window too.
        self.tokens = TokenStore(utcnow, 3599)
        self.request_limit = REQUEST_LIMIT
        self.aggregate_limit = AGGREGATE_LIMIT  # a test may lower it to exercise counting in ranges
        self.requests = Window(lambda: self.request_limit, WINDOW_SECONDS)
        # service protection's third limit: 52 or more concurrent requests per user are refused (0x80072326)
        self.concurrent_limit = CONCURRENT_LIMIT
        self.in_flight = InFlight(lambda: self.concurrent_limit)
        self._snapshots = Snapshots(64, new_id=lambda n: secrets.token_hex(6))
        self.delta_tokens: dict[str, tuple[datetime, frozenset[str]]] = {}  # $deltatoken -> (issued, deleted ids)
        self.change_tracking_enabled = True
        self.closes: list[dict[str, Any]] = []  # opportunityclose activities created by Win/Lose
        # actualclosedate outlives a reopen: the last close date seen per opportunity (see _remember_closes).
        self._last_close: dict[str, date] = {}
        self._closes_version = -1
        self._remember_closes()
        # Service connectors call as an application user: a systemuser named after the app registration.
        self.app_user = next((u for u in world.users if u.name == APP_USER_NAME), None) or self._add_app_user()
        self.users_by_id = {u.native_id: u for u in world.users}
        self.accounts_by_id = {a.native_id: a for a in world.accounts}
        # Accounts carry their own modifiedon: a rename or a new address moves it (the opportunity's does not).
        # The world does not stamp account edits, so the simulator notices them (at the latest when a query
        # reads the account) and stamps the clock's time then.
        self._account_marks: dict[int, tuple[tuple, datetime]] = {}
        since = world.clock.now() - timedelta(days=30)
        for a in world.accounts:
            self._account_marks[a.idx] = (_account_signature(a), since)
        # Quotes and their lines live in the simulator (not the world): a quote is not the opportunity, and writing
        # one changes neither its estimatedvalue nor its modifiedon.
        self.quotes: dict[str, dict[str, Any]] = {}
        self.quotedetails: dict[str, dict[str, Any]] = {}
        self._rowversion = 5_000_000
        self.quotedetail_columns = dict(QUOTEDETAIL_COLUMNS)
        if variant != "no_psa":
            self.quotedetail_columns.update(PSA_QUOTEDETAIL_COLUMNS)
            self.quotedetail_columns.update(FIELD_SERVICE_QUOTEDETAIL_COLUMNS)
        if variant == "no_quote_rights":
            self.denied |= {"prvCreateQuote", "prvWriteQuote"}
        self.sets = self._entity_sets()
        t = r"(?P<tenant>[^/]+)"
        self.route("POST", rf"/{t}/oauth2/v2\.0/token", self.token)
        self.route("GET", rf"/{t}/v2\.0/\.well-known/openid-configuration", self.openid_configuration)
        api = functools.partial(self.route, guard=self._authorize)  # bearer token, then service protection
        api("GET", rf"{API}/?", self.service_document)
        api("GET", rf"{API}/\$metadata", self.metadata)
        api("GET", rf"{API}/EntityDefinitions", self.entity_definitions)
        api(
            "GET",
            rf"{API}/EntityDefinitions\(LogicalName='opportunity'\)/Attributes\(LogicalName='"
            r"(?P<attr>statuscode|statecode)'\)/Microsoft\.Dynamics\.CRM\.(?P<kind>\w+)",
            self.status_metadata,
        )
        api("GET", rf"{API}/EntityDefinitions\(LogicalName='(?P<entity>\w+)'\)/Attributes", self.attribute_metadata)
        api(
            "GET",
            rf"{API}/(?P<set>opportunities|systemusers|teams|accounts|transactioncurrencies|organizations|"
            r"processstages|pricelevels|quotes|quotedetails)",
            self.collection,
        )
        api(
            "GET",
            rf"{API}/(?P<set>opportunities|systemusers|teams|accounts|processstages|pricelevels|quotes|quotedetails)"
            rf"\((?P<id>{GUID_RE})\)",
            self.single,
        )
        api("POST", rf"{API}/(?P<set>quotes|quotedetails)", self.create_quote_record)
        api("PATCH", rf"{API}/(?P<set>quotes|quotedetails)\((?P<id>{GUID_RE})\)", self.update_quote_record)
        api("DELETE", rf"{API}/(?P<set>quotes|quotedetails)\((?P<id>{GUID_RE})\)", self.delete_quote_record)
        api("POST", rf"{API}/opportunities", self.create)
        api("PATCH", rf"{API}/opportunities\((?P<id>{GUID_RE})\)", self.update)
        api("DELETE", rf"{API}/opportunities\((?P<id>{GUID_RE})\)", self.delete)
        api("POST", rf"{API}/(?P<action>WinOpportunity|LoseOpportunity)", self.close)
        # Webhooks (sandbox/dynamics_webhooks.py): the plug-in registration tables and the steps' requests; the
        # registrations observe the world before the sender queues a change (the Update Target's columns).
        from oppsync_pipeline.sandbox.dynamics_webhooks import WebhookRegistrations
        from oppsync_pipeline.sandbox.kit.webhooks import WebhookSender

        self.registrations = WebhookRegistrations(self, SANDBOX_WEBHOOK_SECRETS["webhook_key"])
        self.sets.update(self.registrations.entity_sets())
        self.registrations.routes(api, GUID_RE)
        world.listeners.append(self.registrations.observe)
        self.webhooks = WebhookSender(world, self._webhook_requests).start()

    def _webhook_requests(self, changes: list[Any]) -> list[Any]:
        return self.registrations.build(changes)

    def handle(self, req: Request) -> Response:
        """A URL past Dataverse's limit is refused by the front end (HTTP.sys) before auth or throttling."""
        if len(self._base(req)) + len(req.raw_path or req.path) > MAX_URL_LENGTH:
            return Response(
                414,
                b"<h2>Request URL Too Long</h2><hr><p>HTTP Error 414. The request URL is too long.</p>",
                {"Content-Type": "text/html; charset=us-ascii"},
            )
        return super().handle(req)

    def _add_app_user(self) -> SimUser:
        user = SimUser(
            len(self.world.users),
            owner_id(len(self.world.users)),
            APP_USER_NAME,
            f"{CLIENT_ID}@sandbox.onmicrosoft.com",
        )
        self.world.users.append(user)
        return user

    # -- the CRM's forms of errors, throttling, token expiry, usage headers --------------------------------------

    def error_response(self, err: HttpError) -> Response:
        if err.status == 401:
            return Response.empty(401, {**err.headers, "WWW-Authenticate": self._www_authenticate()})
        code = err.code
        if not code.startswith("0x"):  # framework errors (404 route, 503 fault ...) in the Dataverse shape
            code = {404: "0x80060888", 405: "0x80060888", 503: "0x80040216"}.get(err.status, "0x80040216")
        return Response.json(
            {"error": {"code": code, "message": err.message}}, err.status, {"OData-Version": "4.0", **err.headers}
        )

    def rate_limit_response(self, rule: FaultRule) -> Response:
        return Response.json(
            {
                "error": {
                    "code": "0x80072322",
                    "message": f"Number of requests exceeded the limit of "
                    f"{self.request_limit} over time window of "
                    f"{WINDOW_SECONDS} seconds.",
                }
            },
            429,
            {"Retry-After": str(max(0, int(rule.seconds))), "OData-Version": "4.0"},
        )

    def expire_tokens(self) -> None:
        self.tokens.expire_all()

    def common_headers(self, req: Request) -> dict[str, str]:
        if not req.path.startswith(API):
            return {}
        return {
            "x-ms-ratelimit-burst-remaining-xrm-requests": str(self.requests.remaining()),
            "x-ms-ratelimit-time-remaining-xrm-requests": "1,200,000.00",
            "OData-Version": "4.0",
            "x-ms-service-request-id": secrets.token_hex(8),
        }

    def in_flight_key(self, req: Request) -> Any:
        """Concurrent requests count per user (the bearer token's application user); token calls are not."""
        token = req.bearer()
        return "application user" if token else None

    def too_many_in_flight(self, req: Request) -> Response:
        return self.error_response(
            HttpError(
                429,
                "0x80072326",
                f"Number of concurrent requests exceeded the limit of {self.concurrent_limit + 1}.",
                {"Retry-After": "1"},
            )
        )

    def _www_authenticate(self) -> str:
        return (
            f"Bearer authorization_uri=https://login.microsoftonline.com/{TENANT_ID}/oauth2/authorize, "
            f"resource_id=https://sandbox.crm.dynamics.com/"
        )

    def _authorize(self, req: Request) -> None:
        if not self.tokens.valid(req.bearer()):
            raise HttpError(401, "ExpiredAuthTicket", "")
        if self.requests.take() is None:
            retry = max(1, int(self.requests.retry_after()) + 1)
            raise HttpError(
                429,
                "0x80072322",
                f"Number of requests exceeded the limit of {self.request_limit} over time window "
                f"of {WINDOW_SECONDS} seconds.",
                {"Retry-After": str(retry)},
            )

    def _require(self, privilege: str) -> None:
        """403 in Dataverse's shape when the application user's security role lacks `privilege`."""
        if privilege in self.denied:
            otc, entity = PRIVILEGES[privilege]
            raise odata_error(
                403,
                "0x80040220",
                f"Principal user (Id={self.app_user.native_id}, type=8, roleCount=1, "
                f"privilegeCount=212, accessMode=4), is missing {privilege} privilege "
                f"(Id={_guid(otc, 'a5b3-4c1d-9e2f-00000000abcd')}) on OTC={otc} for "
                f"entity '{entity}'. context.Caller={self.app_user.native_id}",
            )

    def _require_read(self, entity_set: str) -> None:
        privilege = {
            "opportunities": "prvReadOpportunity",
            "accounts": "prvReadAccount",
            "systemusers": "prvReadUser",
            "teams": "prvReadTeam",
            "processstages": "prvReadWorkflow",
            "quotes": "prvReadQuote",
            "quotedetails": "prvReadQuote",
            "pricelevels": "prvReadPriceLevel",
        }.get(entity_set)
        if privilege:
            self._require(privilege)

    def _base(self, req: Request) -> str:
        return f"http://{req.host}"

    # -- Entra ID ------------------------------------------------------------------------------------------------

    def _aad_error(self, status: int, error: str, code: int, description: str) -> Response:
        now = self.world.clock.now().strftime("%Y-%m-%d %H:%M:%SZ")
        trace, corr = _uuid(), _uuid()
        return Response.json(
            {
                "error": error,
                "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}"
                f"\r\nTimestamp: {now}",
                "error_codes": [code],
                "timestamp": now,
                "trace_id": trace,
                "correlation_id": corr,
                "error_uri": f"https://login.microsoftonline.com/error?code={code}",
            },
            status,
            {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
        )

    def token(self, req: Request) -> Response:
        form = req.form()
        if req.params["tenant"] not in (TENANT_ID, "sandbox.onmicrosoft.com"):
            return self._aad_error(
                400,
                "invalid_request",
                90002,
                f"Tenant '{req.params['tenant']}' not found. Check to make sure you have the "
                "correct tenant ID and are signing into the correct cloud.",
            )
        if form.get("grant_type") != "client_credentials":
            return self._aad_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_id") != CLIENT_ID:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the "
                f"directory '{req.params['tenant']}'.",
            )
        if form.get("client_secret") != SANDBOX_CREDENTIALS["client_secret"]:
            return self._aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                f"the client secret value, not the client secret ID, for a secret added to app "
                f"'{CLIENT_ID}'.",
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default") or not scope.startswith(("http://", "https://")):
            return self._aad_error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        header = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"RS256"}').rstrip(b"=").decode()
        claims = (
            base64.urlsafe_b64encode(
                json.dumps({"aud": scope[: -len("/.default")], "tid": TENANT_ID, "appid": CLIENT_ID}).encode()
            )
            .rstrip(b"=")
            .decode()
        )
        token = f"{header}.{claims}.{secrets.token_urlsafe(24)}"
        self.tokens.issue(token)
        return Response.json(
            {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token},
            headers={"Cache-Control": "no-store, no-cache"},
        )

    def openid_configuration(self, req: Request) -> Response:
        # Entra answers with https endpoints only (msal refuses anything else).
        host = f"https://{req.host}"
        t = req.params["tenant"]
        return Response.json(
            {
                "token_endpoint": f"{host}/{t}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{host}/{t}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{host}/{t}/v2.0",
                "authorization_endpoint": f"{host}/{t}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{host}/{t}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{host}/{t}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
            }
        )

    # -- metadata ------------------------------------------------------------------------------------------------

    def service_document(self, req: Request) -> Response:
        base = self._base(req) + API
        return Response.json(
            {
                "@odata.context": f"{base}/$metadata",
                "value": [{"name": s, "kind": "EntitySet", "url": s} for s in self.sets],
            }
        )

    def metadata(self, req: Request) -> Response:
        """A small CSDL document: the entity types this sandbox serves, with their properties."""
        types = {
            "opportunities": {
                "estimatedvalue": "Edm.Decimal",
                "exchangerate": "Edm.Decimal",
                "estimatedvalue_base": "Edm.Decimal",
                "estimatedclosedate": "Edm.Date",
                "actualclosedate": "Edm.Date",
                "closeprobability": "Edm.Int32",
                "statecode": "Edm.Int32",
                "statuscode": "Edm.Int32",
                "salesstage": "Edm.Int32",
                "createdon": "Edm.DateTimeOffset",
                "modifiedon": "Edm.DateTimeOffset",
                "new_originalcreatedon": "Edm.DateTimeOffset",
                "versionnumber": "Edm.Int64",
                "stageid": "Edm.Guid",
                "processid": "Edm.Guid",
                "cr123_dealphase": "Edm.Int32",
            }
        }
        parts = [
            '<?xml version="1.0" encoding="utf-8"?>',
            '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>',
            '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
        ]
        for es in self.sets.values():
            kinds = types.get(es.name, {})
            parts.append(f'<EntityType Name="{es.logical}"><Key><PropertyRef Name="{es.key}" /></Key>')
            for col in es.columns:
                edm = "Edm.Guid" if col == es.key or col.endswith("_value") else kinds.get(col, "Edm.String")
                parts.append(f'<Property Name="{col}" Type="{edm}" />')
            parts.append("</EntityType>")
        parts.append('<EntityContainer Name="System">')
        parts += [
            f'<EntitySet Name="{es.name}" EntityType="Microsoft.Dynamics.CRM.{es.logical}" />'
            for es in self.sets.values()
        ]
        parts.append("</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>")
        return Response(
            200, "".join(parts).encode("utf-8"), {"Content-Type": "application/xml", "OData-Version": "4.0"}
        )

    def entity_definitions(self, req: Request) -> Response:
        self._require("prvReadEntity")
        rows = [
            {
                "LogicalName": s.logical,
                "EntitySetName": s.name,
                "PrimaryIdAttribute": s.key,
                "SchemaName": s.logical.title(),
                "ChangeTrackingEnabled": s.name == "opportunities" and self.change_tracking_enabled,
                "MetadataId": OPPORTUNITY_METADATA_ID if s.name == "opportunities" else _uuid(),
            }
            for s in self.sets.values()
        ]
        text = req.arg("$filter")
        if text:
            pred = FilterParser(text, lambda c: c in rows[0], "EntityMetadata").parse()
            rows = [r for r in rows if pred(r, lambda r, c: r.get(c))]
        select = [c for c in (req.arg("$select") or "").split(",") if c]
        if select:
            rows = [{k: r[k] for k in ["MetadataId", *select] if k in r} for r in rows]
        return Response.json({"@odata.context": f"{self._base(req)}{API}/$metadata#EntityDefinitions", "value": rows})

    def status_metadata(self, req: Request) -> Response:
        self._require("prvReadEntity")
        attr, kind = req.params["attr"], req.params["kind"]
        want = "StatusAttributeMetadata" if attr == "statuscode" else "StateAttributeMetadata"
        if kind != want:
            raise bad_query(f"Attribute '{attr}' is not of type Microsoft.Dynamics.CRM.{kind}.")
        if attr == "statuscode":
            options = [
                {
                    "Value": int(s.key),
                    "State": state_of(s),
                    "Label": _label(s.label),
                    "Color": None,
                    "IsManaged": not s.key.startswith("1000"),
                    "TransitionData": None,
                }
                for s in sorted(self.world.stages.values(), key=lambda s: s.order)
            ]
        else:
            defaults = {0: 1, 1: 3, 2: 4}
            options = [
                {"Value": v, "DefaultStatus": defaults[v], "InvariantName": lbl, "Label": _label(lbl)}
                for v, lbl in STATE_LABELS.items()
            ]
        body = {
            "@odata.context": f"{self._base(req)}{API}/$metadata#EntityDefinitions('opportunity')/Attributes"
            f"/Microsoft.Dynamics.CRM.{kind}(OptionSet())/$entity",
            "LogicalName": attr,
            "MetadataId": _uuid(),
            "AttributeType": "Status" if attr == "statuscode" else "State",
        }
        if "OptionSet" in (req.arg("$expand") or ""):
            body["OptionSet"] = {
                "MetadataId": _uuid(),
                "Name": f"opportunity_{attr}",
                "OptionSetType": "Status" if attr == "statuscode" else "State",
                "Options": options,
            }
        return Response.json(body)

    def attribute_metadata(self, req: Request) -> Response:
        """`EntityDefinitions(LogicalName='opportunity')/Attributes`: one AttributeMetadata per column (custom
        ones with IsCustomAttribute), lookups under their logical name (`parentaccountid`, not the Web API's
        `_parentaccountid_value`)."""
        self._require("prvReadEntity")
        entity = req.params["entity"]
        es = next((e for e in self.sets.values() if e.logical == entity), None)
        if es is None:
            raise odata_error(404, "0x80040217", f"Could not find entity with LogicalName = {entity}")
        rows = []
        for col in es.columns:
            logical = col[1 : -len("_value")] if col.startswith("_") and col.endswith("_value") else col
            kind = _attribute_type(es, col)
            rows.append(
                {
                    "@odata.type": f"#Microsoft.Dynamics.CRM.{_METADATA_TYPE.get(kind, 'Attribute')}Metadata",
                    "LogicalName": logical,
                    "SchemaName": logical.title(),
                    "AttributeType": kind,
                    "IsCustomAttribute": bool(re.match(r"^[a-z][a-z0-9]{1,7}_", logical))
                    and not logical.startswith(("msdyn_", "adx_")),
                    "AttributeOf": None,
                    "IsValidForRead": True,
                    "IsSecured": col in self.secured,
                    "MetadataId": _guid(sum(map(ord, logical)), "0000-4000-8000-000000000a77"),
                }
            )
        text = req.arg("$filter")
        if text:
            pred = FilterParser(text, lambda c: c in rows[0], "AttributeMetadata").parse()
            rows = [r for r in rows if pred(r, lambda r, c: r.get(c))]
        select = [c for c in (req.arg("$select") or "").split(",") if c]
        if select:
            rows = [{k: r[k] for k in ["@odata.type", "MetadataId", *select] if k in r} for r in rows]
        return Response.json(
            {
                "@odata.context": f"{self._base(req)}{API}/$metadata#EntityDefinitions('{entity}')/Attributes",
                "value": rows,
            }
        )

    # -- entity sets ---------------------------------------------------------------------------------------------

    def _entity_sets(self) -> dict[str, EntitySet]:
        w = self.world
        stage = lambda o: w.stages[o.stage]  # noqa: E731
        owner = lambda o: w.users[o.owner]  # noqa: E731

        def account(o: SimOpportunity):
            return w.accounts[o.account] if o.account is not None else None

        opp_cols: dict[str, Callable[[Any], Any]] = {
            "opportunityid": lambda o: o.native_id,
            "name": lambda o: o.name,
            "estimatedvalue": lambda o: o.amount,
            # Dataverse's exchangerate is units of the record's currency per unit of the base currency: the base
            # value is the value divided by it (Money columns' *_base, "Manage transactions with multiple
            # currencies"). actualvalue_base likewise, once won.
            "estimatedvalue_base": lambda o: None if o.amount is None else round(o.amount / _rate(o.currency), 4),
            "actualvalue_base": lambda o: (
                round(o.amount / _rate(o.currency), 4) if o.amount is not None and stage(o).is_won else None
            ),
            "exchangerate": lambda o: _rate(o.currency),
            "budgetamount": lambda o: None if o.amount is None or o.seq % 4 == 0 else round(o.amount * 0.8, 2),
            "actualvalue": lambda o: o.amount if stage(o).is_won else None,
            "overriddencreatedon": lambda o: None,
            "_campaignid_value": lambda o: None,
            "_originatingleadid_value": lambda o: None,
            "estimatedclosedate": lambda o: o.close_date,
            "actualclosedate": self._actual_close_date,
            "closeprobability": lambda o: None if o.probability is None else int(round(o.probability)),
            "statecode": lambda o: state_of(stage(o)),
            "statuscode": lambda o: int(o.stage),
            "salesstage": lambda o: _salesstage(w, o),
            # the business process flow: the active stage's id and the Pipeline Phase text it writes
            "stepname": lambda o: w.sales_stage_of(o).label,
            "stageid": lambda o: w.sales_stage_of(o).key,
            "processid": lambda o: self.process_id,
            "description": lambda o: (o.extra or {}).get("description"),
            "_parentaccountid_value": lambda o: account(o).native_id if account(o) else None,
            "_customerid_value": lambda o: account(o).native_id if account(o) else None,
            "_ownerid_value": lambda o: owner(o).native_id,
            "_owninguser_value": lambda o: owner(o).native_id if owner(o).kind == "user" else None,
            "_owningteam_value": lambda o: owner(o).native_id if owner(o).kind == "team" else None,
            "_owningbusinessunit_value": lambda o: BUSINESS_UNIT,
            "_createdby_value": lambda o: w.users[o.creator].native_id,
            "_modifiedby_value": lambda o: w.users[o.creator if owner(o).kind == "team" else o.owner].native_id,
            "_transactioncurrencyid_value": lambda o: CURRENCIES[o.currency][0],
            # the price list: the currency's standard list on most records, none on every fifth
            "_pricelevelid_value": lambda o: None if o.seq % 5 == 0 else _price_level_for(o.currency),
            "createdon": lambda o: o.created_at,
            "modifiedon": lambda o: o.modified_at,
            "versionnumber": lambda o: int(o.modified_at.timestamp()) * 1000 + o.seq % 1000,
            # a tenant custom column (publisher prefix new_): the legacy system's creation date (seed 002)
            "new_originalcreatedon": lambda o: (o.extra or {}).get(
                "new_originalcreatedon", None if o.seq % 5 == 0 else o.created_at - timedelta(days=30 + o.seq % 90)
            ),
            **{c: (lambda o, c=c: (o.extra or {}).get(c)) for c in CUSTOM_COLUMNS},
        }
        if self.custom_tenant:
            opp_cols.update(
                {
                    "new_servicesite": lambda o: (o.extra or {}).get("new_servicesite", f"Site {o.seq % 4}"),
                    "cr123_dealphase": lambda o: (o.extra or {}).get("cr123_dealphase", 100000000 + o.seq % 3),
                    "_new_signedby_value": lambda o: None if o.seq % 4 else w.users[o.creator].native_id,
                    "new_winchance": lambda o: (o.extra or {}).get("new_winchance", (o.seq * 37) % 101),
                }
            )
        opp_lookups = {
            "_parentaccountid_value": ("parentaccountid", "accounts"),
            "_customerid_value": ("customerid_account", "accounts"),
            "_ownerid_value": ("ownerid", "owner"),
            "_owninguser_value": ("owninguser", "systemusers"),
            "_owningteam_value": ("owningteam", "teams"),
            "_owningbusinessunit_value": ("owningbusinessunit", "businessunits"),
            "_createdby_value": ("createdby", "systemusers"),
            "_modifiedby_value": ("modifiedby", "systemusers"),
            "_transactioncurrencyid_value": ("transactioncurrencyid", "transactioncurrencies"),
            "_pricelevelid_value": ("pricelevelid", "pricelevels"),
            "_campaignid_value": ("campaignid", "campaigns"),
            "_originatingleadid_value": ("originatingleadid", "leads"),
        }
        if self.custom_tenant:
            opp_lookups["_new_signedby_value"] = ("new_signedby", "systemusers")
        opp_fmt = {
            "estimatedvalue": lambda o: None if o.amount is None else f"{CURRENCIES[o.currency][2]}{o.amount:,.2f}",
            "estimatedclosedate": lambda o: o.close_date and _fmt_date(o.close_date),
            "actualclosedate": lambda o: (d := self._actual_close_date(o)) and _fmt_date(d),
            "statecode": lambda o: STATE_LABELS[state_of(stage(o))],
            "statuscode": lambda o: stage(o).label,
            "salesstage": lambda o: SALES_STAGES[_salesstage(w, o)],
            "cr123_dealphase": lambda o: DEAL_PHASES.get(opp_cols["cr123_dealphase"](o)),
            "closeprobability": lambda o: None if o.probability is None else str(int(round(o.probability))),
            "createdon": lambda o: _fmt_dt(o.created_at),
            "modifiedon": lambda o: _fmt_dt(o.modified_at),
        }
        users = lambda: (u for u in w.users if u.kind == "user")  # noqa: E731
        teams = lambda: (u for u in w.users if u.kind == "team")  # noqa: E731
        user_cols = {
            "systemuserid": lambda u: u.native_id,
            "fullname": lambda u: u.name,
            "internalemailaddress": lambda u: u.email,
            "domainname": lambda u: u.email,
            "isdisabled": lambda u: not u.active,
            "firstname": lambda u: u.name.split(" ", 1)[0],
            "lastname": lambda u: u.name.split(" ", 1)[-1],
            "_businessunitid_value": lambda u: BUSINESS_UNIT,
        }
        team_cols = {
            "teamid": lambda u: u.native_id,
            "name": lambda u: u.name,
            "teamtype": lambda u: 0,
            "emailaddress": lambda u: u.email,
            "_businessunitid_value": lambda u: BUSINESS_UNIT,
        }

        def composite(a):
            line2 = " ".join(p for p in (a.city and a.city + ",", a.state, a.postal_code) if p).rstrip(",")
            return "\r\n".join(p for p in (*address_lines(a), line2, a.country) if p) or None

        acc_cols = {
            "accountid": lambda a: a.native_id,
            "name": lambda a: a.name,
            "address1_line1": lambda a: address_lines(a)[0],
            "address1_line2": lambda a: address_lines(a)[1],
            "address1_line3": lambda a: address_lines(a)[2],
            "address1_city": lambda a: a.city,
            "address1_stateorprovince": lambda a: a.state,
            "address1_postalcode": lambda a: a.postal_code,
            "address1_country": lambda a: a.country,
            "address1_composite": composite,
            "modifiedon": self._account_modified,
        }
        cur_rows = [(k, *v) for k, v in CURRENCIES.items()]
        stage_cols = {
            "processstageid": lambda st: st.key,
            "stagename": lambda st: st.label,
            "stagecategory": lambda st: min(st.order - 1, 3),
            "primaryentitytypecode": lambda st: "opportunity",
            "_processid_value": lambda st: self.process_id,
        }
        cur_cols = {
            "transactioncurrencyid": lambda c: c[1],
            "isocurrencycode": lambda c: c[0],
            "currencyname": lambda c: c[2],
            "currencysymbol": lambda c: c[3],
            "exchangerate": lambda c: _rate(c[0]),
        }
        return {
            "opportunities": EntitySet(
                "opportunities", "opportunity", "opportunityid", lambda: w.live(), opp_cols, opp_lookups, opp_fmt
            ),
            "systemusers": EntitySet("systemusers", "systemuser", "systemuserid", users, user_cols),
            "teams": EntitySet("teams", "team", "teamid", teams, team_cols),
            "accounts": EntitySet("accounts", "account", "accountid", lambda: iter(w.accounts), acc_cols),
            "transactioncurrencies": EntitySet(
                "transactioncurrencies",
                "transactioncurrency",
                "transactioncurrencyid",
                lambda: iter(cur_rows),
                cur_cols,
            ),
            # The environment's one organization row: its base currency is the currency every *_base column
            # is in (set when the environment is created, never changed afterwards).
            "organizations": EntitySet(
                "organizations",
                "organization",
                "organizationid",
                lambda: iter([ORGANIZATION_ID]),
                {
                    "organizationid": lambda k: k,
                    "name": lambda k: "Contoso Sandbox",
                    "_basecurrencyid_value": lambda k: CURRENCIES[BASE_CURRENCY][0],
                },
                {"_basecurrencyid_value": ("basecurrencyid", "transactioncurrencies")},
            ),
            "processstages": EntitySet(
                "processstages",
                "processstage",
                "processstageid",
                lambda: iter(sorted(w.sales_stages.values(), key=lambda st: st.order)),
                stage_cols,
                {"_processid_value": ("processid", "workflows")},
                {"stagecategory": lambda st: SALES_STAGES[min(st.order - 1, 3)]},
            ),
            **self._quote_sets(),
        }

    def _getter(self, es: EntitySet) -> Getter:
        cols = es.columns

        def get(row: Any, name: str) -> Any:
            if "/" in name:
                nav, col = name.split("/", 1)
                target = self._expand_target(es, row, nav)
                if target is None:
                    return None
                return self.sets[target[0]].columns[col](target[1]) if col in self.sets[target[0]].columns else None
            if name in cols:
                return cols[name](row)
            return (getattr(row, "extra", None) or {}).get(name)

        return get

    def _account_modified(self, a: SimAccount) -> datetime:
        signature = _account_signature(a)
        mark = self._account_marks.get(a.idx)
        if mark is None or mark[0] != signature:
            mark = (signature, self.world.clock.now())
            self._account_marks[a.idx] = mark
        return mark[1]

    def _actual_close_date(self, o: SimOpportunity) -> date | None:
        """actualclosedate (Date Only): the date the record entered its closed state, in the application user's
        time zone (UTC here); an open record keeps the date of its last close; empty under column security."""
        if "actualclosedate" in self.secured:
            return None
        if o.closed_at is not None and self.world.stages[o.stage].is_closed:
            self._last_close[o.native_id] = o.closed_at.date()
            return self._last_close[o.native_id]
        return self._last_close.get(o.native_id)

    def _remember_closes(self) -> None:
        """Note every closed record's close date while the world still holds it: the world clears `closed_at` on a
        reopen (World.advance, World.update), Dataverse keeps actualclosedate. Runs when the world has changed."""
        w = self.world
        if self._closes_version == w.version:
            return
        for o in w.opps.values():
            if o.closed_at is not None and w.stages[o.stage].is_closed:
                self._last_close[o.native_id] = o.closed_at.date()
        self._closes_version = w.version

    def _has_column(self, es: EntitySet) -> Callable[[str], bool]:
        def has(name: str) -> bool:
            if "/" in name:
                nav, col = name.split("/", 1)
                for n, target in es.lookups.values():
                    if n == nav and nav not in self.hidden_navigation:
                        if target in self.sets and col in self.sets[target].columns:
                            self._require_read(target)  # a path through a lookup reads the target table
                            return True
                        return False
                return False
            return name in es.columns

        return has

    def _expand_target(self, es: EntitySet, row: Any, nav: str) -> tuple[str, Any] | None:
        for lk, (n, target) in es.lookups.items():
            if n != nav:
                continue
            value = es.columns[lk](row)
            if value is None:
                return None
            if target in ("accounts",):
                return "accounts", self.accounts_by_id.get(value)
            if target in ("systemusers", "teams", "owner"):
                u = self.users_by_id.get(value)
                return ("teams" if u.kind == "team" else "systemusers"), u
            if target == "transactioncurrencies":
                iso_code = CURRENCY_BY_ID[value]
                return target, (iso_code, *CURRENCIES[iso_code])
            if target == "opportunities":
                return target, self.world.get(value)
            if target == "quotes":
                return target, self.quotes.get(value)
            if target == "pricelevels":
                return target, PRICE_LEVEL_BY_ID.get(value)
            return None
        raise bad_query(f"Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM.{es.logical}'.")

    # -- reading -------------------------------------------------------------------------------------------------

    def single(self, req: Request) -> Response:
        es = self.sets[req.params["set"]]
        self._require_read(es.name)
        getter = self._getter(es)
        row = next((r for r in es.rows() if getter(r, es.key) == req.params["id"].lower()), None)
        if row is None:
            raise odata_error(404, "0x80040217", f"{es.logical} With Id = {req.params['id']} Does Not Exist")
        q = self._query(req, es)
        body = {
            "@odata.context": f"{self._base(req)}{API}/$metadata#{es.name}/$entity",
            **self._render(req, es, row, q),
        }
        return Response.json(body)

    def _query(self, req: Request, es: EntitySet) -> dict[str, Any]:
        if req.arg("$skip") is not None:
            raise bad_query("The query parameter $skip is not supported")
        select = [c.strip() for c in (req.arg("$select") or "").split(",") if c.strip()]
        has = self._has_column(es)
        for c in select:
            if not has(c):
                raise bad_query(f"Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.{es.logical}'.")
        if select and "estimatedvalue" in select and "_transactioncurrencyid_value" not in select:
            select.append("_transactioncurrencyid_value")
        expand = _parse_expand(req.arg("$expand") or "")
        for nav in expand:
            target = next((t for n, t in es.lookups.values() if n == nav), None)
            if target is None or nav in self.hidden_navigation:
                raise bad_query(
                    f"Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM.{es.logical}'."
                )
            # expanding a lookup reads the target table: the caller needs read privilege on it
            for name in ("systemusers", "teams") if target == "owner" else (target,):
                self._require_read(name)
        return {"select": select, "expand": expand}

    def _prefer(self, req: Request) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in _split_top(req.header("prefer") or "", ","):
            part = part.strip()
            if not part:
                continue
            k, _, v = part.partition("=")
            out[k.strip().lower()] = v.strip().strip('"')
        return out

    def collection(self, req: Request) -> Response:
        es = self.sets[req.params["set"]]
        self._require_read(es.name)
        if req.arg("$apply") is not None:
            return self._aggregate(req, es)
        prefer = self._prefer(req)
        q = self._query(req, es)
        tracking = "odata.track-changes" in prefer or req.arg("$deltatoken") is not None
        if tracking:
            if es.name != "opportunities" or not self.change_tracking_enabled:
                raise bad_query(f"Change tracking is not enabled for the entity '{es.logical}'.")
            bad = [p for p in ("$filter", "$orderby", "$expand", "$top", "$count") if req.arg(p) is not None]
            if bad:
                raise odata_error(
                    400,
                    "0x80060888",
                    f"The query parameter {bad[0]} is not supported with change "
                    "tracking (Prefer: odata.track-changes).",
                )
        applied = []
        page_size = 5000
        if "odata.maxpagesize" in prefer:
            try:
                asked = int(prefer["odata.maxpagesize"])
            except ValueError:
                raise bad_query("odata.maxpagesize must be an integer") from None
            if 0 < asked <= 5000:
                page_size = asked
                applied.append(f"odata.maxpagesize={asked}")
        annotations = prefer.get("odata.include-annotations")
        if annotations is not None:
            applied.append(f'odata.include-annotations="{annotations}"')
        if tracking and "odata.track-changes" in prefer:
            applied.append("odata.track-changes")
        top = req.arg("$top")
        if top is not None and not top.isdigit():
            raise bad_query(f"Invalid value '{top}' for $top.")
        skiptoken = req.arg("$skiptoken")
        offset = 0
        snap_id = None
        if skiptoken:
            snap_id, offset = _read_cookie(skiptoken)
        snap = self._snapshot(es, req, snap_id)
        entries = snap["entries"]
        total = len(entries)
        if top is not None and "odata.maxpagesize" not in prefer:
            entries = entries[: int(top)]
            page_size = max(1, len(entries)) if entries else 1
        page = entries[offset : offset + page_size]
        base = self._base(req) + API
        ctx_cols = ",".join(q["select"] + [f"{n}({','.join(s)})" for n, s in q["expand"].items()])
        body: dict[str, Any] = {"@odata.context": f"{base}/$metadata#{es.name}" + (f"({ctx_cols})" if ctx_cols else "")}
        want = _annotation_matcher(annotations)
        if req.arg("$count") == "true":
            body.update(_count_annotations(total, want))
        rows = []
        by_id = self.world.opps if es.name == "opportunities" else None
        for kind, ident in page:
            if kind == "deleted":
                rows.append(
                    {"@odata.context": f"{base}/$metadata#{es.name}/$deletedEntity", "id": ident, "reason": "deleted"}
                )
                continue
            row = by_id.get(ident) if by_id is not None else ident
            if row is None or (by_id is not None and row.deleted_at is not None):
                continue  # deleted since the snapshot: real cursors skip it too
            rows.append(self._render(req, es, row, q, want))
        body["value"] = rows
        if offset + page_size < len(entries):
            params = {k: v[0] for k, v in req.query.items() if k != "$skiptoken"}
            params["$skiptoken"] = _make_cookie(
                snap["id"],
                offset + page_size,
                offset // page_size + 2,
                page[-1][1] if page and isinstance(page[-1][1], str) else "",
            )
            body["@odata.nextLink"] = f"{base}/{es.name}?" + urlencode(params, quote_via=quote, safe="$,()'=/")
        elif tracking:
            token = f"{self.world.version}!{snap['at'].strftime('%m/%d/%Y %H:%M:%S')}"
            # deletions already visible when the token was issued are not reported again by it
            seen = frozenset(
                o.native_id for o in self.world.opps.values() if o.deleted_at is not None and o.deleted_at >= snap["at"]
            )
            self.delta_tokens[token] = (snap["at"], seen)
            params = {k: v[0] for k, v in req.query.items() if k in ("$select",)}
            params["$deltatoken"] = token
            body["@odata.deltaLink"] = f"{base}/{es.name}?" + urlencode(params, quote_via=quote, safe="$,()'=/")
        headers = {"Preference-Applied": ",".join(applied)} if applied else {}
        return Response.json(body, headers={"OData-Version": "4.0", **headers})

    def _aggregate(self, req: Request, es: EntitySet) -> Response:
        """`$apply=[filter(<expr>)/]aggregate($count as <alias>)`: the number of matching records, refused past
        the aggregate limit (50,000 records online; `aggregate_limit`). Other transformations (groupby, sum ...)
        are Dataverse's too but not simulated: 400."""
        m = re.fullmatch(
            r"(?:filter\((?P<flt>.*)\)/)?aggregate\(\$count as (?P<alias>[A-Za-z_]\w*)\)",
            (req.arg("$apply") or "").strip(),
            re.S,
        )
        if m is None:
            raise bad_query("This sandbox supports $apply=filter(...)/aggregate($count as <alias>) only.")
        matching: Iterable[Any] = es.rows()
        if m.group("flt"):
            pred = FilterParser(m.group("flt"), self._has_column(es), es.logical).parse()
            getter = self._getter(es)
            matching = (r for r in matching if pred(r, getter))
        with self.world.lock:
            if es.name == "opportunities":
                self._remember_closes()
            n = sum(1 for _ in matching)
        if n > self.aggregate_limit:
            raise odata_error(
                400, AGGREGATE_LIMIT_CODE, "AggregateQueryRecordLimit exceeded. Cannot perform this operation."
            )
        alias = m.group("alias")
        row: dict[str, Any] = {alias: n}
        if _annotation_matcher(self._prefer(req).get("odata.include-annotations"))(FORMATTED):
            row = {f"{alias}@{FORMATTED}": f"{n:,}", **row}
        return Response.json(
            {"@odata.context": f"{self._base(req)}{API}/$metadata#{es.name}({alias})", "value": [row]},
            headers={"OData-Version": "4.0"},
        )

    def _snapshot(self, es: EntitySet, req: Request, snap_id: str | None) -> dict[str, Any]:
        snap = self._snapshots.get(snap_id)
        if snap is not None:
            return snap
        # A fresh query, or a paging cookie whose snapshot was evicted: evaluate against the current world.
        with self.world.lock:
            at = self.world.clock.now()
            if es.name == "opportunities":
                self._remember_closes()
            entries = self._evaluate(es, req)
        snap = {"entries": entries, "at": at}
        snap["id"] = self._snapshots.put(snap, snap_id)
        return snap

    def _evaluate(self, es: EntitySet, req: Request) -> list[tuple[str, Any]]:
        getter = self._getter(es)
        deltatoken = req.arg("$deltatoken")
        if deltatoken is not None:
            issued, seen = self.delta_tokens.get(deltatoken) or (None, frozenset())
            if issued is None:
                raise odata_error(400, "0x80040203", f"The delta token '{deltatoken}' is not valid.")
            if self.world.clock.now() - issued > timedelta(days=DELTA_TOKEN_DAYS):
                raise odata_error(
                    400,
                    "0x80040203",
                    "The delta token has expired (change tracking data is kept "
                    f"for {DELTA_TOKEN_DAYS} days); run a full sync.",
                )
            changed = [o for o in self.world.live() if o.modified_at >= issued]
            changed.sort(key=lambda o: (o.modified_at, o.native_id))
            gone = sorted(
                (
                    o
                    for o in self.world.opps.values()
                    if o.deleted_at is not None
                    and o.deleted_at >= issued
                    and o.created_at < issued
                    and o.native_id not in seen
                ),
                key=lambda o: (o.deleted_at, o.native_id),
            )
            return [("row", o.native_id) for o in changed] + [("deleted", o.native_id) for o in gone]
        rows: Iterable[Any] = es.rows()
        text = req.arg("$filter")
        if text:
            pred = FilterParser(text, self._has_column(es), es.logical).parse()
            rows = [r for r in rows if pred(r, getter)]
        else:
            rows = list(rows)
        order = _parse_orderby(req.arg("$orderby"), self._has_column(es), es.logical) or [(es.key, False)]
        for col, desc in reversed(order):
            rows.sort(key=lambda r, c=col: _sort_key(getter(r, c)), reverse=desc)
        if es.name == "opportunities":
            return [("row", r.native_id) for r in rows]
        return [("row", r) for r in rows]

    def _render(
        self, req: Request, es: EntitySet, row: Any, q: dict[str, Any], want: Callable[[str], bool] | None = None
    ) -> dict[str, Any]:
        want = want or _annotation_matcher(self._prefer(req).get("odata.include-annotations"))
        getter = self._getter(es)
        cols = q["select"] or list(es.columns)
        if es.key not in cols:
            cols = [es.key, *cols]
        out: dict[str, Any] = {}
        if "versionnumber" in es.columns:
            out["@odata.etag"] = f'W/"{es.columns["versionnumber"](row)}"'
        for c in cols:
            value = getter(row, c)
            if c in es.formatted and value is not None and want(FORMATTED):
                out[f"{c}@{FORMATTED}"] = es.formatted[c](row)
            if c in es.lookups and value is not None:
                nav, target = es.lookups[c]
                tgt = self._expand_target(es, row, nav)
                logical = self.sets[tgt[0]].logical if tgt else target.rstrip("s")
                if want(FORMATTED) and tgt and tgt[1] is not None:
                    tset = self.sets[tgt[0]]
                    name_col = next(n for n in ("fullname", "name", "currencyname") if n in tset.columns)
                    out[f"{c}@{FORMATTED}"] = tset.columns[name_col](tgt[1])
                if want(NAVPROP):
                    out[f"{c}@{NAVPROP}"] = nav
                if want(LOGICALNAME):
                    out[f"{c}@{LOGICALNAME}"] = logical if nav != "owningbusinessunit" else "businessunit"
            out[c] = _json_value(value)
        for nav, sub in q["expand"].items():
            tgt = self._expand_target(es, row, nav)
            if tgt is None or tgt[1] is None:
                out[nav] = None
                continue
            tset = self.sets[tgt[0]]
            sub_cols = [s for s in sub if s in tset.columns] or list(tset.columns)
            nested = {c: _json_value(tset.columns[c](tgt[1])) for c in sub_cols}
            nested[tset.key] = tset.columns[tset.key](tgt[1])
            if nav == "ownerid":
                nested = {
                    "@odata.type": f"#Microsoft.Dynamics.CRM.{tset.logical}",
                    "ownerid": nested[tset.key],
                    **{k: v for k, v in nested.items() if k != tset.key},
                }
            out[nav] = nested
        return out

    # -- writing -------------------------------------------------------------------------------------------------

    def _values(self, body: Any, creating: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise odata_error(
                400, "0x80048d19", "Error identified in Payload provided by the user for Entity :'opportunities'"
            )
        w = self.world
        values: dict[str, Any] = {}
        for k, v in body.items():
            if k == "name":
                values["name"] = v
            elif k == "estimatedvalue":
                values["amount"] = None if v is None else float(v)
            elif k == "estimatedclosedate":
                values["close_date"] = None if v is None else date.fromisoformat(str(v)[:10])
            elif k == "closeprobability":
                values["probability"] = None if v is None else float(v)
            elif k in ("statuscode", "statecode"):
                continue  # handled below
            elif k == "description":
                values.setdefault("extra_description", v)
            elif k.endswith("@odata.bind"):
                nav = k[: -len("@odata.bind")]
                m = re.match(r"^/?(\w+)\((" + GUID_RE + r")\)$", str(v))
                if not m:
                    raise odata_error(400, "0x80048d19", f"Invalid URI in {k}: '{v}'.")
                eset, ident = m.group(1), m.group(2).lower()
                if nav in ("parentaccountid", "customerid_account") and eset == "accounts":
                    acc = self.accounts_by_id.get(ident)
                    if acc is None:
                        raise odata_error(404, "0x80040217", f"account With Id = {ident} Does Not Exist")
                    values["account"] = acc.idx
                elif nav == "ownerid" and eset in ("systemusers", "teams"):
                    u = self.users_by_id.get(ident)
                    if u is None or (u.kind == "team") != (eset == "teams"):
                        raise odata_error(404, "0x80040217", f"{eset[:-1]} With Id = {ident} Does Not Exist")
                    values["owner"] = u.idx
                elif nav == "transactioncurrencyid" and eset == "transactioncurrencies":
                    if ident not in CURRENCY_BY_ID:
                        raise odata_error(404, "0x80040217", f"transactioncurrency With Id = {ident} Does Not Exist")
                    values["currency"] = CURRENCY_BY_ID[ident]
                else:
                    raise odata_error(
                        400,
                        "0x80048d19",
                        f"An undeclared property '{nav}' which only has property "
                        "annotations in the payload but no property value was "
                        "found in the payload.",
                    )
            elif k in CUSTOM_COLUMNS or k == "new_originalcreatedon":
                values[k] = v
            else:
                raise odata_error(
                    400,
                    "0x80048d19",
                    f"Invalid property '{k}' was found in entity 'Microsoft.Dynamics.CRM.opportunity'.",
                )
        if "statuscode" in body:
            key = str(body["statuscode"])
            if key not in w.stages:
                raise odata_error(
                    400,
                    "0x80040203",
                    f"{key} is not a valid status code for state code "
                    f"OpportunityState.{STATE_LABELS[body.get('statecode', 0)]}",
                )
            if creating and w.stages[key].is_closed:
                raise odata_error(
                    400,
                    "0x80040203",
                    "A new opportunity must be created open; close it with WinOpportunity or LoseOpportunity.",
                )
            values["stage"] = key
        elif "statecode" in body:
            if body["statecode"] != 0:
                raise odata_error(400, "0x80040203", "Use WinOpportunity or LoseOpportunity to close an opportunity.")
            values["stage"] = w.stage_for(None, "open").key
        if "extra_description" in values:
            values["description"] = values.pop("extra_description")
        return values

    def create(self, req: Request) -> Response:
        values = self._values(req.json(), creating=True)
        values.setdefault("stage", "1")
        values.setdefault("account", None)
        values.setdefault("amount", None)
        values["creator"] = self.app_user.idx  # the calling application user creates the record
        opp = self.world.create(**values)
        return self._written(req, opp, 201)

    def _written(self, req: Request, opp: SimOpportunity, status: int) -> Response:
        entity_id = f"{self._base(req)}{API}/opportunities({opp.native_id})"
        headers = {"OData-EntityId": entity_id, "Location": entity_id}
        if "return=representation" in (req.header("prefer") or ""):
            es = self.sets["opportunities"]
            return Response.json(
                {
                    "@odata.context": f"{self._base(req)}{API}/$metadata#opportunities/$entity",
                    **self._render(req, es, opp, self._query(req, es)),
                },
                status,
                headers,
            )
        return Response.empty(204, headers)

    def _live(self, ident: str) -> SimOpportunity:
        opp = self.world.get(ident.lower())
        if opp is None:
            raise odata_error(404, "0x80040217", f"opportunity With Id = {ident} Does Not Exist")
        return opp

    def update(self, req: Request) -> Response:
        opp = self._live(req.params["id"])
        body = req.json() or {}
        values = self._values(body, creating=False)
        closed = self.world.stages[opp.stage].is_closed
        reopening = "stage" in values and not self.world.stages[values["stage"]].is_closed
        if closed and not reopening:
            raise odata_error(
                400,
                "0x80043b1e",
                "This opportunity is closed or canceled and cannot be edited; reopen it first (statecode 0).",
            )
        if "stage" in values and self.world.stages[values["stage"]].is_closed and not closed:
            raise odata_error(400, "0x80040203", "Use WinOpportunity or LoseOpportunity to close an opportunity.")
        with self.world.lock:
            self._remember_closes()  # a reopen keeps actualclosedate
            opp = self.world.update(opp.native_id, **values)
        return (
            self._written(req, opp, 200)
            if "return=representation" in (req.header("prefer") or "")
            else Response.empty(204, {"OData-EntityId": f"{self._base(req)}{API}/opportunities({opp.native_id})"})
        )

    def delete(self, req: Request) -> Response:
        opp = self._live(req.params["id"])
        self.world.delete(opp.native_id)
        return Response.empty(204)

    def close(self, req: Request) -> Response:
        body = req.json() or {}
        won = req.params["action"] == "WinOpportunity"
        close = body.get("OpportunityClose") or {}
        bind = str(close.get("opportunityid@odata.bind", ""))
        m = re.match(r"^/?opportunities\((" + GUID_RE + r")\)$", bind)
        if not m:
            raise odata_error(400, "0x80040203", "OpportunityClose.opportunityid@odata.bind is required.")
        opp = self._live(m.group(1))
        status = str(body.get("Status", 3 if won else 4))
        st = self.world.stages.get(status)
        if st is None or not st.is_closed or st.is_won != won:
            raise odata_error(
                400,
                "0x80040203",
                f"{status} is not a valid status code for state code OpportunityState.{'Won' if won else 'Lost'}",
            )
        if self.world.stages[opp.stage].is_closed:
            raise odata_error(400, "0x80043b1e", "This opportunity is already closed.")
        now = self.world.clock.now()
        # The close activity's actualend ("Closed On") dates the close; without one the platform uses today.
        closed_at = _actual_end(close.get("actualend")) or now
        self.world.update(opp.native_id, stage=status, close_date=now.date(), closed_at=closed_at)
        self.closes.append(
            {
                "activityid": _uuid(),
                "opportunityid": opp.native_id,
                "subject": close.get("subject"),
                "actualrevenue": close.get("actualrevenue"),
                "actualend": iso(closed_at),
                "statuscode": int(status),
            }
        )
        return Response.empty(204)

    # -- quotes and quote lines (revenue write-back, docs/crm-write-webhook-notes.md §3.1) ----------------------

    def _quote_sets(self) -> dict[str, EntitySet]:
        def col(name: str) -> Callable[[Any], Any]:
            return lambda r: r.get(name)

        quote_names = (
            "quoteid",
            "name",
            "quotenumber",
            "description",
            "statecode",
            "statuscode",
            "_customerid_value",
            "_opportunityid_value",
            "_pricelevelid_value",
            "_transactioncurrencyid_value",
            "totallineitemamount",
            "totalamount",
            "_ownerid_value",
            "_createdby_value",
            "_modifiedby_value",
            "createdon",
            "modifiedon",
            "versionnumber",
        )
        detail_names = (
            "quotedetailid",
            "_quoteid_value",
            "_productid_value",
            "_uomid_value",
            "_transactioncurrencyid_value",
            *self.quotedetail_columns,
            "_ownerid_value",
            "_createdby_value",
            "createdon",
            "modifiedon",
            "versionnumber",
        )
        users = {
            "_ownerid_value": ("ownerid", "owner"),
            "_createdby_value": ("createdby", "systemusers"),
            "_modifiedby_value": ("modifiedby", "systemusers"),
        }
        currency = {"_transactioncurrencyid_value": ("transactioncurrencyid", "transactioncurrencies")}
        money = lambda c: lambda r: None if r.get(c) is None else f"${r[c]:,.2f}"  # noqa: E731
        level_cols = {
            "pricelevelid": lambda p: p[0],
            "name": lambda p: p[1],
            "_transactioncurrencyid_value": lambda p: CURRENCIES[p[2]][0],
            "statecode": lambda p: p[3],
            "statuscode": lambda p: 100001 if p[3] == 0 else 100002,
        }
        return {
            "pricelevels": EntitySet(
                "pricelevels", "pricelevel", "pricelevelid", lambda: iter(PRICE_LEVELS), level_cols, currency
            ),
            "quotes": EntitySet(
                "quotes",
                "quote",
                "quoteid",
                lambda: iter(list(self.quotes.values())),
                {c: col(c) for c in quote_names},
                {
                    "_customerid_value": ("customerid_account", "accounts"),
                    "_opportunityid_value": ("opportunityid", "opportunities"),
                    "_pricelevelid_value": ("pricelevelid", "pricelevels"),
                    **currency,
                    **users,
                },
                {
                    "statecode": lambda r: QUOTE_STATES[r["statecode"]],
                    "statuscode": lambda r: QUOTE_STATUS[r["statuscode"]][1],
                    "totalamount": money("totalamount"),
                },
            ),
            "quotedetails": EntitySet(
                "quotedetails",
                "quotedetail",
                "quotedetailid",
                lambda: iter(list(self.quotedetails.values())),
                {c: col(c) for c in detail_names},
                {
                    "_quoteid_value": ("quoteid", "quotes"),
                    "_productid_value": ("productid", "products"),
                    "_uomid_value": ("uomid", "uoms"),
                    **currency,
                    **{k: v for k, v in users.items() if k != "_modifiedby_value"},
                },
                {
                    "priceperunit": money("priceperunit"),
                    "msdyn_billingmethod": lambda r: BILLING_METHOD_LABELS.get(r.get("msdyn_billingmethod")),
                },
            ),
        }

    def _record_spec(self, set_name: str) -> tuple[str, dict[str, Col], dict[str, tuple[str, tuple[str, ...]]]]:
        if set_name == "quotes":
            return "quote", QUOTE_COLUMNS, QUOTE_BINDS
        return "quotedetail", self.quotedetail_columns, QUOTEDETAIL_BINDS

    def _exists(self, entity_set: str, ident: str) -> bool:
        return {
            "accounts": lambda: ident in self.accounts_by_id,
            "opportunities": lambda: self.world.get(ident) is not None,
            "pricelevels": lambda: ident in PRICE_LEVEL_BY_ID,
            "transactioncurrencies": lambda: ident in CURRENCY_BY_ID,
            "quotes": lambda: ident in self.quotes,
        }.get(entity_set, lambda: False)()

    def _record_values(self, set_name: str, body: Any, creating: bool) -> dict[str, Any]:
        """A POST / PATCH body as column values: binds resolved (the record must exist), types, lengths, ranges
        and option values checked as Dataverse does, unknown properties refused."""
        logical, columns, binds = self._record_spec(set_name)
        if not isinstance(body, dict):
            raise odata_error(
                400, "0x80048d19", f"Error identified in Payload provided by the user for Entity :'{set_name}'"
            )
        values: dict[str, Any] = {}
        for k, v in body.items():
            if k.startswith("@odata."):
                continue
            if k.endswith("@odata.bind"):
                nav = k[: -len("@odata.bind")]
                if nav not in binds:
                    raise odata_error(
                        400,
                        "0x80048d19",
                        f"An undeclared property '{nav}' which only has property annotations in the payload but no "
                        "property value was found in the payload. In OData, only declared navigation properties and "
                        "declared named streams can be represented as properties without values.",
                    )
                column, targets = binds[nav]
                m = re.match(r"^(?:.*/)?(\w+)\((" + GUID_RE + r")\)$", str(v))
                if not m or m.group(1) not in targets:
                    raise odata_error(400, "0x80048d19", f"Invalid URI in {k}: '{v}'.")
                ident = m.group(2).lower()
                if not self._exists(m.group(1), ident):
                    raise odata_error(404, "0x80040217", f"{BIND_TABLES[m.group(1)]} With Id = {ident} Does Not Exist")
                values[column] = ident
                continue
            if set_name == "quotes" and k in ("statecode", "statuscode"):
                if creating:  # "not valid for create" (quote.md): a quote starts as a draft
                    raise odata_error(
                        400, "0x80040203", f"The '{k}' attribute of the 'quote' entity is not valid for create."
                    )
                values[k] = v  # a state change (SetState through Update), checked by the caller
                continue
            spec = columns.get(k)
            if spec is None:
                raise odata_error(
                    400, "0x80048d19", f"Invalid property '{k}' was found in entity 'Microsoft.Dynamics.CRM.{logical}'."
                )
            if not (spec.create if creating else spec.update):
                raise odata_error(
                    400,
                    "0x80040203",
                    f"The '{k}' attribute of the '{logical}' entity is not valid for "
                    f"{'create' if creating else 'update'}.",
                )
            values[k] = _typed_value(logical, k, spec, v)
        return values

    def _editable(self, quote: dict[str, Any]) -> None:
        """Only draft quotes can be edited (quote.md), their lines too: the platform refuses the write."""
        if quote["statecode"] != 0:
            raise odata_error(400, "0x80040203", "Cannot Update a Read-Only Entity")

    def _stamp(self, rec: dict[str, Any]) -> None:
        self._rowversion += 1
        rec["versionnumber"] = self._rowversion
        rec["modifiedon"] = self.world.clock.now()
        if "_modifiedby_value" in rec:
            rec["_modifiedby_value"] = self.app_user.native_id

    def _totals(self, quote_id: str | None) -> None:
        """The quote's totals follow its lines (the platform's price calculation; no discounts or tax here)."""
        quote = self.quotes.get(quote_id or "")
        if quote is None:
            return
        total = round(
            sum(d["extendedamount"] or 0.0 for d in self.quotedetails.values() if d["_quoteid_value"] == quote_id), 2
        )
        if total != quote["totallineitemamount"]:
            quote["totallineitemamount"] = quote["totalamount"] = total
            self._stamp(quote)

    @staticmethod
    def _amounts(line: dict[str, Any]) -> None:
        base = round((line.get("priceperunit") or 0.0) * (line.get("quantity") or 0.0), 2)
        line["baseamount"] = line["extendedamount"] = base

    def _new_record(self, set_name: str, values: dict[str, Any], ident: str | None) -> dict[str, Any]:
        now = self.world.clock.now()
        me = self.app_user.native_id
        if set_name == "quotes":
            rec: dict[str, Any] = {
                "quoteid": ident or _uuid(),
                "name": None,
                "quotenumber": f"QUO-{1000 + len(self.quotes):05d}-S4N7D8",
                "description": None,
                "statecode": 0,
                "statuscode": 1,
                "_customerid_value": None,
                "_opportunityid_value": None,
                "_pricelevelid_value": None,
                # the organisation's base currency when none is given
                "_transactioncurrencyid_value": CURRENCIES["USD"][0],
                "totallineitemamount": 0.0,
                "totalamount": 0.0,
                "_ownerid_value": me,
                "_createdby_value": me,
                "_modifiedby_value": me,
                "createdon": now,
                **values,
            }
            self._stamp(rec)
            self.quotes[rec["quoteid"]] = rec
            return rec
        quote_id = values.get("_quoteid_value")
        if quote_id is None:
            raise odata_error(400, "0x80040203", "Attribute 'quoteid' cannot be NULL: a quote product needs its quote.")
        self._editable(self.quotes[quote_id])
        if not values.get("isproductoverridden") and not values.get("_productid_value"):
            raise odata_error(
                400,
                "0x80040203",
                "A quote product needs an existing product (productid, uomid) unless it is a write-in product "
                "(isproductoverridden true, productdescription).",
            )
        rec = {
            "quotedetailid": ident or _uuid(),
            "_quoteid_value": quote_id,
            "_productid_value": None,
            "_uomid_value": None,
            "_transactioncurrencyid_value": self.quotes[quote_id]["_transactioncurrencyid_value"],
            **{c: spec.default for c, spec in self.quotedetail_columns.items()},
            "lineitemnumber": 1 + sum(1 for d in self.quotedetails.values() if d["_quoteid_value"] == quote_id),
            "_ownerid_value": me,
            "_createdby_value": me,
            "createdon": now,
            **values,
        }
        self._amounts(rec)
        self._stamp(rec)
        self.quotedetails[rec["quotedetailid"]] = rec
        self._totals(quote_id)
        return rec

    def _record_written(self, req: Request, set_name: str, rec: dict[str, Any], status: int) -> Response:
        """204 + OData-EntityId; with `Prefer: return=representation` the record (201 created, 200 updated)."""
        es = self.sets[set_name]
        entity_id = f"{self._base(req)}{API}/{set_name}({rec[es.key]})"
        headers = {"OData-EntityId": entity_id}
        if "return=representation" in (req.header("prefer") or ""):
            body = {
                "@odata.context": f"{self._base(req)}{API}/$metadata#{set_name}/$entity",
                **self._render(req, es, rec, self._query(req, es)),
            }
            return Response.json(body, status, {**headers, "Preference-Applied": "return=representation"})
        return Response.empty(204, headers)

    def create_quote_record(self, req: Request) -> Response:
        set_name = req.params["set"]
        self._require("prvCreateQuote")
        values = self._record_values(set_name, req.json(), creating=True)
        with self.world.lock:
            rec = self._new_record(set_name, values, None)
        return self._record_written(req, set_name, rec, 201)

    def update_quote_record(self, req: Request) -> Response:
        """PATCH: an update; without If-Match an upsert (a missing record is created with that id); `If-Match: *`
        updates only (missing: 404); `If-Match: <etag>` also 412 when the row version moved
        (perform-conditional-operations-using-web-api.md)."""
        set_name, ident = req.params["set"], req.params["id"].lower()
        store = self.quotes if set_name == "quotes" else self.quotedetails
        logical = self.sets[set_name].logical
        if_match = req.header("if-match")
        with self.world.lock:
            rec = store.get(ident)
            if rec is None:
                if if_match is not None:
                    raise odata_error(404, "0x80040217", f"{logical} With Id = {ident} Does Not Exist")
                self._require("prvCreateQuote")
                values = self._record_values(set_name, req.json(), creating=True)
                return self._record_written(req, set_name, self._new_record(set_name, values, ident), 201)
            if if_match not in (None, "*") and if_match.strip() != f'W/"{rec["versionnumber"]}"':
                raise odata_error(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                )
            self._require("prvWriteQuote")
            values = self._record_values(set_name, req.json(), creating=False)
            if set_name == "quotes":
                self._update_quote(rec, values)
            else:
                self._editable(self.quotes[rec["_quoteid_value"]])
                if values:
                    rec.update(values)
                    self._amounts(rec)
                    self._stamp(rec)
                    self._totals(rec["_quoteid_value"])
        return self._record_written(req, set_name, rec, 200)

    def _update_quote(self, rec: dict[str, Any], values: dict[str, Any]) -> None:
        state, status = values.pop("statecode", None), values.pop("statuscode", None)
        if values:
            self._editable(rec)
            rec.update(values)
        if state is None and status is None:
            if values:
                self._stamp(rec)
            return
        if status is not None:
            if status not in QUOTE_STATUS or (state is not None and QUOTE_STATUS[status][0] != state):
                raise odata_error(
                    400,
                    "0x80040203",
                    f"{status} is not a valid status code for state code QuoteState."
                    f"{QUOTE_STATES.get(state if state is not None else rec['statecode'], state)}",
                )
            state = QUOTE_STATUS[status][0]
        if state not in QUOTE_STATES:
            raise odata_error(400, "0x80040203", f"{state} is not a valid state code for quote.")
        if state in (2, 3):
            raise odata_error(400, "0x80040203", "Use WinQuote or CloseQuote to win or close a quote.")
        rec["statecode"] = state
        rec["statuscode"] = status if status is not None else QUOTE_DEFAULT_STATUS[state]
        self._stamp(rec)

    def delete_quote_record(self, req: Request) -> Response:
        set_name, ident = req.params["set"], req.params["id"].lower()
        store = self.quotes if set_name == "quotes" else self.quotedetails
        with self.world.lock:
            rec = store.get(ident)
            if rec is None:
                raise odata_error(404, "0x80040217", f"{self.sets[set_name].logical} With Id = {ident} Does Not Exist")
            if set_name == "quotedetails":
                self._editable(self.quotes[rec["_quoteid_value"]])
                del self.quotedetails[ident]
                self._totals(rec["_quoteid_value"])
            else:
                del self.quotes[ident]
                for line in [d for d in self.quotedetails.values() if d["_quoteid_value"] == ident]:
                    del self.quotedetails[line["quotedetailid"]]
        return Response.empty(204)


# -- helpers ---------------------------------------------------------------------------------------------------


def _price_level_for(currency: str) -> str | None:
    return next((p[0] for p in PRICE_LEVELS if p[2] == currency and p[3] == 0), None)


def _typed_value(logical: str, name: str, spec: Col, v: Any) -> Any:
    """A written value as Dataverse checks it: the JSON type (OData conversion error), the string length and the
    number's range (validation errors), the option value of a choice column."""
    if v is None:
        return None
    edm = {"String": "Edm.String", "Boolean": "Edm.Boolean", "Picklist": "Edm.Int32", "Integer": "Edm.Int32"}
    edm_type = edm.get(spec.kind, "Edm.Decimal")
    ok = {
        "String": isinstance(v, str),
        "Boolean": isinstance(v, bool),
        "Picklist": isinstance(v, int) and not isinstance(v, bool),
        "Integer": isinstance(v, int) and not isinstance(v, bool),
    }.get(spec.kind, isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ok:
        raise odata_error(400, "0x80048d19", f"Cannot convert the literal '{v}' to the expected type '{edm_type}'.")
    if spec.kind == "String" and spec.max_length is not None and len(v) > spec.max_length:
        raise odata_error(
            400,
            "0x80044331",
            f"A validation error occurred. The length of the '{name}' attribute of the '{logical}' entity exceeded "
            f"the maximum allowed length of '{spec.max_length}'.",
        )
    if spec.kind == "Picklist" and spec.options and v not in spec.options:
        raise odata_error(
            400,
            "0x8004431a",
            f"A validation error occurred. The value {v} of '{name}' on record of type '{logical}' is outside the "
            "valid range.",
        )
    if spec.kind in ("Money", "Decimal"):
        if spec.min_value is not None and v < spec.min_value:
            raise odata_error(
                400,
                "0x80044331",
                f"A validation error occurred. The value {v} of '{name}' on record of type '{logical}' is outside "
                f"the valid range. Accepted Values: {spec.min_value:g} to 922337203685477",
            )
        return round(float(v), spec.precision if spec.precision is not None else 2)
    return v


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


def _label(text: str) -> dict[str, Any]:
    loc = {"Label": text, "LanguageCode": 1033, "IsManaged": True, "MetadataId": _uuid(), "HasChanged": None}
    return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}


def _rate(currency: str) -> float:
    return EXCHANGE_RATES.get(currency, 1.0)


def _salesstage(w: World, o: SimOpportunity) -> int:
    """The salesstage picklist (0 Qualify .. 3 Close) follows the process stage's position."""
    return min(w.sales_stage_of(o).order - 1, 3)


def address_lines(a: SimAccount) -> tuple[str | None, str | None, str | None]:
    """address1_line1..3 of an account: the world's street, and (sandbox-own, deterministic) a second and third
    line on some accounts, and a line break typed inside line 1 on others."""
    if a.street is None:
        return None, None, None
    line1 = a.street + ("\r\nc/o Reception" if a.idx % 11 == 5 else "")
    line2 = f"Suite {100 + a.idx}" if a.idx % 3 == 0 else None
    line3 = "Building B" if a.idx % 7 == 2 else None
    return line1, line2, line3


_METADATA_TYPE = {
    "String": "StringAttribute",
    "Lookup": "LookupAttribute",
    "Owner": "LookupAttribute",
    "Customer": "LookupAttribute",
    "Money": "MoneyAttribute",
    "DateTime": "DateTimeAttribute",
    "Integer": "IntegerAttribute",
    "State": "StateAttribute",
    "Status": "StatusAttribute",
    "Picklist": "PicklistAttribute",
    "BigInt": "BigIntAttribute",
    "Decimal": "DecimalAttribute",
    "Uniqueidentifier": "UniqueIdentifierAttribute",
    "Boolean": "BooleanAttribute",
}
_TYPES = {
    "estimatedvalue": "Money",
    "estimatedvalue_base": "Money",
    "budgetamount": "Money",
    "actualvalue": "Money",
    "overriddencreatedon": "DateTime",
    "exchangerate": "Decimal",
    "new_winchance": "Integer",
    "estimatedclosedate": "DateTime",
    "actualclosedate": "DateTime",
    "createdon": "DateTime",
    "modifiedon": "DateTime",
    "new_originalcreatedon": "DateTime",
    "closeprobability": "Integer",
    "statecode": "State",
    "statuscode": "Status",
    "salesstage": "Picklist",
    "cr123_dealphase": "Picklist",
    "versionnumber": "BigInt",
    "stageid": "Uniqueidentifier",
    "processid": "Uniqueidentifier",
    "isdisabled": "Boolean",
    "teamtype": "Picklist",
    "stagecategory": "Picklist",
    "totalamount": "Money",
    "totallineitemamount": "Money",
    **{c: col.kind for c, col in QUOTEDETAIL_COLUMNS.items() if c != "description"},
    **{c: col.kind for c, col in PSA_QUOTEDETAIL_COLUMNS.items()},
    **{c: col.kind for c, col in FIELD_SERVICE_QUOTEDETAIL_COLUMNS.items()},
}


def _account_signature(a: SimAccount) -> tuple:
    return (a.name, a.street, a.city, a.state, a.postal_code, a.country)


def _attribute_type(es: EntitySet, col: str) -> str:
    if col == es.key:
        return "Uniqueidentifier"
    if col in es.lookups:
        return {"_ownerid_value": "Owner", "_customerid_value": "Customer"}.get(col, "Lookup")
    return _TYPES.get(col, "String")


def _fmt_date(d: date) -> str:
    return f"{d.month}/{d.day}/{d.year}"


def _actual_end(value: Any) -> datetime | None:
    """OpportunityClose.actualend (Edm.DateTimeOffset; a bare date is taken as 00:00 UTC) as naive UTC."""
    if value in (None, ""):
        return None
    text = str(value)
    try:
        return parse_iso(text) if "T" in text else datetime.combine(date.fromisoformat(text), datetime.min.time())
    except ValueError:
        raise odata_error(
            400, "0x80048d19", f"Cannot convert the literal '{text}' to the expected type 'Edm.DateTimeOffset'."
        ) from None


def _fmt_dt(dt: datetime) -> str:
    hour = dt.hour % 12 or 12
    return f"{dt.month}/{dt.day}/{dt.year} {hour}:{dt.minute:02d} {'AM' if dt.hour < 12 else 'PM'}"


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return iso(v)
    if isinstance(v, date):
        return v.isoformat()
    return v


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0)
    if isinstance(v, str):
        return (1, v.casefold())
    if isinstance(v, bool):
        return (1, int(v))
    return (1, v)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside quotes and parentheses."""
    parts, depth, quote_ch, cur = [], 0, None, []
    for ch in text:
        if quote_ch:
            if ch == quote_ch:
                quote_ch = None
        elif ch in "\"'":
            quote_ch = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _parse_expand(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in _split_top(text, ","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^(\w+)(?:\((.*)\))?$", part)
        if not m:
            raise bad_query(f"Syntax error in $expand at '{part}'.")
        select: list[str] = []
        for opt in (m.group(2) or "").split(";"):
            k, _, v = opt.partition("=")
            if k.strip() == "$select":
                select = [c.strip() for c in v.split(",") if c.strip()]
        out[m.group(1)] = select
    return out


def _parse_orderby(text: str | None, has: Callable[[str], bool], entity: str) -> list[tuple[str, bool]]:
    out = []
    for part in (text or "").split(","):
        bits = part.split()
        if not bits:
            continue
        if not has(bits[0]):
            raise bad_query(f"Could not find a property named '{bits[0]}' on type 'Microsoft.Dynamics.CRM.{entity}'.")
        direction = bits[1].lower() if len(bits) > 1 else "asc"
        if direction not in ("asc", "desc") or len(bits) > 2:
            raise bad_query(f"Syntax error in $orderby at '{part}'.")
        out.append((bits[0], direction == "desc"))
    return out


def _count_annotations(total: int, want: Callable[[str], bool]) -> dict[str, Any]:
    """`$count=true`: @odata.count up to COUNT_LIMIT; whether there are more only when the caller asks for the
    totalrecordcount annotations (count-rows.md)."""
    out: dict[str, Any] = {"@odata.count": min(total, COUNT_LIMIT)}
    if want("Microsoft.Dynamics.CRM.totalrecordcount"):
        out["@Microsoft.Dynamics.CRM.totalrecordcount"] = min(total, COUNT_LIMIT)
    if want("Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"):
        out["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = total > COUNT_LIMIT
    return out


def _annotation_matcher(value: str | None) -> Callable[[str], bool]:
    if not value:
        return lambda name: False
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    return lambda name: any(p.startswith("-") is False and fnmatch.fnmatchcase(name, p) for p in patterns)


def _make_cookie(snap_id: str, offset: int, page: int, last_id: str) -> str:
    inner = (
        f'<cookie page="{page - 1}"><opportunityid last="{{{last_id.upper()}}}" /><snapshot id="{snap_id}" '
        f'pos="{offset}" /></cookie>'
    )
    return f'<cookie pagenumber="{page}" pagingcookie="{quote(inner)}" istracking="False" />'


def _read_cookie(token: str) -> tuple[str, int]:
    m = re.search(r'pagingcookie="([^"]+)"', unquote(token) if token.startswith("%") else token)
    inner = unquote(unquote(m.group(1))) if m else ""
    s = re.search(r'<snapshot id="(\w+)" pos="(\d+)"', inner)
    if not s:
        raise odata_error(400, "0x80040203", "Invalid $skiptoken (paging cookie).")
    return s.group(1), int(s.group(2))


# -- construction ----------------------------------------------------------------------------------------------


def profile(variant: str = "default") -> TenantProfile:
    stages = CUSTOM_PROCESS_STAGES if variant == "custom_fields" else PROCESS_STAGES
    return TenantProfile(
        crm=CRM,
        stages=list(STATUS_REASONS),
        opportunity_id=opportunity_id,
        user_id=owner_id,
        account_id=account_id,
        currencies=tuple(CURRENCIES),
        team_owners=3,
        sales_stages=list(stages),
    )


def connection_options(url: str) -> dict[str, Any]:
    """The `options` a sandbox connection needs: Entra ID is served by the simulator itself."""
    return {"authority_url": url, "change_tracking": True}


def build(
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    clock: Clock | None = None,
    *,
    variant: str = "default",
) -> DynamicsSimulator:
    if variant not in VARIANTS:
        raise ValueError(f"unknown dynamics sandbox variant {variant!r}; one of {sorted(VARIANTS)}")
    return DynamicsSimulator(World(profile(variant), seed, opportunities, clock=clock), faults, variant=variant)


def truth(sim: DynamicsSimulator) -> dict[str, dict[str, Any]]:
    """The live opportunities as a Dynamics user with the API user's rights sees them, from the world and this
    simulator's own data: the account's name is the lookup's display name (visible without account rights);
    its address only to a user who may read accounts. stage = the Pipeline Phase (stepname) of the business
    process stage, stage_id = that stage's id, crm_status = the Status Reason's label, status from the
    Status (statecode)."""
    w = sim.world
    can_read_accounts = "prvReadAccount" not in sim.denied
    out: dict[str, dict[str, Any]] = {}
    for o in w.live():
        acc = w.accounts[o.account] if o.account is not None else None
        location = None
        if acc is not None and can_read_accounts:
            parts = [*address_lines(acc), acc.city, acc.state, acc.postal_code, acc.country]
            lines = [ln.strip() for p in parts if p for ln in str(p).replace("\r\n", "\n").split("\n")]
            location = ", ".join(ln for ln in lines if ln) or None
        sales_stage = w.sales_stage_of(o)
        status = w.stages[o.stage]
        out[o.native_id] = {
            "project_name": o.name,
            "client_name": acc.name if acc else None,
            "account_id": acc.native_id.lower() if acc else None,
            "service_location": location,
            "owner_crm_id": w.users[o.owner].native_id,
            "created_by_crm_id": w.users[o.creator].native_id,
            "stage": sales_stage.label,
            "stage_id": sales_stage.key,
            "crm_status": status.label,
            "status": w.status(o),
            "amount": o.amount,
            "currency": o.currency,
            "amount_base": None if o.amount is None else round(o.amount / _rate(o.currency), 4),
            "base_currency": BASE_CURRENCY,
            "close_date": o.close_date,
            "created_at": o.created_at,
            # actualclosedate is Date Only: the connector reads it as 00:00 UTC of that date
            "crm_closed_at": _closed_at_truth(sim, o),
        }
    return out


def _closed_at_truth(sim: DynamicsSimulator, o: SimOpportunity) -> datetime | None:
    if sim.world.status(o) == "open" or o.closed_at is None or "actualclosedate" in sim.secured:
        return None
    return datetime.combine(o.closed_at.date(), datetime.min.time())
