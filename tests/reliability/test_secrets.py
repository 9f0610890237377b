"""Secrets (issues 8 and 22): credential values never reach a log, an exception message, the CLI's output, the
warehouse or Dagster's run records on disk, in successful runs and in failing ones (refused credentials,
faults, and an API that echoes the request's headers into its error body).

Each simulator is made to accept a recognisable secret (`secret(crm)`, random-looking and with characters
that URL-encoding changes) by patching the module-level credential it checks; the connection's variable
points at it through the secrets file. A refused secret (`wrong(crm)`, from the environment, which wins over
the file) must not leak either. What is searched for, in every form a secret travels in: the raw values, the
access tokens the simulators issued during the test, ConnectWise's base64 `company+public:private` pair,
URL-encoded forms, and every piece of 8 characters of each (an error text cut at a length limit).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import yaml
from sqlalchemy import text

from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.scrub import PIECE, Scrubber, redact, scrub_handlers, scrubbed_logger
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox import hubspot as hubspot_sandbox
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator, crm_module, env_var
from oppsync_pipeline.sandbox.server import FaultRule, SandboxServer, Simulator
from tests.conftest import sandbox_config, warehouse_database
from tests.reliability.harness import FULL, OPPORTUNITY_PAGES, client_sleep, connection_extra

ROOT = Path(__file__).resolve().parents[2]
# the credential each simulator is made to accept a recognisable value for: its first secret key
SECRET_KEY = {crm: s.secret_keys[0] for crm, s in REGISTRY.items()}
# The normal suite: an OAuth client-credentials CRM and the Basic-auth one; `make reliability`: all five.
SELECTED = CRMS if FULL else ("salesforce", "connectwise")
BACKENDS = ("duckdb", pytest.param("postgres", marks=pytest.mark.postgres))


def tag(crm: str) -> str:
    """Four characters that tell the CRMs' secrets apart (e.g. Sa0q): letters and a digit, as a secret has."""
    return f"{crm[:2].title()}{list(REGISTRY).index(crm) % 10}q"


def secret(crm: str) -> str:
    return f"Vq{tag(crm)}/x7K+Lm{tag(crm)}=9Zr~W"


def wrong(crm: str) -> str:
    return f"{secret(crm)}-wrOng5"


def echo(crm: str) -> FaultRule:
    """Every opportunity page answered with an error body that echoes the request's headers."""
    return FaultRule("echo_headers", count=0, path=OPPORTUNITY_PAGES[crm])


class IssuedTokens:
    """The access tokens a simulator hands out (OAuth token endpoints), as they leave it."""

    def __init__(self, sim: Simulator):
        self.values: list[str] = []
        original = sim.handle

        def handle(req):
            resp = original(req)
            if b"access_token" in resp.body:
                try:
                    token = json.loads(resp.body).get("access_token")
                except (ValueError, AttributeError):
                    token = None
                if token:
                    self.values.append(token)
            return resp

        sim.handle = handle  # type: ignore[method-assign]


def secret_values(crm: str, issued: list[str] = (), refused: bool = True) -> list[str]:
    """The secrets of `crm` as sent: the configured one (and the refused one unless told not to), the tokens
    issued, ConnectWise's base64 pair."""
    raw = [secret(crm), wrong(crm)] if refused else [secret(crm)]
    values = [*raw, *issued]
    if crm == "connectwise":
        creds = crm_module(crm).SANDBOX_CREDENTIALS
        values += [base64.b64encode(f"{creds['company_id']}+{creds['public_key']}:{v}".encode()).decode() for v in raw]
    return values


def forms(value: str) -> set[str]:
    return {value, quote(value, safe=""), quote_plus(value)}


def needles(crm: str, issued: list[str] = (), refused: bool = True) -> list[str]:
    return sorted({f for v in secret_values(crm, issued, refused) for f in forms(v)})


def leaks(blob: str, crm: str, issued: list[str] = ()) -> list[str]:
    """Each needle found in `blob`, and each piece of PIECE characters of one. A Salesforce token is
    `<org id>!<session>`: the org id is public and shares its pieces with the org's record ids, so only the
    session's pieces are searched for."""
    sessions = [v.partition("!")[2] or v for v in secret_values(crm, issued)]
    pieces = {f[i : i + PIECE] for v in sessions for f in forms(v) for i in range(len(f) - PIECE + 1)}
    return sorted({n for n in needles(crm, issued) if n in blob} | {p for p in pieces if p in blob})


@pytest.fixture
def recognisable_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for crm, key in SECRET_KEY.items():
        monkeypatch.setitem(crm_module(crm).SANDBOX_CREDENTIALS, key, secret(crm))
    monkeypatch.setattr(hubspot_sandbox, "PRIVATE_APP_TOKEN", secret("hubspot"))


def warehouse_text(engine) -> str:
    """Every text value of every oppsync table, one blob to search."""
    chunks = []
    with engine.connect() as c:
        columns = c.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'oppsync' "
                "AND (data_type ILIKE '%char%' OR data_type ILIKE '%text%' OR data_type ILIKE 'string')"
            )
        ).fetchall()
        assert len(columns) > 40, f"too few text columns found: {len(columns)}"
        for table, column in columns:
            # identifiers from information_schema, not from input
            for (value,) in c.execute(text(f'SELECT "{column}" FROM oppsync."{table}"')):
                if value is not None:
                    chunks.append(str(value))
    return "\n".join(chunks)


def files_text(folder: Path) -> str:
    """Every file under `folder` (SQLite databases, their journals, captured compute logs) as text."""
    return "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in sorted(folder.rglob("*")) if p.is_file())


# -- the scrubber on its own ----------------------------------------------------------------------------------------

SAMPLE = "Kp7/vQ+x=Zr9wLm2~Tq"


@pytest.mark.parametrize(
    "form",
    [
        SAMPLE,
        quote(SAMPLE, safe=""),
        quote(SAMPLE),
        quote_plus(SAMPLE),
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(SAMPLE, safe="")),
        SAMPLE[:9],
        SAMPLE[-8:],  # cut at a length limit
        *(base64.b64encode(f"{user}:{SAMPLE}".encode()).decode() for user in ("a", "ab", "abc")),  # 3 alignments
        base64.urlsafe_b64encode(f"ab:{SAMPLE}".encode()).decode(),
    ],
    ids=[
        "raw",
        "quote",
        "quote-slash",
        "quote_plus",
        "lower-hex",
        "prefix",
        "suffix",
        "b64-0",
        "b64-1",
        "b64-2",
        "b64-urlsafe",
    ],
)
def test_every_form_of_a_secret_is_masked(form: str):
    scrubbed = Scrubber({"client_secret": SAMPLE})(f"error: got {form} in the request")
    assert "***" in scrubbed
    rest = scrubbed.replace("error: got", "").replace("in the request", "")
    pieces = {form[i : i + PIECE] for i in range(len(form) - PIECE + 1)}
    assert not [p for p in pieces if p in rest], scrubbed


def test_short_values_identifiers_and_overlaps():
    s = Scrubber(
        {
            "secret": "x9Q",
            "code": "k2Zp",
            "key": "Ab3$xYz",
            "username": "api@sandbox.example.com",
            "private_key": "Zr9wLm2~TqKp7",
        }
    )
    assert s("x9Q k2Zp Ab3$xYz") == "x9Q *** ***"  # < 4 chars: never; 4-7: whole only
    assert s("k2Z Ab3$xY") == "k2Z Ab3$xY"
    # an identifier is masked whole, its pieces are ordinary text
    assert s("user api@sandbox.example.com at sandbox.example.com") == "user *** at sandbox.example.com"
    # overlapping and touching pieces of secrets: one mask per run
    assert s("a Zr9wLm2~TqKp7Zr9wLm2~Tq b") == "a *** b"
    assert s("[wLm2~TqK]") == "[***]"


def test_tokens_the_auth_sends_are_learned(recognisable_secrets, tmp_path: Path):
    """Salesforce's access token and ConnectWise's Basic pair are known as soon as a request carries them."""
    for crm in ("salesforce", "connectwise"):
        sim = build_simulator(crm, seed=3, opportunities=5)
        issued = IssuedTokens(sim)
        with SandboxServer(sim) as server:
            cfg = sandbox_config(
                {crm: server},
                f"duckdb:///{tmp_path / 'w.duckdb'}",
                tmp_path,
                extra={crm: connection_extra(crm, lean=True)},
            )
            connector = build_connector(cfg, cfg.connections[0])
            connector.prepare()
        assert issued.values or crm == "connectwise", "no token was issued"
        for value in secret_values(crm, issued.values, refused=False):
            for form in forms(value):
                assert connector.scrubber(f"<{form}>") == "<***>", form
            for form in forms(value.partition("!")[2] or value):  # a Salesforce token's session
                assert connector.scrubber(f"<{form[3:12]}>") == "<***>", form


def test_log_records_are_scrubbed_at_the_source_and_by_the_cli_handler(caplog: pytest.LogCaptureFixture):
    scrubber = Scrubber({"client_secret": SAMPLE})
    caplog.set_level(logging.DEBUG)
    ours = scrubbed_logger("oppsync_pipeline.test_secrets")
    try:
        raise ValueError(f"answer echoed {quote_plus(SAMPLE)}")
    except ValueError:
        ours.exception("refused: %s", SAMPLE[2:14])
    assert "***" in caplog.text and not [p for p in (SAMPLE[2:10], quote_plus(SAMPLE)[:9]) if p in caplog.text]

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    scrub_handlers([handler])  # what `oppsync` does to the handler it installs
    theirs = logging.getLogger("some.library")
    theirs.addHandler(handler)
    basic = base64.b64encode(f"user:{SAMPLE}".encode()).decode()
    try:
        theirs.warning("sent Authorization: Basic %s", basic)
    finally:
        theirs.removeHandler(handler)
    written = stream.getvalue()
    assert "***" in written and basic[8:16] not in written and basic[-12:-4] not in written, written
    assert redact(SAMPLE) == "***"
    del scrubber
    assert redact(SAMPLE) == SAMPLE, "a scrubber no longer alive still masks"


# -- runs through the library ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crm", SELECTED)
def test_no_secret_in_logs_errors_or_warehouse(
    crm: str,
    backend: str,
    recognisable_secrets,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    caplog.set_level(logging.DEBUG)
    sim = build_simulator(crm, seed=9, opportunities=60)
    issued = IssuedTokens(sim)
    messages = []
    with SandboxServer(sim) as server, warehouse_database(backend, tmp_path) as url:
        cfg = sandbox_config({crm: server}, url, tmp_path, extra={crm: connection_extra(crm, lean=True, page_size=20)})
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)

        ok = sync_connection(cfg, conn, engine, run_id="good", mode="full")
        assert ok.extract.status == "complete"

        faults = (
            ("5xx-until-giving-up", [FaultRule("server_error", count=0, path=OPPORTUNITY_PAGES[crm])]),
            ("malformed", [FaultRule("malformed", path=OPPORTUNITY_PAGES[crm])]),
            ("token-expiry", [FaultRule("token_expiry", path=OPPORTUNITY_PAGES[crm])]),
            ("echoed-headers", [echo(crm)]),
        )
        # what differs on Postgres is where the texts are stored: the echo is enough there, except in full mode
        for name, rules in faults if backend == "duckdb" or FULL else faults[-1:]:
            sim.faults.rules = rules
            connector = build_connector(cfg, conn, sleep=client_sleep(crm))
            try:
                summary = sync_connection(cfg, conn, engine, run_id=name, mode="full", connector=connector)
                messages.append(repr(summary))
            except ExtractFailed as err:
                messages.append(f"{err!r} {err.__cause__!r} {err.__context__!r}")
            sim.faults.rules = []

        # refused credentials: the environment wins over the secrets file
        monkeypatch.setenv(env_var(conn.name, SECRET_KEY[crm]), wrong(crm))
        with pytest.raises(ExtractFailed) as refused:
            sync_connection(
                cfg,
                conn,
                engine,
                run_id="refused",
                mode="full",
                connector=build_connector(cfg, conn, sleep=client_sleep(crm)),
            )
        messages.append(f"{refused.value!r} {refused.value.__cause__!r} {refused.value.__context__!r}")
        assert (
            "401" in str(refused.value)
            or "refused" in str(refused.value).lower()
            or "invalid" in str(refused.value).lower()
        ), str(refused.value)
        stored = warehouse_text(engine)
        engine.dispose()

    assert any(r.levelno == logging.DEBUG for r in caplog.records), "DEBUG logging was not captured"
    assert "Request header field is invalid" in stored, "the echoed error was not stored (nothing was searched)"
    assert not leaks(caplog.text, crm, issued.values), f"secret in logs: {leaks(caplog.text, crm, issued.values)}"
    assert not leaks("\n".join(messages), crm, issued.values), f"secret in an exception or summary: {messages}"
    assert not leaks(stored, crm, issued.values), f"secret stored in the warehouse: {leaks(stored, crm, issued.values)}"
    assert "refused" in stored and "good" in stored, "the runs were not recorded (nothing was searched)"


def test_no_secret_in_config_check_output(recognisable_secrets, tmp_path: Path, capsys: pytest.CaptureFixture):
    """`oppsync config check --online` prints what each required read answered: here, the echoed request."""
    from oppsync_pipeline.cli import check_online

    for crm in SELECTED:
        sim = build_simulator(crm, seed=4, opportunities=10)
        issued = IssuedTokens(sim)
        sim.faults.rules = [echo(crm)]
        with SandboxServer(sim) as server:
            cfg = sandbox_config(
                {crm: server},
                f"duckdb:///{tmp_path / 'w.duckdb'}",
                tmp_path,
                extra={crm: connection_extra(crm, lean=True)},
            )
            assert not check_online(cfg, cfg.connections[0])
        out = capsys.readouterr()
        printed = out.out + out.err
        assert "Request header field is invalid" in printed, printed
        assert not leaks(printed, crm, issued.values), f"{crm}: {leaks(printed, crm, issued.values)}\n{printed}"


# -- runs through the CLI and Dagster -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS if FULL else ("duckdb",))
def test_no_secret_in_cli_output_warehouse_or_dagster_storage(backend: str, recognisable_secrets, tmp_path: Path):
    """`oppsync sync --full` in its own process, through Dagster with its instance in a fresh DAGSTER_HOME
    (SQLite run and event storage, captured compute logs), against a CRM that echoes the request's headers
    into its error body: its stdout and stderr, every warehouse table and every file Dagster wrote.
    One process per CRM, run side by side (each starts Python, Dagster and the definitions: seconds)."""
    sims = {crm: build_simulator(crm, seed=5, opportunities=30) for crm in SELECTED}
    issued = {crm: IssuedTokens(sim) for crm, sim in sims.items()}
    with ExitStack() as stack:
        runs = {}
        for crm, sim in sims.items():
            sim.faults.rules = [echo(crm)]
            folder = tmp_path / crm
            (folder / "dagster").mkdir(parents=True)
            server = stack.enter_context(SandboxServer(sim))
            url = stack.enter_context(warehouse_database(backend, folder))
            cfg = sandbox_config({crm: server}, url, folder, extra={crm: connection_extra(crm, lean=True)})
            config_file = folder / "oppsync.yaml"
            config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
            env = {
                **os.environ,
                "DAGSTER_HOME": str(folder / "dagster"),
                "PYTHONPATH": str(ROOT),
                "GX_ANALYTICS_ENABLED": "false",
            }
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "oppsync_pipeline.cli",
                    "--config",
                    str(config_file),
                    "-v",
                    "sync",
                    "--connection",
                    cfg.connections[0].name,
                    "--full",
                ],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            runs[crm] = (process, url, folder / "dagster")
        found = {}
        for crm, (process, url, home) in runs.items():
            stdout, stderr = process.communicate(timeout=300)
            printed, on_disk = stdout + stderr, files_text(home)
            engine = make_engine(url)
            stored = warehouse_text(engine)
            engine.dispose()
            assert process.returncode == 1, printed
            assert "Request header field is invalid" in stderr, printed  # the run's error, as the CLI reports it
            assert "Request header field is invalid" in stored
            assert "Request header field is invalid" in on_disk, "the failure was not in Dagster's storage"
            assert list(home.rglob("*.err")), "no captured compute log found"
            found[crm] = {
                "output": leaks(printed, crm, issued[crm].values),
                "warehouse": leaks(stored, crm, issued[crm].values),
                "dagster": leaks(on_disk, crm, issued[crm].values),
            }
    assert not any(v for where in found.values() for v in where.values()), f"secrets leaked: {found}"


def test_no_secret_in_dagster_runs(
    recognisable_secrets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Materialize every connection's assets through Dagster (as `oppsync sync` does), one run failing on
    refused credentials and one on echoed headers, then search the runs' event logs, run records, the captured
    logs and every file of the instance's storage on disk.
    Full mode only: Dagster runs with their quality checks cost over a minute here."""
    if not FULL:
        pytest.skip("Dagster runs take > 60 s: run with OPPSYNC_RELIABILITY=full (make reliability)")
    import dagster as dg
    from dagster._serdes import serialize_value  # noqa: PLC2701 - the complete stored form of a record

    from oppsync_pipeline.cli import _load_defs, run_connection

    caplog.set_level(logging.DEBUG)
    sims = {crm: build_simulator(crm, seed=9, opportunities=40) for crm in SELECTED}
    issued = {crm: IssuedTokens(sim) for crm, sim in sims.items()}
    servers = {crm: SandboxServer(sim).start() for crm, sim in sims.items()}
    home = tmp_path / "dagster"
    try:
        cfg = sandbox_config(
            servers,
            f"duckdb:///{tmp_path / 'dagster.duckdb'}",
            tmp_path,
            extra={crm: connection_extra(crm, lean=True) for crm in SELECTED},
        )
        config_file = tmp_path / "oppsync.yaml"
        config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        monkeypatch.setenv("OPPSYNC_CONFIG", str(config_file))
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        home.mkdir()
        defs = _load_defs()
        blobs, statuses = [], {}
        with dg.DagsterInstance.get() as instance:
            runs = []
            for conn in cfg.connections:
                result = run_connection(defs, instance, conn, "full")
                statuses[conn.name] = result.success
                runs.append(result.run_id)
            for crm, sim in sims.items():
                sim.faults.rules = [echo(crm)]
                echoed = run_connection(defs, instance, cfg.connection(f"sandbox-{crm}"), "full")
                assert not echoed.success, f"{crm}: the run answered with echoed headers should fail"
                runs.append(echoed.run_id)
                sim.faults.rules = []
            monkeypatch.setenv(env_var("sandbox-salesforce", "client_secret"), wrong("salesforce"))
            failed = run_connection(defs, instance, cfg.connection("sandbox-salesforce"), "full")
            runs.append(failed.run_id)
            for run_id in runs:
                blobs.append(serialize_value(instance.get_run_by_id(run_id)))
                for entry in instance.all_logs(run_id):
                    blobs.append(serialize_value(entry))
        stored = warehouse_text(make_engine(cfg.warehouse.url))
    finally:
        for s in servers.values():
            s.stop()
    assert all(statuses.values()), f"Dagster runs failed: {statuses}"
    assert not failed.success, "the run with refused credentials should fail"
    blob = "\n".join(blobs)
    on_disk = files_text(home)
    assert "STEP_FAILURE" in blob or "step_failure" in blob.lower(), "the failing run's events were not searched"
    assert "Request header field is invalid" in on_disk, "the echoed error was not in Dagster's storage"
    found = {
        crm: leaks(blob, crm, issued[crm].values)
        + leaks(caplog.text, crm, issued[crm].values)
        + leaks(stored, crm, issued[crm].values)
        + leaks(on_disk, crm, issued[crm].values)
        for crm in SELECTED
    }
    assert not any(found.values()), f"secrets in Dagster records, logs or warehouse: {found}"
