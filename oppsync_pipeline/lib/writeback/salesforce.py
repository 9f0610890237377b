"""Salesforce: seed 000 "The opportunity amount is updated with the Total Contract Revenue".

`PATCH /services/data/vXX.X/sobjects/Opportunity/{Id}` with `{"Amount": ...}` answers 204 with no body
(docs/crm-write-webhook-notes.md §1.1). Two traps the engine's read-back catches:
- an opportunity with products: "the amount is the sum of the related products. Any attempt to update this
  field ... will be ignored. The update call will not be rejected" (still 204): read back, `not_applied`;
- a field the API user may not edit: 400 INVALID_FIELD_FOR_INSERT_UPDATE ("Please check the security settings
  of this field"), and no Edit right on the object: INSUFFICIENT_ACCESS_OR_READONLY: both name the permission.
Optimistic concurrency (`If-Match`) only has an effect on Account, so conflicts are found by comparing with
oppsync's last write (engine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

# Errors that mean "this user may read the opportunity but not write this field / record"
_PERMISSION_CODES = ("INVALID_FIELD_FOR_INSERT_UPDATE", "INSUFFICIENT_ACCESS_OR_READONLY", "INSUFFICIENT_ACCESS")


class SalesforceWriter(RevenueWriter):
    crm = "salesforce"
    targets = (Target("Amount", "total_contract_revenue", "PATCH sobjects/Opportunity/{Id}; 204, no body"),)
    permission = (
        "Edit on Opportunity in its profile or a permission set, and field-level edit access to Opportunity.Amount"
    )

    def _path(self, source_id: str) -> str:
        return f"{self.connector.data_path}/sobjects/Opportunity/{source_id}"

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        return {"Amount": row.total_contract_revenue}

    def read_current(self, source_id: str) -> Current:
        record = self.client.get_json(self._path(source_id), params={"fields": "Id,Amount,HasOpportunityLineItem"})
        if not isinstance(record, dict):
            raise CrmError(f"Salesforce answered GET Opportunity/{source_id} with a {type(record).__name__}")
        return Current({"Amount": record.get("Amount")}, {"has_products": bool(record.get("HasOpportunityLineItem"))})

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        self.client.request("PATCH", self._path(source_id), json=dict(changes))

    def explain(self, err: CrmError) -> CrmError:
        if err.code in _PERMISSION_CODES:
            return WritePermissionError(
                f"Salesforce refused the write ({err.status} {err.code}): grant the API user {self.permission}",
                status=err.status,
                code=err.code,
            )
        return super().explain(err)
