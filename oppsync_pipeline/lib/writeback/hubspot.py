"""HubSpot: seed 000 "The opportunity amount is updated with the Total Contract Revenue": the deal's `amount`.

What HubSpot documents (docs notes `crm-write-webhook-notes.md` §2.1):
- `PATCH /crm/v3/objects/deals/{dealId}` with `{"properties": {"amount": "125000.00"}}`, scope
  `crm.objects.deals.write`; 200 and the deal (SimplePublicObject, every value a string). "Read-only and
  non-existent properties will result in an error. Properties values can be cleared by passing an empty string."
  [K] HubSpot's OpenAPI spec; the official client (hubspot-api-client 12.0.0, `crm.deals.BasicApi.update`) has the
  same text, the same path, 200 -> SimplePublicObject, OAuth auth, and types `properties` as dict[str, str].
- Read: `GET /crm/v3/objects/deals/{dealId}?properties=amount`; `amount` is a string or null. [K]
- No `If-Match` or version on PATCH [K, by absence]: a change made in HubSpot since our last write is found by
  the engine (the value differs from what oppsync.writeback_log says we wrote).

Traps:
- Numbers go as strings, and since 7 Apr 2025 a non-string property's value with leading or trailing whitespace
  (invisible characters included) is a 400 VALIDATION_ERROR `LEADING_TRAILING_WHITESPACE` [K changelog]. The
  amount is sent as plain decimal text with two decimals, never in exponent notation: HubSpot refused
  "1.4210854715202004e-14" on deal amount with 400 `INVALID_INTEGER` "... was not a valid number." [S]
  (Atlas-Authority/marketing-automation#206, the body the sandbox reproduces).
- A 400 names each invalid property twice: in `message` ("Property values were not valid: [{...}]") and in
  `errors[] {message, code, context.propertyName}`; the row fails, the other rows go on.
- No write scope: 403 category `MISSING_SCOPES`, `errors[].context.requiredGranularScopes` naming the scope (the
  shape HubSpot gives a refused read [S]; the same body for a refused write is [U]). `explain` turns any 403
  (HubSpot's limits are 429s) into WritePermissionError naming `crm.objects.deals.write`.
- Writes share the ten-secondly and daily limits with the sync's reads [S]; the client's quota budget applies.

Unverified [U]: whether HubSpot recomputes `amount` from line items on deals that have them (if it does, the
engine's read back reports `not_applied`); whether it reads back "125000.00" or "125000" (the value is compared
as a number either way). Verified here only against the sandbox (tests/writeback/test_hubspot_writer.py), which
is modelled on the facts above.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, Target, WritePermissionError

SCOPE = "crm.objects.deals.write"
CENT = Decimal("0.01")
# The read hint the connector adds to a 400 (it is about `fields:` / `filters:`, not a write): cut from messages.
_READ_HINT = "; check the connection's `fields:`"


class HubSpotWriter(RevenueWriter):
    crm = "hubspot"
    targets = (
        Target(
            "amount",
            "total_contract_revenue",
            'PATCH /crm/v3/objects/deals/{id} {"properties":{"amount":"125000.00"}} (a string, no whitespace); '
            "200 + the deal",
        ),
    )
    permission = (
        f"the scope {SCOPE} (private app: Settings > Integrations > Private Apps > the app > Scopes; "
        "OAuth app: add it to the app's scopes and have the portal re-authorise the app)"
    )

    def _path(self, source_id: str) -> str:
        return f"/crm/v3/objects/deals/{source_id}"

    def desired(self, row: RevenueRow) -> dict[str, Any]:
        return {"amount": row.total_contract_revenue}

    def read_current(self, source_id: str) -> Current:
        deal = self.client.get_json(self._path(source_id), params={"properties": "amount"})
        props = deal.get("properties") if isinstance(deal, dict) else None
        if not isinstance(props, dict):
            raise CrmError(
                f"HubSpot answered GET deals/{source_id} without a `properties` object: {str(deal)[:200]}",
                permanent=False,  # a wrong shape may be one bad answer (as for the sync's pages)
            )
        return Current({"amount": amount_value(props.get("amount"), source_id)}, {"updatedAt": deal.get("updatedAt")})

    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        body = {"properties": {name: amount_text(value) for name, value in changes.items()}}
        self.client.request("PATCH", self._path(source_id), json=body)

    def explain(self, err: CrmError) -> CrmError:
        if err.status == 403:  # HubSpot's limits are 429s, never a 403
            said = "the app lacks the scope" if err.code == "MISSING_SCOPES" else f"{err.code or 'forbidden'}"
            return WritePermissionError(
                f"HubSpot refused the deal write (403 {said}): grant the app {self.permission}",
                status=403,
                code=err.code,
            )
        if err.status == 400:
            text = str(err.args[0] if err.args else err).split(_READ_HINT, 1)[0]  # without the read hints
            return CrmError(
                f"{text}; the deal's `amount` was refused (HubSpot takes a number as plain decimal text without "
                "surrounding whitespace, and no read-only or unknown property)",
                status=400,
                code=err.code,
                permanent=True,
            )
        return super().explain(err)


def amount_text(value: Any) -> str:
    """An amount as HubSpot's number properties take it: plain decimal text with two decimals ("125000.00"),
    never exponent notation or surrounding whitespace; None clears the value ("")."""
    if value is None:
        return ""
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"not an amount: {value!r}")
    return format(number.quantize(CENT), "f")


def amount_value(text: Any, source_id: str) -> float | None:
    """The amount HubSpot returned (a string or null; "" is no value)."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        raise CrmError(
            f"HubSpot returned deal {source_id}'s amount as {text!r}, not a number", permanent=False
        ) from None
