"""Alerts (issue 20 item 5): a connection's run fails for real (the CRM refuses a wrong client secret), the
connection's run-failure sensor is evaluated on that run, and the alert reaches a local Slack receiver (an
incoming webhook, and the Web API with a configurable base URL) and a local SMTP server with the connection,
the CRM, the run id, the error's first line and the link to the run, and without any secret. A connection
gone stale (its freshness policy failing) alerts once per stretch of staleness."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
import yaml
from aiosmtpd.controller import Controller

from oppsync_pipeline.defs.alerts import failure_sensor_name
from oppsync_pipeline.defs.crm.assets import opportunities_key
from oppsync_pipeline.defs.crm.schedules import extract_run_config, sync_job_name
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.alerts import AlertDeliveryError, first_line
from oppsync_pipeline.lib.config import ConfigError, check_config, load_config
from oppsync_pipeline.locations import load_location
from oppsync_pipeline.sandbox.cluster import crm_module, env_var
from tests.dagster.conftest import load_defs, start_servers, stop_servers, write_config

CONN = "acme-salesforce"
UI = "https://dagster.example.com"
WRONG_SECRET = "wrong-secret-Kq83mZp0XvT7"  # what the CRM refuses: it must not reach an alert
WEBHOOK_PATH = "/services/T0AAA/B0BBB/hookSecretXy7Qw3Zr9"  # an incoming webhook's URL is its credential
BOT_TOKEN = "xoxb-111-222-botTokenSecretQq9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlackReceiver:
    """A local stand-in for Slack's two endpoints: incoming webhooks (answer `ok`) and chat.postMessage."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict, str]] = []  # (path, body, authorization header)
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                body = json.loads(raw) if raw.startswith("{") else dict(p.split("=", 1) for p in raw.split("&") if p)
                receiver.posts.append((self.path, body, self.headers.get("Authorization") or ""))
                api = self.path.startswith("/api/")
                reply = json.dumps({"ok": True, "channel": "C1", "ts": "1.0"}).encode() if api else b"ok"
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json" if api else "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self, path_prefix: str) -> list[str]:
        return [body["text"] for path, body, _ in self.posts if path.startswith(path_prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpInbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def slack() -> Iterator[SlackReceiver]:
    receiver = SlackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp() -> Iterator[tuple[SmtpInbox, int]]:
    inbox, port = SmtpInbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture(scope="module")
def crm() -> Iterator[dict]:
    servers = start_servers({CONN: "salesforce"}, opportunities=20)
    yield servers
    stop_servers(servers)


def alerts_config(tmp_path: Path, crm: dict, alerts: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """oppsync.yaml with `alerts`, its secrets in the environment, the CRM's client secret wrong."""
    webhook_base = alerts.pop("_webhook_base", "")
    config = write_config(tmp_path / "oppsync.yaml", crm, f"duckdb:///{tmp_path / 'warehouse.duckdb'}", alerts=alerts)
    secrets = config.with_name("oppsync.secrets.env")
    wrong = env_var(CONN, "client_secret")
    lines = [ln for ln in secrets.read_text().splitlines() if not ln.startswith(f"{wrong}=")]
    lines += [f"{wrong}={WRONG_SECRET}"]
    secrets.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("OA_TEST_SLACK_WEBHOOK_URL", f"{webhook_base}{WEBHOOK_PATH}")
    monkeypatch.setenv("OA_TEST_SLACK_TOKEN", BOT_TOKEN)
    return config


def syncs_location(config: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    """The deployment's syncs code location (where the alert sensors live), built from `config`; no dbt."""
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
    return load_location("syncs")


def failed_run(defs: dg.Definitions, instance: dg.DagsterInstance, tags: dict | None = None) -> dg.DagsterRun:
    """The connection's sync, run for real against the simulator: refused credentials fail it at once."""
    conn = load_config().connection(CONN)
    result = defs.resolve_job_def(sync_job_name(conn)).execute_in_process(
        run_config=extract_run_config(conn, "auto"), instance=instance, raise_on_error=False, tags=tags
    )
    assert not result.success
    return instance.get_run_by_id(result.run_id)


def evaluate_failure_sensor(defs: dg.Definitions, instance: dg.DagsterInstance, run: dg.DagsterRun, config: Path):
    sensor = defs.resolve_sensor_def(failure_sensor_name(load_config().connection(CONN)))
    failure = next(
        r.event_log_entry.dagster_event
        for r in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    )
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=run,
        resources={"oppsync": OppsyncResource(config_path=str(config))},
    ).for_run_failure()
    return sensor(context)


def secrets_in(text: str) -> list[str]:
    real = crm_module("salesforce").SANDBOX_CREDENTIALS["client_secret"]
    return [s for s in (WRONG_SECRET, real, WEBHOOK_PATH, "hookSecretXy7Qw3Zr9", BOT_TOKEN) if s in text]


def test_a_failed_sync_alerts_slack_and_email_with_the_run_and_no_secret(
    tmp_path, crm, slack, smtp, dagster_instance, monkeypatch
):
    inbox, smtp_port = smtp
    alerts = {
        "dagster_url": UI,
        "slack": {"webhook_url": "${OA_TEST_SLACK_WEBHOOK_URL}"},
        "email": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "security": "none",
            "from": "oppsync@example.com",
            "to": ["data-team@example.com"],
        },
        "_webhook_base": slack.url,
    }
    config = alerts_config(tmp_path, crm, alerts, monkeypatch)
    defs = syncs_location(config, monkeypatch)
    run = failed_run(defs, dagster_instance)
    assert run.tags["oppsync/connection"] == CONN

    evaluate_failure_sensor(defs, dagster_instance, run, config)

    [text] = slack.texts(WEBHOOK_PATH)
    assert f"sync of {CONN} (salesforce) failed" in text
    assert f"run: {run.run_id}" in text
    assert f"open: {UI}/runs/{run.run_id}" in text
    error = next(line for line in text.splitlines() if line.startswith("error: "))
    # the extract's own words, first line only (no traceback, no exception class path)
    assert CONN in error and "dagster._core" not in error and len(error) < 320, error
    assert not secrets_in(text), secrets_in(text)

    [raw] = inbox.messages
    mail = message_from_bytes(raw)
    assert mail["Subject"] == f"oppsync: sync of {CONN} (salesforce) failed"
    assert mail["To"] == "data-team@example.com"
    body = mail.get_payload(decode=True).decode()
    assert error in body and run.run_id in body and not secrets_in(raw.decode())


def test_the_slack_web_api_form_and_what_does_not_alert(tmp_path, crm, slack, dagster_instance, monkeypatch):
    """A bot token posts with chat.postMessage to the configured API base; another connection's failed run, a run
    that run_retries will re-execute, and a channel that refuses are handled as a user expects."""
    alerts = {"slack": {"token": "${OA_TEST_SLACK_TOKEN}", "channel": "#data-alerts", "api_url": f"{slack.url}/api/"}}
    config = alerts_config(tmp_path, crm, alerts, monkeypatch)
    defs = syncs_location(config, monkeypatch)

    other = failed_run(defs, dagster_instance, tags={"oppsync/connection": "someone-else"})
    evaluate_failure_sensor(defs, dagster_instance, other, config)
    assert slack.posts == []

    run = failed_run(defs, dagster_instance)
    dagster_instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})
    evaluate_failure_sensor(defs, dagster_instance, dagster_instance.get_run_by_id(run.run_id), config)
    assert slack.posts == []

    evaluate_failure_sensor(defs, dagster_instance, run, config)
    [(path, body, auth)] = slack.posts
    assert path == "/api/chat.postMessage" and body["channel"] == "#data-alerts"
    assert auth == f"Bearer {BOT_TOKEN}"  # the token goes in the header, never the text
    assert f"run: {run.run_id}" in body["text"] and "open:" not in body["text"]  # no dagster_url: no link
    assert not secrets_in(body["text"])

    slack.status = 500
    with pytest.raises(AlertDeliveryError) as refused:
        evaluate_failure_sensor(defs, dagster_instance, run, config)
    assert "alerts.slack" in str(refused.value) and not secrets_in(str(refused.value))


def test_a_stale_connection_alerts_once_per_stretch(tmp_path, crm, slack, dagster_instance, monkeypatch):
    """The freshness daemon's state changes (written as the daemon writes them) drive the sensor: FAIL alerts,
    a second tick in the same FAIL does not, PASS then FAIL again alerts again."""
    from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange  # the daemon's own event

    config = alerts_config(
        tmp_path,
        crm,
        {"dagster_url": UI, "notify_on": ["freshness"], "slack": {"webhook_url": "${OA_TEST_SLACK_WEBHOOK_URL}"}}
        | {"_webhook_base": slack.url},
        monkeypatch,
    )
    defs = syncs_location(config, monkeypatch)
    assert not [s for s in defs.sensors if s.name.endswith("_failed")]  # notify_on: freshness only
    sensor = defs.resolve_sensor_def("alert_stale_connections")
    key = opportunities_key(load_config().connection(CONN))
    resources = {"oppsync": OppsyncResource(config_path=str(config))}
    cursor = None

    def state(new: FreshnessState, previous: FreshnessState, at: float) -> None:
        dagster_instance.report_runless_asset_event(
            FreshnessStateChange(key=key, previous_state=previous, new_state=new, state_change_timestamp=at)
        )

    def tick() -> None:
        nonlocal cursor
        context = dg.build_sensor_context(instance=dagster_instance, cursor=cursor, resources=resources)
        sensor(context)
        cursor = context.cursor

    tick()
    state(FreshnessState.PASS, FreshnessState.UNKNOWN, 1_800_000_000.0)
    tick()
    assert slack.posts == []
    state(FreshnessState.FAIL, FreshnessState.PASS, 1_800_007_200.0)
    tick()
    tick()
    [text] = slack.texts(WEBHOOK_PATH)
    assert f"{CONN} (salesforce) is stale" in text and "never synced" in text
    assert "since 2027-01-15 10:00 UTC" in text and f"{UI}/assets/oppsync/acme_salesforce/opportunities" in text
    state(FreshnessState.PASS, FreshnessState.FAIL, 1_800_008_000.0)
    state(FreshnessState.FAIL, FreshnessState.PASS, 1_800_015_200.0)
    tick()
    assert len(slack.texts(WEBHOOK_PATH)) == 2


def test_alerts_are_off_by_default_and_bad_config_names_the_key(tmp_path, crm, monkeypatch):
    config = write_config(tmp_path / "oppsync.yaml", crm, f"duckdb:///{tmp_path / 'w.duckdb'}")
    assert not [s for s in syncs_location(config, monkeypatch).sensors if s.name.startswith("alert_")]
    # the whole project (the defs folder, as `dg` loads it) has them when configured
    data = yaml.safe_load(config.read_text())
    config.write_text(
        yaml.safe_dump(
            {
                **data,
                "alerts": {
                    "email": {"host": "h", "from": "a@b.c", "to": ["d@e.f"], "username": "u", "password": "${SMTP_PW}"}
                },
            }
        )
    )
    names = {s.name for s in load_defs(config, monkeypatch).sensors}
    assert {"alert_acme_salesforce_failed", "alert_stale_connections"} <= names

    missing = check_config(load_config(config), environ={})
    assert "alerts.email.password: environment variable SMTP_PW is not set" in " ".join(missing), missing
    for alerts, expected in (
        ({"slack": {"webhook_url": "https://hooks.slack.com/services/T/B/x"}}, "alerts.slack.webhook_url: "),
        ({"slack": {"token": "${T}"}}, "alerts.slack: token needs channel"),
        ({}, "alerts: alerts are enabled but go nowhere"),
        ({"email": {"host": "smtp", "from": "a@b.c", "to": []}}, "alerts.email.to"),
        ({"dagster_url": "dagster:3000", "email": {"host": "h", "from": "a@b.c", "to": ["d@e.f"]}}, "dagster_url"),
    ):
        config.write_text(yaml.safe_dump({**data, "alerts": alerts}))
        with pytest.raises(ConfigError) as err:
            load_config(config)
        assert any(p.startswith(expected) or expected in p for p in err.value.problems), err.value.problems


def test_first_line_drops_the_traceback_and_the_class_path():
    assert first_line("dagster._core.definitions.events.Failure: acme: refused\nTraceback ...") == "acme: refused"
    assert first_line("\n\nStep failed: x\nmore") == "Step failed: x"
    assert first_line(None) == "no error message recorded"
    assert len(first_line("x" * 1000)) == 300
