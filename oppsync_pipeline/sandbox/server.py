"""A small HTTP framework for the CRM simulators: routing, JSON, fixed latency, deterministic faults, and
control endpoints (`/__sandbox/...`) so tests and users can move the clock and inject faults from
another process.

The standard library's ThreadingHTTPServer is enough: a thread per connection, so concurrent requests are
served concurrently (the documented concurrency limits, `in_flight`, are enforced per CRM), and keeping them dependency-free lets the same code run in-process (tests, `make run`) and
as `oppsync sandbox serve`.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from oppsync_pipeline.lib.scrub import scrubbed_logger
from oppsync_pipeline.sandbox.kit.limits import InFlight
from oppsync_pipeline.sandbox.kit.snapshots import QueryCache
from oppsync_pipeline.sandbox.world import World

log = scrubbed_logger(__name__)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    raw_path: str = ""
    params: dict[str, str] = field(default_factory=dict)  # from the route pattern

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def host(self) -> str:
        """The Host the client called: links and instance URLs point back at it."""
        return self.headers.get("host") or "127.0.0.1"

    def bearer(self) -> str:
        """The token of an `Authorization: Bearer <token>` header ('' without one)."""
        auth = self.headers.get("authorization") or ""
        return auth[7:].strip() if auth[:7].lower() == "bearer " else ""

    def form(self) -> dict[str, str]:
        """A form-encoded body (the OAuth token requests): the first value of each name."""
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8"), keep_blank_values=True).items()}

    def json(self) -> Any:
        if not self.body:
            return None
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return cls(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    @classmethod
    def empty(cls, status: int = 204, headers: dict[str, str] | None = None) -> Response:
        return cls(status, b"", dict(headers or {}))


Handler = Callable[[Request], Response]
# Runs before a guarded route's handler: raises HttpError (auth, rate limit, rights) or answers early.
Guard = Callable[[Request], "Response | None"]


class HttpError(Exception):
    """Raised by handlers; the simulator renders it in its CRM's error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# -- faults ----------------------------------------------------------------------------------------------------

FAULT_KINDS = (
    "rate_limit",
    "server_error",
    "slow",
    "timeout",
    "drop",
    "token_expiry",
    "malformed",
    "truncated",
    "forbidden",
    "not_found",
    "bad_request",
    "wrong_shape",
    "echo_headers",
)
# Permanent errors, answered in the CRM's own error shape (error_response): a permission the API user lacks,
# an object or path the tenant does not have, a query the CRM refuses. Retrying never helps.
PERMANENT_FAULTS = {
    "forbidden": (403, "INSUFFICIENT_ACCESS", "The API user lacks permission for this operation"),
    "not_found": (404, "NOT_FOUND", "The requested resource does not exist"),
    "bad_request": (400, "INVALID_FIELD", "No such column on entity"),
}


@dataclass
class FaultRule:
    """Inject `kind` on matching requests: from request number `after` (1-based count of matching requests),
    `count` times (0 = forever), or with `probability` (deterministic by the plan's seed)."""

    kind: str
    after: int = 1
    count: int = 1
    probability: float | None = None
    path: str | None = None  # regex on the path; control and auth endpoints are never faulted
    method: str | None = None  # regex on the HTTP method (e.g. "PATCH": only writes), anchored
    seconds: float = 1.0  # for slow / timeout / Retry-After
    fired: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")


@dataclass
class FaultPlan:
    rules: list[FaultRule] = field(default_factory=list)
    seed: int = 0
    latency_ms: int = 0  # added to every request (benchmarks' latency floor)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self, req: Request) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if rule.path and not re.search(rule.path, req.path):
                    continue
                if rule.method and not re.fullmatch(rule.method, req.method, re.IGNORECASE):
                    continue
                rule.seen += 1
                if rule.count and rule.fired >= rule.count:
                    continue
                if rule.seen < rule.after:
                    continue
                if rule.probability is not None and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                return rule
        return None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultPlan:
        rules = [FaultRule(**{k: v for k, v in r.items() if k not in ("fired", "seen")}) for r in data.get("rules", [])]
        return cls(rules=rules, seed=int(data.get("seed", 0)), latency_ms=int(data.get("latency_ms", 0)))


def echo_request(req: Request) -> str:
    """What a misbehaving API or proxy answers a request it refuses with: the request itself, headers first
    (sorted by name, `Authorization` among them) then the query string."""
    headers = "; ".join(f"{name}: {value}" for name, value in sorted(req.headers.items()))
    query = req.raw_path.partition("?")[2]
    return f"Request header field is invalid. Received {req.method} {req.path}; headers: {headers}; query: {query}"


# -- the simulator base ------------------------------------------------------------------------------------------


class Simulator:
    """Base of the five CRM simulators. Subclasses register routes and render errors in their CRM's shape."""

    crm: str = ""
    # Paths that are never faulted or rate-limited (token endpoints are faulted by their own rules if wanted).
    unfaulted = re.compile(r"^/__sandbox/")
    route_flags = 0  # re flags of every route pattern (Autotask's IIS paths: re.IGNORECASE)

    def __init__(self, world: World, faults: FaultPlan | None = None):
        self.world = world
        self.faults = faults or FaultPlan()
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.request_count = 0
        self._count_lock = threading.Lock()
        # the CRM's documented limit of concurrent requests (None: none documented or not simulated)
        self.in_flight: InFlight | None = None
        self.route("POST", r"/__sandbox/advance", self._control_advance)
        self.route("POST", r"/__sandbox/faults", self._control_faults)
        self.route("GET", r"/__sandbox/state", self._control_state)
        self.route("POST", r"/__sandbox/webhooks", self._control_webhooks)
        self.route("POST", r"/__sandbox/touch", self._control_touch)
        self.route("GET", r"/__sandbox/ids", self._control_ids)
        self.route("POST", r"/__sandbox/forget-queries", self._control_forget_queries)
        # Simulators of CRMs with webhooks create their sender (sandbox/kit/webhooks.py) and register their
        # subscription endpoints; the control endpoint points it at a URL where the CRM has no API for that.
        self.webhooks: Any = None

    def _control_ids(self, req: Request) -> Response:
        """The live opportunities' ids, as the sync keys them (a benchmark picks what to change)."""
        return Response.json({"ids": sorted(o.native_id for o in self.world.live())})

    def _control_forget_queries(self, req: Request) -> Response:
        """Drop the evaluated queries kept for paging (kit/snapshots.QueryCache), not the cursors already handed
        out: the next query is evaluated again, as a real CRM evaluates every query it is sent. `make bench`
        replays a sync's requests after it, so the replay's server does the sync's work, not less."""
        caches = [v for v in vars(self).values() if isinstance(v, QueryCache)]
        for cache in caches:
            cache.clear()
        return Response.json({"cleared": len(caches)})

    def _control_touch(self, req: Request) -> Response:
        """{"id": native id, "name": new name}: one user edit, as in the CRM's own UI (it moves the change cursor
        and is notified like any edit): `make bench` times it to the mart."""
        body = req.json() or {}
        opp = self.world.get(str(body.get("id")))
        if opp is None:
            raise HttpError(404, "NOT_FOUND", f"no opportunity {body.get('id')!r}")
        self.world.update(opp.native_id, name=str(body["name"]))
        return Response.json({"id": opp.native_id, "modified_at": opp.modified_at.isoformat() + "Z"})

    def _control_webhooks(self, req: Request) -> Response:
        """{"url": "http://.../webhooks/<connection>" | null, "faults": {drop, duplicate, delay_seconds, reorder,
        seed}}: where this tenant's notifications go and what goes wrong on the way (tests, make bench)."""
        if self.webhooks is None:
            raise HttpError(404, "NO_WEBHOOKS", f"the {self.crm} simulator sends no webhooks")
        from oppsync_pipeline.sandbox.kit.webhooks import DeliveryFaults

        body = req.json() or {}
        if "url" in body:
            self.webhooks.url = body["url"]
        if "faults" in body:
            self.webhooks.faults = DeliveryFaults(**(body["faults"] or {}))
            self.webhooks.start_faults()
        return Response.json({"url": self.webhooks.url, "sent": len(self.webhooks.sent)})

    def route(self, method: str, pattern: str, handler: Handler, *, guard: Guard | None = None) -> None:
        """Serve `handler` on `method` + `pattern` (a regex on the whole path; named groups become `req.params`).
        `guard`: the API's auth / allowance / rights checks, run after the route matched."""
        if guard is not None:
            handler = _guarded(guard, handler)
        self.routes.append((method, re.compile("^" + pattern + "$", self.route_flags), handler))

    # Each CRM answers these in its own form.
    def error_response(self, err: HttpError) -> Response:
        return Response.json({"error": err.code, "message": err.message}, err.status, err.headers)

    def rate_limit_response(self, rule: FaultRule) -> Response:
        return Response.json({"message": "rate limited"}, 429, {"Retry-After": str(int(rule.seconds))})

    def expire_tokens(self) -> None:
        """Invalidate every issued token (token expiry mid-paging)."""

    def common_headers(self, req: Request) -> dict[str, str]:
        """Headers on every response (usage counters ...)."""
        return {}

    def in_flight_key(self, req: Request) -> Any:
        """What the API limits concurrent requests by (None: this request is not limited). A simulator whose CRM
        documents a concurrency limit sets `in_flight` (kit/limits.InFlight) and names the key here."""
        return None

    def too_many_in_flight(self, req: Request) -> Response:
        """The CRM's answer to a request past its concurrency limit."""
        return self.error_response(HttpError(429, "TOO_MANY_CONCURRENT", "too many concurrent requests"))

    def handle(self, req: Request) -> Response:
        with self._count_lock:
            self.request_count += 1
        key = None if self.in_flight is None or self.unfaulted.match(req.path) else self.in_flight_key(req)
        if key is None:
            return self._handle(req)
        # counted in for the whole request, latency included: the vendor counts a request while it is served
        if not self.in_flight.enter(key):
            return self.too_many_in_flight(req)
        try:
            return self._handle(req)
        finally:
            self.in_flight.leave(key)

    def _handle(self, req: Request) -> Response:
        if self.faults.latency_ms:
            time.sleep(self.faults.latency_ms / 1000)
        rule = None if self.unfaulted.match(req.path) else self.faults.pick(req)
        if rule is not None:
            early = self._apply_fault_before(rule, req)
            if early is not None:
                return early
        try:
            resp = self._dispatch(req)
        except HttpError as err:
            resp = self.error_response(err)
        except Exception:  # the simulator itself is broken: answer like a real server would
            log.exception("sandbox %s failed on %s %s", self.crm, req.method, req.path)
            resp = self.error_response(HttpError(500, "INTERNAL_ERROR", "sandbox internal error"))
        for k, v in self.common_headers(req).items():
            resp.headers.setdefault(k, v)
        if rule is not None:
            resp = self._apply_fault_after(rule, resp)
        return resp

    def _dispatch(self, req: Request) -> Response:
        allowed = False
        for method, pattern, handler in self.routes:
            m = pattern.match(req.path)
            if m:
                if method != req.method:
                    allowed = True
                    continue
                req.params = m.groupdict()
                return handler(req)
        if allowed:
            raise HttpError(405, "METHOD_NOT_ALLOWED", f"HTTP method {req.method} not allowed for {req.path}")
        raise HttpError(404, "NOT_FOUND", f"The requested resource does not exist: {req.path}")

    def _apply_fault_before(self, rule: FaultRule, req: Request) -> Response | None:
        if rule.kind == "rate_limit":
            return self.rate_limit_response(rule)
        if rule.kind == "server_error":
            return self.error_response(HttpError(503, "SERVER_UNAVAILABLE", "Service temporarily unavailable"))
        if rule.kind in ("slow", "timeout"):
            time.sleep(rule.seconds)
            return None
        if rule.kind == "drop":
            return Response(drop=True)
        if rule.kind in PERMANENT_FAULTS:
            return self.error_response(HttpError(*PERMANENT_FAULTS[rule.kind]))
        if rule.kind == "echo_headers":
            return self.error_response(HttpError(400, "INVALID_HEADER", echo_request(req)))
        if rule.kind == "token_expiry":
            self.expire_tokens()
            return None
        return None

    def _apply_fault_after(self, rule: FaultRule, resp: Response) -> Response:
        if rule.kind == "malformed":
            return Response(200, b'{"records": [{"Id": ', {"Content-Type": "application/json"})
        if rule.kind == "truncated":
            cut = resp.body[: max(1, len(resp.body) // 2)]
            return Response(resp.status, cut, dict(resp.headers))
        if rule.kind == "wrong_shape":  # valid JSON, right status, none of the keys the answer should have
            return Response(resp.status, b'{"status": "COMPLETE"}', {"Content-Type": "application/json"})
        return resp

    # -- control endpoints ---------------------------------------------------------------------------------------

    def _control_advance(self, req: Request) -> Response:
        body = req.json() or {}
        counts = self.world.advance(float(body.get("hours", 1)), float(body.get("rate", 0.01)))
        return Response.json({"now": self.world.clock.now().isoformat() + "Z", "changes": counts})

    def _control_faults(self, req: Request) -> Response:
        self.faults = FaultPlan.from_json(req.json() or {})
        return Response.json({"rules": len(self.faults.rules)})

    def _control_state(self, req: Request) -> Response:
        w = self.world
        live = [o for o in w.opps.values() if o.deleted_at is None]
        return Response.json(
            {
                "crm": self.crm,
                "now": w.clock.now().isoformat() + "Z",
                "version": w.version,
                "opportunities": len(live),
                "deleted": len(w.opps) - len(live),
                "open": sum(1 for o in live if w.status(o) == "open"),
                "requests": self.request_count,
            }
        )


def _guarded(guard: Guard, handler: Handler) -> Handler:
    def guarded(req: Request) -> Response:
        early = guard(req)
        return early if early is not None else handler(req)

    return guarded


# -- the server -----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True
    simulator: Simulator  # set on the subclass made per server

    def send_response(self, code: int, message: str | None = None) -> None:
        # The stdlib adds its own (real-time) Date header; _serve sends the virtual clock's. Send only that one.
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Server", self.version_string())

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default; the run summary is the report
        log.debug("%s " + format, self.simulator.crm, *args)

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            self.command,
            parts.path,
            parse_qs(parts.query, keep_blank_values=True),
            {k.lower(): v for k, v in self.headers.items()},
            body,
            raw_path=self.path,
        )
        resp = self.simulator.handle(req)
        if resp.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(resp.status)
        now = self.simulator.world.clock.now().replace(tzinfo=UTC)
        headers = {"Date": format_datetime(now, usegmt=True), **resp.headers}
        truncated = False
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(resp.body)))
        else:
            truncated = int(headers["Content-Length"]) != len(resp.body)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)
        if truncated:
            self.close_connection = True

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class SandboxServer:
    """Serve one simulator on 127.0.0.1:port (0 picks a free port) in a background thread."""

    def __init__(self, simulator: Simulator, port: int = 0, host: str = "127.0.0.1"):
        handler = type(f"{simulator.crm.title()}Handler", (_Handler,), {"simulator": simulator})
        self.simulator = simulator
        self.httpd = _Server((host, port), handler)
        self.host, self.port = self.httpd.server_address[:2]
        # where the simulator is reached, for what it sends before any request told it (ConnectWise's key_url)
        simulator.served_at = f"{self.host}:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SandboxServer:
        # serve_forever checks for shutdown every poll_interval (default 0.5 s): stop() waited up to that long,
        # paid by every test that starts a simulator
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"sandbox-{self.simulator.crm}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if getattr(self.simulator, "webhooks", None) is not None:
            self.simulator.webhooks.stop()  # its delivery thread ends with the server
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
