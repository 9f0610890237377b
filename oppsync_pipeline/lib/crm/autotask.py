"""Autotask PSA (Datto / Kaseya) REST API v1.0 connector (crm-api-notes.md section 5).

- Auth: three headers on every call (`ApiIntegrationCode`, `UserName`, `Secret`); no tokens. The REST base is
  found by zone discovery: `GET {base_url}/atservicesrest/v1.0/zoneInformation?user=<username>` (no auth) ->
  `url` + `V1.0/`. `base_url` is the discovery host (`https://webservices.autotask.net`); a `base_url` that
  already contains `/ATServicesRest` is used as the zone without discovery. A 401 triggers one zone re-lookup
  (a database can move zones; django-autotask does the same), then the same request is repeated.
- Paging: `POST Opportunities/query` with `MaxRecords` = page size (<= 500); `pageDetails.nextPageUrl` is
  POSTed with the same body (a GET on it is 405 for POST-initiated queries and would stop at 500 rows). Next
  URLs are followed relative to the current zone so a zone move mid-paging is survived. Results are by id.
- Open set: `status in <open values>`; not-open: `status notIn <open values>`. The status picklist is read
  from `Opportunities/entityInformation/fields` (values are strings). Without `open_statuses`, the system
  values 2 Lost, 3 Closed (won) and 4 Implemented (won) are closed and everything else (0 Not Ready To Buy,
  1 Active, tenant-defined values) is open; a tenant-defined value whose label says lost / closed / won /
  implemented / cancelled counts as closed. `open_statuses` may name statuses by label or by value.
  The canonical `stage` is the status value ("1"); the Autotask `stage` picklist stays in `raw`.
- Incremental: `lastActivity gte since`. Opportunities have no last-modified field; `lastActivity` does not
  move on every edit (user-defined-field-only edits, some recalculated values), so the scheduled full sync
  is what catches those. There is no delete feed (`deleted()` yields nothing; deletes come from full-sync
  reconciliation).
- Mapping (seed 000): title -> project_name; companyID -> Companies.companyName -> client_name and the
  company address (address1, address2, city, state postalCode, country) -> service_location; contactID ->
  Contacts "first last" -> sales_executive, falling back to the owner resource's name when there is no
  contact. Companies and Contacts are fetched per page in batches with an `in` filter and cached.
- Custom (user-defined) fields are named `udf:<name>` in filters and field overrides; they are sent with
  `"udf": true`. Filter values go into the JSON body as JSON values (no string building, so no injection).
- Quota: Autotask sends no usage headers. `GET ThresholdInformation` is polled at the start and every
  `THRESHOLD_POLL_EVERY` requests into stats.quota_used / quota_limit (so the run's budget applies). 429
  past the threshold is retried with backoff (Retry-After when given) by the shared client.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, ClassVar

import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import CrmConnector, Page
from oppsync_pipeline.lib.crm.http import Auth, CrmError, RequestStats
from oppsync_pipeline.lib.record import (
    CrmUser, Opportunity, StageInfo, clean_text, parse_date, parse_datetime, parse_float, to_utc,
)

THRESHOLD_POLL_EVERY = 100
BATCH = 200            # ids per `in` lookup of companies / contacts
_NO_AUTH = "X-Oppsync-No-Auth"
_CLOSED_WON = {"3", "4"}
_CLOSED_LOST = {"2"}
_CLOSED_LABEL = re.compile(r"\b(lost|closed|won|implemented|cancel+ed)\b", re.IGNORECASE)
_LOST_LABEL = re.compile(r"\b(lost|cancel+ed)\b", re.IGNORECASE)
_V10 = re.compile(r"/v1\.0/", re.IGNORECASE)


class AutotaskAuth(Auth):
    """The three API-user headers. `refresh()` looks the zone up again (there is no token to renew)."""

    refreshable = True

    def __init__(self, username: str, secret: str, integration_code: str, rediscover: Any):
        self._headers = {"ApiIntegrationCode": integration_code, "UserName": username, "Secret": secret}
        self._rediscover = rediscover

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if headers.pop(_NO_AUTH, None):        # zone discovery takes no credentials
            return
        headers.update(self._headers)
        headers.setdefault("Content-Type", "application/json")

    def refresh(self, session: requests.Session) -> None:
        self._rediscover()


def observe(response: requests.Response, stats: RequestStats) -> None:
    """Autotask reports usage in no header; see AutotaskConnector._poll_threshold."""


def classify(response: requests.Response) -> Exception | None:
    if response.status_code == 500 and "zoneinformation" in response.url.lower():
        return CrmError("Autotask zone lookup failed: the API username is unknown (or blank)", status=500,
                        code="ZONE_LOOKUP")
    if response.status_code == 500:
        # Autotask answers query and validation errors with 500 {"errors": [...]}: retrying will not help.
        try:
            errors = response.json().get("errors")
        except (ValueError, AttributeError):
            errors = None
        if errors:
            text = "; ".join(str(e) for e in errors)[:300]
            return CrmError(f"Autotask rejected the request: {text}", status=500, code="AUTOTASK_ERROR")
    return None


class AutotaskConnector(CrmConnector):
    crm = "autotask"
    max_page_size = 500
    native_deletes = False
    credential_keys = ("username", "secret", "integration_code")
    known_fields = frozenset({
        "id", "title", "companyID", "contactID", "ownerResourceID", "creatorResourceID", "amount", "cost",
        "onetimeRevenue", "monthlyRevenue", "quarterlyRevenue", "semiannualRevenue", "yearlyRevenue",
        "totalAmountMonths", "useQuoteTotals", "probability", "stage", "status", "rating", "leadSource",
        "opportunityCategoryID", "projectedCloseDate", "closedDate", "lostDate", "startDate", "createDate",
        "lastActivity", "impersonatorCreatorResourceID", "barriers", "description", "helpNeeded",
        "market", "nextStep", "promotionName", "relationshipAssessmentScore", "technicalAssessmentScore",
        "lossReason", "winReason",
    })
    _OPS: ClassVar[dict[str, str]] = {"equal": "eq", "not_equal": "noteq", "more_than": "gt", "less_than": "lt",
                                      "at_least": "gte", "at_most": "lte", "in": "in"}

    def __init__(self, conn: Any, credentials: dict[str, str], **kwargs: Any):
        self._zone: str | None = None
        super().__init__(conn, credentials, **kwargs)
        self._companies: dict[int, dict[str, Any]] = {}
        self._contacts: dict[int, dict[str, Any]] = {}
        self._resources: dict[int, dict[str, Any]] | None = None
        self._countries: dict[int, str] | None = None
        self._last_poll: int | None = None

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return name.startswith("udf:") and len(name) > 4

    def make_auth(self) -> Auth:
        c = self.credentials
        return AutotaskAuth(c["username"], c["secret"], c["integration_code"], self._rediscover)

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats)

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response)

    # -- zone and threshold ---------------------------------------------------------------------------------------

    def _ensure_zone(self) -> None:
        if self._zone is None:
            self._discover()
        if self._last_poll is None or self.stats.requests - self._last_poll >= THRESHOLD_POLL_EVERY:
            self._poll_threshold()

    def _discover(self) -> None:
        base = self.conn.base_url.rstrip("/")
        if "/atservicesrest" in base.lower():
            url = base
        else:
            info = self.client.get_json(f"{base}/atservicesrest/v1.0/zoneInformation",
                                        params={"user": self.credentials["username"]}, headers={_NO_AUTH: "1"})
            url = str(info.get("url") or "")
            if not url:
                raise CrmError("Autotask zone lookup returned no url", code="ZONE_LOOKUP")
        url = url.rstrip("/")
        if not url.lower().endswith("/v1.0"):
            url += "/V1.0"
        self._zone = url + "/"
        self.client.base_url = self._zone

    def _rediscover(self) -> None:
        # After a 401 the database may have moved zones: look it up again (only with a discovery host).
        self._zone = None
        self._discover()

    def _poll_threshold(self) -> None:
        self._last_poll = self.stats.requests
        data = self.client.get_json("ThresholdInformation")
        if isinstance(data, dict) and data.get("externalRequestThreshold"):
            self.stats.quota_limit = int(data["externalRequestThreshold"])
            self.stats.quota_used = int(data.get("currentTimeframeRequestCount") or 0)
            self.client.budget.check(self.stats)

    # -- stages and users ------------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        self._ensure_zone()
        fields = self.client.get_json("Opportunities/entityInformation/fields").get("fields") or []
        status = next((f for f in fields if str(f.get("name", "")).lower() == "status"), None)
        if status is None:
            raise CrmError("Autotask: the Opportunities entity has no status picklist", code="NO_STATUS")
        out = []
        for v in status.get("picklistValues") or []:
            key, label = str(v["value"]), str(v.get("label") or v["value"])
            if v.get("isSystem", key in {"0", "1", "2", "3", "4"}) and key in {"0", "1", "2", "3", "4"}:
                closed, won = key in _CLOSED_WON | _CLOSED_LOST, key in _CLOSED_WON
            else:
                closed = bool(_CLOSED_LABEL.search(label))
                won = closed and not _LOST_LABEL.search(label)
            out.append(StageInfo(key=key, label=label, is_closed=closed, is_won=won,
                                 sort_order=int(v.get("sortOrder") or 0)))
        return out

    def users(self) -> Iterable[CrmUser]:
        for r in self._all_resources().values():
            yield CrmUser(str(r["id"]), _person(r), r.get("email"), active=bool(r.get("isActive", True)))

    def _all_resources(self) -> dict[int, dict[str, Any]]:
        if self._resources is None:
            self._ensure_zone()
            res: dict[int, dict[str, Any]] = {}
            for page in self._query("Resources", [{"op": "gt", "field": "id", "value": 0}],
                                    self.max_page_size):
                res.update((int(r["id"]), r) for r in page)
            self._resources = res
        return self._resources

    # -- opportunities ---------------------------------------------------------------------------------------------

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        self._ensure_zone()
        filters: list[dict[str, Any]] = [self._status_filter(open_set)]
        if since is not None:
            filters.append({"op": "gte", "field": "lastActivity", "value": _at_value(since)})
        filters += [render_filter(f) for f in self.conn.filters]
        for items in self._query("Opportunities", filters):
            self._lookup(items)
            yield [self._map(r) for r in items]

    def _status_filter(self, open_set: bool) -> dict[str, Any]:
        open_values = [int(k) for k in self.open_stage_keys(True) if k.lstrip("-").isdigit()]
        if not open_values:   # nothing is open: "open" matches no record, "not open" matches every record
            return {"op": "lt", "field": "id", "value": 0} if open_set else {"op": "gt", "field": "id", "value": 0}
        return {"op": "in" if open_set else "notIn", "field": "status", "value": open_values}

    def _query(self, entity: str, filters: list[dict[str, Any]],
               max_records: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """POST the query, then POST the same body to every nextPageUrl until there is none."""
        body = {"MaxRecords": max_records or self.page_size, "filter": filters}
        path = f"{entity}/query"
        while True:
            if self.stats.requests - (self._last_poll or 0) >= THRESHOLD_POLL_EVERY:
                self._poll_threshold()
            data = self.client.post_json(path, body)
            items = data.get("items") or []
            if items:
                yield items
            nxt = (data.get("pageDetails") or {}).get("nextPageUrl")
            if not nxt:
                return
            path = _relative(nxt)

    def _lookup(self, items: list[dict[str, Any]]) -> None:
        """Fetch this page's companies and contacts not seen yet, in batches (never one call per record)."""
        for entity, key, cache in (("Companies", "companyID", self._companies),
                                   ("Contacts", "contactID", self._contacts)):
            wanted = sorted({int(r[key]) for r in items if r.get(key) not in (None, 0, "")} - cache.keys())
            for i in range(0, len(wanted), BATCH):
                chunk = wanted[i:i + BATCH]
                for page in self._query(entity, [{"op": "in", "field": "id", "value": chunk}], self.max_page_size):
                    cache.update((int(x["id"]), x) for x in page)
                for missing in set(chunk) - cache.keys():
                    cache[missing] = {}
        if self._countries is None and any(c.get("countryID") for c in self._companies.values()):
            self._countries = {}
            for page in self._query("Countries", [{"op": "gt", "field": "id", "value": 0}],
                                    self.max_page_size):
                self._countries.update((int(c["id"]), c.get("displayName") or c.get("name")) for c in page)

    def _map(self, r: dict[str, Any]) -> Opportunity:
        company = self._companies.get(int(r.get("companyID") or 0)) or {}
        contact = self._contacts.get(int(r.get("contactID") or 0)) or {}
        owner = r.get("ownerResourceID")
        executive = _person(contact) if contact else None
        if not executive and owner is not None:
            executive = _person(self._all_resources().get(int(owner)) or {})
        if "sales_executive" in self.conn.fields:
            executive = _str(self._get(r, self.conn.fields["sales_executive"]))
        status_key = str(r["status"]) if r.get("status") is not None else None
        created_by = self._get(r, self.field("created_by_crm_id", "creatorResourceID"))
        probability = parse_float(self._get(r, self.field("probability", "probability")))
        return self.opportunity(
            r["id"], r,
            project_name=clean_text(self._get(r, self.field("project_name", "title"))),
            client_name=clean_text(company.get("companyName")) if "client_name" not in self.conn.fields
            else clean_text(self._get(r, self.conn.fields["client_name"])),
            service_location=self._address(company),
            sales_executive=clean_text(executive),
            owner_crm_id=_str(owner),
            stage=status_key,
            status=self.status_for(status_key),
            amount=parse_float(self._get(r, self.field("amount", "amount"))),
            currency=self.conn.options.get("currency"),
            close_date=parse_date(self._get(r, self.field("close_date", "projectedCloseDate"))),
            probability=probability,
            created_at=parse_datetime(self._get(r, self.field("created_at", "createDate"))),
            created_by_crm_id=_str(created_by),
            modified_at=parse_datetime(r.get("lastActivity")),
        )

    @staticmethod
    def _get(r: dict[str, Any], name: str) -> Any:
        if name.startswith("udf:"):
            udf = name[4:]
            return next((u.get("value") for u in r.get("userDefinedFields") or [] if u.get("name") == udf), None)
        return r.get(name)

    def _address(self, c: dict[str, Any]) -> str | None:
        if not c:
            return None
        country = (self._countries or {}).get(int(c["countryID"])) if c.get("countryID") else None
        region = " ".join(x for x in (c.get("state"), c.get("postalCode")) if x)
        parts = [c.get("address1"), c.get("address2"), c.get("city"), region or None, country]
        return clean_text(", ".join(str(p) for p in parts if p)) or None


def _person(r: dict[str, Any]) -> str | None:
    name = " ".join(str(x) for x in (r.get("firstName"), r.get("lastName")) if x)
    return name or None


def _str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _at_value(dt: datetime) -> str:
    """Autotask's query datetime: UTC, milliseconds (floored, so `gte` stays inclusive)."""
    dt = to_utc(dt)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _relative(next_url: str) -> str:
    """The part of a nextPageUrl after `/V1.0/`, so it resolves against the current zone."""
    m = _V10.search(next_url)
    return next_url[m.end():] if m else next_url


# -- filter rendering ----------------------------------------------------------------------------------------------

def render_filter(f: RecordFilter) -> dict[str, Any]:
    """A connection filter as an Autotask filter condition. Values stay JSON values: nothing to escape."""
    op = AutotaskConnector._OPS[f.op]
    node: dict[str, Any] = {"op": op, "field": f.field, "value": f.value}
    if f.field.startswith("udf:"):
        node["field"], node["udf"] = f.field[4:], True
    return node
