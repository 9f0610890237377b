"""Dynamics 365 / Dataverse: seed 000 "create a 'quote' if none exists, then create a 'quotedetail' record on that
quote" with priceperunit, msdyn_costamount, msdyn_estimatedcost, msdyn_includeexpense, msdyn_includematerial and
msdyn_billingmethod (docs/crm-write-webhook-notes.md §3.1; the seed's "msdyn_includeexpens" is truncated).

What Dataverse documents [K] (quote.md, quotedetail.md, webapi create / update / conditional operations):
- `POST /quotes` with `name`, `customerid_account@odata.bind` (or `customerid_contact`), `pricelevelid@odata.bind`,
  `transactioncurrencyid@odata.bind` (ApplicationRequired), `opportunityid@odata.bind`; 204 + `OData-EntityId`.
- "Only draft quotes can be edited" (statecode 0); an active, won or closed quote is read-only ("Cannot Update a
  Read-Only Entity" [S] markcarrington.dev), so the quote reused is the opportunity's newest draft; without one a
  new draft quote is created (an activated quote keeps its line; its values are still what `read_current` shows,
  so activating a quote is not a conflict).
- The line is a write-in product (`isproductoverridden` true, not valid for update; `productdescription`
  LINE_NAME, `quantity` 1, `ispriceoverridden` true) that oppsync recognises by its description and reuses: POST
  once, then `PATCH` with `If-Match: *`, because a PATCH without If-Match is an upsert that would re-create a
  line someone deleted.
- `msdyn_billingmethod` 192350000 Time and Material, 192350001 Fixed Price; `msdyn_costamount` money, 4 decimals.
- The msdyn_ columns exist only with Project Operations / PSA (`msdyn_costamount`, `msdyn_include*`,
  `msdyn_billingmethod`) or Field Service (`msdyn_estimatedcost`) installed: which of them this environment has is
  read once per run from `EntityDefinitions(LogicalName='quotedetail')/Attributes`, or, when the API user may not
  read metadata (403 prvReadEntity), by `$select`-ing each on quotedetails (400 "Could not find a property");
  absent ones are left out with a run warning.
- A missing privilege is 403 0x80040220 "... is missing prv<Action><Table> privilege": `explain` names it.
Traps: writing a quote changes neither the opportunity's estimatedvalue nor its modifiedon (the next sync sees
nothing); a quote's currency and price list come from the opportunity (else the first active price list in its
currency); an opportunity without a customer cannot get a quote (that row fails, the others go on).
Unverified [U]: which privilege Dataverse names for a quote line (quotedetail is parented by its quote); whether
ApplicationRequired quote columns are enforced by the Web API (all are sent); the error code of the read-only
refusal; Project Operations' current use of the PSA-era columns and `producttypecode` / `msdyn_linetype`
(left at their defaults).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from oppsync_pipeline.lib.crm.dynamics import API
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

LINE_NAME = "Total contract revenue (oppsync)"  # productdescription of oppsync's write-in quote line
QUOTE_SUFFIX = " (oppsync revenue)"
# msdyn_billingmethod's options (PSA): the input table's billing methods
BILLING_METHOD = {"time_and_materials": 192350000, "fixed_fee": 192350001}
# The solution columns seed 000 maps, in target order; which exist is discovered per run.
SOLUTION_COLUMNS = (
    "msdyn_costamount",
    "msdyn_estimatedcost",
    "msdyn_includeexpense",
    "msdyn_includematerial",
    "msdyn_billingmethod",
)
ATTRIBUTES = f"{API}/EntityDefinitions(LogicalName='quotedetail')/Attributes"
QUOTES_READ = 20  # the opportunity's newest quotes looked at for oppsync's line
_JSON = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_LOOKUP_NAMES = 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")
_PRIVILEGE = re.compile(r"\b(prv[A-Z]\w+)")
_SOLUTION_COLUMN = re.compile(r"'(msdyn_\w+)'")


class DynamicsWriter(RevenueWriter):
    crm = "dynamics"
    targets = (
        Target(
            "quotedetail.priceperunit",
            "total_contract_revenue",
            "on oppsync's write-in line (quantity 1, price overridden) of the opportunity's newest draft quote, "
            "created if none",
        ),
        Target("quotedetail.msdyn_costamount", "total_contract_cost", "Project Operations / PSA column"),
        Target("quotedetail.msdyn_estimatedcost", "total_contract_cost", "Field Service column"),
        Target(
            "quotedetail.msdyn_includeexpense",
            "include_expenses",
            "PSA column (the seed's 'msdyn_includeexpens' is truncated)",
        ),
        Target("quotedetail.msdyn_includematerial", "include_materials", "PSA column"),
        Target(
            "quotedetail.msdyn_billingmethod",
            "billing_method",
            "PSA choice: fixed_fee -> 192350001 Fixed Price, time_and_materials -> 192350000 Time and Material",
        ),
    )
    permission = (
        "Create, Read and Write on Quote (prvCreateQuote, prvReadQuote, prvWriteQuote) and Read on Price List "
        "(prvReadPriceLevel) in the security role of the app's application user"
    )

    def __init__(self, connector: Any):
        super().__init__(connector)
        # The msdyn_ columns this environment's quotedetail has: discovered once per run (None: not yet).
        self.quotedetail_columns: frozenset[str] | None = None

    # -- the mapping ---------------------------------------------------------------------------------------------

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        present = self.solution_columns()
        candidates = {
            "msdyn_costamount": row.total_contract_cost,
            "msdyn_estimatedcost": row.total_contract_cost,
            "msdyn_includeexpense": row.include_expenses,
            "msdyn_includematerial": row.include_materials,
            "msdyn_billingmethod": BILLING_METHOD[row.billing_method] if row.billing_method else None,
        }
        out: dict[str, Any] = {"quotedetail.priceperunit": row.total_contract_revenue}
        out.update({f"quotedetail.{c}": v for c, v in candidates.items() if v is not None and c in present})
        return out

    def solution_columns(self) -> frozenset[str]:
        """The seed's msdyn_ columns this environment has (one metadata read per run; absent ones are a warning)."""
        if self.quotedetail_columns is None:
            try:
                body = self.client.get_json(ATTRIBUTES, params={"$select": "LogicalName"}, headers=_JSON)
                names = {str(a.get("LogicalName")) for a in body.get("value", [])}
            except CrmError as err:
                if err.status != 403:
                    raise
                names = self._probe_columns()
            self.quotedetail_columns = frozenset(c for c in SOLUTION_COLUMNS if c in names)
            missing = [c for c in SOLUTION_COLUMNS if c not in names]
            if missing:
                self.connector.stats.warn(
                    f"quotedetail has no column {', '.join(missing)} in this environment (installed with Project "
                    "Operations / PSA, msdyn_estimatedcost with Field Service): not written; priceperunit is"
                )
        return self.quotedetail_columns

    def _probe_columns(self) -> set[str]:
        """Without metadata rights: a column is there when `$select`-ing it is not refused with 400."""
        self.connector.stats.warn(
            "quotedetail attribute metadata refused (prvReadEntity): solution columns found by $select probes"
        )
        found = set()
        for column in SOLUTION_COLUMNS:
            try:
                self.client.get_json(
                    f"{API}/quotedetails", params={"$select": f"quotedetailid,{column}", "$top": "1"}, headers=_JSON
                )
            except CrmError as err:
                if err.status != 400:
                    raise
                continue
            found.add(column)
        return found

    # -- reading -------------------------------------------------------------------------------------------------

    def read_current(self, source_id: str) -> Current:
        """oppsync's line: on the newest draft quote of the opportunity if it has one, else (values only) on the
        newest quote that has one. Context: the draft quote and its line `write` reuses (None: create)."""
        columns = ["priceperunit", *sorted(self.solution_columns())]
        quotes = self._values(
            "quotes",
            {
                "$select": "quoteid,statecode,createdon",
                "$filter": f"_opportunityid_value eq {source_id}",
                "$orderby": "createdon desc,quoteid asc",
                "$top": str(QUOTES_READ),
            },
        )
        draft = next((q["quoteid"] for q in quotes if q.get("statecode") == 0), None)
        lines: list[dict[str, Any]] = []
        if quotes:
            of_quotes = " or ".join(f"_quoteid_value eq {q['quoteid']}" for q in quotes)
            lines = self._values(
                "quotedetails",
                {
                    "$select": ",".join(["quotedetailid", "_quoteid_value", *columns]),
                    "$filter": f"productdescription eq '{LINE_NAME}' and isproductoverridden eq true and ({of_quotes})",
                    "$orderby": "createdon asc,quotedetailid asc",
                },
            )
        order = {q["quoteid"]: i for i, q in enumerate(quotes)}
        lines.sort(key=lambda ln: (ln.get("_quoteid_value") != draft, order.get(ln.get("_quoteid_value"), len(order))))
        line = lines[0] if lines else None
        values = {f"quotedetail.{c}": line.get(c) for c in columns} if line else {}
        on_draft = line is not None and draft is not None and line.get("_quoteid_value") == draft
        return Current(
            values,
            {
                "quote_id": draft,
                "line_id": line["quotedetailid"] if on_draft else None,
                "line_values": {c: line.get(c) for c in columns} if line else {},
            },
        )

    def _values(self, entity_set: str, params: dict[str, str]) -> list[dict[str, Any]]:
        body = self.client.get_json(f"{API}/{entity_set}", params=params, headers=_JSON)
        if not isinstance(body, dict) or not isinstance(body.get("value"), list):
            raise CrmError(f"Dataverse answered GET {entity_set} without a value list", code="MALFORMED_BODY")
        return body["value"]

    # -- writing -------------------------------------------------------------------------------------------------

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        body = {f.split(".", 1)[1]: v for f, v in changes.items()}
        line_id = current.context.get("line_id")
        if line_id:
            try:
                self.client.request(
                    "PATCH", f"{API}/quotedetails({line_id})", json=body, headers={**_JSON, "If-Match": "*"}
                )
            except CrmError as err:
                if err.status != 404:
                    raise
                raise CrmError(
                    f"quote line {line_id} was deleted after it was read (404 {err.code}); not re-created by an "
                    "upsert: the next run adds a new line",
                    status=404,
                    code=err.code,
                ) from None
            return
        quote_id = current.context.get("quote_id") or self._create_quote(source_id)
        carried = {c: v for c, v in (current.context.get("line_values") or {}).items() if v is not None}
        line = {
            "quoteid@odata.bind": f"/quotes({quote_id})",
            "isproductoverridden": True,
            "productdescription": LINE_NAME,
            "quantity": 1,
            "ispriceoverridden": True,
            **carried,
            **body,
        }
        self.client.request("POST", f"{API}/quotedetails", json=line, headers=_JSON)

    def _create_quote(self, source_id: str) -> str:
        opp = self.client.get_json(
            f"{API}/opportunities({source_id})",
            params={"$select": "name,_customerid_value,_pricelevelid_value,_transactioncurrencyid_value"},
            headers={**_JSON, "Prefer": _LOOKUP_NAMES},
        )
        customer = opp.get("_customerid_value")
        if not customer:
            raise CrmError(
                f"opportunity {source_id} has no Potential Customer (customerid): a quote needs one; set it on the "
                "opportunity and run again",
                permanent=True,
            )
        kind = opp.get("_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname") or "account"
        currency = opp.get("_transactioncurrencyid_value")
        price_list = opp.get("_pricelevelid_value") or self._active_price_list(currency)
        quote = {
            "name": f"{opp.get('name') or source_id}"[: 300 - len(QUOTE_SUFFIX)] + QUOTE_SUFFIX,
            f"customerid_{kind}@odata.bind": f"/{kind}s({customer})",
            "pricelevelid@odata.bind": f"/pricelevels({price_list})",
            "opportunityid@odata.bind": f"/opportunities({source_id})",
        }
        if currency:
            quote["transactioncurrencyid@odata.bind"] = f"/transactioncurrencies({currency})"
        response = self.client.request("POST", f"{API}/quotes", json=quote, headers=_JSON)
        m = _ENTITY_ID.search(response.headers.get("OData-EntityId", ""))
        if m:
            return m.group(1).lower()
        created = self.client.parse_json(response) if response.content else {}
        if isinstance(created, dict) and created.get("quoteid"):
            return str(created["quoteid"])
        raise CrmError("Dataverse created the quote but named no id (no OData-EntityId header)", code="MALFORMED_BODY")

    def _active_price_list(self, currency: str | None) -> str:
        flt = "statecode eq 0" + (f" and _transactioncurrencyid_value eq {currency}" if currency else "")
        found = self._values("pricelevels", {"$select": "pricelevelid,name", "$filter": flt, "$orderby": "name"})
        if not found:
            raise CrmError(
                "the opportunity has no price list and no active price list exists in its currency: set one on "
                "the opportunity (a quote needs a price list)",
                permanent=True,
            )
        return str(found[0]["pricelevelid"])

    # -- errors --------------------------------------------------------------------------------------------------

    def explain(self, err: CrmError) -> CrmError:
        text = str(err)
        if err.status == 403 and not isinstance(err, QuotaExhausted):
            m = _PRIVILEGE.search(text)
            lacks = f"lacks {m.group(1)}" if m else "may not write quotes"
            return WritePermissionError(
                f"Dataverse refused the quote write (403 {err.code}): the application user {lacks}; grant it "
                f"{self.permission}. Dataverse said: {text[:300]}",
                status=403,
                code=err.code,
            )
        if err.status == 400:
            m = _SOLUTION_COLUMN.search(text)
            if m:
                return CrmError(
                    f"this environment's quotedetail has no column {m.group(1)} (Project Operations / PSA or Field "
                    f"Service not installed) (400 {err.code}): {text[:300]}",
                    status=400,
                    code=err.code,
                )
        return err
