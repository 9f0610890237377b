"""Who is who, per connection: the CRM's users and stages, internal users and their links to CRM users, and
the connection settings the mart needs. Each is replaced wholesale on every extract."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete

from oppsync_pipeline.lib.record import CrmUser, StageInfo, clean_text
from oppsync_pipeline.lib.warehouse.dialect import Bind, bulk_insert
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import connections, crm_stages, crm_users, user_links
from oppsync_pipeline.lib.warehouse.schema import users as internal_users


def save_users(engine: Bind, connection: str, users: Iterable[CrmUser], now: datetime) -> int:
    rows = {u.crm_user_id: u for u in users}
    with transaction(engine) as conn:
        conn.execute(delete(crm_users).where(crm_users.c.connection == connection))
        return bulk_insert(
            conn,
            f"{S}.crm_users",
            ["connection", "crm_user_id", "name", "email", "kind", "active", "alt_ids", "updated_at"],
            [
                (
                    connection,
                    u.crm_user_id,
                    clean_text(u.name),
                    clean_text(u.email),
                    u.kind,
                    u.active,
                    ",".join(u.alt_ids),
                    now,
                )
                for u in rows.values()
            ],
        )


def save_stages(engine: Bind, connection: str, stages: Iterable[StageInfo], categories: dict[str, str]) -> int:
    """The tenant's stages with their category; the connection's stage mapping overrides the CRM's flags."""
    rows = []
    for s in stages:
        category = categories.get(s.key) or categories.get(s.label) or s.category
        rows.append(
            (
                connection,
                s.key,
                clean_text(s.label),
                s.pipeline,
                s.is_closed,
                s.is_won,
                s.sort_order,
                s.probability,
                category,
            )
        )
    with transaction(engine) as conn:
        conn.execute(delete(crm_stages).where(crm_stages.c.connection == connection))
        return bulk_insert(
            conn,
            f"{S}.crm_stages",
            [
                "connection",
                "stage_key",
                "label",
                "pipeline",
                "is_closed",
                "is_won",
                "sort_order",
                "probability",
                "category",
            ],
            rows,
        )


def save_directory(engine: Bind, cfg: Any, now: datetime) -> None:
    """Internal users, their links to CRM users (in configured order: first linked wins), and connection
    settings the mart needs. Replaced wholesale from configuration; attribution is computed at read time,
    so a link added later credits past opportunities too (retroactive)."""
    with transaction(engine) as conn:
        conn.execute(delete(user_links))
        conn.execute(delete(internal_users))
        bulk_insert(conn, f"{S}.users", ["user_id", "name", "email"], [(u.id, u.name, u.email) for u in cfg.users])
        links, order = [], 0
        for u in cfg.users:
            for connection, ids in u.crm_ids.items():
                for crm_id in ids:
                    order += 1
                    links.append((u.id, connection, str(crm_id), order, now))
        bulk_insert(conn, f"{S}.user_links", ["user_id", "connection", "crm_user_id", "link_order", "linked_at"], links)
        conn.execute(delete(connections))
        bulk_insert(
            conn,
            f"{S}.connections",
            ["name", "crm", "qualified_stages", "qualified_min_probability", "updated_at"],
            [
                (
                    c.name,
                    c.crm,
                    "\x1f".join(c.qualification.stages) if c.qualification else None,
                    c.qualification.min_probability if c.qualification else None,
                    now,
                )
                for c in cfg.connections
            ],
        )
