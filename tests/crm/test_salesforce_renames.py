"""Account renames on incremental syncs: renaming an Account moves Account.SystemModstamp, never its
opportunities' SystemModstamp. The incremental read asks for both in one SOQL, so the new client name reaches
the warehouse with the next incremental sync (DuckDB and Postgres), not only with the next full one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import live_client_names, sandbox_config


def test_a_renamed_account_reaches_the_warehouse_on_the_next_incremental_sync(warehouse_url: str, tmp_path: Path):
    sim = sfsim.build(seed=3, opportunities=120)
    w = sim.world
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"salesforce": srv}, warehouse_url, tmp_path)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            full = sync_connection(cfg, conn, engine, run_id="full", mode="full")
            assert full.extract.status == "complete"
            # an account with open and closed opportunities, none of them touched by the rename
            by_account: dict[int, set[str]] = {}
            for o in w.live():
                if o.account is not None:
                    by_account.setdefault(o.account, set()).add(o.native_id)
            idx = max(by_account, key=lambda a: len(by_account[a]))
            ids = by_account[idx]
            stamps = {i: w.opps[i].modified_at for i in ids}
            w.clock.advance(timedelta(minutes=5))
            with w.lock:  # as world.advance renames an account
                acc = w.accounts[idx]
                old, acc.name, acc.modified_at = acc.name, "Renamed Holdings GmbH", w.clock.now()
                w.version += 1
            assert live_client_names(engine, conn.name)[next(iter(ids))] == old
            w.clock.advance(timedelta(minutes=1))

            inc = sync_connection(cfg, conn, engine, run_id="inc", mode="incremental")
            assert inc.extract.mode == "incremental" and inc.extract.status == "complete"
            assert {i: w.opps[i].modified_at for i in ids} == stamps  # no opportunity cursor moved
            names = live_client_names(engine, conn.name)
            assert {names[i] for i in ids} == {"Renamed Holdings GmbH"}
            # read once each: the run fetched the renamed account's opportunities plus what the cursor's
            # overlap re-reads anyway, and updated only the renamed ones
            since = inc.extract.since
            assert since is not None and since < acc.modified_at
            overlap = {o.native_id for o in w.live() if o.modified_at >= since}
            fetched = inc.extract.counts["open"] + inc.extract.counts["closed"]
            assert fetched == len(ids | overlap) and not ids & overlap
            assert inc.result is not None and inc.result.as_dict()["updated"] == len(ids)
            # the whole warehouse is the tenant as its users see it
            truth = sfsim.truth(sim)
            assert {i: names[i] for i in truth} == {i: t["client_name"] for i, t in truth.items()}
        finally:
            engine.dispose()
