"""What a CRM's webhook receiver provides (lib/webhooks/<crm>.py), and the request it is given.

A receiver works on the raw request as the CRM sent it: signatures are computed over the exact bytes (and, for
HubSpot, the URL as the CRM saw it), before anything is parsed. It raises `Refused` with the HTTP status to
answer; its reason is logged but never contains the secret or the expected signature.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from oppsync_pipeline.lib.config import ConnectionConfig

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector


class Refused(Exception):
    """The request is not accepted: `status` is answered (401 unsigned or forged, 400 malformed ...)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    url: str  # the full URL as the CRM addressed it (public_url + path + query)
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    client: str  # the sender's address (rate limiting, logs)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Notification:
    """One change the CRM told us about."""

    event_id: str  # the CRM's id of this event (HubSpot eventId, Salesforce Notification Id ...): dedupe key
    object_ids: tuple[str, ...]  # the opportunities concerned, as the sync keys them (source_id); may be empty
    kind: str = "updated"  # created | updated | deleted | unknown
    occurred_at: datetime | None = None


@dataclass
class Reply:
    """What the receiver answers a request it accepted (most CRMs: any 2xx; Salesforce: a SOAP Ack)."""

    status: int = 204
    body: bytes = b""
    media_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class WebhookReceiver(ABC):
    crm: ClassVar[str]
    # keys of `connections[].webhooks.secrets` this CRM's scheme needs (README: Near-real-time syncs)
    secret_keys: ClassVar[tuple[str, ...]] = ()
    # keys a connection may add (used by some features only, e.g. registration through the CRM's API)
    optional_secret_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, conn: ConnectionConfig, secrets: Mapping[str, str]):
        self.conn = conn
        self.secrets = dict(secrets)
        self.options: dict[str, Any] = dict(conn.webhooks.options)

    @abstractmethod
    def verify(self, request: IncomingRequest) -> None:
        """Raise Refused(401, ...) unless the request is signed / authenticated as this CRM does it."""

    @abstractmethod
    def notifications(self, request: IncomingRequest) -> list[Notification]:
        """The verified request's notifications about opportunities (Refused(400) when malformed; events about
        other objects are left out)."""

    def reply(self, request: IncomingRequest, notifications: list[Notification]) -> Reply:
        return Reply()

    @abstractmethod
    def register(self, connector: CrmConnector, public_url: str) -> list[str]:
        """Create the subscription through the CRM's API where it allows it; return what was done, or the manual
        steps where it does not (one line each)."""

    @classmethod
    def problems(cls, conn: ConnectionConfig) -> list[str]:
        """Configuration problems of `conn.webhooks` for this CRM (missing secrets, unknown options)."""
        missing = [k for k in cls.secret_keys if k not in conn.webhooks.secrets]
        return (
            [
                f"connections.{conn.name}.webhooks.secrets: missing {missing}; {cls.crm} signs notifications with "
                f"{list(cls.secret_keys)}"
            ]
            if missing
            else []
        )


def same_secret(given: str | bytes | None, expected: str | bytes) -> bool:
    """Constant-time comparison (signatures, shared secrets)."""
    if given is None:
        return False
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)
