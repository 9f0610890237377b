"""Pages are checked before one record of them is used, and paging is bounded.

A CRM (or a proxy, or a half-deployed API version) can answer 200 with valid JSON of the wrong shape: no
`records`, a `done` that is a string, an id that is null. Read naively, a missing list is an empty last page
and a full sync infers that everything after it was deleted. So every page is validated against a typed model
of the CRM's documented response (pydantic, the project's config library) and a page that does not fit fails
the extract, naming the CRM, the URL, the page number and what was wrong; nothing is reconciled.

Paging must also end: a next link that points back, a cursor that repeats or more pages than the CRM's own
count allows fail the run instead of staging the same records until someone kills it. Every paging sequence
runs through these guards in one loop (paging.py).

Each connector declares its page models next to its queries (records as TypedDicts naming only the id key:
extra keys are ignored, so validation costs about 0.6 s per million records and the connector keeps reading
the dicts it received).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from oppsync_pipeline.lib.crm.http import CrmError

M = TypeVar("M")
# Pages beyond what the CRM's count allows: records created while paging, and CRMs that end with an empty page.
PAGE_SLACK = 3
# Without a count (dictionaries, delete feeds), a sequence this long is a loop, not a tenant.
MAX_PAGES_UNCOUNTED = 100_000


class PageError(CrmError):
    """A page that does not fit the CRM's documented response, or paging that does not terminate. Not
    permanent: a bad page is often a transient fault of the CRM or a proxy, and the next run may not get it."""

    def __init__(self, message: str, *, crm: str, url: str | None, page: int | None):
        where = f"{crm}: page {page} of {_safe(url)}" if page else f"{crm}: {_safe(url)}"
        super().__init__(
            f"{where}: {message}; nothing was written",
            code="BAD_PAGE",
            permanent=False,
            hint="The CRM answered with a page oppsync cannot trust: the run failed before "
            "reconciling anything. If it repeats, the API (or a proxy in front of it) changed.",
        )


class PageModel(BaseModel):
    """A CRM page envelope: the keys the connector relies on are declared, the rest are allowed."""

    model_config = ConfigDict(extra="allow")


# Record TypedDicts inside a PageModel inherit its extra="allow" and are copied whole (about 2 us a record):
# give them `__pydantic_config__ = RECORD` and only the declared keys are checked (about 0.16 us).
RECORD = ConfigDict(extra="ignore")


_adapters: dict[Any, TypeAdapter] = {}


def check_page(model: type[M] | Any, body: Any, *, crm: str, url: str | None, page: int | None = None) -> M:
    """`body` validated as `model` (a PageModel, or any type pydantic validates, e.g. list[SomeRecord]); a
    PageError naming what is wrong otherwise. Returns the validated value (records stay as TypedDicts)."""
    adapter = _adapters.get(model)
    if adapter is None:
        adapter = _adapters[model] = TypeAdapter(model)
    try:
        return adapter.validate_python(body)
    except ValidationError as err:
        raise PageError(describe(err, body), crm=crm, url=url, page=page) from None


def describe(err: ValidationError, body: Any, limit: int = 3) -> str:
    """The first problems of a validation error, as key paths and short reasons (values truncated)."""
    if not isinstance(body, (dict, list)):
        return f"expected a JSON object or list of the documented shape, got {_short(body)}"
    parts = []
    for e in err.errors()[:limit]:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "<page>"
        if e["type"] == "missing":
            parts.append(f"{path} is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{path}: {msg[:1].lower() + msg[1:]} (got {_short(e.get('input'))})")
    more = len(err.errors()) - limit
    if isinstance(body, dict):
        parts.append(f"keys present: {sorted(body)[:8]}")
    return "unexpected page shape: " + "; ".join(parts) + (f"; and {more} more problem(s)" if more > 0 else "")


class PageTrail:
    """One paging sequence (a query and its next links). `follow(cursor)` before requesting the next page:
    a cursor seen before (a next link pointing back, an `after` that repeats, a page number going round)
    fails the run. `expect(total, page_size)` bounds the pages by the CRM's own count."""

    def __init__(self, crm: str, url: str | None):
        self.crm, self.url = crm, url
        self.pages = 0
        self.records = 0
        self.max_pages = MAX_PAGES_UNCOUNTED
        self.total: int | None = None
        self._seen: set[Hashable] = set()
        self._starts: dict[Hashable, int] = {}  # the first record id of each page -> its page number

    def expect(self, total: int | None, page_size: int) -> None:
        """The CRM says the sequence holds `total` records (SOQL totalSize, HubSpot total, @odata.count ...)."""
        if total is None or total < 0:
            return
        self.total = total
        self.max_pages = -(-total // max(1, page_size)) + PAGE_SLACK

    def page(self, n_records: int, first_id: Hashable | None = None) -> int:
        """Count one page received; returns its 1-based number. `first_id`, the id of the page's first record:
        pages of one sequence hold different records, so two that start with the same one mean the CRM answers
        the same page whatever the cursor says (the cursors then never repeat, and lists without a count have
        nothing else to stop them)."""
        self.pages += 1
        self.records += n_records
        if first_id is not None:
            if first_id in self._starts:
                raise PageError(
                    f"it starts with record {_short(first_id)}, as page {self._starts[first_id]} did: "
                    "the CRM repeats pages instead of following its next-page cursor (paging loops)",
                    crm=self.crm,
                    url=self.url,
                    page=self.pages,
                )
            self._starts[first_id] = self.pages
        if self.pages > self.max_pages:
            raise PageError(
                f"more pages ({self.pages}) than the CRM's count of {self.total} records allows "
                f"({self.max_pages}): paging does not terminate",
                crm=self.crm,
                url=self.url,
                page=self.pages,
            )
        if self.total is not None and self.records > self.total * 1.1 + 1000:
            raise PageError(
                f"{self.records} records read where the CRM counts {self.total}: the pages repeat",
                crm=self.crm,
                url=self.url,
                page=self.pages,
            )
        return self.pages

    def follow(self, cursor: Hashable) -> None:
        """Record the cursor / next link about to be requested; a repeat means the paging loops."""
        if cursor in self._seen:
            raise PageError(
                f"the next-page cursor {_short(cursor)} was already followed: paging loops",
                crm=self.crm,
                url=self.url,
                page=self.pages,
            )
        self._seen.add(cursor)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _safe(url: str | None) -> str:
    """A URL without its query string (filter values, tokens in odd APIs)."""
    return (url or "?").split("?", 1)[0]
