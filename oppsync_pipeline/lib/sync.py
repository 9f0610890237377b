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
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig, OppsyncConfig, resolve_credentials
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.base import CrmConnector, Page, SetTally
from oppsync_pipeline.lib.crm.http import CrmError, QuotaBudget, QuotaExhausted
from oppsync_pipeline.lib.crm.parallel import begun, chain_ahead, in_background
from oppsync_pipeline.lib.memory import fewer_gc_passes, release_arrow_memory
from oppsync_pipeline.lib.progress import ProgressCallback, ProgressTracker
from oppsync_pipeline.lib.reconcile import DeleteGuardRefused, ReconcileResult, reconcile
from oppsync_pipeline.lib.record import MAPPING_VERSION, to_utc
from oppsync_pipeline.lib.resume import ResumeState, why_not_resumed
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


@fewer_gc_passes()  # the pages' dicts are no cycles: the collector's default pace costs ~12% of a read (lib/memory.py)
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
    if mode not in ("auto", "full", "incremental"):
        raise ValueError(f"mode must be full, incremental or auto, not {mode!r}")
    with transaction(engine) as tx:  # one connect for the run's first reads
        ensure_schema(tx)
        state = store.get_state(tx, conn.name)
        synced_before, mapping_version = store.state_mapping_version(tx, conn.name)
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
    full_read: ResumeState | None = None  # a full read's progress: kept when it pauses or fails (lib/resume.py)
    staging: store.StagingWriter | None = None
    staging_page = False  # a page is being staged: a failure now may leave it half written
    try:
        resume = _paused_read(engine, conn, fingerprint, mode)
        if resume is not None:
            mode, since = "full", None
            out.mode, out.since = mode, since
        connector = connector or build_connector(cfg, conn)
        connector.resume_token = state.resume_token
        # the dictionaries earlier runs read (an incremental run reads only the ids they do not hold); a full
        # sync starts empty and re-reads them all: the periodic refresh (lib/crm/lookups.py)
        read_at = resume.state.started_at if resume else started
        connector.lookups = store.open_lookups(engine, conn.name, read_at, full=mode == "full", resumed=bool(resume))
        secrets = connector.scrubber
        connector.prepare()
        if scope_changed:
            connector.stats.warn(
                "scope changed since the last sync (" + "; ".join(scope_changed) + "): read in "
                "full; records that no longer match left the scope, none were deleted for it"
            )
        trigger = StageTrigger.resolve(conn, connector.stages())
        server_now = to_utc(connector.stats.server_time) if connector.stats.server_time else started
        if resume:
            full_read = resume.state
            _restore_tallies(full_read, connector)
        elif mode == "full":
            full_read = ResumeState(started, server_now)
        # what the sets' reads staged so far: a full read's progress (kept when it pauses), else the run's own
        so_far = full_read or ResumeState(started, server_now)

        def changes_since() -> datetime:
            # the read's start on the server's clock (the first run's, when the read paused and goes on)
            return (so_far.server_start or started) - timedelta(minutes=conn.overlap_minutes)

        def set_read(open_set: bool, read_since: datetime | None) -> Callable[[], Iterator[Page]]:
            """A counted read of a set: where a paused full read left it (lib/resume.py), else whole."""
            if resume and so_far.open_set is None or (so_far.open_set is False and open_set):
                return lambda: iter(())  # read whole before the pause
            if so_far.open_set == open_set and so_far.after is not None:
                return lambda: connector.resume_read(open_set, so_far.after)
            return lambda: connector.opportunities(open_set=open_set, since=read_since)

        def set_pages(read_since: datetime | None) -> Iterator[tuple[int, Page]]:
            """The pages of the open set then the not-open set, as (read, page): read 0 the open set, 1 the
            not-open set; each set's next page read while this one is staged, the not-open set begun beside the
            open set where the connector allows it (parallel.chain_ahead).

            A full sync then reads both sets again (reads 2 and 3): a record that moved between the sets while
            they were read (reopened after the open set was read, say) is in neither, and would be inferred
            deleted. It was modified during the run: both sets are read once more for changes since the run
            started on the server's clock (reconcile keeps each record's latest version), begun only once the
            first read has sent its last request (in turn), while its last page is staged."""
            reads = [set_read(True, read_since), set_read(False, read_since)]
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
            resumes=resume.extract_id if resume else None,
        )
        staging = store.StagingWriter(engine, run_id)
        # Internal users and their links come from configuration; attribution is computed at read time, so
        # a link added later credits past opportunities too. One transaction once the CRM's users are read
        # (never held while waiting on the CRM).
        crm_users = users()
        with transaction(engine) as tx:
            store.save_directory(tx, cfg, started)
            store.save_stages(tx, conn.name, connector.stages().values(), dict(conn.stage_categories))
            store.save_users(tx, conn.name, crm_users, started)

        def stage(page: Page, open_set: bool, phase: str, counted: bool) -> None:
            nonlocal staging_page
            staging_page = True
            set_aside(connector, engine, run_id, conn.name)
            staging.add(page, open_set, so_far.seq, [verdict(o, trigger) for o in page] if trigger else None)
            so_far.seq += len(page)
            tally = connector.tallies.get(open_set) if counted else None
            tracker.page(phase, len(page), connector.stats.requests, tally.crm_count if tally else None)
            if counted:
                name = "open" if open_set else "closed"
                so_far.counts[name] += len(page)
                # what the CRM delivered and where the read stands, as staged (pages read ahead are not; a
                # plain list is a page cut from a mapped one, in an incremental read)
                if so_far.open_set != open_set:
                    so_far.open_set, so_far.after = open_set, None
                so_far.received[name] = so_far.received.get(name, 0) + getattr(page, "received", len(page))
                so_far.after = getattr(page, "position", None) or so_far.after
            latest = max((o.modified_at for o in page if o.modified_at is not None), default=None)
            if latest is not None and (so_far.max_modified is None or latest > so_far.max_modified):
                so_far.max_modified = latest
            staging_page = False

        # both sets, then (a full sync) both sets again for the changes during the run; closed however the loop
        # ends: a read that fails or pauses may otherwise be left suspended in a reference cycle with its error,
        # its read threads waiting for a garbage collection
        with closing(pages):
            for i, page in pages:
                open_set, counted = i % 2 == 0, i < 2
                if not counted:
                    so_far.open_set = None  # both sets read whole: what remains is the run's tail
                # the second read of a full sync (changes made while it ran) is its own phase in the progress
                phase = ("open set" if open_set else "not-open set") if counted else "changes during the run"
                stage(page, open_set, phase, counted)
        so_far.open_set = None
        if mode == "full":
            staging.flush()
            so_far.seq = _read_missing_by_id(
                engine, connector, staging, run_id, conn.name, trigger, so_far.seq, out, tracker
            )
        staging.flush()
        release_arrow_memory()  # the staged batches' pages, kept by Arrow's pool, before DuckDB's turn
        set_aside(connector, engine, run_id, conn.name)  # a set's last page may have yielded nothing
        quarantined = _check_quarantine(engine, conn, run_id, connector)
        out.stats.update(_check_completeness(engine, connector, run_id, mode, quarantined))
        counts = so_far.counts
        if state.cursor is not None or connector.delete_feed_needs_baseline:
            for page in connector.deleted(since if since else state.cursor):
                counts["deleted"] += store.stage_deletes(engine, run_id, conn.name, page)
        tracker.done(connector.stats.requests)
        if resume:
            connector.stats.warn(
                f"full sync read in {so_far.runs + 1} runs (it paused at its share of the CRM's quota): "
                f"{so_far.requests + connector.stats.requests} API requests in all, since {so_far.started_at}"
            )
        max_modified = so_far.max_modified
        server_start = so_far.server_start or started
        out.new_cursor = min(max_modified, server_start) if max_modified else state.cursor
        connector.lookups.save()
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
        out.stats = request_stats(connector, secrets)
        # a full read the connector can resume goes on in the next run from where it stands (lib/resume.py)
        kept = None if staging_page else _keep_progress(full_read, staging, connector, engine, run_id, conn.name)
        if kept is not None:
            out.status, out.counts = ExtractStatus.PAUSED, dict(full_read.counts) if full_read else {}
            out.error = scrub(f"{err}; the full sync paused and the connection's next run reads on", secrets)
        else:
            out.status, out.error = ExtractStatus.SKIPPED, scrub(str(err), secrets)
        if staging is not None:
            staging.abandon()  # a batch still being written lands before the extract closes
        close_extract(engine, out, resume_state=kept)
    except Exception as err:  # noqa: BLE001 - any failure is recorded (scrubbed) in sync_runs, then re-raised
        out.status, out.error = ExtractStatus.FAILED, scrub(f"{type(err).__name__}: {err}", secrets)
        out.stats = request_stats(connector, secrets)
        # What a resumable full read staged before the CRM failed it is kept for the next run (or the step's
        # retry): not when the warehouse failed, or a page was being staged (it may be half written).
        kept = None
        if not staging_page and not isinstance(err, DBAPIError):
            kept = _keep_progress(full_read, staging, connector, engine, run_id, conn.name, quiet=True)
        if kept is not None:
            out.error += "; what the full read staged is kept: the connection's next run reads on"
        if staging is not None:
            staging.abandon()
        close_extract(engine, out, resume_state=kept)
        failure = ExtractFailed(out.error, permanent=is_permanent(err, str(engine.url)))
    finally:
        out.seconds = time.monotonic() - t0
    if failure is not None:
        # Raised outside the handler, so that not even the exception's context holds the unscrubbed original.
        raise failure
    return out


@dataclass
class PausedRead:
    extract_id: str
    state: ResumeState


def _paused_read(engine: Engine, conn: ConnectionConfig, fingerprint: str | None, mode: str) -> PausedRead | None:
    """The connection's paused full read, when this run can read it on (lib/resume.py); any run of the
    connection does: a new extract would discard what it staged."""
    paused = store.paused_extract(engine, conn.name)
    if paused is None:
        return None
    why = why_not_resumed(paused, fingerprint)
    if why:
        # begin_extract supersedes it and drops what it staged
        log.warning("%s: the full sync paused in extract %s starts over: %s", conn.name, paused["extract_id"], why)
        return None
    state = ResumeState.from_json(paused["resume_state"])
    log.warning(
        "%s: reading on the full sync paused in extract %s (%s staged, since %s)%s",
        conn.name,
        paused["extract_id"],
        state.seq,
        state.started_at,
        f"; the {mode} run asked for waits until it completes" if mode == "incremental" else "",
    )
    return PausedRead(paused["extract_id"], state)


def _restore_tallies(state: ResumeState, connector: CrmConnector) -> None:
    """What the earlier runs received of each set, for the completeness check; the set being read is counted
    again by its resumed read (the CRM's count now)."""
    for name, received in state.received.items():
        open_set = name == "open"
        crm_count = None if open_set == state.open_set else state.crm_counts.get(name)
        connector.tallies[open_set] = SetTally(crm_count=crm_count, received=received)


def _keep_progress(
    state: ResumeState | None,
    staging: store.StagingWriter | None,
    connector: CrmConnector | None,
    engine: Engine,
    run_id: str,
    connection: str,
    *,
    quiet: bool = False,
) -> str | None:
    """Store what a resumable full read staged so far, for the next run: its `resume_state` (None: nothing to
    keep). `quiet`: the run is failing already, and a failure to keep it only means the next run starts over."""
    if state is None or staging is None or connector is None or not connector.resumable_full_reads:
        return None
    try:
        staging.flush()
        set_aside(connector, engine, run_id, connection)
        connector.lookups.flush()
    except Exception:  # noqa: BLE001 - the original failure is the one reported
        if not quiet:
            raise
        log.warning("%s: what the full read staged could not be kept; the next run starts over", connection)
        return None
    return _paused_state(state, connector)


def _paused_state(state: ResumeState, connector: CrmConnector) -> str:
    """Where the read stands now that it pauses, as stored (its staging was flushed)."""
    for open_set, tally in connector.tallies.items():
        state.crm_counts["open" if open_set else "closed"] = tally.crm_count
    state.runs += 1
    state.requests += connector.stats.requests
    return state.to_json()


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


def close_extract(engine: Engine, out: ExtractOutcome, resume_state: str | None = None) -> None:
    """End an extract that will not be reconciled (failed, skipped for quota, refused by a check, paused): record
    it, drop its staging, record the sync run and release the connection's lock. The bookmark does not move.
    With a `resume_state` the extract is paused whatever the run's status: its staging stays for the next run."""
    finished = utcnow()
    store.finish_extract(
        engine,
        out.extract_id,
        status=ExtractStatus.PAUSED if resume_state is not None else out.status,
        finished_at=finished,
        counts=out.counts,
        stats=out.stats,
        error=out.error,
        resume_state=resume_state,
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
