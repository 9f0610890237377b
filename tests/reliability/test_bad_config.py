"""Bad configuration (issue 8): each broken oppsync.yaml gives exactly one problem line that names the key
and says how to fix it, through the library (parse_config + check_config) and through the command line
(`oppsync --config X config check` exits non-zero and prints it). A plaintext secret is refused without
being repeated back.
"""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from oppsync_pipeline.lib.config import ConfigError, check_config, parse_config

OPPSYNC = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "oppsync"
PLAINTEXT = "hunter2-plaintext-secret"


def valid() -> dict[str, Any]:
    return {
        "warehouse": {"url": "duckdb:///tmp/oppsync-bad-config.duckdb"},
        "secrets_file": "bad.secrets.env",
        "connections": [
            {
                "name": "acme-sf",
                "crm": "salesforce",
                "base_url": "https://acme.my.salesforce.com",
                "credentials": {"client_id": "${OPPSYNC_REL_SF_ID}", "client_secret": "${OPPSYNC_REL_SF_SECRET}"},
            }
        ],
    }


def conn(d: dict) -> dict:
    return d["connections"][0]


# (case, how to break a valid config, what the one problem line must contain: key path, then the fix)
CASES: list[tuple[str, Callable[[dict], None], tuple[str, ...]]] = [
    (
        "unknown_crm",
        lambda d: conn(d).update(crm="pipedrive"),
        ("connections[0].crm", "'pipedrive' is not one of", "salesforce"),
    ),
    (
        "missing_credential_variable",
        lambda d: conn(d)["credentials"].update(client_secret="${OPPSYNC_REL_UNSET}"),
        ("connections[0].credentials.client_secret", "OPPSYNC_REL_UNSET", "export OPPSYNC_REL_UNSET="),
    ),
    (
        "missing_credential_key",
        lambda d: conn(d)["credentials"].pop("client_secret"),
        ("connections[0].credentials", "missing ['client_secret']", "salesforce needs"),
    ),
    (
        "bad_url",
        lambda d: conn(d).update(base_url="acme.my.salesforce.com"),
        ("connections[0].base_url", "not an http(s) URL", "https://"),
    ),
    (
        "bad_cron",
        lambda d: conn(d).update(schedule="every hour"),
        ("connections[0].schedule", "5-field cron", "'30 * * * *'"),
    ),
    (
        "unknown_filter_field",
        lambda d: conn(d).update(filters=[{"field": "Nmae", "op": "equal", "value": "x"}]),
        ("connections[0].filters[0].field", "unknown salesforce field 'Nmae'", "known:"),
    ),
    (
        "unknown_filter_operator",
        lambda d: conn(d).update(filters=[{"field": "Name", "op": "like", "value": "x"}]),
        ("connections[0].filters[0].op", "'like' is not one of", "equal"),
    ),
    (
        "unknown_mapping_field",
        lambda d: conn(d).update(fields={"created_at": "Created_Dte"}),
        ("connections[0].fields.created_at", "unknown salesforce field 'Created_Dte'", "custom field"),
    ),
    (
        "unknown_canonical_field",
        lambda d: conn(d).update(fields={"creator": "CreatedById"}),
        ("connections[0].fields", "unknown canonical field(s) ['creator']", "overridable:"),
    ),
    (
        "duplicate_connection_names",
        lambda d: d["connections"].append(copy.deepcopy(conn(d))),
        ("connections[1].name", "'acme-sf' is already used by connections[0]", "must be unique"),
    ),
    (
        "bad_timezone",
        lambda d: conn(d).update(timezone="Mars/Olympus_Mons"),
        ("connections[0].timezone", "'Mars/Olympus_Mons'", "IANA time zone such as 'UTC'"),
    ),
    (
        "bad_reporting_timezone",
        lambda d: d.update(reporting={"timezone": "CEST+2"}),
        ("reporting.timezone", "'CEST+2'", "IANA time zone"),
    ),
    (
        "plaintext_secret",
        lambda d: conn(d)["credentials"].update(client_secret=PLAINTEXT),
        ("connections[0].credentials", "'client_secret' must reference an environment variable", "${NAME}"),
    ),
    (
        "bad_warehouse_scheme",
        lambda d: d.update(warehouse={"url": "mysql://db/oppsync"}),
        ("warehouse.url", "unsupported scheme 'mysql'", "postgresql+psycopg2://"),
    ),
    (
        "warehouse_url_without_driver",
        lambda d: d.update(warehouse={"url": "postgresql://u@h/db"}),
        ("warehouse.url", "names no driver", "postgresql+psycopg2://"),
    ),
    (
        "misspelt_top_level_key",
        lambda d: d.update(warehous=d.pop("warehouse")),
        ("warehous", "unknown key 'warehous'", "README"),
    ),
    (
        "bad_connection_name",
        lambda d: conn(d).update(name="Acme SF"),
        ("connections[0].name", "'Acme SF'", "lowercase letters"),
    ),
]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "bad.secrets.env").write_text(
        "OPPSYNC_REL_SF_ID=id-value\nOPPSYNC_REL_SF_SECRET=secret-value\n", encoding="utf-8"
    )
    return tmp_path


def library_problems(data: dict, folder: Path) -> list[str]:
    data = {**data, "secrets_file": str(folder / data["secrets_file"])} if "secrets_file" in data else data
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPPSYNC_REL_")}
    try:
        cfg = parse_config(data)
    except ConfigError as err:
        return err.problems
    return check_config(cfg, environ)


def test_the_valid_base_config_passes(config_dir: Path):
    assert library_problems(valid(), config_dir) == []


@pytest.mark.parametrize("name,breaker,expected", CASES, ids=[c[0] for c in CASES])
def test_library_reports_one_clear_problem(name: str, breaker, expected, config_dir: Path):
    data = valid()
    breaker(data)
    problems = library_problems(data, config_dir)
    assert len(problems) == 1, f"{name}: expected one problem, got {problems}"
    line = problems[0]
    assert line.startswith(expected[0]), f"{name}: the line must start with the key {expected[0]!r}: {line!r}"
    for part in expected[1:]:
        assert part in line, f"{name}: {part!r} missing from {line!r}"
    assert PLAINTEXT not in line, "a plaintext secret was repeated back"


def test_cli_config_check_prints_the_problem_and_fails(config_dir: Path):
    """Every case through the real command, started in parallel (each start costs ~1 s of imports)."""
    assert OPPSYNC.exists(), f"{OPPSYNC} is missing: run make install"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPSYNC_")}
    procs = {}
    for name, breaker, expected in CASES:
        data = valid()
        breaker(data)
        path = config_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        procs[name] = (
            expected,
            subprocess.Popen(
                [str(OPPSYNC), "--config", str(path), "config", "check"],
                cwd=config_dir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    failures = []
    for name, (expected, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        text = out + err
        if proc.returncode == 0:
            failures.append(f"{name}: exit 0")
        missing = [part for part in expected if part not in text]
        if missing:
            failures.append(f"{name}: {missing} not in output {text.strip()[:300]!r}")
        if "Traceback" in text:
            failures.append(f"{name}: a traceback instead of a message")
        if PLAINTEXT in text:
            failures.append(f"{name}: printed the plaintext secret")
    assert not failures, "\n".join(failures)
