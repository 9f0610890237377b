"""HubSpot app webhooks: `X-HubSpot-Signature-v3` verification, deal events, and registration through the app's
webhooks v3 API (crm-write-webhook-notes.md §2.2).

Signature (v3) [K] developers.hubspot.com/changelog/introducing-version-3-of-webhook-signatures and
developers.hubspot.com/docs/api/webhooks/validating-requests:
- headers `X-HubSpot-Signature-v3` and `X-HubSpot-Request-Timestamp` (epoch milliseconds [S]
  HubSpot/hubspot-api-python `hubspot/utils/signature.py`);
- refuse a timestamp older than 5 minutes; the SDK refuses only stale ones, not future ones [S], and so do we;
- signed text = method + URI + raw body + timestamp (UTF-8), the URI being the full URL HubSpot called (scheme,
  host, path, query: `IncomingRequest.url`, built from `webhooks.public_url` behind a proxy); HMAC-SHA256 keyed
  with the app's client secret, base64. Percent-encoded reserved characters (`%3A` `%2F` `%3F` `%40` `%21`
  `%24` `%27` `%28` `%29` `%2A` `%2C` `%3B`) are decoded in the URI first [S] (notes; C# and TS samples
  decode the whole URI, which is the same for the URLs oppsync registers).
- v1/v2 (`X-HubSpot-Signature`, plain SHA-256, no replay window) are not accepted: v3 is sent on every request
  to apps since 2021 [K] changelog.

Payload [S] NangoHQ/nango `packages/server/lib/webhook/types.ts`, automatelab.tech catalogue, actioner.com
samples: a JSON array (up to 100 events per request [S]) of `{eventId, subscriptionId, portalId, appId,
occurredAt (ms), subscriptionType, attemptNumber, objectId, propertyName?, propertyValue?, changeSource?,
sourceId?, changeFlag?}`; merges add `primaryObjectId`, `mergedObjectIds`, `newObjectId` [K] changelog.
"eventId ... is not guaranteed to be unique" [K] developers.hubspot.com/docs/apps/legacy-apps/public-apps/
create-generic-webhook-subscriptions: the dedupe key is `subscriptionId:eventId`, the same on every retry of
that event (`attemptNumber` grows, so it is not part of the key). Kept: `deal.*` events and generic `object.*`
events with `objectTypeId` `0-3`; the opportunity id is `objectId` as text, the connector's source_id.

Registration [K] HubSpot/HubSpot-public-api-spec-collection `PublicApiSpecs/Webhooks/Webhooks/Rollouts/147891/
v3/webhooks.json`: `GET|PUT /webhooks/v3/{appId}/settings` (`targetUrl`, `throttling.maxConcurrentRequests`;
one target URL per app), `GET|POST /webhooks/v3/{appId}/subscriptions` (`{eventType, propertyName?, active}`;
`active` defaults to false), `PATCH /subscriptions/{id}` to activate. Auth: the developer account's API key as
`?hapikey=` (security `developer_hapikey`) [K]; OAuth developer tokens (`developers-write`) are listed too but
how to obtain one for a legacy public app is [U], so only the key is supported (`webhooks.secrets.
developer_api_key`). Only legacy public apps can be configured through this API; private apps and project apps
are configured in HubSpot's UI / `webhooks-hsmeta.json` [K] docs: `register` then prints those steps.
Delivery timeout and retry window are [U] (notes §2.2: 5 s or less; ~10 retries over ~24 h, one source says
3 days): the receiver answers 204 in milliseconds and the hourly sync catches what is lost.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.http import ApiClient, Auth, CrmError, CrmSession
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Notification, Refused, WebhookReceiver, same_secret

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector

SIGNATURE = "x-hubspot-signature-v3"
TIMESTAMP = "x-hubspot-request-timestamp"
MAX_AGE_MS = 5 * 60 * 1000
DEAL_TYPE_ID = "0-3"
# percent-encodings HubSpot decodes before signing (validating-requests, "Validate the v3 request signature")
DECODED = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
KINDS = {
    "creation": "created",
    "deletion": "deleted",
    "propertyChange": "updated",
    "restore": "created",
    "merge": "updated",
    "associationChange": "updated",
}
# deal properties whose change is a notification: what the sync maps (lib/crm/hubspot.py DEAL_PROPERTIES, the
# calculated ones follow dealstage) plus the connection's `fields:` overrides
WATCHED = ("dealname", "amount", "dealstage", "pipeline", "closedate", "hubspot_owner_id", "deal_currency_code")
OPTIONS = {"app_id", "properties", "max_concurrent_requests", "replace_target_url"}


def signed_uri(url: str) -> str:
    for encoded, char in DECODED.items():
        url = url.replace(encoded, char).replace(encoded.lower(), char)
    return url


def signature_v3(secret: str, method: str, url: str, body: bytes, timestamp: str) -> str:
    """base64(HMAC-SHA256(client secret, method + uri + body + timestamp)), as HubSpot signs a request."""
    text = method.upper().encode() + signed_uri(url).encode("utf-8") + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode("utf-8"), text, hashlib.sha256).digest()).decode()


class HubSpotReceiver(WebhookReceiver):
    crm = "hubspot"
    secret_keys: ClassVar[tuple[str, ...]] = ("client_secret",)
    optional_secret_keys: ClassVar[tuple[str, ...]] = ("developer_api_key",)  # registration of a legacy public app

    def __init__(self, conn: ConnectionConfig, secrets: Mapping[str, str]):
        super().__init__(conn, secrets)
        self.clock: Callable[[], float] = time.time  # seconds since the epoch; tests move it

    @classmethod
    def problems(cls, conn: ConnectionConfig) -> list[str]:
        out = super().problems(conn)
        unknown = sorted(set(conn.webhooks.options) - OPTIONS)
        if unknown:
            out.append(f"connections.{conn.name}.webhooks.options: unknown {unknown}; HubSpot knows {sorted(OPTIONS)}")
        return out

    # -- verify -----------------------------------------------------------------------------------------------------

    def verify(self, request: IncomingRequest) -> None:
        given, stamp = request.header(SIGNATURE), request.header(TIMESTAMP)
        if not given or not stamp:
            raise Refused(401, "X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp missing")
        if not stamp.isdigit():
            raise Refused(401, "X-HubSpot-Request-Timestamp is not epoch milliseconds")
        age = int(self.clock() * 1000) - int(stamp)
        if age > MAX_AGE_MS:
            raise Refused(401, f"X-HubSpot-Request-Timestamp is {age // 1000} s old; at most 300 s is accepted")
        expected = signature_v3(self.secrets["client_secret"], request.method, request.url, request.body, stamp)
        if not same_secret(given, expected):
            raise Refused(
                401,
                "X-HubSpot-Signature-v3 does not match (check webhooks.secrets.client_secret is the app's client "
                "secret, and webhooks.public_url is the URL HubSpot calls)",
            )

    # -- notifications ----------------------------------------------------------------------------------------------

    def notifications(self, request: IncomingRequest) -> list[Notification]:
        try:
            events = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "body is not JSON") from None
        if not isinstance(events, list):
            raise Refused(400, "body is not a JSON array of events")
        out = []
        for i, event in enumerate(events):
            if not isinstance(event, dict):
                raise Refused(400, f"event {i} is not an object")
            kind = _deal_event(event)
            if kind is None:
                continue  # contacts, companies, other objects: not an opportunity
            try:
                out.append(
                    Notification(
                        event_id=f"{_id(event['subscriptionId'])}:{_id(event['eventId'])}",
                        object_ids=_deal_ids(event),
                        kind=kind,
                        occurred_at=_ms(event.get("occurredAt")),
                    )
                )
            except (KeyError, TypeError, ValueError):
                raise Refused(400, f"event {i} lacks subscriptionId, eventId or objectId") from None
        return out

    # -- register ---------------------------------------------------------------------------------------------------

    def watched_properties(self) -> list[str]:
        listed = self.options.get("properties")
        names = list(listed) if listed else [*WATCHED, *self.conn.fields.values()]
        return list(dict.fromkeys(str(n) for n in names))

    def wanted(self) -> list[tuple[str, str | None]]:
        return [
            ("deal.creation", None),
            ("deal.deletion", None),
            *(("deal.propertyChange", p) for p in self.watched_properties()),
        ]

    def register(self, connector: CrmConnector, public_url: str) -> list[str]:
        app_id, key = self.options.get("app_id"), self.secrets.get("developer_api_key")
        if not app_id or not key:
            return self.manual_steps(public_url)
        api = developer_client(connector.client, key)
        base = f"/webhooks/v3/{app_id}"
        lines = []
        try:
            current = api.get_json(f"{base}/settings").get("targetUrl")
        except CrmError as err:
            if err.status != 404:
                raise
            current = None  # no settings yet
        if current != public_url:
            if current and not self.options.get("replace_target_url"):
                return [
                    f"app {app_id} already sends its webhooks to {current}; HubSpot allows one target URL per app",
                    "(every portal that installed the app follows it). Set webhooks.options.replace_target_url: true",
                    "to move it to this receiver, or use another app.",
                ]
            throttling = {"maxConcurrentRequests": int(self.options.get("max_concurrent_requests", 10))}
            api.request("PUT", f"{base}/settings", json={"targetUrl": public_url, "throttling": throttling})
            lines.append(f"app {app_id}: target URL set to {public_url}" + (f" (was {current})" if current else ""))
        else:
            lines.append(f"app {app_id}: target URL already {public_url}")
        existing = {
            (s.get("eventType"), s.get("propertyName") or None): s
            for s in api.get_json(f"{base}/subscriptions").get("results") or []
        }
        for event_type, prop in self.wanted():
            label = event_type + (f" {prop}" if prop else "")
            sub = existing.get((event_type, prop))
            if sub is None:
                body: dict[str, Any] = {"eventType": event_type, "active": True}
                if prop:
                    body["propertyName"] = prop
                created = api.parse_json(api.request("POST", f"{base}/subscriptions", json=body))
                lines.append(f"subscribed to {label} (subscription {created.get('id')})")
            elif not sub.get("active"):
                api.request("PATCH", f"{base}/subscriptions/{sub['id']}", json={"active": True})
                lines.append(f"activated {label} (subscription {sub['id']})")
            else:
                lines.append(f"already subscribed to {label} (subscription {sub['id']})")
        return lines

    def manual_steps(self, public_url: str) -> list[str]:
        props = ", ".join(self.watched_properties())
        return [
            "HubSpot webhooks are configured per app; do it in HubSpot (or set webhooks.options.app_id and",
            "webhooks.secrets.developer_api_key for a legacy public app, and run this again):",
            "1. Development > Apps (or Legacy apps) > your app > Webhooks: Target URL = " + public_url,
            "2. Create subscriptions, all active: deal.creation, deal.deletion, and deal.propertyChange for " + props,
            "3. The app needs scope crm.objects.deals.read; the portal must have installed the app.",
            "4. Copy the app's client secret (Auth tab) into the environment variable that",
            "   webhooks.secrets.client_secret names.",
        ]


class DeveloperKey(Auth):
    """The developer account's API key: sent as `?hapikey=` by `developer_client`, no header."""


def developer_client(client: ApiClient, key: str) -> ApiClient:
    """An ApiClient on the connection's base URL, session, retries and error mapping, authenticated with the
    developer API key instead of the portal's token (the webhooks API belongs to the app, not the portal)."""
    session = CrmSession()
    session.params = {"hapikey": key}  # type: ignore[assignment]
    api = ApiClient(
        base_url=client.base_url,
        auth=DeveloperKey(),
        observe=client.observe,
        classify=client.classify,
        sleep=client.sleep,
        session=session,
        timeout=client.timeout,
    )
    api.scrubber.add_secret(key)
    return api


def _deal_event(event: dict[str, Any]) -> str | None:
    kind = str(event.get("subscriptionType") or "")
    obj, _, action = kind.partition(".")
    if obj == "object" and str(event.get("objectTypeId")) == DEAL_TYPE_ID or obj == "deal":
        return KINDS.get(action, "unknown")
    return None


def _id(value: Any) -> str:
    if value is None or isinstance(value, bool) or str(value).strip() == "":
        raise ValueError("empty id")
    if isinstance(value, float):
        value = int(value)
    return str(value)


def _deal_ids(event: dict[str, Any]) -> tuple[str, ...]:
    ids = [event["objectId"]]
    for key in ("primaryObjectId", "newObjectId"):
        if event.get(key) is not None:
            ids.append(event[key])
    ids += event.get("mergedObjectIds") or []
    return tuple(dict.fromkeys(_id(i) for i in ids))


def _ms(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)
