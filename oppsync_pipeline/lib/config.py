"""oppsync.yaml: one validated configuration file.

Configuration flows one way: file (+ environment for secrets) -> these typed models -> resources -> assets.
Secrets are never written in the file: a credential is a reference to an environment variable
(`${NAME}`), resolved only when a connector is built, and looked up in an optional dotenv-style
secrets file when the environment does not have it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from oppsync_pipeline.lib.crm.registry import CRMS, connector_class

# The `crm:` values a connection accepts: the registry's CRMs (a Literal, so an unknown one is named with the
# list of known ones).
CrmName = Literal[CRMS]  # type: ignore[valid-type]
FilterOp = Literal["equal", "not_equal", "more_than", "less_than", "at_least", "at_most", "in"]
DEFAULT_CONFIG_PATH = Path("oppsync.yaml")
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

# Canonical fields a connection may point at a custom CRM field (seed 002: created date / created by).
OVERRIDABLE_FIELDS = (
    "created_at",
    "created_by_crm_id",
    "project_name",
    "client_name",
    "stage",
    "amount",
    "close_date",
    "probability",
    "sales_executive",
)


# `extra_fields:` types: how dbt casts each raw CRM value in marts.opportunity_fields (a value that does not
# cast is NULL there, never a failed build).
ExtraFieldType = Literal["text", "number", "integer", "date", "timestamp", "boolean"]
_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# marts.opportunity_fields' own columns: an extra field cannot take their names.
FIXED_FIELD_COLUMNS = ("connection", "crm", "source_id", "is_deleted")


class ConfigError(Exception):
    """Configuration is invalid; `problems` holds one `key.path: message` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecordFilter(_Strict):
    """A record filter as in seed 001: field, operator, value. Pushed down into the CRM's query language."""

    field: str
    op: FilterOp
    value: Any

    @model_validator(mode="after")
    def _value_shape(self) -> RecordFilter:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("operator 'in' takes a list value, e.g. value: [a, b]")
        if self.op != "in" and isinstance(self.value, (list, dict)):
            raise ValueError(f"operator '{self.op}' takes a single value, not a list")
        return self


class ExtraField(_Strict):
    """One more CRM field as a typed column of marts.opportunity_fields (seed 001's field mapping)."""

    field: Annotated[str, Field(min_length=1)]  # the CRM's field name, as `fields:` overrides name them
    type: ExtraFieldType = "text"


class QuotaConfig(_Strict):
    """How much of the CRM's API quota one run may use before it stops early and reports 'skipped'."""

    run_share: Annotated[float, Field(gt=0, le=1)] = 0.25
    stop_at_usage: Annotated[float, Field(gt=0, le=1)] = 0.9
    # Seconds a run may sleep in all when the CRM asks it to wait (Retry-After) or backs off after errors;
    # a wait that would pass it ends the run as skipped instead (0: never wait).
    max_wait_seconds: Annotated[float, Field(ge=0)] = 120.0


class Qualification(_Strict):
    """Seed 004: what makes an opportunity 'qualified' (stages, or a probability threshold)."""

    stages: list[str] = []
    min_probability: Annotated[float, Field(ge=0, le=100)] | None = None


def _env_refs_only(values: dict[str, str], what: str) -> dict[str, str]:
    """Secrets in the file are references to environment variables, never the values themselves."""
    for key, ref in values.items():
        if not isinstance(ref, str) or not _ENV_REF.match(ref):
            raise ValueError(
                f"{what} '{key}' must reference an environment variable as '${{NAME}}'; "
                "secrets are never written in oppsync.yaml"
            )
    return values


class ConnectionWriteback(_Strict):
    """Revenue write-back to this connection's CRM (README: Revenue write-back)."""

    # false: nothing is ever written to this CRM (`oppsync writeback` refuses, the sensor skips it)
    enabled: bool = True
    # seed 000's opt-out: false skips the automatic update on approval; the manual "Update CRM" still writes
    automatic: bool = True


class ConnectionWebhooks(_Strict):
    """Change notifications from this connection's CRM (README: Near-real-time syncs). Autotask has none."""

    enabled: bool = False
    # secrets the CRM signs or authenticates its notifications with, as ${ENV} references (lib/webhooks/<crm>.py
    # names the keys each CRM needs, e.g. HubSpot's client_secret, Dataverse's webhook key)
    secrets: dict[str, str] = {}
    # per-CRM settings that are not secrets (Salesforce organization_id, Dataverse auth type ...)
    options: dict[str, Any] = {}

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: dict[str, str]) -> dict[str, str]:
        return _env_refs_only(v, "webhook secret")


class ConnectionConfig(_Strict):
    name: str
    crm: CrmName
    base_url: str
    credentials: dict[str, str] = {}
    schedule: str = "30 * * * *"
    full_sync_schedule: str = "0 2 * * *"
    timezone: str = "UTC"
    open_statuses: list[str] | None = None
    filters: list[RecordFilter] = []
    fields: dict[str, str] = {}
    # mart column name -> the CRM field it holds and its type (marts.opportunity_fields)
    extra_fields: dict[str, ExtraField] = {}
    page_size: Annotated[int, Field(ge=1)] | None = None
    overlap_minutes: Annotated[int, Field(ge=0)] = 10
    max_delete_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Records failing validation are quarantined (quarantine.py); more than this share of the connection's
    # records quarantined in one run blocks the run.
    quarantine_max_share: Annotated[float, Field(ge=0, le=1)] = 0.01
    quota: QuotaConfig = QuotaConfig()
    stage_categories: dict[str, Literal["open", "won", "lost"]] = {}
    qualification: Qualification | None = None
    # Seed 001: track an opportunity from the moment it reaches this stage (or any later one in the CRM's
    # stage order), and keep tracking it after, even if it moves back. A stage name (or id) of the tenant.
    track_from_stage: str | None = None
    options: dict[str, Any] = {}
    writeback: ConnectionWriteback = ConnectionWriteback()
    webhooks: ConnectionWebhooks = ConnectionWebhooks()
    # Seed 003: the probability (0-100) expected revenue assumes for this connection's opportunities without
    # one (overrides `mart.default_probability`).
    default_probability: Annotated[float, Field(ge=0, le=100)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"'{v}' must be lowercase letters, digits, '-' or '_', starting with a letter")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"'{v}' is not an http(s) URL; write e.g. https://yourorg.my.salesforce.com")
        return v.rstrip("/")

    @field_validator("schedule", "full_sync_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not croniter.is_valid(v) or len(v.split()) != 5:
            raise ValueError(f"'{v}' is not a 5-field cron expression; the default is '30 * * * *'")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, v: dict[str, str]) -> dict[str, str]:
        return _env_refs_only(v, "credential")

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(OVERRIDABLE_FIELDS))
        if unknown:
            raise ValueError(f"unknown canonical field(s) {unknown}; overridable: {list(OVERRIDABLE_FIELDS)}")
        return v

    @field_validator("extra_fields")
    @classmethod
    def _extra_fields(cls, v: dict[str, ExtraField]) -> dict[str, ExtraField]:
        for name in v:
            if not _COLUMN.match(name):
                raise ValueError(
                    f"'{name}' is not a column name: lowercase letters, digits and '_', starting with a letter "
                    "(e.g. lead_source)"
                )
            if name in FIXED_FIELD_COLUMNS:
                raise ValueError(
                    f"'{name}' is a fixed column of marts.opportunity_fields {list(FIXED_FIELD_COLUMNS)}; "
                    "choose another name"
                )
        return v

    @model_validator(mode="after")
    def _options(self) -> ConnectionConfig:
        """`options` are the CRM's own (each connector's Options model): typos and wrong types are refused here,
        at load time, instead of being ignored by the run."""
        model = connector_class(self.crm).Options  # imports the connector (which imports this module)
        try:
            model.model_validate(self.options)
        except ValidationError as err:
            raise ValueError("\n".join(_option_problems(err, model, self.crm))) from None
        return self

    def credential_env_vars(self) -> dict[str, str]:
        return {key: _ENV_REF.match(ref).group(1) for key, ref in self.credentials.items()}  # type: ignore[union-attr]


class UserConfig(_Strict):
    """An internal user, linked to CRM user ids per connection (first linked wins, seed 002)."""

    id: str
    name: str
    email: str | None = None
    crm_ids: dict[str, list[str]] = {}


# A size DuckDB takes for its memory_limit (256MB, 1.5GiB, 50%): checked here, so it may be written into a SET
MEMORY_LIMIT_PATTERN = r"(?i)^\d+(\.\d+)?\s*([kmgt]i?b|%)$"


class DuckDBSettings(_Strict):
    """The embedded warehouse's engine settings (`warehouse.duckdb:`); ignored on Postgres. The environment
    variables OPPSYNC_DUCKDB_MEMORY_LIMIT / OPPSYNC_DUCKDB_THREADS override them for one process."""

    # DuckDB's buffer pool, past which it spills to `<warehouse>.duckdb.tmp/` (its own default is 80% of RAM)
    memory_limit: str = Field("256MB", pattern=MEMORY_LIMIT_PATTERN)
    # DuckDB's worker threads; None = one per core
    threads: int | None = Field(None, ge=1)
    # More connections than this are refused on DuckDB (README "Scaling out"): one file, one writer, every sync
    # of the hour queued behind the others' reconciles on one machine. Above it, use Postgres.
    max_connections: Annotated[int, Field(ge=1)] = 50


class WarehouseConfig(_Strict):
    url: str = "duckdb:///.oppsync/warehouse.duckdb"
    duckdb: DuckDBSettings = DuckDBSettings()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = v.split("://", 1)[0]
        if scheme == "postgresql" or scheme == "postgres":
            raise ValueError(f"'{scheme}://' names no driver; write postgresql+psycopg2://user@host:5432/db")
        if not v.strip():
            raise ValueError(
                "is empty; write duckdb:///.oppsync/warehouse.duckdb or postgresql+psycopg2://user@host:5432/db"
            )
        if scheme not in ("duckdb", "postgresql+psycopg2", "postgresql+psycopg"):
            raise ValueError(f"unsupported scheme '{scheme}'; use duckdb:///path or postgresql+psycopg2://...")
        rest = v.split("://", 1)[1] if "://" in v else ""
        if scheme == "duckdb" and not rest.lstrip("/").strip():
            raise ValueError(
                f"'{v}' names no database file; write duckdb:///.oppsync/warehouse.duckdb (relative) "
                "or duckdb:////abs/path/warehouse.duckdb (':memory:' is not kept between runs)"
            )
        if scheme.startswith("postgresql"):
            parsed = urlparse(v)
            if not (parsed.hostname or "host=" in parsed.query) or not parsed.path.strip("/"):
                raise ValueError(f"'{v}' needs a host and a database name; write {scheme}://user@host:5432/database")
        return v

    @property
    def backend(self) -> Literal["duckdb", "postgres"]:
        return "duckdb" if self.url.startswith("duckdb") else "postgres"


class ReportingConfig(_Strict):
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)


class MartConfig(_Strict):
    """`mart:`: how the marts compute what the CRMs leave open."""

    # Seed 003: the probability (0-100) expected revenue assumes for an opportunity without one; None: no
    # expected revenue for those. A connection's `default_probability` overrides it.
    default_probability: Annotated[float, Field(ge=0, le=100)] | None = None


class SandboxConfig(_Strict):
    """The built-in CRM sandbox: started by `make run` / `oppsync run` when enabled."""

    enabled: bool = False
    seed: int = 42
    opportunities: Annotated[int, Field(ge=0)] = 2000
    latency_ms: Annotated[int, Field(ge=0)] = 0
    # crm -> tenant variant (a single-currency org, an API user without rights to optional endpoints ...):
    # try the connectors against the tenants the vendors document; `oppsync sandbox variants` lists them
    variants: dict[str, str] = {}


class WritebackConfig(_Strict):
    """Where revenue to write back comes from, and which approval states are written."""

    # the input table (lib/writeback/contract.py); a user's dbt model or loader may own it
    table: str = Field("writeback.opportunity_revenue", pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
    # rows in these states are written (seed 000: on submission for approval, and "Update CRM" on approved)
    states: list[Literal["draft", "submitted", "approved", "rejected"]] = ["submitted", "approved"]
    # how often the sensor looks for rows whose approval state changed
    sensor_interval_seconds: Annotated[int, Field(ge=5)] = 30


class WebhooksConfig(_Strict):
    """The webhook receiver (`oppsync webhooks serve`) and the sensor that turns notifications into syncs."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8710
    # the URL the CRMs post to, as they see it (behind a proxy: the public one); HubSpot signs it
    public_url: str | None = None
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_000_000
    # notifications accepted per minute and source address, per connection; more get 429
    rate_limit_per_minute: Annotated[int, Field(ge=1)] = 600
    # where verified notifications wait for the sensor: default the warehouse when it is Postgres, else a SQLite
    # file beside the DuckDB warehouse (the receiver must not wait for DuckDB's single writer)
    inbox_url: str | None = None
    sensor_interval_seconds: Annotated[int, Field(ge=1)] = 5


class SlackAlerts(_Strict):
    """Slack as an alert channel: an incoming webhook (Slack's simplest integration: one URL per channel), or a
    bot token and a channel (chat.postMessage). Both are secrets, so `${ENV}` references only."""

    webhook_url: str | None = None
    token: str | None = None
    channel: str | None = None
    # Slack's Web API base URL for the token form (Enterprise Grid / a proxy, and a local receiver in tests)
    api_url: str = "https://slack.com/api/"

    @field_validator("webhook_url", "token")
    @classmethod
    def _secret(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            _env_refs_only({info.field_name: v}, "alerts.slack secret")
        return v

    @model_validator(mode="after")
    def _one_form(self) -> SlackAlerts:
        if bool(self.webhook_url) == bool(self.token):
            raise ValueError(
                "set either webhook_url: ${SLACK_WEBHOOK_URL} (an incoming webhook) or token: ${SLACK_BOT_TOKEN} "
                "with channel: '#alerts'"
            )
        if self.token and not self.channel:
            raise ValueError("token needs channel: the channel to post to, e.g. channel: '#data-alerts'")
        return self

    def secret_refs(self) -> dict[str, str]:
        return {k: v for k, v in (("webhook_url", self.webhook_url), ("token", self.token)) if v}


class EmailAlerts(_Strict):
    """E-mail as an alert channel, through an SMTP server (port 587 with STARTTLS is the usual submission port)."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: str | None = None  # a ${ENV} reference
    from_address: str = Field(alias="from")
    to: Annotated[list[str], Field(min_length=1)]
    timeout_seconds: Annotated[float, Field(gt=0)] = 10.0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is not None:
            _env_refs_only({"password": v}, "alerts.email")
        return v

    @model_validator(mode="after")
    def _login(self) -> EmailAlerts:
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together (password: ${SMTP_PASSWORD}); set both or neither")
        return self


class AlertsConfig(_Strict):
    """Alerts (README: Alerts): a connection's failed run and a connection gone stale (its freshness policy
    failing) post to Slack and/or send an e-mail. Absent, nothing is sent."""

    enabled: bool = True
    # what alerts: a connection's run failing, its reconciled opportunities passing their freshness fail window
    notify_on: Annotated[list[Literal["run_failure", "freshness"]], Field(min_length=1)] = ["run_failure", "freshness"]
    # the Dagster UI's address as users open it: alerts link to the run (or the stale asset)
    dagster_url: str | None = None
    slack: SlackAlerts | None = None
    email: EmailAlerts | None = None

    @field_validator("dagster_url")
    @classmethod
    def _ui_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"'{v}' is not an http(s) URL; write the UI's address, e.g. https://dagster.example.com")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _a_channel(self) -> AlertsConfig:
        if self.enabled and not (self.slack or self.email):
            raise ValueError("alerts are enabled but go nowhere: add slack: or email: (or remove alerts:)")
        return self


class SchedulesConfig(_Strict):
    """When the connections' schedules fire (README "Scaling out")."""

    # Each connection's hourly and nightly cron minute moves by 0..spread_minutes-1, from a hash of its name
    # (lib/scale.py): 500 connections do not start 500 runs in the same second. Unset: no spread up to
    # AUTO_SPREAD_ABOVE connections (every sync at :30, as configured), 30 minutes above. 0: never.
    spread_minutes: Annotated[int, Field(ge=0, le=60)] | None = None


AUTO_SPREAD_ABOVE = 20
AUTO_SPREAD_MINUTES = 30


class OppsyncConfig(_Strict):
    warehouse: WarehouseConfig = WarehouseConfig()
    reporting: ReportingConfig = ReportingConfig()
    mart: MartConfig = MartConfig()
    secrets_file: str | None = None
    sandbox: SandboxConfig = SandboxConfig()
    writeback: WritebackConfig = WritebackConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    alerts: AlertsConfig | None = None  # off unless configured
    schedules: SchedulesConfig = SchedulesConfig()
    connections: list[ConnectionConfig] = []
    users: list[UserConfig] = []
    # team name -> user ids (`users[].id`): the outcomes dashboard's team filter; a user may be in several teams
    teams: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _cross_checks(self) -> OppsyncConfig:
        problems: list[str] = []
        seen: dict[str, int] = {}
        for i, conn in enumerate(self.connections):
            if conn.name in seen:
                problems.append(
                    f"connections[{i}].name: '{conn.name}' is already used by connections[{seen[conn.name]}]; "
                    "connection names must be unique"
                )
            seen.setdefault(conn.name, i)
        limit = self.warehouse.duckdb.max_connections
        if self.warehouse.backend == "duckdb" and len(self.connections) > limit:
            problems.append(
                f"warehouse.url: {len(self.connections)} connections on DuckDB, which takes at most {limit} "
                f"(warehouse.duckdb.max_connections): one file with one writer cannot keep {len(self.connections)} "
                "hourly syncs fresh. Use Postgres: warehouse.url: postgresql+psycopg2://user@host:5432/database "
                "(README: Scaling out)"
            )
        # one mart column per extra field name, so one type per name across connections
        types: dict[str, tuple[str, int]] = {}
        for i, conn in enumerate(self.connections):
            for name, extra in conn.extra_fields.items():
                first = types.setdefault(name, (extra.type, i))
                if first[0] != extra.type:
                    problems.append(
                        f"connections[{i}].extra_fields.{name}.type: '{extra.type}', but connections[{first[1]}] "
                        f"types the same column '{first[0]}'; one mart column has one type: use the same type or "
                        "another name"
                    )
        for i, user in enumerate(self.users):
            for conn_name in user.crm_ids:
                if conn_name not in seen:
                    problems.append(f"users[{i}].crm_ids.{conn_name}: no connection named '{conn_name}'")
        user_ids = {u.id for u in self.users}
        for team, members in self.teams.items():
            for j, member in enumerate(members):
                if member not in user_ids:
                    problems.append(
                        f"teams.{team}[{j}]: '{member}' is not a user id; add it under users: or fix the spelling"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def spread_minutes(self) -> int:
        """The schedules' spread in effect (`schedules.spread_minutes`, or the default for this many connections)."""
        from oppsync_pipeline.lib.scale import effective_spread

        return effective_spread(
            self.schedules.spread_minutes, len(self.connections), AUTO_SPREAD_ABOVE, AUTO_SPREAD_MINUTES
        )

    def connection(self, name: str) -> ConnectionConfig:
        for conn in self.connections:
            if conn.name == name:
                return conn
        raise ConfigError([f"connections: no connection named '{name}' (have: {[c.name for c in self.connections]})"])


def _check_timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{v}' is not an IANA time zone such as 'UTC' or 'Europe/Berlin'") from None
    return v


def _option_problems(err: ValidationError, model: type[BaseModel], crm: str) -> list[str]:
    """One line per bad option, as `.options.<key>: <what is wrong>` (appended to the connection's path)."""
    known = sorted(model.model_fields)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][0]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f".options.{key}: unknown {crm} option{hint} ({crm} takes {known or 'no options'})")
        else:
            lines.append(f".options.{key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return lines


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            msg = f"{e['input']!r} is not one of {e['ctx']['expected']}"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown key {path.rsplit('.', 1)[-1]!r}; check the spelling against the README"
        elif e["type"] == "missing":
            msg = "required key is missing"
        for line in msg.split("\n"):
            if line.startswith("."):  # a key below this path (a connection's options)
                problems.append(f"{path}{line}")
                continue
            # cross-checks carry their own key paths
            problems.append(line if (not path and ":" in line) else f"{path or '<root>'}: {line}")
    return problems


def parse_config(data: Mapping[str, Any] | None, source: str = "oppsync.yaml") -> OppsyncConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"<root>: {source} must hold a mapping of keys, not {type(data).__name__}"])
    try:
        return OppsyncConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def config_path(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(explicit or environ.get("OPPSYNC_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> OppsyncConfig:
    p = config_path(path, environ)
    if not p.exists():
        raise ConfigError([f"<file>: {p} not found; create it (see README) or point OPPSYNC_CONFIG at it"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError([f"<file>: {p} is not valid YAML: {err}"]) from None
    try:
        cfg = parse_config(data, str(p))
    except ConfigError as err:
        # one pass: the schema's problems and the unset `${VAR}` references together (a second run of
        # `config check` must not be needed to learn about a missing secret)
        missing = unset_references(data, p.parent, environ)
        raise ConfigError(err.problems + [m for m in missing if m not in err.problems]) from None
    if cfg.secrets_file and not Path(cfg.secrets_file).is_absolute():
        cfg = cfg.model_copy(update={"secrets_file": str((p.parent / cfg.secrets_file).resolve())})
    return cfg


def unset_references(data: Any, base_dir: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """`${VAR}` references anywhere in a raw (possibly invalid) configuration document that neither the environment
    nor its secrets file sets, as `key.path: ...` lines; for reporting next to the schema's problems."""
    environ = os.environ if environ is None else environ
    secrets = data.get("secrets_file") if isinstance(data, Mapping) else None
    file_values = read_secrets_file(str(base_dir / secrets)) if isinstance(secrets, str) and secrets else {}
    out: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and (ref := _ENV_REF.match(node)):
            var = ref.group(1)
            if not (environ.get(var) or file_values.get(var)):
                out.append(
                    f"{where}: environment variable {var} is not set; export {var}=... or add it to the secrets file"
                )

    walk(data, "")
    return out


def read_secrets_file(path: str | None) -> dict[str, str]:
    if not path or not Path(path).exists():
        return {}
    values: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def resolve_credentials(
    cfg: OppsyncConfig, conn: ConnectionConfig, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Credential values for one connection: environment first, then the secrets file."""
    environ = os.environ if environ is None else environ
    file_values = read_secrets_file(cfg.secrets_file)
    resolved, missing = {}, []
    for key, var in conn.credential_env_vars().items():
        value = environ.get(var) or file_values.get(var)
        if not value:
            missing.append(
                f"connections.{conn.name}.credentials.{key}: environment variable {var} is not set; "
                f"export {var}=... or add it to the secrets file"
            )
        else:
            resolved[key] = value
    if missing:
        raise ConfigError(missing)
    return resolved


def resolve_refs(
    cfg: OppsyncConfig, refs: Mapping[str, str], where: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Values of `${NAME}` references (environment first, then the secrets file); `where` is the key path."""
    environ = os.environ if environ is None else environ
    file_values = read_secrets_file(cfg.secrets_file)
    resolved, missing = {}, []
    for key, ref in refs.items():
        var = _ENV_REF.match(ref).group(1)  # type: ignore[union-attr]  (validated at load)
        value = environ.get(var) or file_values.get(var)
        if value:
            resolved[key] = value
        else:
            missing.append(
                f"{where}.{key}: environment variable {var} is not set; export {var}=... or add it to the secrets file"
            )
    if missing:
        raise ConfigError(missing)
    return resolved


def check_config(cfg: OppsyncConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Problems that need more than the schema: missing credential variables, connector-specific keys."""
    problems: list[str] = []
    for i, conn in enumerate(cfg.connections):
        try:
            resolve_credentials(cfg, conn, environ)
        except ConfigError as err:
            problems += [p.replace(f"connections.{conn.name}.", f"connections[{i}].") for p in err.problems]
        cls = connector_class(conn.crm)
        problems += [f"connections[{i}].{p}" for p in cls.validate_connection(conn)]
        if conn.webhooks.enabled:
            problems += _webhook_problems(cfg, conn, environ)
    problems += _alert_problems(cfg, environ)
    return problems


def alert_secret_refs(cfg: OppsyncConfig) -> dict[str, dict[str, str]]:
    """The alerts' `${ENV}` references by key path (`alerts.slack`, `alerts.email`)."""
    a = cfg.alerts
    if a is None or not a.enabled:
        return {}
    refs = {"alerts.slack": a.slack.secret_refs() if a.slack else {}}
    refs["alerts.email"] = {"password": a.email.password} if a.email and a.email.password else {}
    return {where: r for where, r in refs.items() if r}


def _alert_problems(cfg: OppsyncConfig, environ: Mapping[str, str] | None) -> list[str]:
    problems: list[str] = []
    for where, refs in alert_secret_refs(cfg).items():
        try:
            resolve_refs(cfg, refs, where, environ)
        except ConfigError as err:
            problems += err.problems
    return problems


def _webhook_problems(cfg: OppsyncConfig, conn: ConnectionConfig, environ: Mapping[str, str] | None) -> list[str]:
    """A connection's `webhooks:`: the CRM sends opportunity notifications, its scheme's secrets are named and set."""
    from oppsync_pipeline.lib.crm.registry import spec

    s = spec(conn.crm)
    if not s.webhooks:
        return [
            f"connections.{conn.name}.webhooks.enabled: {conn.crm} sends no opportunity webhooks ({s.webhooks_note}); "
            "remove it: the hourly schedule syncs this connection"
        ]
    problems = s.webhook_receiver_class().problems(conn)
    try:
        resolve_refs(cfg, conn.webhooks.secrets, f"connections.{conn.name}.webhooks.secrets", environ)
    except ConfigError as err:
        problems += err.problems
    return problems
