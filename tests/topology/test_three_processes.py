"""Issue 18, deliver item 6: the production topology, tested. `dagster-webserver`, `dagster-daemon` and
`oppsync webhooks serve` run as separate processes against one fresh Postgres database (the warehouse, and
Dagster's run, event-log and schedule storage through deploy/postgres/dagster.yaml), with the sandbox CRMs in a
fourth. The webserver lists the two code locations; a schedule tick becomes a run that the daemon's queue hands
to a run worker, which starts it; the receiver answers /healthz (its inbox is in the Postgres warehouse).

One deployment serves both tests (`deployment`, started once: each of the four processes costs seconds to tens of
seconds to start on a loaded machine): one HubSpot connection, notifying changes and on a schedule that ticks once
soon. One connection only: the mart's automation waits until every connection has synced once, so a second
connection that only the tick syncs would make the webhook test wait for the tick. The webhook test runs first,
while the tick approaches."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import create_engine, text

from oppsync_pipeline.sandbox import hubspot as hubspot_sim
from tests.topology.harness import Topology, soon_cron

pytestmark = pytest.mark.postgres

LOCATIONS = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""

REPOSITORIES = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    location { name } jobs { name } schedules { name cronSchedule scheduleState { status } } sensors { name }
} } } }
"""

DAEMONS = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"

RUNS = """
query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) { ... on Runs { results {
    runId status jobName tags { key value }
} } } }
"""

CONNECTION = HUBSPOT = "sandbox-hubspot"
SCHEDULE = "sync_sandbox_hubspot"
DONE = ("SUCCESS", "FAILURE", "CANCELED")


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> tuple[Topology, str]:
    """The four processes, once for the module; returns the topology and the schedule's cron."""
    cron = soon_cron()  # one tick 30-90 s from now
    topology.start_sandbox(["hubspot"], schedule={"hubspot": cron}, webhooks={"sensor_interval_seconds": 1})
    # The receiver first: on a fresh database its inbox (lib/webhooks/inbox.py) and the daemon's first use of the
    # warehouse (lib/warehouse/schema.py migrate) both run `CREATE SCHEMA IF NOT EXISTS oppsync`, which Postgres
    # does not make safe against a concurrent twin: the loser gets UniqueViolation on pg_namespace and the
    # receiver exited (seen in 1 of the first 4 runs here, receiver started last).
    topology.start_receiver()
    topology.start_daemon()  # its scheduler counts toward the tick while the webserver loads
    topology.start_webserver()
    return topology, cron


def test_a_crm_change_reaches_the_mart_through_the_webhook(deployment: tuple[Topology, str]):
    """The other half of item 6: a change made in HubSpot (through its API) is notified, verified by the
    receiver, turned into a sync by the daemon's `syncs_on_webhooks` sensor, and the daemon's
    `mart_follows_syncs` sensor rebuilds the mart: the row changes with no launch by the test. A forged
    notification is refused and stores nothing. (The schedule as safety net: tests/dagster/test_webhook_syncs.py.)"""
    topology, _ = deployment
    assert requests.get(topology.urls["receiver"] + "/healthz", timeout=5).json()["connections"] == [HUBSPOT]
    topology.subscribe("hubspot")  # the app's webhook target, as `oppsync webhooks register` sets it

    api = topology.sandbox_urls["hubspot"]
    token = {"Authorization": f"Bearer {hubspot_sim.SANDBOX_CREDENTIALS['access_token']}"}
    deal = requests.get(f"{api}/crm/v3/objects/deals", params={"limit": 1}, headers=token, timeout=10).json()
    deal_id = deal["results"][0]["id"]
    name = "Renamed in HubSpot, notified"
    r = requests.patch(
        f"{api}/crm/v3/objects/deals/{deal_id}", json={"properties": {"dealname": name}}, headers=token, timeout=10
    )
    assert r.status_code == 200, r.text
    topology.mark("deal renamed in the CRM")

    rows = topology.poll(
        lambda: (
            topology.query(
                "SELECT project_name FROM marts.opportunities WHERE connection = :c AND source_id = :s",
                c=HUBSPOT,
                s=deal_id,
            )
            if topology.query("SELECT to_regclass('marts.opportunities')")[0][0]
            else []
        ),
        lambda rs: bool(rs) and rs[0][0] == name,
        "the renamed deal in marts.opportunities",
        seconds=240,
    )
    assert rows[0][0] == name
    webhook_runs = topology.query(
        "SELECT r.status FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
        "WHERE t.key = 'oppsync/trigger' AND t.value = 'webhook'"
    )
    assert ("SUCCESS",) in webhook_runs, webhook_runs

    # forged: refused before any work, nothing stored
    count = "SELECT count(*) FROM oppsync.webhook_inbox"
    before = topology.query(count)[0][0]
    forged = requests.post(
        f"{topology.urls['receiver']}/webhooks/{HUBSPOT}",
        json=[{"eventId": 1, "subscriptionId": 1, "objectId": int(deal_id), "subscriptionType": "deal.creation"}],
        headers={"X-HubSpot-Signature-v3": "Zm9yZ2Vk", "X-HubSpot-Request-Timestamp": "1"},
        timeout=10,
    )
    assert forged.status_code == 401
    assert topology.query(count)[0][0] == before


def test_webserver_daemon_and_receiver_on_the_postgres_instance(deployment: tuple[Topology, str]):
    topology, cron = deployment
    pg_url = topology.pg_url

    # (c) the receiver: up, on the Postgres warehouse (its inbox table is there)
    health = requests.get(topology.urls["receiver"] + "/healthz", timeout=5).json()
    assert health == {"status": "ok", "connections": [CONNECTION]}  # the generated config enables its webhooks

    # (a) the webserver answers GraphQL and has loaded both code locations from workspace.yaml
    entries = topology.poll(
        lambda: topology.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"],
        lambda es: all(e["loadStatus"] == "LOADED" for e in es),
        "code locations loaded",
        seconds=120,
    )
    assert {e["name"]: e["locationOrLoadError"]["__typename"] for e in entries} == {
        "oppsync-syncs": "RepositoryLocation",
        "oppsync-mart": "RepositoryLocation",
    }, entries
    nodes = {n["location"]["name"]: n for n in topology.graphql(REPOSITORIES)["repositoriesOrError"]["nodes"]}
    schedules = {s["name"]: s for s in nodes["oppsync-syncs"]["schedules"]}
    assert schedules[SCHEDULE]["cronSchedule"] == cron
    assert schedules[SCHEDULE]["scheduleState"]["status"] == "RUNNING"
    assert {"mart_follows_syncs"} <= {s["name"] for s in nodes["oppsync-mart"]["sensors"]}

    # the daemon's heartbeats reach the webserver through the shared Postgres instance
    statuses = topology.poll(
        lambda: topology.graphql(DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"],
        lambda ss: all(s["healthy"] for s in ss if s["required"] and s["daemonType"] in _NEEDED),
        "healthy scheduler, sensor and queue daemons",
        seconds=90,
    )
    assert {s["daemonType"] for s in statuses if s["required"]} >= _NEEDED

    # (b) a schedule tick -> a queued run -> the daemon's queue launches it -> the run worker syncs into Postgres
    tags = [{"key": "dagster/schedule_name", "value": SCHEDULE}]
    runs = topology.poll(lambda: topology.graphql(RUNS, tags=tags)["runsOrError"]["results"], bool, "a tick", 130)
    run = runs[-1]
    assert {t["key"]: t["value"] for t in run["tags"]}["oppsync/connection"] == CONNECTION
    # the daemon's queue dequeues it and launches a run worker, which starts the run. Its end is not awaited: a
    # sync's steps each load the code location in a subprocess (~45 s here); tests/dagster/test_webserver.py
    # follows a run to SUCCESS, and the webhook -> mart test (lead) follows one to the mart.
    run = topology.poll(
        lambda: next(
            r for r in topology.graphql(RUNS, tags=tags)["runsOrError"]["results"] if r["runId"] == run["runId"]
        ),
        lambda r: r["status"] in ("STARTED", *DONE),
        f"run {run['runId']} dequeued and started",
        seconds=90,
    )
    assert run["status"] in ("STARTED", "SUCCESS"), run

    engine = create_engine(pg_url)
    try:
        with engine.connect() as c:
            # Dagster's run storage is this database (deploy/postgres/dagster.yaml, DAGSTER_PG_*) ...
            stored = c.execute(text("SELECT status FROM runs WHERE run_id = :r"), {"r": run["runId"]}).scalar()
            assert stored in ("STARTED", "SUCCESS")
            # ... and so is the warehouse: the receiver's inbox and the run's sync record are there
            assert c.execute(text("SELECT to_regclass('oppsync.webhook_inbox')")).scalar() is not None
    finally:
        engine.dispose()


_NEEDED = {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR"}
