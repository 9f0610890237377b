"""One sync of one connection, in two steps that Dagster runs as two assets (with quality checks between):

  extract:   lock the connection, read the open and the not-open sets (and the delete feed) page by page
             into staging; on any failure nothing outside staging changes, and staging is discarded.
  reconcile: apply the completed extract in one transaction (lib/reconcile), advance the bookmark, unlock.

The bookmark never passes the start of the run (server time), incremental reads start an overlap window
before it, and duplicates are removed in reconcile: late-committed and tied rows are never missed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig, OppsyncConfig, resolve_credentials
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.base import CrmConnector, Page
from oppsync_pipeline.lib.crm.http import CrmError, QuotaBudget, QuotaExhausted
from oppsync_pipeline.lib.crm.parallel import begun, chain_ahead, in_background
from oppsync_pipeline.lib.memory import release_arrow_memory
from oppsync_pipeline.lib.progress import ProgressCallback, ProgressTracker
from oppsync_pipeline.lib.reconcile import DeleteGuardRefused, ReconcileResult, reconcile
from oppsync_pipeline.lib.record import MAPPING_VERSION, to_utc
from oppsync_pipeline.lib.scope import StageTrigger, scope_changes, scope_fingerprint, scope_text, verdict
from oppsync_pipeline.lib.scrub import Scrubber, redact, scrubbed_logger
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, transaction
from oppsync_pipeline.lib.warehouse.errors import permanent_problem
from oppsync_pipeline.lib.warehouse.runs import ExtractStatus, RunStats, RunStatus, SyncRun, record_run

log = scrubbed_logger(__name__)
LOCK_TTL = timedelta(hours=2)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def scrub(message: str, secrets: Mapping[str, str] | Scrubber | None = None) -> str:
    """Remove credentials from a message before it reaches a log, the warehouse or Dagster: those of `secrets`
    (a connection's Scrubber, or its credential values) in every form, its identifiers whole, and the secrets
    of every connection alive in this process (the tokens their Auth sent included)."""
    if secrets is not None:
        message = (secrets if isinstance(secrets, Scrubber) else Scrubber(secrets))(message)
    return redact(message)


def scrubbed_stats(stats: RunStats, secrets: Scrubber | None) -> RunStats:
    """A run's statistics with its warnings (texts of refused optional reads) scrubbed of credentials."""
    return replace(stats, warnings=[scrub(w, secrets) for w in stats.warnings])


def request_stats(connector: CrmConnector | None, secrets: Scrubber | None) -> RunStats:
    """What the run cost the CRM so far (nothing known without a connector)."""
    return (
        scrubbed_stats(RunStats().with_requests(connector.stats.as_metadata()), secrets)
        if connector
        else RunStats.unknown()
    )


@dataclass
class ExtractOutcome:
    extract_id: str
    connection: str
    crm: str
    mode: str
    status: ExtractStatus | str  # complete | skipped | failed (refused: by a check)
    started_at: datetime
    since: datetime | None = None
    new_cursor: datetime | None = None
    counts: dict[str, int] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    error: str | None = None
    seconds: float = 0.0
    scope_fingerprint: str | None = None


@dataclass
class SyncSummary:
    extract: ExtractOutcome
    result: ReconcileResult | None


def build_connector(
    cfg: OppsyncConfig,
    conn: ConnectionConfig,
    *,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    budget: QuotaBudget | None = None,
) -> CrmConnector:
    credentials = resolve_credentials(cfg, conn)
    return connector_class(conn.crm)(conn, credentials, session=session, sleep=sleep, budget=budget)


def run_extract(
    cfg: OppsyncConfig,
    conn: ConnectionConfig,
    engine: Engine,
    *,
    run_id: str,
    mode: str = "auto",
    connector: CrmConnector | None = None,
    now: datetime | None = None,
    progress: ProgressCallback | None = None,
) -> ExtractOutcome:
    """`progress`: called with each page staged (lib/progress.py; the events also go to its logger)."""
    t0 = time.monotonic()
    tracker = ProgressTracker(conn.name, conn.crm, progress)
    started = now or utcnow()
    ensure_schema(engine)
    state = store.get_state(engine, conn.name)
    if mode not in ("auto", "full", "incremental"):
        raise ValueError(f"mode must be full, incremental or auto, not {mode!r}")
    synced_before, mapping_version = store.state_mapping_version(engine, conn.name)
    remap = synced_before and (mapping_version or 0) < MAPPING_VERSION
    # The scope this run reads under; a different one than the last sync's is read in full (records that
    # no longer match leave the scope, ones that match now enter it) and announced in the run's warnings.
    fingerprint = scope_fingerprint(conn)
    scope_changed = [] if state.scope_fingerprint in (None, fingerprint) else scope_changes(state.scope, conn)
    if mode == "auto":
        mode = "incremental" if state.cursor is not None else "full"
    if remap and mode == "incremental":
        # The warehouse holds values mapped by an older connector: one full read rewrites them all (and the
        # reconcile records no update events for the remapping).
        log.warning(
            "%s: last synced under mapping version %s, now %s: running a full re-baseline sync",
            conn.name,
            mapping_version,
            MAPPING_VERSION,
        )
        mode = "full"
    if scope_changed and mode == "incremental":
        log.warning("%s: the connection's scope changed (%s): running a full sync", conn.name, "; ".join(scope_changed))
        mode = "full"
    since = state.cursor - timedelta(minutes=conn.overlap_minutes) if (mode == "incremental" and state.cursor) else None
    out = ExtractOutcome(
        run_id, conn.name, conn.crm, mode, ExtractStatus.FAILED, started, since, scope_fingerprint=fingerprint
    )
    store.acquire_lock(engine, conn.name, run_id, started, LOCK_TTL)
    # Error texts are scrubbed before they are stored, raised to Dagster or logged, by the connector's
    # scrubber: its credentials, and the tokens its Auth sent.
    secrets: Scrubber | None = None
    failure: ExtractFailed | None = None
    try:
        connector = connector or build_connector(cfg, conn)
        connector.resume_token = state.resume_token
        # the dictionaries earlier runs read (an incremental run reads only the ids they do not hold); a full
        # sync starts empty and re-reads them all: the periodic refresh (lib/crm/lookups.py)
        if mode == "incremental":
            connector.lookups = store.load_lookups(engine, conn.name)
        secrets = connector.scrubber
        connector.prepare()
        if scope_changed:
            connector.stats.warn(
                "scope changed since the last sync (" + "; ".join(scope_changed) + "): read in "
                "full; records that no longer match left the scope, none were deleted for it"
            )
        trigger = StageTrigger.resolve(conn, connector.stages())

        def changes_since() -> datetime:
            run_start = to_utc(connector.stats.server_time) if connector.stats.server_time else started
            return run_start - timedelta(minutes=conn.overlap_minutes)

        def set_pages(read_since: datetime | None) -> Iterator[tuple[int, Page]]:
            """The pages of the open set then the not-open set, as (read, page): read 0 the open set, 1 the
            not-open set; each set's next page read while this one is staged, the not-open set begun beside the
            open set where the connector allows it (parallel.chain_ahead).

            A full sync then reads both sets again (reads 2 and 3): a record that moved between the sets while
            they were read (reopened after the open set was read, say) is in neither, and would be inferred
            deleted. It was modified during the run: both sets are read once more for changes since the run
            started on the server's clock (reconcile keeps each record's latest version), begun only once the
            first read has sent its last request (in turn), while its last page is staged."""
            reads = [lambda o=o: connector.opportunities(open_set=o, since=read_since) for o in (True, False)]
            beside = [connector.sets_side_by_side]
            if mode == "full":
                reads += [lambda o=o: connector.opportunities(open_set=o, since=changes_since()) for o in (True, False)]
                beside += [False, connector.sets_side_by_side]
            return chain_ahead(reads, side_by_side=beside)

        # the users, then the first set's first page, are read while the warehouse is written to (in one helper,
        # one after the other: mapping a page may look the users up)
        users = in_background(lambda: list(connector.users()))
        pages = begun(set_pages(since), after=users)
        store.begin_extract(
            engine,
            extract_id=run_id,
            connection=conn.name,
            crm=conn.crm,
            mode=mode,
            started_at=started,
            since=since,
            scope_fingerprint=fingerprint,
            scope=scope_text(conn),
        )
        # Internal users and their links come from configuration; attribution is computed at read time, so
        # a link added later credits past opportunities too.
        store.save_directory(engine, cfg, started)
        store.save_stages(engine, conn.name, connector.stages().values(), dict(conn.stage_categories))
        store.save_users(engine, conn.name, users(), started)
        counts = {"open": 0, "closed": 0, "deleted": 0}
        seq, max_modified = 0, None
        staging = store.StagingWriter(engine, run_id)

        def read_sets(pages: Iterator[tuple[int, Page]]) -> None:
            nonlocal seq, max_modified
            for i, page in pages:
                open_set, counted = i % 2 == 0, i < 2
                # the second read of a full sync (changes made while it ran) is its own phase in the progress
                phase = ("open set" if open_set else "not-open set") if counted else "changes during the run"
                set_aside(connector, engine, run_id, conn.name)
                staging.add(page, open_set, seq, [verdict(o, trigger) for o in page] if trigger else None)
                seq += len(page)
                tally = connector.tallies.get(open_set) if counted else None
                tracker.page(phase, len(page), connector.stats.requests, tally.crm_count if tally else None)
                if counted:
                    counts["open" if open_set else "closed"] += len(page)
                for o in page:
                    if o.modified_at is not None and (max_modified is None or o.modified_at > max_modified):
                        max_modified = o.modified_at

        read_sets(pages)  # both sets, then (a full sync) both sets again for the changes during the run
        if mode == "full":
            staging.flush()
            seq = _read_missing_by_id(engine, connector, staging, run_id, conn.name, trigger, seq, out, tracker)
        staging.flush()
        release_arrow_memory()  # the staged batches' pages, kept by Arrow's pool, before DuckDB's turn
        set_aside(connector, engine, run_id, conn.name)  # a set's last page may have yielded nothing
        quarantined = _check_quarantine(engine, conn, run_id, connector)
        out.stats.update(_check_completeness(engine, connector, run_id, mode, quarantined))
        if state.cursor is not None or connector.delete_feed_needs_baseline:
            for page in connector.deleted(since if since else state.cursor):
                counts["deleted"] += store.stage_deletes(engine, run_id, conn.name, page)
        tracker.done(connector.stats.requests)
        server_start = to_utc(connector.stats.server_time) if connector.stats.server_time else started
        out.new_cursor = min(max_modified, server_start) if max_modified else state.cursor
        store.save_lookups(engine, conn.name, connector.lookups, started)
        out.counts, out.status = counts, ExtractStatus.COMPLETE
        out.stats = scrubbed_stats(out.stats.with_requests(connector.stats.as_metadata()), secrets)
        store.finish_extract(
            engine,
            run_id,
            status=out.status,
            finished_at=utcnow(),
            new_cursor=out.new_cursor,
            counts=counts,
            stats=out.stats,
            resume_token=connector.resume_token,
        )
    except QuotaExhausted as err:
        out.status, out.error = ExtractStatus.SKIPPED, scrub(str(err), secrets)
        out.stats = request_stats(connector, secrets)
        close_extract(engine, out)
    except Exception as err:  # noqa: BLE001 - any failure is recorded (scrubbed) in sync_runs, then re-raised
        out.status, out.error = ExtractStatus.FAILED, scrub(f"{type(err).__name__}: {err}", secrets)
        out.stats = request_stats(connector, secrets)
        close_extract(engine, out)
        failure = ExtractFailed(out.error, permanent=is_permanent(err, str(engine.url)))
    finally:
        out.seconds = time.monotonic() - t0
    if failure is not None:
        # Raised outside the handler, so that not even the exception's context holds the unscrubbed original.
        raise failure
    return out


def set_aside(connector: CrmConnector, engine: Engine, run_id: str, connection: str) -> None:
    """Write the records the connector quarantined since the last call (quarantine.py)."""
    entries = connector.drain_quarantine()
    if entries:
        for q in entries:
            log.warning("%s: quarantined %s", connection, q.describe())
        store.save_quarantine(engine, run_id, connection, entries, utcnow())


class QuarantineThreshold(Exception):
    """More of a connection's records failed validation than `quarantine_max_share` allows."""


def _check_quarantine(engine: Engine, conn: ConnectionConfig, run_id: str, connector: CrmConnector) -> int:
    """Quarantined records are reported (a warning naming them) and, beyond `quarantine_max_share` of the
    connection's records, block the run: so many bad records is a broken connection, not bad data."""
    n, examples = store.quarantined(engine, run_id)
    if not n:
        return 0
    shown = "; ".join(f"{e['source_id'] or '<no id>'}.{e['field']}: {e['reason']}" for e in examples[:5])
    size = max(store.staged_count(engine, run_id) + n, store.live_count(engine, conn.name))
    if n > conn.quarantine_max_share * size:
        raise QuarantineThreshold(
            f"{n} of {size} {conn.crm} records failed validation ({n / size:.1%}), more than "
            f"quarantine_max_share={conn.quarantine_max_share:.1%}; nothing was changed. First: {shown}. "
            "See oppsync.quarantine for all; fix the records in the CRM or raise connections[].quarantine_max_share"
        )
    connector.stats.warn(f"{n} record(s) quarantined (neither synced nor deleted; oppsync.quarantine): {shown}")
    return n


def _check_completeness(
    engine: Engine, connector: CrmConnector, run_id: str, mode: str, quarantined: int
) -> dict[str, Any]:
    """A full sync infers deletes from the ids it did not read, so it must have read every record the CRM has:
    each set's distinct records received are compared with the CRM's own count (asked again when short: records
    deleted or moved during the read lower it). Short: deletes are not inferred this run, and the run says so."""
    counts: dict[bool, int | None] = {}
    received: dict[bool, int] = {}
    short = []
    for open_set, tally in connector.tallies.items() if mode == "full" else ():
        crm_count = tally.crm_count if tally.crm_count is not None else connector.count(open_set)
        if crm_count is not None and tally.received < crm_count:
            recount = connector.count(open_set)
            crm_count = recount if recount is not None else crm_count
        counts[open_set], received[open_set] = crm_count, tally.received
        if crm_count is not None and tally.received < crm_count:
            short.append(
                f"{'open' if open_set else 'not-open'} set: {tally.received} received, the CRM counts {crm_count}"
            )
    if short:
        connector.stats.warn(
            "deletes not inferred: the CRM delivered fewer records than its own count ("
            + "; ".join(short)
            + "); the next full sync infers them"
        )
    # "now" for the checks on the CRM's own clock, after the last read: a record created while a long run read
    # is not in the future, and a CRM (or sandbox) clock that differs from ours judges its own records
    latest = connector.stats.server_time_latest or connector.stats.server_time
    clock = to_utc(latest) if latest else None
    store.save_completeness(
        engine, run_id, counts=counts, received=received, inferable=not short, quarantined=quarantined, crm_clock=clock
    )
    return {
        "quarantined": quarantined,
        "deletes_inferable": not short,
        **{f"crm_count_{'open' if k else 'closed'}": v for k, v in counts.items()},
        **{f"received_{'open' if k else 'closed'}": v for k, v in received.items()},
    }


def _read_missing_by_id(
    engine: Engine,
    connector: CrmConnector,
    staging: store.StagingWriter,
    run_id: str,
    connection: str,
    trigger: StageTrigger | None,
    seq: int,
    out: ExtractOutcome,
    tracker: ProgressTracker | None = None,
) -> int:
    """A full sync's check of the ids it expected and did not read: read them by id WITHOUT the connection's
    filters. Found and matching the filters: staged as usual (they moved between the sets unseen); found
    and not matching: staged as `filtered_out` (the reconcile records left_scope, never a delete); not
    found: the CRM no longer has them, and the reconcile infers their deletion."""
    missing = store.missing_ids(engine, run_id, connection)
    found = out_of_scope = 0
    for page in connector.fetch_by_ids(missing) if missing else ():
        set_aside(connector, engine, run_id, connection)
        scopes = [verdict(o, trigger, connector.matches_filters(o)) for o in page]
        for open_set in (True, False):
            part = [(o, v) for o, v in zip(page, scopes) if (o.status == "open") == open_set]
            if part:
                staging.add([o for o, _ in part], open_set, seq, [v for _, v in part])
                seq += len(part)
        found += len(page)
        out_of_scope += sum(1 for v in scopes if v == store.SCOPE_FILTERED_OUT)
        if tracker is not None:
            tracker.page("read by id", len(page), connector.stats.requests, len(missing))
    out.stats.update(read_by_id=len(missing), found_by_id=found, out_of_scope_by_id=out_of_scope)
    return seq


class ExtractFailed(Exception):
    """The extract failed; the warehouse is unchanged and the message is free of credentials.

    `permanent`: retrying the run cannot help (a refused query, a missing permission, bad credentials,
    bad configuration): the Dagster asset fails at once instead of waiting out its retry policy."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def is_permanent(err: BaseException, warehouse_url: str | None = None) -> bool:
    """Errors classified once: in the HTTP layer (CrmError.permanent), database errors no retry fixes (a
    privilege revoked mid-run; lib/warehouse/errors.py), configuration errors and the quarantine threshold."""
    if isinstance(err, CrmError):
        return err.permanent
    if isinstance(err, DBAPIError) and warehouse_url is not None:
        return permanent_problem(err, warehouse_url) is not None
    return isinstance(err, (ConfigError, QuarantineThreshold))


def outcome_from_row(row: Mapping[str, Any], status: str | None = None) -> ExtractOutcome:
    """The outcome an extract recorded in `oppsync.extracts` (read back by the reconcile step and checks)."""
    return ExtractOutcome(
        extract_id=row["extract_id"],
        connection=row["connection"],
        crm=row["crm"],
        mode=row["mode"],
        status=status or row["status"],
        started_at=row["started_at"],
        since=row["since_cursor"],
        new_cursor=row["new_cursor"],
        counts={
            "open": row["fetched_open"] or 0,
            "closed": row["fetched_closed"] or 0,
            "deleted": row["fetched_deleted"] or 0,
        },
        stats=RunStats(
            api_requests=row["api_requests"],
            retries=row["retries"],
            seconds_waited_on_rate_limits=row["seconds_waited"],
            quota_used=row["quota_used"],
            quota_limit=row["quota_limit"],
            token_requests=row.get("token_requests"),
            warnings=(row.get("warnings") or "").splitlines(),
        ),
    )


def close_extract(engine: Engine, out: ExtractOutcome) -> None:
    """End an extract that will not be reconciled (failed, skipped for quota, refused by a check): record it,
    drop its staging, record the sync run and release the connection's lock. The bookmark does not move."""
    finished = utcnow()
    store.finish_extract(
        engine,
        out.extract_id,
        status=out.status,
        finished_at=finished,
        counts=out.counts,
        stats=out.stats,
        error=out.error,
    )
    with transaction(engine) as c:
        record_run(
            c,
            SyncRun(
                out.extract_id,
                out.connection,
                out.crm,
                out.mode,
                out.started_at,
                finished,
                out.status,
                fetched=sum(out.counts.values()),
                stats=out.stats,
                error=out.error,
            ),
        )
    store.release_lock(engine, out.connection, out.extract_id)


def run_reconcile(
    conn: ConnectionConfig, engine: Engine, out: ExtractOutcome, now: datetime | None = None
) -> ReconcileResult:
    t0 = time.monotonic()
    # Take (or re-take) the lease for the extract's run: a retried reconcile after a crash or a failure
    # takes over from the dead holder, and still refuses while another live run holds the connection.
    store.acquire_lock(engine, conn.name, out.extract_id, utcnow(), LOCK_TTL)
    try:
        result = reconcile(
            engine,
            extract_id=out.extract_id,
            connection=conn.name,
            crm=conn.crm,
            mode=out.mode,
            run_id=out.extract_id,
            observed_at=out.started_at,
            recorded_at=now or utcnow(),
            max_delete_share=conn.max_delete_share,
            new_cursor=out.new_cursor,
            started_at=out.started_at,
            stats=out.stats,
        )
    except Exception as err:
        status = RunStatus.REFUSED if isinstance(err, DeleteGuardRefused) else RunStatus.FAILED
        with transaction(engine) as c:
            record_run(
                c,
                SyncRun(
                    out.extract_id,
                    out.connection,
                    out.crm,
                    out.mode,
                    out.started_at,
                    utcnow(),
                    status,
                    fetched=sum(out.counts.values()),
                    stats=out.stats,
                    error=scrub(f"{type(err).__name__}: {err}"),
                ),
            )
        store.release_lock(engine, conn.name, out.extract_id)
        raise
    store.release_lock(engine, conn.name, out.extract_id)
    out.seconds += time.monotonic() - t0
    return result


def sync_connection(
    cfg: OppsyncConfig,
    conn: ConnectionConfig,
    engine: Engine,
    *,
    run_id: str,
    mode: str = "auto",
    connector: CrmConnector | None = None,
    progress: ProgressCallback | None = None,
) -> SyncSummary:
    """Extract then reconcile, without quality checks (Dagster runs the checks between the two)."""
    out = run_extract(cfg, conn, engine, run_id=run_id, mode=mode, connector=connector, progress=progress)
    if out.status != ExtractStatus.COMPLETE:
        return SyncSummary(out, None)
    return SyncSummary(out, run_reconcile(conn, engine, out))
