"""Alerts: what a failed or stale connection's message says, and delivering it to Slack or by e-mail.

No Dagster here: the sensors (defs/alerts.py) gather the facts (connection, run id, the error) and call `send`.
Every text is scrubbed of the configured secrets (the connections' credentials and the alert channels' own)
before it leaves: a CRM's error may echo a request, and an alert goes to people who hold no credentials.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Literal
from urllib.parse import quote

from oppsync_pipeline.lib.config import (
    AlertsConfig,
    ConfigError,
    EmailAlerts,
    OppsyncConfig,
    SlackAlerts,
    alert_secret_refs,
    resolve_credentials,
    resolve_refs,
)
from oppsync_pipeline.lib.scrub import Scrubber

ERROR_CHARS = 300  # an alert carries the error's first line; the rest is one click away in the run's log


class AlertDeliveryError(Exception):
    """A channel refused or could not be reached. The message names the channel and the status, never its secret."""


@dataclass(frozen=True)
class Alert:
    kind: Literal["run_failure", "freshness"]
    connection: str
    crm: str
    summary: str  # the error's first line, or what is stale
    run_id: str | None = None
    link: str | None = None
    activity: str = "sync"  # what failed: a sync, or the revenue write-back to the CRM

    @property
    def title(self) -> str:
        if self.kind == "run_failure":
            return f"oppsync: {self.activity} of {self.connection} ({self.crm}) failed"
        return f"oppsync: {self.connection} ({self.crm}) is stale"

    def text(self) -> str:
        lines = [self.title, f"connection: {self.connection}", f"crm: {self.crm}"]
        if self.run_id:
            lines.append(f"run: {self.run_id}")
        lines.append(("error: " if self.kind == "run_failure" else "freshness: ") + self.summary)
        if self.link:
            lines.append(f"open: {self.link}")
        return "\n".join(lines)


def first_line(message: str | None) -> str:
    """The first non-empty line of an error, cut to ERROR_CHARS; Dagster prefixes the exception's class path
    (`dagster._core.definitions.events.Failure: ...`), which says nothing to the reader and is dropped."""
    line = next((ln.strip() for ln in (message or "").splitlines() if ln.strip()), "no error message recorded")
    head, sep, rest = line.partition(": ")
    if sep and "." in head and " " not in head:  # a dotted exception class path
        line = rest
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def run_link(dagster_url: str | None, run_id: str) -> str | None:
    return f"{dagster_url}/runs/{run_id}" if dagster_url else None


def asset_link(dagster_url: str | None, key_path: list[str]) -> str | None:
    return f"{dagster_url}/assets/{'/'.join(quote(p) for p in key_path)}" if dagster_url else None


def scrubber_for(cfg: OppsyncConfig, environ: Mapping[str, str] | None = None) -> Scrubber:
    """Knows every connection's credentials and the alert channels' secrets (those that are set)."""
    scrub = Scrubber()
    # a missing credential cannot leak (the sync or `config check` reports it)
    for conn in cfg.connections:
        with suppress(ConfigError):
            scrub.add_credentials(resolve_credentials(cfg, conn, environ))
    for where, refs in alert_secret_refs(cfg).items():
        with suppress(ConfigError):
            for value in resolve_refs(cfg, refs, where, environ).values():
                scrub.add_secret(value)
    return scrub


def send(cfg: OppsyncConfig, alert: Alert, environ: Mapping[str, str] | None = None) -> list[str]:
    """Deliver `alert` to every configured channel; returns the channels it reached. A channel that fails does
    not keep the others from getting it; the failures are raised together after (the sensor's tick fails and
    shows why in the UI)."""
    alerts = cfg.alerts
    if alerts is None or not alerts.enabled or alert.kind not in alerts.notify_on:
        return []
    scrub = scrubber_for(cfg, environ)
    title, text = scrub(alert.title), scrub(alert.text())
    secrets = _channel_secrets(cfg, alerts, environ)
    reached, failed = [], []
    for name, deliver in _channels(alerts, secrets):
        try:
            deliver(title, text)
            reached.append(name)
        except AlertDeliveryError as err:
            failed.append(scrub(str(err)))
    if failed:
        raise AlertDeliveryError("; ".join(failed) + (f" (delivered to {', '.join(reached)})" if reached else ""))
    return reached


def _channel_secrets(cfg: OppsyncConfig, alerts: AlertsConfig, environ: Mapping[str, str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for where, refs in alert_secret_refs(cfg).items():
        values.update({f"{where}.{k}": v for k, v in resolve_refs(cfg, refs, where, environ).items()})
    return values


def _channels(alerts: AlertsConfig, secrets: Mapping[str, str]):
    if alerts.slack:
        yield "slack", lambda title, text: post_to_slack(alerts.slack, secrets, text)
    if alerts.email:
        yield "email", lambda title, text: send_email(alerts.email, secrets.get("alerts.email.password"), title, text)


def post_to_slack(slack: SlackAlerts, secrets: Mapping[str, str], text: str) -> None:
    """An incoming webhook gets a JSON `{"text": ...}` POST; a bot token posts with chat.postMessage. slack_sdk
    is imported here: only a process that sends an alert pays for it."""
    from slack_sdk.errors import SlackApiError, SlackClientError
    from slack_sdk.web import WebClient
    from slack_sdk.webhook import WebhookClient

    try:
        if slack.webhook_url:
            response = WebhookClient(secrets["alerts.slack.webhook_url"], timeout=10).send(text=text)
            if response.status_code != 200:
                raise AlertDeliveryError(
                    f"alerts.slack.webhook_url: Slack answered {response.status_code} {response.body[:200]!r}"
                )
            return
        client = WebClient(token=secrets["alerts.slack.token"], base_url=slack.api_url, timeout=10)
        client.chat_postMessage(channel=slack.channel, text=text)
    except SlackApiError as err:
        raise AlertDeliveryError(
            f"alerts.slack: chat.postMessage to {slack.channel} refused: {err.response.get('error')} "
            "(check the token's chat:write scope and that the bot is in the channel)"
        ) from None
    except (SlackClientError, OSError) as err:
        raise AlertDeliveryError(f"alerts.slack: Slack not reached: {type(err).__name__}") from None


def send_email(email: EmailAlerts, password: str | None, subject: str, body: str) -> None:
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, email.from_address, ", ".join(email.to)
    msg.set_content(body)
    try:
        if email.security == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                email.host, email.port, timeout=email.timeout_seconds, context=ssl.create_default_context()
            )
        else:
            smtp = smtplib.SMTP(email.host, email.port, timeout=email.timeout_seconds)
        with smtp:
            if email.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if email.username:
                smtp.login(email.username, password or "")
            smtp.send_message(msg)
    except smtplib.SMTPException as err:
        raise AlertDeliveryError(f"alerts.email: {email.host}:{email.port} refused: {type(err).__name__}") from None
    except OSError as err:
        raise AlertDeliveryError(
            f"alerts.email: {email.host}:{email.port} not reached: {type(err).__name__} {err.strerror or ''}".rstrip()
        ) from None
