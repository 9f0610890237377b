"""CRM connectors, one module per CRM, all of the same shape (see base.py)."""

from __future__ import annotations

import importlib

from oppsync_pipeline.lib.crm.base import CrmConnector

_MODULES = {
    "salesforce": ("oppsync_pipeline.lib.crm.salesforce", "SalesforceConnector"),
    "hubspot": ("oppsync_pipeline.lib.crm.hubspot", "HubSpotConnector"),
    "dynamics": ("oppsync_pipeline.lib.crm.dynamics", "DynamicsConnector"),
    "connectwise": ("oppsync_pipeline.lib.crm.connectwise", "ConnectWiseConnector"),
    "autotask": ("oppsync_pipeline.lib.crm.autotask", "AutotaskConnector"),
}


def connector_class(crm: str) -> type[CrmConnector]:
    module, name = _MODULES[crm]
    return getattr(importlib.import_module(module), name)
