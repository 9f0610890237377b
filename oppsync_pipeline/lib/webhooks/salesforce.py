"""Salesforce change notifications: Outbound Messages (SOAP) and Flow HTTP callouts, on one endpoint.

Legend as in docs/crm-write-webhook-notes.md: [K] vendor docs, [S] client / integration code or threads, [U]
unconfirmed.

Which kind a request is: its Content-Type. `text/xml` is an Outbound Message, `application/json` a Flow HTTP
callout; anything else is refused (400) before it is parsed.

(A) Outbound Messages, the no-code feed: an action of a record-triggered Flow (or a legacy workflow rule).
- Request: `POST`, `Content-Type: text/xml; charset=utf-8`, a SOAP 1.1 envelope whose body is `notifications`
  (namespace http://soap.sforce.com/2005/09/outbound) with `OrganizationId`, `ActionId`, `SessionId` (nillable),
  `EnterpriseUrl`, `PartnerUrl` and `Notification` x 1..100, each `Id` (the notification's id) and `sObject
  xsi:type="sf:Opportunity"` (sf = urn:sobject.enterprise.soap.sforce.com) carrying the fields chosen in the
  message, `sf:Id` among them. [K] developer.salesforce.com/docs/atlas.en-us.api.meta/api/
  sforce_api_om_outboundmessaging_wsdl.htm ("Understanding the Outbound Messaging WSDL"). The generated WSDL types
  ids as 18 characters (`ent:ID`, pattern [a-zA-Z0-9]{18}) [S: a published org's workflowOutboundMessage.wsdl];
  15-character ids are accepted and compared in their 18-character form anyway.
- Authenticity: **no signature.** Salesforce's advice: accept only Salesforce's IP ranges (which "doesn't guarantee
  that another customer isn't pointing to your endpoint"), use TLS, optionally require Salesforce's client
  certificate, and "validate that messages contain your organization Id". [K] .../sforce_api_om_outboundmessaging_
  security.htm. Here: `OrganizationId` must equal `webhooks.options.organization_id` (401 otherwise) and, when
  `options.allowed_networks` lists CIDRs, the sender's address must be in one (401 otherwise). The client
  certificate is the TLS terminator's job (docs/crms/salesforce.md, Webhooks).
- Reply: HTTP 200 with the `notificationsResponse` / `<Ack>true</Ack>` envelope below; one Ack covers every
  notification of the message, anything else is a failed delivery. [K] ..._wsdl.htm (notificationsResponse); the
  literal envelope [S] (listeners in the wild, e.g. sfdcarjuna.com "Outbound Messaging").
- Delivery: up to 100 notifications per message; queued and retried until 24 h old with exponential backoff up to
  2 h between tries; out of order; "can sometimes be delivered more than one time: check the notification IDs";
  the record's data as it is when sent, and a record deleted before delivery gives a notification "with no data".
  [K] .../sforce_api_om_outboundmessaging_notifications.htm and help "Considerations for Outbound Messages"
  (timeout 60 s). Dedupe key: the notification `Id`. What "no data" looks like on the wire (an sObject without
  sf:Id?) is [U]: such a notification is kept with no ids (kind "unknown"), and the sync's schedule reconciles.
- Parsing: defusedxml (no DTD, no entity expansion, no external references): a DOCTYPE or entity is 400.

(B) Flow HTTP callouts: the user's own Flow posts JSON through a Named Credential whose External Credential adds a
shared-secret header. [K] help "Guidelines for Authenticating HTTP Callout Actions" (named + external credential);
custom headers on a named credential [K] Apex guide "Custom Headers and Bodies of Apex Callouts That Use Named
Credentials". Salesforce defines no payload, so the shape is ours (docs/crms/salesforce.md, Webhooks):
  {"eventId": "<unique per change, e.g. {!$Flow.InterviewGuid}>", "recordIds": ["006..."],
   "objectType": "Opportunity" (optional), "changeType": "created|updated|deleted" (optional),
   "organizationId": "00D..." (optional; checked when present)}
- Header `options.flow_secret_header` (default `X-Oppsync-Secret`) must equal `webhooks.secrets.flow_secret`,
  compared in constant time; without a configured `flow_secret` every JSON request is refused (401). Retries are
  whatever the Flow does (a fault path) [U]; the reply is 200 `{"accepted": n}` (a Flow HTTP callout action is
  built from a sample JSON response [K: flow_http_callout_configure]).

Opportunity ids are keyed as the connector keys them (`Opportunity.Id` as the REST API returns it: 18 characters).
Registration: Salesforce has no REST API that creates an outbound message or a Flow [K: outbound messages are
set up in Setup, `sforce_api_om_outboundmessaging_setting_up.htm`; Metadata API deploys are out of scope], so
`register` prints the setup steps (and reads the org's id through the API when the API user may read Organization).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import TYPE_CHECKING, Any, ClassVar
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.webhooks.receiver import (
    IncomingRequest,
    Notification,
    Refused,
    Reply,
    WebhookReceiver,
    same_secret,
)

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
SOBJECT = "urn:sobject.enterprise.soap.sforce.com"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
# The acknowledgement Salesforce waits for (HTTP 200, text/xml): one for the whole message.
ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}"><soapenv:Body>'
    f'<notificationsResponse xmlns="{OUTBOUND}"><Ack>true</Ack></notificationsResponse>'
    "</soapenv:Body></soapenv:Envelope>"
).encode()
MAX_NOTIFICATIONS = 100  # per outbound message [K]
MAX_FLOW_IDS = 200  # per Flow callout: ours (a Flow collection of one transaction's records)
DEFAULT_SECRET_HEADER = "X-Oppsync-Secret"
OPTIONS = ("organization_id", "allowed_networks", "flow_secret_header")
KINDS = ("created", "updated", "deleted")

_ID = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_OPPORTUNITY_PREFIX = "006"  # Opportunity's key prefix [K: "Standard Field Record ID Prefix Decoder"]


def id18(value: str) -> str | None:
    """The 18-character form of a Salesforce id (15 case-sensitive characters + a 3-character case checksum), or
    None when `value` is no id: wrong length or characters, or an 18-character id whose checksum does not fit."""
    if not isinstance(value, str) or not _ID.match(value):
        return None
    head = value[:15]
    suffix = ""
    for i in range(3):
        bits = sum(1 << j for j, ch in enumerate(head[i * 5 : (i + 1) * 5]) if "A" <= ch <= "Z")
        suffix += _SUFFIX[bits]
    if len(value) == 18 and value[15:].upper() != suffix:
        return None
    return head + suffix


class SalesforceReceiver(WebhookReceiver):
    crm = "salesforce"
    # Outbound messages carry no secret; `flow_secret` is needed only for Flow HTTP callouts (optional).
    secret_keys: ClassVar[tuple[str, ...]] = ()
    optional_secret_keys: ClassVar[tuple[str, ...]] = ("flow_secret",)

    def __init__(self, conn: ConnectionConfig, secrets: dict[str, str]):
        super().__init__(conn, secrets)
        self.organization_id = id18(str(self.options.get("organization_id", "")))
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.options.get("allowed_networks") or []]
        self.secret_header = str(self.options.get("flow_secret_header") or DEFAULT_SECRET_HEADER)

    @classmethod
    def problems(cls, conn: ConnectionConfig) -> list[str]:
        where = f"connections.{conn.name}.webhooks"
        options, out = conn.webhooks.options, []
        org = options.get("organization_id")
        if org is None:
            out.append(
                f"{where}.options.organization_id: missing; outbound messages carry no signature, the org's id "
                "(Setup > Company Information > Salesforce.com Organization ID) is what tells them apart"
            )
        elif id18(str(org)) is None or not str(org).startswith("00D"):
            out.append(f"{where}.options.organization_id: '{org}' is not an organization id (00D + 12 or 15 more)")
        networks = options.get("allowed_networks")
        if networks is not None:
            if not isinstance(networks, list) or not networks:
                out.append(f"{where}.options.allowed_networks: a non-empty list of CIDRs (Salesforce's IP ranges)")
            else:
                for n in networks:
                    try:
                        ipaddress.ip_network(str(n), strict=False)
                    except ValueError:
                        out.append(f"{where}.options.allowed_networks: '{n}' is not an IP network")
        header = options.get("flow_secret_header")
        if header is not None and (not isinstance(header, str) or not re.fullmatch(r"[A-Za-z0-9-]+", header)):
            out.append(f"{where}.options.flow_secret_header: '{header}' is not an HTTP header name")
        out += [f"{where}.options.{k}: unknown; Salesforce knows {list(OPTIONS)}" for k in options if k not in OPTIONS]
        known = cls.secret_keys + cls.optional_secret_keys
        out += [
            f"{where}.secrets.{k}: unknown; Salesforce knows {list(known)}"
            for k in conn.webhooks.secrets
            if k not in known
        ]
        return out

    # -- verify -------------------------------------------------------------------------------------------------

    def verify(self, request: IncomingRequest) -> None:
        if self.networks and not self._from_allowed_network(request.client):
            raise Refused(401, f"sender {request.client} is not in options.allowed_networks")
        kind = _kind(request)
        if kind == "soap":
            org = _envelope(request.body).findtext(f"{{{OUTBOUND}}}OrganizationId")
            given = id18((org or "").strip())
            if given is None or self.organization_id is None or not same_secret(given, self.organization_id):
                raise Refused(401, "OrganizationId is missing or not this connection's options.organization_id")
            return
        expected = self.secrets.get("flow_secret")
        if not expected:
            raise Refused(401, "a Flow callout (JSON), but webhooks.secrets.flow_secret is not configured")
        if not same_secret(request.header(self.secret_header), expected):
            raise Refused(401, f"header {self.secret_header} missing or not webhooks.secrets.flow_secret")

    def _from_allowed_network(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in n for n in self.networks)

    # -- notifications ------------------------------------------------------------------------------------------

    def notifications(self, request: IncomingRequest) -> list[Notification]:
        if _kind(request) == "soap":
            return _outbound_notifications(_envelope(request.body))
        return self._flow_notifications(request.body)

    def _flow_notifications(self, body: bytes) -> list[Notification]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "a Flow callout whose body is not JSON") from None
        if not isinstance(data, dict):
            raise Refused(400, "a Flow callout body must be a JSON object {eventId, recordIds}")
        event_id, ids = data.get("eventId"), data.get("recordIds")
        if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > 200:
            raise Refused(400, "eventId must be a non-empty string (e.g. {!$Flow.InterviewGuid})")
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_FLOW_IDS:
            raise Refused(400, f"recordIds must be a list of 1..{MAX_FLOW_IDS} record ids")
        org = data.get("organizationId")
        if org is not None and (self.organization_id is None or id18(str(org)) != self.organization_id):
            raise Refused(400, "organizationId is not this connection's options.organization_id")
        change = data.get("changeType", "updated")
        kind = change.lower() if isinstance(change, str) and change.lower() in KINDS else "unknown"
        if data.get("objectType", "Opportunity") != "Opportunity":
            return []
        keyed = []
        for raw in ids:
            full = id18(raw) if isinstance(raw, str) else None
            if full is None:
                raise Refused(400, "recordIds holds something that is not a Salesforce id")
            if full.startswith(_OPPORTUNITY_PREFIX):
                keyed.append(full)
        return [Notification(event_id.strip(), tuple(dict.fromkeys(keyed)), kind)] if keyed else []

    # -- reply / register ---------------------------------------------------------------------------------------

    def reply(self, request: IncomingRequest, notifications: list[Notification]) -> Reply:
        if _kind(request) == "soap":
            return Reply(200, ACK, "text/xml; charset=utf-8")
        return Reply(200, json.dumps({"accepted": len(notifications)}).encode(), "application/json")

    def register(self, connector: CrmConnector, public_url: str) -> list[str]:
        org = self._org_id_of(connector)
        configured = self.organization_id
        name = self.conn.name
        lines = [
            f"{name}: Salesforce has no API that creates an outbound message or a Flow; set one up in Setup:",
            "Outbound Message (no code; recommended):",
            "  1. Setup > Outbound Messages (Quick Find) > New Outbound Message: object Opportunity; Endpoint URL "
            f"{public_url}; user to send as: the integration user; fields: Id (also Name, StageName, Amount, "
            "CloseDate if you like: oppsync reads the record again by Id); leave 'Send Session ID' off.",
            "  2. Setup > Flows > New > Record-Triggered Flow on Opportunity, 'A record is created or updated', "
            "optimized for Actions and Related Records; add an Action element: Outbound Message > the message of "
            "step 1; activate.",
            f"  3. In oppsync.yaml: connections.{name}.webhooks.options.organization_id: "
            f"{org or '<Setup > Company Information > Salesforce.com Organization ID>'}",
            "  4. Optional: allow only Salesforce's IP ranges (help article 000321501) in "
            f"connections.{name}.webhooks.options.allowed_networks, and require Salesforce's client certificate "
            "at your TLS terminator.",
            "  5. Setup > Outbound Messages > 'View Message Delivery Status' lists pending and failing deliveries "
            "(retried for 24 h).",
            "Or a Flow HTTP callout (JSON, shared-secret header):",
            f"  1. External Credential (Custom protocol) with a principal parameter holding the value of "
            f"connections.{name}.webhooks.secrets.flow_secret, and a custom header {self.secret_header} = that "
            f"parameter; a Named Credential for {public_url.rsplit('/webhooks/', 1)[0]} using it; grant the "
            "principal to the Flow's running user with a permission set.",
            f"  2. Flow HTTP Callout action: POST /webhooks/{name}, body "
            '{"eventId": "{!$Flow.InterviewGuid}", "recordIds": ["{!$Record.Id}"], "objectType": "Opportunity"}, '
            'sample response {"accepted": 1}; call it from the Run Asynchronously path of a record-triggered Flow '
            "on Opportunity.",
        ]
        if org and configured and org != configured:
            lines.append(
                f"WARNING: options.organization_id is {configured}, but this connection's org is {org}: every "
                "outbound message would be refused (401)"
            )
        return lines

    @staticmethod
    def _org_id_of(connector: Any) -> str | None:
        """The org's id as the API says it (`SELECT Id FROM Organization`), or None when the API user may not
        read Organization or the API is unreachable (the steps then say where to find it)."""
        from oppsync_pipeline.lib.crm.http import CrmError, RetryableHttpError

        try:
            for rows in connector.query("SELECT Id FROM Organization"):
                for r in rows.records:
                    return id18(str(r["Id"]))
        except (CrmError, RetryableHttpError, OSError, AttributeError):
            return None
        return None


def _kind(request: IncomingRequest) -> str:
    media = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    if media == "text/xml":
        return "soap"
    if media == "application/json":
        return "flow"
    raise Refused(400, f"Content-Type '{media[:60]}' is neither text/xml (outbound message) nor application/json")


def _envelope(body: bytes) -> Element:
    """The `notifications` element of an outbound message (400 when the body is not one)."""
    try:
        root = fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DefusedXmlException, ParseError, ValueError):
        raise Refused(400, "not well-formed XML, or XML with a DTD / entities (refused unparsed)") from None
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        raise Refused(400, "not a SOAP 1.1 envelope")
    found = root.find(f"{{{SOAP_ENV}}}Body/{{{OUTBOUND}}}notifications")
    if found is None:
        raise Refused(400, "the SOAP body holds no outbound-messaging notifications element")
    return found


def _outbound_notifications(root: Element) -> list[Notification]:
    items = root.findall(f"{{{OUTBOUND}}}Notification")
    if not items or len(items) > MAX_NOTIFICATIONS:
        raise Refused(400, f"an outbound message holds 1..{MAX_NOTIFICATIONS} Notification elements")
    out: list[Notification] = []
    for item in items:
        nid = (item.findtext(f"{{{OUTBOUND}}}Id") or "").strip()
        if id18(nid) is None:
            raise Refused(400, "a Notification without a valid Id")
        sobject = item.find(f"{{{OUTBOUND}}}sObject")
        if sobject is None:
            raise Refused(400, "a Notification without sObject")
        declared = sobject.get(f"{{{XSI}}}type", "")
        record = (sobject.findtext(f"{{{SOBJECT}}}Id") or "").strip()
        if not record:  # the record was deleted before delivery: "the notification contains no data" [K]
            if declared.rpartition(":")[2] in ("Opportunity", ""):
                out.append(Notification(nid, (), "unknown"))
            continue
        full = id18(record)
        if full is None:
            raise Refused(400, "an sObject whose sf:Id is not a Salesforce id")
        if declared.rpartition(":")[2] != "Opportunity" or not full.startswith(_OPPORTUNITY_PREFIX):
            continue  # another object's message sent to this endpoint: not ours to sync
        out.append(Notification(nid, (full,), "updated"))
    return out
