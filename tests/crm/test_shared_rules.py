"""The rules every connector shares: one address form, one stage/status rule, one error classification,
optional reads that warn instead of failing, token requests counted. Pure functions and a real HTTP client
against a tiny local server (no mocks)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.base import CrmConnector
from oppsync_pipeline.lib.crm.http import Auth, AuthError, CrmError, QuotaBudget
from oppsync_pipeline.lib.record import format_address


@pytest.mark.parametrize(
    "parts,expected",
    [
        (("1 Main St", None, "Austin", "TX", "78701", "USA"), "1 Main St, Austin, TX, 78701, USA"),
        (
            ("1 Main St\nSuite 200", "Floor 3", "Austin", "TX", "78701", "USA"),
            "1 Main St, Suite 200, Floor 3, Austin, TX, 78701, USA",
        ),
        (("  Hauptstraße 5 \r\n", "", "München", None, "80331", "Germany"), "Hauptstraße 5, München, 80331, Germany"),
        ((None, None, None, None, None, None), None),
        (("", "  ", "\n"), None),
    ],
)
def test_one_address_form_for_all_five_crms(parts, expected):
    assert format_address(*parts) == expected


class _Conn(CrmConnector):
    crm = "salesforce"
    max_page_size = 100

    def make_auth(self) -> Auth:
        return _CountingTokenAuth(self.conn.base_url)

    def fetch_stages(self):
        return []

    def users(self):
        return []

    def opportunities(self, open_set, since):
        return iter(())


def connector(**conn: object) -> _Conn:
    return _Conn(
        ConnectionConfig(name="c", crm="salesforce", base_url=conn.pop("base_url", "http://127.0.0.1:9"), **conn), {}
    )


@pytest.mark.parametrize(
    "stage,crm_status,flags,config,expected",
    [
        ("Proposal", "Active", "open", {}, "open"),  # the CRM's flags
        ("Closed Won", "Active", "open", {"stage_categories": {"Closed Won": "won"}}, "won"),  # seed 003
        ("On Hold", "Inactive", "lost", {"stage_categories": {"On Hold": "open"}}, "open"),
        ("Proposal", "Pending", "open", {"open_statuses": ["Active"]}, "lost"),  # seed 000
        ("Proposal", "Pending", "won", {"open_statuses": ["Active"]}, "won"),
        ("Proposal", "Active", "lost", {"open_statuses": ["Active"]}, "open"),
        ("Won Stage", "Active", "open", {"open_statuses": ["Active"], "stage_categories": {"Won Stage": "won"}}, "won"),
    ],
)
def test_one_status_rule_stage_categories_then_open_statuses_then_the_crm_flags(
    stage, crm_status, flags, config, expected
):
    assert connector(**config).resolve_status(stage, crm_status, flags) == expected


@pytest.mark.parametrize(
    "status,permanent",
    [
        (400, True),
        (401, True),
        (403, True),
        (404, True),
        (422, True),
        (429, False),
        (500, False),
        (503, False),
        (200, False),
    ],
)
def test_http_4xx_errors_are_permanent_the_rest_are_not(status, permanent):
    assert CrmError("x", status=status).permanent is permanent
    assert AuthError("x", status=status).permanent is True


# -- a real client against a tiny server ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    answers: dict[str, int] = {}
    hits: list[str] = []

    def _answer(self) -> None:
        self.hits.append(self.path)
        status = self.answers.get(self.path.split("?")[0], 200)
        body = b'{"ok": true, "access_token": "t"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class _CountingTokenAuth(Auth):
    refreshable = True

    def __init__(self, base_url: str):
        self.base_url, self.token = base_url, None

    def apply(self, session, headers):
        if self.token is None:
            self.refresh(session)
        headers["Authorization"] = f"Bearer {self.token}"

    def refresh(self, session):
        self.token = self.token_request(session, "POST", self.base_url + "/token", timeout=5).json()["access_token"]


@pytest.fixture
def server():
    _Handler.answers, _Handler.hits = {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_token_requests_are_counted_with_the_runs_requests_and_apart(server):
    c = connector(base_url=server)
    c.client.get_json("/data")
    c.client.get_json("/data")
    assert (c.stats.requests, c.stats.token_requests) == (3, 1)
    assert c.stats.as_metadata()["token_requests"] == 1


def test_a_permanent_error_is_not_retried_and_names_what_to_check(server):
    _Handler.answers = {"/secret": 403}
    c = connector(base_url=server)
    with pytest.raises(CrmError) as err:
        c.client.get_json("/secret")
    assert err.value.permanent and err.value.status == 403
    assert "permission" in str(err.value) and "config check --online" in str(err.value)
    assert _Handler.hits.count("/secret") == 1  # no retry


def test_a_transient_error_is_retried_in_the_client_and_stays_transient_when_it_persists(server):
    _Handler.answers = {"/flaky": 503}
    c = connector(base_url=server)
    c.client.max_attempts = 3
    c.client.sleep = lambda s: None
    with pytest.raises(CrmError) as err:
        c.client.get_json("/flaky")
    assert err.value.permanent is False
    assert _Handler.hits.count("/flaky") == 3


def test_an_optional_read_refused_is_a_warning_and_a_fallback_a_required_one_fails(server):
    _Handler.answers = {"/limits": 403, "/meta": 404, "/broken": 400}
    c = connector(base_url=server)
    assert (
        c.optional("limits", lambda: c.client.get_json("/limits"), None, fallback_text="quota from response headers")
        is None
    )
    assert c.optional("metadata", lambda: c.client.get_json("/meta"), {}, fallback_text="labels = values") == {}
    assert c.optional("ok", lambda: c.client.get_json("/fine"), None, fallback_text="-") == {
        "ok": True,
        "access_token": "t",
    }
    assert c.stats.warnings == [
        "limits: HTTP 403, not readable by this API user; quota from response headers",
        "metadata: HTTP 404, not readable by this API user; labels = values",
    ]
    assert [(k, v.available) for k, v in c.capabilities.items()] == [
        ("limits", False),
        ("metadata", False),
        ("ok", True),
    ]
    with pytest.raises(CrmError):  # a 400 is a query problem, not a missing right: never silently skipped
        c.optional("broken", lambda: c.client.get_json("/broken"), None, fallback_text="-")


def test_quota_budget_still_counts_token_requests(server):
    c = connector(base_url=server)
    c.client.budget = QuotaBudget(max_requests=2)
    c.client.get_json("/data")  # token + request = 2
    with pytest.raises(CrmError):
        c.client.get_json("/data")


def test_shared_filter_matching_reads_yaml_dates_and_folds_case_only_when_asked():
    from datetime import date

    from oppsync_pipeline.lib.config import RecordFilter
    from oppsync_pipeline.lib.crm.base import matches

    since = RecordFilter(field="closedDate", op="at_least", value=date(2026, 1, 31))  # YAML's 2026-01-31
    assert matches(since, "2026-02-01T08:00:00Z") and not matches(since, "2026-01-30T23:59:59Z")
    name = RecordFilter(field="name", op="equal", value="acme")
    assert not matches(name, "ACME") and matches(name, "ACME", ignore_case=True)
    assert matches(RecordFilter(field="amount", op="more_than", value="5"), 12.5, ignore_case=True)
