"""Salesforce: seed 000 "The opportunity amount is updated with the Total Contract Revenue".

What Salesforce documents (docs/crm-write-webhook-notes.md §1.1, [K] unless marked):
- the write is `PATCH /services/data/vXX.X/sobjects/Opportunity/{Id}` with `{"Amount": ...}`, answered 204 with no
  body; Amount is a currency field (precision 18, scale 2), updatable;
- the read is `GET .../sobjects/Opportunity/{Id}?fields=Amount,HasOpportunityLineItem`: only those fields (plus
  `attributes`); a field that does not exist or that field-level security hides is 400 (REST API guide, Get
  Field Values), so a user who cannot read Amount fails on the read, before anything is written.

Traps:
- an opportunity with products: "the amount is the sum of the related products. Any attempt to update this
  field, if the record has products, will be ignored. The update call will not be rejected" (still 204). The
  engine's read-back sees the old Amount and audits the row `not_applied`. `HasOpportunityLineItem` is read into
  the context so a caller can tell why; writing the products (OpportunityLineItem) instead is not seed 000's
  mapping and is not done;
- Amount read-only by field-level security: 400 INVALID_FIELD_FOR_INSERT_UPDATE, `fields: ["Amount"]`, "Please
  check the security settings of this field" [S: real bodies in client issue threads];
- no Edit on Opportunity (or no read/write sharing on the record): INSUFFICIENT_ACCESS_OR_READONLY "insufficient
  access rights on object id". Its HTTP status is [U]: 400 in the sandbox (a save-result StatusCode), 403 in
  some client code; `explain` goes by the error code, so either status names the permission;
- optimistic concurrency (`If-Match`) "only has an effect when used with Account objects"; conflicts are found by
  comparing with oppsync's last write (engine.py);
- in a multi-currency org Amount is in the record's CurrencyIsoCode [U]: the input row's revenue is written as is.

Verified against the sandbox (tests/writeback/test_salesforce_writer.py): the raw record after a write differs
only in Amount, the formula ExpectedRevenue and the change stamps; products, FLS read-only Amount and missing Edit
rights answer as above; simple-salesforce's `sf.Opportunity.update` gets its 204. Not verified against a real org:
the status of INSUFFICIENT_ACCESS_OR_READONLY, and that an ignored Amount still moves LastModifiedDate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

_FIELD_RIGHT = (
    "field-level edit access to Opportunity.Amount (Setup > Object Manager > Opportunity > Fields & Relationships "
    "> Amount > Set Field-Level Security: visible and not read-only for the API user's profile, or Edit on the "
    "field in a permission set)"
)
_OBJECT_RIGHT = (
    "Edit on Opportunity (its profile's or a permission set's Object Settings > Opportunities > Edit) and "
    "read/write sharing access to the opportunities it updates"
)
# Salesforce error code -> the right that is missing
_PERMISSION_CODES = {
    "INVALID_FIELD_FOR_INSERT_UPDATE": _FIELD_RIGHT,
    "INSUFFICIENT_ACCESS_OR_READONLY": _OBJECT_RIGHT,
    "INSUFFICIENT_ACCESS": _OBJECT_RIGHT,
}
_READ_FIELDS = "Amount,HasOpportunityLineItem"


# The vendor's words (object reference, Opportunity.Amount): the write would be accepted (204) and ignored, so the
# engine audits it `not_applied` without spending the request.
_IGNORED_WITH_PRODUCTS = (
    "the opportunity has products: Salesforce sets Amount to the sum of their prices and ignores writes to it "
    "(write the products, or remove them)"
)


class SalesforceWriter(RevenueWriter):
    crm = "salesforce"
    targets = (
        Target(
            "Amount",
            "total_contract_revenue",
            "PATCH sobjects/Opportunity/{Id}, 204 no body; ignored (still 204) when the opportunity has products",
        ),
    )
    permission = f"{_OBJECT_RIGHT}, and {_FIELD_RIGHT}"

    def _path(self, source_id: str) -> str:
        return f"{self.connector.data_path}/sobjects/Opportunity/{source_id}"

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        if row.total_contract_revenue is None:
            return {}
        return {"Amount": row.total_contract_revenue}

    def read_current(self, source_id: str) -> Current:
        record = self.client.get_json(self._path(source_id), params={"fields": _READ_FIELDS})
        if not isinstance(record, dict) or "Amount" not in record:
            raise CrmError(
                f"Salesforce answered GET Opportunity/{source_id}?fields={_READ_FIELDS} without an Amount "
                f"(got {type(record).__name__})",
                code="MALFORMED_BODY",
            )
        has_products = bool(record.get("HasOpportunityLineItem"))
        blocked = {"Amount": _IGNORED_WITH_PRODUCTS} if has_products else {}
        return Current({"Amount": record["Amount"]}, {"has_products": has_products}, blocked)

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        self.client.request("PATCH", self._path(source_id), json=dict(changes))

    def explain(self, err: CrmError) -> CrmError:
        right = _PERMISSION_CODES.get(err.code or "")
        if right is not None:
            return WritePermissionError(
                f"Salesforce refused the write ({err.status} {err.code}): grant the API user {right}. "
                f"Salesforce said: {err}",
                status=err.status,
                code=err.code,
            )
        return super().explain(err)
