"""One HTTP client for all five CRMs: timeouts, retries that honour Retry-After, token refresh on 401,
per-run statistics and the quota budget.

Retries use tenacity rather than urllib3's Retry because each CRM signals "slow down" differently
(Salesforce 403 REQUEST_LIMIT_EXCEEDED is final, Autotask adds latency then 429, HubSpot 429 with a
JSON body) and because the run must report how many retries it made and how long it waited.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from requests.sessions import merge_setting
from requests.utils import get_environ_proxies
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from oppsync_pipeline.lib.scrub import Scrubber, scrubbed_logger

log = scrubbed_logger(__name__)

RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class CrmError(Exception):
    """A CRM call failed. The message never carries credentials.

    `permanent`: retrying cannot help (400, 403, 404, refused credentials, a malformed answer to a
    deterministic query): the run fails at once and Dagster's retry policy is skipped. Transient failures
    (429, 5xx, timeouts, resets) are retried inside ApiClient; when those retries are spent the error is
    raised with permanent=False and the run may be retried later."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        *,
        permanent: bool | None = None,
        hint: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.hint = hint  # what to check (a config key, a permission); the client adds a generic one
        # By default an HTTP 4xx (other than 429) is permanent; an answer of the wrong shape may be a bad
        # page that the next run does not get, so it is not.
        self.permanent = (
            permanent if permanent is not None else (status is not None and 400 <= status < 500 and status != 429)
        )

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}. {self.hint}" if self.hint else text


class AuthError(CrmError):
    """Credentials were refused."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message, status, code, permanent=True)


class QuotaExhausted(CrmError):
    """The CRM's quota, or this run's budget of it, is spent: stop and report the run as skipped."""


class RetryableHttpError(Exception):
    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


@dataclass
class RequestStats:
    """What one run cost the CRM: recorded on the sync-run row and the Dagster materialization."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    seconds_waited: float = 0.0
    seconds_paced: float = 0.0  # slept before sending, to keep within the CRM's rate limit (RollingWindowPacer)
    token_refreshes: int = 0
    quota_used: int | None = None  # the CRM's own usage counter, when it reports one
    unanswered: int = 0  # requests sent whose answer has not come back (QuotaBudget.admit)
    quota_limit: int | None = None
    server_time: Any = None  # `Date` header of the first response (the run's start, server side)
    server_time_latest: Any = None  # `Date` header of the latest response: "now" for the quality checks
    token_requests: int = 0  # OAuth / session token calls (included in `requests`: the CRM counts them)
    warnings: list[str] = field(default_factory=list)  # optional reads refused, and the fallback used
    # parallel reads (parallel.py) count from several threads: `count` adds under this lock
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def warn(self, message: str) -> None:
        with self.lock:
            if message not in self.warnings:
                self.warnings.append(message)

    def count(self, **deltas: float) -> None:
        """Add to counters (`requests=1`, `seconds_waited=2.5` ...) safely from any thread."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "api_requests": self.requests,
            "token_requests": self.token_requests,
            "warnings": list(self.warnings),
            "retries": self.retries,
            "rate_limited_responses": self.rate_limited,
            "seconds_waited_on_rate_limits": round(self.seconds_waited, 3),
            "seconds_paced_to_rate_limits": round(self.seconds_paced, 3),
            "token_refreshes": self.token_refreshes,
            "quota_used": self.quota_used,
            "quota_limit": self.quota_limit,
        }


class Auth:
    """How a CRM authenticates. Subclasses add headers and, for OAuth, fetch / refresh tokens.

    Token calls go through `token_request`, so they are counted with the run's requests (the CRM counts
    them against its limits too) and reported separately."""

    refreshable = False
    stats: RequestStats | None = None  # bound by ApiClient

    def token_request(self, session: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response:
        if self.stats is not None:
            self.stats.count(requests=1, token_requests=1)
        return session.request(method, url, **kwargs)

    def apply(self, session: requests.Session, headers: dict[str, str]) -> None:
        """Add the credentials to a request's headers (the base class sends none: tests, open endpoints)."""

    def refresh(self, session: requests.Session) -> None:
        raise AuthError("credentials were refused (401)", status=401)


class RollingWindowPacer:
    """At most `limit` requests in any `seconds`, however many threads send them: each request takes the next
    free slot (the moment the request `limit` places before it leaves the window) and sleeps until then. A burst
    of `limit` goes at once, as a rolling window allows; the request after it waits for the first to age out.

    Pacing before sending costs only the wait the CRM would impose anyway, where a 429 costs a wasted request,
    a backoff and, on a long read, the run's whole retry budget (five HubSpot read threads sending batch reads
    without pacing met the 10-second limit again and again). `limit` may change while requests are paced
    (a CRM that reports its limit in headers)."""

    def __init__(self, limit: int, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._slots: deque[float] = deque(maxlen=max(1, limit))  # the latest `limit` slots taken, in order
        self.limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        with self._lock:
            self._limit = value
            if value > 0 and value != self._slots.maxlen:
                self._slots = deque(self._slots, maxlen=value)

    def take(self) -> float:
        """Take the next slot: how long to wait before sending (0: now). A limit of 0 paces nothing."""
        with self._lock:
            now = self.clock()
            if self._limit <= 0:
                return 0.0
            # slots stay in order (never before the latest taken), so the oldest kept is the one `limit` back
            slot = max(now, self._slots[-1]) if self._slots else now
            if len(self._slots) == self._slots.maxlen:
                slot = max(slot, self._slots[0] + self.seconds)
            self._slots.append(slot)
            return slot - now


class InFlightLimit:
    """At most `limit` requests in flight at once per key (a CRM's documented concurrency limit: Autotask's three
    threads per object endpoint, Dataverse's 52 per user), however many threads send them: a request over it
    waits for one to finish, where the CRM would refuse it. `key(method, path)`: the key a request counts under,
    None for a request no limit counts."""

    def __init__(self, limit: int, key: Callable[[str, str], Hashable | None]):
        self.limit = max(1, limit)
        self.key = key
        self._lock = threading.Lock()
        self._slots: dict[Hashable, threading.BoundedSemaphore] = {}

    @contextmanager
    def slot(self, method: str, path: str) -> Iterator[None]:
        key = self.key(method, path)
        if key is None:
            yield
            return
        with self._lock:
            gate = self._slots.setdefault(key, threading.BoundedSemaphore(self.limit))
        with gate:
            yield


@dataclass
class QuotaBudget:
    """Stop early rather than starve the customer's other integrations (docs/peer-tools.md item 5)."""

    run_share: float = 0.25  # share of the CRM's quota limit one run may spend
    stop_at_usage: float = 0.9  # stop when the CRM reports total usage at this share of its limit
    max_requests: int | None = None  # absolute cap, for tests and for CRMs that report no limit
    # Seconds one run may sleep on Retry-After and backoff in all: a CRM that keeps asking for long waits
    # (300 s per answer, 7 retries per request) would otherwise hold the run, and its lock, for half an hour.
    max_wait_seconds: float = 120.0

    def admit(self, stats: RequestStats) -> None:
        """`check`, then count the request as sent, in one step under the stats' lock: requests sent side by side
        (parallel reads) cannot all pass the check before any of them is counted. The CRM's reported usage counts
        the requests still unanswered as used (their answers will report them)."""
        with stats.lock:
            self.check(stats, unanswered=stats.unanswered)
            stats.requests += 1
            stats.unanswered += 1

    def check(self, stats: RequestStats, unanswered: int = 0) -> None:
        if self.max_requests is not None and stats.requests >= self.max_requests:
            raise QuotaExhausted(f"run budget of {self.max_requests} API requests spent")
        if stats.quota_limit:
            if stats.requests >= self.run_share * stats.quota_limit:
                raise QuotaExhausted(
                    f"run used {stats.requests} requests, its budget is {self.run_share:.0%} of the "
                    f"CRM's {stats.quota_limit}; a full sync of a large tenant may need more: raise the "
                    "connection's quota.run_share in oppsync.yaml for it"
                )
            if stats.quota_used is not None and stats.quota_used + unanswered >= self.stop_at_usage * stats.quota_limit:
                raise QuotaExhausted(
                    f"CRM reports {stats.quota_used}/{stats.quota_limit} of its quota used"
                    + (f" ({unanswered} more requests unanswered)" if unanswered else "")
                    + "; "
                    f"stopping at {self.stop_at_usage:.0%} to leave room for other integrations"
                )


def retry_after_seconds(response: requests.Response, default: float | None = None) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return default


class CrmSession(requests.Session):
    """A requests.Session that reads the environment's proxy settings (HTTP(S)_PROXY, NO_PROXY ...) and CA bundle
    (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) once per scheme and host, not before every request. requests reads them
    for each request it sends, walking the whole environment twice: ~110 us a request with 35 variables here,
    more in a container with a long environment; a full sync of 1,000 ConnectWise opportunities sends ~1,300
    requests (one forecast each). The settings apply as requests applies them; a change to the environment
    reaches the next session (each run builds its connector's), not one already sending. `trust_env = False`
    turns the environment off, as on any session."""

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[str, str, str | None], tuple[dict[str, str], str | None]] = {}

    def merge_environment_settings(self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:  # type: ignore[override]
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, no_proxy)
        found = self._environment.get(key)
        if found is None:  # threads may both read it the first time: the same answer
            found = self._environment[key] = (
                get_environ_proxies(url, no_proxy=no_proxy),
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"),
            )
        env_proxies, ca_bundle = found
        if proxies is not None:
            for k, v in env_proxies.items():
                proxies.setdefault(k, v)
        if (verify is True or verify is None) and ca_bundle:
            verify = ca_bundle
        # the rest as requests.Session.merge_environment_settings: the request's settings over the session's
        return {
            "proxies": merge_setting(proxies, self.proxies),
            "stream": merge_setting(stream, self.stream),
            "verify": merge_setting(verify, self.verify),
            "cert": merge_setting(cert, self.cert),
        }


@dataclass
class ApiClient:
    """A requests.Session bound to one CRM tenant."""

    base_url: str
    auth: Auth
    stats: RequestStats = field(default_factory=RequestStats)
    budget: QuotaBudget = field(default_factory=QuotaBudget)
    timeout: tuple[float, float] = (10.0, 120.0)
    max_attempts: int = 8
    max_wait: float = 300.0
    # Per-CRM hooks: read usage headers; turn a response into an exception (quota, rate limit, error).
    observe: Callable[[requests.Response, RequestStats], None] | None = None
    classify: Callable[[requests.Response], Exception | None] | None = None
    sleep: Callable[[float], None] = time.sleep
    # Per-CRM pacing, called with (method, path) before every request is sent (retries and repeats included):
    # returns the seconds to wait first, to stay within the CRM's rate limit (RollingWindowPacer).
    pace: Callable[[str, str], float] | None = None
    # The CRM's concurrency limit, held around every request sent (reads ahead and lookups side by side stay in it).
    in_flight: InFlightLimit | None = None
    session: requests.Session = field(default_factory=CrmSession)
    # Knows the connection's credentials and learns what the Auth sends (tokens obtained at run time).
    scrubber: Scrubber = field(default_factory=Scrubber)

    def __post_init__(self) -> None:
        self.auth.stats = self.stats
        self._refresh_lock = threading.Lock()
        self._credentials = 0  # how many times the credentials were renewed (threads refresh once per expiry)

    def allow_concurrency(self, degree: int) -> None:
        """Let `degree` threads share this client (parallel.py): the Session's connection pools keep `degree`
        connections per host, so no thread opens and drops its own (urllib3 is thread-safe; the Session holds
        no per-request state of ours: auth headers are built per request)."""
        for prefix, adapter in list(self.session.adapters.items()):
            if (
                isinstance(adapter, requests.adapters.HTTPAdapter)
                and getattr(adapter, "_pool_maxsize", degree) < degree
            ):
                self.session.mount(prefix, requests.adapters.HTTPAdapter(pool_connections=degree, pool_maxsize=degree))

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        retrying = Retrying(
            retry=retry_if_exception(
                lambda e: isinstance(
                    e,
                    (
                        RetryableHttpError,
                        requests.ConnectionError,
                        requests.Timeout,
                        requests.exceptions.ChunkedEncodingError,
                    ),
                )
            ),
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            sleep=self._sleep_and_count,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._once, method, path, **kwargs)
        except RetryableHttpError as err:
            raise CrmError(
                f"{method} {_safe_path(path)} still failing after {self.max_attempts} attempts: {err}",
                status=err.status,
                permanent=False,
            ) from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise CrmError(
                f"{method} {_safe_path(path)} unreachable after {self.max_attempts} attempts: "
                f"{type(err).__name__}; check base_url and that the host is reachable",
                permanent=False,
            ) from None

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.parse_json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, body: Any, **kwargs: Any) -> Any:
        return self.parse_json(self.request("POST", path, json=body, **kwargs))

    @staticmethod
    def parse_json(response: requests.Response) -> Any:
        if (response.encoding or "utf-8").lower() in ("utf-8", "utf8"):
            # orjson reads a page 2-3x faster than requests' decoder (simplejson or json), straight from the body's
            # bytes (response.json() decodes them to a str first: ~2 copies of a page at once; a 5,000-record
            # Dataverse page set a sync's peak memory); what it refuses (NaN, integers past 64 bits, lone
            # surrogates, a BOM) goes to requests' decoder, as before
            try:
                return orjson.loads(response.content)
            except orjson.JSONDecodeError:
                pass
        try:
            return response.json()
        except ValueError:
            # A malformed or truncated page: fail the run (nothing is written until the extract completes).
            raise CrmError(
                f"{response.request.method} {_safe_path(response.url)} returned a body that is not valid JSON "
                f"({len(response.content)} bytes)",
                status=response.status_code,
                code="MALFORMED_BODY",
            ) from None

    # -- internals -------------------------------------------------------------------------------------------

    def _once(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        self.budget.check(self.stats)  # before any pacing wait; admitted (checked again, counted) when sent
        refreshed = False
        while True:
            if self.pace is not None and (wait := self.pace(method, path)) > 0:
                self.stats.count(seconds_paced=wait)
                self.sleep(wait)
            credentials = self._credentials
            headers = dict(kwargs.pop("headers", None) or {})
            unauthenticated = dict(headers)
            self.auth.apply(self.session, headers)
            # before the request is sent: an answer that echoes it must find the token already known
            self.scrubber.add_sent_headers(unauthenticated, headers)
            self.budget.admit(self.stats)
            try:
                with self.in_flight.slot(method, path) if self.in_flight else nullcontext():
                    response = self.session.request(
                        method, self.url(path), headers=headers, timeout=self.timeout, **kwargs
                    )
                kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if response.headers.get("Date"):
                    self.stats.server_time_latest = parsedate_to_datetime(response.headers["Date"])
                    if self.stats.server_time is None:
                        self.stats.server_time = self.stats.server_time_latest
                if self.observe:
                    self.observe(response, self.stats)
            finally:
                self.stats.count(unanswered=-1)  # its usage is in quota_used now (where the CRM reports it)
            if response.status_code == 401 and self.auth.refreshable and not refreshed:
                # Token expired mid-run: get a new one once, then repeat the same request (one thread at a time
                # refreshes; the others repeat their request with the token it got).
                with self._refresh_lock:
                    if self._credentials == credentials:  # else another thread renewed them since we sent
                        self.stats.count(token_refreshes=1)
                        self.auth.refresh(self.session)
                        self._credentials += 1
                refreshed = True
                continue
            break
        problem = self.classify(response) if self.classify else None
        if problem is not None:
            if type(problem) is CrmError and problem.permanent and problem.hint is None:
                problem.hint = f"({method} {_safe_path(path)}) {fix_hint(problem.status)}"
            raise problem
        if response.status_code in RETRYABLE_STATUS:
            if response.status_code == 429:
                self.stats.count(rate_limited=1)
            raise RetryableHttpError(
                f"HTTP {response.status_code}", retry_after_seconds(response), status=response.status_code
            )
        if response.status_code == 401:
            raise AuthError(
                f"{method} {_safe_path(path)}: credentials were refused (401) even after a new token; "
                "check the connection's credentials and that the API user is active",
                status=401,
            )
        if response.status_code >= 400:
            raise CrmError(
                f"{method} {_safe_path(path)} failed with HTTP {response.status_code}: {_safe_body(response)}",
                status=response.status_code,
                hint=fix_hint(response.status_code),
            )
        return response

    def _wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        if isinstance(err, RetryableHttpError) and err.retry_after is not None:
            return min(err.retry_after, self.max_wait)
        return wait_exponential_jitter(multiplier=0.5, max=30)(state)

    def _sleep_and_count(self, seconds: float) -> None:
        self.stats.count(seconds_waited=seconds)
        self.sleep(seconds)

    def _before_sleep(self, state: RetryCallState) -> None:
        """Runs only when a retry will sleep (tenacity computes a wait for the last attempt too, and sleeps
        none): the wait budget is checked here, before anything is slept."""
        err = state.outcome.exception() if state.outcome else None
        self._check_wait_budget(state.upcoming_sleep, err, state.args)
        self.stats.count(retries=1)
        log.info("retrying after %s (attempt %d)", type(err).__name__ if err else "?", state.attempt_number)

    def _check_wait_budget(self, seconds: float, err: BaseException | None, args: tuple[Any, ...]) -> None:
        """Refuse a wait that would take the run past its budget of sleep (quota.max_wait_seconds).

        When the CRM asked for the wait (Retry-After, or 429) the run ends skipped, as for a spent quota: the
        next scheduled run tries again. A backoff after errors (5xx, timeouts) ends it failed, not permanent."""
        budget = self.budget.max_wait_seconds
        if self.stats.seconds_waited + seconds <= budget:
            return
        where = f"{args[0]} {_safe_path(args[1])}" if len(args) >= 2 else "a request"
        spent = (
            f"this run may wait {budget:g}s in all on retries and has waited {self.stats.seconds_waited:g}s; "
            "raise the connection's quota.max_wait_seconds in oppsync.yaml to wait longer"
        )
        if isinstance(err, RetryableHttpError) and (err.retry_after is not None or err.status == 429):
            asked = (
                f"Retry-After: {err.retry_after:g}"
                if err.retry_after is not None
                else f"no Retry-After, backing off {seconds:.0f}s"
            )
            raise QuotaExhausted(
                f"the CRM answered {where} with HTTP {err.status} ({asked}); not waiting: {spent}", status=err.status
            )
        what = f"HTTP {err.status}" if isinstance(err, RetryableHttpError) else type(err).__name__
        raise CrmError(
            f"{where} failed ({what}); backing off {seconds:.0f}s more would pass the run's wait budget: {spent}",
            status=getattr(err, "status", None),
            permanent=False,
        )


def json_body(response: requests.Response) -> Any:
    """A response's JSON, or None when it is not JSON (error bodies are often HTML or empty)."""
    try:
        return response.json()
    except ValueError:
        return None


def json_object(response: requests.Response) -> dict[str, Any]:
    """A response's JSON object (an error body), or {} when it is not one."""
    body = json_body(response)
    return body if isinstance(body, dict) else {}


def fix_hint(status: int | None) -> str:
    """What a user should check for a permanent HTTP error (the connector's own message may be sharper)."""
    if status == 403:
        return (
            "The API user lacks a permission this read needs: grant it read access to the object in the CRM "
            "(README: per-CRM prerequisites), or run `oppsync config check --online` to see what is readable."
        )
    if status == 404:
        return (
            "Not found: check the connection's base_url, options.api_version and that the object or "
            "field exists in this tenant (`oppsync config check --online`)."
        )
    if status == 400:
        return (
            "The CRM refused the query: check the connection's filters, fields and options against the "
            "tenant's fields (`oppsync config check --online` lists them)."
        )
    return "Check the connection's configuration (`oppsync config check --online`)."


def _safe_path(url: str) -> str:
    """The path of a URL without its query string (which may carry filter values, never credentials)."""
    return url.split("?", 1)[0]


def _safe_body(response: requests.Response, limit: int = 300) -> str:
    text = response.text[:limit]
    return text.replace("\n", " ")
