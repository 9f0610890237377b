"""ConnectWise PSA (Manage) callbacks: `/system/callbacks` notifications, verified as ConnectWise signs them.

Vendor facts (legend of docs/crm-write-webhook-notes.md: [K] vendor text, [S] widely used client code, [U] not
confirmed; §4.2 there):
- Subscription: `POST /system/callbacks` `{url, objectId, type: "opportunity", level: "owner", description,
  inactiveFlag}` -> a CallbackEntry `{id, url, objectId, type, level, memberId, payloadVersion ("3.0.0"),
  inactiveFlag, isSoapCallbackFlag, isSelfSuppressedFlag, connectWiseID, _info}`; listed with `GET
  /system/callbacks?conditions=...`, changed with a JSON Patch, removed with DELETE. Level `owner` covers every
  opportunity; `status` / `company` / `opportunity` narrow it by `objectId` [K: a copy of CW's "PSA Callbacks"
  page; S: pyconnectwise CallbackEntry, amp-labs/connectors providers/connectwise/internal/subscriber (a create
  sent with objectId 0 came back with objectId 1; django-connectwise registers owner callbacks with objectId 1)].
  A bad level is 400 `{code: InvalidObject, message: "callbackEntry object is invalid", errors: [...
  "Unrecognized level for type ..."]}` [S: amp-labs create-webhook-bad-request-1.json].
- `isSelfSuppressedFlag`: the callback's creator (`memberId`, here the API member) gets no callbacks for its own
  changes [S: amp-labs' CallbackEntry comment; no vendor text]. Off by default (`options.self_suppressed`): the
  sync wants to see the revenue our own write-back put there.
- The callback URL: both django-connectwise (`.../callback/?id=`) and amp-labs (`...?recordId=`) register URLs
  ending in a query parameter, because CW appends the record id to the URL [S; U whether it appends to a URL
  that does not end in `=`]. `register` therefore registers `<public_url>?id=`; the id read is the body's `ID`.
- Payload, one record per request: `{"MessageId", "FromUrl", "CompanyId", "MemberId", "Action":
  "added"|"updated"|"deleted", "Type": "opportunity", "ID": 123, "ProductInstanceId", "PartnerId",
  "CallbackObjectRecId", "Entity": "<the record as a JSON string>", "Metadata": {"key_url": "https://<host>/
  <codebase>/system/callbackkey/index.rails?companyName=...&id=<guid>"}}`; `Entity` is null on deletes in
  amp-labs' fixture [S: amp-labs providers/connectwise/internal/webhook/test/contact-*.json; NangoHQ/nango
  packages/server/lib/webhook/types.ts].
- Signature: header `x-content-signature` = base64(HMAC-SHA256(key = SHA-256 digest of the signing key, message =
  the raw body)); the signing key is `{"signing_key": "..."}` from `GET Metadata.key_url`, fetched without the
  API credentials [S: three independent implementations agree: NangoHQ/nango connectwise-psa-webhook-routing.ts
  (+ its unit test), amp-labs internal/webhook/verifier.go, a Go PSA client's ValidateWebhook]. The vendor's
  own wording of the scheme was not found [U].
- The key URL comes from the (not yet verified) body, so it is only fetched from allowed hosts: `options.key_hosts`,
  by default the connection's base_url host and CW's cloud API hosts (`api-*`, `sandbox-*`, `na` / `eu` / `au`
  `.myconnectwise.net`, Nango's trusted list [S]); https only (plain http only for the base_url's own host, the
  sandbox), no user info, no redirects followed, a 64 KiB answer at most. Keys are cached per URL; a signature
  that does not match a key cached longer than `options.key_refresh_seconds` (300) refetches it once (rotation [U]).
- Any signed callback of another ConnectWise company (its own key URL on the same cloud host) is refused after
  verification: `CompanyId` must equal the connection's company (`options.company_id`, else the connection's
  `company_id` credential from the environment).
- Reply: any 2xx (django-connectwise answers 204) [S]; timeout and redelivery are not documented [U]: the hourly
  sync catches what is lost. Dedupe key: `MessageId` [S/U].
- `webhooks.secrets`: none (the key is fetched per callback).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import requests

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.http import CrmSession
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Notification, Refused, WebhookReceiver, same_secret

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector

log = logging.getLogger("oppsync.webhooks.connectwise")

SIGNATURE_HEADER = "x-content-signature"
# CW's cloud API hosts a key URL may name (NangoHQ/nango's TRUSTED_CONNECTWISE_SUBDOMAINS); `*` is one DNS label
CLOUD_KEY_HOSTS = ("api-*.myconnectwise.net", "sandbox-*.myconnectwise.net", "na.myconnectwise.net",
                   "eu.myconnectwise.net", "au.myconnectwise.net")  # fmt: skip
MAX_KEY_ANSWER = 64 * 1024
KEY_CACHE_SIZE = 64
KINDS = {"added": "created", "updated": "updated", "deleted": "deleted"}
OPTIONS = {
    "key_hosts": "hosts the signing key may be fetched from (`*` = one DNS label; host:port for a non-default port)",
    "company_id": "the ConnectWise company id callbacks must carry (default: the connection's company_id credential)",
    "key_refresh_seconds": "refetch a cached key after a mismatch once it is this old (default 300)",
    "self_suppressed": "register the callback with isSelfSuppressedFlag: no callbacks for the API member's own changes",
    "description": "the callback's description in ConnectWise",
}


class ConnectWiseReceiver(WebhookReceiver):
    crm = "connectwise"
    secret_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, conn: ConnectionConfig, secrets: Any, *, session: requests.Session | None = None):
        super().__init__(conn, secrets)
        self.session = session or CrmSession()
        base = urlsplit(conn.base_url)
        self._base_host = _netloc(base)
        self._base_scheme = base.scheme
        hosts = self.options.get("key_hosts") or [self._base_host, *CLOUD_KEY_HOSTS]
        self._hosts = [_host_pattern(h) for h in hosts]
        self.refresh_after = float(self.options.get("key_refresh_seconds", 300))
        self.company = self.options.get("company_id") or _credential_from_env(conn, "company_id")
        if not self.company:
            log.warning(
                "%s: no company id to check callbacks against (options.company_id or the company_id credential)",
                conn.name,
            )
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key URL -> (signing key, fetched at)
        self._lock = threading.Lock()

    @classmethod
    def problems(cls, conn: ConnectionConfig) -> list[str]:
        out = super().problems(conn)
        opts = conn.webhooks.options
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            out.append(f"connections.{conn.name}.webhooks.options: unknown {unknown}; known: {sorted(OPTIONS)}")
        hosts = opts.get("key_hosts")
        if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts)):
            out.append(f"connections.{conn.name}.webhooks.options.key_hosts: a list of host names")
        refresh = opts.get("key_refresh_seconds", 300)
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh < 0:
            out.append(f"connections.{conn.name}.webhooks.options.key_refresh_seconds: a number of seconds >= 0")
        if not isinstance(opts.get("self_suppressed", False), bool):
            out.append(f"connections.{conn.name}.webhooks.options.self_suppressed: true or false")
        return out

    # -- verification -------------------------------------------------------------------------------------------

    def verify(self, request: IncomingRequest) -> None:
        given = request.header(SIGNATURE_HEADER)
        if not given:
            raise Refused(401, f"no {SIGNATURE_HEADER} header")
        body = _json(request.body)
        meta = body.get("Metadata") if isinstance(body, dict) else None
        key_url = meta.get("key_url") if isinstance(meta, dict) else None
        if not isinstance(key_url, str) or not key_url:
            raise Refused(401, "no Metadata.key_url in the body: nothing to verify the signature with")
        self._check_key_url(key_url)
        key, fetched_at = self._key(key_url)
        if not _matches(given, key, request.body):
            if time.monotonic() - fetched_at < self.refresh_after:
                raise Refused(401, f"{SIGNATURE_HEADER} does not match the body and the key at {_host(key_url)}")
            key, _ = self._key(key_url, refresh=True)  # the key may have been rotated
            if not _matches(given, key, request.body):
                raise Refused(401, f"{SIGNATURE_HEADER} does not match the body and the key at {_host(key_url)}")
        # authentic from CW: whose tenant sent it (another company's callback, signed with its own key)
        company = body.get("CompanyId")
        if self.company and (not isinstance(company, str) or company.casefold() != str(self.company).casefold()):
            raise Refused(401, f"a callback of ConnectWise company {company!r}, not this connection's")

    def _check_key_url(self, key_url: str) -> None:
        try:
            parts = urlsplit(key_url)
            netloc = _netloc(parts)
        except ValueError:
            raise Refused(401, "Metadata.key_url is not a URL") from None
        if parts.username or parts.password or parts.fragment or not parts.hostname:
            raise Refused(401, "Metadata.key_url carries user info or a fragment, or no host")
        plain_ok = parts.scheme == "http" and self._base_scheme == "http" and netloc == self._base_host
        if parts.scheme != "https" and not plain_ok:
            raise Refused(401, f"Metadata.key_url is not https ({parts.scheme})")
        if not any(p.fullmatch(netloc) for p in self._hosts):
            raise Refused(401, f"Metadata.key_url names host {netloc}, not one of options.key_hosts")

    def _key(self, key_url: str, *, refresh: bool = False) -> tuple[str, float]:
        with self._lock:
            cached = self._keys.get(key_url)
            if cached is not None and not refresh:
                return cached
        key = self._fetch_key(key_url)
        entry = (key, time.monotonic())
        with self._lock:
            self._keys[key_url] = entry
            self._keys.move_to_end(key_url)
            while len(self._keys) > KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return entry

    def _fetch_key(self, key_url: str) -> str:
        host = _host(key_url)
        try:
            with self.session.get(
                key_url, timeout=(5, 10), allow_redirects=False, stream=True, headers={"Accept": "application/json"}
            ) as r:
                raw = r.raw.read(MAX_KEY_ANSWER + 1, decode_content=True)
                status = r.status_code
        except requests.RequestException as err:
            raise Refused(503, f"signing key at {host} unreachable ({type(err).__name__})") from None
        if status >= 500 or status == 429:
            raise Refused(503, f"signing key at {host} answered {status}; ConnectWise may send the callback again")
        if status != 200 or len(raw) > MAX_KEY_ANSWER:
            raise Refused(401, f"signing key at {host} answered {status} ({len(raw)} bytes): not a callback key")
        answer = _json(raw)
        key = answer.get("signing_key") if isinstance(answer, dict) else None
        if not isinstance(key, str) or not key:
            raise Refused(401, f"signing key at {host}: the answer has no signing_key")
        return key

    # -- what the callback says -----------------------------------------------------------------------------------

    def notifications(self, request: IncomingRequest) -> list[Notification]:
        body = _json(request.body)
        if not isinstance(body, dict) or not isinstance(body.get("Type"), str):
            raise Refused(400, "not a ConnectWise callback: no Type")
        if body["Type"].casefold() != "opportunity":
            return []
        message_id, action, record = body.get("MessageId"), body.get("Action"), body.get("ID")
        if not isinstance(message_id, str) or not message_id:
            raise Refused(400, "callback without MessageId")
        if not isinstance(action, str):
            raise Refused(400, "callback without Action")
        if isinstance(record, bool) or not (isinstance(record, int) or (isinstance(record, str) and record.isdigit())):
            raise Refused(400, "callback without a numeric ID")
        return [Notification(message_id, (str(int(record)),), KINDS.get(action.casefold(), "unknown"), _when(body))]

    # -- registration ---------------------------------------------------------------------------------------------

    def register(self, connector: CrmConnector, public_url: str) -> list[str]:
        from oppsync_pipeline.lib.crm.connectwise import quote_string

        url = callback_url(public_url)
        path = connector.api("/system/callbacks")  # type: ignore[attr-defined]
        conditions = f'url={quote_string(url)} and type="opportunity" and level="owner"'
        rows = connector.client.get_json(path, params={"conditions": conditions, "pageSize": 1000}) or []
        same = [
            r
            for r in rows
            if isinstance(r, dict)
            and r.get("url") == url
            and str(r.get("type", "")).casefold() == "opportunity"
            and str(r.get("level", "")).casefold() == "owner"
        ]
        active = [r for r in same if not r.get("inactiveFlag")]
        notes = [
            "ConnectWise signs each callback with the key at its Metadata.key_url: no webhooks.secrets to set",
        ]
        if active:
            extra = (
                f" ({len(active) - 1} more with the same URL: delete them in ConnectWise)" if len(active) > 1 else ""
            )
            return [
                f"reused ConnectWise callback {active[0]['id']} (opportunity, owner) posting to {url}{extra}",
                *notes,
            ]
        if same:
            cid = same[0]["id"]
            connector.client.request(
                "PATCH", f"{path}/{cid}", json=[{"op": "replace", "path": "inactiveFlag", "value": False}]
            )
            return [f"reactivated ConnectWise callback {cid} (opportunity, owner) posting to {url}", *notes]
        created = connector.client.post_json(
            path,
            {
                "url": url,
                "objectId": 1,  # owner level: every opportunity (CW stores 1 whatever is sent, amp-labs' fixture)
                "type": "opportunity",
                "level": "owner",
                "description": str(self.options.get("description") or f"oppsync {self.conn.name}")[:100],
                "inactiveFlag": False,
                "isSelfSuppressedFlag": bool(self.options.get("self_suppressed", False)),
            },
        )
        return [f"created ConnectWise callback {created.get('id')} (opportunity, owner) posting to {url}", *notes]


def callback_url(public_url: str) -> str:
    """The URL registered with CW: the receiver's endpoint with an `id=` parameter for CW to append the record's
    id to (django-connectwise's and amp-labs' form)."""
    return public_url + ("&" if "?" in public_url else "?") + "id="


def sign(signing_key: str, body: bytes) -> str:
    """`x-content-signature`: base64(HMAC-SHA256(key = SHA-256(signing key), body))."""
    key = hashlib.sha256(signing_key.encode("utf-8")).digest()
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


def _matches(given: str, signing_key: str, body: bytes) -> bool:
    return same_secret(given.strip(), sign(signing_key, body))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _when(body: dict[str, Any]) -> datetime | None:
    """The record's `_info.lastUpdated` from `Entity` (a JSON string), when there is one."""
    entity = body.get("Entity")
    if isinstance(entity, str):
        entity = _json(entity.encode("utf-8"))
    info = entity.get("_info") if isinstance(entity, dict) else None
    value = info.get("lastUpdated") if isinstance(info, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return None


def _netloc(parts: Any) -> str:
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


def _host(url: str) -> str:
    try:
        return _netloc(urlsplit(url)) or "?"
    except ValueError:
        return "?"


def _host_pattern(host: str) -> re.Pattern[str]:
    return re.compile(r"[a-z0-9-]+".join(re.escape(part) for part in host.lower().split("*")))


def _credential_from_env(conn: ConnectionConfig, key: str) -> str | None:
    var = conn.credential_env_vars().get(key)
    return os.environ.get(var) if var else None
