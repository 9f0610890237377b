"""Shared pieces of the reliability suite: what "the warehouse" is when two runs are compared, a hook that
rewrites or reacts to the simulators' opportunity pages, and the full / fast switch.

The comparison is deliberately narrow: current state (the CRM's values per id), events as a multiset of
(source_id, event_type) and history as (source_id, version, row_hash). Timestamps the warehouse stamps from
the wall clock (recorded_at, first_seen_at, valid_from ...) differ between any two runs and are left out.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.crm.registry import REGISTRY, spec
from oppsync_pipeline.sandbox.server import Request, Response, Simulator

# `make reliability` sets this: the whole matrix and every kill point; unset, a representative subset.
FULL = os.environ.get("OPPSYNC_RELIABILITY") == "full"

# The requests that carry pages of opportunities, per simulator (faults are aimed at these so they land
# mid-paging rather than on the stage or user lists read before): each CRM's registry spec.
OPPORTUNITY_PAGES = {crm: s.page_path for crm, s in REGISTRY.items()}


def connection_extra(crm: str, lean: bool = False, **keys: Any) -> dict[str, Any]:
    """What a test adds to a sandbox connection (`sandbox_config(extra={crm: ...})`): the registry's test
    options (limits the simulator enforces on real time that a test need not wait on), with `lean` its lean
    options too (no optional per-opportunity reads), and other connection keys (page_size ...)."""
    merged = {**spec(crm).test_options, **(spec(crm).lean_options if lean else {})}
    return {**keys, **({"options": merged} if merged else {})}


def page_field(crm: str, field: str) -> str:
    """Where `crm`'s opportunity pages carry a field: "id" (the connector's id_field), or a key of the spec's
    page_fields ("project_name", "created_at", "optional")."""
    if field == "id":
        return spec(crm).connector_class().id_field
    return spec(crm).page_fields[field]


CURRENT_COLUMNS = (
    "crm",
    "project_name",
    "client_name",
    "service_location",
    "sales_executive",
    "owner_crm_id",
    "stage",
    "status",
    "amount",
    "currency",
    "close_date",
    "probability",
    "created_at",
    "created_by_crm_id",
    "modified_at",
    "version",
    # an inferred delete is stamped with the run's start (wall clock): compare the fact only
    "deleted_at IS NOT NULL",
)


@dataclass
class Snapshot:
    current: dict[str, tuple]
    events: Counter
    history: set[tuple]

    def differences(self, other: Snapshot, limit: int = 3) -> list[str]:
        """Human-readable differences (empty when equal)."""
        out = []
        mine, theirs = set(self.current), set(other.current)
        if mine - theirs:
            out.append(f"ids only here: {sorted(mine - theirs)[:limit]}")
        if theirs - mine:
            out.append(f"ids missing here: {sorted(theirs - mine)[:limit]}")
        changed = [sid for sid in mine & theirs if self.current[sid] != other.current[sid]]
        if changed:
            sid = sorted(changed)[0]
            out.append(f"{len(changed)} rows differ, e.g. {sid}: {self.current[sid]} != {other.current[sid]}")
        if self.events != other.events:
            extra, lost = self.events - other.events, other.events - self.events
            out.append(
                f"events extra {sum(extra.values())} {list(extra.items())[:limit]}, "
                f"lost {sum(lost.values())} {list(lost.items())[:limit]}"
            )
        if self.history != other.history:
            out.append(
                f"history extra {sorted(self.history - other.history)[:limit]}, "
                f"lost {sorted(other.history - self.history)[:limit]}"
            )
        return out


def _normal(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if hasattr(value, "microsecond") and hasattr(value, "hour"):
        return value.replace(microsecond=value.microsecond // 1000 * 1000)  # DuckDB / Postgres precision
    return value


def snapshot(engine: Engine, connection: str) -> Snapshot:
    with engine.connect() as c:
        has_schema = c.execute(
            text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'oppsync' "
                "AND table_name = 'opportunities'"
            )
        ).scalar()
        if not has_schema:
            return Snapshot({}, Counter(), set())
        rows = c.execute(
            text(f"SELECT source_id, {', '.join(CURRENT_COLUMNS)} FROM oppsync.opportunities WHERE connection = :c"),
            {"c": connection},
        ).fetchall()
        events = c.execute(
            text("SELECT source_id, event_type FROM oppsync.opportunity_events WHERE connection = :c"),
            {"c": connection},
        ).fetchall()
        history = c.execute(
            text("SELECT source_id, version, row_hash FROM oppsync.opportunity_history WHERE connection = :c"),
            {"c": connection},
        ).fetchall()
    return Snapshot(
        {r[0]: tuple(_normal(v) for v in r[1:]) for r in rows},
        Counter((r[0], r[1]) for r in events),
        {tuple(r) for r in history},
    )


def invariants(engine: Engine, connection: str) -> list[str]:
    """What must hold after any sequence of runs: one 'created' per id, history versions 1..n without gaps,
    current version and hash equal to the latest history version, no run that left its lock behind."""
    checks = [
        (
            "ids with != 1 created event",
            "SELECT source_id, count(*) FROM oppsync.opportunity_events WHERE connection = :c "
            "AND event_type = 'created' GROUP BY source_id HAVING count(*) <> 1",
        ),
        (
            "ids without a created event",
            "SELECT o.source_id FROM oppsync.opportunities o WHERE o.connection = :c AND NOT EXISTS (SELECT 1 FROM "
            "oppsync.opportunity_events e WHERE e.connection = o.connection AND e.source_id = o.source_id "
            "AND e.event_type = 'created')",
        ),
        (
            "history versions with gaps",
            "SELECT source_id FROM oppsync.opportunity_history WHERE connection = :c "
            "GROUP BY source_id HAVING max(version) <> count(*) OR min(version) <> 1",
        ),
        (
            "current rows not matching their open history version",
            "SELECT o.source_id FROM oppsync.opportunities o JOIN oppsync.opportunity_history h "
            "ON h.connection = o.connection AND h.source_id = o.source_id AND h.valid_to IS NULL "
            "WHERE o.connection = :c AND (h.version <> o.version OR h.row_hash <> o.row_hash)",
        ),
        ("lock left behind by", "SELECT run_id FROM oppsync.sync_locks WHERE connection = :c"),
    ]
    problems = []
    with engine.connect() as c:
        for what, sql in checks:
            rows = c.execute(text(sql), {"c": connection}).fetchall()
            if rows:
                problems.append(f"{what}: {rows[:3]}")
    return problems


def records_of(body: Any) -> list | None:
    """The list of records in one CRM's page body (Salesforce records, HubSpot results, OData value,
    ConnectWise a bare list, Autotask items)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in ("records", "results", "value", "items"):
            if isinstance(body.get(key), list):
                return body[key]
    return None


@dataclass
class PageHook:
    """Wraps `sim.handle`: each successful opportunity page can be rewritten (`rewrite(records, n, request)`), and
    `after(n)` runs after the n-th page was served (1-based), e.g. to move records in the world mid-sync."""

    sim: Simulator
    crm: str
    rewrite: Callable[[list, int, Request], None] | None = None
    after: Callable[[int], None] | None = None
    # the whole decoded body (envelope included: next links, counts, list keys); returns the body to send, or
    # (body, headers) to change response headers too (ConnectWise's next link is the Link header)
    rewrite_body: Callable[[Any, int, Request], Any] | None = None
    pages: int = 0
    active: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> PageHook:
        import re

        pattern = re.compile(OPPORTUNITY_PAGES[self.crm])
        original = type(self.sim).handle.__get__(self.sim)

        def handle(req: Request) -> Response:
            resp = original(req)
            if not self.active or not pattern.search(req.path) or resp.status != 200 or not resp.body:
                return resp
            with self._lock:
                self.pages += 1
                n = self.pages
            if self.rewrite is not None or self.rewrite_body is not None:
                try:
                    body = json.loads(resp.body)
                except ValueError:
                    return resp
                records = records_of(body)
                if records and self.rewrite is not None:
                    self.rewrite(records, n, req)
                if self.rewrite_body is not None:
                    body = self.rewrite_body(body, n, req)
                headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-type"}
                if isinstance(body, tuple):
                    body, changed = body
                    headers = {k: v for k, v in headers.items() if k.lower() not in {c.lower() for c in changed}}
                    headers.update(changed)
                # ASCII-escaped, as CRMs send it: a rewritten lone surrogate must reach the client as \ud800
                resp = Response(
                    resp.status,
                    json.dumps(body, separators=(",", ":")).encode("ascii"),
                    {**headers, "Content-Type": "application/json"},
                )
            if self.after is not None:
                self.after(n)
            return resp

        self.sim.handle = handle  # type: ignore[method-assign]
        return self

    def remove(self) -> None:
        self.active = False


class RecordingSleep:
    """The client's sleep: recorded, and slept for at most `cap` seconds, so retry storms cost little wall
    time. The cap must cover limits the simulator enforces on real time (HubSpot's 5 searches a second)."""

    def __init__(self, cap: float = 0.05) -> None:
        self.calls: list[float] = []
        self.cap = cap

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        time.sleep(min(seconds, self.cap))


def client_sleep(crm: str) -> RecordingSleep:
    return RecordingSleep(cap=1.0 if crm == "hubspot" else 0.05)
