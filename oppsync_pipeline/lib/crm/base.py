"""The interface every CRM connector implements, and the pieces they share.

A connector knows one CRM's API: how to authenticate, how to page, how to ask for the open and the
not-open sets, and how to map a native record to the canonical `Opportunity`. It knows nothing about
the warehouse: pages are yielded as they arrive so the caller can stream them to staging and memory
stays flat whatever the number of opportunities.

Each CRM module has the same shape, in the same order:
  auth class -> `observe` / `classify` hooks -> connector class (stages, users, opportunities, deleted,
  mapping) -> filter rendering.
The hooks are module functions of the response (what the vendor's answers mean, testable alone); each connector
binds them to its connection in its `observe` / `classify` methods, which the base class hands to the client.
Paging is paging.py's loop: a connector builds the first request and names its paginator.

Mapping is the same three steps in every connector: `enrich(page)` does the page's I/O (lookups of companies,
contacts, sites, forecasts, associations, the dictionaries), batched, once per page; `_map(record, enriched)`
turns one native record into an `Opportunity` without I/O and without touching its input; its plain fields
come from the connector's `field_map` and the connection's `fields:` overrides (`mapped_fields`, fields.py).
"""

from __future__ import annotations

import difflib
import functools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, ClassVar, TypeVar

import requests
from pydantic import BaseModel, ConfigDict, Field

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.fields import FieldMap, FieldReader, as_id
from oppsync_pipeline.lib.crm.http import (
    ApiClient,
    Auth,
    CrmError,
    CrmSession,
    InFlightLimit,
    QuotaBudget,
    QuotaExhausted,
    RequestStats,
)
from oppsync_pipeline.lib.crm.lookups import LookupCache
from oppsync_pipeline.lib.crm.paging import Fetched, PageRequest, Paginator, paginate
from oppsync_pipeline.lib.crm.parallel import one_ahead
from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.quarantine import Quarantined, mapping_failure, record_problems
from oppsync_pipeline.lib.record import (
    CrmUser,
    Opportunity,
    StageInfo,
    Status,
    clean_text,
    extra_fields_json,
    parse_date,
    parse_datetime,
    parse_float,
    to_utc,
)
from oppsync_pipeline.lib.scrub import Scrubber


class Page(list[Opportunity]):
    """A page of mapped opportunities, with what the read knows of it: `received`, the records the CRM delivered
    for it (quarantined ones included), and in a full read that can be resumed, `position`: where the read
    stands after it (`CrmConnector.resume_key` of its last record; lib/resume.py)."""

    received: int = 0
    position: str | None = None


class PositionedRecords(list[dict[str, Any]]):
    """A page of native records that says where its read stands after it (`position`), where that is not its last
    record's `resume_key`: a read split into slices whose pages interleave (Autotask's id ranges)."""

    def __init__(self, records: Iterable[dict[str, Any]], position: str) -> None:
        super().__init__(records)
        self.position = position


T = TypeVar("T")

# Optional reads (dictionaries, quota polls, enrichments) that answer with one of these are skipped with a
# warning and a documented fallback: real API users often lack rights to metadata endpoints.
OPTIONAL_REFUSALS = (403, 404)


class ConnectorOptions(BaseModel):
    """A CRM's `options:` (each connector subclasses it): unknown keys and values of the wrong type are refused
    when the configuration is loaded, with the key path (`connections[0].options.forcast: unknown key`).
    Strict: YAML's `"false"` is a string, not a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Requests a full read may have in flight at once (parallel.py); None: the CRM's documented limit
    # (`CrmConnector.read_concurrency`); 1: the sequential read, one page after another.
    parallel_reads: int | None = Field(default=None, ge=1, le=64)


@dataclass
class SetTally:
    """A full read of one set: what the CRM said it holds (its own count, from the first page or a count
    request) and how many records it actually delivered (before any filtering in Python)."""

    crm_count: int | None = None
    received: int = 0
    _previous: set[str] = field(default_factory=set, repr=False)

    def add(self, ids: Iterable[Any]) -> None:
        """Count a page's records. A record repeated from the page before (an offset shifting under the reader)
        counts once; the ids of the whole read are not kept: at a million records they would cost ~100 MB of
        a sync whose memory is otherwise flat."""
        page = {str(i) for i in ids}
        self.received += len(page - self._previous)
        self._previous = page


@dataclass(frozen=True)
class Capability:
    """One thing a connection reads (or not) in this tenant, and why: `config check --online` prints these,
    the run's metadata carries the ones that were not available."""

    name: str
    available: bool
    detail: str = ""


class CrmConnector(ABC):
    crm: ClassVar[str]
    max_page_size: ClassVar[int]
    # The page size asked for when the connection sets none (`connections[].page_size`); None: max_page_size.
    default_page_size: ClassVar[int | None] = None
    # Whether the CRM has a feed of deletions (Salesforce delete log, HubSpot archived, Dataverse change tracking).
    native_deletes: ClassVar[bool] = False
    # Credential keys the connection must provide: the CRM's registry entry declares them (__init_subclass__).
    credential_keys: ClassVar[tuple[str, ...]] = ()
    # CRM field names a filter or a field override may reference (validated before any request).
    known_fields: ClassVar[frozenset[str]] = frozenset()
    # Filters the CRM can evaluate server-side; the rest are applied after fetching.
    pushdown_filters: ClassVar[bool] = True
    # The delete feed must be read once to set a baseline before it reports anything (Dataverse delta links).
    delete_feed_needs_baseline: ClassVar[bool] = False
    # The CRM compares text in filters case-insensitively (SQL Server's default collation: Dataverse,
    # ConnectWise, Autotask): filters evaluated in Python on records read by id must agree with it.
    filters_ignore_case: ClassVar[bool] = False
    # The key of a record's id in the CRM's answers (names the record when it cannot be mapped).
    id_field: ClassVar[str] = "id"
    # Where each canonical field comes from by default (fields.py); `fields:` overrides apply on top.
    field_map: ClassVar[FieldMap]
    # The connector's `options:` model (ConnectionConfig validates `options` against it).
    Options: ClassVar[type[ConnectorOptions]] = ConnectorOptions
    # Whether a full read stopped by its share of the CRM's quota can be read on by the next run (lib/resume.py):
    # each page's `position` says where a set's read stands after it (`resume_key`), `resume_read` reads on.
    resumable_full_reads: ClassVar[bool] = False
    # Requests a full read may have in flight by default: the most the CRM's documentation allows (each
    # connector says where from); `options.parallel_reads` lowers (or, at the user's risk, raises) it.
    read_concurrency: ClassVar[int] = 1
    # Whether the sync may begin the not-open set's read (its count, its first page) beside the open set's
    # (parallel.chain_ahead); else in turn. Only where mapping a page reads nothing that an earlier page's mapping
    # cached (companies, contacts, associations and the changes to them): begun early, the next set's first page
    # would look up other ids, and send other requests, than in turn, or map with what was not yet renamed.
    sets_side_by_side: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # one place for a CRM's credential keys: its registry entry (config, sandbox and harness read it too)
        spec = REGISTRY.get(cls.__dict__.get("crm", ""))
        if spec is not None:
            cls.credential_keys = spec.credential_keys

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
        # Masks this connection's secrets, the configured ones and those its Auth sends, in every form.
        self.scrubber = Scrubber(credentials)
        self.page_size = min(conn.page_size or self.default_page_size or self.max_page_size, self.max_page_size)
        self.options = self.Options.model_validate(conn.options)  # before make_auth, which may read them
        self.client = ApiClient(
            base_url=conn.base_url,
            auth=self.make_auth(),
            budget=budget
            or QuotaBudget(
                conn.quota.run_share, conn.quota.stop_at_usage, max_wait_seconds=conn.quota.max_wait_seconds
            ),
            observe=self.observe,
            classify=self.classify,
            pace=self.pace,
            sleep=sleep,
            session=session or CrmSession(),
            scrubber=self.scrubber,
        )
        # requests in flight at once in a full read (parallel.py): 1 is the sequential read
        self.degree = self.options.parallel_reads or self.read_concurrency
        if self.degree > 1:
            self.client.allow_concurrency(self.degree + 1)  # the workers, and the consumer's own lookups
        self.client.in_flight = InFlightLimit(self.degree, self.in_flight_key)
        # discovery and the dictionaries are read once, by whichever thread asks first (a read ahead may)
        self._once = threading.RLock()
        self._stages: dict[str, StageInfo] | None = None
        self._statuses: dict[str, StageInfo] | None = None
        self._prepared = False
        self._discovered = False
        self.capabilities: dict[str, Capability] = {}
        # Records that failed validation this run (sync.py drains it after each page into oppsync.quarantine).
        self.quarantined: list[Quarantined] = []
        self._quarantine_lock = threading.Lock()
        # Full reads of each set (open_set -> tally): the sync compares what was received with the CRM's count.
        self.tallies: dict[bool, SetTally] = {}
        # Dictionary entries kept between runs (lookups.py): the sync replaces this empty cache with the kept
        # entries before an incremental run and stores what the run read when it completes.
        self.lookups = LookupCache()

    # -- what each CRM provides -------------------------------------------------------------------------------

    @abstractmethod
    def make_auth(self) -> Auth: ...

    def observe(self, response: requests.Response, stats: RequestStats) -> None:
        """Read the CRM's usage headers into `stats` (quota used / limit)."""

    def classify(self, response: requests.Response) -> Exception | None:
        """Turn a CRM-specific response into an exception (e.g. quota spent); None to use the defaults."""
        return None

    def pace(self, method: str, path: str) -> float:
        """Seconds to wait before sending this request, to stay within the CRM's rate limit (0: send now).
        Called before every request, retries included, from any read thread (http.RollingWindowPacer)."""
        return 0.0

    def in_flight_key(self, method: str, path: str) -> Hashable | None:
        """What a request counts under where the CRM limits requests in flight (Autotask: the object endpoint;
        Dataverse: the user), at most `degree` at once each (http.InFlightLimit); None: no limit to keep."""
        return None

    def discover_tenant(self) -> None:
        """Learn what this tenant has before the first query (optional fields, custom fields, field types,
        which lookups it exposes): Salesforce describe, Dataverse attribute metadata, HubSpot properties,
        Autotask entityInformation/fields. Record what will and will not be read with `self.note`.
        Runs once per run (see `prepare`)."""

    @abstractmethod
    def fetch_stages(self) -> list[StageInfo]:
        """The tenant's sales stages as users see them (key = the stage's id / API value, label = its name),
        with the CRM's own open / won flags where the stage carries them."""

    def fetch_statuses(self) -> list[StageInfo]:
        """The CRM's statuses with their open / won flags, where the status is not the stage (ConnectWise,
        Autotask, Dataverse statuscode). Empty: the stage's flags (or the record's) decide the status."""
        return []

    @abstractmethod
    def users(self) -> Iterable[CrmUser]:
        """Owners and creators, resolved to names and emails."""

    @abstractmethod
    def opportunities(self, open_set: bool, since: datetime | None) -> Iterator[Page]:
        """Pages of the open (or not-open) set; only records modified at or after `since` when given."""

    def resume_key(self, record: dict[str, Any]) -> str | None:
        """A native record's key in the order of the connector's full read, where it can be resumed (a page's
        `position` is its last record's): the sync stages pages in the order one query gives them, so every
        record of the set up to a staged page's position is staged. None: not resumable."""
        return None

    def resume_read(self, open_set: bool, after: str) -> Iterator[Page]:
        """The rest of a set's full read, after `after` (a page's `position`), counted (its tally: the CRM's count
        of the whole set) as the whole read is."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume a full read")

    def count(self, open_set: bool) -> int | None:
        """The CRM's own count, asked now, of the open (or not-open) set as `opportunities(open_set, None)`
        queries it (SOQL COUNT(), HubSpot search total, Dataverse $count, ConnectWise /count, Autotask
        query/count). None when the CRM cannot count it: the sync then cannot guard deletes with it."""
        return None

    def deleted(self, since: datetime | None) -> Iterator[list[tuple[str, datetime | None]]]:
        """Pages of (source_id, deleted_at) from the CRM's native delete feed; nothing when it has none."""
        return iter(())

    def fetch_by_ids(self, ids: Sequence[str]) -> Iterator[Page]:
        """Pages of the current records of these ids that the CRM still has (not deleted, archived or in a
        recycle bin), read WITHOUT the connection's filters and mapped as `opportunities` maps them; ids it
        no longer has are simply absent. Batched to the CRM's limits (ids per request, URL length).

        A full sync asks this for the opportunities it expected but did not read: those returned left the
        connection's scope (a filter no longer matches) and get `left_scope`; only those absent are deleted."""
        raise NotImplementedError(f"{type(self).__name__} cannot read opportunities by id")

    @classmethod
    def filter_value(cls, raw: dict[str, Any], field: str) -> Any:
        """The value a filter on CRM field `field` compares, read from a raw record as this connector receives
        it (`read_value`): filters are evaluated in Python on records read by id."""
        return cls.read_value(raw, field)

    def matches_filters(self, opp: Opportunity) -> bool:
        """Whether a record read without filters (fetch_by_ids) matches the connection's filters."""
        return all(
            matches(f, self.filter_value(opp.raw, f.field), ignore_case=self.filters_ignore_case)
            for f in self.conn.filters
        )

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
                problems.append(
                    f"filters[{i}].field: unknown {cls.crm} field '{f.field}'; "
                    f"known: {sorted(cls.known_fields)} (or a custom field, see README)"
                )
        for canonical, native in conn.fields.items():
            if not cls.field_known(native):
                problems.append(
                    f"fields.{canonical}: unknown {cls.crm} field '{native}'; "
                    f"known: {sorted(cls.known_fields)} (or a custom field, see README)"
                )
        for name, extra in conn.extra_fields.items():
            if not cls.field_known(extra.field):
                problems.append(
                    f"extra_fields.{name}.field: unknown {cls.crm} field '{extra.field}'; "
                    f"known: {sorted(cls.known_fields)} (or a custom field, see README)"
                )
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

    def pages(self, request: PageRequest, paginator: Paginator, **options: Any) -> Iterator[Fetched]:
        """The checked pages of one paging sequence of this CRM (paging.paginate: `options` are its keywords)."""
        return paginate(self.client, request, paginator, crm=self.crm, **options)

    def prepare(self) -> None:
        """Discover the tenant once per run (cached): connectors call this before building a query."""
        if self._discovered:
            return
        with self._once:  # another thread waits for the discovery under way; this one's own calls return
            if not self._prepared:
                self._prepared = True
                try:
                    self.discover_tenant()
                finally:
                    self._discovered = True

    def discover(self) -> list[Capability]:
        """What `oppsync config check --online` reports: the same discovery a run does, the dictionaries, and
        one page of each opportunity set (the required reads), each noted as read or not and why."""
        try:
            self.prepare()
        except (CrmError, ConfigError) as err:
            self.note("tenant discovery", False, f"REQUIRED and refused: {err}")
            return list(self.capabilities.values())
        stages, statuses = self.stages(), self.statuses()
        self.note(
            "stage list",
            bool(stages),
            f"{len(stages)} stage(s)"
            if stages
            else "none readable: oppsync.crm_stages stays empty (stages are still read from each record)",
        )
        if statuses:
            self.note("status list", True, f"{len(statuses)} status(es)")
        self._check_stage_names(stages, statuses)
        if self.conn.track_from_stage is not None:
            from oppsync_pipeline.lib.scope import StageTrigger  # scope.py imports the warehouse layer

            try:
                StageTrigger.resolve(self.conn, stages)
                self.note("stage trigger", True, f"tracks opportunities from stage '{self.conn.track_from_stage}' on")
            except ConfigError as err:
                self.note("stage trigger", False, "REQUIRED and not usable: " + "; ".join(err.problems))
        try:
            n_users = sum(1 for _ in self.users())
            self.note(
                "users (owners and creators)",
                bool(n_users),
                f"{n_users} user(s)"
                if n_users
                else "none readable: owners and creators are kept as CRM ids, without names",
            )
        except CrmError as err:
            self.note("users (owners and creators)", False, f"REQUIRED and refused: {err}")
        for open_set in (True, False):
            what = "opportunities (open set)" if open_set else "opportunities (not-open set)"
            try:
                next(iter(self.opportunities(open_set=open_set, since=None)), None)
                self.note(what, True, "readable")
            except CrmError as err:
                self.note(what, False, f"REQUIRED and refused: {err}")
        return list(self.capabilities.values())

    def _check_stage_names(self, stages: dict[str, StageInfo], statuses: dict[str, StageInfo]) -> None:
        """Stage and status names the configuration relies on must exist in this tenant: a typo in
        `open_statuses` silently makes every opportunity closed, one in `stage_categories` or the qualification
        stages silently matches nothing. Checked against the tenant's stage and status dictionaries (names and
        ids), with the closest name as a suggestion."""
        known = {s.label for s in (*stages.values(), *statuses.values())} | set(stages) | set(statuses)
        if not known:
            return
        uses = [("open_statuses", n) for n in self.conn.open_statuses or []]
        uses += [("stage_categories", n) for n in self.conn.stage_categories]
        if self.conn.qualification is not None:
            uses += [("qualification.stages", n) for n in self.conn.qualification.stages]
        problems = []
        for key, name in uses:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
                problems.append(
                    f"{key}: '{name}' is not a stage or status of this tenant"
                    + (
                        f"; did you mean '{close[0]}'?"
                        if close
                        else f" (it has: {', '.join(sorted(s.label for s in stages.values())[:12])})"
                    )
                )
        if uses:
            self.note(
                "stage and status names",
                not problems,
                "REQUIRED and not usable: " + "; ".join(problems)
                if problems
                else f"{len(uses)} configured name(s) found in the tenant",
            )

    def note(self, name: str, available: bool, detail: str = "") -> None:
        self.capabilities[name] = Capability(name, available, detail)

    def optional(
        self,
        name: str,
        call: Callable[[], T],
        fallback: T,
        *,
        fallback_text: str,
        refusals: tuple[int, ...] = OPTIONAL_REFUSALS,
    ) -> T:
        """Run a read that only enriches or meters the sync. Refused (403/404 by default): a warning in the
        run's metadata and `sync_runs.warnings`, and `fallback` instead; never a failed run."""
        try:
            value = call()
        except CrmError as err:
            # a spent quota (Salesforce answers it with a 403 too) stops the run; it is not a missing right
            if err.status not in refusals or isinstance(err, QuotaExhausted):
                raise
            message = f"{name}: HTTP {err.status}, not readable by this API user; {fallback_text}"
            self.stats.warn(message)
            self.note(name, False, f"HTTP {err.status}; {fallback_text}")
            return fallback
        self.note(name, True, "readable")
        return value

    def stages(self) -> dict[str, StageInfo]:
        if self._stages is None:  # read per record: the lock only until the dictionary is read
            with self._once:
                if self._stages is None:
                    self.prepare()
                    self._stages = {s.key: s for s in self.fetch_stages()}
        return self._stages

    def statuses(self) -> dict[str, StageInfo]:
        if self._statuses is None:
            with self._once:
                if self._statuses is None:
                    self.prepare()
                    self._statuses = {s.key: s for s in self.fetch_statuses()}
        return self._statuses

    def stage_name(self, stage_id: Any) -> str | None:
        """The stage's name for a stage id (the id itself when the tenant's dictionary does not know it)."""
        if stage_id is None or stage_id == "":
            return None
        info = self.stages().get(str(stage_id))
        return info.label if info else str(stage_id)

    def resolve_status(self, stage: str | None, crm_status: str | None, flags: Status) -> Status:
        """open / won / lost of one record, one rule for all five CRMs:
        1. the connection's `stage_categories`, by stage name (or CRM status label): seed 003 counts a won
           *stage* as won while the CRM's status still says active;
        2. the connection's `open_statuses` (seed 000), by CRM status label or stage name: listed -> open,
           otherwise closed, won when the CRM's flags say won;
        3. the CRM's own flags (`flags`, computed by the connector from the stage / status dictionaries or
           the record's IsClosed / IsWon / statecode)."""
        categories = self.conn.stage_categories
        for name in (stage, crm_status):
            if name is not None and name in categories:
                return categories[name]
        if self.conn.open_statuses is not None:
            names = {n for n in (stage, crm_status) if n is not None}
            if names & set(self.conn.open_statuses):
                return "open"
            return "won" if flags == "won" else "lost"
        return flags

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

    def field(self, canonical: str, default: str | None = None) -> str | None:
        """The CRM field a canonical field comes from: the connection's override, else the CRM's own (`default`,
        else the connector's field map)."""
        return self.conn.fields.get(canonical) or default or self.field_map.native(canonical, {})

    def post_filter(self, record: dict[str, Any], getter: Callable[[dict[str, Any], str], Any]) -> bool:
        """Apply the connection's filters to a fetched record (CRMs without server-side filtering)."""
        return all(matches(f, getter(record, f.field)) for f in self.conn.filters)

    def opportunity(self, source_id: str, raw: dict[str, Any], **values: Any) -> Opportunity:
        if source_id is None or str(source_id).strip() == "":
            raise KeyError("id")
        if self.conn.extra_fields and "extra_fields" not in values:
            values["extra_fields"] = self.extra_values(raw)
        return Opportunity(connection=self.conn.name, crm=self.crm, source_id=str(source_id), raw=raw, **values)

    def extra_values(self, raw: dict[str, Any]) -> str | None:
        """The connection's `extra_fields:` read from the native record as the CRM sent them (read_value: the
        same path, property or custom field a `fields:` override reads), as JSON text; typed in dbt."""
        return extra_fields_json({name: self.read_value(raw, x.field) for name, x in self.conn.extra_fields.items()})

    # -- mapping: enrich a page, then map each record (pure) ------------------------------------------------------

    def enrich(self, records: list[dict[str, Any]]) -> Any:
        """The I/O a page needs before it is mapped, done once for the page and batched (lookups, forecasts,
        associations; the dictionaries `_map` reads). Returns what `_map` takes besides the record (None:
        nothing); run caches may be filled too. Never mutates `records`."""
        return None

    def _map(self, record: dict[str, Any], enriched: Any = None) -> Opportunity:
        """One native record as an `Opportunity`: no I/O, no change to `record` (what `enrich` returned for
        its page is `enriched`). A value that cannot be read raises: `map_records` quarantines the record."""
        raise NotImplementedError

    def map_page(self, records: list[dict[str, Any]]) -> Page:
        """A page of native records, enriched then mapped record by record (see `map_records`)."""
        return self.map_records(records, self._map, self.enrich(records))

    def map_pages(self, pages: Iterable[list[dict[str, Any]]]) -> Iterator[Page]:
        """`map_page` of each page, the next page's `enrich` (its lookups' requests) running while this one is
        mapped and staged (parallel.one_ahead): where enrich does I/O, its latency no longer adds to the
        consumer's work page after page. `enrich` still runs one page at a time and in order."""
        for records, enriched in one_ahead(self.enrich, pages):
            yield self.map_records(records, self._map, enriched)

    @classmethod
    def read_value(cls, record: dict[str, Any], native: str) -> Any:
        """A native field's value as the CRM sent it (a dotted path, a property, a custom field ...): what the
        field map reads and what a filter on the field compares (`filter_value`)."""
        return record.get(native)

    def read_text(self, record: dict[str, Any], native: str) -> str | None:
        """A native field's value as users see it (a picklist's label, a lookup's name)."""
        return clean_text(self.read_value(record, native))

    def read_id(self, value: Any) -> str | None:
        """A CRM user id read from a record (created_by_crm_id), as the users list keys it."""
        return as_id(value)

    def mapped_fields(self, record: dict[str, Any], **derived: Callable[[], Any]) -> dict[str, Any]:
        """The canonical values of `record` (fields.read_fields): each field from where the field map or the
        connection's override says, a field the map derives from `derived` (the connector's derivation from
        what `enrich` read), unless overridden."""
        return self._field_reader(record, derived)

    @functools.cached_property
    def _field_reader(self) -> FieldReader:
        """The field map and this connection's overrides resolved once, with this connector's getters (the
        connection's config is frozen: what it names does not change during a run)."""
        return FieldReader(
            self.field_map, self.conn.fields, value=self.read_value, text=self.read_text, ident=self.read_id
        )

    # -- validation of what a CRM returns ------------------------------------------------------------------------

    def tally(self, open_set: bool, since: datetime | None, ids: Iterable[Any], crm_count: int | None = None) -> None:
        """Count what a full read of a set received (call per page, before filtering in Python); `crm_count`
        when the CRM reports the set's size on the way (SOQL totalSize, HubSpot total, @odata.count)."""
        if since is not None:
            return
        t = self.tallies.setdefault(open_set, SetTally())
        if crm_count is not None and t.crm_count is None:
            t.crm_count = crm_count
        t.add(ids)

    def map_records(self, records: Iterable[dict[str, Any]], mapper: Callable[..., Opportunity], *args: Any) -> Page:
        """Map a page, record by record: a record whose value cannot be read (an unparsable date, a missing
        key) or that fails validation (negative amount, created ahead of the CRM's clock, a lone surrogate)
        is quarantined with its field and reason, and the rest of the page goes on. Errors of the CRM
        (CrmError) still fail the run."""
        clock = to_utc(self.stats.server_time) if self.stats.server_time else None
        page = Page()
        r: Any = None
        for r in records:
            page.received += 1
            try:
                opp = mapper(r, *args)
            except CrmError:
                raise
            except (KeyError, ValueError, TypeError, OverflowError, IndexError, AttributeError) as err:
                self.quarantine([mapping_failure(self.crm, self._id_of(r), r, err)])
                continue
            problems = record_problems(opp, clock)
            if problems:
                self.quarantine(problems)
                continue
            page.append(opp)
        if page.received and self.resumable_full_reads:
            page.position = getattr(records, "position", None) or self.resume_key(r)
        return page

    def _id_of(self, record: Any) -> str | None:
        value = record.get(self.id_field) if isinstance(record, dict) else None
        return None if value is None else str(value)

    def quarantine(self, entries: list[Quarantined]) -> None:
        with self._quarantine_lock:  # a page read ahead is mapped in another thread than the one draining
            self.quarantined.extend(entries)

    def drain_quarantine(self) -> list[Quarantined]:
        with self._quarantine_lock:
            out, self.quarantined = self.quarantined, []
        return out


def matches(f: RecordFilter, actual: Any, *, ignore_case: bool = False) -> bool:
    """Evaluate one filter in Python with the CRM's comparison semantics (numbers as numbers, dates as
    date-times, else text; text case-folded on both sides where the CRM ignores case)."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        num = parse_float(v)
        if num is not None and not isinstance(v, (datetime,)):
            return num
        if isinstance(v, date) and not isinstance(v, datetime):  # YAML reads 2026-01-31 as a date
            return datetime.combine(v, datetime.min.time())
        dt = _maybe_datetime(v)
        if dt is not None:
            return dt
        return str(v).casefold() if ignore_case else str(v)

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
