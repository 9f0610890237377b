"""Starting the sandbox for the CLI: `oppsync sandbox serve`, and the simulators `oppsync run` / `sync` /
`config check --online` start for a configuration with `sandbox: {enabled: true}`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.sandbox.cluster import CRMS, Sandbox, build_simulator, crm_module, point_webhooks, serve_ports
from oppsync_pipeline.sandbox.server import FaultPlan, SandboxServer

STATE_DIR = Path(".oppsync")


def sandbox_anchor(state_dir: Path = STATE_DIR) -> datetime:
    """The sandbox's data is generated relative to a fixed moment, kept in .oppsync/, so that restarting it
    regenerates the same tenant (a real CRM does not change because a process restarted)."""
    f = state_dir / "sandbox-anchor"
    if f.exists():
        return datetime.fromisoformat(f.read_text().strip())
    state_dir.mkdir(parents=True, exist_ok=True)
    anchor = datetime.utcnow().replace(microsecond=0)
    f.write_text(anchor.isoformat())
    return anchor


def start_sandbox(
    crms: tuple[str, ...] | None = None,
    *,
    seed: int = 42,
    opportunities: int = 2000,
    port_base: int | None = None,
    latency_ms: int = 0,
    faults: str | None = None,
    variants: list[str] | None = None,
    receiver_url: str | None = None,
) -> Sandbox:
    """`oppsync sandbox serve`: the simulators on their registry ports (shifted to `port_base`), `faults` a
    JSON fault plan applied to each, `variants` as CRM=VARIANT."""
    crms = tuple(crms or CRMS)
    return Sandbox(
        crms=crms,
        seed=seed,
        opportunities=opportunities,
        ports=serve_ports(crms, port_base),
        latency_ms=latency_ms,
        anchor=sandbox_anchor(),
        faults=FaultPlan.from_json(json.loads(faults)) if faults else None,
        variants=dict(v.split("=", 1) for v in variants or []),
        receiver_url=receiver_url,
    ).start()


def variants() -> dict[str, dict[str, str]]:
    """crm -> its simulator's tenant variants (name -> what makes it differ)."""
    return {crm: getattr(crm_module(crm), "VARIANTS", {"default": ""}) for crm in CRMS}


class sandbox_if_enabled:
    """Start the simulators the configuration points at, unless something already answers there
    (a `make dev` sandbox, or `oppsync sandbox serve` in another terminal)."""

    def __init__(self, cfg: OppsyncConfig, advance_hours: float = 0.0):
        self.cfg, self.advance_hours, self.servers = cfg, advance_hours, []

    def __enter__(self) -> sandbox_if_enabled:
        if not self.cfg.sandbox.enabled:
            return self
        anchor = sandbox_anchor()
        for conn in self.cfg.connections:
            url = urlparse(conn.base_url)
            if url.hostname not in ("127.0.0.1", "localhost") or answers(conn.base_url):
                continue
            sim = build_simulator(
                conn.crm,
                self.cfg.sandbox.seed,
                self.cfg.sandbox.opportunities,
                FaultPlan(latency_ms=self.cfg.sandbox.latency_ms),
                anchor=anchor,
                variant=self.cfg.sandbox.variants.get(conn.crm, "default"),
            )
            if self.advance_hours:
                sim.world.advance(self.advance_hours)
            server = SandboxServer(sim, port=url.port or 80).start()
            self.servers.append(server)
            if conn.webhooks.enabled:
                hooks = self.cfg.webhooks
                base = hooks.public_url or f"http://{hooks.host}:{hooks.port}"
                point_webhooks(server, f"{base.rstrip('/')}/webhooks/{conn.name}")
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self.servers:
            s.stop()


def answers(base_url: str) -> bool:
    try:
        requests.get(base_url.rstrip("/") + "/__sandbox/state", timeout=0.5)
        return True
    except requests.RequestException:
        return False


def advance(base_url: str, hours: float) -> Any:
    """Move a running simulator's clock (applying the activity of those hours); its answer."""
    return requests.post(base_url + "/__sandbox/advance", json={"hours": hours}, timeout=60).json()
