"""Dynamics 365 / Dataverse webhooks: a service endpoint (contract 8) and SDK message processing steps on the
opportunity table (docs/crms/dynamics.md "Webhooks"; crm-write-webhook-notes.md §3.2).

Authentication: Dataverse does not sign its webhook requests. [K] use-webhooks.md ("secure your endpoint by using
authentication header or query string parameter keys"), register-web-hook.md. The endpoint's `authtype` says how the
shared key travels, and the receiver compares it in constant time:
  - 4 WebhookKey (`options.auth: webhook_key`, the default): the key is appended to the URL as `?code=<key>`. [K]
    register-web-hook.md ("a query string using `code` as the key"). The app never logs the query string.
  - 5 HttpHeader (`options.auth: http_header`, `options.header_name`, default `x-oppsync-webhook-key`): the key
    travels as a request header. [K] register-web-hook.md ("one or more key values pairs in the header").
    Over the Web API its `authvalue` is `<settings><setting name="<header>" value="<key>"/></settings>`. [S] the
    PowerShell Gallery module "Dataverse" (New-PSDVTableWebHook); the notes found one more repository, so [U] still.
  - 6 HttpQueryString is not offered (the same secrecy as WebhookKey with a name of our choosing).
Secret: `webhooks.secrets.webhook_key` (the key we chose and gave Dataverse; `authvalue` is not readable back [K]
serviceendpoint.md, so registration always re-sets it). Optional `options.organization_id`: requests whose
`OrganizationId` differs are refused 401 (another environment holding the same key), like Salesforce's org check.
Request: `POST`, JSON body = a serialized `RemoteExecutionContext` [K] use-webhooks.md (sample payload): MessageName
(Create / Update / Delete ...), PrimaryEntityName, PrimaryEntityId (a GUID), OperationId, CorrelationId, RequestId
(null for asynchronous steps in the sample), OrganizationId, OperationCreatedOn (`/Date(ms[+-hhmm])/`),
InputParameters (Target: changed columns only on Update [S]), headers `x-ms-dynamics-organization`,
`x-ms-dynamics-entity-name`, `x-ms-dynamics-request-name`, `x-ms-correlation-request-id`, and
`x-ms-dynamics-msg-size-exceeded` when the body passed 256 KB (InputParameters, images and ParentContext removed;
PrimaryEntityId stays, which is all this receiver reads). [K] use-webhooks.md
One request per step execution: Dataverse does not batch. [K] (the context describes one operation)
Dedupe key: `OperationId` + `PrimaryEntityId`. OperationId is the system job (asyncoperation) that carries this
step's execution: "the same ID as the AsyncOperationId property of the related System Job" [K]
learn.microsoft.com/dotnet/api/microsoft.xrm.sdk.remoteexecutioncontext.operationid;
its one retry (502/503/504 only [K] use-webhooks.md) belongs to the same job, so carries the same id [U, inferred].
PrimaryEntityId joins it because whether bulk messages (CreateMultiple / UpdateMultiple) share one job across
records is [U]. CorrelationId is not a key: it is shared by every step of one user action (a WinOpportunity updates
the opportunity and creates an opportunityclose). A synchronous step's OperationId may be the empty GUID [U]; then
the key is CorrelationId + RequestId + MessageName + PrimaryEntityId + OperationCreatedOn (a replay of the same
bytes still dedupes; registration only creates asynchronous steps).
Ids: PrimaryEntityId lower-cased, as the Web API returns `opportunityid` and the connector keys source_id.
Events about other tables are dropped (204, nothing stored): a step is registered per table, so they only arrive
when someone points another step at this URL.
Reply: any 2xx; the body is ignored. [K] use-webhooks.md. Timeout 60 s [K]; the inbox answers in milliseconds.
Registration (`register`): `POST /serviceendpoints {name, url, contract: 8, authtype, authvalue}` [S] notes §3.2
(values [K] serviceendpoint.md), then for Create, Update and Delete of opportunity: the sdkmessage by name, its
sdkmessagefilter for `primaryobjecttypecode eq 'opportunity'`, and `POST /sdkmessageprocessingsteps` with
mode 1 (asynchronous), stage 40 (post-operation), `filteringattributes` on Update (the columns the sync reads, so
edits to other columns send nothing), `eventhandler_serviceendpoint@odata.bind`. [S] New-PSDVTableWebHook and
other registration scripts. Idempotent: an endpoint with this URL or name (contract 8) is reused (its url, auth
type and key re-set), a step of this endpoint for the message is reused (its filtering attributes brought up to
date). The step's lookup to its endpoint is filtered as `_eventhandler_value` (the Web API's lookup property
naming [K]; this column's name [S]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar
from xml.sax.saxutils import quoteattr

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.dynamics import API, CLOSE_TIME, SELECT, STAGE_ID
from oppsync_pipeline.lib.webhooks.receiver import (
    IncomingRequest,
    Notification,
    Refused,
    WebhookReceiver,
    same_secret,
)

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector

CONTRACT_WEBHOOK = 8
AUTH_TYPES = {"webhook_key": 4, "http_header": 5}  # serviceendpoint.authtype [K]
DEFAULT_HEADER = "x-oppsync-webhook-key"
MODE_ASYNC, STAGE_POST_OPERATION = 1, 40  # sdkmessageprocessingstep.mode / stage [S]
MESSAGES = ("Create", "Update", "Delete")
KINDS = {"Create": "created", "Update": "updated", "Delete": "deleted"}
ENTITY = "opportunity"
OPTIONS = frozenset({"auth", "header_name", "organization_id", "endpoint_name"})
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an RFC 9110 token
MS_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
# Read-only or always-changing columns: never a reason to be told about an update.
NOT_FILTERED = frozenset({"opportunityid", "createdon", "modifiedon", "createdby"})


def filtering_attributes(conn: ConnectionConfig) -> list[str]:
    """The opportunity columns the sync reads, as logical names (`_parentaccountid_value` -> `parentaccountid`):
    the Update step's `filteringattributes`."""
    columns = [*SELECT, STAGE_ID, *CLOSE_TIME, *conn.fields.values()]
    out: list[str] = []
    for c in columns:
        m = re.fullmatch(r"_(\w+)_value", c)
        name = (m.group(1) if m else c).lower()
        if name not in NOT_FILTERED and name not in out and re.fullmatch(r"[a-z][a-z0-9_]*", name):
            out.append(name)
    return out


class DynamicsReceiver(WebhookReceiver):
    crm = "dynamics"
    secret_keys: ClassVar[tuple[str, ...]] = ("webhook_key",)

    def __init__(self, conn: ConnectionConfig, secrets: Mapping[str, str]):
        super().__init__(conn, secrets)
        self.auth = str(self.options.get("auth", "webhook_key"))
        self.header_name = str(self.options.get("header_name", DEFAULT_HEADER)).lower()
        org = self.options.get("organization_id")
        self.organization_id = str(org).lower() if org else None

    @classmethod
    def problems(cls, conn: ConnectionConfig) -> list[str]:
        out = super().problems(conn)
        opts, where = conn.webhooks.options, f"connections.{conn.name}.webhooks.options"
        unknown = sorted(set(opts) - OPTIONS)
        if unknown:
            out.append(f"{where}: unknown {unknown}; Dataverse takes {sorted(OPTIONS)}")
        if opts.get("auth", "webhook_key") not in AUTH_TYPES:
            out.append(f"{where}.auth: {opts.get('auth')!r}; one of {sorted(AUTH_TYPES)}")
        if not HEADER_NAME.match(str(opts.get("header_name", DEFAULT_HEADER))):
            out.append(f"{where}.header_name: not an HTTP header name")
        org = opts.get("organization_id")
        if org is not None and not GUID.match(str(org)):
            out.append(f"{where}.organization_id: the environment's OrganizationId is a GUID")
        return out

    # -- the request ------------------------------------------------------------------------------------------

    def verify(self, request: IncomingRequest) -> None:
        key = self.secrets["webhook_key"]
        if self.auth == "http_header":
            given = request.header(self.header_name)
            where = f"the {self.header_name} header (HttpHeader)"
        else:
            given = request.query.get("code")
            where = "the ?code= query parameter (WebhookKey)"
        if given is None:
            raise Refused(401, f"no key in {where}")
        if not same_secret(given, key):
            raise Refused(401, f"the key in {where} does not match webhooks.secrets.webhook_key")
        ctx = _parsed(request.body) if self.organization_id else None
        if ctx is not None and str(ctx.get("OrganizationId") or "").lower() != self.organization_id:
            raise Refused(401, "OrganizationId missing or not options.organization_id (another environment)")

    def notifications(self, request: IncomingRequest) -> list[Notification]:
        ctx = _parsed(request.body)
        if ctx is None:
            raise Refused(400, "the body is not a JSON object (a RemoteExecutionContext)")
        message, entity, entity_id = ctx.get("MessageName"), ctx.get("PrimaryEntityName"), ctx.get("PrimaryEntityId")
        if not isinstance(message, str) or not message or not isinstance(entity, str) or not entity:
            raise Refused(400, "MessageName or PrimaryEntityName missing")
        if entity.lower() != ENTITY:
            return []
        if not isinstance(entity_id, str) or not GUID.match(entity_id):
            raise Refused(400, "PrimaryEntityId is not a GUID")
        entity_id = entity_id.lower()
        operation = ctx.get("OperationId")
        if operation is not None and (not isinstance(operation, str) or not GUID.match(operation)):
            raise Refused(400, "OperationId is not a GUID")
        if operation and operation.lower() != EMPTY_GUID:
            event_id = f"{operation.lower()}:{entity_id}"
        else:
            parts = [ctx.get("CorrelationId"), ctx.get("RequestId"), message, entity_id, ctx.get("OperationCreatedOn")]
            if not ctx.get("CorrelationId"):
                raise Refused(400, "neither OperationId nor CorrelationId: no event id")
            event_id = "sync:" + ":".join(str(p) for p in parts)
        return [
            Notification(event_id, (entity_id,), KINDS.get(message, "unknown"), _ms_date(ctx.get("OperationCreatedOn")))
        ]

    # -- registration -----------------------------------------------------------------------------------------

    def endpoint_name(self) -> str:
        return str(self.options.get("endpoint_name") or f"oppsync {self.conn.name}")

    def authvalue(self) -> str:
        key = self.secrets["webhook_key"]
        if self.auth == "http_header":
            return f"<settings><setting name={quoteattr(self.header_name)} value={quoteattr(key)}/></settings>"
        return key

    def register(self, connector: CrmConnector, public_url: str) -> list[str]:
        client = connector.client
        lines: list[str] = []
        name = self.endpoint_name()
        endpoint = {
            "name": name,
            "url": public_url,
            "contract": CONTRACT_WEBHOOK,
            "authtype": AUTH_TYPES[self.auth],
            "authvalue": self.authvalue(),
            "description": f"oppsync webhook receiver for connection {self.conn.name}",
        }
        found = _rows(
            client.get_json(
                f"{API}/serviceendpoints",
                params={
                    "$select": "serviceendpointid,name,url,authtype",
                    "$filter": f"contract eq {CONTRACT_WEBHOOK} and (url eq {_lit(public_url)} or name eq {_lit(name)})",
                },
            )
        )
        if found:
            endpoint_id = found[0]["serviceendpointid"]
            client.request("PATCH", f"{API}/serviceendpoints({endpoint_id})", json=endpoint)
            lines.append(f"service endpoint '{name}' ({endpoint_id}) exists: url, auth type and key re-set")
        else:
            r = client.request("POST", f"{API}/serviceendpoints", json=endpoint)
            endpoint_id = _created_id(r)
            lines.append(
                f"service endpoint '{name}' ({endpoint_id}) created: contract 8 (Webhook) -> {_safe(public_url)}"
            )
        for message in MESSAGES:
            lines.append(self._step(client, endpoint_id, message))
        return lines

    def _step(self, client: Any, endpoint_id: str, message: str) -> str:
        messages = _rows(
            client.get_json(
                f"{API}/sdkmessages", params={"$select": "sdkmessageid,name", "$filter": f"name eq {_lit(message)}"}
            )
        )
        if not messages:
            raise RuntimeError(f"Dataverse has no sdkmessage named {message}")
        message_id = messages[0]["sdkmessageid"]
        filters = _rows(
            client.get_json(
                f"{API}/sdkmessagefilters",
                params={
                    "$select": "sdkmessagefilterid,primaryobjecttypecode",
                    "$filter": f"primaryobjecttypecode eq '{ENTITY}' and _sdkmessageid_value eq {message_id}",
                },
            )
        )
        if not filters:
            raise RuntimeError(f"Dataverse has no sdkmessagefilter for {message} of {ENTITY}")
        filter_id = filters[0]["sdkmessagefilterid"]
        attributes = ",".join(filtering_attributes(self.conn)) if message == "Update" else None
        existing = _rows(
            client.get_json(
                f"{API}/sdkmessageprocessingsteps",
                params={
                    "$select": "sdkmessageprocessingstepid,name,filteringattributes",
                    "$filter": f"_eventhandler_value eq {endpoint_id} and _sdkmessageid_value eq {message_id} and "
                    f"_sdkmessagefilterid_value eq {filter_id}",
                },
            )
        )
        if existing:
            step_id = existing[0]["sdkmessageprocessingstepid"]
            if message == "Update" and (existing[0].get("filteringattributes") or "") != attributes:
                client.request(
                    "PATCH", f"{API}/sdkmessageprocessingsteps({step_id})", json={"filteringattributes": attributes}
                )
                return f"step {message} of {ENTITY} ({step_id}) exists: filtering attributes updated"
            return f"step {message} of {ENTITY} ({step_id}) exists"
        step: dict[str, Any] = {
            "name": f"{self.endpoint_name()}: {message} of {ENTITY}",
            "description": "oppsync: tells the webhook receiver which opportunity changed",
            "mode": MODE_ASYNC,
            "stage": STAGE_POST_OPERATION,
            "rank": 1,
            "supporteddeployment": 0,  # server only
            "asyncautodelete": True,  # successful system jobs are deleted; failed ones stay to be inspected
            "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
            "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
            "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({filter_id})",
        }
        if attributes:
            step["filteringattributes"] = attributes
        step_id = _created_id(client.request("POST", f"{API}/sdkmessageprocessingsteps", json=step))
        return f"step {message} of {ENTITY} ({step_id}) created: asynchronous, post-operation"


def _parsed(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _ms_date(value: Any) -> datetime | None:
    """`/Date(1506409448000-0700)/`: milliseconds since the epoch (UTC; the offset is informative), naive UTC."""
    m = MS_DATE.match(value) if isinstance(value, str) else None
    if not m:
        return None
    try:
        return datetime.fromtimestamp(int(m.group(1)) / 1000, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return None


def _lit(text: str) -> str:
    """An OData string literal (single quotes doubled; the client percent-encodes the query)."""
    return "'" + text.replace("'", "''") + "'"


def _rows(body: Any) -> list[dict[str, Any]]:
    value = body.get("value") if isinstance(body, dict) else None
    if not isinstance(value, list):
        raise RuntimeError("Dataverse answered a collection query without a `value` list")
    return [r for r in value if isinstance(r, dict)]


def _created_id(response: Any) -> str:
    """The new record's id: from `OData-EntityId` (204) or the body (201 with return=representation)."""
    m = re.search(r"\(([0-9a-fA-F-]{36})\)\s*$", response.headers.get("OData-EntityId", ""))
    if m:
        return m.group(1).lower()
    try:
        body = response.json()
    except ValueError:
        body = {}
    for key in ("serviceendpointid", "sdkmessageprocessingstepid"):
        if isinstance(body, dict) and body.get(key):
            return str(body[key]).lower()
    raise RuntimeError("Dataverse created a record without saying its id (no OData-EntityId)")


def _safe(url: str) -> str:
    return url.split("?", 1)[0]
