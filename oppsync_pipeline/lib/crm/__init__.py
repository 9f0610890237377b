"""CRM connectors, one module per CRM, all of the same shape (see base.py); the CRMs themselves are listed
once, in registry.py. Nothing here imports a connector: `lib.config` reads the registry and the connectors
import `lib.config`."""

from __future__ import annotations

from oppsync_pipeline.lib.crm.registry import CRMS, REGISTRY, CrmSpec, connector_class, spec

__all__ = ["CRMS", "REGISTRY", "CrmSpec", "connector_class", "spec"]
