"""Autotask: seed 000's "Revenue Sync" onto the opportunity's own revenue fields.

  total_contract_revenue -> amount          total_contract_cost -> cost      mrr_term_months -> totalAmountMonths
  ps_revenue -> onetimeRevenue              ps_cost -> onetimeCost
  ms_revenue / ms_cost -> monthlyRevenue / monthlyCost, quarterlyRevenue / quarterlyCost or yearlyRevenue /
                          yearlyCost, as payment_frequency says

What Autotask documents (docs/crm-write-webhook-notes.md §5.1):
- [K] `PATCH {zone}/V1.0/Opportunities` with a flat JSON body that includes `"id"` changes only the properties
  sent (PUT would null every writable field left out, so it is never used) and answers 200 `{"itemId": N}`; a
  failure is HTTP 500 `{"errors": ["..."]}`; a security level without the right answers "The logged in Resource
  does not have the adequate permissions...". `GET {zone}/V1.0/Opportunities/{id}` -> `{"item": {...}}`.
- [S] the REST names are camelCase with a lower-case "time": `onetimeRevenue` / `onetimeCost` (seed 000's
  `oneTimeRevenue` is the wrong casing), and `semiannualRevenue` / `semiannualCost` exist too (Anteris
  autotask-client OpportunityEntity.php, the Autotask PowerShell module, the SOAP stubs).

Decisions:
- The recurring revenue goes to its payment frequency's pair, and the other frequencies' fields (semiannual
  included: the input has no such frequency) are set to 0, so that an opportunity whose frequency changed does
  not carry two recurring revenues. Revenue and cost apart: ms_revenue given zeroes the other revenues, ms_cost
  the other costs; a None leaves its fields as they are.
- ms_revenue / ms_cost without a payment_frequency are not written: which field they belong to is unknown.
- Reads go through the connector's client (zone lookup, the three headers, retries, the hourly-threshold poll).
  The connector's `classify` makes every 500 with an `errors` body permanent (not retried) and a 500 or 403 with
  the permission text `NO_RIGHTS`: `write` turns that into WritePermissionError naming the security level's
  "Opportunities: Edit", so the run stops at the first refused row instead of retrying it.

Traps and what is unverified [U]: whether `useQuoteTotals = true` makes Autotask keep the quote's totals instead
of a written amount / cost (the engine's read-back would report `not_applied`; read_current keeps the flag in
`Current.context`); whether `amount` is derived from the per-frequency fields and what `totalAmountMonths`
means exactly; how REST treats read-only fields (none is sent); whether field names are case-insensitive (the
documented casing is sent); the permission message's wording after its documented prefix and whether a refused
write is 500 or 403 (both are handled). Verified only against the sandbox (sandbox/autotask.py), no live tenant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

# The recurring-revenue pairs on the Opportunity entity; the input's payment frequencies are three of them.
RECURRING = ("monthly", "quarterly", "semiannual", "yearly")
FIELDS = (
    "amount",
    "cost",
    "totalAmountMonths",
    "onetimeRevenue",
    "onetimeCost",
    *(f"{period}{kind}" for period in RECURRING for kind in ("Revenue", "Cost")),
)
_NO_RIGHTS = "NO_RIGHTS"  # the connector's code for a 403, or a 500 with Autotask's permission text
_REFUSED_TEXT = re.compile(r"\(HTTP (\d+): (.*?)\); check", re.DOTALL)  # the connector's NO_RIGHTS message
_REJECTED_TEXT = re.compile(r"request \((\d+): (.*?)\); check", re.DOTALL)  # its AUTOTASK_ERROR message


def _recurring_targets() -> tuple[Target, ...]:
    out = []
    for period in RECURRING:
        when = (
            f"payment_frequency {period}; 0 under another frequency"
            if period != "semiannual"
            else "always 0 when the row gives it (the input has no semiannual frequency)"
        )
        out += [
            Target(f"{period}Revenue", "ms_revenue", when),
            Target(f"{period}Cost", "ms_cost", when),
        ]
    return tuple(out)


class AutotaskWriter(RevenueWriter):
    crm = "autotask"
    targets = (
        Target("amount", "total_contract_revenue", 'PATCH /V1.0/Opportunities, body with "id"; 200 {"itemId": N}'),
        Target("cost", "total_contract_cost"),
        Target("totalAmountMonths", "mrr_term_months", "the managed-services term in months"),
        Target("onetimeRevenue", "ps_revenue", 'lower-case "time" (seed 000\'s "oneTimeRevenue" is wrong)'),
        Target("onetimeCost", "ps_cost"),
        *_recurring_targets(),
    )
    permission = (
        "Edit on opportunities: Admin > Account Settings & Users > Security Levels, the API user's security level "
        "(a copy of 'API User (system) (API-only)'), CRM > Object Permissions > Opportunities: View and Edit = All"
    )

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        out: dict[str, Any] = {"amount": row.total_contract_revenue}
        optional = {
            "cost": row.total_contract_cost,
            "totalAmountMonths": row.mrr_term_months,
            "onetimeRevenue": row.ps_revenue,
            "onetimeCost": row.ps_cost,
        }
        out.update({f: v for f, v in optional.items() if v is not None})
        if row.payment_frequency is not None:
            for kind, value in (("Revenue", row.ms_revenue), ("Cost", row.ms_cost)):
                if value is not None:
                    out.update({f"{p}{kind}": value if p == row.payment_frequency else 0.0 for p in RECURRING})
        return out

    def read_current(self, source_id: str) -> Current:
        item = self._item(source_id)
        return Current({f: item[f] for f in FIELDS if f in item}, {"useQuoteTotals": item.get("useQuoteTotals")})

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        oid = _id(source_id)
        try:
            answer = self.client.parse_json(self.client.request("PATCH", "Opportunities", json={"id": oid, **changes}))
        except CrmError as err:
            raise self._write_refused(oid, err) from None
        if not isinstance(answer, dict) or str(answer.get("itemId")) != str(oid):
            raise CrmError(
                f'Autotask answered PATCH Opportunities (id {oid}) with {str(answer)[:200]} instead of {{"itemId": '
                f"{oid}}}: the write is not confirmed",
                code="UNEXPECTED_ANSWER",
            )

    def explain(self, err: CrmError) -> CrmError:
        if isinstance(err, WritePermissionError):
            return err
        if err.code == _NO_RIGHTS:  # the read itself was refused: the sync would be refused too
            status, said = _said(err, _REFUSED_TEXT)
            return WritePermissionError(
                f"Autotask refused to read the opportunity (HTTP {status}: {said}): grant the API user {self.permission}",
                status=err.status,
                code=err.code,
            )
        return super().explain(err)

    # -- internals ---------------------------------------------------------------------------------------------

    def _item(self, source_id: str) -> dict[str, Any]:
        # The zone lookup once, the ThresholdInformation poll every THRESHOLD_POLL_EVERY requests: what the
        # connector's own reads do first (the run's quota budget then counts against the hourly threshold).
        self.connector.ensure_zone()
        oid = _id(source_id)
        answer = self.client.get_json(f"Opportunities/{oid}")
        item = answer.get("item") if isinstance(answer, dict) else None
        if not isinstance(item, dict):
            raise CrmError(
                f"Autotask has no opportunity {oid} (GET Opportunities/{oid} answered {str(answer)[:100]}): deleted "
                "in Autotask since the last sync? The next full sync marks it deleted",
                status=404,
                code="NOT_FOUND",
                permanent=True,
            )
        return item

    def _write_refused(self, oid: int, err: CrmError) -> CrmError:
        """A refused PATCH as the user should read it (the connector words its errors for reads)."""
        if err.code == _NO_RIGHTS:
            status, said = _said(err, _REFUSED_TEXT)
            return WritePermissionError(
                f"Autotask refused to update opportunity {oid} (HTTP {status}: {said}): grant the API user "
                f"{self.permission}",
                status=err.status,
                code=err.code,
            )
        if err.code == "AUTOTASK_ERROR":
            status, said = _said(err, _REJECTED_TEXT)
            return CrmError(
                f"Autotask refused the update of opportunity {oid} (HTTP {status}: {said}); the fields written "
                "and their types are in docs/crms/autotask.md (Revenue write-back): check that this tenant's "
                "Opportunities have them (GET Opportunities/entityInformation/fields)",
                status=err.status,
                code=err.code,
                permanent=True,
            )
        return err


def _id(source_id: str) -> int:
    try:
        return int(str(source_id).strip())
    except ValueError:
        raise CrmError(
            f"{source_id!r} is not an Autotask opportunity id (an integer)", code="BAD_ID", permanent=True
        ) from None


def _said(err: CrmError, pattern: re.Pattern[str]) -> tuple[str, str]:
    """The HTTP status and Autotask's own text inside the connector's message (the whole message if not found)."""
    m = pattern.search(str(err))
    return (m.group(1), m.group(2)) if m else (str(err.status), str(err))
