"""An in-memory reference model of the reconcile rules, written from the rules, not from the SQL.

It holds the same three things the warehouse holds (current rows, the event log, the history) as plain
dicts, in the same shape `harness.snapshot` reads them, so a property test can compare the two with ==.
Record by record, in plain Python:
  the staged rows of an id collapse to its latest version (latest modified_at, NULL oldest; ties: staged last),
  with that row's scope verdict (in / filtered_out / before_stage)
  unknown id, in scope  -> created at the CRM's created date (+ closed_won/lost at the close time if closed)
  unknown id otherwise  -> ignored
  filtered_out, tracked -> left_scope (values frozen, in_scope false); otherwise ignored
  deleted id seen again -> restored, then judged like a changed one against its last values
  out-of-scope id again -> entered_scope, then judged like a changed one
  a changed record      -> one event per kind: a status change is closed_won/lost (at the close time) or
                           reopened and owns the status, stage and close-time fields; else a stage move is
                           stage_changed (owning stage, stage id, status label); every other field: updated
  close time            -> the CRM's (crm_closed_at) when it has one; else kept while the status stays; else
                           modified_at (else the run's time), with its source
  nothing changed       -> nothing at all (row, version, last_run_id, modified_at untouched)
  live id absent from a full run, or in the delete feed -> deleted (feed time wins, else the run's time);
  a full run whose inferred deletes exceed max_delete_share of the live rows is refused and changes nothing
History: a change closes the open version at the run's time and opens version+1; a delete only closes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from oppsync_pipeline.lib.reconcile import DATA_COLUMNS, DeleteGuardRefused, ReconcileResult
from oppsync_pipeline.lib.record import TRACKED_FIELDS, Opportunity, clean_text, row_hash, to_utc
from oppsync_pipeline.lib.warehouse.store import SCOPE_FILTERED_OUT, SCOPE_IN

# Written from the contract in dbt/README.md ("one event model"), not imported from the engine.
STATUS_FIELDS = ("status", "stage", "stage_id", "crm_status", "crm_closed_at")
STAGE_FIELDS = ("stage", "stage_id", "crm_status")

TEXT_FIELDS = (
    "project_name",
    "client_name",
    "service_location",
    "sales_executive",
    "owner_crm_id",
    "stage",
    "stage_id",
    "crm_status",
    "currency",
    "created_by_crm_id",
)
CLOSED_EVENT = {"won": "closed_won", "lost": "closed_lost"}


def stored_values(o: Opportunity) -> dict[str, Any]:
    """The record as the warehouse stores it (NUL bytes dropped from text, date-times naive UTC)."""
    values = {c: getattr(o, c) for c in DATA_COLUMNS}
    for f in TEXT_FIELDS:
        values[f] = clean_text(values[f])
    for f in ("created_at", "modified_at", "crm_closed_at"):
        values[f] = to_utc(values[f]) if values[f] else None
    # the warehouse hashes the values as stored, so a NUL appearing or going is no change
    values["row_hash"] = row_hash(*(values[f] for f in TRACKED_FIELDS))
    return values


def latest_per_id(staged: Iterable[tuple[Opportunity, str]]) -> dict[str, tuple[Opportunity, str]]:
    """One (record, scope verdict) per id: the latest modified version (a missing modified_at is older than
    any), ties to the one staged last."""
    best: dict[str, tuple[tuple, tuple[Opportunity, str]]] = {}
    for seq, (o, scope) in enumerate(staged):
        key = (o.modified_at is not None, to_utc(o.modified_at) if o.modified_at else datetime.min, seq)
        if o.source_id not in best or key > best[o.source_id][0]:
            best[o.source_id] = (key, (o, scope))
    return {sid: item for sid, (_, item) in best.items()}


def close_time(new: dict[str, Any], old: dict[str, Any] | None, obs: datetime) -> tuple[Any, Any]:
    if new["status"] == "open":
        return None, None
    if new["crm_closed_at"] is not None:
        return new["crm_closed_at"], new["crm_closed_at_field"] or "crm"
    if old is not None and old["status"] == new["status"] and old["closed_at"] is not None:
        return old["closed_at"], old["closed_at_source"] or "modified_at"
    return new["modified_at"] or obs, "modified_at" if new["modified_at"] else "observed"


@dataclass
class Model:
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def reconcile(
        self,
        *,
        run_id: str,
        mode: str,
        staged: Sequence[Opportunity],
        deletes: Sequence[tuple[str, datetime | None]],
        observed_at: datetime,
        recorded_at: datetime,
        max_delete_share: float = 0.5,
        scopes: dict[str, str] | None = None,
    ) -> ReconcileResult:
        """Apply one complete extract (`staged` in staging order; `scopes`: verdicts other than `in`, by id).
        All or nothing, like the engine."""
        before = copy.deepcopy((self.current, self.history, self.events))
        scopes = scopes or {}
        items = [(o, scopes.get(o.source_id, SCOPE_IN)) for o in staged]
        try:
            return self._apply(run_id, mode, items, deletes, observed_at, recorded_at, max_delete_share)
        except DeleteGuardRefused:
            self.current, self.history, self.events = before
            raise

    def _apply(self, run_id, mode, staged, deletes, obs, rec, max_share) -> ReconcileResult:
        src = latest_per_id(staged)
        live = [sid for sid, row in self.current.items() if row["deleted_at"] is None]
        result = ReconcileResult(fetched=len(src))

        # deletes are decided against the state before this run
        to_delete: dict[str, tuple[datetime, bool]] = {}  # id -> (deleted_at, inferred only)
        if mode == "full":
            to_delete = {sid: (obs, True) for sid in live if sid not in src}
        feed: dict[str, datetime] = {}
        for sid, at in deletes:
            if sid in self.current and self.current[sid]["deleted_at"] is None and sid not in src:
                at = to_utc(at) if at else obs
                feed[sid] = max(feed.get(sid, at), at)
        to_delete.update({sid: (at, False) for sid, at in feed.items()})
        inferred = sum(1 for _, only_inferred in to_delete.values() if only_inferred)
        if mode == "full" and live and inferred > max_share * len(live):
            raise DeleteGuardRefused(f"would delete {inferred} of {len(live)}")

        for sid, (o, scope) in src.items():
            self._apply_record(run_id, sid, stored_values(o), scope, obs, rec, result)
        result.events = 0
        for sid, (at, _) in to_delete.items():
            row = self.current[sid]
            self._event(run_id, sid, "deleted", at, rec, row)
            row["deleted_at"], row["last_run_id"] = at, run_id
            self.history[(sid, row["version"])]["valid_to"] = obs
        result.deleted = len(to_delete)
        result.events = sum(1 for e in self.events if e["run_id"] == run_id)
        return result

    def _apply_record(self, run_id, sid, new, scope, obs, rec, result) -> None:
        old = self.current.get(sid)
        changed_at = new["modified_at"] or obs
        if old is None:
            if scope != SCOPE_IN:
                result.skipped += 1
                return
            result.created += 1
            self._event(run_id, sid, "created", new["created_at"] or obs, rec, new)
            closed_at, source = close_time(new, None, obs)
            if new["status"] != "open":
                result.closed += 1
                self._event(run_id, sid, CLOSED_EVENT[new["status"]], closed_at, rec, new)
            self.current[sid] = {
                **new,
                "version": 1,
                "first_seen_at": obs,
                "last_seen_at": obs,
                "closed_at": closed_at,
                "closed_at_source": source,
                "deleted_at": None,
                "last_run_id": run_id,
                "in_scope": True,
                "scope_changed_at": None,
            }
            self._new_version(sid, 1, new, obs, run_id)
            return
        if scope == SCOPE_FILTERED_OUT:
            if old["deleted_at"] is None and old["in_scope"]:
                result.left_scope += 1
                self._event(run_id, sid, "left_scope", changed_at, rec, old)
                old.update(in_scope=False, scope_changed_at=obs, last_run_id=run_id)
            else:
                result.skipped += 1
            return
        restored = old["deleted_at"] is not None
        entered = not restored and not old["in_scope"]
        fields = [f for f in TRACKED_FIELDS if new[f] != old[f]]
        if not (restored or entered or new["row_hash"] != old["row_hash"]):
            fields = []
        if not restored and not entered and not fields:
            result.skipped += 1
            return
        if restored:
            result.restored += 1
            self._event(run_id, sid, "restored", changed_at, rec, new)
        if entered:
            result.entered_scope += 1
            self._event(run_id, sid, "entered_scope", changed_at, rec, new)
            old.update(in_scope=True, scope_changed_at=obs, last_run_id=run_id)
            if not fields:
                return
        status_moved = new["status"] != old["status"]
        stage_moved = new["stage"] != old["stage"] or new["stage_id"] != old["stage_id"]
        closed_at, source = close_time(new, old, obs)
        if fields and status_moved:
            changed = ",".join(f for f in STATUS_FIELDS if f in fields)
            if new["status"] != "open":
                result.closed += 1
                self._event(
                    run_id,
                    sid,
                    CLOSED_EVENT[new["status"]],
                    closed_at,
                    rec,
                    new,
                    changed_fields=changed,
                    old=old["status"],
                    new_value=new["status"],
                )
            else:
                result.reopened += 1
                self._event(
                    run_id,
                    sid,
                    "reopened",
                    changed_at,
                    rec,
                    new,
                    changed_fields=changed,
                    old=old["status"],
                    new_value="open",
                )
        elif fields and stage_moved:
            result.stage_changed += 1
            self._event(
                run_id,
                sid,
                "stage_changed",
                changed_at,
                rec,
                new,
                changed_fields=",".join(f for f in STAGE_FIELDS if f in fields),
                old=old["stage"],
                new_value=new["stage"],
            )
        updated = [f for f in TRACKED_FIELDS if f in fields and f not in STATUS_FIELDS]
        if "crm_status" in fields and not status_moved and not stage_moved:
            updated.append("crm_status")
        if "crm_closed_at" in fields and not status_moved:
            updated.append("crm_closed_at")
        if updated:
            result.updated += 1
            self._event(run_id, sid, "updated", changed_at, rec, new, changed_fields=",".join(updated))
        if not restored:
            self.history[(sid, old["version"])]["valid_to"] = obs
        version = old["version"] + 1
        self.current[sid] = {
            **old,
            **new,
            "version": version,
            "last_seen_at": obs,
            "closed_at": closed_at,
            "closed_at_source": source,
            "deleted_at": None,
            "last_run_id": run_id,
        }
        self._new_version(sid, version, new, obs, run_id)

    def _new_version(self, sid, version, values, obs, run_id) -> None:
        self.history[(sid, version)] = {
            "source_id": sid,
            "version": version,
            **values,
            "valid_from": obs,
            "valid_to": None,
            "run_id": run_id,
        }

    def _event(
        self, run_id, sid, event_type, occurred_at, rec, row, changed_fields=None, old=None, new_value=None
    ) -> None:
        self.events.append(
            {
                "run_id": run_id,
                "source_id": sid,
                "event_type": event_type,
                "occurred_at": occurred_at,
                "recorded_at": rec,
                "changed_fields": changed_fields,
                "old_value": old,
                "new_value": new_value,
                "owner_crm_id": row["owner_crm_id"],
                "created_by_crm_id": row["created_by_crm_id"],
                "amount": row["amount"],
                "status": row["status"],
                "change_id": f"{run_id}:{sid}",
            }
        )

    # --- the shapes harness.current / events / history read from the warehouse -------------------------
    def current_rows(self, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {
            sid: {"source_id": sid, **{c: row[c] for c in columns if c != "source_id"}}
            for sid, row in sorted(self.current.items())
        }

    def event_rows(self) -> list[dict[str, Any]]:
        return sorted(self.events, key=lambda e: (e["run_id"], e["source_id"], e["event_type"]))

    def history_rows(self, columns: Sequence[str]) -> list[dict[str, Any]]:
        return [{c: self.history[key][c] for c in columns} for key in sorted(self.history)]
