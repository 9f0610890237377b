"""An in-memory reference model of the reconcile rules, written from the rules, not from the SQL.

It holds the same three things the warehouse holds (current rows, the event log, the history) as plain
dicts, in the same shape `harness.snapshot` reads them, so a property test can compare the two with ==.
Record by record, in plain Python:
  the staged rows of an id collapse to its latest version (latest modified_at, NULL oldest; ties: staged last)
  unknown id            -> created at the CRM's created date (+ closed_won/lost at modified_at if closed)
  deleted id seen again -> restored, then judged like a changed one against its last values
  tracked value changed -> updated (fields in TRACKED_FIELDS order); stage -> stage_changed (old/new);
                           open -> won/lost: closed_won/lost; won/lost -> open: reopened
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

from oppsync_pipeline.lib.record import TRACKED_FIELDS, Opportunity, clean_text, row_hash, to_utc
from oppsync_pipeline.lib.warehouse.reconcile import DATA_COLUMNS, DeleteGuardRefused, ReconcileResult

TEXT_FIELDS = ("project_name", "client_name", "service_location", "sales_executive", "owner_crm_id", "stage",
               "stage_id", "crm_status", "currency", "created_by_crm_id")
CLOSED_EVENT = {"won": "closed_won", "lost": "closed_lost"}


def stored_values(o: Opportunity) -> dict[str, Any]:
    """The record as the warehouse stores it (NUL bytes dropped from text, date-times naive UTC)."""
    values = {c: getattr(o, c) for c in DATA_COLUMNS}
    for f in TEXT_FIELDS:
        values[f] = clean_text(values[f])
    for f in ("created_at", "modified_at"):
        values[f] = to_utc(values[f]) if values[f] else None
    # the warehouse hashes the values as stored, so a NUL appearing or going is no change
    values["row_hash"] = row_hash(*(values[f] for f in TRACKED_FIELDS))
    return values


def latest_per_id(staged: Iterable[Opportunity]) -> dict[str, Opportunity]:
    """One record per id: the latest modified version (a missing modified_at is older than any), ties to
    the one staged last."""
    best: dict[str, tuple[tuple, Opportunity]] = {}
    for seq, o in enumerate(staged):
        key = (o.modified_at is not None, to_utc(o.modified_at) if o.modified_at else datetime.min, seq)
        if o.source_id not in best or key > best[o.source_id][0]:
            best[o.source_id] = (key, o)
    return {sid: o for sid, (_, o) in best.items()}


@dataclass
class Model:
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def reconcile(self, *, run_id: str, mode: str, staged: Sequence[Opportunity],
                  deletes: Sequence[tuple[str, datetime | None]], observed_at: datetime, recorded_at: datetime,
                  max_delete_share: float = 0.5) -> ReconcileResult:
        """Apply one complete extract (`staged` in staging order). All or nothing, like the engine."""
        before = copy.deepcopy((self.current, self.history, self.events))
        try:
            return self._apply(run_id, mode, staged, deletes, observed_at, recorded_at, max_delete_share)
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

        for sid, o in src.items():
            self._apply_record(run_id, sid, stored_values(o), obs, rec, result)
        for sid, (at, _) in to_delete.items():
            row = self.current[sid]
            self._event(run_id, sid, "deleted", at, rec, row)
            row["deleted_at"], row["last_run_id"] = at, run_id
            self.history[(sid, row["version"])]["valid_to"] = obs
        result.deleted = len(to_delete)
        result.events = sum(1 for e in self.events if e["run_id"] == run_id)
        return result

    def _apply_record(self, run_id, sid, new, obs, rec, result) -> None:
        old = self.current.get(sid)
        changed_at = new["modified_at"] or obs
        if old is None:
            result.created += 1
            self._event(run_id, sid, "created", new["created_at"] or obs, rec, new)
            if new["status"] != "open":
                result.closed += 1
                self._event(run_id, sid, CLOSED_EVENT[new["status"]], changed_at, rec, new)
            self.current[sid] = {**new, "version": 1, "first_seen_at": obs, "last_seen_at": obs,
                                 "closed_at": changed_at if new["status"] != "open" else None, "deleted_at": None,
                                 "last_run_id": run_id}
            self._new_version(sid, 1, new, obs, run_id)
            return
        fields = [f for f in TRACKED_FIELDS if new[f] != old[f]]
        restored = old["deleted_at"] is not None
        if not restored and not (fields and new["row_hash"] != old["row_hash"]):
            result.skipped += 1
            return
        if restored:
            result.restored += 1
            self._event(run_id, sid, "restored", changed_at, rec, new)
        if fields:
            result.updated += 1
            self._event(run_id, sid, "updated", changed_at, rec, new, changed_fields=",".join(fields))
        if new["stage"] != old["stage"]:
            self._event(run_id, sid, "stage_changed", changed_at, rec, new, old=old["stage"], new_value=new["stage"])
        if new["status"] != "open" and new["status"] != old["status"]:
            result.closed += 1
            self._event(run_id, sid, CLOSED_EVENT[new["status"]], changed_at, rec, new, old=old["status"],
                        new_value=new["status"])
        if new["status"] == "open" and old["status"] != "open":
            result.reopened += 1
            self._event(run_id, sid, "reopened", changed_at, rec, new, old=old["status"], new_value="open")
        if new["status"] == "open":
            closed_at = None
        elif old["status"] != new["status"]:
            closed_at = changed_at
        else:
            closed_at = old["closed_at"]
        if not restored:
            self.history[(sid, old["version"])]["valid_to"] = obs
        version = old["version"] + 1
        self.current[sid] = {**old, **new, "version": version, "last_seen_at": obs, "closed_at": closed_at,
                             "deleted_at": None, "last_run_id": run_id}
        self._new_version(sid, version, new, obs, run_id)

    def _new_version(self, sid, version, values, obs, run_id) -> None:
        self.history[(sid, version)] = {"source_id": sid, "version": version, **values, "valid_from": obs,
                                        "valid_to": None, "run_id": run_id}

    def _event(self, run_id, sid, event_type, occurred_at, rec, row, changed_fields=None, old=None,
               new_value=None) -> None:
        self.events.append({
            "run_id": run_id, "source_id": sid, "event_type": event_type, "occurred_at": occurred_at,
            "recorded_at": rec, "changed_fields": changed_fields, "old_value": old, "new_value": new_value,
            "owner_crm_id": row["owner_crm_id"], "created_by_crm_id": row["created_by_crm_id"],
            "amount": row["amount"], "status": row["status"]})

    # --- the shapes harness.current / events / history read from the warehouse -------------------------
    def current_rows(self, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {sid: {"source_id": sid, **{c: row[c] for c in columns if c != "source_id"}}
                for sid, row in sorted(self.current.items())}

    def event_rows(self) -> list[dict[str, Any]]:
        return sorted(self.events, key=lambda e: (e["run_id"], e["source_id"], e["event_type"]))

    def history_rows(self, columns: Sequence[str]) -> list[dict[str, Any]]:
        return [{c: self.history[key][c] for c in columns} for key in sorted(self.history)]
