"""The CRMs oppsync knows, one spec each: the only list of CRMs in the code.

Configuration (the `crm:` values it accepts), the sandbox cluster (which simulators, on which ports), the CLI,
the reliability harness and the benchmarks read these specs instead of keeping their own lists. Adding a CRM
is its connector (`lib/crm/<crm>.py`), its simulator (`sandbox/<crm>.py`), one `CrmSpec` below and one entry in
the connector contract suite (tests/crm/test_contract.py).

Importing this module is cheap: connectors and simulators are named by path and imported on first use (the
simulators alone are ~6,000 lines and `config.py`, which the connectors import, reads this module).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector
    from oppsync_pipeline.lib.webhooks.receiver import WebhookReceiver
    from oppsync_pipeline.lib.writeback.writer import RevenueWriter


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)  # identity: one spec per CRM, hashable
class CrmSpec:
    name: str
    # "module:Class" of the connector (a CrmConnector) and the simulator module (exposing `build`,
    # `SANDBOX_CREDENTIALS`, `VARIANTS`, `truth`, see sandbox/cluster.py)
    connector: str
    simulator: str
    # `oppsync sandbox serve` port (the CLI's --port-base shifts all of them together)
    port: int
    # what a connection's `credentials:` must hold, and which of them are secrets (client ids, usernames and
    # company ids are not): the reliability suite plants a recognisable value in the first secret key
    credential_keys: tuple[str, ...]
    secret_keys: tuple[str, ...]
    # regex on the URL path of the requests that return pages of opportunities (faults are aimed at these so
    # they land mid-paging, not on the stage or user lists read before)
    page_path: str
    # where an opportunity page's records carry these canonical fields (dotted paths nest; HubSpot's
    # records carry them under `properties`); "optional" is a field the mapping does without
    page_fields: Mapping[str, str]
    # the per-CRM page of docs/ (prerequisites, permissions, fallbacks)
    docs: str
    # "module:Class" of the revenue writer (a lib.writeback.writer.RevenueWriter, seed 000's mapping)
    writer: str = ""
    # "module:Class" of the webhook receiver (a lib.webhooks.receiver.WebhookReceiver); "" when the CRM sends no
    # opportunity notifications, and `webhooks_note` says why
    webhooks: str = ""
    webhooks_note: str = ""
    # `options:` a test or benchmark connection sets so that it does not wait on a limit the real API needs
    # and the simulator enforces on real time (HubSpot's search throttle)
    test_options: Mapping[str, Any] = field(default_factory=_frozen)
    # `options:` that turn off optional reads costing one request per opportunity (ConnectWise's forecast),
    # for tests and benchmarks that do not test them
    lean_options: Mapping[str, Any] = field(default_factory=_frozen)
    # `options:` every sandbox connection needs; "{url}" is replaced by the simulator's URL (Dynamics: the
    # Entra ID token endpoint is served by the simulator, not login.microsoftonline.com)
    sandbox_options: Mapping[str, Any] = field(default_factory=_frozen)

    def connector_class(self) -> type[CrmConnector]:
        module, _, name = self.connector.partition(":")
        return getattr(importlib.import_module(module), name)

    def writer_class(self) -> type[RevenueWriter]:
        if not self.writer:
            raise NotImplementedError(f"{self.name}: no revenue writer yet")
        module, _, name = self.writer.partition(":")
        return getattr(importlib.import_module(module), name)

    def webhook_receiver_class(self) -> type[WebhookReceiver]:
        if not self.webhooks:
            raise NotImplementedError(f"{self.name}: no opportunity webhooks ({self.webhooks_note or 'polling only'})")
        module, _, name = self.webhooks.partition(":")
        return getattr(importlib.import_module(module), name)

    def simulator_module(self) -> ModuleType:
        return importlib.import_module(self.simulator)

    def sandbox_connection_options(self, url: str) -> dict[str, Any]:
        return {k: v.replace("{url}", url) if isinstance(v, str) else v for k, v in self.sandbox_options.items()}


SPECS: tuple[CrmSpec, ...] = (
    CrmSpec(
        "salesforce",
        "oppsync_pipeline.lib.crm.salesforce:SalesforceConnector",
        "oppsync_pipeline.sandbox.salesforce",
        8701,
        credential_keys=("client_id", "client_secret"),
        secret_keys=("client_secret",),
        page_path=r"/query",
        page_fields=_frozen({"project_name": "Name", "created_at": "CreatedDate", "optional": "Amount"}),
        docs="docs/crms/salesforce.md",
        writer="oppsync_pipeline.lib.writeback.salesforce:SalesforceWriter",
        webhooks="oppsync_pipeline.lib.webhooks.salesforce:SalesforceReceiver",
    ),
    CrmSpec(
        "hubspot",
        "oppsync_pipeline.lib.crm.hubspot:HubSpotConnector",
        "oppsync_pipeline.sandbox.hubspot",
        8702,
        credential_keys=("access_token",),
        secret_keys=("access_token",),
        page_path=r"/objects/(?:deals|0-3)(?:/search)?$",
        page_fields=_frozen({"project_name": "dealname", "created_at": "createdate", "optional": "amount"}),
        docs="docs/crms/hubspot.md",
        writer="oppsync_pipeline.lib.writeback.hubspot:HubSpotWriter",
        webhooks="oppsync_pipeline.lib.webhooks.hubspot:HubSpotReceiver",
        test_options=_frozen({"search_requests_per_second": 0, "requests_per_10_seconds": 0}),
    ),
    CrmSpec(
        "dynamics",
        "oppsync_pipeline.lib.crm.dynamics:DynamicsConnector",
        "oppsync_pipeline.sandbox.dynamics",
        8703,
        credential_keys=("tenant_id", "client_id", "client_secret"),
        secret_keys=("client_secret",),
        page_path=r"/opportunities$",
        page_fields=_frozen({"project_name": "name", "created_at": "createdon", "optional": "estimatedvalue"}),
        docs="docs/crms/dynamics.md",
        writer="oppsync_pipeline.lib.writeback.dynamics:DynamicsWriter",
        webhooks="oppsync_pipeline.lib.webhooks.dynamics:DynamicsReceiver",
        sandbox_options=_frozen({"authority_url": "{url}", "change_tracking": True}),
    ),
    CrmSpec(
        "connectwise",
        "oppsync_pipeline.lib.crm.connectwise:ConnectWiseConnector",
        "oppsync_pipeline.sandbox.connectwise",
        8704,
        credential_keys=("company_id", "public_key", "private_key", "client_id"),
        secret_keys=("private_key",),
        page_path=r"/sales/opportunities$",
        page_fields=_frozen(
            {"project_name": "name", "created_at": "_info.dateEntered", "optional": "expectedCloseDate"}
        ),
        docs="docs/crms/connectwise.md",
        writer="oppsync_pipeline.lib.writeback.connectwise:ConnectWiseWriter",
        webhooks="oppsync_pipeline.lib.webhooks.connectwise:ConnectWiseReceiver",
        lean_options=_frozen({"forecast": False}),
    ),
    CrmSpec(
        "autotask",
        "oppsync_pipeline.lib.crm.autotask:AutotaskConnector",
        "oppsync_pipeline.sandbox.autotask",
        8705,
        credential_keys=("username", "secret", "integration_code"),
        secret_keys=("secret",),
        page_path=r"(?i)/opportunities/query(?:/next)?$",  # pages only, not query/count (paths ignore case)
        page_fields=_frozen({"project_name": "title", "created_at": "createDate", "optional": "amount"}),
        docs="docs/crms/autotask.md",
        writer="oppsync_pipeline.lib.writeback.autotask:AutotaskWriter",
        webhooks_note="Autotask's Opportunities entity has supportsWebhookCallouts false: webhooks exist for companies, "
        "contacts, configuration items, tickets and ticket notes only; opportunities are polled",
    ),
)

REGISTRY: Mapping[str, CrmSpec] = MappingProxyType({s.name: s for s in SPECS})
CRMS: tuple[str, ...] = tuple(REGISTRY)


def spec(crm: str) -> CrmSpec:
    try:
        return REGISTRY[crm]
    except KeyError:
        raise KeyError(f"unknown CRM {crm!r}; one of {list(CRMS)}") from None


def connector_class(crm: str) -> type[CrmConnector]:
    return spec(crm).connector_class()
