"""The interface every CRM connector implements, and the pieces they share.

A connector knows one CRM's API: how to authenticate, how to page, how to ask for the open and the
not-open sets, and how to map a native record to the canonical `Opportunity`. It knows nothing about
the warehouse: pages are yielded as they arrive so the caller can stream them to staging and memory
stays flat whatever the number of opportunities.

Each CRM module has the same shape, in the same order:
  auth class -> `observe` / `classify` hooks -> connector class (stages, users, opportunities, deleted,
  mapping) -> filter rendering.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, ClassVar

import requests

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.http import ApiClient, Auth, QuotaBudget, RequestStats
from oppsync_pipeline.lib.record import CrmUser, Opportunity, StageInfo, Status, parse_date, parse_datetime, parse_float

Page = list[Opportunity]


class CrmConnector(ABC):
    crm: ClassVar[str]
    max_page_size: ClassVar[int]
    # Whether the CRM has a feed of deletions (Salesforce delete log, HubSpot archived, Dataverse change tracking).
    native_deletes: ClassVar[bool] = False
    # Credential keys the connection must provide.
    credential_keys: ClassVar[tuple[str, ...]] = ()
    # CRM field names a filter or a field override may reference (validated before any request).
    known_fields: ClassVar[frozenset[str]] = frozenset()
    # Filters the CRM can evaluate server-side; the rest are applied after fetching.
    pushdown_filters: ClassVar[bool] = True
    # The delete feed must be read once to set a baseline before it reports anything (Dataverse delta links).
    delete_feed_needs_baseline: ClassVar[bool] = False

    def __init__(
        self,
        conn: ConnectionConfig,
        credentials: dict[str, str],
        *,
        budget: QuotaBudget | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.conn = conn
        self.credentials = credentials
        self.page_size = min(conn.page_size or self.max_page_size, self.max_page_size)
        self.client = ApiClient(
            base_url=conn.base_url,
            auth=self.make_auth(),
            budget=budget or QuotaBudget(conn.quota.run_share, conn.quota.stop_at_usage),
            observe=self.observe,
            classify=self.classify,
            sleep=sleep,
            session=session or requests.Session(),
        )
        self._stages: dict[str, StageInfo] | None = None

    # -- what each CRM provides -------------------------------------------------------------------------------

    @abstractmethod
    def make_auth(self) -> Auth: ...

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        """Read the CRM's usage headers into `stats` (quota used / limit)."""

    def classify(self, response: requests.Response) -> Exception | None:
        """Turn a CRM-specific response into an exception (e.g. quota spent); None to use the defaults."""
        return None

    @abstractmethod
    def fetch_stages(self) -> list[StageInfo]:
        """The tenant's stages / statuses with the CRM's own open / won semantics."""

    @abstractmethod
    def users(self) -> Iterable[CrmUser]:
        """Owners and creators, resolved to names and emails."""

    @abstractmethod
    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        """Pages of the open (or not-open) set; only records modified at or after `since` when given."""

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        """Pages of (source_id, deleted_at) from the CRM's native delete feed; nothing when it has none."""
        return iter(())

    @classmethod
    def validate_connection(cls, conn: ConnectionConfig) -> list[str]:
        problems = []
        missing = [k for k in cls.credential_keys if k not in conn.credentials]
        if missing:
            problems.append(f"credentials: missing {missing}; {cls.crm} needs {list(cls.credential_keys)}")
        unknown = [k for k in conn.credentials if k not in cls.credential_keys]
        if unknown:
            problems.append(f"credentials: unknown key(s) {unknown}; {cls.crm} takes {list(cls.credential_keys)}")
        for i, f in enumerate(conn.filters):
            if not cls.field_known(f.field):
                problems.append(f"filters[{i}].field: unknown {cls.crm} field '{f.field}'; "
                                f"known: {sorted(cls.known_fields)} (or a custom field, see README)")
        for canonical, native in conn.fields.items():
            if not cls.field_known(native):
                problems.append(f"fields.{canonical}: unknown {cls.crm} field '{native}'; "
                                f"known: {sorted(cls.known_fields)} (or a custom field, see README)")
        return problems

    @classmethod
    def field_known(cls, name: str) -> bool:
        return name in cls.known_fields or cls.is_custom_field(name)

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        """Each CRM names custom fields its own way (Salesforce `__c`, Dataverse publisher prefix ...)."""
        return False

    @property
    def resume_token(self) -> str | None:
        """A CRM-side change cursor the sync layer stores between runs (e.g. a Dataverse delta link)."""
        return None

    @resume_token.setter
    def resume_token(self, value: str | None) -> None:
        return None

    # -- shared behaviour -------------------------------------------------------------------------------------

    @property
    def stats(self) -> RequestStats:
        return self.client.stats

    def stages(self) -> dict[str, StageInfo]:
        if self._stages is None:
            self._stages = {s.key: s for s in self.fetch_stages()}
        return self._stages

    def status_for(self, stage_key: str | None, *, is_closed: bool | None = None, is_won: bool | None = None) -> Status:
        """open / won / lost: the connection's open statuses when configured (seed 000), else the CRM's flags."""
        info = self.stages().get(stage_key) if stage_key is not None else None
        if self.conn.open_statuses is not None:
            names = {stage_key} | ({info.label} if info else set())
            if names & set(self.conn.open_statuses):
                return "open"
            won = info.is_won if info else bool(is_won)
            return "won" if won else "lost"
        if info is not None:
            return info.category
        if is_closed is not None:
            return "open" if not is_closed else ("won" if is_won else "lost")
        return "open"

    def open_stage_keys(self, open_set: bool) -> list[str]:
        """The stage keys that make up the open (or not-open) set, for CRMs that query by status list."""
        return [k for k, s in self.stages().items() if (self.status_for(k) == "open") == open_set]

    def field(self, canonical: str, default: str) -> str:
        """The CRM field a canonical field comes from: the connection's override, else the CRM's own."""
        return self.conn.fields.get(canonical, default)

    def post_filter(self, record: dict[str, Any], getter: Callable[[dict[str, Any], str], Any]) -> bool:
        """Apply the connection's filters to a fetched record (CRMs without server-side filtering)."""
        return all(matches(f, getter(record, f.field)) for f in self.conn.filters)

    def opportunity(self, source_id: str, raw: dict[str, Any], **values: Any) -> Opportunity:
        return Opportunity(connection=self.conn.name, crm=self.crm, source_id=str(source_id), raw=raw, **values)


def matches(f: RecordFilter, actual: Any) -> bool:
    """Evaluate one filter in Python with the CRM's comparison semantics (numbers as numbers, else text)."""
    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        num = parse_float(v)
        if num is not None and not isinstance(v, (datetime,)):
            return num
        dt = _maybe_datetime(v)
        return dt if dt is not None else str(v)

    a = norm(actual)
    if f.op == "in":
        return a in {norm(v) for v in f.value}
    b = norm(f.value)
    if f.op == "equal":
        return a == b
    if f.op == "not_equal":
        return a != b
    if a is None or b is None:
        return False
    try:
        return {"more_than": a > b, "less_than": a < b, "at_least": a >= b, "at_most": a <= b}[f.op]
    except TypeError:
        return False


def _maybe_datetime(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v
    if isinstance(v, str) and len(v) >= 10 and v[4] == "-" and v[7] == "-":
        try:
            return parse_datetime(v) if len(v) > 10 else datetime.combine(parse_date(v), datetime.min.time())  # type: ignore[arg-type]
        except ValueError:
            return None
    return None
