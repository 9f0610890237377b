"""Microsoft Dynamics 365 Sales / Dataverse Web API v9.2 (crm-api-notes.md section 3).

Auth: Entra ID client credentials (`POST {authority}/{tenant}/oauth2/v2.0/token`, scope `<org url>/.default`);
no refresh token exists in this flow, so a 401 mid-paging simply fetches a new token and repeats the request.
Stage key: the status reason (`statuscode`, as a string); `fetch_stages()` reads the status reasons with their
state (0 Open, 1 Won, 2 Lost) from the statuscode StatusAttributeMetadata, custom status reasons included.
`stepname` / `salesstage` stay in `raw`.
Open set: `statecode eq 0` (not-open: `statecode ne 0`), or `Microsoft.Dynamics.CRM.In(statuscode, ...)` when the
connection sets `open_statuses` (labels or statuscode values).
Incremental: `modifiedon ge <since>` ordered by `modifiedon,opportunityid`, paged with `Prefer:
odata.maxpagesize` and `@odata.nextLink` used verbatim.
Deletes (`options.change_tracking: true`): Dataverse hard-deletes, and only change tracking reports deletions.
The delta link is the connector's `resume_token`, which the sync layer stores in `oppsync.sync_state` between
runs; without one (first run, or `options.delta_link` unset) `deleted()` runs an initial
`Prefer: odata.track-changes` read that only establishes a baseline (no deletions on that call). An expired
delta token (7 days by default) fails the read; full syncs detect deletions by id diff anyway.
Options: authority_url (default https://login.microsoftonline.com), scope (default `<base_url>/.default`),
change_tracking, delta_link, request_limit (service-protection window size used for quota stats, 6000).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.base import CrmConnector, Page
from oppsync_pipeline.lib.crm.http import AuthError, Auth, CrmError, QuotaExhausted, RequestStats
from oppsync_pipeline.lib.record import (CrmUser, Opportunity, StageInfo, clean_text, parse_date, parse_datetime,
                                         parse_float, to_utc)

API = "/api/data/v9.2"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
LOGICALNAME = "@Microsoft.Dynamics.CRM.lookuplogicalname"
ANNOTATIONS = 'odata.include-annotations="OData.Community.Display.V1.FormattedValue,' \
              'Microsoft.Dynamics.CRM.lookuplogicalname"'
SELECT = ("opportunityid", "name", "estimatedvalue", "estimatedclosedate", "closeprobability", "statecode",
          "statuscode", "stepname", "salesstage", "_parentaccountid_value", "_customerid_value", "_ownerid_value",
          "createdon", "_createdby_value", "modifiedon", "_transactioncurrencyid_value")
ACCOUNT_SELECT = ("name", "address1_line1", "address1_city", "address1_stateorprovince", "address1_postalcode",
                  "address1_country", "address1_composite")
EXPAND = (f"parentaccountid($select={','.join(ACCOUNT_SELECT)}),"
          "transactioncurrencyid($select=isocurrencycode)")
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})$")
# Publisher-prefixed custom columns (new_x, cr123_x, msdyn_x) and their lookup form (_new_x_value).
log = logging.getLogger(__name__)
CUSTOM = re.compile(r"^(_[a-z][a-z0-9]{1,7}_[a-z0-9_]+_value|[a-z][a-z0-9]{1,7}_[a-z0-9_]+)$")
NUMERIC = frozenset({"estimatedvalue", "closeprobability", "statecode", "statuscode", "salesstage",
                     "exchangerate", "actualvalue", "budgetamount", "versionnumber"})
DATETIMES = frozenset({"createdon", "modifiedon", "overriddencreatedon"})
DATES = frozenset({"estimatedclosedate", "actualclosedate"})
OPS = {"equal": "eq", "not_equal": "ne", "more_than": "gt", "less_than": "lt", "at_least": "ge", "at_most": "le"}


class EntraAuth(Auth):
    """Client credentials against Entra ID; the token is fetched lazily and again on 401 or near expiry."""

    refreshable = True

    def __init__(self, authority: str, tenant_id: str, client_id: str, client_secret: str, scope: str,
                 timeout: tuple[float, float] = (10.0, 60.0)):
        self.token_url = f"{authority.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"
        self._form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret,
                      "scope": scope}
        self.timeout = timeout
        self.token: str | None = None
        self.expires_at = 0.0

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        if self.token is None or time.monotonic() > self.expires_at - 60:
            self.refresh(session)
        headers["Authorization"] = f"Bearer {self.token}"

    def refresh(self, session: requests.Session) -> None:
        try:
            resp = session.post(self.token_url, data=self._form, headers={"Accept": "application/json"},
                                timeout=self.timeout)
        except requests.RequestException as err:
            raise CrmError(f"Entra ID token endpoint unreachable: {type(err).__name__}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or "access_token" not in body:
            codes = body.get("error_codes") or []
            # error_description names the app id, never the secret; keep only the first line (no trace ids).
            desc = str(body.get("error_description", "")).split("\r\n")[0][:200]
            raise AuthError(f"Entra ID refused the client credentials (HTTP {resp.status_code} "
                            f"{body.get('error', 'error')}{' AADSTS' + str(codes[0]) if codes else ''}): {desc}",
                            status=resp.status_code, code=str(body.get("error")))
        self.token = body["access_token"]
        self.expires_at = time.monotonic() + float(body.get("expires_in", 3599))


def observe(response: requests.Response, stats: RequestStats, limit: int = 6000) -> None:
    """Service protection: requests left in the 5-minute window -> quota used / limit."""
    remaining = response.headers.get("x-ms-ratelimit-burst-remaining-xrm-requests")
    if remaining is not None:
        try:
            left = int(remaining.replace(",", ""))
        except ValueError:
            return
        stats.quota_limit = limit
        stats.quota_used = max(0, limit - left)


def classify(response: requests.Response, max_wait: float = 300.0) -> Exception | None:
    """A 429 is retried after Retry-After; one that asks to wait longer than a run can, or a 403 for an app
    that is not an application user of the environment, ends the run."""
    if response.status_code == 429:
        try:
            wait = float(response.headers.get("Retry-After", "0"))
        except ValueError:
            wait = 0.0
        if wait >= max_wait:
            return QuotaExhausted(f"Dataverse service protection limit reached; retry after {wait:.0f}s",
                                  status=429, code=_error_code(response))
    if response.status_code == 403:
        return AuthError(f"Dataverse refused access (403 {_error_code(response)}): the app is not an "
                         "application user of this environment, or lacks privileges", status=403,
                         code=_error_code(response))
    return None


def _error_code(response: requests.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


class DynamicsConnector(CrmConnector):
    crm = "dynamics"
    max_page_size = 5000
    native_deletes = True
    credential_keys = ("tenant_id", "client_id", "client_secret")
    known_fields = frozenset(SELECT) | frozenset({
        "description", "actualvalue", "actualclosedate", "budgetamount", "exchangerate", "_owninguser_value",
        "_owningteam_value", "_modifiedby_value", "overriddencreatedon", "versionnumber", "stageid",
        "_campaignid_value", "_originatingleadid_value"})

    delta_link: str | None = None
    delete_feed_needs_baseline = True

    @property
    def resume_token(self) -> str | None:
        return self.delta_link if self.conn.options.get("change_tracking") else None

    @resume_token.setter
    def resume_token(self, value: str | None) -> None:
        if value:
            self.delta_link = value

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return bool(CUSTOM.match(name))

    def make_auth(self) -> Auth:
        opts = self.conn.options
        return EntraAuth(opts.get("authority_url", "https://login.microsoftonline.com"),
                         self.credentials["tenant_id"], self.credentials["client_id"],
                         self.credentials["client_secret"], opts.get("scope", f"{self.conn.base_url}/.default"))

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        observe(response, stats, int(self.conn.options.get("request_limit", 6000)))

    def classify(self, response: requests.Response) -> Exception | None:
        return classify(response)

    # -- requests -------------------------------------------------------------------------------------------------

    def _headers(self, *prefer: str) -> dict[str, str]:
        return {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                "Prefer": ",".join((f"odata.maxpagesize={self.page_size}", *prefer))}

    def _pages(self, path: str, params: dict[str, str] | None, headers: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Follow @odata.nextLink verbatim (same Prefer header) until the last page."""
        url: str | None = f"{API}/{path}"
        seen: set[str] = set()
        while url:
            body = self.client.get_json(url, params=params, headers=headers)
            yield body
            nxt = body.get("@odata.nextLink")
            if nxt in seen:
                raise CrmError(f"Dataverse returned the same @odata.nextLink twice for {path}", code="PAGING_LOOP")
            if nxt:
                seen.add(nxt)
            url, params = nxt, None

    # -- stages and users -----------------------------------------------------------------------------------------

    def fetch_stages(self) -> list[StageInfo]:
        body = self.client.get_json(
            f"{API}/EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='statuscode')/"
            "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}, headers=self._headers())
        stages = []
        for i, opt in enumerate((body.get("OptionSet") or {}).get("Options") or []):
            label = ((opt.get("Label") or {}).get("UserLocalizedLabel") or {}).get("Label") or str(opt["Value"])
            state = int(opt.get("State", 0))
            stages.append(StageInfo(key=str(opt["Value"]), label=label, is_closed=state != 0, is_won=state == 1,
                                    sort_order=i))
        return stages

    def users(self) -> Iterable[CrmUser]:
        headers = self._headers()
        for body in self._pages("systemusers", {"$select": "fullname,internalemailaddress,isdisabled"}, headers):
            for u in body.get("value", []):
                yield CrmUser(u["systemuserid"], clean_text(u.get("fullname")), u.get("internalemailaddress"),
                              kind="user", active=not u.get("isdisabled", False))
        for body in self._pages("teams", {"$select": "name"}, headers):
            for t in body.get("value", []):
                yield CrmUser(t["teamid"], clean_text(t.get("name")), None, kind="team")

    # -- opportunities --------------------------------------------------------------------------------------------

    def _select(self) -> str:
        extra = [v for v in self.conn.fields.values() if v not in SELECT and "/" not in v]
        return ",".join(dict.fromkeys([*SELECT, *extra]))

    def open_filter(self, open_set: bool) -> str | None:
        """The open (or not-open) set as a $filter clause; None when it is empty."""
        if self.conn.open_statuses is None:
            return "statecode eq 0" if open_set else "statecode ne 0"
        keys = [k for k in self.open_stage_keys(open_set) if k.isdigit()]
        if not keys:
            return None
        return ("Microsoft.Dynamics.CRM.In(PropertyName='statuscode',PropertyValues=["
                + ",".join(f"'{k}'" for k in keys) + "])")

    def query_filter(self, open_set: bool, since: datetime | None) -> str | None:
        clause = self.open_filter(open_set)
        if clause is None:
            return None
        parts = [clause]
        if since is not None:
            parts.append(f"modifiedon ge {to_utc(since).strftime('%Y-%m-%dT%H:%M:%SZ')}")
        parts += [render_filter(f) for f in self.conn.filters]
        return " and ".join(f"({p})" if " or " in p else p for p in parts)

    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        flt = self.query_filter(open_set, since)
        if flt is None:
            return
        params = {"$select": self._select(), "$filter": flt, "$orderby": "modifiedon asc,opportunityid asc",
                  "$expand": EXPAND}
        owners: dict[str, str | None] | None = None
        for body in self._pages("opportunities", params, self._headers(ANNOTATIONS)):
            page = []
            for row in body.get("value", []):
                if row.get(f"_ownerid_value{FORMATTED}") is None and row.get("_ownerid_value") and owners is None:
                    owners = {u.crm_user_id: u.name for u in self.users()}
                page.append(self._map(row, owners))
            if page:
                yield page

    def _map(self, row: dict[str, Any], owners: dict[str, str | None] | None = None) -> Opportunity:
        account = row.get("parentaccountid") or None
        stage = None if row.get("statuscode") is None else str(row["statuscode"])
        owner = row.get("_ownerid_value")
        currency = (row.get("transactioncurrencyid") or {}).get("isocurrencycode")
        overrides = self.conn.fields
        return self.opportunity(
            row["opportunityid"], row,
            project_name=clean_text(row.get(overrides.get("project_name", "name"))),
            client_name=clean_text(row.get(overrides["client_name"]) if "client_name" in overrides else
                                   (account or {}).get("name") or row.get(f"_parentaccountid_value{FORMATTED}")),
            service_location=clean_text(_address(account)),
            sales_executive=clean_text(row.get(overrides["sales_executive"]) if "sales_executive" in overrides
                                       else row.get(f"_ownerid_value{FORMATTED}") or (owners or {}).get(owner)),
            owner_crm_id=owner,
            stage=str(row.get(overrides["stage"])) if "stage" in overrides else stage,
            status=self.status_for(stage, is_closed=row.get("statecode") not in (0, None),
                                   is_won=row.get("statecode") == 1),
            amount=parse_float(row.get(overrides.get("amount", "estimatedvalue"))),
            currency=currency,
            close_date=parse_date(row.get(overrides.get("close_date", "estimatedclosedate"))),
            probability=parse_float(row.get(overrides.get("probability", "closeprobability"))),
            created_at=parse_datetime(row.get(self.field("created_at", "createdon"))),
            created_by_crm_id=row.get(self.field("created_by_crm_id", "_createdby_value")),
            modified_at=parse_datetime(row.get("modifiedon")),
        )

    # -- deletions (change tracking) -----------------------------------------------------------------------------

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        if not self.conn.options.get("change_tracking"):
            return
        link = self.delta_link or self.conn.options.get("delta_link")
        headers = self._headers("odata.track-changes")
        if link is None:
            # Baseline: page through the tracked set (ids only) to get a delta link; no deletions yet.
            for body in self._pages("opportunities", {"$select": "opportunityid"}, headers):
                self.delta_link = body.get("@odata.deltaLink") or self.delta_link
            return
        url: str | None = link
        seen: set[str] = set()
        while url:
            try:
                body = self.client.get_json(url, headers=headers)
            except CrmError as err:
                if url == link and err.status == 400:
                    # The stored delta token is no longer accepted (expired after 7 days, or change tracking
                    # was reset): start a new baseline. Deletes in the gap are found by the next full sync.
                    log.warning("Dataverse refused the stored delta link (%s); starting a new baseline", err.code)
                    self.delta_link = None
                    for body in self._pages("opportunities", {"$select": "opportunityid"}, headers):
                        self.delta_link = body.get("@odata.deltaLink") or self.delta_link
                    return
                raise
            gone = [(row["id"], None) for row in body.get("value", [])
                    if str(row.get("@odata.context", "")).endswith("/$deletedEntity")]
            if gone:
                yield gone
            if body.get("@odata.deltaLink"):
                self.delta_link = body["@odata.deltaLink"]
            url = body.get("@odata.nextLink")
            if url in seen:
                raise CrmError("Dataverse returned the same @odata.nextLink twice on a delta read", code="PAGING_LOOP")
            seen.add(url or "")


def _address(account: dict[str, Any] | None) -> str | None:
    if not account:
        return None
    parts = [account.get(k) for k in ("address1_line1", "address1_city", "address1_stateorprovince",
                                      "address1_postalcode", "address1_country")]
    joined = ", ".join(str(p) for p in parts if p)
    if joined:
        return joined
    composite = account.get("address1_composite")
    return ", ".join(line.strip() for line in str(composite).splitlines() if line.strip()) if composite else None


# -- filter rendering ----------------------------------------------------------------------------------------------

def literal(field: str, value: Any) -> str:
    """An OData literal for `value`, injection-safe: only numbers, GUIDs and ISO dates go unquoted (after a strict
    match); everything else is a single-quoted string with quotes doubled."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, datetime):
        return to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = str(value)
    if field in NUMERIC and NUMBER.match(text):
        return text
    if (field.endswith("_value") or field.endswith("id")) and GUID.match(text):
        return text.lower()
    if field in DATES and ISO_DATE.match(text):
        return text
    if field in DATETIMES and (ISO_DATETIME.match(text) or ISO_DATE.match(text)):
        return text if ISO_DATETIME.match(text) else text + "T00:00:00Z"
    return "'" + text.replace("'", "''") + "'"


def render_filter(f: RecordFilter) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", f.field):
        raise CrmError(f"filter field {f.field!r} is not a Dataverse column name")
    if f.op == "in":
        if not f.value:
            return "opportunityid eq null"  # an empty list matches nothing
        return "(" + " or ".join(f"{f.field} eq {literal(f.field, v)}" for v in f.value) + ")"
    return f"{f.field} {OPS[f.op]} {literal(f.field, f.value)}"
