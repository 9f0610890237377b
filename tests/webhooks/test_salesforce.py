"""Salesforce webhooks (lib/webhooks/salesforce.py): outbound messages (SOAP, checked by OrganizationId, answered
with the SOAP Ack) and Flow HTTP callouts (JSON, shared-secret header), pure and through the receiver app, with
the simulator's own outbound messages after a change in its world."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import uvicorn
from sqlalchemy import func, select
from starlette.testclient import TestClient

from oppsync_pipeline.lib.config import ConnectionConfig, parse_config
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import create_app
from oppsync_pipeline.lib.webhooks.receiver import IncomingRequest, Refused
from oppsync_pipeline.lib.webhooks.salesforce import ACK, SalesforceReceiver, id18
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.kit.webhooks import Change
from oppsync_pipeline.sandbox.server import SandboxServer

ORG = sfsim.ORG_ID
OTHER_ORG = id18("00D5g0000000002")
FLOW_SECRET = "flow-s3cret-7f2a"
OPP_A = id18("006Hs0000000001")
OPP_B = id18("006Hs0000000002")
ACCOUNT = id18("001Hs0000000001")

# The shape of a captured outbound message (developer docs' WSDL; a listener's log of a real one)
CAPTURED = f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>{{org}}</OrganizationId>
   <ActionId>04k5e000000CaRkAAK</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/62.0/00D5g0000000001</EnterpriseUrl>
   <PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/62.0/00D5g0000000001</PartnerUrl>
   <Notification>
    <Id>04l5e00000Gx7QzAAJ</Id>
    <sObject xsi:type="sf:Opportunity" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>{OPP_A}</sf:Id><sf:Amount>1200.0</sf:Amount><sf:Name>Acme &amp; Co - Renewal</sf:Name>
    </sObject>
   </Notification>
   <Notification>
    <Id>04l5e00000Gx7R0AAJ</Id>
    <sObject xsi:type="sf:Opportunity" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>{OPP_B[:15]}</sf:Id>
    </sObject>
   </Notification>
   <Notification>
    <Id>04l5e00000Gx7R1AAJ</Id>
    <sObject xsi:type="sf:Account" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>{ACCOUNT}</sf:Id><sf:Name>Acme</sf:Name>
    </sObject>
   </Notification>
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>"""


def conn(**options) -> ConnectionConfig:
    return ConnectionConfig(
        name="sf",
        crm="salesforce",
        base_url="https://acme.my.salesforce.com",
        webhooks={
            "enabled": True,
            "secrets": {"flow_secret": "${SF_FLOW_SECRET}"},
            "options": {"organization_id": ORG[:15], **options},
        },
    )


def receiver(**options) -> SalesforceReceiver:
    return SalesforceReceiver(conn(**options), {"flow_secret": FLOW_SECRET})


def soap(body: str | bytes, client: str = "13.108.0.5", content_type: str = "text/xml; charset=utf-8"):
    raw = body.encode() if isinstance(body, str) else body
    return IncomingRequest(
        "POST", "https://hooks.example.com/webhooks/sf", "/webhooks/sf", {}, {"content-type": content_type}, raw, client
    )


def flow(data: object, secret: str | None = FLOW_SECRET, header: str = "x-oppsync-secret"):
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers[header] = secret
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return IncomingRequest("POST", "https://hooks.example.com/webhooks/sf", "/webhooks/sf", {}, headers, raw, "1.2.3.4")


def refused(r: SalesforceReceiver, request: IncomingRequest) -> Refused:
    with pytest.raises(Refused) as err:
        r.verify(request)
        r.notifications(request)
    return err.value


# -- pure ------------------------------------------------------------------------------------------------------


def test_an_outbound_message_of_this_org_verifies_and_names_its_opportunities():
    r, request = receiver(), soap(CAPTURED.format(org=ORG))
    r.verify(request)
    notes = r.notifications(request)
    # the Account notification is another object's: left out; a 15-character id is keyed in its 18-character form
    assert [(n.event_id, n.object_ids) for n in notes] == [
        ("04l5e00000Gx7QzAAJ", (OPP_A,)),
        ("04l5e00000Gx7R0AAJ", (OPP_B,)),
    ]
    reply = r.reply(request, notes)
    assert reply.status == 200 and reply.media_type.startswith("text/xml")
    assert reply.body == ACK and b"<Ack>true</Ack>" in reply.body and b"notificationsResponse" in reply.body


def test_the_org_id_is_compared_in_its_18_character_form():
    request = soap(CAPTURED.format(org=ORG[:15]))  # a 15-character OrganizationId, an 18-character option
    receiver(organization_id=ORG).verify(request)
    receiver(organization_id=ORG[:15]).verify(soap(CAPTURED.format(org=ORG)))


@pytest.mark.parametrize(
    "org",
    [OTHER_ORG, OTHER_ORG[:15], ORG[:15].lower(), ORG[:15] + "XXX", "", "not-an-id"],
    ids=["other org", "other org 15", "wrong case", "bad checksum", "empty", "garbage"],
)
def test_an_outbound_message_of_another_org_is_refused_401(org):
    err = refused(receiver(), soap(CAPTURED.format(org=org)))
    assert err.status == 401
    assert ORG not in err.reason and ORG[:15] not in err.reason  # the expected id is not told


def test_allowed_networks_refuse_other_senders():
    r = receiver(allowed_networks=["13.108.0.0/14", "2a01:111::/32"])
    r.verify(soap(CAPTURED.format(org=ORG), client="13.110.1.2"))
    assert refused(r, soap(CAPTURED.format(org=ORG), client="203.0.113.9")).status == 401
    assert refused(r, soap(CAPTURED.format(org=ORG), client="testclient")).status == 401


@pytest.mark.parametrize(
    "body",
    [
        b"<notifications",  # not well-formed
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',  # an entity: never expanded
        b'<?xml version="1.0"?><!DOCTYPE x SYSTEM "http://evil.example/x.dtd"><x/>',  # an external DTD
        b"<x/>",  # not a SOAP envelope
        b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body/></e:Envelope>',  # no notifications
    ],
    ids=["broken", "entity", "external dtd", "not soap", "empty body"],
)
def test_malformed_or_dtd_bearing_xml_is_refused_400(body):
    assert refused(receiver(), soap(body)).status == 400


def test_an_entity_hidden_in_a_real_looking_message_is_refused_400():
    bomb = CAPTURED.format(org=ORG).replace(
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<?xml version="1.0"?><!DOCTYPE soapenv:Envelope [<!ENTITY x "' + "x" * 100 + '">]>',
    )
    assert refused(receiver(), soap(bomb)).status == 400


def test_notifications_without_a_valid_id_or_over_100_are_malformed():
    no_id = CAPTURED.format(org=ORG).replace("<Id>04l5e00000Gx7QzAAJ</Id>", "")
    assert refused(receiver(), soap(no_id)).status == 400
    one = CAPTURED.format(org=ORG).split("<Notification>")[1].split("</Notification>")[0]
    many = CAPTURED.format(org=ORG).replace(
        f"<Notification>{one}</Notification>", f"<Notification>{one}</Notification>" * 101
    )
    assert refused(receiver(), soap(many)).status == 400


def test_an_unknown_content_type_is_refused():
    assert refused(receiver(), soap(CAPTURED.format(org=ORG), content_type="text/plain")).status == 400


def test_a_flow_callout_with_the_shared_secret_verifies():
    r = receiver()
    request = flow({"eventId": "a1b2-c3", "recordIds": [OPP_A, OPP_B[:15], ACCOUNT], "changeType": "created"})
    r.verify(request)
    notes = r.notifications(request)
    assert [(n.event_id, n.object_ids, n.kind) for n in notes] == [("a1b2-c3", (OPP_A, OPP_B), "created")]
    reply = r.reply(request, notes)
    assert reply.status == 200 and json.loads(reply.body) == {"accepted": 1}


def test_a_flow_callout_about_another_object_is_dropped():
    r = receiver()
    assert r.notifications(flow({"eventId": "e", "recordIds": [OPP_A], "objectType": "Account"})) == []
    assert r.notifications(flow({"eventId": "e", "recordIds": [ACCOUNT]})) == []


@pytest.mark.parametrize(
    ("secret", "header"),
    [("wrong", "x-oppsync-secret"), (None, "x-oppsync-secret"), (FLOW_SECRET, "x-other"), ("", "x-oppsync-secret")],
    ids=["wrong secret", "missing header", "other header", "empty"],
)
def test_a_flow_callout_without_the_secret_is_refused_401(secret, header):
    err = refused(receiver(), flow({"eventId": "e", "recordIds": [OPP_A]}, secret, header))
    assert err.status == 401 and FLOW_SECRET not in err.reason


def test_the_secret_header_name_is_an_option_and_no_secret_means_no_flow():
    r = receiver(flow_secret_header="X-Acme-Token")
    r.verify(flow({"eventId": "e", "recordIds": [OPP_A]}, header="x-acme-token"))
    bare = SalesforceReceiver(conn(), {})
    assert refused(bare, flow({"eventId": "e", "recordIds": [OPP_A]})).status == 401


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        [],
        {"recordIds": [OPP_A]},
        {"eventId": "", "recordIds": [OPP_A]},
        {"eventId": "e", "recordIds": []},
        {"eventId": "e", "recordIds": ["006 nope"]},
        {"eventId": "e", "recordIds": [OPP_A] * 201},
        {"eventId": "e", "recordIds": [OPP_A], "organizationId": OTHER_ORG},
    ],
    ids=["not json", "a list", "no eventId", "empty eventId", "no ids", "bad id", "too many", "other org"],
)
def test_a_malformed_flow_callout_is_refused_400(data):
    r = receiver()
    request = flow(data)
    r.verify(request)
    with pytest.raises(Refused) as err:
        r.notifications(request)
    assert err.value.status == 400


def test_configuration_problems_are_named():
    assert SalesforceReceiver.problems(conn()) == []
    missing = ConnectionConfig(
        name="sf", crm="salesforce", base_url="https://x", webhooks={"enabled": True, "options": {}}
    )
    assert "organization_id: missing" in SalesforceReceiver.problems(missing)[0]
    bad = conn(organization_id="006Hs0000000001", allowed_networks=["nope"], colour="blue")
    text = "\n".join(SalesforceReceiver.problems(bad))
    assert "not an organization id" in text and "'nope' is not an IP network" in text and "colour: unknown" in text


def test_the_simulators_message_has_the_documented_shape_and_batches_by_100():
    sim = sfsim.build(seed=3, opportunities=150)
    sim.webhooks.stop()
    opps = list(sim.world.opps.values())
    messages = sim._outbound_messages([Change("updated", o, i + 1) for i, o in enumerate(opps)])
    assert [m.body.count(b"<Notification>") for m in messages] == [100, 50]
    assert messages[0].headers["Content-Type"] == "text/xml; charset=utf-8"
    r = receiver()
    ids = []
    for m in messages:
        request = soap(m.body)
        r.verify(request)
        ids += [n.object_ids[0] for n in r.notifications(request)]
    assert ids == [o.native_id for o in opps]
    deleted = sim._outbound_messages([Change("deleted", opps[0], 999)])
    assert deleted == []  # an outbound message runs on create / update


# -- through the app, with the simulator posting -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live(tmp_path: Path):
    """The receiver app on uvicorn (a free port), a Salesforce simulator served over HTTP, and the inbox."""
    cfg = parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "connections": [
                {
                    "name": "sf",
                    "crm": "salesforce",
                    "base_url": "https://acme.my.salesforce.com",
                    "webhooks": {"enabled": True, "options": dict(sfsim.SANDBOX_WEBHOOK_OPTIONS)},
                }
            ],
        }
    )
    app = create_app(cfg, {"sf": SalesforceReceiver(cfg.connections[0], {})})
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    sim = sfsim.build(seed=7, opportunities=30)
    with SandboxServer(sim) as sandbox:
        yield sim, sandbox, f"http://127.0.0.1:{server.config.port}/webhooks/sf", inbox.engine_for(cfg)
    sim.webhooks.stop()
    server.should_exit = True
    thread.join(5)


def stored(engine) -> list[dict]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(select(inbox.webhook_inbox))]


def test_the_simulators_outbound_messages_land_in_the_inbox_once(live):
    sim, sandbox, url, engine = live
    r = requests.post(sandbox.url + "/__sandbox/webhooks", json={"url": url, "faults": {"duplicate": 1.0}}, timeout=5)
    assert r.status_code == 200
    ids = list(sim.world.opps)[:3]
    for i, native in enumerate(ids):
        sim.world.update(native, amount=1000.0 + i)
    assert sim.webhooks.idle(5)
    # every message was delivered twice (at-least-once) and acknowledged each time
    assert [s["status"] for s in sim.webhooks.sent] and {s["status"] for s in sim.webhooks.sent} == {200}
    rows = stored(engine)
    assert sorted(json.loads(row["object_ids"])[0] for row in rows) == sorted(ids)
    assert len(rows) == 3 and {row["crm"] for row in rows} == {"salesforce"}


def test_the_ack_is_what_salesforce_expects(live):
    sim, sandbox, url, engine = live
    opp = next(iter(sim.world.opps.values()))
    message = sim._outbound_messages([Change("updated", opp, 1)])[0]
    r = requests.post(url, data=message.body, headers=message.headers, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
    assert r.content == ACK
    again = requests.post(url, data=message.body, headers=message.headers, timeout=5)  # a replay: stored once
    assert again.status_code == 200 and len(stored(engine)) == 1


def test_a_forged_message_is_refused_and_nothing_is_stored(tmp_path: Path):
    cfg = parse_config(
        {
            "warehouse": {"url": f"duckdb:///{tmp_path / 'w.duckdb'}"},
            "connections": [{"name": "sf", "crm": "salesforce", "base_url": "https://acme.my.salesforce.com"}],
        }
    )
    app = create_app(cfg, {"sf": SalesforceReceiver(conn(), {"flow_secret": FLOW_SECRET})})
    engine = inbox.engine_for(cfg)
    with TestClient(app) as c:
        forged = c.post("/webhooks/sf", content=CAPTURED.format(org=OTHER_ORG), headers={"content-type": "text/xml"})
        dtd = c.post(
            "/webhooks/sf",
            content=b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "a">]><x>&a;</x>',
            headers={"content-type": "text/xml"},
        )
        unsigned = c.post("/webhooks/sf", json={"eventId": "e", "recordIds": [OPP_A]})
        ok = c.post(
            "/webhooks/sf", json={"eventId": "e", "recordIds": [OPP_A]}, headers={"X-Oppsync-Secret": FLOW_SECRET}
        )
        for _ in range(2):
            again = c.post(
                "/webhooks/sf", json={"eventId": "e", "recordIds": [OPP_A]}, headers={"X-Oppsync-Secret": FLOW_SECRET}
            )
    assert (forged.status_code, dtd.status_code, unsigned.status_code) == (401, 400, 401)
    assert ORG not in forged.text and FLOW_SECRET not in unsigned.text
    assert ok.status_code == again.status_code == 200 and ok.json() == {"accepted": 1}
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar() == 1


# -- registration ----------------------------------------------------------------------------------------------


def _connector(url: str):
    cls = connector_class("salesforce")
    c = ConnectionConfig(
        name="sf",
        crm="salesforce",
        base_url=url,
        credentials={"client_id": "${SF_CLIENT_ID}", "client_secret": "${SF_CLIENT_SECRET}"},
    )
    return cls(c, dict(sfsim.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def test_register_prints_the_steps_with_the_orgs_id_and_the_simulator_then_posts_there(live):
    sim, sandbox, url, engine = live
    lines = SalesforceReceiver(conn(), {}).register(_connector(sandbox.url), url)
    text = "\n".join(lines)
    assert "no API that creates an outbound message" in text
    assert f"organization_id: {sfsim.SANDBOX_WEBHOOK_OPTIONS['organization_id']}" in text  # read from the org
    assert url in text and "X-Oppsync-Secret" in text and "WARNING" not in text
    # the manual step, in the sandbox: its control endpoint; then one change, one stored notification
    requests.post(sandbox.url + "/__sandbox/webhooks", json={"url": url}, timeout=5).raise_for_status()
    native = next(iter(sim.world.opps))
    sim.world.update(native, name="Renamed by a user")
    assert sim.webhooks.idle(5)
    assert [json.loads(r["object_ids"]) for r in stored(engine)] == [[native]]


def test_register_warns_when_the_configured_org_is_another():
    sim = sfsim.build(seed=1, opportunities=5)
    sim.webhooks.stop()
    with SandboxServer(sim) as sandbox:
        lines = receiver(organization_id=OTHER_ORG).register(_connector(sandbox.url), "https://h/webhooks/sf")
    assert any(line.startswith("WARNING") and ORG in line for line in lines)


def test_register_without_rights_on_organization_says_where_to_find_the_id():
    sim = sfsim.build(seed=1, opportunities=5, variant="no_optional_rights")
    sim.webhooks.stop()
    with SandboxServer(sim) as sandbox:
        lines = receiver().register(_connector(sandbox.url), "https://h/webhooks/sf")
    assert any("Company Information" in line for line in lines)
