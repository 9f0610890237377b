"""Start the simulators together and describe them as an oppsync.yaml connections block.

Which simulators exist, and their ports, come from the CRM registry (lib/crm/registry.py). Every simulator
module (a spec's `simulator`) exposes the same names:
  `build(seed, opportunities, faults=None, clock=None, *, variant="default") -> Simulator`
  `SANDBOX_CREDENTIALS: dict[str, str]`   credential key -> the (public, sandbox-only) value it accepts
  `CRM: str`
  `VARIANTS: dict[str, str]`              tenant variant -> what makes it differ (vendor-documented tenants:
                                          single-currency orgs, API users without rights to optional
                                          endpoints, custom fields, stage ids that are not the labels ...);
                                          "default" is the tenant `make run` and the suite meet
  `truth(simulator) -> dict[str, dict]`   the tenant's opportunities as a user of that CRM sees them, by id:
                                          the canonical fields computed from the simulator's own data (never
                                          through a connector), for the variant matrix test
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from oppsync_pipeline.lib.crm.registry import CRMS, REGISTRY, spec
from oppsync_pipeline.sandbox.server import FaultPlan, SandboxServer, Simulator
from oppsync_pipeline.sandbox.world import Clock

__all__ = [
    "CRMS",
    "DEFAULT_PORTS",
    "Sandbox",
    "Tenants",
    "build_simulator",
    "connection_name",
    "crm_module",
    "env_var",
    "point_webhooks",
    "sandbox_connection",
    "serve_ports",
]

DEFAULT_PORTS = {crm: s.port for crm, s in REGISTRY.items()}


def crm_module(crm: str) -> ModuleType:
    return spec(crm).simulator_module()


def serve_ports(crms: tuple[str, ...], base: int | None = None) -> dict[str, int]:
    """Each CRM's registry port, all shifted so that the lowest registered port lands on `base`."""
    shift = 0 if base is None else base - min(DEFAULT_PORTS.values())
    return {crm: DEFAULT_PORTS[crm] + shift for crm in crms}


def build_simulator(
    crm: str,
    seed: int = 42,
    opportunities: int = 1000,
    faults: FaultPlan | None = None,
    anchor: datetime | None = None,
    variant: str = "default",
) -> Simulator:
    """`anchor`: the moment the tenant's data is generated relative to. The same seed and anchor give the
    same tenant, so a restarted sandbox is the same CRM. `variant`: one of the module's VARIANTS."""
    module = crm_module(crm)
    known = getattr(module, "VARIANTS", {"default": ""})
    if variant not in known:
        raise ValueError(f"unknown {crm} sandbox variant {variant!r}; one of {sorted(known)}")
    clock = Clock(start=anchor) if anchor else None
    extra = {"variant": variant} if variant != "default" else {}
    return module.build(seed=seed, opportunities=opportunities, faults=faults, clock=clock, **extra)


def connection_name(crm: str) -> str:
    return f"sandbox-{crm}"


def env_var(connection: str, key: str) -> str:
    return f"OPPSYNC_{connection.upper().replace('-', '_')}_{key.upper()}"


def sandbox_connection(crm: str, url: str, name: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """An oppsync.yaml connection entry for a simulator at `url`, and the secrets it references
    (environment variable -> the simulator's public, sandbox-only credential)."""
    name = name or connection_name(crm)
    creds = crm_module(crm).SANDBOX_CREDENTIALS
    entry: dict[str, Any] = {
        "name": name,
        "crm": crm,
        "base_url": url,
        "credentials": {k: "${" + env_var(name, k) + "}" for k in creds},
    }
    options = spec(crm).sandbox_connection_options(url)
    if options:
        entry["options"] = options
    secrets = {env_var(name, k): v for k, v in creds.items()}
    if spec(crm).webhooks:
        # the simulator's notifications, verified as the CRM's are (README: Near-real-time syncs)
        receiver = spec(crm).webhook_receiver_class()
        used = receiver.secret_keys + receiver.optional_secret_keys
        hook_secrets = {k: v for k, v in getattr(crm_module(crm), "SANDBOX_WEBHOOK_SECRETS", {}).items() if k in used}
        entry["webhooks"] = {
            "enabled": True,
            "secrets": {k: "${" + env_var(name, f"webhook_{k}") + "}" for k in hook_secrets},
            "options": dict(getattr(crm_module(crm), "SANDBOX_WEBHOOK_OPTIONS", {})),
        }
        secrets |= {env_var(name, f"webhook_{k}"): v for k, v in hook_secrets.items()}
    return entry, secrets


def point_webhooks(server: SandboxServer, receiver_url: str) -> None:
    """Have a running simulator send its notifications to `receiver_url` (its control endpoint; a simulator
    without webhooks is left alone), as a CRM's admin points a subscription at the receiver."""
    if getattr(server.simulator, "webhooks", None) is None:
        return
    import requests

    requests.post(f"{server.url}/__sandbox/webhooks", json={"url": receiver_url}, timeout=10).raise_for_status()


@dataclass
class Sandbox:
    """The registry's simulators, each on its own port at the URL root like the real host."""

    crms: tuple[str, ...] = CRMS
    seed: int = 42
    opportunities: int = 1000
    ports: dict[str, int] = field(default_factory=dict)  # 0 or missing: a free port
    latency_ms: int = 0
    anchor: datetime | None = None
    faults: FaultPlan | None = None
    variants: dict[str, str] = field(default_factory=dict)  # crm -> tenant variant (default: "default")
    # the webhook receiver's base URL (`oppsync webhooks serve`): simulators with webhooks notify it there
    receiver_url: str | None = None
    servers: dict[str, SandboxServer] = field(default_factory=dict)

    def start(self) -> Sandbox:
        for crm in self.crms:
            plan = (
                FaultPlan.from_json(
                    {
                        "rules": [r.__dict__ for r in self.faults.rules],
                        "seed": self.faults.seed,
                        "latency_ms": self.latency_ms,
                    }
                )
                if self.faults
                else FaultPlan(latency_ms=self.latency_ms)
            )
            sim = build_simulator(
                crm, self.seed, self.opportunities, plan, anchor=self.anchor, variant=self.variants.get(crm, "default")
            )
            self.servers[crm] = SandboxServer(sim, port=self.ports.get(crm, 0)).start()
            if self.receiver_url:
                point_webhooks(self.servers[crm], f"{self.receiver_url.rstrip('/')}/webhooks/{connection_name(crm)}")
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def simulator(self, crm: str) -> Simulator:
        return self.servers[crm].simulator

    def url(self, crm: str) -> str:
        return self.servers[crm].url

    def connections(self) -> list[dict[str, Any]]:
        return [sandbox_connection(crm, server.url)[0] for crm, server in self.servers.items()]

    def secrets(self) -> dict[str, str]:
        return {k: v for crm, server in self.servers.items() for k, v in sandbox_connection(crm, server.url)[1].items()}

    def write_config(self, path: Path, warehouse_url: str = "duckdb:///.oppsync/warehouse.duckdb") -> Path:
        """Write an oppsync.yaml for these simulators, with a secrets file beside it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        secrets = path.with_suffix(".secrets.env")
        secrets.write_text(
            "# sandbox-only credentials, not secrets\n" + "".join(f"{k}={v}\n" for k, v in self.secrets().items()),
            encoding="utf-8",
        )
        config = {"warehouse": {"url": warehouse_url}, "secrets_file": secrets.name, "connections": self.connections()}
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return path


# -- many tenants: `oppsync sandbox serve --tenants N`, `oppsync config generate --tenants N` ------------------------


def tenant_name(index: int, crm: str) -> str:
    return f"t{index:04d}-{crm}"


def tenant_crm(index: int, crms: tuple[str, ...] = CRMS) -> str:
    """Tenants take the CRMs in turn: 500 tenants are 100 of each of the five."""
    return crms[index % len(crms)]


def tenants_config(
    urls: list[str], warehouse_url: str, crms: tuple[str, ...] = CRMS, **top: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """An oppsync.yaml mapping for tenants at `urls` (tenant i at urls[i], CRM `tenant_crm(i)`) and its secrets.

    The hourly schedule only: no webhooks (a receiver per tenant is not what is measured here), so the webhook
    blocks `sandbox_connection` writes for one simulator per CRM are left out with their secrets."""
    connections, secrets = [], {}
    for i, url in enumerate(urls):
        crm = tenant_crm(i, crms)
        entry, entry_secrets = sandbox_connection(crm, url, tenant_name(i, crm))
        entry.pop("webhooks", None)
        connections.append(entry)
        secrets |= {k: v for k, v in entry_secrets.items() if "_WEBHOOK_" not in k}
    return {"warehouse": {"url": warehouse_url}, **top, "connections": connections}, secrets


def write_tenants_config(
    path: Path, urls: list[str], warehouse_url: str, crms: tuple[str, ...] = CRMS, **top: Any
) -> Path:
    """`tenants_config` as an oppsync.yaml at `path`, its secrets in `<name>.secrets.env` beside it."""
    config, secrets = tenants_config(urls, warehouse_url, crms, **top)
    path.parent.mkdir(parents=True, exist_ok=True)
    secrets_file = path.with_suffix(".secrets.env")
    secrets_file.write_text(
        "# sandbox-only credentials, not secrets\n" + "".join(f"{k}={v}\n" for k, v in secrets.items()),
        encoding="utf-8",
    )
    config = {**config, "secrets_file": secrets_file.name}
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def tenant_urls(count: int, port_base: int, host: str = "127.0.0.1") -> list[str]:
    """Tenant i at port_base + i, each at its URL root as the real host serves one tenant."""
    return [f"http://{host}:{port_base + i}" for i in range(count)]


@dataclass
class Tenants:
    """N small tenants, each a simulator on its own port (the CRMs in turn, seed + i each: no two alike).

    One process serves them all: a ThreadingHTTPServer per tenant costs a listening thread and the tenant's
    data (about 0.6 MB with 20 opportunities, make bench scale), so 500 fit in one process on a laptop."""

    count: int
    crms: tuple[str, ...] = CRMS
    seed: int = 42
    opportunities: int = 20
    port_base: int | None = None  # None: free ports
    latency_ms: int = 0
    anchor: datetime | None = None
    servers: list[SandboxServer] = field(default_factory=list)

    def start(self) -> Tenants:
        for i in range(self.count):
            sim = build_simulator(
                tenant_crm(i, self.crms),
                self.seed + i,
                self.opportunities,
                FaultPlan(latency_ms=self.latency_ms),
                anchor=self.anchor,
            )
            port = 0 if self.port_base is None else self.port_base + i
            self.servers.append(SandboxServer(sim, port=port).start())
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()

    def __enter__(self) -> Tenants:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def write_config(self, path: Path, warehouse_url: str, **top: Any) -> Path:
        return write_tenants_config(path, self.urls(), warehouse_url, self.crms, **top)
