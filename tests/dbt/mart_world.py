"""Helpers for the dbt project tests: a warehouse filled through the real pipeline code, and dbt runs.

The warehouse is written only through oppsync_pipeline.lib.warehouse (store + reconcile) with canonical
Opportunity records, exactly as a sync would: three runs (full, incremental, full) of two connections,
with closes, an owner change after a close, deletes and an unknown stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.reconcile import reconcile
from oppsync_pipeline.lib.record import CrmUser, Opportunity, StageInfo
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

ROOT = Path(__file__).resolve().parents[2]
DBT_DIR = ROOT / "dbt"
DBT_BIN = Path(sys.executable).parent / "dbt"


# --- the world -------------------------------------------------------------------------------------------

SF_STAGES = [
    StageInfo("Prospecting", "Prospecting", False, False, 1, probability=10),
    StageInfo("Qualification", "Qualification", False, False, 2, probability=20),
    StageInfo("Proposal", "Proposal/Price Quote", False, False, 3, probability=60),
    StageInfo("Closed Won", "Closed Won", True, True, 4, probability=100),
    StageInfo("Closed Lost", "Closed Lost", True, False, 5, probability=0),
]
HS_STAGES = [
    StageInfo("appointmentscheduled", "Appointment Scheduled", False, False, 1, "default", 20),
    StageInfo("qualifiedtobuy", "Qualified To Buy", False, False, 2, "default", 40),
    StageInfo("closedwon", "Closed Won", True, True, 3, "default", 100),
    StageInfo("closedlost", "Closed Lost", True, False, 4, "default", 0),
]
SF_USERS = [CrmUser("005A", "Alice CRM"), CrmUser("005B", "Bob CRM"), CrmUser("005Z", "Zed CRM")]
# HubSpot: keyed by user id, the owner id as alt id (as the connector writes them); creators reference
# the user id (9001), owners the owner id (101).
HS_USERS = [CrmUser("9001", "Alice HS", alt_ids=("101",)), CrmUser("9002", "Bob HS", alt_ids=("102",))]

CONNECTIONS = {
    "sf": dict(
        crm="salesforce",
        stages=SF_STAGES,
        users=SF_USERS,
        creators=["005A", "005B", "005Z"],
        owners=["005A", "005B", "005Z"],
        open=["Prospecting", "Qualification", "Proposal"],
        won="Closed Won",
        lost="Closed Lost",
    ),
    "hs": dict(
        crm="hubspot",
        stages=HS_STAGES,
        users=HS_USERS,
        creators=["9001", "9002", "9999"],
        owners=["101", "102"],
        open=["appointmentscheduled", "qualifiedtobuy"],
        won="closedwon",
        lost="closedlost",
    ),
}

BASE_USERS = [
    # order matters: links are numbered in this order and the first linked user wins (seed 002)
    {"id": "alice", "name": "Alice Adams", "crm_ids": {"sf": ["005A"], "hs": ["101"]}},
    {"id": "carol", "name": "Carol Clark", "crm_ids": {"sf": ["005A"]}},
    {"id": "bob", "name": "Bob Brown", "crm_ids": {"sf": ["005B"], "hs": ["9002"]}},
]
ERIN = {"id": "erin", "name": "Erin Evans", "crm_ids": {"sf": ["005Z"]}}

RUN1, RUN2, RUN3 = datetime(2026, 3, 21, 6), datetime(2026, 3, 22, 6), datetime(2026, 3, 23, 6)


def config(users: list[dict]) -> Any:
    return parse_config(
        {
            "connections": [
                {
                    "name": "sf",
                    "crm": "salesforce",
                    "base_url": "https://example.my.salesforce.com",
                    "qualification": {"stages": ["Qualification"], "min_probability": 60},
                },
                {
                    "name": "hs",
                    "crm": "hubspot",
                    "base_url": "https://api.hubapi.com",
                    "qualification": {"stages": ["Qualified To Buy"]},
                },
            ],
            "users": users,
        }
    )


@dataclass
class World:
    opps: dict[str, dict[str, Opportunity]] = field(default_factory=dict)  # connection -> id -> record
    deleted: set[tuple[str, str]] = field(default_factory=set)
    facts: dict[str, Any] = field(default_factory=dict)


def _opp(
    conn: str,
    sid: str,
    *,
    stage: str,
    status: str,
    owner: str,
    creator: str,
    created: datetime,
    modified: datetime,
    amount: float,
    probability: float,
) -> Opportunity:
    c = CONNECTIONS[conn]
    return Opportunity(
        conn,
        c["crm"],
        sid,
        f"Project {sid}",
        f"Client {sid[-2:]}",
        "Austin",
        "Dana",
        owner,
        stage,
        status,
        amount,
        "USD",
        date(2026, 6, 30),
        probability,
        created,
        creator,
        modified,
        {"id": sid},
        amount_base=amount,  # single-currency connections: the amount is in the base currency
        base_currency="USD",
    )


def _replace(o: Opportunity, **changes: Any) -> Opportunity:
    return dataclasses.replace(o, **changes)


def build_world(n: int = 150, seed: int = 7) -> tuple[World, list[dict[str, list[Opportunity]]]]:
    """The opportunities each of the three runs sees, per connection (run 2 is incremental)."""
    rng = random.Random(seed)
    world = World()
    runs: list[dict[str, list[Opportunity]]] = [{}, {}, {}]
    for conn, c in CONNECTIONS.items():
        probs = {s.key: s.probability for s in c["stages"]}
        current: dict[str, Opportunity] = {}
        for i in range(n):
            created = datetime(2025, 10, 1) + timedelta(minutes=rng.randrange(0, 170 * 24 * 60))
            r = rng.random()
            stage = c["won"] if r < 0.2 else c["lost"] if r < 0.35 else rng.choice(c["open"])
            status = "won" if stage == c["won"] else "lost" if stage == c["lost"] else "open"
            modified = created + timedelta(hours=rng.randrange(1, 400))
            modified = min(modified, RUN1 - timedelta(hours=1))
            current[f"{conn}-{i:04d}"] = _opp(
                conn,
                f"{conn}-{i:04d}",
                stage=stage,
                status=status,
                owner=rng.choice(c["owners"]),
                creator=rng.choice(c["creators"]),
                created=created,
                modified=modified,
                amount=float(rng.randrange(1, 100) * 100),
                probability=probs[stage],
            )
        if conn == "sf":
            # the time-zone boundary deal: 2026-03-01 23:30 UTC is 2026-03-02 00:30 in Europe/Berlin
            current["sf-tz"] = _opp(
                conn,
                "sf-tz",
                stage="Prospecting",
                status="open",
                owner="005B",
                creator="005B",
                created=datetime(2026, 3, 1, 23, 30),
                modified=datetime(2026, 3, 2),
                amount=1234.0,
                probability=10,
            )
            # won under Alice (run 2), handed to Bob afterwards (run 3): the win stays Alice's
            current["sf-handover"] = _opp(
                conn,
                "sf-handover",
                stage="Proposal",
                status="open",
                owner="005A",
                creator="005Z",
                created=datetime(2026, 2, 10, 12),
                amount=5000.0,
                modified=datetime(2026, 2, 11),
                probability=60,
            )
        runs[0][conn] = list(current.values())

        # run 2 (incremental): close some open deals
        changed = []
        open_ids = sorted(k for k, o in current.items() if o.status == "open" and k not in ("sf-tz", "sf-handover"))
        for k in rng.sample(open_ids, 20):
            won = rng.random() < 0.5
            o = current[k]
            current[k] = _replace(
                o,
                stage=c["won"] if won else c["lost"],
                status="won" if won else "lost",
                modified_at=RUN2 - timedelta(hours=rng.randrange(1, 20)),
                probability=100.0 if won else 0.0,
            )
            changed.append(current[k])
        if conn == "sf":
            current["sf-handover"] = _replace(
                current["sf-handover"],
                stage="Closed Won",
                status="won",
                modified_at=datetime(2026, 3, 21, 23, 0),
                probability=100.0,
            )
            changed.append(current["sf-handover"])
        runs[1][conn] = changed

        # run 3 (full): hand won deals to another owner, delete a few, one deal in a stage crm_stages lacks
        won_ids = sorted(k for k, o in current.items() if o.status == "won" and k != "sf-handover")
        for k in won_ids[:5]:
            o = current[k]
            others = [x for x in c["owners"] if x != o.owner_crm_id]
            current[k] = _replace(o, owner_crm_id=others[0], modified_at=RUN3 - timedelta(hours=2))
        if conn == "sf":
            current["sf-handover"] = _replace(
                current["sf-handover"], owner_crm_id="005B", modified_at=RUN3 - timedelta(hours=2)
            )
            k = sorted(k for k, o in current.items() if o.status == "open" and k != "sf-tz")[0]
            current[k] = _replace(current[k], stage="Legacy Stage", modified_at=RUN3 - timedelta(hours=3))
            world.facts["unknown_stage_id"] = k
        for k in sorted(current)[3:6]:
            world.deleted.add((conn, k))
        runs[2][conn] = [o for k, o in current.items() if (conn, k) not in world.deleted]
        world.opps[conn] = current
    return world, runs


def _sync(
    engine: Any, conn: str, records: list[Opportunity], *, mode: str, at: datetime, run_id: str, page_size: int = 50
) -> None:
    crm = CONNECTIONS[conn]["crm"]
    store.acquire_lock(engine, conn, run_id, at, timedelta(hours=1))
    try:
        store.begin_extract(
            engine,
            extract_id=run_id,
            connection=conn,
            crm=crm,
            mode=mode,
            started_at=at,
            since=None if mode == "full" else at - timedelta(days=1),
        )
        seq = 0
        for open_set in (True, False):
            part = [o for o in records if (o.status == "open") == open_set]
            for i in range(0, len(part), page_size):
                page = part[i : i + page_size]
                store.stage_page(engine, run_id, page, open_set, seq)
                seq += len(page)
        store.finish_extract(engine, run_id, status="complete", finished_at=at + timedelta(minutes=1))
        reconcile(
            engine,
            extract_id=run_id,
            connection=conn,
            crm=crm,
            mode=mode,
            run_id=run_id,
            observed_at=at,
            recorded_at=at + timedelta(minutes=2),
            new_cursor=at,
        )
    finally:
        store.release_lock(engine, conn, run_id)


def fill_warehouse(url: str, n: int = 150) -> World:
    """Fill the oppsync schema at `url` through the pipeline code; returns what was written."""
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        store.save_directory(engine, config(BASE_USERS), RUN1)
        for conn, c in CONNECTIONS.items():
            store.save_users(engine, conn, c["users"], RUN1)
            store.save_stages(engine, conn, c["stages"], {})
        world, runs = build_world(n)
        for n, (mode, at) in enumerate([("full", RUN1), ("incremental", RUN2), ("full", RUN3)]):
            for conn in CONNECTIONS:
                _sync(engine, conn, runs[n][conn], mode=mode, at=at, run_id=f"{conn}-run{n + 1}")
        return world
    finally:
        engine.dispose()


def link_erin(url: str) -> None:
    """A link added after the fact: Erin claims the CRM user 005Z (credits past opportunities too)."""
    engine = make_engine(url)
    try:
        store.save_directory(engine, config([*BASE_USERS, ERIN]), RUN3 + timedelta(days=1))
    finally:
        engine.dispose()


# --- dbt -------------------------------------------------------------------------------------------------


@dataclass
class Dbt:
    target: str
    env: dict[str, str]
    url: str

    def __call__(self, *args: str, vars: dict[str, Any] | None = None) -> subprocess.CompletedProcess:
        cmd = [
            str(DBT_BIN),
            *args,
            "--project-dir",
            str(DBT_DIR),
            "--profiles-dir",
            str(DBT_DIR),
            "--target",
            self.target,
        ]
        if vars:
            cmd += ["--vars", json.dumps(vars)]
        proc = subprocess.run(cmd, cwd=DBT_DIR, env=self.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        return proc

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql), params).fetchall()
        finally:
            engine.dispose()


def dbt_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "OPPSYNC_"))}
    env.update(
        {
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "DO_NOT_TRACK": "1",
            "DBT_TARGET_PATH": str(tmp_path / "dbt_target"),
            "DBT_LOG_PATH": str(tmp_path / "dbt_logs"),
            # the test's own target folder: its later invocations reuse the first one's parse (dbt parses the
            # whole project again when --vars or the profile's environment change)
            "DBT_PARTIAL_PARSE": "true",
            **extra,
        }
    )
    return env
