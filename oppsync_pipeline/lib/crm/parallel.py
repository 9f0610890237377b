"""Parallel reads, written once for the five connectors: a bounded thread pool.

A full read is parallel only where the API allows it (docs/crm-api-notes.md): one server cursor (Salesforce
`nextRecordsUrl`, Dataverse `@odata.nextLink`, Autotask `nextPageUrl`, HubSpot search `after`) is read page after
page; what runs side by side is several cursors over disjoint slices of the key or date space (`streams`), or
independent requests (`ordered_map`: ConnectWise's forecast per opportunity), or a page's lookups while the
previous page is mapped (`one_ahead`), or the next read's first page while this read is consumed (`chain_ahead`:
the sync's open then not-open set), or one request (`in_background`) or a read's first page (`begun`) while the
caller does other work. `degree`
is the most requests in
flight at once, the connection's `options.parallel_reads` (default: the CRM's documented limit; 1 is the plain
sequential read, in the caller's thread).

Every request still goes through the connector's ApiClient (its retries, Retry-After, rate pacing, quota budget
and statistics, which are thread-safe), over the client's one Session whose connection pool is sized for
`degree` (`ApiClient.allow_concurrency`). Results come in input order; a split read's pages come as its slices
deliver them (each slice in its own order): the same records as the sequential read, not in its order. A slice
or request that fails fails the whole read, raising its error in the consumer: never a short read that the full
sync would take for deletes. Workers stop at the next page when the consumer stops or fails.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Records the slices of one read may hold ahead of the consumer, at most: a slice hands its page over and reads
# the next only once the consumer took it (`streams`), so each slice holds one page (held, or being read) and a
# read takes at most READ_AHEAD // page size slices at once (`slice_count`); a 1,000,000-record full sync keeps
# its flat memory whatever the degree (Dataverse's 51 at 5,000 a page would hold 255,000). 6,000: three slices
# of Salesforce's and Dataverse's pages of 2,000. With 10,000 (five), once every slice read side by side, a
# 1,000,000-opportunity Dataverse full sync peaked at 516 MB (469 MB with three, in 243 s against 264 s when the
# five were read one at a time), Salesforce's at 452 MB (421 MB with three).
READ_AHEAD = 6_000
_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def ordered_map(fn: Callable[[T], R], items: Iterable[T], degree: int) -> Iterator[R]:
    """`fn` of each item, at most `degree` at once, yielded in the items' order. At most 2 x `degree` items are
    submitted ahead of the consumer; a failure raises at its place, and the items submitted after it that have not
    begun are cancelled (those already running finish, their results unused). A failure of `items` itself (a
    page read ahead) raises after the results of the items before it, as in a sequential loop."""
    if degree <= 1:
        yield from map(fn, items)
        return
    pending: list[Future[R]] = []
    source = iter(items)
    with ThreadPoolExecutor(degree, thread_name_prefix="oppsync-read") as pool:
        try:
            while True:
                try:
                    item = next(source)
                except StopIteration:
                    break
                except Exception:
                    while pending:
                        yield pending.pop(0).result()
                    raise
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * degree:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
            _close(items)


def _close(items: Iterable[Any]) -> None:
    """Stop a source iterator now: a failure (a lookup's quota spent) leaves it suspended, often in a reference
    cycle with the error (a Future holds it), where its read threads (streams) would wait for a garbage
    collection, or block the interpreter's exit."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


def one_ahead(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the items' order, with fn of the next item running in one helper thread while the
    consumer works on this one: fn's requests wait on the network while the consumer maps and stages. One fn at
    a time, in order (fn may fill caches the consumer only reads); a failure raises at its item's turn."""
    with ThreadPoolExecutor(1, thread_name_prefix="oppsync-ahead") as pool:
        pending: tuple[T, Future[R]] | None = None
        try:
            for item in items:
                submitted = (item, pool.submit(fn, item))
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = submitted
            if pending is not None:
                yield pending[0], pending[1].result()
                pending = None
        finally:
            if pending is not None:
                pending[1].cancel()
            _close(items)


class _Begun:
    """What `chain_ahead`'s helper returns when a read ended and it began the next one: that read's first item,
    and the read after it begun beside it (or None)."""

    def __init__(self, first: Any, ahead: Future[Any] | None):
        self.first, self.ahead = first, ahead


def chain_ahead(
    starts: Sequence[Callable[[], Iterator[T]]], *, side_by_side: bool | Sequence[bool] = True
) -> Iterator[tuple[int, T]]:
    """(i, item) for the items of each read in turn (`starts`: a function per read that begins it), each read's
    next item read in a helper thread while the consumer works on the one before: its request, or the split a
    read starts after its first page, no longer waits for the consumer to stage a page. The next read begins
    (its count, its first page) beside the current read when `side_by_side` (per read: `side_by_side[i]`, whether
    read i+1 may begin beside read i), else as soon as the current read has given its last item. Reads ahead hold two items at most, this read's next and the next read's first:
    what a read splits into after its first page (`streams`, bounded by READ_AHEAD) begins only when the read
    before it is consumed. A failure raises at its item's turn (never a read that looks short or empty); what
    the consumer never reaches (it stopped or failed) is waited for and closed, its result unused."""
    n = len(starts)
    reads: list[Iterator[T] | None] = [None] * n

    def beside(i: int) -> bool:  # whether read i+1 may begin beside read i
        return side_by_side if isinstance(side_by_side, bool) else side_by_side[i]

    def head(i: int) -> Any:
        reads[i] = starts[i]()
        return next(reads[i], _DONE)

    def following(i: int) -> Any:
        item = next(reads[i], _DONE)  # type: ignore[call-overload]  # reads[i] was set by head(i)
        if item is _DONE and i + 1 < n and not beside(i):
            ahead = pool.submit(head, i + 2) if i + 2 < n and beside(i + 1) else None
            try:
                return _Begun(head(i + 1), ahead)
            except BaseException:
                if ahead is not None:
                    ahead.exception()  # ended before its read is closed
                raise
        return item

    # one thread for this read's next item, one for the next read's first
    with ThreadPoolExecutor(2, thread_name_prefix="oppsync-next") as pool:
        nxt: Future[Any] | None = None
        first: Future[Any] | None = pool.submit(head, 1) if n > 1 and beside(0) else None
        try:
            item = head(0) if n else _DONE
            for i in range(n):
                while item is not _DONE and not isinstance(item, _Begun):
                    nxt = pool.submit(following, i)
                    yield i, item
                    item, nxt = nxt.result(), None
                if i + 1 < n:
                    if isinstance(item, _Begun):
                        item, first = item.first, item.ahead
                    else:
                        if first is not None:
                            item, first = first.result(), None
                        else:  # read i was empty: it gave nothing to begin the next one after
                            item = head(i + 1)
                        if i + 2 < n and beside(i + 1):
                            first = pool.submit(head, i + 2)
        finally:
            for f in (nxt, first):
                if f is not None:
                    f.exception()  # the helper ends its item before its read is closed
            for it in reads:
                close = getattr(it, "close", None)
                if close is not None:
                    close()


def in_background(fn: Callable[[], R]) -> Callable[[], R]:
    """Start `fn` in a helper thread now; the returned call waits for its result (raising its error): one request
    that the caller needs later, sent while the caller does other work (writing to the warehouse)."""
    future: Future[R] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller, which raises it
                future.set_exception(err)

    threading.Thread(target=run, name="oppsync-background", daemon=True).start()
    return future.result


def begun(items: Iterator[T], after: Callable[[], object] | None = None) -> Iterator[T]:
    """`items`, its first item read from now on in a helper thread (once `after()` returned: what the read must
    not run beside), while the caller does other work; iterating gives that item, then the rest. A failure
    raises at the first item's turn."""

    def first() -> Any:
        if after is not None:
            after()
        return next(items, _DONE)

    head = in_background(first)

    def chained() -> Iterator[T]:
        try:
            item = head()
            if item is not _DONE:
                yield item
                yield from items
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    return chained()


def slice_count(degree: int, page_size: int) -> int:
    """How many slices a read of `page_size` pages splits into: `degree`, fewer when their pages would pass
    READ_AHEAD records."""
    return max(1, min(degree, READ_AHEAD // max(1, page_size)))


def split_after(low: float, high: float, read: int, remaining: int, parts: int) -> list[float]:
    """The lower bounds of `parts` ranges of a key that together hold what comes after a first page: that page
    read `read` records with keys from `low` to `high`, `remaining` more are expected. The widths assume the
    first page's density (equal counts when keys are evenly spread); the caller leaves the last range open-ended,
    so a wrong estimate costs balance, never records."""
    width = max(1.0, remaining * max(high - low, 1.0) / max(read, 1) / parts)
    return [high + i * width for i in range(parts)]


def streams(slices: list[Callable[[], Iterator[T]]], degree: int) -> Iterator[T]:
    """The items of every slice, as they arrive, while up to `degree` slices are read side by side (each slice's own
    order kept; items of different slices interleave). `slices`: a function per slice that starts its read.

    A slice hands each item over and reads its next one only once the consumer took it: it holds one item (a
    page), so what a read holds ahead stays within READ_AHEAD (`slice_count`). The consumer takes whichever
    slice's item came first: every cursor has its next request in flight while the consumer works (taking the
    slices in turn, as one query's order, left one cursor reading at a time: the consumer waited on the slice
    it was taking, the others idle with their page held). A caller that needs to know how far each slice got
    (a resumable read) tags its slices' items."""
    if degree <= 1 or len(slices) <= 1:
        for start in slices:
            yield from start()
        return
    stop = threading.Event()
    arrived: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    turn = threading.Condition()
    held = [0] * len(slices)  # items handed over and not yet taken, per slice

    def hand_over(i: int, item: Any) -> bool:
        """Queue the item, then wait until the consumer took it (False: the read ended meanwhile)."""
        with turn:
            held[i] += 1  # counted before it is queued: the consumer's take never finds it uncounted
            arrived.put((i, item))
            while held[i] >= 1:
                if stop.is_set():
                    return False
                turn.wait(0.1)
        return not stop.is_set()

    def read(i: int) -> None:
        if stop.is_set():  # the read ended (failed, or the consumer stopped) before this slice began
            return
        try:
            for item in slices[i]():
                if not hand_over(i, item):
                    return
            arrived.put((i, _DONE))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, which raises it
            arrived.put((i, _Failed(err)))

    pool = ThreadPoolExecutor(degree, thread_name_prefix="oppsync-slice")
    with pool:
        try:
            # slices start in order; a worker is free for the next one when an earlier slice is read to its end
            for i in range(len(slices)):
                pool.submit(read, i)
            remaining = len(slices)
            while remaining:
                i, item = arrived.get()
                if item is _DONE:
                    remaining -= 1
                    continue
                if isinstance(item, _Failed):
                    raise item.error
                with turn:
                    held[i] -= 1  # the slice reads its next item while the consumer works on this one
                    turn.notify_all()
                yield item
        finally:
            stop.set()  # running slices stop at their next page; those not begun never send a request
            with turn:
                turn.notify_all()
            pool.shutdown(wait=True, cancel_futures=True)
