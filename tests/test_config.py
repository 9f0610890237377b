"""oppsync.yaml validation: every problem named by its key path, credentials only by reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from oppsync_pipeline.lib.config import ConfigError, check_config, load_config, parse_config, resolve_credentials

SF = {
    "name": "sf",
    "crm": "salesforce",
    "base_url": "https://acme.my.salesforce.com",
    "credentials": {"client_id": "${SF_ID}", "client_secret": "${SF_SECRET}"},
}


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_defaults_are_the_embedded_warehouse_and_half_past_schedule():
    cfg = parse_config({"connections": [SF]})
    assert cfg.warehouse.url.startswith("duckdb:///") and cfg.warehouse.backend == "duckdb"
    conn = cfg.connections[0]
    assert conn.schedule == "30 * * * *" and conn.timezone == "UTC" and conn.max_delete_share == 0.5
    assert cfg.reporting.timezone == "UTC"


def test_every_problem_is_reported_with_its_key_path():
    found = problems(
        {"connections": [SF, SF, {"name": "x", "crm": "salesfroce", "base_url": "ftp://x", "schedule": "every hour"}]}
    )
    assert (
        "connections[2].crm: 'salesfroce' is not one of 'salesforce', 'hubspot', 'dynamics', 'connectwise' "
        "or 'autotask'" in found
    )
    assert any(p.startswith("connections[2].base_url:") for p in found)
    assert any(p.startswith("connections[2].schedule:") and "30 * * * *" in p for p in found)


def test_duplicate_names_and_unknown_user_links():
    found = problems({"connections": [SF, SF], "users": [{"id": "a", "name": "A", "crm_ids": {"nope": ["1"]}}]})
    assert any(p.startswith("connections[1].name:") and "already used" in p for p in found)
    assert any(p.startswith("users[0].crm_ids.nope:") for p in found)


def test_secrets_must_be_references_and_resolve_from_env_then_file(tmp_path: Path):
    found = problems({"connections": [{**SF, "credentials": {"client_secret": "hunter2"}}]})
    assert any("must reference an environment variable" in p for p in found)
    assert not any("hunter2" in p for p in found)

    secrets = tmp_path / "s.env"
    secrets.write_text("SF_ID=from-file\nSF_SECRET=file-secret\n")
    cfg = parse_config({"secrets_file": str(secrets), "connections": [SF]})
    assert resolve_credentials(cfg, cfg.connections[0], environ={"SF_ID": "from-env"}) == {
        "client_id": "from-env",
        "client_secret": "file-secret",
    }
    with pytest.raises(ConfigError) as err:
        resolve_credentials(
            parse_config({"connections": [SF]}), parse_config({"connections": [SF]}).connections[0], environ={}
        )
    assert "SF_ID is not set" in err.value.problems[0]


def test_postgres_url_must_name_its_driver():
    found = problems({"warehouse": {"url": "postgresql://u@h/db"}})
    assert found == ["warehouse.url: 'postgresql://' names no driver; write postgresql+psycopg2://user@host:5432/db"]


def test_check_config_names_unknown_filter_fields_and_missing_credentials():
    cfg = parse_config(
        {
            "connections": [
                {
                    **SF,
                    "filters": [{"field": "Amountt", "op": "more_than", "value": 5}],
                    "fields": {"created_at": "Original_Created_Date__c"},
                }
            ]
        }
    )
    found = check_config(cfg, environ={"SF_ID": "x", "SF_SECRET": "y"})
    assert len(found) == 1 and found[0].startswith("connections[0].filters[0].field: unknown salesforce field")


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("connections: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_the_shipped_embedded_default_is_valid():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "oppsync.yaml")
    assert cfg.sandbox.enabled and len(cfg.connections) == 5
    assert check_config(cfg, environ={}) == []


@pytest.mark.parametrize(
    "crm,options,problem",
    [
        (
            "connectwise",
            {"forcast": False},
            "connections[0].options.forcast: unknown connectwise option; did you mean 'forecast'?",
        ),
        (
            "connectwise",
            {"forecast": "false"},
            "connections[0].options.forecast: Input should be a valid boolean (got 'false')",
        ),
        ("connectwise", {"paging": "offset"}, "connections[0].options.paging: Input should be 'navigable' or 'keyset'"),
        (
            "hubspot",
            {"search_requests_per_second": -1},
            "connections[0].options.search_requests_per_second: Input should be greater than or equal to 0",
        ),
        (
            "hubspot",
            {"requests_per_10_seconds": 95.5},
            "connections[0].options.requests_per_10_seconds: Input should be a valid integer",
        ),
        (
            "dynamics",
            {"change_tracking": "yes"},
            "connections[0].options.change_tracking: Input should be a valid boolean",
        ),
        ("salesforce", {"multi_currency": 1}, "connections[0].options.multi_currency: Input should be a valid boolean"),
        (
            "autotask",
            {"curency": "EUR"},
            "connections[0].options.curency: unknown autotask option; did you mean 'currency'?",
        ),
    ],
)
def test_options_are_typed_per_crm(crm, options, problem):
    """`options` used to be an untyped dict: typos were ignored and the string "false" was true."""
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"connections": [{"name": "c", "crm": crm, "base_url": "https://x.example.com", "options": options}]}
        )
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_valid_options_pass_with_their_types():
    cfg = parse_config(
        {
            "connections": [
                {
                    "name": "cw",
                    "crm": "connectwise",
                    "base_url": "https://x.example.com",
                    "options": {"forecast": False, "paging": "keyset", "max_retry_after": 60},
                },
                {
                    "name": "sf",
                    "crm": "salesforce",
                    "base_url": "https://x.example.com",
                    "options": {"api_version": 61.0},
                },
            ]
        }
    )
    assert cfg.connections[0].options["forecast"] is False


@pytest.mark.parametrize(
    "url,problem",
    [
        ("", "is empty"),
        ("duckdb:///", "names no database file"),
        ("duckdb://", "names no database file"),
        ("postgresql+psycopg2://", "needs a host and a database name"),
        ("postgresql+psycopg2://postgres@127.0.0.1:5432", "needs a host and a database name"),
    ],
)
def test_an_empty_or_scheme_only_warehouse_url_is_refused(url, problem):
    with pytest.raises(ConfigError) as err:
        parse_config({"warehouse": {"url": url}})
    assert err.value.problems[0].startswith("warehouse.url: ") and problem in err.value.problems[0], err.value.problems


def test_warehouse_urls_that_name_a_database_pass():
    for url in (
        "duckdb:///.oppsync/w.duckdb",
        "duckdb:////tmp/w.duckdb",
        "postgresql+psycopg2://postgres@127.0.0.1:5432/warehouse",
        "postgresql+psycopg2:///warehouse?host=/var/run/postgresql",
    ):
        assert parse_config({"warehouse": {"url": url}}).warehouse.url == url


def test_an_invalid_file_also_names_its_unset_secrets_in_the_same_pass(tmp_path: Path, monkeypatch):
    """`config check` reports every problem at once: a schema error does not hide a missing secret until the
    next run (issue 20). A reference the secrets file sets is not a problem."""
    monkeypatch.delenv("OPPSYNC_T_MISSING", raising=False)
    (tmp_path / "secrets.env").write_text("OPPSYNC_T_IN_FILE=x\n")
    (tmp_path / "oppsync.yaml").write_text(
        "secrets_file: secrets.env\n"
        "connections:\n"
        "  - name: a\n    crm: salesforce\n    base_url: http://127.0.0.1:1\n    colour: red\n"
        "    credentials: {client_id: '${OPPSYNC_T_IN_FILE}', client_secret: '${OPPSYNC_T_MISSING}'}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "oppsync.yaml")
    problems = err.value.problems
    assert any("colour" in p for p in problems)
    assert [p for p in problems if "OPPSYNC_T_" in p] == [
        "connections[0].credentials.client_secret: environment variable OPPSYNC_T_MISSING is not set; "
        "export OPPSYNC_T_MISSING=... or add it to the secrets file"
    ]
