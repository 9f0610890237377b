"""Every connector maps a page in two steps (base.py): `enrich(page)` does the page's I/O, `_map(record, enriched)`
is pure: no request while a record is mapped, and the record it is given is not changed. Checked against each
CRM's simulator over real HTTP, for the full read of both sets and a read by id."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import requests

from oppsync_pipeline.lib.config import resolve_credentials
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

FAST = {"hubspot": {"options": {"search_requests_per_second": 0}}}


class GuardedSession(requests.Session):
    """A session that refuses to send while `blocked` (a request from inside `_map`)."""

    blocked = False

    def request(self, *args, **kwargs):  # type: ignore[override]
        if self.blocked:
            raise AssertionError(f"network I/O while mapping a record: {args[:2]}")
        return super().request(*args, **kwargs)


@pytest.mark.parametrize("crm", CRMS)
def test_mapping_does_no_io_and_leaves_the_record_as_it_came(crm: str, tmp_path: Path):
    sim = build_simulator(crm, seed=7, opportunities=60)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, "duckdb:///unused.duckdb", tmp_path, extra={crm: FAST.get(crm, {})})
        conn = cfg.connections[0]
        session = GuardedSession()
        connector = connector_class(crm)(conn, resolve_credentials(cfg, conn), session=session)
        real, mapped = connector._map, []

        def guarded(record, enriched=None):
            before = copy.deepcopy(record)
            session.blocked = True
            try:
                return real(record, enriched)
            finally:
                session.blocked = False
                assert record == before, "_map changed the record it was given"
                mapped.append(record)

        connector._map = guarded  # type: ignore[method-assign]
        got = {
            o.source_id: o
            for open_set in (True, False)
            for page in connector.opportunities(open_set=open_set, since=None)
            for o in page
        }
        assert got and len(mapped) == len(got)
        some = sorted(got)[:5]
        again = {o.source_id for page in connector.fetch_by_ids(some) for o in page}
        assert again == set(some) and len(mapped) == len(got) + len(some)
