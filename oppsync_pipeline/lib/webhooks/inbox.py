"""Verified notifications waiting for the sensor: one row per (connection, CRM event id), so a redelivered or
replayed event is stored once.

Where: the warehouse when it is Postgres (schema oppsync); beside a DuckDB warehouse a SQLite file, because
DuckDB allows one writing process and the receiver must answer in well under a second, sync or no sync.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table, Text, create_engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.lib.warehouse.dialect import is_duckdb_url
from oppsync_pipeline.lib.webhooks.receiver import Notification

metadata = MetaData(schema="oppsync")
webhook_inbox = Table(
    "webhook_inbox",
    metadata,
    Column("event_key", String, primary_key=True),  # connection + ":" + the CRM's event id
    Column("connection", String, nullable=False),
    Column("crm", String, nullable=False),
    Column("kind", String),
    Column("object_ids", Text),  # JSON list of opportunity ids
    Column("occurred_at", DateTime),
    Column("received_at", DateTime, nullable=False),
    Column("claimed_by", String),  # the sensor's run key for the sync that picks it up
    Column("claimed_at", DateTime),
    Index("ix_webhook_inbox_pending", "connection", "claimed_by"),
)


def inbox_url(cfg: OppsyncConfig) -> str:
    if cfg.webhooks.inbox_url:
        return cfg.webhooks.inbox_url
    url = cfg.warehouse.url
    if is_duckdb_url(url):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        base = Path(path).parent if path and path != ":memory:" else Path(".oppsync")
        return f"sqlite:///{base / 'webhook_inbox.sqlite'}"
    return url


@cache
def inbox_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # SQLite has no schemas: the table lives in the file's main database
        engine = create_engine(url, connect_args={"timeout": 30}).execution_options(
            schema_translate_map={"oppsync": None}
        )
    elif is_duckdb_url(url):
        raise ValueError("webhooks.inbox_url: DuckDB allows one writer; use sqlite:///path or Postgres")
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    for attempt in range(5):
        try:
            with engine.begin() as c:
                if engine.dialect.name == "postgresql":
                    c.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS oppsync")
                metadata.create_all(c, checkfirst=True)
            break
        except IntegrityError:
            # Postgres' IF NOT EXISTS is not atomic: a sync migrating the same fresh database at the same moment
            # makes one of the two fail with a unique violation; the schema exists now, so try again.
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    return engine


def engine_for(cfg: OppsyncConfig) -> Engine:
    return inbox_engine(inbox_url(cfg))


def add(engine: Engine, connection: str, crm: str, notes: Iterable[Notification], now: datetime) -> tuple[int, int]:
    """Store notifications; returns (new, already there). An event id seen before is not stored again."""
    rows = [
        {
            "event_key": f"{connection}:{n.event_id}",
            "connection": connection,
            "crm": crm,
            "kind": n.kind,
            "object_ids": json.dumps(list(n.object_ids)),
            "occurred_at": n.occurred_at,
            "received_at": now,
        }
        for n in notes
    ]
    if not rows:
        return 0, 0
    insert = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(webhook_inbox)
    statement = insert.on_conflict_do_nothing(index_elements=["event_key"])
    new = 0
    with engine.begin() as c:
        for row in rows:  # one by one: executemany's rowcount is not reliable across drivers (<= 100 per request)
            new += c.execute(statement, row).rowcount
    return new, len(rows) - new


def pending(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Unclaimed notifications, per connection, oldest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as c:
        rows = c.execute(
            select(webhook_inbox).where(webhook_inbox.c.claimed_by.is_(None)).order_by(webhook_inbox.c.received_at)
        )
        for r in rows:
            out.setdefault(r.connection, []).append(dict(r._mapping))
    return out


def claim(engine: Engine, event_keys: list[str], run_key: str, now: datetime) -> None:
    with engine.begin() as c:
        c.execute(
            update(webhook_inbox)
            .where(webhook_inbox.c.event_key.in_(event_keys), webhook_inbox.c.claimed_by.is_(None))
            .values(claimed_by=run_key, claimed_at=now)
        )
