"""The paging loop, written once, and one paginator per kind of paging the five CRMs use.

In the manner of dlt's REST client (`dlt/sources/helpers/rest_client/paginators.py`): a paginator reads the
next page's position from an answer (`update_state`) and moves the request there (`update_request`); the loop
(`paginate`) sends, validates and yields. The guards of pages.py apply to every sequence alike: each page is
checked against the CRM's documented shape before one record of it is used, each position is followed once
(the first request's included), a page starting with the record an earlier page started with is a loop, and
the CRM's own count bounds the pages. A position is followed before the page that names it is yielded: a
looping sequence fails before a record of the looping page is used.

  JSONLinkPaginator    the next page's URL in the body: Salesforce `nextRecordsUrl` (until `done`), Dataverse
                       `@odata.nextLink`, Autotask `pageDetails.nextPageUrl` (POSTed the same query body)
  JSONCursorPaginator  an opaque cursor in the body sent back as a parameter: HubSpot lists' `paging.next.after`
  KeysetPaginator      the query restarted past the last record read: HubSpot search (`hs_object_id`),
                       ConnectWise `options.paging: keyset` (`id` / `_info/lastUpdated`)
  HeaderLinkPaginator  page numbers followed through the `Link: <...>; rel="next"` header: ConnectWise
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests

from oppsync_pipeline.lib.crm.http import ApiClient
from oppsync_pipeline.lib.crm.pages import PageError, PageTrail, check_page


@dataclass
class PageRequest:
    """One request of a paging sequence, as the paginator moves it from page to page."""

    method: str
    url: str  # relative to the client's base URL, or absolute
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None

    def send(self, client: ApiClient) -> requests.Response:
        kwargs: dict[str, Any] = {"params": self.params, "headers": dict(self.headers or {})}
        if self.json is not None:
            kwargs["json"] = self.json
        return client.request(self.method, self.url, **kwargs)


@dataclass
class Fetched:
    """One page as received: the JSON (records stay the dicts the CRM sent), the same validated as the page
    model, the page's records, its 1-based number and the URL it is named by in errors. `links`: the response's
    Link header (requests' `Response.links`); the response itself is not kept: its body (12 MB a Dataverse page)
    would stay in memory beside the decoded JSON while the page is consumed."""

    links: dict[str, dict[str, str]]
    body: Any
    page: Any
    records: list[Any]
    number: int
    url: str


class Paginator(ABC):
    """Where the next page is. `position`: the position of the request about to be sent (None: nothing to
    follow), recorded in the PageTrail so that a position asked twice fails the sequence."""

    def __init__(self) -> None:
        self.has_next_page = True
        self.position: Hashable | None = None

    def init_request(self, request: PageRequest) -> None:
        """Prepare the first request and set its position."""

    @abstractmethod
    def update_state(self, fetched: Fetched, trail: PageTrail) -> None:
        """Read the next page's position from a page (None when it names none); set `has_next_page`."""

    @abstractmethod
    def update_request(self, request: PageRequest) -> None:
        """Move `request` to the position read by `update_state`."""

    def follow(self, trail: PageTrail) -> None:
        trail.follow(self.position)


def url_position(url: str, params: dict[str, Any] | None = None, root: str = "") -> Hashable:
    """A request URL as a position to compare: its path (from `root` on, when a proxy may prefix it) and its
    query parameters, decoded and sorted (a next link that points back to the first request, given as a path
    and parameters, is the same position)."""
    parts = urlsplit(url)
    path = parts.path[parts.path.find(root) :] if root and root in parts.path else parts.path
    query = parse_qsl(parts.query, keep_blank_values=True) + [(k, str(v)) for k, v in (params or {}).items()]
    return path, tuple(sorted(query))


class _LinkPaginator(Paginator):
    """The next page named by a URL: sent to as it is, with the same method, headers and body and without the
    first request's parameters (the link carries the query). The URL is the position (`root` as in
    `url_position`)."""

    def __init__(self, root: str = ""):
        super().__init__()
        self.root = root
        self._next: str | None = None

    @abstractmethod
    def next_link(self, fetched: Fetched) -> str | None:
        """The next page's URL as it will be requested; None on the last page."""

    def init_request(self, request: PageRequest) -> None:
        self.position = url_position(request.url, request.params, self.root)

    def update_state(self, fetched: Fetched, trail: PageTrail) -> None:
        self._next = self.next_link(fetched) or None
        self.has_next_page = self._next is not None
        self.position = url_position(self._next, None, self.root) if self._next else None

    def update_request(self, request: PageRequest) -> None:
        request.url, request.params = str(self._next), None


class JSONLinkPaginator(_LinkPaginator):
    """The next page's URL in the body: `next_url` reads it from the validated page (None on the last page);
    `resolve` rewrites it (Autotask: the part after `/V1.0/`, so it resolves against the current zone)."""

    def __init__(self, next_url: Callable[[Any], str | None], *, resolve: Callable[[str], str] = str, root: str = ""):
        super().__init__(root)
        self.next_url, self.resolve = next_url, resolve

    def next_link(self, fetched: Fetched) -> str | None:
        link = self.next_url(fetched.page)
        return self.resolve(link) if link else None


class HeaderLinkPaginator(_LinkPaginator):
    """Page numbers followed through the `Link: <...>; rel="next"` header (RFC 8288) until a page has none.
    `resolve` rewrites the link (None: not followed, the sequence ends). An empty page that links a next one
    is broken: a page-numbered list has nothing after an empty page."""

    def __init__(self, *, resolve: Callable[[str], str | None] = str, root: str = ""):
        super().__init__(root)
        self.resolve = resolve

    def next_link(self, fetched: Fetched) -> str | None:
        link = fetched.links.get("next", {}).get("url")
        return self.resolve(link) if link else None

    def update_state(self, fetched: Fetched, trail: PageTrail) -> None:
        super().update_state(fetched, trail)
        if self.has_next_page and not fetched.records:
            raise PageError("an empty page with a next link", crm=trail.crm, url=fetched.url, page=fetched.number)


class JSONCursorPaginator(Paginator):
    """An opaque cursor read from the body (`cursor`, None on the last page) and sent back as the request
    parameter `param` (dlt's JSONResponseCursorPaginator). The cursor is the position."""

    def __init__(self, cursor: Callable[[Any], str | None], param: str = "after"):
        super().__init__()
        self.cursor, self.param = cursor, param

    def update_state(self, fetched: Fetched, trail: PageTrail) -> None:
        self.position = self.cursor(fetched.page)
        self.has_next_page = self.position is not None

    def update_request(self, request: PageRequest) -> None:
        request.params = {**(request.params or {}), self.param: self.position}


@dataclass
class KeysetPaginator(Paginator):
    """The same query restarted past the last record read (no cursor from the server: it cannot skip a record
    when others leave the result set while we page, as offsets do).

    `after(fetched)`: the position past the page's last record (None: nothing to resume from); `more(fetched)`:
    whether to read on (default: a position was found); `apply(request, position)` rewrites the request to
    start past `position` (also for `start`, the first request's position). With `ordered`, positions are
    comparable and must move forward: a page ending at or before the position it was asked to read after means
    the query ignores its bound or its sort (`key` names the position in that error)."""

    apply: Callable[[PageRequest, Any], None]
    after: Callable[[Fetched], Any]
    more: Callable[[Fetched], bool] | None = None
    start: Any = None
    ordered: bool = False
    key: str = "position"
    _last: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__init__()

    def init_request(self, request: PageRequest) -> None:
        self.apply(request, self.start)
        self.position, self._last = self.start, None

    def update_state(self, fetched: Fetched, trail: PageTrail) -> None:
        self.position = self.after(fetched)
        self.has_next_page = self.more(fetched) if self.more else self.position is not None

    def follow(self, trail: PageTrail) -> None:
        trail.follow(self.position)
        if self.ordered and self._last is not None and self.position <= self._last:
            raise PageError(
                f"the page ends at {self.key} {self.position}, not past the {self._last} it was asked "
                "to read after: paging loops (or the search ignores its sort)",
                crm=trail.crm,
                url=trail.url,
                page=trail.pages,
            )
        self._last = self.position

    def update_request(self, request: PageRequest) -> None:
        self.apply(request, self.position)


def paginate(
    client: ApiClient,
    request: PageRequest,
    paginator: Paginator,
    *,
    crm: str,
    model: Any,
    records: str | None = None,
    first_id: str | None = None,
    expect: int | None = None,
    total: Callable[[Any], int | None] | None = None,
    page_size: int = 1,
    trail: PageTrail | None = None,
    full_url: bool = True,
    before_request: Callable[[], None] | None = None,
) -> Iterator[Fetched]:
    """The pages of one sequence, each validated as `model` before it is yielded.

    `records`: the key of the page's record list (None: the body is the list); `first_id`: the key of a
    record's id, for the repeated-page guard (None: the CRM's cursors are guard enough); `expect`: the CRM's
    count of the sequence asked beforehand, or `total(page)`: read from its first page; either bounds the pages
    (`page_size` records each);
    `trail`: a PageTrail the caller bounds or reads itself; `full_url`: name pages by their full URL in errors
    (Salesforce's are named by the org-relative path its next links use); `before_request`: run before each
    request (client-side pacing, quota polls)."""
    paginator.init_request(request)
    trail = trail or PageTrail(crm, client.url(request.url) if full_url else request.url)
    trail.expect(expect, page_size)
    if paginator.position is not None:
        paginator.follow(trail)
    while True:
        if before_request is not None:
            before_request()
        url = client.url(request.url) if full_url else request.url
        response = request.send(client)
        body = client.parse_json(response)
        page = check_page(model, body, crm=crm, url=url, page=trail.pages + 1)
        rows = body[records] if records is not None else body
        if total is not None and trail.pages == 0:
            trail.expect(total(page), page_size)
        number = trail.page(len(rows), rows[0][first_id] if first_id is not None and rows else None)
        fetched = Fetched(response.links, body, page, rows, number, url)
        del response  # the body decoded: the bytes go now, not when the next page's response replaces them
        paginator.update_state(fetched, trail)
        if paginator.position is not None:
            paginator.follow(trail)
        yield fetched
        # the consumer holds what it still needs: this frame's references would keep the page alive while the
        # next one is requested and decoded
        del fetched, body, page, rows
        if not paginator.has_next_page:
            return
        paginator.update_request(request)
