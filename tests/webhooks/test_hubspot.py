"""HubSpot webhooks: the v3 signature (method + URI + body + timestamp, 5 minutes), deal events read from
HubSpot's payload shape, the simulator's own signed deliveries through the receiver app, and registration through
the app webhooks API (lib/webhooks/hubspot.py; the simulator's side in sandbox/hubspot.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import uvicorn
from sqlalchemy import func, select
from starlette.testclient import TestClient

from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.crm.hubspot import HubSpotConnector
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import create_app
from oppsync_pipeline.lib.webhooks.hubspot import HubSpotReceiver
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Refused
from oppsync_pipeline.sandbox import hubspot as hs
from oppsync_pipeline.sandbox.server import SandboxServer

SECRET = "app-client-secret-5f1e"
URL = "https://hooks.example.com/webhooks/acme"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, the receiver's clock in the pure tests


def sign(secret: str, method: str, url: str, body: bytes, stamp: str) -> str:
    mac = hmac.new(secret.encode(), method.encode() + url.encode() + body + stamp.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def config(tmp_path: Path, base_url: str = "https://api.hubapi.com", **webhooks):
    return parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "webhooks": webhooks,
            "connections": [
                {
                    "name": "acme",
                    "crm": "hubspot",
                    "base_url": base_url,
                    "credentials": {"access_token": "${HUBSPOT_TOKEN}"},
                    "webhooks": {
                        "enabled": True,
                        "secrets": {"client_secret": "${HS_SECRET}", "developer_api_key": "${HS_DEV_KEY}"},
                        "options": {"app_id": hs.APP_ID},
                    },
                }
            ],
        }
    )


@pytest.fixture
def receiver(tmp_path):
    r = HubSpotReceiver(config(tmp_path).connections[0], {"client_secret": SECRET})
    r.clock = lambda: NOW
    return r


def incoming(body: bytes, url: str = URL, *, secret: str = SECRET, age_s: float = 1.0, headers=None, signed=None):
    stamp = str(int((NOW - age_s) * 1000))
    h = {
        "x-hubspot-signature-v3": sign(secret, "POST", url, signed if signed is not None else body, stamp),
        "x-hubspot-request-timestamp": stamp,
        "content-type": "application/json",
    }
    if headers is not None:
        h = {k: v for k, v in {**h, **headers}.items() if v is not None}
    return IncomingRequest("POST", url, "/webhooks/acme", {}, h, body, "203.0.113.9")


# HubSpot's shape (crm-write-webhook-notes.md §2.2): an array of events, deals among other objects
CAPTURED = [
    {
        "eventId": 100,
        "subscriptionId": 2345,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500000,
        "subscriptionType": "deal.propertyChange",
        "attemptNumber": 0,
        "objectId": 18300000042,
        "changeSource": "CRM_UI",
        "propertyName": "amount",
        "propertyValue": "125000",
    },
    {
        "eventId": 100,  # HubSpot: eventId is not guaranteed unique; the subscription tells them apart
        "subscriptionId": 2346,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500001,
        "subscriptionType": "deal.creation",
        "attemptNumber": 2,
        "objectId": 18300000077,
        "changeSource": "API",
    },
    {
        "eventId": 101,
        "subscriptionId": 2300,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500002,
        "subscriptionType": "contact.propertyChange",
        "attemptNumber": 0,
        "objectId": 501,
        "propertyName": "email",
        "propertyValue": "a@example.com",
    },
    {
        "eventId": 102,
        "subscriptionId": 2400,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500003,
        "subscriptionType": "object.deletion",
        "objectTypeId": "0-3",
        "attemptNumber": 0,
        "objectId": 18300000090,
    },
    {
        "eventId": 103,
        "subscriptionId": 2400,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500004,
        "subscriptionType": "object.creation",
        "objectTypeId": "0-1",
        "attemptNumber": 0,
        "objectId": 502,
    },
    {
        "eventId": 104,
        "subscriptionId": 2500,
        "portalId": 62515,
        "appId": 1234567,
        "occurredAt": 1767225500005,
        "subscriptionType": "deal.merge",
        "attemptNumber": 0,
        "objectId": 18300000001,
        "primaryObjectId": 18300000001,
        "mergedObjectIds": [18300000002],
        "newObjectId": 18300000003,
        "numberOfPropertiesMoved": 4,
    },
]


# -- pure ---------------------------------------------------------------------------------------------------------


def test_a_correctly_signed_request_verifies_and_its_deal_events_are_read(receiver):
    body = json.dumps(CAPTURED).encode()
    request = incoming(body)
    receiver.verify(request)
    notes = receiver.notifications(request)
    assert [(n.event_id, n.object_ids, n.kind) for n in notes] == [
        ("2345:100", ("18300000042",), "updated"),
        ("2346:100", ("18300000077",), "created"),
        ("2400:102", ("18300000090",), "deleted"),
        ("2500:104", ("18300000001", "18300000003", "18300000002"), "updated"),
    ]
    assert notes[0].occurred_at.isoformat() == "2025-12-31T23:58:20"


def test_the_uri_is_signed_with_hubspots_reserved_characters_decoded(receiver):
    body = b"[]"
    url = "https://hooks.example.com/webhooks/acme?tenant=a%3Ab"
    stamp = str(int((NOW - 1) * 1000))
    headers = {
        "x-hubspot-signature-v3": sign(
            SECRET, "POST", "https://hooks.example.com/webhooks/acme?tenant=a:b", body, stamp
        ),
        "x-hubspot-request-timestamp": stamp,
    }
    receiver.verify(IncomingRequest("POST", url, "/webhooks/acme", {"tenant": "a:b"}, headers, body, "x"))


@pytest.mark.parametrize(
    "case",
    [
        {"body": b'[{"eventId": 1}]', "signed": b'[{"eventId": 2}]'},  # forged body
        {"secret": "another-apps-secret"},
        {"headers": {"x-hubspot-signature-v3": None}},
        {"headers": {"x-hubspot-request-timestamp": None}},
        {"headers": {"x-hubspot-request-timestamp": "yesterday"}},
        {"age_s": 301},  # older than 5 minutes, however well signed
        {"url": "https://hooks.example.com/webhooks/other"},  # signed for another URL
    ],
)
def test_what_hubspot_did_not_sign_just_now_is_refused_with_401(receiver, case):
    body = case.pop("body", b"[]")
    request = incoming(body, **case)
    if "url" in case:  # the receiver sees the URL it was called on
        request = IncomingRequest("POST", URL, request.path, {}, request.headers, body, "x")
    with pytest.raises(Refused) as err:
        receiver.verify(request)
    assert err.value.status == 401
    assert SECRET not in err.value.reason
    assert sign(SECRET, "POST", URL, body, request.header("x-hubspot-request-timestamp") or "") not in err.value.reason


def test_a_timestamp_within_five_minutes_is_accepted(receiver):
    receiver.verify(incoming(b"[]", age_s=299))


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"eventId": 1}',
        b"[1, 2]",
        b'[{"subscriptionType": "deal.creation", "subscriptionId": 1, "objectId": 5}]',  # no eventId
        b'[{"subscriptionType": "deal.creation", "subscriptionId": 1, "eventId": 5}]',  # no objectId
        b"\xff\xfe",
    ],
)
def test_a_malformed_payload_is_refused_with_400(receiver, body):
    with pytest.raises(Refused) as err:
        receiver.notifications(incoming(body))
    assert err.value.status == 400


def test_the_configuration_names_its_secret_and_options(tmp_path):
    conn = config(tmp_path).connections[0]
    assert HubSpotReceiver.problems(conn) == []
    bare = conn.model_copy(update={"webhooks": conn.webhooks.model_copy(update={"secrets": {}, "options": {"x": 1}})})
    problems = HubSpotReceiver.problems(bare)
    assert any("client_secret" in p for p in problems) and any("unknown ['x']" in p for p in problems)


# -- through the app ------------------------------------------------------------------------------------------------


def stored(engine) -> list[dict]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(select(inbox.webhook_inbox))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


@pytest.fixture
def portal(tmp_path):
    """The HubSpot simulator, and the receiver app for its connection served on a free port."""
    sim = hs.build(seed=5, opportunities=60)
    with SandboxServer(sim) as srv:
        cfg = config(tmp_path, base_url=srv.url)
        receiver = HubSpotReceiver(cfg.connections[0], hs.SANDBOX_WEBHOOK_SECRETS)
        app = create_app(cfg, {"acme": receiver})
        with serving(app) as url:
            yield sim, srv, receiver, url + "/webhooks/acme", inbox.engine_for(cfg), app
        sim.webhooks.stop()


def test_the_simulators_signed_notifications_land_in_the_inbox_once(portal):
    sim, srv, _, hook, engine, _ = portal
    requests.post(f"{srv.url}/__sandbox/webhooks", json={"url": hook, "faults": {"duplicate": 1.0}}, timeout=5)
    deal = sorted(sim.world.live(), key=lambda o: o.seq)[3]
    sim.world.update(deal.native_id, amount=(deal.amount or 0) + 1000)
    sim.world.update(deal.native_id, name=deal.name + " (phase 2)")
    assert sim.webhooks.idle()
    assert {s["status"] for s in sim.webhooks.sent} == {204}
    assert len(sim.webhooks.sent) >= 2 and len(sim.webhooks.sent) % 2 == 0  # every request sent twice
    rows = stored(engine)
    assert {json.loads(r["object_ids"])[0] for r in rows} == {deal.native_id}
    assert len(rows) == 2  # amount and dealname changed: two events, each stored once though delivered twice
    assert {r["kind"] for r in rows} == {"updated"}


def test_a_created_and_a_deleted_deal_are_notified_and_other_changes_are_not(portal):
    sim, srv, _, hook, engine, _ = portal
    sim.webhooks.url = hook
    created = sim.world.create(amount=5000.0)
    gone = sorted(sim.world.live(), key=lambda o: o.seq)[0]
    sim.world.delete(gone.native_id)
    sim.world.update(sorted(sim.world.live(), key=lambda o: o.seq)[1].native_id, probability=0.42)  # not watched
    assert sim.webhooks.idle()
    rows = {json.loads(r["object_ids"])[0]: r["kind"] for r in stored(engine)}
    assert rows == {created.native_id: "created", gone.native_id: "deleted"}


def test_a_change_made_before_the_url_was_set_is_not_sent_later(portal):
    sim, _, _, hook, engine, _ = portal
    deal = sorted(sim.world.live(), key=lambda o: o.seq)[6]
    sim.world.update(deal.native_id, amount=(deal.amount or 0) + 5)  # no target URL yet: nothing sent, ever
    sim.webhooks.url = hook
    sim.world.update(deal.native_id, name=deal.name + " (renewal)")
    assert sim.webhooks.idle()
    events = [json.loads(r["object_ids"]) for r in stored(engine)]
    assert len(events) == 1 and sim.webhook_subscriptions == {}  # dealname only (the UI-made default subscriptions)


def test_hubspot_batches_at_most_100_events_a_request(portal):
    sim, _, _, hook, engine, _ = portal
    captured = []
    build = sim.webhooks.build
    sim.webhooks.build = lambda batch: captured.extend(out := build(batch)) or out
    sim.webhooks.url = hook
    deals = sorted(sim.world.live(), key=lambda o: o.seq)[:55]
    with sim.world.lock:  # one burst: the sender takes it as one batch
        for d in deals:
            sim.world.update(d.native_id, amount=(d.amount or 0) + 7, name=d.name + " v2")
    assert sim.webhooks.idle()
    sizes = [len(json.loads(o.body)) for o in captured]
    assert sum(sizes) == 110 and max(sizes) <= 100 and len(sizes) >= 2
    assert {s["status"] for s in sim.webhooks.sent} == {204} and len(stored(engine)) == 110


def test_a_replayed_request_is_stored_once_and_a_forged_one_not_at_all(portal):
    sim, _, _, hook, engine, _ = portal
    captured = []
    build = sim.webhooks.build
    sim.webhooks.build = lambda batch: captured.extend(build(batch)) or captured[-1:]
    sim.webhooks.url = hook
    deal = sorted(sim.world.live(), key=lambda o: o.seq)[2]
    sim.world.update(deal.native_id, amount=(deal.amount or 0) + 1)
    assert sim.webhooks.idle() and captured
    out = captured[0]
    again = requests.post(hook, data=out.body, headers=out.headers, timeout=5)
    assert again.status_code == 204 and len(stored(engine)) == 1
    forged = out.body.replace(deal.native_id.encode(), b"18300000999")
    r = requests.post(hook, data=forged, headers=out.headers, timeout=5)
    assert r.status_code == 401 and len(stored(engine)) == 1


def test_an_old_delivery_is_refused(portal, tmp_path):
    sim, _, receiver, hook, engine, _ = portal
    receiver.clock = lambda: time.time() + 301  # the receiver's clock, six minutes on
    sim.webhooks.url = hook
    deal = sorted(sim.world.live(), key=lambda o: o.seq)[2]
    sim.world.update(deal.native_id, amount=(deal.amount or 0) + 1)
    assert sim.webhooks.idle()
    assert {s["status"] for s in sim.webhooks.sent} == {401} and stored(engine) == []


def test_behind_a_proxy_the_public_url_is_what_is_signed(tmp_path):
    cfg = config(tmp_path, public_url="https://hooks.example.com")
    receiver = HubSpotReceiver(cfg.connections[0], {"client_secret": SECRET})
    body = json.dumps(CAPTURED[:1]).encode()
    stamp = str(int(time.time() * 1000))
    with TestClient(create_app(cfg, {"acme": receiver})) as c:
        headers = {
            "X-HubSpot-Signature-v3": sign(SECRET, "POST", URL, body, stamp),
            "X-HubSpot-Request-Timestamp": stamp,
        }
        assert c.post("/webhooks/acme", content=body, headers=headers).status_code == 204
        local = sign(SECRET, "POST", "http://testserver/webhooks/acme", body, stamp)
        headers["X-HubSpot-Signature-v3"] = local
        assert c.post("/webhooks/acme", content=body, headers=headers).status_code == 401
    with inbox.engine_for(cfg).connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar() == 1


# -- registration ---------------------------------------------------------------------------------------------------


def test_registration_creates_the_subscriptions_once_and_the_portal_then_posts_there(portal):
    sim, srv, receiver, hook, engine, _ = portal
    connector = HubSpotConnector(receiver.conn, hs.SANDBOX_CREDENTIALS)
    lines = receiver.register(connector, hook)
    assert f"app {hs.APP_ID}: target URL set to {hook}" in lines
    wanted = receiver.wanted()
    subs = list(sim.webhook_subscriptions.values())
    assert sorted((s["eventType"], s.get("propertyName")) for s in subs) == sorted(wanted)
    assert all(s["active"] for s in subs)
    assert sim.webhook_settings["targetUrl"] == hook and sim.webhooks.url == hook
    again = receiver.register(connector, hook)  # idempotent: nothing new
    assert len(sim.webhook_subscriptions) == len(wanted)
    assert all(line.startswith(("already", f"app {hs.APP_ID}: target URL already")) for line in again)
    deal = sorted(sim.world.live(), key=lambda o: o.seq)[4]
    stage = next(s for s in sim.world.stages if s != deal.stage and sim.world.stages[s].pipeline == "default")
    sim.world.update(deal.native_id, stage=stage)
    assert sim.webhooks.idle()
    rows = stored(engine)
    assert rows and {json.loads(r["object_ids"])[0] for r in rows} == {deal.native_id}
    assert "dealstage" in {s.get("propertyName") for s in subs}


def test_registration_reactivates_a_paused_subscription_and_keeps_another_apps_url(portal):
    sim, _, receiver, hook, _, _ = portal
    connector = HubSpotConnector(receiver.conn, hs.SANDBOX_CREDENTIALS)
    key = {"hapikey": hs.DEVELOPER_API_KEY}
    base = f"{connector.client.base_url}/webhooks/v3/{hs.APP_ID}"
    requests.post(f"{base}/subscriptions", params=key, json={"eventType": "deal.creation"}, timeout=5)
    requests.put(f"{base}/settings", params=key, json={"targetUrl": "https://elsewhere.example.com/h"}, timeout=5)
    lines = receiver.register(connector, hook)
    assert "one target URL per app" in lines[0] and sim.webhook_settings["targetUrl"].startswith("https://elsewhere")
    receiver.options["replace_target_url"] = True
    lines = receiver.register(connector, hook)
    assert any(line.startswith("activated deal.creation") for line in lines)
    assert [s["eventType"] for s in sim.webhook_subscriptions.values()].count("deal.creation") == 1
    assert sim.webhook_settings["targetUrl"] == hook


def test_without_app_id_or_developer_key_the_manual_steps_are_printed(tmp_path):
    conn = config(tmp_path).connections[0]
    receiver = HubSpotReceiver(conn, {"client_secret": SECRET})
    lines = receiver.register(None, URL)  # no API call is made
    assert any(URL in line for line in lines) and any("deal.propertyChange" in line for line in lines)


def test_the_webhooks_api_wants_the_developer_key(portal):
    _, srv, _, _, _, _ = portal
    r = requests.get(f"{srv.url}/webhooks/v3/{hs.APP_ID}/settings", params={"hapikey": "nope"}, timeout=5)
    assert r.status_code == 401 and r.json()["category"] == "INVALID_AUTHENTICATION"
    r = requests.get(
        f"{srv.url}/webhooks/v3/{hs.APP_ID}/settings",
        headers={"Authorization": f"Bearer {hs.PRIVATE_APP_TOKEN}"},
        timeout=5,
    )
    assert r.status_code == 401  # the portal's token is not the developer account's key
