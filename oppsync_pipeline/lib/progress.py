"""A sync's progress, page by page: what it has read so far, how fast, at what cost in requests.

The extract (sync.py) reports each page it staged to a plain callable (the Dagster asset passes one that
writes the run log at INFO) and to the `oppsync_pipeline.progress` logger, which the CLI's console listens
to. No Dagster here: the same events serve the run log, the terminal and a test.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

LOGGER_NAME = "oppsync_pipeline.progress"
DONE = "done"
log = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class PageProgress:
    """One page staged by a connection's extract, with the run's totals so far."""

    connection: str
    crm: str
    phase: str  # open set | not-open set | changes during the run | read by id | done (DONE: the read ended)
    page: int  # 1-based, within the phase
    records: int  # on this page
    total_records: int  # staged by the run so far, every phase
    total_pages: int
    requests: int  # API requests sent so far (tokens, discovery and enrichment included)
    seconds: float  # since the extract started
    expected: int | None = None  # the CRM's own count of the phase's set, when it gave one

    @property
    def rate(self) -> float:
        """Records staged per second since the extract started."""
        return self.total_records / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.phase == DONE:
            return (
                f"{self.connection}: read {_n(self.total_records, 'record')} in {_n(self.total_pages, 'page')}, "
                f"{_per_second(self.rate)} records/s, {self.requests:,} requests, {self.seconds:.1f}s"
            )
        of = f" of {self.expected:,}" if self.expected is not None else ""
        return (
            f"{self.connection}: {self.phase} page {self.page} ({_n(self.records, 'record')}{of}); "
            f"{_n(self.total_records, 'record')} in {_n(self.total_pages, 'page')}, {_per_second(self.rate)} records/s, "
            f"{self.requests:,} requests, {self.seconds:.1f}s"
        )


ProgressCallback = Callable[[PageProgress], None]


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _per_second(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"


class ProgressTracker:
    """Counts one extract's pages and reports each: to `callback` (if any) and to the progress logger."""

    def __init__(
        self,
        connection: str,
        crm: str,
        callback: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.connection, self.crm, self.callback, self.clock = connection, crm, callback, clock
        self.started = clock()
        self.total_records = self.total_pages = 0
        self._pages: dict[str, int] = {}

    def page(self, phase: str, records: int, requests: int, expected: int | None = None) -> PageProgress:
        self._pages[phase] = self._pages.get(phase, 0) + 1
        self.total_records += records
        self.total_pages += 1
        return self._report(phase, self._pages[phase], records, requests, expected)

    def done(self, requests: int) -> PageProgress:
        """The read ended (every set, the deletes): its totals, reported even when no page had a record."""
        return self._report(DONE, 0, 0, requests, None)

    def _report(self, phase: str, page: int, records: int, requests: int, expected: int | None) -> PageProgress:
        event = PageProgress(
            self.connection,
            self.crm,
            phase,
            page,
            records,
            self.total_records,
            self.total_pages,
            requests,
            self.clock() - self.started,
            expected,
        )
        if self.callback is not None:
            self.callback(event)
        # `progress` lets a handler (the CLI's console) read the event itself rather than parse the line
        log.info(event.line(), extra={"progress": event})
        return event


# -- the terminal ------------------------------------------------------------------------------------------------


class ConsoleProgress(logging.Handler):
    """Shows the progress events of the syncs this process runs on the terminal. On a TTY: a live line per
    connection (rich), pages, records, rate and time. Elsewhere (CI, pipes, files): plain lines, at most one per
    connection every `every` seconds while it syncs, and its last state when it ends, so that an incremental run
    prints one line per connection and a long full sync a heartbeat."""

    def __init__(self, stream, *, tty: bool | None = None, every: float = 5.0, clock=time.monotonic):
        super().__init__(logging.INFO)
        self.stream, self.every, self.clock = stream, every, clock
        self.tty = stream.isatty() if tty is None else tty
        self._last: dict[str, PageProgress] = {}
        self._printed: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._pending: set[str] = set()
        self._bar = self._tasks = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(file=stream),
                # the Dagster, dbt and GX output of the same process goes to the log file, not above the bars
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._tasks = {}
            self._bar.start()

    def start(self, connection: str) -> None:
        self._started[connection] = self.clock()
        if self._bar is not None:
            self._tasks[connection] = self._bar.add_task(connection, total=None, detail="connecting")

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "progress", None)
        if isinstance(event, PageProgress):
            self.update(event)

    def update(self, event: PageProgress) -> None:
        name = event.connection
        self._last[name] = event
        if self._bar is not None:
            task = self._tasks.get(name)
            if task is None:
                task = self._tasks[name] = self._bar.add_task(name, total=None)
            self._bar.update(task, completed=event.total_records, detail=_short(event))
            return
        since = self._printed.get(name) or self._started.get(name) or self.clock() - event.seconds
        if self.clock() - since >= self.every:
            self._print(name)
        else:
            self._pending.add(name)

    def finish(self, connection: str) -> None:
        """The connection's sync ended: its last state stays on the screen."""
        if self._bar is not None:
            task = self._tasks.get(connection)
            if task is not None:
                event = self._last.get(connection)
                total = event.total_records if event else 0
                self._bar.update(
                    task, total=total or 1, completed=total or 1, detail=_short(event) if event else "done"
                )
            return
        if connection in self._pending:
            self._print(connection)

    def note(self, text: str) -> None:
        """A line of the run's own (the mart build starting, say)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        super().close()

    def _print(self, name: str) -> None:
        self._pending.discard(name)
        self._printed[name] = self.clock()
        print(self._last[name].line(), file=self.stream, flush=True)


def _short(event: PageProgress) -> str:
    if event.phase == DONE:
        return f"read  {event.total_records:,} records  {event.total_pages} pages  {event.requests} req"
    return (
        f"{event.phase} p{event.page}  {event.total_records:,} records  {event.total_pages} pages  "
        f"{_per_second(event.rate)}/s  {event.requests} req"
    )


@contextmanager
def console(verbose: bool, log_dir: Path, command: str, keep: int = 20) -> Iterator[tuple[TextIO, Path | None]]:
    """The terminal for a run's own output, everything else in a log file.

    Not verbose: this process's stdout and stderr, at the file-descriptor level so that dbt's subprocess, GX's
    progress bars, Python warnings and Dagster's loggers are caught alike, go to a new file in `log_dir` (the
    newest `keep` are kept); yields (a stream on the terminal, the file). Verbose: nothing moves; yields
    (stdout, None). Either way the progress of the syncs is shown on the terminal (ConsoleProgress)."""
    progress_log = logging.getLogger(LOGGER_NAME)
    if verbose:
        progress_log.setLevel(logging.INFO)
        progress_log.propagate = False  # the console shows it; the root handler would print it a second time
        yield sys.stdout, None
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(log_dir.glob(f"oppsync-{command}-*.log"))[: -keep + 1 or None]:
        old.unlink(missing_ok=True)
    path = (log_dir / f"oppsync-{command}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}.log").resolve()
    progress_log.setLevel(logging.INFO)  # into the log file too, through the root handler
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        with open(path, "a", encoding="utf-8") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            try:
                yield terminal, path
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        terminal.close()
        os.close(saved[0])
        os.close(saved[1])
