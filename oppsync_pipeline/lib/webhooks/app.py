"""The webhook receiver: a Starlette app (served by uvicorn, `oppsync webhooks serve`).

`POST /webhooks/{connection}`, for each connection with `webhooks.enabled`. In order, before any work:
unknown connection 404; over the rate limit for this sender 429; body over `webhooks.max_body_bytes` 413; not
signed / authenticated as the CRM does it 401; malformed 400. Then the notifications go to the inbox (a replayed
event id is stored once) and the CRM gets its answer, in milliseconds: the sync is the sensor's job.

Logs never carry the query string (Dataverse's WebhookKey travels as `?code=`), headers or bodies.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oppsync_pipeline.lib.config import ConfigError, OppsyncConfig, resolve_refs
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Refused, WebhookReceiver

log = logging.getLogger("oppsync.webhooks")


def receivers_for(cfg: OppsyncConfig) -> dict[str, WebhookReceiver]:
    """A receiver per connection with webhooks enabled; configuration problems are raised together."""
    from oppsync_pipeline.lib.crm.registry import spec

    out, problems = {}, []
    for conn in cfg.connections:
        if not conn.webhooks.enabled:
            continue
        s = spec(conn.crm)
        if not s.webhooks:
            problems.append(
                f"connections.{conn.name}.webhooks.enabled: {conn.crm} sends no opportunity webhooks "
                f"({s.webhooks_note or 'polling only'}); remove it: the hourly schedule syncs this connection"
            )
            continue
        cls = s.webhook_receiver_class()
        missing = cls.problems(conn)
        if missing:
            problems += missing
            continue
        try:
            secrets = resolve_refs(cfg, conn.webhooks.secrets, f"connections.{conn.name}.webhooks.secrets")
        except ConfigError as err:
            problems += err.problems
            continue
        out[conn.name] = cls(conn, secrets)
    if problems:
        raise ConfigError(problems)
    return out


class RateLimit:
    """At most `per_minute` requests per (connection, sender) in any 60 s (a sliding window)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._seen: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def allow(self, key: tuple[str, str], now: float) -> bool:
        window = self._seen[key]
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= self.per_minute:
            return False
        window.append(now)
        return True


def create_app(cfg: OppsyncConfig, receivers: Mapping[str, WebhookReceiver] | None = None) -> Starlette:
    receivers = dict(receivers if receivers is not None else receivers_for(cfg))
    engine = inbox.engine_for(cfg)
    limit = RateLimit(cfg.webhooks.rate_limit_per_minute)
    max_body = cfg.webhooks.max_body_bytes
    public = (cfg.webhooks.public_url or "").rstrip("/")

    async def receive(request: Request) -> Response:
        name = request.path_params["connection"]
        receiver = receivers.get(name)
        if receiver is None:
            return _refuse(404, name, "no connection with webhooks enabled by that name")
        client = request.client.host if request.client else "?"
        if not limit.allow((name, client), time.monotonic()):
            return _refuse(429, name, f"more than {cfg.webhooks.rate_limit_per_minute} requests a minute from {client}")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return _refuse(413, name, f"body of {declared} bytes declared; the limit is {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return _refuse(413, name, f"body over {max_body} bytes")
        query = request.url.query
        url = (public + request.url.path if public else str(request.url).split("?", 1)[0]) + (
            f"?{query}" if query else ""
        )
        incoming = IncomingRequest(
            method=request.method,
            url=url,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=bytes(body),
            client=client,
        )
        try:
            await run_in_threadpool(receiver.verify, incoming)
            notes = receiver.notifications(incoming)
        except Refused as refused:
            return _refuse(refused.status, name, refused.reason)
        new, repeated = await run_in_threadpool(inbox.add, engine, name, receiver.crm, notes, _now())
        log.info("%s: %d notification(s) stored, %d already received", name, new, repeated)
        reply = receiver.reply(incoming, notes)
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "connections": sorted(receivers)})

    return Starlette(
        routes=[
            Route("/webhooks/{connection}", receive, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )


def _refuse(status: int, connection: str, reason: str) -> Response:
    log.warning("%s: refused with %d: %s", connection, status, reason)
    return JSONResponse({"error": _REASONS.get(status, "refused")}, status_code=status)


# what a refused sender is told (the reason, which may describe the expected signature, stays in our log)
_REASONS = {
    400: "malformed notification",
    401: "not signed or authenticated as expected",
    404: "unknown endpoint",
    413: "body too large",
    429: "too many requests",
}


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def serve(cfg: OppsyncConfig, host: str | None = None, port: int | None = None) -> Any:
    import uvicorn

    app = create_app(cfg)
    # access_log off: uvicorn's access log prints the query string, where Dataverse sends its WebhookKey
    return uvicorn.run(
        app, host=host or cfg.webhooks.host, port=port or cfg.webhooks.port, access_log=False, log_level="warning"
    )
