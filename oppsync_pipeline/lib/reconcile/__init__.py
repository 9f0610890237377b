"""Reconcile: apply a completed extract to current state, events and history (apply.py, statements in sql/)."""

from oppsync_pipeline.lib.reconcile.apply import (  # noqa: F401
    DATA_COLUMNS,
    DeleteGuardRefused,
    ReconcileResult,
    reconcile,
)
