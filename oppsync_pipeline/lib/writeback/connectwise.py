"""ConnectWise PSA (Manage): seed 000 "Scopestack creates a 'forecast' with separate entries for Professional
Services, Managed Services, and Product Revenue."

What CW's API describes (docs/crm-write-webhook-notes.md §4.1, all [S]: pyconnectwise, generated from CW's
OpenAPI; checked against its source, pyconnectwise is not installed in the project's venv):
- `GET /sales/opportunities/{id}/forecast` answers the container (`forecastItems[]` + per-type totals, which are
  read-only and computed from the lines); `POST .../forecast` with a ForecastItem body adds a line (whether today's
  POST body is a ForecastItem rather than the old flat Forecast is [U]); `PATCH .../forecast/{forecastId}` takes a
  JSON Patch array (`[{"op": "replace", "path": "revenue", "value": 125000}]`).
- ForecastItem: `forecastType` is required (Other1 | Other2 | Agreement | Product | Service), `forecastDescription`
  at most 50 characters, `includeFlag` (the old model's `includedFlag` is gone), `recurringFlag`,
  `recurringRevenue`, `recurringCost`, `cycles`, `billCycle` (a reference to the tenant's Finance > Billing
  Cycles, whose `billingOptions` enum says Monthly / Quarterly / Yearly ...; the names are the tenant's own).
- Errors: 400 `{code: InvalidObject, message, errors: [{code, message, resource, field}]}`; a security role
  without the Add / Edit level on Sales > Opportunities answers 403 `{code: Unauthorized}`.

The mapping onto forecast types is ours: ScopeStack says only "separate entries" ([U] in the notes):
- Professional Services -> one `Service` line: revenue = ps_revenue, cost = ps_cost.
- Managed Services -> one `Agreement` line, recurring: recurringFlag true, recurringRevenue / recurringCost =
  ms_revenue / ms_cost (per payment period, as the input table defines them), billCycle = the tenant's billing
  cycle whose billingOptions is the payment frequency, cycles = the number of payment periods in the term
  (ceil(mrr_term_months / 1, 3 or 12): a 10-month term paid quarterly is billed 4 times), and revenue / cost =
  the per-period amounts times cycles (the line's total over the term, which CW's totals and our sync's amount
  sum). Without a term or a frequency, cycles, revenue and cost are not written (the per-period amounts are);
  without ms_revenue and ms_cost there is no Managed Services line at all (a frequency or term alone adds none).
  Whether CW derives revenue from the recurring fields itself is [U]: we write both, and read both back.
- Product -> one `Product` line: revenue = product_revenue.
Our lines are recognised by (forecastType, forecastDescription): ("Service", "Professional Services"),
("Agreement", "Managed Services"), ("Product", "Product Revenue"), exactly (case included: the sandbox's own
lines say "Product revenue"). A line is created once (POST, with includeFlag true) and then patched; other
users' lines are never touched. Traps: a user who names a line exactly like ours has it adopted (updated) by
the next write; two lines with one marker (a copied forecast, or a POST that CW committed but answered with a
5xx, which the client retries) fail the row naming both ids, rather than leave a double-counted line. A line
someone deletes in CW is created again by the next write (its fields read as absent).

Unverified and how the code copes: whether a forecast-only change moves the opportunity's `_info.lastUpdated`
is [U]. The connector reads amounts from the forecast only for opportunities an incremental read returns, so if
it does not move, an incremental sync does not see a write (nor a user's forecast edit) until the next full
sync; the sandbox's forecast_keeps_last_updated variant reproduces that case. The billing cycles' security-role
area name and whether billCycle may be given by name (we send the id) are [U].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

# forecastType -> the forecastDescription that marks the line as ours (seed 000's three entries)
LINES = {"Service": "Professional Services", "Agreement": "Managed Services", "Product": "Product Revenue"}
# payment_frequency -> (the billing cycle's billingOptions, months in one period)
FREQUENCIES = {"monthly": ("Monthly", 1), "quarterly": ("Quarterly", 3), "yearly": ("Yearly", 12)}
# the fields we write, per line (the order of `targets`)
FIELDS = {
    "Service": ("revenue", "cost"),
    "Agreement": ("recurringFlag", "recurringRevenue", "recurringCost", "billCycle", "cycles", "revenue", "cost"),
    "Product": ("revenue",),
}
BILLING_CYCLES_PATH = "/finance/billingCycles"


class ConnectWiseWriter(RevenueWriter):
    crm = "connectwise"
    targets = (
        Target("forecast.Service.revenue", "ps_revenue", "line 'Professional Services', forecastType Service"),
        Target("forecast.Service.cost", "ps_cost", "same line"),
        Target("forecast.Agreement.recurringFlag", "ms_revenue / ms_cost", "true; line 'Managed Services'"),
        Target("forecast.Agreement.recurringRevenue", "ms_revenue", "per payment period"),
        Target("forecast.Agreement.recurringCost", "ms_cost", "per payment period"),
        Target(
            "forecast.Agreement.billCycle",
            "payment_frequency",
            "the tenant's billing cycle whose billingOptions is Monthly / Quarterly / Yearly (sent by id)",
        ),
        Target("forecast.Agreement.cycles", "mrr_term_months, payment_frequency", "ceil(term / months per period)"),
        Target("forecast.Agreement.revenue", "ms_revenue x cycles", "the line's total over the term"),
        Target("forecast.Agreement.cost", "ms_cost x cycles", "the line's total cost over the term"),
        Target("forecast.Product.revenue", "product_revenue", "line 'Product Revenue', forecastType Product"),
    )
    permission = (
        "Sales > Opportunities at Add Level (new forecast lines) and Edit Level (changed ones), 'All', in the API "
        "member's security role (System > Security Roles)"
    )

    def __init__(self, connector: Any):
        super().__init__(connector)
        self._cycles: list[dict[str, Any]] | None = None

    # -- the mapping (pure) ----------------------------------------------------------------------------------

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "Service", "revenue", row.ps_revenue)
        _put(out, "Service", "cost", row.ps_cost)
        out.update(self._managed(row))
        _put(out, "Product", "revenue", row.product_revenue)
        return out

    @staticmethod
    def _managed(row: RevenueRow) -> dict[str, Any]:
        """The Managed Services line: only where the row has managed-services money (a frequency or term alone
        creates no line)."""
        if row.ms_revenue is None and row.ms_cost is None:
            return {}
        out: dict[str, Any] = {"forecast.Agreement.recurringFlag": True}
        _put(out, "Agreement", "recurringRevenue", row.ms_revenue)
        _put(out, "Agreement", "recurringCost", row.ms_cost)
        if row.payment_frequency is None:
            return out
        option, months = FREQUENCIES[row.payment_frequency]
        out["forecast.Agreement.billCycle"] = option
        if row.mrr_term_months is None:
            return out
        cycles = math.ceil(row.mrr_term_months / months)
        out["forecast.Agreement.cycles"] = cycles
        _put(out, "Agreement", "revenue", None if row.ms_revenue is None else round(row.ms_revenue * cycles, 2))
        _put(out, "Agreement", "cost", None if row.ms_cost is None else round(row.ms_cost * cycles, 2))
        return out

    # -- the API -------------------------------------------------------------------------------------------------

    def _forecast(self, source_id: str) -> str:
        return self.connector.api(f"/sales/opportunities/{int(source_id)}/forecast")

    def read_current(self, source_id: str) -> Current:
        try:
            answer = self.client.get_json(self._forecast(source_id))
        except CrmError as err:
            raise _refused_read(
                err, "the opportunity's forecast", "Sales > Opportunities (forecast), Inquire Level"
            ) from None
        if not isinstance(answer, dict) or not isinstance(answer.get("forecastItems"), list):
            raise CrmError(f"ConnectWise answered GET .../opportunities/{source_id}/forecast without forecastItems")
        values: dict[str, Any] = {}
        ids: dict[str, int] = {}
        for kind, line in ours(answer["forecastItems"]).items():
            ids[kind] = line["id"]
            for name in FIELDS[kind]:
                value = line.get(name)
                if name == "billCycle":
                    value = self._option_of(value)
                if value is not None:
                    values[f"forecast.{kind}.{name}"] = value
        return Current(values, {"ids": ids})

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        by_line: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            _, kind, name = key.split(".", 2)
            by_line.setdefault(kind, {})[name] = self._cycle_ref(value) if name == "billCycle" else value
        for kind, fields in by_line.items():
            line_id = current.context.get("ids", {}).get(kind)
            if line_id is None:
                body = {"forecastType": kind, "forecastDescription": LINES[kind], "includeFlag": True, **fields}
                self.client.request("POST", self._forecast(source_id), json=body)
            else:
                patch = [{"op": "replace", "path": name, "value": value} for name, value in fields.items()]
                self.client.request("PATCH", f"{self._forecast(source_id)}/{line_id}", json=patch)

    def explain(self, err: CrmError) -> CrmError:
        if isinstance(err, WritePermissionError):  # a refused read, already named (read_current, billing cycles)
            return err
        if err.status == 403:
            return WritePermissionError(
                f"ConnectWise refused the forecast write (HTTP 403): grant the API member {self.permission}. "
                f"CRM said: {err}",
                status=403,
                code=err.code,
            )
        return super().explain(err)

    # -- billing cycles (Finance > Billing Cycles: the tenant names them, billingOptions is CW's enum) ---------

    def _billing_cycles(self) -> list[dict[str, Any]]:
        if self._cycles is None:
            try:
                rows = self.client.get_json(self.connector.api(BILLING_CYCLES_PATH), params={"pageSize": 1000})
            except CrmError as err:
                raise _refused_read(
                    err,
                    "the billing cycles (the Managed Services line's billCycle)",
                    "Finance > Billing Cycles (table setup), Inquire Level",
                ) from None
            if not isinstance(rows, list):
                raise CrmError("ConnectWise answered GET /finance/billingCycles with something other than a list")
            self._cycles = [r for r in rows if isinstance(r, dict)]
        return self._cycles

    def _option_of(self, ref: Any) -> str | None:
        """A line's billCycle reference as its billingOptions (Monthly ...), or its name if the tenant has no
        such cycle any more."""
        if not isinstance(ref, dict) or ref.get("id") is None:
            return None
        cycle = next((c for c in self._billing_cycles() if c.get("id") == ref["id"]), None)
        return cycle.get("billingOptions") if cycle else ref.get("name")

    def _cycle_ref(self, option: str) -> dict[str, Any]:
        matches = [c for c in self._billing_cycles() if str(c.get("billingOptions", "")).lower() == option.lower()]
        if not matches:
            raise CrmError(
                f"ConnectWise has no billing cycle with billingOptions {option}: add one in Finance > Billing "
                "Cycles (System > Setup Tables), or give the row another payment_frequency",
                status=400,
                code="NoBillingCycle",
                permanent=True,
            )
        best = sorted(matches, key=lambda c: (not c.get("defaultFlag"), c.get("id") or 0))[0]
        return {"id": best["id"]}


def ours(items: list[Any]) -> dict[str, dict[str, Any]]:
    """Our line per forecast type; every other line is not ours. Two lines with one marker (a POST that CW
    committed but answered with an error, then retried; a forecast copied from another opportunity) fail the
    row: both count in the opportunity's totals, and oppsync does not guess which one to keep."""
    found: dict[str, dict[str, Any]] = {}
    for item in sorted((i for i in items if isinstance(i, dict)), key=lambda i: i.get("id") or 0):
        kind = item.get("forecastType")
        if kind in LINES and item.get("forecastDescription") == LINES[kind]:
            if kind in found:
                raise CrmError(
                    f"the opportunity has two {kind} forecast lines named '{LINES[kind]}' (ids "
                    f"{found[kind].get('id')} and {item.get('id')}): both count in its totals; delete the extra "
                    "one in ConnectWise, then run the write-back again",
                    code="DuplicateForecastLine",
                    permanent=True,
                )
            found[kind] = item
    return found


def _refused_read(err: CrmError, what: str, right: str) -> CrmError:
    """A 403 on one of the writer's reads as the right to grant (the connector's message says Inquire Level on
    the area; this names the write-back's need); any other error unchanged."""
    if err.status != 403:
        return err
    return WritePermissionError(
        f"ConnectWise refused reading {what} (HTTP 403): grant the API member's security role {right} "
        f"(System > Security Roles). CRM said: {err}",
        status=403,
        code=err.code,
    )


def _put(out: dict[str, Any], kind: str, name: str, value: Any) -> None:
    if value is not None:
        out[f"forecast.{kind}.{name}"] = value
