"""The connector contract: behaviours every CRM connector shares, written once and checked for each CRM from one
configuration per CRM (in the manner of Airbyte's acceptance-test-config.yml). A CRM-specific behaviour stays
in its tests/crm/test_<crm>_*.py file; a sixth CRM adds one entry to CONTRACTS.

Each connector runs against its simulator over real HTTP. The numbers in a configuration (fault rules, sizes,
expected retries and waits) are the ones each CRM's own test used before the suite was shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.http import AuthError
from oppsync_pipeline.sandbox import hubspot as hubspot_sim
from oppsync_pipeline.sandbox.cluster import crm_module
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer


@dataclass(frozen=True)
class Tenant:
    """A simulated tenant and how the connector reads it."""

    seed: int
    opportunities: int
    page_size: int


@dataclass(frozen=True)
class Refusal:
    """Credentials the CRM refuses, the value that must never appear in the error, and what the error names."""

    credentials: dict[str, str]  # merged over the sandbox's working credentials
    secret: str  # never shown in the message
    says: str | None = None  # the CRM's own reason code, kept in the message
    call: str = "stages"  # the first call that authenticates


@dataclass(frozen=True)
class Transient:
    """Rate limits, server errors and dropped connections the client retries; what it must count."""

    tenant: Tenant
    rules: tuple[FaultRule, ...]
    retries: int
    rate_limited: int | None = None
    min_seconds_waited: float | None = None
    sleeps: int | None = None  # how many sleeps the client asked for
    sleeps_include: tuple[float, ...] = ()  # Retry-After values honoured as given


@dataclass(frozen=True)
class TokenExpiry:
    """A token that expires mid-paging: refreshed (or, for keys that never expire, harmless)."""

    tenant: Tenant
    rule: FaultRule
    refreshes: int | None  # None: the CRM's keys do not expire, nothing to count


@dataclass(frozen=True)
class Contract:
    crm: str
    refusal: Refusal
    transient: Transient
    token_expiry: TokenExpiry | None  # None: tested in the CRM's own file (HubSpot OAuth, virtual clock)
    options: Callable[[str], dict[str, Any]] = lambda url: {}
    build: dict[str, Any] = field(default_factory=dict)  # simulator build arguments beyond seed and size


HUBSPOT_NO_LIMITS = hubspot_sim.Limits(ten_secondly=0, search_per_second=0, daily=1_000_000)

CONTRACTS: dict[str, Contract] = {
    c.crm: c
    for c in [
        Contract(
            "salesforce",
            refusal=Refusal(
                {"client_id": "wrong", "client_secret": "very-secret-value-123"},
                "very-secret-value-123",
                says="invalid_grant",
            ),
            transient=Transient(
                Tenant(5, 1500, 200),
                (FaultRule("server_error", after=2, count=2), FaultRule("drop", after=4, count=1)),
                retries=3,
                sleeps=3,
            ),
            token_expiry=TokenExpiry(Tenant(5, 1500, 200), FaultRule("token_expiry", after=3), refreshes=1),
        ),
        Contract(
            "hubspot",
            refusal=Refusal({"access_token": "pat-na1-wrong"}, "pat-na1-wrong"),
            transient=Transient(
                Tenant(6, 500, 50),
                (
                    FaultRule("rate_limit", after=2, count=2, seconds=0.01),
                    FaultRule("server_error", after=6, count=1),
                    FaultRule("rate_limit", after=4, count=1, seconds=0.02, path=r"/batch/read$"),
                ),
                retries=4,
                rate_limited=3,
                sleeps_include=(0.01, 0.02),
            ),
            token_expiry=None,
            options=lambda url: {"search_requests_per_second": 0},
            build={"limits": HUBSPOT_NO_LIMITS},
        ),
        Contract(
            "dynamics",
            refusal=Refusal({"client_secret": "wrong-s3cret"}, "wrong-s3cret", says="7000215", call="users"),
            transient=Transient(
                Tenant(7, 600, 50),
                (
                    FaultRule("rate_limit", after=2, count=2, seconds=3, path="/api/data"),
                    FaultRule("server_error", after=5, count=1, path="/api/data"),
                ),
                retries=3,
                rate_limited=2,
                min_seconds_waited=6,
            ),
            token_expiry=TokenExpiry(
                Tenant(7, 600, 50), FaultRule("token_expiry", after=3, path="/api/data"), refreshes=1
            ),
            options=lambda url: {"authority_url": url},
        ),
        Contract(
            "connectwise",
            refusal=Refusal({"private_key": "s3cret-wrong-key"}, "s3cret"),
            transient=Transient(
                Tenant(14, 200, 25),
                (FaultRule("rate_limit", after=3, count=2, seconds=2), FaultRule("server_error", after=6, count=1)),
                retries=3,
                rate_limited=2,
                min_seconds_waited=4,
            ),
            # API keys do not expire: a token_expiry fault must be harmless
            token_expiry=TokenExpiry(Tenant(13, 200, 25), FaultRule("token_expiry", after=3), refreshes=None),
            options=lambda url: {"forecast": False},
        ),
        Contract(
            "autotask",
            refusal=Refusal({"secret": "wrong-secret-value"}, "wrong-secret-value"),
            transient=Transient(
                Tenant(15, 400, 40),
                (
                    FaultRule("rate_limit", after=3, count=2, seconds=7, path="/query"),
                    FaultRule("server_error", after=6, count=1, path="/query"),
                ),
                retries=3,
                rate_limited=2,
                min_seconds_waited=14,
            ),
            token_expiry=None,  # Autotask authenticates every request with its API user's secret: no token
        ),
    ]
}


def _fresh(rule: FaultRule) -> FaultRule:
    """A FaultRule counts what it saw and fired: each test gets its own copy of the configured one."""
    return FaultRule(
        rule.kind,
        after=rule.after,
        count=rule.count,
        probability=rule.probability,
        path=rule.path,
        seconds=rule.seconds,
    )


def serve(contract: Contract, tenant: Tenant, *rules: FaultRule) -> SandboxServer:
    sim = crm_module(contract.crm).build(
        seed=tenant.seed,
        opportunities=tenant.opportunities,
        faults=FaultPlan(rules=[_fresh(r) for r in rules]),
        **contract.build,
    )
    return SandboxServer(sim)


def connect(
    contract: Contract,
    url: str,
    page_size: int,
    credentials: dict[str, str] | None = None,
    sleeps: list[float] | None = None,
) -> Any:
    mod = crm_module(contract.crm)
    conn = ConnectionConfig(
        name=f"contract-{contract.crm}",
        crm=contract.crm,
        base_url=url,
        page_size=page_size,
        credentials={k: "${" + k.upper() + "}" for k in mod.SANDBOX_CREDENTIALS},
        options=contract.options(url),
    )
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return connector_class(contract.crm)(conn, {**mod.SANDBOX_CREDENTIALS, **(credentials or {})}, sleep=sleep)


def read_all(connector: Any) -> tuple[dict[str, Any], int]:
    """Every opportunity, open set then not-open set, each once; and how many pages it took."""
    out, pages = {}, 0
    for open_set in (True, False):
        for page in connector.opportunities(open_set=open_set, since=None):
            pages += 1
            for opp in page:
                assert (opp.status == "open") == open_set, (opp.source_id, opp.status, open_set)
                assert opp.source_id not in out, "an opportunity came twice"
                out[opp.source_id] = opp
    return out, pages


def live_ids(server: SandboxServer) -> set[str]:
    return {o.native_id for o in server.simulator.world.live()}


contracts = pytest.mark.parametrize("contract", list(CONTRACTS.values()), ids=list(CONTRACTS))


@contracts
def test_bad_credentials_raise_auth_error_without_the_secret(contract: Contract):
    refusal = contract.refusal
    with serve(contract, Tenant(seed=14, opportunities=20, page_size=50)) as server:
        connector = connect(contract, server.url, 50, credentials=refusal.credentials)
        with pytest.raises(AuthError) as err:
            list(getattr(connector, refusal.call)())
        assert refusal.secret not in str(err.value)
        if refusal.says:
            assert refusal.says in str(err.value)
        assert connector.stats.retries == 0  # a refused credential is never retried


@contracts
def test_rate_limits_and_server_errors_are_retried(contract: Contract):
    t = contract.transient
    with serve(contract, t.tenant, *t.rules) as server:
        sleeps: list[float] = []
        connector = connect(contract, server.url, t.tenant.page_size, sleeps=sleeps)
        got, _ = read_all(connector)
        assert set(got) == live_ids(server)
        assert connector.stats.retries == t.retries
        if t.rate_limited is not None:
            assert connector.stats.rate_limited == t.rate_limited
        if t.min_seconds_waited is not None:
            assert connector.stats.seconds_waited >= t.min_seconds_waited
        if t.sleeps is not None:
            assert len(sleeps) == t.sleeps
        for seconds in t.sleeps_include:  # Retry-After honoured
            assert seconds in sleeps


@pytest.mark.parametrize(
    "contract",
    [c for c in CONTRACTS.values() if c.token_expiry],
    ids=[c.crm for c in CONTRACTS.values() if c.token_expiry],
)
def test_a_token_expiring_mid_paging_is_refreshed_and_the_read_completes(contract: Contract):
    t = contract.token_expiry
    assert t is not None
    with serve(contract, t.tenant, t.rule) as server:
        connector = connect(contract, server.url, t.tenant.page_size)
        got, pages = read_all(connector)
        assert set(got) == live_ids(server)
        world = server.simulator.world
        assert sum(o.status == "open" for o in got.values()) == sum(world.status(o) == "open" for o in world.live())
        assert pages > 3  # the token expired mid-paging, not before the first page
        if t.refreshes is not None:
            assert connector.stats.token_refreshes == t.refreshes
