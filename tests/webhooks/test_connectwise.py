"""ConnectWise callbacks: the signature (HMAC-SHA256 keyed with the SHA-256 of the key fetched from Metadata.key_url),
the SSRF guard on that URL, what a callback says, registration through /system/callbacks, and the simulator's own
signed callbacks reaching the receiver app and its inbox."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from sqlalchemy import func, select

from oppsync_pipeline.lib.config import parse_config
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import create_app
from oppsync_pipeline.lib.webhooks.connectwise import ConnectWiseReceiver, callback_url
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Notification, Refused
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.kit.webhooks import DeliveryFaults
from oppsync_pipeline.sandbox.server import SandboxServer

KEY = cw.SANDBOX_WEBHOOK_SECRETS["signing_key"]
ENV = {f"CW_{k.upper()}": v for k, v in cw.SANDBOX_CREDENTIALS.items()}


def signature(key: str, body: bytes) -> str:
    """Written out here, not imported: base64(HMAC-SHA256(key = SHA-256(signing key), raw body))."""
    return base64.b64encode(hmac.new(hashlib.sha256(key.encode()).digest(), body, hashlib.sha256).digest()).decode()


@pytest.fixture
def sim() -> Iterator[tuple[cw.ConnectWiseSimulator, SandboxServer]]:
    simulator = cw.build(opportunities=20)
    server = SandboxServer(simulator).start()
    yield simulator, server
    simulator.webhooks.stop()
    server.stop()


def config(tmp_path: Path, base_url: str, options: dict[str, Any] | None = None):
    return parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "connections": [
                {
                    "name": "cw",
                    "crm": "connectwise",
                    "base_url": base_url,
                    "credentials": {k: "${CW_" + k.upper() + "}" for k in cw.SANDBOX_CREDENTIALS},
                    "webhooks": {"enabled": True, "options": options or {}},
                }
            ],
        }
    )


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def captured(server: SandboxServer, **over: Any) -> dict[str, Any]:
    """A callback in the shape CW sends (amp-labs' captured contact-update.json, for an opportunity)."""
    entity = {"id": 57961, "name": "Renewal", "_info": {"lastUpdated": "2026-06-09T21:59:49Z", "updatedBy": "amuller"}}
    return {
        "Action": "updated",
        "CallbackObjectRecId": 26604,
        "CompanyId": "oppsync",
        "Entity": json.dumps(entity),
        "FromUrl": f"127.0.0.1:{server.port}",
        "ID": 57961,
        "MemberId": "amuller",
        "MessageId": "6dd82302-5e46-47c0-8c84-702868125b76",
        "Metadata": {
            "key_url": f"{server.url}/v2025_1//system/callbackkey/index.rails?companyName=oppsync"
            f"&id={cw.SANDBOX_WEBHOOK_SECRETS['key_id']}"
        },
        "PartnerId": "61ddc2817bcddc0001c74208",
        "ProductInstanceId": "639c96cab2eb560001dd1324",
        "Type": "opportunity",
        **over,
    }


def incoming(body: bytes, headers: dict[str, str]) -> IncomingRequest:
    url = "https://hooks.example.com/webhooks/cw?id=57961"
    return IncomingRequest("POST", url, "/webhooks/cw", {"id": "57961"}, headers, body, "203.0.113.9")


def signed(payload: dict[str, Any], key: str = KEY) -> IncomingRequest:
    body = json.dumps(payload).encode()
    return incoming(body, {"x-content-signature": signature(key, body), "content-type": "application/json"})


# -- pure: the scheme ------------------------------------------------------------------------------------------------


def test_a_signed_callback_verifies_and_names_the_opportunity_and_the_message(tmp_path, sim, env):
    _, server = sim
    receiver = ConnectWiseReceiver(config(tmp_path, server.url).connections[0], {})
    request = signed(captured(server))
    receiver.verify(request)
    assert receiver.notifications(request) == [
        Notification("6dd82302-5e46-47c0-8c84-702868125b76", ("57961",), "updated", datetime(2026, 6, 9, 21, 59, 49))
    ]
    deleted = signed(captured(server, Action="deleted", Entity=None))
    receiver.verify(deleted)
    assert receiver.notifications(deleted)[0].kind == "deleted"


def _forged(server: SandboxServer) -> IncomingRequest:
    good = signed(captured(server))
    return incoming(good.body.replace(b"57961", b"57962"), dict(good.headers))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_forged, id="forged body"),
        pytest.param(lambda s: signed(captured(s), key="not-the-key"), id="wrong key"),
        pytest.param(lambda s: incoming(json.dumps(captured(s)).encode(), {}), id="no signature header"),
        pytest.param(
            lambda s: incoming(json.dumps(captured(s)).encode(), {"x-content-signature": signature(KEY, b"")}),
            id="signature of another body",
        ),
        pytest.param(
            lambda s: signed(captured(s, Metadata={"key_url": "https://evil.example.com/key?id=1"})), id="foreign host"
        ),
        pytest.param(
            lambda s: signed(captured(s, Metadata={"key_url": "http://api-na.myconnectwise.net/key?id=1"})),
            id="plain http on a cloud host",
        ),
        pytest.param(
            lambda s: signed(captured(s, Metadata={"key_url": "https://evil.api-na.myconnectwise.net.example/k"})),
            id="lookalike host",
        ),
        pytest.param(lambda s: signed(captured(s, Metadata=None)), id="no key_url"),
        pytest.param(
            lambda s: signed(
                captured(s, Metadata={"key_url": captured(s)["Metadata"]["key_url"].replace("&id=", "&id=x")})
            ),
            id="unknown key id",
        ),
        pytest.param(lambda s: signed(captured(s, CompanyId="othermsp")), id="another company's callback"),
        pytest.param(lambda s: incoming(b"{not json", {"x-content-signature": "abc"}), id="not JSON"),
    ],
)
def test_what_is_not_signed_by_this_tenant_is_refused_with_401(tmp_path, sim, env, make):
    _, server = sim
    receiver = ConnectWiseReceiver(config(tmp_path, server.url).connections[0], {})
    with pytest.raises(Refused) as refused:
        receiver.verify(make(server))
    assert refused.value.status == 401
    assert KEY not in refused.value.reason and signature(KEY, b"") not in refused.value.reason


def test_a_signed_callback_without_an_id_is_malformed_and_other_objects_are_dropped(tmp_path, sim, env):
    _, server = sim
    receiver = ConnectWiseReceiver(config(tmp_path, server.url).connections[0], {})
    payload = captured(server)
    del payload["ID"]
    with pytest.raises(Refused) as refused:
        receiver.notifications(signed(payload))
    assert refused.value.status == 400
    assert receiver.notifications(signed(captured(server, Type="ticket"))) == []


def test_the_key_is_fetched_once_per_url_and_refetched_when_it_was_rotated(tmp_path, sim, env, monkeypatch):
    simulator, server = sim
    receiver = ConnectWiseReceiver(config(tmp_path, server.url).connections[0], {})
    fetched = []
    original = receiver._fetch_key
    receiver._fetch_key = lambda url: fetched.append(url) or original(url)  # type: ignore[method-assign]
    for i in range(3):
        receiver.verify(signed(captured(server, MessageId=f"m{i}")))
    assert len(fetched) == 1
    monkeypatch.setitem(cw.SANDBOX_WEBHOOK_SECRETS, "signing_key", "rotatedKey2")
    with pytest.raises(Refused):  # a mismatch against a fresh key is not a reason to ask CW again
        receiver.verify(signed(captured(server), key="rotatedKey2"))
    receiver.refresh_after = 0
    receiver.verify(signed(captured(server), key="rotatedKey2"))
    assert len(fetched) == 2


def test_an_unreachable_key_endpoint_is_a_temporary_refusal(tmp_path, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    receiver = ConnectWiseReceiver(config(tmp_path, f"http://127.0.0.1:{port}").connections[0], {})
    payload = {"Type": "opportunity", "CompanyId": "oppsync", "Metadata": {"key_url": f"http://127.0.0.1:{port}/k"}}
    with pytest.raises(Refused) as refused:
        receiver.verify(signed(payload))
    assert refused.value.status == 503


def test_unknown_options_are_a_configuration_problem(tmp_path):
    conn = config(tmp_path, "https://api-na.myconnectwise.net", {"key_host": ["x"]}).connections[0]
    assert "unknown ['key_host']" in ConnectWiseReceiver.problems(conn)[0]
    assert ConnectWiseReceiver.secret_keys == ()
    wrong = {"key_hosts": "api-na.myconnectwise.net", "key_refresh_seconds": "soon", "self_suppressed": "yes"}
    assert len(ConnectWiseReceiver.problems(config(tmp_path, "https://x.example", wrong).connections[0])) == 3
    assert (
        ConnectWiseReceiver.problems(config(tmp_path, "https://x.example", {"company_id": "acme"}).connections[0]) == []
    )


# -- the simulator's callbacks through the app -----------------------------------------------------------------------


class Receiver:
    """The receiver app on uvicorn (a real port: the simulator posts from its sender thread)."""

    def __init__(self, cfg: Any, receiver: ConnectWiseReceiver):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(cfg, {"cw": receiver}), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        self.engine = inbox.engine_for(cfg)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/cw"

    def stored(self) -> list[dict[str, Any]]:
        return inbox.pending(self.engine).get("cw", [])

    def count(self) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def app(tmp_path, sim, env) -> Iterator[tuple[cw.ConnectWiseSimulator, Receiver, Any]]:
    simulator, server = sim
    cfg = config(tmp_path, server.url)
    receiver = Receiver(cfg, ConnectWiseReceiver(cfg.connections[0], {}))
    yield simulator, receiver, cfg
    receiver.stop()


def test_registration_creates_one_callback_and_the_simulator_then_posts_there(app):
    simulator, receiver, cfg = app
    conn = cfg.connections[0]
    lines = ConnectWiseReceiver(conn, {}).register(build_connector(cfg, conn), receiver.url)
    assert lines[0].startswith("created ConnectWise callback")
    again = ConnectWiseReceiver(conn, {}).register(build_connector(cfg, conn), receiver.url)
    assert again[0].startswith("reused ConnectWise callback")
    [entry] = simulator.callbacks.values()
    assert (entry["url"], entry["type"], entry["level"], entry["inactiveFlag"]) == (
        callback_url(receiver.url),
        "opportunity",
        "owner",
        False,
    )
    opp = next(iter(simulator.world.live()))
    simulator.world.update(opp.native_id, name="Renewal 2027")
    assert simulator.webhooks.idle()
    assert [s["status"] for s in simulator.webhooks.sent] == [204]
    assert simulator.webhooks.sent[0]["url"] == receiver.url + "?id=" + opp.native_id  # CW appends the id
    [row] = receiver.stored()
    assert json.loads(row["object_ids"]) == [opp.native_id]


def test_a_duplicated_callback_is_stored_once_and_a_deleted_callback_stops_them(app):
    simulator, receiver, cfg = app
    conn = cfg.connections[0]
    ConnectWiseReceiver(conn, {}).register(build_connector(cfg, conn), receiver.url)
    simulator.webhooks.faults = DeliveryFaults(duplicate=1.0)
    simulator.webhooks.start_faults()
    opps = list(simulator.world.live())[:3]
    for o in opps:
        simulator.world.update(o.native_id, name=o.name + " (v2)")
    assert simulator.webhooks.idle()
    assert [s["status"] for s in simulator.webhooks.sent] == [204] * 6
    assert receiver.count() == 3
    assert sorted(json.loads(r["object_ids"])[0] for r in receiver.stored()) == sorted(o.native_id for o in opps)
    connector = build_connector(cfg, conn)
    [entry] = simulator.callbacks.values()
    connector.client.request("DELETE", connector.api(f"/system/callbacks/{entry['id']}"))
    simulator.world.update(opps[0].native_id, name="after the callback was deleted")
    assert simulator.webhooks.idle() and len(simulator.webhooks.sent) == 6


def test_a_self_suppressed_callback_skips_the_api_members_own_changes(tmp_path, sim, env):
    simulator, server = sim
    cfg = config(tmp_path, server.url, {"self_suppressed": True})
    receiver = Receiver(cfg, ConnectWiseReceiver(cfg.connections[0], {}))
    try:
        connector = build_connector(cfg, cfg.connections[0])
        ConnectWiseReceiver(cfg.connections[0], {}).register(connector, receiver.url)
        [entry] = simulator.callbacks.values()
        assert entry["isSelfSuppressedFlag"] is True
        a, b = list(simulator.world.live())[:2]
        ops = [{"op": "replace", "path": "name", "value": "written through the API"}]
        connector.client.request("PATCH", connector.api(f"/sales/opportunities/{a.native_id}"), json=ops)
        simulator.world.update(b.native_id, name="changed by a user")
        assert simulator.webhooks.idle()
        assert [json.loads(r["object_ids"]) for r in receiver.stored()] == [[b.native_id]]
    finally:
        receiver.stop()


def test_the_callback_api_refuses_a_level_the_type_does_not_know(sim):
    simulator, server = sim
    auth = "{company_id}+{public_key}:{private_key}".format(**cw.SANDBOX_CREDENTIALS)
    headers = {
        "Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
        "clientId": cw.SANDBOX_CREDENTIALS["client_id"],
    }
    body = {"url": "https://example.com/cb?id=", "objectId": 1, "type": "opportunity", "level": "board"}
    r = requests.post(f"{server.url}/v2025_1/apis/3.0/system/callbacks", json=body, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.json()["errors"][0]["field"] == "level"
    assert simulator.callbacks == {} and simulator.webhooks.url is None
