"""The receiver app, whatever the CRM: what it refuses before any work (404, 429, 413, 401, 400), that an
accepted notification is stored once however often it is replayed, and that nothing refused reaches the inbox.
The CRM's part is played by a minimal receiver with a shared-secret header (the per-CRM schemes have their own
tests in tests/webhooks/test_<crm>.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import create_app
from oppsync_pipeline.lib.webhooks.receiver import Notification, Refused, WebhookReceiver, same_secret


class SharedSecret(WebhookReceiver):
    crm = "salesforce"

    def verify(self, request):
        if not same_secret(request.header("x-secret"), self.secrets["token"]):
            raise Refused(401, "x-secret does not match")

    def notifications(self, request):
        try:
            body = json.loads(request.body)
            return [Notification(str(e["id"]), (str(e["opp"]),)) for e in body]
        except (ValueError, KeyError, TypeError):
            raise Refused(400, "not a JSON list of {id, opp}") from None

    def register(self, connector, public_url):
        return []


@pytest.fixture
def client(tmp_path: Path):
    cfg = parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "webhooks": {"max_body_bytes": 2048, "rate_limit_per_minute": 5},
            "connections": [{"name": "acme", "crm": "salesforce", "base_url": "https://acme.my.salesforce.com"}],
        }
    )
    receiver = SharedSecret(cfg.connections[0], {"token": "s3cret"})
    app = create_app(cfg, {"acme": receiver})
    engine = inbox.engine_for(cfg)
    with TestClient(app) as c:
        yield c, engine


def stored(engine) -> int:
    with engine.connect() as c:
        return c.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar()


def test_a_signed_notification_is_stored_once_however_often_it_is_sent(client):
    c, engine = client
    body = json.dumps([{"id": "e1", "opp": "006A"}, {"id": "e2", "opp": "006B"}])
    for _ in range(3):  # a CRM's redelivery, or a replay
        r = c.post("/webhooks/acme", content=body, headers={"x-secret": "s3cret"})
        assert r.status_code == 204
    assert stored(engine) == 2
    waiting = inbox.pending(engine)["acme"]
    assert sorted(json.loads(w["object_ids"])[0] for w in waiting) == ["006A", "006B"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    [
        ("/webhooks/nobody", b"[]", {"x-secret": "s3cret"}, 404),
        ("/webhooks/acme", b'[{"id": "e1", "opp": "1"}]', {"x-secret": "wrong"}, 401),
        ("/webhooks/acme", b'[{"id": "e1", "opp": "1"}]', {}, 401),
        ("/webhooks/acme", b"{not json", {"x-secret": "s3cret"}, 400),
        ("/webhooks/acme", b"x" * 5000, {"x-secret": "s3cret"}, 413),
    ],
)
def test_what_is_refused_never_reaches_the_inbox(client, path, body, headers, status):
    c, engine = client
    r = c.post(path, content=body, headers=headers)
    assert r.status_code == status
    assert "s3cret" not in r.text
    assert stored(engine) == 0


def test_a_body_larger_than_declared_is_cut_off(client):
    c, engine = client

    def chunks():
        yield b"[" + b" " * 1500
        yield b" " * 1500 + b"]"

    r = c.post("/webhooks/acme", content=chunks(), headers={"x-secret": "s3cret"})
    assert r.status_code == 413 and stored(engine) == 0


def test_a_flood_from_one_sender_is_rate_limited(client):
    c, engine = client
    codes = [
        c.post(
            "/webhooks/acme", content=json.dumps([{"id": f"e{i}", "opp": "1"}]), headers={"x-secret": "s3cret"}
        ).status_code
        for i in range(8)
    ]
    assert codes == [204] * 5 + [429] * 3
    assert stored(engine) == 5


def test_get_is_not_a_notification_and_health_answers(client):
    c, _ = client
    assert c.get("/webhooks/acme").status_code == 405
    assert c.get("/healthz").json() == {"status": "ok", "connections": ["acme"]}


def test_no_secret_reaches_the_log(client, caplog):
    """Dataverse sends its key in the query string; a forged request carries someone's guess: neither is logged."""
    c, _ = client
    with caplog.at_level("DEBUG"):
        c.post("/webhooks/acme?code=s3cret-in-query", content=b"[]", headers={"x-secret": "guess-s3cret"})
        c.post("/webhooks/acme?code=s3cret-in-query", content=b"[]", headers={"x-secret": "s3cret"})
    # the receiver's side only (the test's own HTTP client, httpx, logs the URL it called)
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "s3cret" not in text and "guess" not in text
    assert "refused with 401" in text
