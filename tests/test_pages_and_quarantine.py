"""Pure pieces of issue 22: page validation and bounded paging (pages.py), quarantine rules (quarantine.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import StrictBool, StrictStr
from typing_extensions import TypedDict

from oppsync_pipeline.lib.crm.pages import PageError, PageModel, PageTrail, check_page
from oppsync_pipeline.lib.quarantine import locate, mapping_failure, record_problems
from oppsync_pipeline.lib.record import BadValue, Opportunity, parse_date, parse_datetime, raw_json


class Rec(TypedDict):
    Id: StrictStr


class QueryPage(PageModel):
    records: list[Rec]
    done: StrictBool
    nextRecordsUrl: str | None = None


def test_a_page_of_the_documented_shape_passes_and_keeps_its_records():
    body = {"records": [{"Id": "006A", "Name": "x"}], "done": True, "totalSize": 1}
    page = check_page(QueryPage, body, crm="salesforce", url="/services/data/v62.0/query?q=SELECT", page=1)
    assert page.records[0]["Id"] == "006A" and body["records"][0]["Name"] == "x"


@pytest.mark.parametrize(
    "body,problem",
    [
        ({"status": "COMPLETE"}, "records is missing"),
        ({"records": [{"Id": None}], "done": True}, "records[0].Id: input should be a valid string (got None)"),
        ({"records": [{"Id": 6}], "done": True}, "records[0].Id: input should be a valid string (got 6)"),
        ({"records": [], "done": "yes"}, "done: input should be a valid boolean (got 'yes')"),
        ("<html>busy</html>", "expected a JSON object or list"),
    ],
)
def test_a_page_of_the_wrong_shape_names_the_crm_url_page_and_problem(body, problem):
    with pytest.raises(PageError) as err:
        check_page(QueryPage, body, crm="salesforce", url="/services/data/v62.0/query?q=SECRET", page=3)
    text = str(err.value)
    assert text.startswith(
        "salesforce: page 3 of /services/data/v62.0/query: unexpected page shape"
        if isinstance(body, dict)
        else "salesforce: page 3 of /services/data/v62.0/query: "
    )
    assert problem in text and "SECRET" not in text and not err.value.permanent


def test_paging_that_points_back_fails_at_the_repeat():
    trail = PageTrail("autotask", "/V1.0/Opportunities/query")
    trail.page(500)
    trail.follow("/next?page=2")
    trail.page(500)
    with pytest.raises(PageError, match="already followed: paging loops"):
        trail.follow("/next?page=2")


def test_paging_beyond_the_crms_count_fails():
    trail = PageTrail("hubspot", "/crm/v3/objects/deals/search")
    trail.expect(total=250, page_size=100)  # 3 pages, plus slack for records created while paging
    for i in range(6):
        trail.follow(f"after={i}")
        trail.page(100 if i < 2 else 0)
    with pytest.raises(PageError, match="more pages"):
        trail.page(0)


def test_records_beyond_the_crms_count_fail_even_with_fresh_cursors():
    trail = PageTrail("connectwise", "/sales/opportunities")
    trail.expect(total=10, page_size=1000)
    with pytest.raises(PageError, match="the pages repeat"):
        for i in range(4):
            trail.follow(i)
            trail.page(1000)


def opp(**values) -> Opportunity:
    base = dict(
        connection="c",
        crm="salesforce",
        source_id="006A",
        project_name="p",
        client_name=None,
        service_location=None,
        sales_executive=None,
        owner_crm_id=None,
        stage="s",
        status="open",
        amount=10.0,
        currency=None,
        close_date=None,
        probability=None,
        created_at=datetime(2026, 1, 1),
        created_by_crm_id=None,
        modified_at=None,
    )
    return Opportunity(**{**base, **values})


def test_record_rules_name_the_id_and_field():
    clock = datetime(2026, 6, 1, 12)
    assert record_problems(opp(), clock) == []
    bad = record_problems(opp(amount=-5.0, created_at=datetime(2026, 6, 1, 14), project_name="a\ud800b"), clock)
    assert [(q.source_id, q.field) for q in bad] == [
        ("006A", "amount"),
        ("006A", "created_at"),
        ("006A", "project_name"),
    ]
    assert "after the CRM's own clock (2026-06-01 12:00:00 UTC)" in bad[1].reason
    assert bad[2].value == "a\\ud800b"  # storable
    # within the tolerance of the CRM's clock: not the future
    assert record_problems(opp(created_at=datetime(2026, 6, 1, 12, 30)), clock) == []


def test_unreadable_values_are_located_in_the_raw_record():
    raw = {"Id": "006A", "Account": {"Name": "x"}, "CreatedDate": "31/12/2025 10:00"}
    with pytest.raises(BadValue) as err:
        parse_datetime(raw["CreatedDate"])
    q = mapping_failure("salesforce", "006A", raw, err.value)
    assert (q.field, q.value) == ("CreatedDate", "31/12/2025 10:00") and "ISO 8601" in q.reason
    assert mapping_failure("salesforce", None, raw, KeyError("Id")).field == "Id"
    assert locate({"properties": {"closedate": "2026-13-45"}}, "2026-13-45") == "properties.closedate"
    with pytest.raises(BadValue):
        parse_date("2026-13-45")
    assert isinstance(BadValue("x", "a date"), ValueError)  # callers catching ValueError keep working


def test_raw_json_keeps_a_lone_surrogate_as_its_escape():
    assert raw_json({"Name": "a\ud800b"}) == '{"Name":"a\\ud800b"}'


def test_raw_json_takes_every_kind_of_record_the_fast_path_does_not():
    # compact JSON by orjson; a key that is no text (not JSON, but a connector may add one), integers past 64 bits
    # and NUL each take the slower path, and all come out as before the fast path was added
    assert raw_json({"b": 1.5, "a": [1, None, "é"]}) == '{"b":1.5,"a":[1,null,"é"]}'
    assert raw_json({1: "x", "k": True}) == '{"1":"x","k":true}'
    assert raw_json({"n": 2**70}) == '{"n":1180591620717411303424}'
    assert raw_json({"t": "a\x00b"}) == '{"t":"a\\\\u0000b"}'  # NUL kept visible, escaped: Postgres text refuses it
    assert raw_json({"n": 2**70, "t": "\x00"}) == '{"n":1180591620717411303424,"t":"\\\\u0000"}'
    assert raw_json({"d": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}) == '{"d":"2026-01-02T03:04:05+00:00"}'
