"""The paging loop and its paginators (lib/crm/paging.py), pure: an ApiClient over a fake session that answers
from a script of pages and records what was asked."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from pydantic import BaseModel
from typing_extensions import TypedDict

from oppsync_pipeline.lib.crm.http import ApiClient, Auth
from oppsync_pipeline.lib.crm.pages import PageError, PageModel
from oppsync_pipeline.lib.crm.paging import (
    HeaderLinkPaginator,
    JSONCursorPaginator,
    JSONLinkPaginator,
    KeysetPaginator,
    PageRequest,
    paginate,
    url_position,
)

BASE = "http://crm.test"


class Rec(TypedDict):
    id: int


class LinkPage(PageModel):
    records: list[Rec]
    next: str | None = None


class Paging(BaseModel):
    after: str | None = None


class CursorPage(PageModel):
    results: list[Rec]
    paging: Paging = Paging()


class FakeSession(requests.Session):
    """Answers each request with the next (body, headers) of `script`; keeps (method, url, params, json)."""

    def __init__(self, script: list[Any]):
        super().__init__()
        self.script = list(script)
        self.asked: list[tuple[str, str, dict[str, Any] | None, Any]] = []

    def request(self, method, url, params=None, json=None, headers=None, timeout=None, **kwargs):  # type: ignore[override]
        self.asked.append((method, url, params, json))
        item = self.script.pop(0)
        body, extra = item if isinstance(item, tuple) else (item, {})
        response = requests.Response()
        response.status_code = 200
        response._content = _json(body)
        response.headers.update(extra)
        response.url = url
        response.request = requests.Request(method, url).prepare()
        return response


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def client(script: list[Any]) -> tuple[ApiClient, FakeSession]:
    session = FakeSession(script)
    return ApiClient(BASE, Auth(), session=session), session


def recs(*ids: int) -> list[dict[str, int]]:
    return [{"id": i} for i in ids]


def test_json_link_follows_the_next_url_without_the_first_requests_parameters():
    api, session = client(
        [{"records": recs(1, 2), "next": "/q/2"}, {"records": recs(3), "next": f"{BASE}/q/3"}, {"records": []}]
    )
    pages = list(
        paginate(
            api,
            PageRequest("GET", "/q", params={"s": "x"}),
            JSONLinkPaginator(lambda p: p.next),
            crm="crm",
            model=LinkPage,
            records="records",
        )
    )
    assert [p.records for p in pages] == [recs(1, 2), recs(3), []]
    assert [p.number for p in pages] == [1, 2, 3]
    assert [(m, u, p) for m, u, p, _ in session.asked] == [
        ("GET", f"{BASE}/q", {"s": "x"}),
        ("GET", f"{BASE}/q/2", None),
        ("GET", f"{BASE}/q/3", None),
    ]


def test_a_next_link_back_to_the_first_request_fails_before_its_page_is_used():
    """The first request (a path and parameters) and a link naming it (absolute, parameters in another order)
    are the same position: refused before page 2, which names it, is yielded, and never requested again."""
    api, session = client([{"records": recs(1), "next": "/q/2"}, {"records": recs(2), "next": f"{BASE}/q?b=2&a=1"}])
    got = []
    with pytest.raises(PageError, match=r"crm: page 2 of http://crm.test/q: .*already followed: paging loops"):
        for page in paginate(
            api,
            PageRequest("GET", "/q", params={"a": 1, "b": 2}),
            JSONLinkPaginator(lambda p: p.next),
            crm="crm",
            model=LinkPage,
            records="records",
        ):
            got.append(page.number)
    assert got == [1] and len(session.asked) == 2


def test_a_post_next_page_url_keeps_the_method_and_body_and_resolves_the_link():
    api, session = client([{"records": recs(1), "next": "https://zone.test/V1.0/E/query/next?p=2"}, {"records": []}])
    query = {"filter": [{"op": "gt", "field": "id", "value": 0}]}
    list(
        paginate(
            api,
            PageRequest("POST", "E/query", json=query),
            JSONLinkPaginator(lambda p: p.next, resolve=lambda u: u.split("/V1.0/", 1)[1]),
            crm="crm",
            model=LinkPage,
            records="records",
        )
    )
    assert session.asked == [
        ("POST", f"{BASE}/E/query", None, query),
        ("POST", f"{BASE}/E/query/next?p=2", None, query),
    ]


def test_a_page_of_the_wrong_shape_fails_naming_its_number_and_url():
    api, _ = client([{"records": recs(1), "next": "/q/2"}, {"records": [{"id": None}]}])
    with pytest.raises(PageError, match=r"crm: page 2 of /q/2: unexpected page shape: records\[0\]\.id"):
        list(
            paginate(
                api,
                PageRequest("GET", "/q"),
                JSONLinkPaginator(lambda p: p.next),
                crm="crm",
                model=LinkPage,
                records="records",
                full_url=False,
            )
        )


def test_the_first_pages_count_bounds_the_pages():
    api, _ = client([{"records": recs(i), "next": f"/q/{i + 1}", "total": 2} for i in range(1, 10)])
    with pytest.raises(PageError, match=r"page 6 of .*more pages \(6\) than the CRM's count of 2 records allows \(5\)"):
        list(
            paginate(
                api,
                PageRequest("GET", "/q"),
                JSONLinkPaginator(lambda p: p.next),
                crm="crm",
                model=LinkPage,
                records="records",
                total=lambda p: p.total,
                page_size=1,
            )
        )


def test_a_cursor_is_sent_back_as_a_parameter_and_a_repeated_first_record_is_a_loop():
    api, session = client(
        [
            {"results": recs(1, 2), "paging": {"after": "c2"}},
            {"results": recs(3), "paging": {"after": "c3"}},
            {"results": recs(3), "paging": {"after": "c4"}},
        ]
    )
    got = []
    with pytest.raises(PageError, match=r"page 3 of .*it starts with record 3, as page 2 did"):
        for page in paginate(
            api,
            PageRequest("GET", "/list", params={"limit": 2}),
            JSONCursorPaginator(lambda p: p.paging.after),
            crm="crm",
            model=CursorPage,
            records="results",
            first_id="id",
        ):
            got.append(page.records)
    assert got == [recs(1, 2), recs(3)]
    assert [p for _, _, p, _ in session.asked] == [
        {"limit": 2},
        {"limit": 2, "after": "c2"},
        {"limit": 2, "after": "c3"},
    ]


def keyset(**kwargs: Any) -> KeysetPaginator:
    def apply(request: PageRequest, last: int) -> None:
        request.json = {"after": last}

    return KeysetPaginator(
        apply=apply,
        after=lambda f: f.records[-1]["id"] if f.records else None,
        start=0,
        ordered=True,
        key="id",
        **kwargs,
    )


def test_keyset_restarts_past_the_last_record_until_an_empty_page():
    api, session = client([{"records": recs(1, 2)}, {"records": recs(5)}, {"records": []}])
    pages = list(paginate(api, PageRequest("POST", "/search"), keyset(), crm="crm", model=LinkPage, records="records"))
    assert [p.records for p in pages] == [recs(1, 2), recs(5), []]
    assert [j for _, _, _, j in session.asked] == [{"after": 0}, {"after": 2}, {"after": 5}]


@pytest.mark.parametrize(
    "second,problem",
    [
        (recs(3, 2), "already followed: paging loops"),  # ends where page 1 ended
        (recs(1), r"ends at id 1, not past the 2 it was asked to read after: paging loops"),
    ],
)
def test_keyset_positions_must_move_forward(second, problem):
    api, _ = client([{"records": recs(1, 2)}, {"records": second}, {"records": []}])
    with pytest.raises(PageError, match=rf"page 2 of .*{problem}"):
        list(paginate(api, PageRequest("POST", "/search"), keyset(), crm="crm", model=LinkPage, records="records"))


def test_keyset_without_a_next_position_ends_and_more_can_end_early():
    api, session = client([{"records": recs(1, 2)}, {"records": recs(3)}])
    pages = list(
        paginate(
            api,
            PageRequest("POST", "/search"),
            keyset(more=lambda f: len(f.records) == 2),
            crm="crm",
            model=LinkPage,
            records="records",
        )
    )
    assert len(pages) == 2 and len(session.asked) == 2


def test_header_link_pages_to_the_end_on_the_apis_own_host():
    link = '<https://elsewhere.test/api/list?page={n}&pageSize=2>; rel="next"'
    api, session = client([(recs(1, 2), {"Link": link.format(n=2)}), (recs(3), {})])
    same_host = lambda u: BASE + u.split("elsewhere.test", 1)[1]  # noqa: E731
    pages = list(
        paginate(
            api,
            PageRequest("GET", "/api/list", params={"page": 1, "pageSize": 2}),
            HeaderLinkPaginator(resolve=same_host),
            crm="crm",
            model=list[Rec],
            first_id="id",
        )
    )
    assert [p.records for p in pages] == [recs(1, 2), recs(3)]
    assert session.asked[1][1] == f"{BASE}/api/list?page=2&pageSize=2"


def test_header_link_refuses_an_empty_page_that_links_a_next_one():
    api, _ = client([([], {"Link": f'<{BASE}/api/list?page=2>; rel="next"'})])
    with pytest.raises(PageError, match="page 1 of .*an empty page with a next link"):
        list(
            paginate(
                api,
                PageRequest("GET", "/api/list", params={"page": 1}),
                HeaderLinkPaginator(),
                crm="crm",
                model=list[Rec],
            )
        )


def test_before_request_runs_before_every_request():
    api, session = client([{"records": recs(1), "next": "/q/2"}, {"records": []}])
    seen = []
    list(
        paginate(
            api,
            PageRequest("GET", "/q"),
            JSONLinkPaginator(lambda p: p.next),
            crm="crm",
            model=LinkPage,
            records="records",
            before_request=lambda: seen.append(len(session.asked)),
        )
    )
    assert seen == [0, 1]


def test_url_position_compares_paths_and_decoded_sorted_parameters():
    assert url_position("/api/data/v9.2/x", {"$top": 5}) == url_position("https://p.test/api/data/v9.2/x?%24top=5")
    assert url_position("https://proxy.test/pre/api/x?a=1", root="/api/") == url_position(
        "/api/x", {"a": "1"}, root="/api/"
    )


def test_a_count_asked_beforehand_bounds_the_pages_too():
    api, _ = client([{"records": recs(i), "next": f"/q/{i + 1}"} for i in range(1, 10)])
    with pytest.raises(PageError, match=r"page 5 of .*more pages \(5\) than the CRM's count of 1 records allows \(4\)"):
        list(
            paginate(
                api,
                PageRequest("GET", "/q"),
                JSONLinkPaginator(lambda p: p.next),
                crm="crm",
                model=LinkPage,
                records="records",
                expect=1,
                page_size=1,
            )
        )
